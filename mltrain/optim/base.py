"""What an optimizer is to the Trainer, and the builders of the single-level ones.

Every optimizer the Trainer runs is a ``Method``: ``step`` trains one step on this rank's
data, ``work`` and ``report`` count what it cost, ``state`` is what checkpoints hold (a
``torch.optim.Optimizer`` or one with its ``state_dict`` interface), ``sync`` the data-axis
scheme whose consensus is evaluated, ``close`` frees what it holds. A builder takes a
``Context`` (config, layout, straggler) and returns a Method; ``mltrain.train.optimizers``
maps each ``optim.name`` to its builder. Nothing here asks which kind an optimizer is.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mltrain.comm import STATS
from mltrain.optim import build_optimizer
from mltrain.optim.tr import Objective, TrustRegion
from mltrain.sync import SyncStrategy, build_sync

# tr.grow_on = work: the relative slack by which a stage's work may fall short of its
# length and still end it: the round-off of a running sum, so that an exact tie (prices of
# 1 count whole samples) ends the stage on every CPU. A real shortfall is a whole sample.
STAGE_SLACK = 1e-9

__all__ = ["Batches", "Context", "Method", "Straggler", "first_order", "trust_region", "apts",
           "tr_settings"]


class Straggler:
    """``run.straggler``: this rank's compute takes ``factor`` times longer (it sleeps
    factor - 1 times what the timed block took), on every training path. Not collective."""

    def __init__(self, factor: float = 1.0):
        self.factor = factor

    @contextmanager
    def timed(self):
        t0 = time.perf_counter()
        yield
        if self.factor > 1.0:
            if torch.cuda.is_initialized():  # the block's kernels, not only their launches
                torch.cuda.synchronize()
            time.sleep((self.factor - 1.0) * (time.perf_counter() - t0))


@dataclass
class Batches:
    """This rank's data at one step: the mini-batch, or (trust region's ``tr.batch``)
    the whole partition or several consecutive mini-batches."""

    loader: Any  # ShardLoader
    step: int
    dp_size: int
    num_train: int
    fixed: tuple[torch.Tensor, torch.Tensor] | None = None  # the mini-batch, if given

    def minibatch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fixed is not None:
            return self.fixed
        return self.loader.batch(*divmod(self.step, self.loader.num_steps))

    def grown(self, mode: str, factor: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(x, y, weight) for ``tr.batch`` = ``mode``: the mini-batch, the whole
        partition (full, or hybrid grown past an epoch), or ``factor`` consecutive
        mini-batches (hybrid). weight = local samples x ranks / global samples."""
        spe = self.loader.num_steps
        if mode == "full" or factor >= spe:
            x, y = self.loader.x, self.loader.y
            return x, y, len(x) * self.dp_size / self.num_train
        if factor > 1:
            parts = [self._ahead(j) for j in range(factor)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), 1.0
        return (*self.minibatch(), 1.0)

    def heldout(self, factor: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The mini-batch after the ``factor`` that ``grown`` gives a hybrid step, in the
        same epoch's order: samples that step does not see (None when the step's batch
        already fills the epoch)."""
        return self._ahead(factor) if factor + 1 <= self.loader.num_steps else None

    def _ahead(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The mini-batch ``j`` places after this step's in its epoch's order (wrapping)."""
        spe = self.loader.num_steps
        epoch, pos = divmod(self.step, spe)
        return self.loader.batch(epoch, (pos + j) % spe)


@dataclass
class Context:
    """What a builder gets: the config, the run's layout (``mltrain.train.parallelize``),
    the network to train (the layout's, or a coarse level's in nested iteration), the
    straggler, and (nested iteration) the number of levels from that network down."""

    cfg: Any
    layout: Any
    model: torch.nn.Module
    straggler: Straggler
    levels: int | None = None
    ps: Any = None  # sync.name = ps: this worker's PSClient

    @property
    def layered(self) -> bool:
        """The network trained is the layout's layer-parallel one."""
        return self.layout.lp is not None and self.model is self.layout.lp


class Method:
    """An optimizer as the Trainer runs it (see the module docstring).

    ``flat_state``: the state is already replicated on every layer rank (no gather before a
    checkpoint)."""

    flat_state = False

    def __init__(self, state, sync: SyncStrategy, straggler: Straggler):
        self.state, self.sync, self.straggler = state, sync, straggler

    @property
    def lr(self) -> float:
        return self.state.param_groups[0]["lr"]

    def step(self, batches: Batches) -> torch.Tensor:
        """One optimizer step; returns this rank's loss (detached). Collective on the
        layout's axes."""
        raise NotImplementedError

    def work(self, steps: int, batch_size: int, num_train: int) -> float:
        """Work so far in gradient equivalents of the network trained."""
        return steps * batch_size / num_train

    def report(self, num_train: int) -> dict:
        """Figures for the run summary (work counters, radius, decisions)."""
        return {}

    def step_metrics(self) -> dict:
        """Figures of the last step for the metrics records (a multilevel method's
        coarse corrections)."""
        return {}

    def close(self) -> None:
        """Frees hooks, communicators and solvers. Collective on the data axis."""
        self.sync.close()


class FirstOrder(Method):
    """A torch optimizer (SGD, Adam) with a data-parallel sync scheme."""

    def __init__(self, state, sync, straggler, layout, model):
        super().__init__(state, sync, straggler)
        self.layout, self.model = layout, model

    def step(self, batches: Batches) -> torch.Tensor:
        self.sync.before_forward(batches.step)
        with self.straggler.timed():
            loss = self.layout.loss_backward(*batches.minibatch(), model=self.model)
        self.sync.after_backward(batches.step)
        self.state.step()
        self.sync.after_step(batches.step)
        return loss


class ParameterServerWorker(Method):
    """A worker of ``sync.name = ps``: computes the gradient of its batch, pushes it to the
    servers and takes the parameters they send back (the servers run the optimizer).
    ``state`` is an optimizer of the same kind that is never stepped here: checkpoints
    fill it with the servers' state (``gather_state``) and resume reads it."""

    def __init__(self, state, sync, straggler, layout, model):
        super().__init__(state, sync, straggler)
        self.layout, self.model = layout, model
        self.params = [p for p in model.parameters() if p.requires_grad]
        flat = sync.flat.get()
        self._g, self._x = torch.empty_like(flat), flat
        self.staleness: list[int] = []  # of the steps since the last logged one
        state.gather_state = self.gather_state  # what Trainer.save asks of an optimizer

    def step(self, batches: Batches) -> torch.Tensor:
        """One step: gradient, push, the servers' parameters back. Point to point with the
        servers (not collective)."""
        from mltrain.sync.ps import flat_grads

        self.model.zero_grad(set_to_none=True)
        with self.straggler.timed():
            loss = self.layout.loss_backward(*batches.minibatch(), model=self.model)
        flat_grads(self.params, self._g)
        self.staleness.append(self.sync.client.push_pull(self._g, batches.step, self._x))
        self.sync.flat.set(self._x)
        return loss

    def gather_state(self) -> None:
        """Loads the optimizer state the last consensus fetch brought (worker 0, which
        writes checkpoints). Not collective."""
        from mltrain.sync.ps import load_flat_state

        if self.sync.rank == 0:
            load_flat_state(self.state, self.params, self.sync.state)

    def step_metrics(self) -> dict:
        """The staleness of this worker's gradients since the last logged step. Not
        collective."""
        s, self.staleness = self.staleness, []
        return {"staleness_mean": sum(s) / len(s), "staleness_max": max(s)} if s else {}

    def report(self, num_train: int) -> dict:
        """The servers' staleness record of every applied push (worker 0 asks, the others
        receive it). Collective on the workers' communicator."""
        with STATS.paused():
            return {"servers": len(self.sync.client.servers),
                    **self.sync.client.report_all(self.sync.comm)}


class SecondOrder(Method):
    """An optimizer that evaluates its own objective on the batch (trust region, RMTR,
    MG/OPT, APTS): ``state.tr_step``; it averages gradients and products itself."""

    def __init__(self, state, sync, straggler, model, cfg):
        """``cfg``: the run's config: ``tr.batch``, ``tr.grow_on`` and ``tr.grow_every``
        (hybrid batches), ``run.costs`` (measured prices are timed on the first step's
        batch, ``mltrain.optim.costs``) and ``data.batch_size``."""
        super().__init__(state, sync, straggler)
        self.model, self.batch_mode = model, cfg.tr.batch
        hybrid = self.batch_mode == "hybrid"
        self.holdout = cfg.tr.grow_on == "holdout" and hybrid
        # tr.grow_on = work: a stage at batch factor f lasts f x this many samples' worth
        # of work (grow_every gradients of the global batch f x data.batch_size).
        self.stage_samples = cfg.tr.grow_every * cfg.data.batch_size \
            if cfg.tr.grow_on == "work" and hybrid else 0.0
        self.flat_state = bool(getattr(state, "flat_state", False))
        self.to_measure = cfg.run.costs == "measured"

    def step(self, batches: Batches) -> torch.Tensor:
        before = self.state.work(batches.num_train) if self.stage_samples else 0.0
        factor = self.state.batch_factor if self.batch_mode == "hybrid" else 1
        x, y, weight = batches.grown(self.batch_mode, factor)
        at_step = getattr(self.state, "at_step", None)
        if at_step is not None:  # RMTR's nested initialization cycles from a coarse level
            at_step(batches.step)
        obj = Objective(self.model, F.cross_entropy, x, y, weight)
        if self.to_measure:  # prices are ratios: the mini-batch times them well enough
            self.to_measure = False
            self.state.measure_costs(Objective(self.model, F.cross_entropy,
                                               *batches.minibatch(), 1.0))
        with self.straggler.timed():
            value = self._held_out_step(obj, batches, factor) if self.holdout \
                else self.state.tr_step(obj)
        if self.stage_samples:
            self._grow_on_work(self.state.work(batches.num_train) - before, batches.num_train)
        return torch.tensor(value)  # host: a Python float already; the loop reads .item()

    def _grow_on_work(self, spent: float, num_train: int) -> None:
        """``tr.grow_on = work``, after a step that spent ``spent``: doubles the hybrid
        batch once the work spent at it reaches ``tr.grow_every`` gradients of the current
        batch, so the schedule is the same for every method at equal work and ignores what
        steps are rejected. Work is priced (``run.costs``; ``unit`` makes the schedule
        reproducible to the bit) and equal on every rank. The stage's work so far is
        optimizer state (a resumed run continues it); nothing counts while RMTR's nested
        start cycles from a coarse level. Not collective."""
        tr = getattr(self.state, "grower", None)
        if tr is None:
            return
        spent += tr.stage_work
        # Prices of 1 make exact ties (work is then samples / num_train): they grow,
        # whatever the last bit of the running sum.
        if spent >= (1 - STAGE_SLACK) * self.stage_samples * tr.batch_factor / num_train:
            tr.grow()
            spent = 0.0
        tr.stage_work = spent

    def _held_out_step(self, obj: Objective, batches: Batches, factor: int) -> float:
        """A step whose acceptance also faces unseen samples (``tr.grow_on = holdout``):
        the loss on the next mini-batch is evaluated before and after, and an accepted step
        that kept less than eta1 of its decrease there counts as failed for the batch growth.
        A step that grows from the noise of its own batch looks like a success on that batch;
        only samples it did not see tell. Collective on the data axis."""
        tr = getattr(self.state, "grower", None)
        held = batches.heldout(factor)
        if tr is None or held is None:
            return self.state.tr_step(obj)
        check = Objective(self.model, F.cross_entropy, *held, 1.0)
        before = tr.value(check)
        tr.holdout = True
        try:
            value = self.state.tr_step(obj)
        finally:
            tr.holdout = False
        last = self.state.last
        if last["accepted"]:
            after = tr.value(check)
            kept, need = before - after, tr.eta1 * max(last["start"] - last["value"], 0.0)
            tr.verdict(tr.decisions.record("holdout", kept >= need, kept, need,
                                           abs(before) + abs(after) + abs(need), tr.level))
        return value

    def work(self, steps: int, batch_size: int, num_train: int) -> float:
        return self.state.work(num_train)

    def report(self, num_train: int) -> dict:
        return self.state.report(num_train)

    def step_metrics(self) -> dict:
        fn = getattr(self.state, "step_metrics", None)
        return fn() if fn is not None else {}

    def close(self) -> None:
        super().close()
        self.state.close()


def tr_settings(o) -> dict:
    """The trust-region keyword arguments of ``[tr]`` (``o``; every level alike)."""
    return dict(radius=o.radius, radius_max=o.radius_max, eta1=o.eta1, eta2=o.eta2,
                gamma1=o.gamma1, gamma2=o.gamma2, curvature=o.curvature, ksp_type=o.ksp_type,
                max_it=o.max_it, memory=o.memory,
                grow_after=o.grow_after if o.batch == "hybrid" and o.grow_on != "work" else 0)


def first_order(ctx: Context) -> Method:
    """SGD or Adam on the parameters this rank trains, with ``sync.*``'s scheme (a
    pipeline averages its own gradients: no scheme). Collective on the data axis."""
    o, layout = ctx.cfg.optim, ctx.layout
    opt = build_optimizer(o.name, ctx.model.parameters(), lr=o.lr, momentum=o.momentum,
                          weight_decay=o.weight_decay)
    if ctx.cfg.sync.name == "ps":
        from mltrain.sync.ps import PSSync

        return ParameterServerWorker(opt, PSSync(ctx.model, layout.data, ctx.ps),
                                     ctx.straggler, layout, ctx.model)
    # Layer-parallel: each rank reduces the gradients of what it trains, nothing else.
    sync = (SyncStrategy(ctx.model, layout.data) if layout.pipe is not None else
            build_sync(ctx.cfg.sync, ctx.cfg.comm,
                       layout.lp.local_modules() if ctx.layered else ctx.model, layout.data,
                       seed=ctx.cfg.run.seed))
    return FirstOrder(opt, sync, ctx.straggler, layout, ctx.model)


def trust_region(ctx: Context) -> Method:
    """Trust region over the parameter vector (distributed over the layer axis when there
    is one). Collective on the data axis."""
    layout, o = ctx.layout, ctx.cfg.tr
    if ctx.layered:  # weight space over the layer axis
        lp = layout.lp
        opt = TrustRegion(lp.vector_parameters(), layout.data, layer_comm=lp.comm,
                          after_set=lp.sync_replicated, **tr_settings(o))
    else:
        opt = TrustRegion(ctx.model.parameters(), layout.data, **tr_settings(o))
    return SecondOrder(opt, SyncStrategy(ctx.model, layout.data), ctx.straggler, ctx.model,
                       ctx.cfg)


def apts(ctx: Context) -> Method:
    """APTS over ``apts.subdomains`` subdomains of the data axis (``mltrain.optim.apts``).
    Collective on the data axis."""
    from mltrain.optim.apts import APTS

    a, o = ctx.cfg.apts, ctx.cfg.tr
    opt = APTS(ctx.model, ctx.layout.data, decomposition=a.decomposition,
               subdomains=a.subdomains, local_iters=a.local_iters,
               global_iters=a.global_iters, window=a.window, local_solver=a.local_solver,
               **tr_settings(o))
    return SecondOrder(opt, SyncStrategy(ctx.model, ctx.layout.data), ctx.straggler,
                       ctx.model, ctx.cfg)
