"""Contiguous partitions of a chain of layers into pipeline stages: the one that minimises
the slowest stage, by dynamic programming over layers (as PipeDream's and Alpa's planners
do), within a memory limit per stage. Pure Python; not collective."""
from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

__all__ = ["best_partition", "brute_force_partition", "stage_costs"]

# cost(i, j): the cost of a stage holding layers i .. j-1; memory(i, j) likewise.
Cost = Callable[[int, int], float]


def stage_costs(balance: Sequence[int], cost: Cost) -> list[float]:
    """The cost of every stage of ``balance`` (layers per stage)."""
    out, lo = [], 0
    for k in balance:
        out.append(cost(lo, lo + k))
        lo += k
    return out


def best_partition(n: int, stages: int, cost: Cost, memory: Cost | None = None,
                   limit: float = math.inf) -> tuple[float, list[int]] | None:
    """The partition of ``n`` layers into ``stages`` contiguous non-empty stages with the
    smallest maximum stage cost, every stage's memory at most ``limit``: (that cost,
    layers per stage), or None when no partition fits. Ties go to the earliest split.
    O(stages n^2) evaluations of ``cost``."""
    if stages < 1 or stages > n:
        return None
    inf = math.inf
    # best[k][j]: the smallest max cost of splitting layers 0 .. j-1 into k stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[-1] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for j in range(k, n - (stages - k) + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] == inf:
                    continue
                if memory is not None and memory(i, j) > limit:
                    continue
                c = max(best[k - 1][i], cost(i, j))
                if c < best[k][j]:
                    best[k][j], cut[k][j] = c, i
    if best[stages][n] == inf:
        return None
    balance, j = [], n
    for k in range(stages, 0, -1):
        i = cut[k][j]
        balance.append(j - i)
        j = i
    return best[stages][n], balance[::-1]


def brute_force_partition(n: int, stages: int, cost: Cost, memory: Cost | None = None,
                          limit: float = math.inf) -> tuple[float, list[int]] | None:
    """Every composition of ``n`` into ``stages`` parts, for checking ``best_partition``."""
    found = None
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = (0, *cuts, n)
        balance = [b - a for a, b in zip(bounds, bounds[1:])]
        if memory is not None and any(memory(a, b) > limit for a, b in zip(bounds, bounds[1:])):
            continue
        c = max(cost(a, b) for a, b in zip(bounds, bounds[1:]))
        if found is None or c < found[0]:
            found = (c, balance)
    return found
