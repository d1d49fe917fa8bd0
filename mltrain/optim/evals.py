"""Evaluations already paid for: the last few (loss, gradient) pairs of one network, keyed by
the batch they were computed on and the iterate they were computed at, so that an
optimizer never evaluates the same (iterate, batch) pair twice.

Second-order and multilevel methods come back to points they have evaluated: a rejected
step restores the iterate bit for bit, an accepted L-SR1 step has already computed the
gradient the next step starts from (on a full or fixed batch), and a coarse correction
evaluates the coarse gradient at the restricted point that its first coarse step starts
from. Without a cache each of those is a second forward and backward pass, charged twice.

A hit needs the same network object in the same evaluation mode (training flag, exact
layer-parallel sweeps), the same batch tensors (``is``, not equal values: a batch is the
same batch only when it is the same object, which every rank decides alike), the same
weight, and an iterate equal bit for bit. Values are stored as the optimizer computed them:
averaged over the data axis and weighted, without any multilevel shift.

Not collective, except ``find`` with a ``layer_comm`` (each rank holds part of the
iterate; the ranks of that communicator agree on a hit).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

__all__ = ["EvalCache"]


def _mode(model: torch.nn.Module) -> tuple:
    """What besides the parameters decides a network's output on a batch."""
    return (model.training, getattr(model, "exact", None))


@dataclass(eq=False)  # entries are identities: never compare tensors with ==
class _Entry:
    model: torch.nn.Module
    mode: tuple
    x: torch.Tensor
    y: torch.Tensor
    weight: float
    iterate: torch.Tensor
    loss: float
    grad: torch.Tensor | None


class EvalCache:
    """The ``size`` most recently used evaluations (2: the current point and the trial
    point)."""

    def __init__(self, size: int = 2, enabled: bool = True):
        self.entries: deque[_Entry] = deque(maxlen=size)
        self.enabled = enabled
        self.hits = {"loss": 0, "grad": 0}

    def find(self, model, x, y, weight: float, iterate: torch.Tensor, need_grad: bool,
             layer_comm=None) -> tuple[float, torch.Tensor | None] | None:
        """(loss, gradient or None) stored for this point and batch, or None. With
        ``need_grad`` only an entry holding a gradient counts. Collective on
        ``layer_comm`` when given."""
        if not self.enabled:
            return None
        mode = _mode(model)
        hit = None
        for e in reversed(self.entries):
            if (e.model is model and e.x is x and e.y is y and e.weight == weight
                    and e.mode == mode and (e.grad is not None or not need_grad)
                    and torch.equal(e.iterate, iterate)):
                hit = e
                break
        if layer_comm is not None:  # every part of the iterate must match
            from mpi4py import MPI

            if not layer_comm.allreduce(hit is not None, op=MPI.LAND):
                hit = None
        if hit is None:
            return None
        # Least recently used goes first: the current point, looked up before each trial,
        # outlives a run of rejected trial points.
        self.entries.remove(hit)
        self.entries.append(hit)
        self.hits["grad" if need_grad else "loss"] += 1
        return hit.loss, hit.grad

    def store(self, model, x, y, weight: float, iterate: torch.Tensor, loss: float,
              grad: torch.Tensor | None) -> None:
        """Records an evaluation; a gradient entry replaces a loss-only one of the same point.
        ``iterate`` must not change afterwards (pass a copy). Not collective."""
        if not self.enabled:
            return
        mode = _mode(model)
        for e in list(self.entries):
            if (e.model is model and e.x is x and e.y is y and e.weight == weight
                    and e.mode == mode and torch.equal(e.iterate, iterate)):
                if grad is None and e.grad is not None:
                    return  # the gradient entry already holds this loss
                self.entries.remove(e)
        self.entries.append(_Entry(model, mode, x, y, weight, iterate, loss, grad))

    def clear(self) -> None:
        self.entries.clear()
