"""The parallel layout: one object per run that says what this rank computes of the model.

``parallelize(model, gc, cfg)`` turns a serial network and the grid's communicators into a
``Layout`` with the same interface for every layout the grid allows (data only, data x
layer, data x pipe, data x pipe x layer): the network to call, forward and backward on a
batch, the parameters this rank trains, and gathering parameters and optimizer state onto
every rank for checkpoints and evaluation. The Trainer and every benchmark that times
training build their layout here and nowhere else.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mltrain.comm import GradReducer, agree, broadcast_parameters
from mltrain.mgrit import LayerParallel
from mltrain.nn import add_depth_penalty
from mltrain.pipeline import LayeredPipeline, Pipeline, sequential_layers

__all__ = ["Layout", "parallelize", "layer_parallel"]


class Layout:
    """What this rank runs of ``net`` (the serial network every rank holds whole).

    ``module``: the network to call on a batch (``net``, or its layer-parallel wrapper);
    ``chain``: where this rank runs MGRIT (None without a layer axis); ``pipe``: the
    pipeline executor (None without a pipe axis). ``chains`` lists every layer-parallel
    network of the run (a multilevel optimizer adds its coarse levels), so one switch
    makes them all exact.
    """

    def __init__(self, net: nn.Module, gc, *, lp: LayerParallel | None = None,
                 pipe: Pipeline | None = None, layers: list[nn.Module] | None = None,
                 reducer: GradReducer | None = None, amp: str = "off"):
        self.net, self.gc = net, gc
        # run.amp, decided once: the pipeline's stages autocast their own forward passes.
        self.amp_dtype = torch.bfloat16 if amp == "bf16" else None
        if pipe is not None:
            pipe.amp_dtype = self.amp_dtype
        self.lp, self.pipe, self._layers, self._reducer = lp, pipe, layers, reducer
        self.module: nn.Module = lp if lp is not None else net
        self.chain = lp if lp is not None else (
            pipe.lp if isinstance(pipe, LayeredPipeline) else None)
        self.chains: list[LayerParallel] = [self.chain] if self.chain is not None else []

    @property
    def data(self):
        """The data-axis communicator (gradients and losses are averaged over it)."""
        return self.gc.data

    def set_exact(self, exact: bool) -> None:
        """Exact (serial-equivalent) sweeps instead of MGRIT on every layer-parallel
        network of the run (``mgrit.exact_after``). Not collective."""
        for c in self.chains:
            c.exact = exact

    @property
    def residuals(self) -> dict | None:
        """MGRIT residual norms of the last step (None without a layer axis)."""
        return dict(self.chain.residuals) if self.chain is not None else None

    def loss_backward(self, x: torch.Tensor, y: torch.Tensor,
                      model: nn.Module | None = None) -> torch.Tensor:
        """Forward and backward of ``model`` (default: ``module``; nested iteration trains
        coarse levels) on this rank's batch; the gradients are left in ``.grad`` (a
        pipeline's zeroed first and averaged over the data axis here; otherwise the sync
        scheme's hooks do it). Returns the local loss, detached. Collective on the pipe,
        layer and (with a pipeline) data axes."""
        if self.pipe is not None:
            for p in self.net.parameters():
                p.grad = None
            loss = torch.tensor(self.pipe.step(x, y), device=x.device)  # autocast: the stages
            if self._reducer is not None:
                self._reducer.reduce()
            return loss
        model = model or self.module
        with self.autocast(x):
            loss = F.cross_entropy(model(x), y)
        loss = add_depth_penalty(loss, model)  # in the weights' precision, outside autocast
        loss.backward()
        return loss.detach()

    def autocast(self, x: torch.Tensor):
        """``run.amp``'s autocast on ``x``'s device (bfloat16 forward, float32 weights and
        gradients), or nothing. Not collective."""
        return torch.autocast(x.device.type, dtype=self.amp_dtype or torch.bfloat16,
                              enabled=self.amp_dtype is not None)

    def gather(self) -> None:
        """The whole current network on every rank (for evaluation and checkpoints).
        Collective on the layer and pipe axes."""
        if self.lp is not None:
            self.lp.gather()
        if self.pipe is not None:
            self.pipe.gather(self._layers)

    def gather_state(self, optimizer, flat: bool = False) -> None:
        """Every parameter's optimizer state on every rank, from the rank that trains it
        (``flat``: the state is replicated already). Collective on the layer and pipe
        axes."""
        if self.lp is not None and not flat:
            self.lp.gather_state(optimizer)
        if self.pipe is not None:
            self.pipe.gather_state(optimizer, self._layers)

    def close(self) -> None:
        if self._reducer is not None:
            self._reducer.remove()
            self._reducer = None


def layer_parallel(model: nn.Module, layer_comm, mgrit: dict, *, align: int = 1) -> LayerParallel:
    """``model``'s residual blocks split over ``layer_comm`` and propagated by MGRIT with the
    solver settings ``mgrit`` (``MgritConfig.solver()``); the one place a layer-parallel
    network is made (``parallelize``, and ``bench mgrit`` for the solver alone, on any
    number of ranks, one included). Not collective."""
    return LayerParallel(model, layer_comm, align=align, **mgrit)


def parallelize(model: nn.Module, gc, cfg, *, align: int = 1) -> Layout:
    """``model`` laid out over the grid ``gc`` as ``cfg.parallel`` asks; every rank ends
    with rank 0's weights. ``align``: layer-parallel splits fall on multiples of it (a
    multilevel hierarchy's coarsening). Collective on the world communicator of ``gc``.
    """
    comm, mgrit, p = gc.world, cfg.mgrit.solver(), cfg.pipeline
    lp, pipe, layers = None, None, None
    if gc.grid.layer > 1 and gc.grid.pipe == 1:
        lp = agree(comm, lambda: layer_parallel(model, gc.comms["layer"], mgrit, align=align),
                   what="config")
    elif gc.grid.pipe > 1 and gc.grid.layer > 1:  # stages themselves layer-parallel
        pipe = agree(comm, lambda: LayeredPipeline(
            model, gc.comms["pipe"], gc.comms["layer"], microbatches=p.microbatches,
            schedule=p.schedule, balance=p.balance_list, **mgrit), what="config")
        layers = pipe.segments
    elif gc.grid.pipe > 1:
        layers = agree(comm, lambda: sequential_layers(model), what="config")
        pipe = agree(comm, lambda: Pipeline(
            layers, gc.comms["pipe"], microbatches=p.microbatches, schedule=p.schedule,
            balance=p.balance_list), what="config")
    # Layer ranks and pipeline stages hold replicas of the whole network too: the same
    # weights everywhere.
    broadcast_parameters(model, comm if lp is not None or pipe is not None else gc.data)
    reducer = None
    if pipe is not None and gc.grid.data > 1:
        # Micro-batches accumulate the stage's gradients; they are averaged over the data
        # axis once, after the step's last backward (no hooks armed).
        c = cfg.comm
        reducer = GradReducer(list(pipe.parameters()), gc.data, int(c.bucket_mb * 2 ** 20),
                              grad_as_bucket_view=False, max_inflight=c.max_inflight)
    return Layout(model, gc, lp=lp, pipe=pipe, layers=layers, reducer=reducer, amp=cfg.run.amp)
