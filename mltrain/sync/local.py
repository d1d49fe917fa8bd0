"""Schemes that take local steps and synchronize parameters now and then."""
from __future__ import annotations

import torch

from mltrain.comm import GradReducer, allreduce_, mean_
from mltrain.sync.base import SyncStrategy

__all__ = ["LocalSGD", "EASGD"]


class LocalSGD(SyncStrategy):
    """Local SGD (Lin et al., ICLR 2020): ``warmup_steps`` synchronous steps (gradient
    averaging; post-local SGD), then local steps with the parameters averaged every
    ``period`` steps. Momentum buffers stay local. With period 1 and plain or momentum SGD
    this is gradient averaging exactly (the update is linear in the gradient)."""

    name = "localsgd"
    drifts = True

    def __init__(self, model, comm, *, period: int, warmup_steps: int, bucket_bytes: int,
                 views: bool, max_inflight: int):
        super().__init__(model, comm)
        self.period = period
        self.warmup = warmup_steps
        self.reducer = GradReducer(model.parameters(), comm, bucket_bytes, views, max_inflight)
        self._buf = self.flat.get()  # on the parameters' device

    def _sync_grads(self, step: int) -> bool:
        return step < self.warmup

    def before_forward(self, step):
        if self._sync_grads(step):
            self.reducer.prepare()
        else:
            self.model.zero_grad(set_to_none=True)

    def after_backward(self, step):
        if self._sync_grads(step):
            self.reducer.finish()

    def after_step(self, step):
        if not self._sync_grads(step) and (step + 1 - self.warmup) % self.period == 0:
            self.flat.set(mean_(self.flat.get(self._buf), self.comm))

    def close(self):
        self.reducer.remove()


class EASGD(SyncStrategy):
    """Elastic averaging SGD (Zhang, Choromanska, LeCun 2015), synchronous variant.

    Every ``period`` steps each rank moves toward the centre by d = alpha (x - centre) and
    the centre moves by the sum of the d's. The centre is the same on every rank because
    it starts equal and every rank adds the same allreduced sum. alpha = 0: ranks train
    independently. The centre is the model the run stands for (evaluated, checkpointed).
    """

    name = "easgd"
    drifts = True

    def __init__(self, model, comm, *, alpha: float, period: int):
        super().__init__(model, comm)
        self.alpha = alpha
        self.period = period
        self.center = self.flat.get()  # parameters are equal on all ranks at construction
        self._buf = torch.empty_like(self.center)

    def before_forward(self, step):
        self.model.zero_grad(set_to_none=True)

    def after_step(self, step):
        if (step + 1) % self.period:
            return
        x = self.flat.get(self._buf)
        d = (x - self.center).mul_(self.alpha)
        self.flat.set(x.sub_(d))
        self.center.add_(allreduce_(d, self.comm))

    def consensus_params(self):
        return self.center.clone()
