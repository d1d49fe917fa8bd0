"""RMTR: the recursive multilevel trust-region method (Gratton, Sartenaer, Toint 2008) over
a depth hierarchy of residual networks (Kopaničáková, Krause 2022).

One training step is one cycle from the finest level on the step's batch. On level l the
objective is h_l(x) = f_l(x) + delta_l . (x - x_l0) (delta_0 = 0). A cycle on level l:

1. ``pre_smooth`` trust-region steps on h_l (the coarsest level: ``coarse_iters``);
2. a coarse correction (twice on a W-cycle), when ||P^T g_l|| >= kappa ||g_l||:
   restrict the point x_{l+1,0} = R x_l, set delta_{l+1} = P^T grad h_l(x_l) -
   grad f_{l+1}(x_{l+1,0}) so that grad h_{l+1}(x_{l+1,0}) = P^T grad h_l(x_l) (first-order
   consistency: the coarse and fine first-order models agree on prolonged steps), run a
   cycle on level l+1, prolong its step e = P (x_{l+1} - x_{l+1,0}) and accept it by the
   fine reduction ratio (h_l(x_l) - h_l(x_l + e)) / (h_{l+1}(x_{l+1,0}) - h_{l+1}(x_{l+1}));
   the radius of level l is updated as after any trust-region step;
3. ``post_smooth`` trust-region steps.

The coarse model of step 2 may also be multiplicative or hybrid (``coarse_model``,
Kopaničáková 2022): with E_h = h_l(x_l), G = P^T grad h_l(x_l), E_H = f_{l+1}(x_{l+1,0}),
g_H = grad f_{l+1}(x_{l+1,0}) and s = x - x_{l+1,0},

    h_{l+1}(x) = (a0 + a . s) f_{l+1}(x) + d . s,
    a0 = gamma + (1 - gamma) E_h / E_H,  a = (1 - gamma) (G / E_H - E_h g_H / E_H^2),
    d = gamma (G - g_H),

with gamma = 1 additive (the model above), 0 multiplicative (also zero-order consistent:
h_{l+1}(x_{l+1,0}) = E_h), 1/2 hybrid; every one has grad h_{l+1}(x_{l+1,0}) = G. Where
|E_H| is within 1e-8 of zero relative to |E_h| the ratio is meaningless and that
correction is additive.

Step lengths on every level are measured on the finest one: ||s||_l = ||P_0 ... P_{l-1} s||.
A coarse excursion gets the bound B = the radius its parent may still use, every coarse
step is cut back so that ||x_l - x_l0||_l <= B, and the excursion stops once it is within
``boundary`` B of that bound. So a prolonged coarse step never leaves the fine trust
region: ||P s_H|| <= Delta_h. Every level's subproblem is solved by its own
``TrustRegion`` (the PETSc core, any curvature model); gradients and products are averaged
over the data axis, so every rank takes the same steps.

Collective on the data-axis communicator.
"""
from __future__ import annotations

import math
import statistics
from collections import deque

import torch
from mpi4py import MPI

from mltrain.multilevel.base import LevelOptimizers
from mltrain.multilevel.hierarchy import Hierarchy, coarse_first
from mltrain.multilevel.transfers import LayerTransfers, Transfers
from mltrain.optim.costs import Prices, price
from mltrain.optim.tr import (Objective, TrustRegion, ball_fraction, check_level_options,
                              sum_host_copies)
from mltrain.utils.decisions import BOUND_RTOL, DecisionLog

__all__ = ["RMTR", "COARSE_MODELS"]

# gamma of each coarse model: the weight of the additive correction (see the docstring).
COARSE_MODELS = {"additive": 1.0, "hybrid": 0.5, "multiplicative": 0.0}


def _anchor(obj: Objective):
    """The restricted point a coarse objective is corrected at (None on the finest)."""
    if obj.shift is not None:
        return obj.shift[1]
    return obj.factor[2] if obj.factor is not None else None


class RMTR(LevelOptimizers):
    def __init__(self, hierarchy: Hierarchy, comm: MPI.Comm, *, cycle: str = "V",
                 pre_smooth: int = 1, post_smooth: int = 1, coarse_iters: int = 2,
                 kappa: float = 1e-3, boundary: float = 0.05, layered: list | None = None,
                 smooth_max_it: int | None = None, coarse_max_it: int | None = None,
                 stop_on_success: bool = True, coarse_model: str = "additive",
                 init_cycles: int = 0, grow_per: str = "step", **tr):
        """``tr``: the TrustRegion keywords (radius, eta1, ..., curvature), every level.

        ``smooth_max_it``, ``coarse_max_it``: the Krylov budget of a smoothing step's and of a
        coarsest-level step's subproblem (None: ``tr``'s max_it); ``stop_on_success``: a
        smoothing phase and a coarsest-level solve end at their first accepted step
        (smoothing only has to damp what the coarse level cannot see, not solve the fine
        problem; Gratton, Sartenaer, Toint 2008 and Utopia's RMTR alike).

        ``init_cycles``: nested-iteration initialization (``multilevel.init = "nested"``):
        the first ``init_cycles`` steps cycle from the coarsest level, the next as many from
        the level above, and so on (each level starting from the prolonged weights of the
        one below); full cycles from the finest level follow. ``at_step`` tells the
        optimizer which step comes next.

        ``coarse_model``: how a coarse objective is made consistent with its finer one at
        the restricted point (``COARSE_MODELS``).

        ``grow_per``: what counts toward the hybrid batch's ``grow_after`` failures in a row:
        every fine trust-region step and coarse correction (``"step"``), or each cycle from
        the finest level, failed when its finest iterate did not move (``"cycle"``: the
        cycle is RMTR's iteration, as the step is TR's).

        ``layered``: layer-parallel training, one ``LayerParallel`` per level (wrapping
        ``hierarchy.models``, the coarse ones split where the finest is): each level's
        vector is distributed over their layer communicator and every level's network runs
        through MGRIT."""
        if cycle not in ("V", "W"):
            raise ValueError(f"cycle must be V or W, not {cycle!r}")
        if grow_per not in ("step", "cycle"):
            raise ValueError(f"grow_per must be step or cycle, not {grow_per!r}")
        self.grow_per = grow_per
        if coarse_model not in COARSE_MODELS:
            raise ValueError(f"coarse_model must be one of {sorted(COARSE_MODELS)}")
        self.gamma_model = COARSE_MODELS[coarse_model]
        self.init_cycles = init_cycles
        self.top = 0  # the level the next cycle starts from (above 0 while initializing)
        self.last: dict | None = None  # the last cycle, as a trust region's ``last``
        self._init_from: int | None = None  # the first step's level, until it is set up
        # Every level's decisions in one sequence, in the order they are taken.
        self.decisions = log = DecisionLog()
        if layered is None:
            self.nets = list(hierarchy.models)
            parts = [TrustRegion(m.parameters(), comm, decisions=log, level=i,
                                 options_prefix=f"mltrain_rmtr_l{i}_",
                                 shared_prefix="mltrain_tr_", **tr)
                     for i, m in enumerate(hierarchy.models)]
            self.T = Transfers(hierarchy)
        else:
            self.nets = list(layered)
            parts = [TrustRegion(lp.vector_parameters(), comm, layer_comm=lp.comm,
                                 after_set=lp.sync_replicated, decisions=log, level=i,
                                 options_prefix=f"mltrain_rmtr_l{i}_",
                                 shared_prefix="mltrain_tr_", **tr)
                     for i, lp in enumerate(layered)]
            self.T = LayerTransfers(hierarchy, layered[0].comm, [lp.ranges for lp in layered])
        check_level_options("mltrain_rmtr_")
        super().__init__(hierarchy, parts, flat_state=layered is not None)
        self.comm = comm
        self.gamma = 1 if cycle == "V" else 2
        self.pre, self.post, self.coarse_iters = pre_smooth, post_smooth, coarse_iters
        self.kappa, self.boundary = kappa, boundary
        self.smooth_max_it, self.coarse_max_it = smooth_max_it, coarse_max_it
        self.stop_on_success = stop_on_success
        L = hierarchy.levels
        self.prices = Prices.unit(L)  # until measure_costs
        # Coarse corrections tried, skipped by the kappa test, accepted, rejected; per level
        # the correction is applied on (0 .. L-2).
        self.corrections = {k: [0] * max(L - 1, 1)
                            for k in ("tried", "skipped", "accepted", "rejected")}
        # Coarse subproblems are solved in (the diagonal of) the finest-level norm.
        self.scale = [None] + [self.T.metric(lv).sqrt() for lv in range(1, L)]
        # (level, ||step||_l, bound) for each prolonged coarse step of the last cycle.
        self.bound_checks: list[tuple[int, float, float]] = []
        # Per level l < L-1, each coarse correction tried on it: cos(P^T g, grad f_{l+1}) at
        # the restricted point (how well the coarse gradient sees the fine one), the
        # reduction ratio rho of the prolonged step, ||P s|| / room, and acceptance.
        # (Bounded: the report gives medians over the last 1000 per level.)
        self.diagnostics = [deque(maxlen=1000) for _ in range(max(L - 1, 1))]
        self._cycle_diag: list[list[dict]] = [[] for _ in range(max(L - 1, 1))]

    # The fine level's trust-region state is the run's (radius, hybrid batch factor).
    @property
    def radius(self) -> float:
        return self.parts[0].radius

    @property
    def batch_factor(self) -> int:
        return self.parts[0].batch_factor

    @property
    def grower(self):
        """The trust region whose failed steps grow the hybrid batch: the finest level's,
        and none while nested initialization cycles from a coarser level (the finest
        level takes no step then)."""
        return self.parts[0] if self.top == 0 else None

    def init_level(self, step: int) -> int:
        """The level training step ``step`` cycles from (nested initialization: the
        coarsest first, ``init_cycles`` steps per level; then 0). Not collective."""
        if self.init_cycles <= 0:
            return 0
        return coarse_first(step, self.init_cycles, self.hierarchy.levels)

    def at_step(self, step: int) -> None:
        """Tells the optimizer the index of the step it takes next (the Trainer's step
        counter; a resumed run starts at its checkpoint's). Not collective."""
        level = self.init_level(step)
        if self._init_from is None:
            self._init_from = level
        self.top = level

    def _enter(self, level: int) -> None:
        """Sets up the nested initialization on ``level`` from the finest network's
        weights (a new run: the initial weights restricted; a resumed one: the
        checkpoint's, which are the prolonged weights of that level, and with injection
        and constant prolongation restrict back to them bit for bit). Collective on the
        layer axis."""
        for lv in range(level):
            self.parts[lv + 1].set_iterate(self.T.restrict(lv, self.parts[lv].iterate))

    def _prolong_down(self, level: int) -> None:
        """Prolongs the weights of ``level`` to every finer network, so the finest one
        always holds the state of training (evaluation and checkpoints see it, and the next
        level starts from it). Collective on the layer axis."""
        for lv in range(level - 1, -1, -1):
            self.parts[lv].set_iterate(self.T.prolong(lv, self.parts[lv + 1].iterate)
                                       .to(self.parts[lv].iterate.dtype))

    def tr_step(self, obj: Objective) -> float:
        """One cycle from the finest level (while initializing, from level ``top`` on the same
        batch); returns the objective where it started. With one level this is exactly one
        trust-region step. Collective on the data axis (and the layer axis,
        layer-parallel)."""
        assert obj.model is self.nets[0]
        self.bound_checks = []
        self._cycle_diag = [[] for _ in self._cycle_diag]
        if self.hierarchy.levels == 1:
            start = self.parts[0].tr_step(obj)
            self.last = self.parts[0].last
            return start
        top = self.top
        if self._init_from is not None:
            if self._init_from > 0:
                self._enter(self._init_from)
            self._init_from = None
        if top == 0:
            fine = self.parts[0]
            before = fine.counts["accepted"] + self.corrections["accepted"][0]
            fine.defer_growth = self.grow_per == "cycle"
            try:
                start, end = self._cycle(0, obj, math.inf, None)
            finally:
                fine.defer_growth = False
            # Whether the finest iterate moved: any of its steps or corrections accepted.
            moved = fine.counts["accepted"] + self.corrections["accepted"][0] > before
            self.last = {"accepted": moved, "start": start, "value": end}
            if self.grow_per == "cycle":
                fine.after_step(moved)
            return start
        self.last = None
        start, _ = self._cycle(top, obj.on(self.nets[top]), math.inf, None)
        self._prolong_down(top)
        return start

    # -- helpers -------------------------------------------------------------------------
    def _norm(self, level: int, d: torch.Tensor) -> float:
        """||d||_level: the length of the prolonged vector on the finest level."""
        return self.T.norm(self.T.to_finest(level, d))

    def _limit(self, level: int, anchor: torch.Tensor, bound: float):
        """The fraction t of a step s with ||x + t s - anchor||_level <= bound.

        A step within ``BOUND_RTOL`` (1e-6, relative) of the bound is on it and taken whole: the
        first coarse step of an excursion is solved in a ball whose radius is the bound,
        and with injection and constant prolongation ||P s|| = ||s||, so without the slack
        the test would be an exact tie decided by the last bit of a norm (which differs
        between CPUs and BLAS libraries)."""
        T, tr = self.T, self.parts[level]

        def limit(s: torch.Tensor) -> float:
            pd = T.to_finest(level, tr.iterate.to(torch.float64) - anchor)
            ps = T.to_finest(level, s)
            n = T.norm(pd + ps)
            cut = self.decisions.record("boundary", not n <= bound * (1 + BOUND_RTOL),
                                        n, bound * (1 + BOUND_RTOL), bound, level)
            if not cut:
                return 1.0
            return ball_fraction(T.dot(pd, pd), T.dot(pd, ps), T.dot(ps, ps), bound)
        return limit

    def _room(self, level: int, anchor, bound) -> float:
        """How far level ``level`` may still move (fine-measured): inf on the level a cycle
        starts from (no ``anchor``)."""
        if anchor is None:
            return math.inf
        d = self.parts[level].iterate.to(torch.float64) - anchor
        return bound - self._norm(level, d)

    # -- the cycle -----------------------------------------------------------------------
    def _smooth(self, level, obj: Objective, steps, bound, value, coarsest: bool = False):
        """Up to ``steps`` trust-region steps on level ``level`` from objective ``value``
        (None: not known yet); returns (start value, end value, done) where done says the
        excursion reached its bound. Each subproblem is solved within ``smooth_max_it``
        iterations (``coarse_max_it`` on the ``coarsest`` level); with ``stop_on_success``
        the steps end at the first accepted one."""
        tr, anchor = self.parts[level], _anchor(obj)
        start = value
        max_it = self.coarse_max_it if coarsest else self.smooth_max_it
        for _ in range(steps):
            if anchor is None:  # the level the cycle started from: its own radius only
                tr.tr_step(obj, max_it=max_it, scale=self.scale[level])
            else:
                tr.tr_step(obj, radius=self._room(level, anchor, bound),
                           limit=self._limit(level, anchor, bound), scale=self.scale[level],
                           max_it=max_it)
            start = tr.last["start"] if start is None else start
            value = tr.last["value"]
            # The excursion ends where the iterate reached its bound. A rejected step cut to
            # the boundary left the iterate where it was: the excursion goes on with a
            # smaller radius.
            if anchor is not None and self._at_bound(level, anchor, bound):
                return start, value, True
            if self.stop_on_success and tr.last["accepted"]:
                break
        return start, value, False

    def _at_bound(self, level: int, anchor, bound) -> bool:
        """Whether the excursion on ``level`` is within ``boundary`` x bound of its bound."""
        room = self._room(level, anchor, bound)
        return self.decisions.record("room", room <= self.boundary * bound,
                                     self.boundary * bound, room, bound, level)

    def _cycle(self, level: int, obj: Objective, bound, value) -> tuple[float, float]:
        """A cycle on ``level`` from its current point, where the objective is ``value``
        (None: not evaluated yet); returns the objective at the start and at the end.
        ``obj`` is the level's objective on the cycle's batch, shifted by ``(delta,
        anchor)`` below the finest level; ``bound`` limits the fine-measured length of the
        excursion from ``anchor``."""
        tr = self.parts[level]
        if _anchor(obj) is not None:  # an excursion starts with all the room its parent gives
            tr.radius = min(bound, tr.radius_max)
        if level == self.hierarchy.levels - 1:
            start, end, _ = self._smooth(level, obj, self.coarse_iters, bound, value,
                                         coarsest=True)
            return start, end
        start, value, done = self._smooth(level, obj, self.pre, bound, value)
        for _ in range(self.gamma):
            if done:
                break
            f, value, done = self._correct(level, obj, bound)
            start = f if start is None else start
        if not done:
            _, value, done = self._smooth(level, obj, self.post, bound, value)
        return start, value

    def _correct(self, level, obj: Objective, bound) -> tuple[float, float, bool]:
        """One coarse correction of level ``level``; returns the objective before and
        after it, and whether the excursion reached its bound."""
        tr, ctr = self.parts[level], self.parts[level + 1]
        f, g = tr.objective(obj)
        anchor = _anchor(obj)
        self.corrections["tried"][level] += 1
        rg = self.T.restrict_grad(level, g)
        nr, ng = self.T.norm(rg), self.kappa * self.T.norm(g)
        if self.decisions.record("kappa", nr < ng, ng, nr, max(nr, ng), level):
            self.corrections["skipped"][level] += 1  # the coarse level cannot help here
            return f, f, False
        x0 = tr.iterate
        dtype = x0.dtype
        xc0 = self.T.restrict(level, x0)
        ctr.set_iterate(xc0)
        coarse = obj.on(self.nets[level + 1])  # the same batch, unshifted
        fc0, gc = ctr.objective(coarse)
        ngc = self.T.norm(gc)
        diag = {"cos": self.T.dot(rg, gc) / (nr * ngc) if nr * ngc > 0 else 0.0,
                "rho": None, "step_over_room": 0.0, "accepted": False}
        self.diagnostics[level].append(diag)
        self._cycle_diag[level].append(diag)
        anchor_c = xc0.to(torch.float64)
        room = tr.radius if anchor is None else min(tr.radius, self._room(level, anchor, bound))
        coarse_obj, hc0 = self._coarse_model(level, coarse, anchor_c, f, rg, fc0, gc)
        start_c, end_c = self._cycle(level + 1, coarse_obj, room, hc0)
        predicted = start_c - end_c
        sc = ctr.iterate.to(torch.float64) - anchor_c
        # Every coarse step rejected (sc == 0 bit for bit) is structural, not a decision.
        if not self.T.any(sc) or not self.decisions.record(
                "progress", predicted > 0, start_c, end_c, abs(start_c) + abs(end_c), level):
            return f, f, False  # the coarse level made no progress: nothing to prolong
        e = self.T.prolong(level, sc)
        step = self._norm(level + 1, sc)
        self.bound_checks.append((level, step, room))
        tr.set_iterate(x0 + e.to(dtype))
        f_trial = tr.value(obj)
        accepted = tr.accept(f, f_trial, predicted, x0)  # the fine level's rule, written once
        rho = (f - f_trial) / predicted
        diag.update(rho=rho if math.isfinite(rho) else None,
                    step_over_room=step / room if room > 0 else None, accepted=accepted)
        self.corrections["accepted" if accepted else "rejected"][level] += 1
        if level == 0:
            tr.after_step(accepted)  # the hybrid batch grows on stalls of either kind of step
        done = anchor is not None and self._at_bound(level, anchor, bound)
        return f, (f_trial if accepted else f), done

    def _coarse_model(self, level, coarse: Objective, anchor, E_h, G, E_H, g_H):
        """The coarse objective of a correction of ``level`` (the module docstring's
        h_{l+1}) and its value at the restricted point ``anchor``."""
        gamma = self.gamma_model
        scale = max(abs(E_h), 1.0)
        if gamma < 1.0 and not self.decisions.record("model", abs(E_H) > 1e-8 * scale,
                                                     abs(E_H), 1e-8 * scale, scale, level):
            gamma = 1.0  # f_{l+1} vanishes here: no ratio to scale it by
        if gamma == 1.0:  # h(x) = f(x) + (G - g_H) . (x - anchor): h(anchor) = E_H
            return coarse.shifted((G - g_H, anchor)), E_H
        ratio = E_h / E_H
        a0 = gamma + (1.0 - gamma) * ratio
        a = (G - g_H * ratio) * ((1.0 - gamma) / E_H)
        shift = (G - g_H) * gamma if gamma > 0 else None
        return (coarse.shifted(None if shift is None else (shift, anchor), (a0, a, anchor)),
                a0 * E_H)

    # -- reporting -----------------------------------------------------------------------
    def price_levels(self, model=None) -> list[tuple]:
        """What ``measure_costs`` times: every level's network, curvature and parameters
        (``model``, the finest network, is ``self.nets[0]`` already). Not collective."""
        return [(net, p.curvature, p._params) for net, p in zip(self.nets, self.parts)]

    def measure_costs(self, obj: Objective, rounds: int = 15) -> None:
        """Prices every level's evaluations by timing them on ``obj``'s batch, relative to
        the finest level's plain gradient (``mltrain.optim.costs``). Collective on the data
        axis (and the layer axis)."""
        self.prices = price(self.price_levels(obj.model), obj,
                            (self.comm, self.parts[0].layer_comm), rounds)

    def report(self, num_train: int) -> dict:
        """Work in fine-gradient equivalents: ``work`` priced (each kind on each level at
        its measured price), the ``*_evals`` counted (samples / training-set size, summed
        over levels); per level counts, steps and coarse-correction diagnostics. Not
        collective."""
        per = [{k: p.counts[k] for k in ("gradient_samples", "graph_gradient_samples",
                                           "product_samples", "loss_samples")}
               for p in self.parts]

        def total(*keys):
            return sum(q[k] for q in per for k in keys) / num_train

        def med(values):
            values = [v for v in values if v is not None]
            return statistics.median(values) if values else None

        diag = [{"corrections": len(d), "cos": med([c["cos"] for c in d]),
                 "rho": med([c["rho"] for c in d]),
                 "step_over_room": med([c["step_over_room"] for c in d]),
                 "accepted": self.corrections["accepted"][lv],
                 "rejected": self.corrections["rejected"][lv],
                 "skipped": self.corrections["skipped"][lv]}
                for lv, d in enumerate(self.diagnostics)] if self.hierarchy.levels > 1 else []
        return {
            "work": self.work(num_train),
            "grad_evals": total("gradient_samples", "graph_gradient_samples"),
            "hvp_evals": total("product_samples"), "loss_evals": total("loss_samples"),
            "level_grad_evals": [(q["gradient_samples"] + q["graph_gradient_samples"])
                                 / num_train for q in per],
            "level_hvp_evals": [q["product_samples"] / num_train for q in per],
            "level_loss_evals": [q["loss_samples"] / num_train for q in per],
            "level_accepted": [p.counts["accepted"] for p in self.parts],
            "level_rejected": [p.counts["rejected"] for p in self.parts],
            "level_diagnostics": diag,
            "cache_hits": [dict(p.cache.hits) for p in self.parts],
            "accepted_steps": self.parts[0].counts["accepted"] + self.corrections["accepted"][0],
            "rejected_steps": self.parts[0].counts["rejected"] + self.corrections["rejected"][0],
            "coarse_corrections": dict(self.corrections),
            "radius": self.radius, "batch_factor": self.batch_factor,
            "prices": self.prices.as_dict(), **sum_host_copies(self.parts),
            **self.decisions.summary(),
        }

    def step_metrics(self) -> dict:
        """The last cycle's coarse corrections per level (cos, rho, ||P s|| / room,
        accepted), for the metrics records. Not collective."""
        return {"corrections": [[dict(c) for c in d] for d in self._cycle_diag]} \
            if self.hierarchy.levels > 1 else {}

    def work(self, num_train: int) -> float:
        return self.prices.work([p.samples() for p in self.parts], num_train)

    def close(self) -> None:
        for p in self.parts:
            p.close()
