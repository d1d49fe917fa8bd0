"""MG/OPT (Nash 2000) over a depth hierarchy, one V-cycle per training step.

On level l the objective is F_l(x) = f_l(x) - v_l . x (v_0 = 0). A cycle: ``pre_smooth``
smoother steps on F_l; restrict x_H0 = R x; v_{l+1} = grad f_{l+1}(x_H0) - R grad F_l(x)
(the first-order consistent "linear correction": grad F_{l+1}(x_H0) = R grad F_l(x));
recurse (the coarsest level takes ``coarse_iters`` smoother steps); prolong the correction
e = P (x_H - x_H0); Armijo backtracking on F_l along e (step 0 when e is not a descent
direction); ``post_smooth`` smoother steps. Gradients are averaged over the data axis, so
every rank follows the same iterates. Smoother: SGD with ``lr``.

Collective on the data-axis communicator.
"""
from __future__ import annotations

import torch
from mpi4py import MPI

from mltrain.comm import allreduce_
from mltrain.linalg.vector import flat_params, set_flat_params
from mltrain.multilevel.hierarchy import Hierarchy, prolong_vec, restrict_vec

__all__ = ["MGOpt"]


class MGOpt:
    def __init__(self, hierarchy: Hierarchy, comm: MPI.Comm, *, lr: float, pre_smooth: int = 1,
                 post_smooth: int = 1, coarse_iters: int = 2, armijo: float = 1e-4,
                 max_halvings: int = 8):
        self.h, self.comm, self.P = hierarchy, comm, comm.Get_size()
        self.lr, self.pre, self.post, self.coarse_iters = lr, pre_smooth, post_smooth, coarse_iters
        self.c, self.max_halvings = armijo, max_halvings
        self.grad_evals = [0] * hierarchy.levels  # per level, this rank's batch
        self.last_alpha: float | None = None

    def _mean(self, t: torch.Tensor) -> torch.Tensor:
        allreduce_(t, self.comm)
        return t.div_(self.P) if self.P > 1 else t

    def _f_and_grad(self, level, loss_fn, x, y, v):
        """F_l and its gradient at the level's current parameters (averaged over ranks)."""
        model = self.h.models[level]
        params = [p for p in model.parameters()]
        loss = loss_fn(model(x), y)
        g = torch.autograd.grad(loss, params)
        self.grad_evals[level] += 1
        packed = torch.cat([torch.cat([t.reshape(-1) for t in g]),
                            loss.detach().reshape(1).to(g[0].dtype)])
        self._mean(packed)
        grad, f = packed[:-1], float(packed[-1])
        if v is not None:
            f -= float(v @ flat_params(model))
            grad = grad - v
        return f, grad

    def _f(self, level, loss_fn, x, y, v) -> float:
        model = self.h.models[level]
        with torch.no_grad():
            f = torch.tensor([float(loss_fn(model(x), y))], dtype=torch.float64)
        f = float(self._mean(f)[0])
        return f - float(v @ flat_params(model)) if v is not None else f

    def _smooth(self, level, loss_fn, x, y, v, steps) -> None:
        model = self.h.models[level]
        for _ in range(steps):
            _, g = self._f_and_grad(level, loss_fn, x, y, v)
            set_flat_params(model, flat_params(model) - self.lr * g)

    def cycle(self, level, loss_fn, x, y, v=None) -> None:
        """One V-cycle from ``level`` on the batch (x, y)."""
        model = self.h.models[level]
        if level == self.h.levels - 1:
            self._smooth(level, loss_fn, x, y, v, self.coarse_iters)
            return
        self._smooth(level, loss_fn, x, y, v, self.pre)
        f0, g = self._f_and_grad(level, loss_fn, x, y, v)
        coarse = self.h.models[level + 1]
        x_h0 = restrict_vec(self.h, level, flat_params(model))
        set_flat_params(coarse, x_h0)
        _, g_h = self._f_and_grad(level + 1, loss_fn, x, y, None)
        v_h = g_h - restrict_vec(self.h, level, g)  # grad F_H(x_H0) = R grad F_h(x)
        self.cycle(level + 1, loss_fn, x, y, v_h)
        e = prolong_vec(self.h, level, flat_params(coarse) - x_h0)
        slope = float(g @ e)
        x0 = flat_params(model)
        alpha = 0.0
        if slope < 0:  # a descent direction: Armijo backtracking
            a = 1.0
            for _ in range(self.max_halvings + 1):
                set_flat_params(model, x0 + a * e)
                if self._f(level, loss_fn, x, y, v) <= f0 + self.c * a * slope:
                    alpha = a
                    break
                a *= 0.5
        set_flat_params(model, x0 + alpha * e)
        if level == 0:
            self.last_alpha = alpha
        self._smooth(level, loss_fn, x, y, v, self.post)
