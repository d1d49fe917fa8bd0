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

__all__ = ["get_logger", "launcher_rank", "seed_everything", "set_threads", "threads_for",
           "torch_dtype"]

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


def threads_for(cpus_per_task: str | None, mask: int, node_cpus: int,
                ranks_per_node: int) -> int:
    """Torch threads for a rank with ``run.threads = 0``. Not collective; pure.

    ``cpus_per_task``: SLURM_CPUS_PER_TASK (None or '' when unset), which wins, capped by
    the mask; ``mask``: CPUs in this rank's affinity mask; ``node_cpus``: CPUs the node
    gives this job (its cpuset, else the CPU count). A mask narrower than that is already
    this rank's share (a launcher bound each rank to its own CPUs) and is used whole; only
    a mask of the whole node, which every rank on it shares, is divided by the ranks per
    node.
    """
    mask = max(1, mask)
    try:
        cpt = int(cpus_per_task or 0)
    except ValueError:
        cpt = 0
    if cpt > 0:
        return min(cpt, mask)
    if mask < node_cpus:
        return mask
    return max(1, mask // max(1, ranks_per_node))


def _cpu_list_size(text: str) -> int:
    """Number of CPUs in a Linux CPU list such as ``0-3,8,10-11``."""
    n = 0
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            n += int(hi or lo) - int(lo) + 1
    return n


def _cgroup_cpus() -> int | None:
    """CPUs of this process's cpuset cgroup (v2 or v1), None when unreadable. A container's
    or a SLURM step's cpuset is the part of the node the job may use. Not collective."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    for entry in entries:
        if len(entry) != 3:
            continue
        _, controllers, path = entry
        if controllers == "":
            roots, name = ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"), "cpuset.cpus.effective"
        elif "cpuset" in controllers.split(","):
            roots, name = ("/sys/fs/cgroup/cpuset",), "cpuset.effective_cpus"
        else:
            continue
        for root in roots:
            # Walk up: the leaf may not have the cpuset controller, or the path is the
            # host's while the container mounts its own cgroup at the root.
            parts = [p for p in path.split("/") if p]
            while True:
                try:
                    with open(os.path.join(root, *parts, name), encoding="utf-8") as f:
                        n = _cpu_list_size(f.read())
                    if n > 0:
                        return n
                except (OSError, ValueError):
                    pass
                if not parts:
                    break
                parts.pop()
    return None


def set_threads(threads: int, ranks_per_node: int) -> int:
    """Sets torch's intra-op threads: ``threads`` or, when 0, SLURM_CPUS_PER_TASK, else this
    rank's share of the node (``threads_for``). Returns the number set. Not collective.

    Oversubscribed ranks that each spawn a thread per core slow everyone down, hence the
    share; a rank bound to its own CPUs already has its share and keeps all of it.
    """
    if threads <= 0:
        # The affinity mask, not cpu_count: containers and core-binding launchers narrow it.
        if hasattr(os, "sched_getaffinity"):
            mask = len(os.sched_getaffinity(0))
        else:
            mask = os.cpu_count() or 1
        node = _cgroup_cpus()
        if node is None or node < mask:
            node = os.cpu_count() or mask
        threads = threads_for(os.environ.get("SLURM_CPUS_PER_TASK"), mask, node,
                              ranks_per_node)
    torch.set_num_threads(threads)
    return threads


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]
