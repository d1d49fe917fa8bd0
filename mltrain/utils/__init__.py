"""Layer 0 helpers: rank-aware logging, seeding, thread settings. No MPI here: the
rank is passed in (or read from the launcher's environment) so these work before MPI init.
"""
from __future__ import annotations

import logging
import os
import random
import sys

import numpy as np
import torch

__all__ = ["cpu_mask", "get_logger", "launcher_rank", "seed_everything", "set_threads",
           "threads_for", "torch_dtype"]

_LAUNCHER_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID", "PMIX_RANK")


def launcher_rank() -> int:
    """This process's rank as the launcher announced it (0 when not launched by MPI).

    Not collective; needs no MPI initialisation.
    """
    for var in _LAUNCHER_RANK_VARS:
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 0


def get_logger(name: str = "mltrain", rank: int | None = None) -> logging.Logger:
    """A logger whose records carry the rank; only rank 0 prints INFO and below.

    Warnings and errors print on every rank, prefixed with the rank, because a problem on
    rank 17 of 1024 must not be swallowed.
    """
    logger = logging.getLogger(name)
    if getattr(logger, "_mltrain_configured", False):
        return logger
    rank = launcher_rank() if rank is None else rank
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[mltrain {rank}] %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    logger._mltrain_configured = True
    return logger


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy's legacy global RNG and torch. Not collective."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cpu_mask() -> list[int]:
    """The CPUs this process may run on (its affinity mask; containers and binding
    launchers narrow it). Not collective."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def threads_for(cpus_per_task: str | None, mask, local_masks) -> int:
    """Torch threads for a rank with ``run.threads = 0``. Not collective; pure.

    ``cpus_per_task``: SLURM_CPUS_PER_TASK (None or '' when unset), which wins, capped by
    the mask. Otherwise the rank's CPUs (``mask``) divided by the ranks on its node whose
    masks overlap it (``local_masks``: every local rank's mask, its own included): ranks
    bound to CPUs of their own keep all of them, ranks that share a socket (Open MPI's
    default binding) or the whole node (no binding) split what they share.
    """
    mine = set(mask) or {0}
    try:
        cpt = int(cpus_per_task or 0)
    except ValueError:
        cpt = 0
    if cpt > 0:
        return min(cpt, len(mine))
    sharing = sum(1 for m in local_masks if mine & set(m)) or 1
    return max(1, len(mine) // sharing)


def set_threads(threads: int, local_masks=None) -> int:
    """Sets torch's intra-op threads: ``threads`` or, when 0, ``threads_for`` this rank
    (``local_masks``: the CPU masks of the ranks on this node, from
    ``mltrain.comm.local_cpu_masks``; None: this process alone). Returns the number set.
    Not collective.

    Oversubscribed ranks that each spawn a thread per core slow everyone down, hence the
    share; a rank bound to its own CPUs already has its share and keeps all of it.
    """
    if threads <= 0:
        mask = cpu_mask()
        threads = threads_for(os.environ.get("SLURM_CPUS_PER_TASK"), mask,
                              [mask] if local_masks is None else local_masks)
    torch.set_num_threads(threads)
    return threads


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


def available_memory() -> int | None:
    """Bytes this process could still allocate: the smaller of the kernel's MemAvailable
    and the cgroup's remaining limit (batch systems confine jobs with cgroups); None where
    neither is known. Not collective."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit) as f:
                text = f.read().strip()
            if text != "max" and int(text) < 1 << 60:
                with open(usage) as f:
                    found.append(max(int(text) - int(f.read().strip()), 0))
            break
        except (OSError, ValueError):
            continue
    return min(found) if found else None


def check_memory(need: int, what: str, *, share: int = 1, error=MemoryError) -> None:
    """Raises ``error`` naming ``what`` when ``need`` bytes are more than this rank's
    ``share``-th of the memory still available (``share`` = ranks on the node). Not
    collective."""
    free = available_memory()
    if free is None or need <= free // max(share, 1):
        return
    gib = 2 ** 30
    raise error(f"{what}: needs about {need / gib:.2f} GiB per rank, but this node has "
                f"{free / gib:.2f} GiB available for {share} rank(s) "
                f"({free / max(share, 1) / gib:.2f} GiB each)")
