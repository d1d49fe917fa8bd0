"""Synchronous gradient averaging: the bucketed, overlapped reducer, optionally compressed."""
from __future__ import annotations

import torch

from mltrain.comm import GradReducer
from mltrain.sync.base import SyncStrategy

__all__ = ["AllReduce"]


class AllReduce(SyncStrategy):
    """Every step, every rank's gradient is replaced by the average (replicas stay equal).

    Without compression the ``GradReducer`` overlaps the allreduces with backward; with
    ``compressor`` set, gradients are compressed, exchanged and decompressed after backward.
    """

    name = "allreduce"

    def __init__(self, model, comm, *, bucket_bytes: int, views: bool, max_inflight: int,
                 compressor=None):
        super().__init__(model, comm)
        self.compressor = compressor
        self.reducer = None
        # One rank has nothing to average: no buckets, hooks or copies (they cost a fifth
        # of a small model's step). Compression still runs: its rounding is part of the run.
        if compressor is None and comm.Get_size() > 1:
            self.reducer = GradReducer(model.parameters(), comm, bucket_bytes, views,
                                       max_inflight)

    def before_forward(self, step):
        if self.reducer is not None:
            self.reducer.prepare()
        else:  # autograd then writes fresh gradients: no zeroing pass, no accumulation
            self.model.zero_grad(set_to_none=True)

    def after_backward(self, step):
        if self.reducer is not None:
            self.reducer.finish()
        elif self.compressor is not None:
            self.compressor.average_grads(self.flat.params)
        else:  # one rank: zeros where the reducer's buckets would give them (a parameter
            for p in self.flat.params:  # the loss misses still steps, on 0)
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

    def close(self):
        if self.reducer is not None:
            self.reducer.remove()
