"""MGRIT (multigrid reduction in time) over a chain of steps distributed over ranks.

The problem: states u_0 .. u_N with u_0 given and u_{i+1} = Phi_i(u_i) (layers of a
residual network, or, for the adjoint, vector-Jacobian products in reverse order). Written
as A(u) = g with A(u)_i = u_i - Phi_{i-1}(u_{i-1}), it is solved by FAS multigrid over the
step index: level l has N / cf^l steps, its propagator the re-discretised step of the
caller's ``step(level, k, x)``.

Each rank owns a contiguous run of steps whose ends are C-points on every level (multiples
of cf^(levels-1)), so the only coupling between ranks is the state at a rank's left end,
owned by the previous rank: one non-blocking message per relaxation, overlapped with the
intervals that do not need it. The coarsest level is solved exactly, which runs
sequentially across ranks (a pipeline, as in XBraid).

Collective on ``comm`` (every rank of the chain).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from mpi4py import MPI

from mltrain.comm import irecv, isend
from mltrain.comm.waiting import wait

__all__ = ["MGRITSolver"]


def _tag(level: int) -> int:
    return 700 + level


class MGRITSolver:
    """``n`` local fine steps; ``prev``/``next`` the neighbouring ranks in chain order
    (``MPI.PROC_NULL`` at the ends); ``step(level, k, x)`` maps local point k to k+1 on
    ``level`` (``k`` counts the level's local steps from 0). ``sweep(level, k, x, m,
    adds)``, when given, takes m steps from point k in one call and returns the m states
    (``adds[i]``, when ``adds`` is given, added after step i): what ``step`` in a loop
    would give, without a Python call per step; ``steps(level, ks, xs)``, when given, one
    step from each point k in ``ks``, from the states ``xs``."""

    def __init__(self, comm: MPI.Comm, n: int, step, *, prev: int, next: int, levels: int,
                 cf: int, relax: str = "F", iters: int = 1, tol: float = 0.0,
                 skip: bool = True, sweep=None, steps=None):
        if relax not in ("F", "FCF"):
            raise ValueError(f"relax must be F or FCF, not {relax!r}")
        if n % cf ** (levels - 1):
            raise ValueError(f"{n} local steps are not a multiple of cf^(levels-1)")
        self.comm, self.n, self.step = comm, n, step
        self.sweep, self.steps = sweep, steps
        self.prev, self.next = prev, next
        self.levels, self.cf, self.relax = levels, cf, relax
        self.iters, self.tol, self.skip = iters, tol, skip
        self.residuals: list[float] = []  # global C-point residual norm after each cycle
        self.evaluations = [0] * levels  # local step evaluations per level (work model)
        self.messages = 0  # point-to-point messages this rank sent
        # The sweep that produces the final fine-level values (the last F-relaxation, or
        # the sequential solve with one level) can be the caller's: see ``solve``.
        self._final = None
        self._send = None  # the pending neighbour send and its buffer

    # -- pieces ----------------------------------------------------------------------------
    def _phi(self, level, k, x):
        self.evaluations[level] += 1
        return self.step(level, k, x)

    def _map(self, level, ks, xs):
        """One step from each point k in ``ks`` (from the states ``xs``)."""
        self.evaluations[level] += len(ks)
        if self.steps is not None:
            return self.steps(level, ks, xs)
        return [self.step(level, k, x) for k, x in zip(ks, xs)]

    def _chain(self, level, k, x, m, adds):
        """m steps from local point k: the states of points k+1 .. k+m."""
        self.evaluations[level] += m
        if self.sweep is not None:
            return self.sweep(level, k, x, m, adds)
        out = []
        for i in range(m):
            x = self.step(level, k + i, x)
            if adds is not None:
                x = x + adds[i]
            out.append(x)
        return out

    def _exchange_start(self, u, level):
        """Sends this rank's last point to the next rank; returns the receive request
        for the ghost (point 0), or None when there is no previous rank."""
        if self.next != MPI.PROC_NULL:
            self._complete_send()
            # Through the staging helpers (states may live on a GPU); the handle keeps the
            # buffer alive until the send completes, and counts its bytes in STATS.
            self._send = isend(u[-1].contiguous(), self.next, self.comm, tag=_tag(level))
            self.messages += 1
        if self.prev == MPI.PROC_NULL:
            return None
        return irecv(u[0], self.prev, self.comm, tag=_tag(level))  # into the ghost on wait

    def _exchange_end(self, req) -> None:
        # Only the ghost is waited for. The send completes when the receiver's MPI makes
        # progress, which (without a progress thread) is when it next waits; waiting for
        # it here would idle this rank until the neighbour is done relaxing.
        if req is not None:
            req.wait()

    def _complete_send(self) -> None:
        if self._send is not None:
            self._send.wait()
            self._send = None

    def _interval(self, level, u, g, c, r):
        """F-relaxation of the interval that starts at C-point c, and the residual at the
        C-point that ends it: its step is the one the relaxation would take next."""
        e = c + self.cf
        states = self._chain(level, c, u[c], self.cf, None if g is None else g[c + 1:e + 1])
        u[c + 1:e] = states[:-1]
        r[e] = states[-1] - u[e]

    def _f_relax(self, level, u, g, final: bool = False) -> dict:
        """F-relaxation; returns the C-point residuals r_k = Phi(u_{k-1}) + g_k - u_k it
        gives on the way (F-relaxation leaves the C-points as they are)."""
        req = self._exchange_start(u, level)
        n, r = len(u) - 1, {}
        later = [(c, c + self.cf) for c in range(self.cf, n, self.cf)]
        if final and self._final is not None:
            ends = self._final(u, later, False)  # intervals that do not need the ghost first
            self._exchange_end(req)
            ends += self._final(u, [(0, self.cf)], False)
            for (_, e), t in zip(later + [(0, self.cf)], ends):
                r[e] = t - u[e]
            return r
        for c, _ in later:
            self._interval(level, u, g, c, r)
        self._exchange_end(req)
        self._interval(level, u, g, 0, r)
        return r

    def _c_relax(self, level, u, g):
        ks = range(self.cf - 1, len(u) - 1, self.cf)
        for k, t in zip(ks, self._map(level, ks, [u[k] for k in ks])):
            u[k + 1] = t if g is None else t + g[k + 1]

    def _coarsest(self, level, u, g, final: bool = False):
        """Exact solve on the coarsest level: sequential across ranks."""
        if self.prev != MPI.PROC_NULL:
            irecv(u[0], self.prev, self.comm, tag=_tag(level)).wait()
        if final and self._final is not None:
            self._final(u, [(0, len(u) - 1)], True)
        else:
            u[1:] = self._chain(level, 0, u[0], len(u) - 1, None if g is None else g[1:])
        if self.next != MPI.PROC_NULL:
            isend(u[-1].contiguous(), self.next, self.comm, tag=_tag(level)).wait()
            self.messages += 1

    def _residual(self, level, u, g):
        """r_k = g_k - (u_k - Phi(u_{k-1})) at the C-points (index k)."""
        r = {}
        for k in range(self.cf, len(u), self.cf):
            res = -(u[k] - self._phi(level, k - 1, u[k - 1]))
            r[k] = res + g[k] if g is not None else res
        return r

    def _cycle(self, level, u, g, first: bool, last: bool = False, r=None):
        """A V-cycle from ``level``; returns the C-point residual after it (None on the
        coarsest level). ``r``: the residual of ``u`` when known (the previous cycle's
        closing F-relaxation gave it, and a first one would recompute the same values)."""
        cf = self.cf
        if level == self.levels - 1:
            self._coarsest(level, u, g)
            return None
        nc = (len(u) - 1) // cf
        # Coarse points are the C-points (injection). The coarse solve rebinds its points
        # and receives in place only into point 0, so only that one is copied.
        if first and self.skip:
            # No work on the first down-cycle (XBraid's skip): the guess is poor, so the
            # coarse problem is the plain coarse discretisation from the initial state.
            uc = [u[0].clone()] + u[cf::cf]
            self._cycle(level + 1, uc, None, True)
            u[cf::cf] = uc[1:]
        else:
            if r is None:
                r = self._f_relax(level, u, g)
            if self.relax == "FCF":
                self._c_relax(level, u, g)
                r = self._f_relax(level, u, g)
            # FAS restriction by injection. The ghost is current (the F-relaxation that gave
            # r received it), as the coarse right-hand side's first entry needs.
            v = u[::cf]
            phi = self._map(level + 1, range(nc), v[:-1])
            gc = [None] + [v[j] - phi[j - 1] + r[j * cf] for j in range(1, nc + 1)]
            uc = [v[0].clone()] + v[1:]
            self._cycle(level + 1, uc, gc, False)
            for j in range(1, nc + 1):  # correct the C-points
                u[j * cf] = u[j * cf] + (uc[j] - v[j])
        return self._f_relax(level, u, g, final=last and level == 0)

    def norm(self, u, g=None) -> float:
        """The global 2-norm of the fine-level C-point residual of ``u``, computed afresh.
        Collective on the solver's communicator (the layer axis)."""
        req = self._exchange_start(u, 0)
        self._exchange_end(req)
        self._complete_send()
        return math.sqrt(self.comm.allreduce(self._sumsq(self._residual(0, u, g)),
                                             op=MPI.SUM))

    @staticmethod
    def _sumsq(r: dict) -> float:
        if not r:
            return 0.0
        return float(torch.stack(list(r.values())).double().square().sum())

    # -- the solve -------------------------------------------------------------------------
    def solve(self, u: list[torch.Tensor], iters: int | None = None,
              final=None) -> list[torch.Tensor]:
        """Runs MGRIT iterations from the guess ``u`` (local points 0..n; point 0 is the
        ghost, or the given initial state on the first rank); returns the states. Records
        the residual norm after each iteration; stops early below ``tol``.

        ``final(u, intervals, inclusive)``, when given, does the last fine-level sweep in
        place of the solver: for each (start, end) it sets u[start+1 .. end-1] (and u[end]
        when ``inclusive``, the one-level sequential solve) from u[start], and, when not
        ``inclusive``, returns per interval the state its last step gives (Phi(u[end-1]),
        for the residual). Collective on the solver's communicator (the layer axis)."""
        iters = self.iters if iters is None else iters
        self.residuals = []
        self._final = final
        if self.levels == 1:
            self._coarsest(0, u, None, final=True)  # one level: the exact sequential solve
            self._complete_send()
            return u
        pending = []  # without a tolerance the norms only inform: sum them without waiting
        r = None
        for it in range(iters):
            last = it == iters - 1
            r = self._cycle(0, u, None, first=(it == 0), last=last, r=r)
            local = np.array([self._sumsq(r)])
            if self.tol <= 0:
                total = np.empty(1)
                pending.append((self.comm.Iallreduce(local, total, op=MPI.SUM), total))
                continue
            self.residuals.append(math.sqrt(self.comm.allreduce(float(local[0]), op=MPI.SUM)))
            if self.residuals[-1] <= self.tol and not last:
                # Converged early: one more F-relaxation (it changes nothing) as the sweep
                # whose values are final.
                self._f_relax(0, u, None, final=True)
                break
        for req, total in pending:
            wait(req)
            self.residuals.append(math.sqrt(float(total[0])))
        self._complete_send()
        return u
