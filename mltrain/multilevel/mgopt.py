"""MG/OPT (Nash 2000) over a depth hierarchy, one V-cycle per training step.

On level l the objective is F_l(x) = f_l(x) - v_l . x (v_0 = 0). A cycle: ``pre_smooth``
smoother steps on F_l; restrict x_H0 = R x; v_{l+1} = grad f_{l+1}(x_H0) - P^T grad F_l(x)
(the "linear correction": grad F_{l+1}(x_H0) = P^T grad F_l(x), so the coarse and fine
first-order models agree on prolonged steps); recurse (the coarsest level takes
``coarse_iters`` smoother steps); prolong the correction e = P (x_H - x_H0); Armijo
backtracking on F_l along e (step 0 when e is not a descent direction); ``post_smooth``
smoother steps. The smoother of every level is SGD or Adam (``lr``, ``momentum``) fed the
gradient of F_l, or a trust-region step on F_l. Gradients are averaged over the data axis,
so every rank follows the same iterates.

Collective on the data-axis communicator.
"""
from __future__ import annotations

import torch
from mpi4py import MPI

from mltrain.comm import mean_
from mltrain.linalg.vector import flat_params, set_flat_params
from mltrain.multilevel.base import LevelOptimizers
from mltrain.multilevel.hierarchy import Hierarchy, prolong_vec, restrict_grad, restrict_vec
from mltrain.nn import add_depth_penalty
from mltrain.optim import build_optimizer
from mltrain.optim.costs import Prices, price
from mltrain.optim.evals import EvalCache
from mltrain.optim.tr import Objective, TrustRegion, check_level_options, sum_host_copies
from mltrain.utils.decisions import DecisionLog

__all__ = ["MGOpt"]


class MGOpt(LevelOptimizers):
    def __init__(self, hierarchy: Hierarchy, comm: MPI.Comm, *, lr: float = 0.0,
                 smoother: str = "sgd", momentum: float = 0.0, pre_smooth: int = 1,
                 post_smooth: int = 1, coarse_iters: int = 2, armijo: float = 1e-4,
                 max_halvings: int = 8, tr: dict | None = None):
        """``tr``: the TrustRegion keywords for ``smoother = "tr"``."""
        # The line search's decisions and, with a trust-region smoother, its decisions too.
        self.decisions = log = DecisionLog()
        # One cache per level, shared with a trust-region smoother: both store float64
        # (loss, gradient) pairs computed alike, so neither recomputes the other's.
        self.caches = [EvalCache() for _ in hierarchy.models]
        if smoother == "tr":
            parts = [TrustRegion(m.parameters(), comm, decisions=log, level=i,
                                 options_prefix=f"mltrain_mgopt_l{i}_",
                                 shared_prefix="mltrain_tr_", cache=self.caches[i],
                                 **(tr or {}))
                     for i, m in enumerate(hierarchy.models)]
            check_level_options("mltrain_mgopt_")
        else:
            parts = [build_optimizer(smoother, m.parameters(), lr=lr, momentum=momentum)
                     for m in hierarchy.models]
        super().__init__(hierarchy, parts)
        self.comm, self.ranks = comm, comm.Get_size()
        self.smoother = smoother
        self.pre, self.post, self.coarse_iters = pre_smooth, post_smooth, coarse_iters
        self.c, self.max_halvings = armijo, max_halvings
        # Per level: gradient evaluations and the global samples behind them.
        self.grad_evals = [0] * hierarchy.levels
        self.grad_samples = [0.0] * hierarchy.levels
        self.loss_samples = [0.0] * hierarchy.levels
        self.prices = Prices.unit(hierarchy.levels)  # until measure_costs
        self.last_alpha: float | None = None
        self.alphas = {"taken": 0, "zero": 0}

    @property
    def batch_factor(self) -> int:
        return 1

    def _mean(self, t: torch.Tensor) -> torch.Tensor:
        return mean_(t, self.comm)

    def _f_and_grad(self, level, loss_fn, x, y, v, weight=1.0):
        """F_l and its float64 gradient at the level's current parameters (averaged over
        ranks; from the level's cache when this point and batch were evaluated)."""
        model = self.hierarchy.models[level]
        it = flat_params(model)
        hit = self.caches[level].find(model, x, y, weight, it, True)
        if hit is not None:
            f, grad = hit
        else:
            params = [p for p in model.parameters()]
            loss = add_depth_penalty(loss_fn(model(x), y), model)
            g = torch.autograd.grad(loss, params)
            self.grad_evals[level] += 1
            self.grad_samples[level] += len(x) * self.ranks / weight
            # packed as the trust-region smoother packs, so the shared cache holds one kind
            # (the loss appended on the gradient's device; its float64 is exact, as float())
            packed = torch.cat([torch.cat([t.reshape(-1) for t in g]).to(torch.float64),
                                loss.detach().reshape(1).to(torch.float64)])
            self._mean(packed.mul_(weight))
            grad, f = packed[:-1], float(packed[-1])
            self.caches[level].store(model, x, y, weight, it, f, grad)
        if v is not None:
            f -= float(v @ it.to(torch.float64))
            grad = grad - v
        return f, grad

    def _f(self, level, loss_fn, x, y, v, weight=1.0) -> float:
        model = self.hierarchy.models[level]
        it = flat_params(model)
        hit = self.caches[level].find(model, x, y, weight, it, False)
        if hit is not None:
            f = hit[0]
        else:
            with torch.no_grad():
                value = float(add_depth_penalty(loss_fn(model(x), y), model)) * weight
                f = torch.tensor([value], dtype=torch.float64)  # host: an MPI scalar
            self.loss_samples[level] += len(x) * self.ranks / weight
            f = float(self._mean(f)[0])
            self.caches[level].store(model, x, y, weight, it, f, None)
        return f - float(v @ it.to(torch.float64)) if v is not None else f

    def _smooth(self, level, loss_fn, x, y, v, steps, weight=1.0) -> float | None:
        """``steps`` smoother steps on F_l; returns F_l where the first one started (None
        without steps)."""
        model, opt = self.hierarchy.models[level], self.parts[level]
        start = None
        for _ in range(steps):
            if isinstance(opt, TrustRegion):
                # F_l = f_l - v . x: the same minimiser as f_l - v . (x - x0)
                shift = None if v is None else (-v.to(torch.float64),
                                                 torch.zeros_like(v, dtype=torch.float64))
                f = opt.tr_step(Objective(model, loss_fn, x, y, weight, shift))
                start = f if start is None else start
                continue
            f, g = self._f_and_grad(level, loss_fn, x, y, v, weight)
            start = f if start is None else start
            off = 0
            for p in model.parameters():
                p.grad = g[off:off + p.numel()].view_as(p).to(p.dtype)
                off += p.numel()
            opt.step()
        return start

    def tr_step(self, obj: Objective) -> float:
        """One V-cycle from the finest level on this rank's batch; returns the loss at the
        start. Collective on the data axis."""
        model, loss_fn, x, y, weight = obj.model, obj.loss_fn, obj.x, obj.y, obj.weight
        assert model is self.hierarchy.models[0]
        return self.cycle(0, loss_fn, x, y, None, weight)

    def cycle(self, level, loss_fn, x, y, v=None, weight=1.0) -> float:
        """One V-cycle from ``level`` on the batch (x, y); returns F_l where it started
        (taken from its first evaluation, not from an extra forward pass)."""
        model = self.hierarchy.models[level]
        if level == self.hierarchy.levels - 1:
            return self._smooth(level, loss_fn, x, y, v, self.coarse_iters, weight)
        start = self._smooth(level, loss_fn, x, y, v, self.pre, weight)
        f0, g = self._f_and_grad(level, loss_fn, x, y, v, weight)
        start = f0 if start is None else start
        coarse = self.hierarchy.models[level + 1]
        x_h0 = restrict_vec(self.hierarchy, level, flat_params(model))
        set_flat_params(coarse, x_h0)
        _, g_h = self._f_and_grad(level + 1, loss_fn, x, y, None, weight)
        v_h = g_h - restrict_grad(self.hierarchy, level, g)  # grad F_H(x_H0) = P^T grad F_h(x)
        self.cycle(level + 1, loss_fn, x, y, v_h, weight)
        e = prolong_vec(self.hierarchy, level, flat_params(coarse) - x_h0)
        slope = float(g @ e.to(torch.float64))
        x0 = flat_params(model)
        alpha = 0.0
        log = self.decisions
        scale = float(g.norm() * e.norm())
        # e == 0 (every coarse step rejected) is structural, not a decision: slope is 0.
        if scale > 0 and log.record("descent", slope < 0, 0.0, slope, scale, level):
            a = 1.0
            for _ in range(self.max_halvings + 1):
                set_flat_params(model, x0 + a * e)
                fa = self._f(level, loss_fn, x, y, v, weight)
                bar = f0 + self.c * a * slope
                if log.record("armijo", fa <= bar, bar, fa, abs(fa) + abs(bar), level):
                    alpha = a
                    break
                a *= 0.5
        set_flat_params(model, x0 + alpha * e)
        if level == 0:
            self.last_alpha = alpha
            self.alphas["taken" if alpha > 0 else "zero"] += 1
        self._smooth(level, loss_fn, x, y, v, self.post, weight)
        return start

    def samples(self) -> list[dict[str, float]]:
        """Per level, the global samples of each kind of evaluation (the smoother's
        included). Not collective."""
        out = []
        for lv in range(self.hierarchy.levels):
            own = {"gradient": self.grad_samples[lv], "loss": self.loss_samples[lv]}
            part = self.parts[lv]
            if isinstance(part, TrustRegion):
                own = {k: v + own.get(k, 0.0) for k, v in part.samples().items()}
            out.append(own)
        return out

    def price_levels(self, model=None) -> list[tuple]:
        """What ``measure_costs`` times: every level's network with its smoother's
        curvature (L-SR1's price for a first-order smoother). Not collective."""
        return [(m, p.curvature if isinstance(p, TrustRegion) else "lsr1", None)
                for m, p in zip(self.hierarchy.models, self.parts)]

    def measure_costs(self, obj: Objective, rounds: int = 15) -> None:
        """Prices every level's evaluations by timing them on ``obj``'s batch
        (``mltrain.optim.costs``). Collective on the data axis."""
        self.prices = price(self.price_levels(obj.model), obj, (self.comm,), rounds)

    def report(self, num_train: int) -> dict:
        """Work in fine-gradient equivalents (``work`` priced, ``*_evals`` counted) and per
        level. Not collective."""
        samples = self.samples()

        def total(*kinds):
            return sum(s.get(k, 0.0) for s in samples for k in kinds) / num_train

        out = {"work": self.work(num_train),
               "grad_evals": total("gradient", "graph_gradient"),
               "loss_evals": total("loss"), "hvp_evals": total("product"),
               "level_grad_evals": [(s.get("gradient", 0.0) + s.get("graph_gradient", 0.0))
                                    / num_train for s in samples],
               "cache_hits": [dict(c.hits) for c in self.caches],
               "line_search": dict(self.alphas), "prices": self.prices.as_dict(),
               **sum_host_copies(self.parts), **self.decisions.summary()}
        return out

    def work(self, num_train: int) -> float:
        return self.prices.work(self.samples(), num_train)

    def close(self) -> None:
        for p in self.parts:
            if isinstance(p, TrustRegion):
                p.close()
