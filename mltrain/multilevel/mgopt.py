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
from mltrain.optim import build_optimizer
from mltrain.optim.tr import Objective, TrustRegion, check_level_options
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
        if smoother == "tr":
            parts = [TrustRegion(m.parameters(), comm, decisions=log, level=i,
                                 options_prefix=f"mltrain_mgopt_l{i}_",
                                 shared_prefix="mltrain_tr_", **(tr or {}))
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
        self.last_alpha: float | None = None
        self.alphas = {"taken": 0, "zero": 0}

    @property
    def batch_factor(self) -> int:
        return 1

    def _mean(self, t: torch.Tensor) -> torch.Tensor:
        return mean_(t, self.comm)

    def _f_and_grad(self, level, loss_fn, x, y, v, weight=1.0):
        """F_l and its gradient at the level's current parameters (averaged over ranks)."""
        model = self.hierarchy.models[level]
        params = [p for p in model.parameters()]
        loss = loss_fn(model(x), y)
        g = torch.autograd.grad(loss, params)
        self.grad_evals[level] += 1
        self.grad_samples[level] += len(x) * self.ranks / weight
        packed = torch.cat([torch.cat([t.reshape(-1) for t in g]),
                            loss.detach().reshape(1).to(g[0].dtype)])
        self._mean(packed.mul_(weight))
        grad, f = packed[:-1], float(packed[-1])
        if v is not None:
            f -= float(v @ flat_params(model))
            grad = grad - v
        return f, grad

    def _f(self, level, loss_fn, x, y, v, weight=1.0) -> float:
        model = self.hierarchy.models[level]
        with torch.no_grad():
            f = torch.tensor([float(loss_fn(model(x), y)) * weight], dtype=torch.float64)
        self.loss_samples[level] += len(x) * self.ranks / weight
        f = float(self._mean(f)[0])
        return f - float(v @ flat_params(model)) if v is not None else f

    def _smooth(self, level, loss_fn, x, y, v, steps, weight=1.0) -> None:
        model, opt = self.hierarchy.models[level], self.parts[level]
        for _ in range(steps):
            if isinstance(opt, TrustRegion):
                # F_l = f_l - v . x: the same minimiser as f_l - v . (x - x0)
                shift = None if v is None else (-v.to(torch.float64),
                                                 torch.zeros_like(v, dtype=torch.float64))
                opt.tr_step(Objective(model, loss_fn, x, y, weight, shift))
                continue
            _, g = self._f_and_grad(level, loss_fn, x, y, v, weight)
            off = 0
            for p in model.parameters():
                p.grad = g[off:off + p.numel()].view_as(p).to(p.dtype)
                off += p.numel()
            opt.step()

    def tr_step(self, obj: Objective) -> float:
        """One V-cycle from the finest level on this rank's batch; returns the loss at the
        start. Collective on the data axis."""
        model, loss_fn, x, y, weight = obj.model, obj.loss_fn, obj.x, obj.y, obj.weight
        assert model is self.hierarchy.models[0]
        with torch.no_grad():
            start = torch.tensor([float(loss_fn(model(x), y)) * weight], dtype=torch.float64)
        self.loss_samples[0] += len(x) * self.ranks / weight
        start = float(self._mean(start)[0])
        self.cycle(0, loss_fn, x, y, None, weight)
        return start

    def cycle(self, level, loss_fn, x, y, v=None, weight=1.0) -> None:
        """One V-cycle from ``level`` on the batch (x, y)."""
        model = self.hierarchy.models[level]
        if level == self.hierarchy.levels - 1:
            self._smooth(level, loss_fn, x, y, v, self.coarse_iters, weight)
            return
        self._smooth(level, loss_fn, x, y, v, self.pre, weight)
        f0, g = self._f_and_grad(level, loss_fn, x, y, v, weight)
        coarse = self.hierarchy.models[level + 1]
        x_h0 = restrict_vec(self.hierarchy, level, flat_params(model))
        set_flat_params(coarse, x_h0)
        _, g_h = self._f_and_grad(level + 1, loss_fn, x, y, None, weight)
        v_h = g_h - restrict_grad(self.hierarchy, level, g)  # grad F_H(x_H0) = P^T grad F_h(x)
        self.cycle(level + 1, loss_fn, x, y, v_h, weight)
        e = prolong_vec(self.hierarchy, level, flat_params(coarse) - x_h0)
        slope = float(g @ e)
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

    def report(self, num_train: int) -> dict:
        """Work in fine-gradient equivalents and per level. Not collective."""
        cost = self.hierarchy.cost
        out = {"grad_evals": sum(c * s for c, s in zip(cost, self.grad_samples)) / num_train,
               "loss_evals": sum(c * s for c, s in zip(cost, self.loss_samples)) / num_train,
               "hvp_evals": 0.0,
               "level_grad_evals": [s / num_train for s in self.grad_samples],
               "line_search": dict(self.alphas), **self.decisions.summary()}
        if self.smoother == "tr":
            for key, name in (("grad_evals", "gradient_samples"), ("hvp_evals", "product_samples"),
                              ("loss_evals", "loss_samples")):
                out[key] += sum(c * p.counts[name] for c, p in zip(cost, self.parts)) / num_train
            out["level_grad_evals"] = [a + p.counts["gradient_samples"] / num_train
                                       for a, p in zip(out["level_grad_evals"], self.parts)]
        return out

    def work(self, num_train: int) -> float:
        r = self.report(num_train)
        return r["grad_evals"] + r["hvp_evals"]

    def close(self) -> None:
        for p in self.parts:
            if isinstance(p, TrustRegion):
                p.close()
