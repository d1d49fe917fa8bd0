"""How the training set is split across data-parallel ranks.

Every partition is disjoint and complete: each of the ``n`` samples belongs to exactly one
rank, whatever the kind. Indices are returned in increasing order. Pure NumPy, deterministic
from ``seed``; nothing here communicates, so ``python -m mltrain partition`` computes a
partition for any rank count without MPI.

Kinds:

* ``contiguous``, ``strided``, ``iid``: label-blind, sizes differ by at most one.
* ``shards`` (McMahan et al. 2017): sort by label, cut into ``shards_per_rank * P`` shards,
  deal them out at random.
* ``dirichlet`` (Hsu et al. 2019; NIID-Bench): each class is split across ranks with
  proportions drawn from Dirichlet(alpha); redrawn until every rank has ``min_size``.
* ``classes`` (pathological label skew): rank r holds ``classes_per_rank`` classes; each class
  is split evenly among the ranks holding it. Needs ``classes_per_rank * P >= classes`` so
  that no class (and no sample) is left out.
* ``quantity`` (quantity skew): iid labels, sizes from Dirichlet(alpha), redrawn until every
  rank has ``min_size``.
"""
from __future__ import annotations

import numpy as np

from mltrain.config import ConfigError

__all__ = ["PARTITIONS", "LABEL_PARTITIONS", "partition", "partition_all", "partition_options",
           "partition_stats"]

PARTITIONS = ("contiguous", "strided", "iid", "shards", "dirichlet", "classes", "quantity")
LABEL_PARTITIONS = ("shards", "dirichlet", "classes")
_MAX_REDRAWS = 1000


def partition(n: int, parts: int, rank: int, kind: str, seed: int = 0,
              labels: np.ndarray | None = None, **options) -> np.ndarray:
    """Indices (int64, increasing) of the samples that ``rank`` of ``parts`` holds.

    ``labels`` (length n) is needed by the label-based kinds; ``options`` are
    ``shards_per_rank``, ``alpha``, ``min_size``, ``classes_per_rank``.
    """
    if parts < 1 or not 0 <= rank < parts:
        raise ValueError(f"rank {rank} of {parts} parts")
    if kind == "contiguous":
        lo, hi = _bounds(n, parts, rank)
        return np.arange(lo, hi, dtype=np.int64)
    if kind == "strided":
        return np.arange(rank, n, parts, dtype=np.int64)
    return partition_all(n, parts, kind, seed, labels, **options)[rank]


def partition_all(n: int, parts: int, kind: str, seed: int = 0,
                  labels: np.ndarray | None = None, *, shards_per_rank: int = 2,
                  alpha: float = 0.5, min_size: int = 1,
                  classes_per_rank: int = 2) -> list[np.ndarray]:
    """Every rank's indices. Raises ConfigError (naming the key) when the options cannot
    produce a partition."""
    if parts < 1:
        raise ValueError(f"{parts} parts")
    rng = np.random.default_rng(seed)
    if kind in ("contiguous", "strided"):
        return [partition(n, parts, r, kind) for r in range(parts)]
    if kind == "iid":
        perm = rng.permutation(n)
        return [np.sort(perm[slice(*_bounds(n, parts, r))]).astype(np.int64)
                for r in range(parts)]
    if kind in LABEL_PARTITIONS:
        if labels is None or len(labels) != n:
            raise ValueError(f"partition {kind!r} needs the {n} training labels")
        labels = np.asarray(labels)
    if kind == "shards":
        groups = _shards(n, parts, rng, labels, shards_per_rank)
    elif kind == "dirichlet":
        groups = _redraw(lambda: _dirichlet(parts, rng, labels, alpha), min_size, "dirichlet",
                         alpha)
    elif kind == "classes":
        groups = _classes(parts, rng, labels, classes_per_rank)
    elif kind == "quantity":
        groups = _redraw(lambda: _quantity(n, parts, rng, alpha), min_size, "quantity", alpha)
    else:
        raise ConfigError(f"data.partition: unknown partition {kind!r} (one of "
                          f"{', '.join(PARTITIONS)})")
    return [np.sort(np.asarray(g, dtype=np.int64)) for g in groups]


def _bounds(n: int, parts: int, rank: int) -> tuple[int, int]:
    # The first n % parts ranks take one extra sample.
    q, r = divmod(n, parts)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (1 if rank < r else 0)


def _shards(n, parts, rng, labels, per_rank):
    if per_rank < 1:
        raise ConfigError("data.shards_per_rank: must be at least 1")
    num = per_rank * parts
    if num > n:
        raise ConfigError(f"data.shards_per_rank: {num} shards for {n} samples")
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, num)
    deal = rng.permutation(num)
    return [np.concatenate([shards[s] for s in deal[r * per_rank:(r + 1) * per_rank]])
            for r in range(parts)]


def _split_by(idx: np.ndarray, proportions: np.ndarray) -> list[np.ndarray]:
    cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
    return np.split(idx, cuts)


def _dirichlet(parts, rng, labels, alpha):
    groups = [[] for _ in range(parts)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for r, piece in enumerate(_split_by(idx, rng.dirichlet(np.full(parts, alpha)))):
            groups[r].append(piece)
    return [np.concatenate(g) for g in groups]


def _quantity(n, parts, rng, alpha):
    return _split_by(rng.permutation(n), rng.dirichlet(np.full(parts, alpha)))


def _redraw(draw, min_size, kind, alpha):
    if alpha <= 0:
        raise ConfigError("data.alpha: must be positive")
    smallest = 0
    for _ in range(_MAX_REDRAWS):
        groups = draw()
        smallest = min(len(g) for g in groups)
        if smallest >= min_size:
            return groups
    raise ConfigError(
        f"data.min_size: no {kind} partition with at least {min_size} samples per rank in "
        f"{_MAX_REDRAWS} draws (alpha={alpha}; the best draw's smallest rank had {smallest}); "
        "lower data.min_size, raise data.alpha, or use fewer ranks")


def _classes(parts, rng, labels, per_rank):
    classes = np.unique(labels)
    k = len(classes)
    if not 1 <= per_rank <= k:
        raise ConfigError(f"data.classes_per_rank: must be between 1 and {k}")
    if per_rank * parts < k:
        raise ConfigError(f"data.classes_per_rank: {per_rank} classes x {parts} ranks cannot "
                          f"cover all {k} classes; samples of the others would be dropped")
    # Consecutive windows over a random class order: every class is held by some rank.
    order = rng.permutation(classes)
    holders = {c: [] for c in classes}
    for r in range(parts):
        for j in range(per_rank):
            holders[order[(r * per_rank + j) % k]].append(r)
    groups = [[] for _ in range(parts)]
    for c, ranks in holders.items():
        idx = rng.permutation(np.flatnonzero(labels == c))
        for r, piece in zip(ranks, np.array_split(idx, len(ranks))):
            groups[r].append(piece)
    return [np.concatenate(g) if g else np.empty(0, np.int64) for g in groups]


def partition_stats(groups: list[np.ndarray], labels: np.ndarray, num_classes: int) -> dict:
    """Sizes, per-rank label histograms and the skew: the mean over ranks of the total
    variation distance between a rank's label distribution and the global one (0 = every
    rank sees the global mix; a rank holding one class of ten balanced ones scores 0.9)."""
    labels = np.asarray(labels)
    hists = np.stack([np.bincount(labels[g], minlength=num_classes) for g in groups])
    glob = np.bincount(labels, minlength=num_classes) / len(labels)
    sizes = hists.sum(axis=1)
    tv = [0.5 * np.abs(h / s - glob).sum() if s else 1.0 for h, s in zip(hists, sizes)]
    return {"sizes": sizes.tolist(), "label_histograms": hists.tolist(),
            "skew": float(np.mean(tv))}


def partition_options(data_cfg) -> dict:
    """The ``partition_all`` keyword options from a ``[data]`` config section."""
    return {"shards_per_rank": data_cfg.shards_per_rank, "alpha": data_cfg.alpha,
            "min_size": data_cfg.min_size, "classes_per_rank": data_cfg.classes_per_rank}
