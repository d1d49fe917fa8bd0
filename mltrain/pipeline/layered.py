"""Pipeline stages that are layer-parallel themselves (grid data x pipe x layer): a residual
network's sequential layers (opening, blocks, closing) split into contiguous stages over
the ``pipe`` axis, and each stage's residual blocks split again over the ``layer`` axis and
propagated by MGRIT.

Every layer rank of a stage runs the same schedule: a stage's forward and backward are
collective on its layer communicator (``LayerParallel``), whose output and input gradient
are the same on every layer rank, so the layer rank j of one stage exchanges activations
and gradients with the layer rank j of its neighbours (the pipe communicators are the
grid's rows of equal layer index). Stage by stage the gradients are those of the serial
network whenever MGRIT's are (exact sweeps, or enough iterations).

Collective on the pipe and layer communicators (``step``, ``gather``, ``gather_state``);
construction is not.
"""
from __future__ import annotations

import torch
from mpi4py import MPI
from torch import nn

from mltrain.config import ConfigError
from mltrain.nn import check_residual
from mltrain.mgrit import LayerParallel, split_layers
from mltrain.pipeline.executor import Pipeline

__all__ = ["LayeredPipeline", "Segment", "layered_balance"]


class Segment(nn.Module):
    """Layers [a, b) of a residual network's sequential list (opening, blocks, closing) as
    a residual network of its own: the opening when a = 0 and the closing when b is the
    end (identities otherwise), the blocks between. It shares the network's modules. Not
    collective."""

    def __init__(self, model: nn.Module, a: int, b: int):
        super().__init__()
        N = len(model.blocks)
        self.opening = model.opening if a == 0 else nn.Identity()
        self.blocks = nn.ModuleList(model.blocks[max(a - 1, 0):min(b - 1, N)])
        self.closing = model.closing if b == N + 2 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.opening(x)
        for block in self.blocks:
            x = block(x)
        return self.closing(x)


def layered_balance(blocks: int, stages: int, layer: int, levels: int, cf: int) -> list[int]:
    """Sequential layers per stage (the opening on the first, the closing on the last) whose
    residual blocks split as evenly as possible in whole units of cf^(levels-1) blocks,
    so that every stage can go layer-parallel on ``layer`` ranks. Raises ConfigError when
    the depth cannot carry the stages. Not collective."""
    unit = cf ** (levels - 1)
    if blocks % unit or blocks // unit < stages * layer:
        raise ConfigError(f"parallel.pipe: {blocks} residual blocks do not make {stages} "
                          f"stages of {layer} layer ranks with at least one interval of "
                          f"mgrit.cf^(mgrit.levels-1) = {unit} blocks per rank")
    m = blocks // unit
    out = [(m // stages + (s < m % stages)) * unit for s in range(stages)]
    out[0] += 1
    out[-1] += 1
    return out


class LayeredPipeline(Pipeline):
    """Stage ``pipe_comm.rank`` of the residual network ``model``, its blocks layer-parallel
    on ``layer_comm``. ``balance``: sequential layers per stage (default
    ``layered_balance``); ``mgrit``: ``LayerParallel``'s settings (levels, cf, relax, iters,
    bwd_iters, tol, skip). The executor runs one module per stage: ``segments[s]`` (the
    network's layers of stage s), this rank's wrapped in ``LayerParallel`` as ``lp``."""

    def __init__(self, model: nn.Module, pipe_comm: MPI.Comm, layer_comm: MPI.Comm, *,
                 microbatches: int, schedule: str = "1f1b", balance: list[int] | None = None,
                 loss_fn=None, **mgrit):
        S, L = pipe_comm.Get_size(), layer_comm.Get_size()
        check_residual(model, "parallel.layer: layer-parallel pipeline stages")
        N = len(model.blocks)
        levels, cf = mgrit.get("levels", 2), mgrit.get("cf", 2)
        if balance:
            balance = list(balance)
            if len(balance) != S or sum(balance) != N + 2 or min(balance) < 1:
                raise ConfigError(f"pipeline.balance: {balance} must give each of the {S} "
                                  f"stages at least one layer and sum to the {N + 2} layers")
        else:
            balance = layered_balance(N, S, L, levels, cf)
        bounds = [sum(balance[:k]) for k in range(S + 1)]
        self.segments = [Segment(model, a, b) for a, b in zip(bounds, bounds[1:])]
        for s, seg in enumerate(self.segments):  # every stage checked on every rank
            try:
                split_layers(len(seg.blocks), L, levels, cf)
            except ConfigError as e:
                raise ConfigError(f"pipeline.balance: stage {s} ({balance[s]} layers): {e}") \
                    from None
        s = pipe_comm.Get_rank()
        self.lp = LayerParallel(self.segments[s], layer_comm, **mgrit)
        self.layer_balance = balance
        stages = list(self.segments)
        stages[s] = self.lp
        super().__init__(stages, pipe_comm, microbatches=microbatches, schedule=schedule,
                         balance=[1] * S, loss_fn=loss_fn)

    def parameters(self):
        """What this rank trains: its blocks, and the opening or closing when its stage
        holds them (replicated over the stage's layer ranks)."""
        return self.lp.local_modules().parameters()

    def gather(self, layers: list[nn.Module]) -> None:
        """Every block from its layer rank, then every stage from its pipe rank: the whole
        network on every rank. Collective on both axes."""
        self.lp.gather()
        super().gather(layers)

    def gather_state(self, optimizer: torch.optim.Optimizer, layers: list[nn.Module]) -> None:
        """Every block's optimizer state from its layer rank, then every stage's from its
        pipe rank. Collective on both axes."""
        self.lp.gather_state(optimizer)
        super().gather_state(optimizer, layers)
