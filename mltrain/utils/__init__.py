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

__all__ = ["get_logger", "launcher_rank", "seed_everything", "set_threads", "torch_dtype"]

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


def set_threads(threads: int, ranks_per_node: int) -> int:
    """Sets torch's intra-op threads: ``threads`` or, when 0, cores per node / ranks per node.

    Oversubscribed ranks that each spawn a thread per core slow everyone down, hence the
    division. Returns the number set. Not collective.
    """
    if threads <= 0:
        # The affinity mask, not cpu_count: containers and core-binding launchers narrow it.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = max(1, cores // max(1, ranks_per_node))
    torch.set_num_threads(threads)
    return threads


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]
