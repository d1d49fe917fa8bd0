"""Per-rank batches of a rank's own partition.

Batch contents are a pure function of (seed, epoch, step, rank), so resuming at any step
reproduces the same data order without storing it. Not collective.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["ShardLoader", "steps_per_epoch"]


def steps_per_epoch(num_train: int, global_batch: int) -> int:
    """Full global batches per epoch; the tail of fewer than ``global_batch`` samples is
    dropped (every rank must take the same number of steps)."""
    return num_train // global_batch


class ShardLoader:
    """Serves batches of ``local_batch`` samples from this rank's partition ``(x, y)``.

    Without shuffling, step k takes local samples [k*b, (k+1)*b): with a strided partition
    the union of the ranks' batches is then exactly the serial batch k. With shuffling,
    each epoch permutes the partition with a generator seeded by (seed, epoch, rank).

    Every rank takes the same ``num_steps`` per epoch (collectives must match). A partition
    smaller than ``num_steps * local_batch`` (skewed sizes) is cycled through as often as
    needed (reshuffled on each pass when shuffling); a larger one is not used up in one
    epoch, and a different part of it is left over each epoch when shuffling.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, local_batch: int, num_steps: int,
                 shuffle: bool, seed: int, rank: int):
        if len(x) == 0:
            raise ValueError("an empty partition cannot serve batches")
        self.x, self.y = x, y
        self.local_batch = local_batch
        self.num_steps = num_steps
        self.shuffle = shuffle
        self.seed, self.rank = seed, rank
        self._perm_epoch, self._perm = None, None

    def _order(self, epoch: int) -> torch.Tensor | None:
        n, need = len(self.x), self.num_steps * self.local_batch
        if not self.shuffle and need <= n:
            return None
        if self._perm_epoch != epoch:
            passes = -(-need // n)
            if self.shuffle:
                parts = [np.random.default_rng([self.seed, epoch, self.rank, j]).permutation(n)
                         for j in range(passes)]
            else:
                parts = [np.arange(n)] * passes
            # Drawn on the host (the same order on every device), indexed where the data is.
            self._perm = torch.from_numpy(np.concatenate(parts)).to(self.x.device)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, epoch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} outside an epoch of {self.num_steps}")
        lo, hi = step * self.local_batch, (step + 1) * self.local_batch
        order = self._order(epoch)
        if order is None:
            return self.x[lo:hi], self.y[lo:hi]
        idx = order[lo:hi]
        return self.x[idx], self.y[idx]
