"""How the training set is split across data-parallel ranks.

Every partition is disjoint and complete: each of the ``n`` samples belongs to exactly one
rank. Sizes differ by at most one. Indices are returned in increasing order. Pure NumPy,
deterministic from ``seed``; nothing here communicates, so ``python -m mltrain partition``
(a later issue) can compute a partition for any rank count without MPI.
"""
from __future__ import annotations

import numpy as np

__all__ = ["PARTITIONS", "partition", "partition_all"]

PARTITIONS = ("contiguous", "strided", "iid")


def partition(n: int, parts: int, rank: int, kind: str, seed: int = 0) -> np.ndarray:
    """Indices (int64, increasing) of the samples that ``rank`` of ``parts`` holds."""
    if parts < 1 or not 0 <= rank < parts:
        raise ValueError(f"rank {rank} of {parts} parts")
    if kind == "contiguous":
        lo, hi = _bounds(n, parts, rank)
        return np.arange(lo, hi, dtype=np.int64)
    if kind == "strided":
        return np.arange(rank, n, parts, dtype=np.int64)
    if kind == "iid":
        perm = np.random.default_rng(seed).permutation(n)
        lo, hi = _bounds(n, parts, rank)
        return np.sort(perm[lo:hi]).astype(np.int64)
    raise ValueError(f"data.partition: unknown partition {kind!r} (one of {PARTITIONS})")


def partition_all(n: int, parts: int, kind: str, seed: int = 0) -> list[np.ndarray]:
    return [partition(n, parts, r, kind, seed) for r in range(parts)]


def _bounds(n: int, parts: int, rank: int) -> tuple[int, int]:
    # The first n % parts ranks take one extra sample.
    q, r = divmod(n, parts)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (1 if rank < r else 0)
