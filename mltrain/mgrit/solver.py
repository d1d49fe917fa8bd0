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

import torch
from mpi4py import MPI

from mltrain.comm import STATS
from mltrain.comm.waiting import wait

__all__ = ["MGRITSolver"]


def _tag(level: int) -> int:
    return 700 + level


class MGRITSolver:
    """``n`` local fine steps; ``prev``/``next`` the neighbouring ranks in chain order
    (``MPI.PROC_NULL`` at the ends); ``step(level, k, x)`` maps local point k to k+1 on
    ``level`` (``k`` counts the level's local steps from 0)."""

    def __init__(self, comm: MPI.Comm, n: int, step, *, prev: int, next: int, levels: int,
                 cf: int, relax: str = "F", iters: int = 1, tol: float = 0.0,
                 skip: bool = True):
        if relax not in ("F", "FCF"):
            raise ValueError(f"relax must be F or FCF, not {relax!r}")
        if n % cf ** (levels - 1):
            raise ValueError(f"{n} local steps are not a multiple of cf^(levels-1)")
        self.comm, self.n, self.step = comm, n, step
        self.prev, self.next = prev, next
        self.levels, self.cf, self.relax = levels, cf, relax
        self.iters, self.tol, self.skip = iters, tol, skip
        self.residuals: list[float] = []  # global C-point residual norm after each cycle
        self.evaluations = [0] * levels  # local step evaluations per level (work model)
        self.messages = 0  # point-to-point messages this rank sent
        # The sweep that produces the final fine-level values (the last F-relaxation, or
        # the sequential solve with one level) can be the caller's: see ``solve``.
        self._final = None
        self._last_r: dict = {}

    # -- pieces ----------------------------------------------------------------------------
    def _phi(self, level, k, x):
        self.evaluations[level] += 1
        return self.step(level, k, x)

    def _exchange_start(self, u, level):
        """Sends this rank's last point to the next rank; returns the receive request
        for the ghost (point 0), or None when there is no previous rank."""
        if self.next != MPI.PROC_NULL:
            last = u[-1].contiguous()
            self._send = self.comm.Isend(last.numpy(), dest=self.next, tag=_tag(level))
            self.messages += 1
            STATS.add(self.comm, last.numel() * last.element_size())
            self._sent = last  # keep the buffer alive until the send completes
        else:
            self._send = None
        if self.prev == MPI.PROC_NULL:
            return None
        return self.comm.Irecv(u[0].numpy(), source=self.prev, tag=_tag(level))

    def _exchange_end(self, req) -> None:
        if req is not None:
            wait(req)
        if self._send is not None:
            wait(self._send)
            self._send = None

    def _interval(self, level, u, g, c):
        """F-relaxation of the interval that starts at C-point c."""
        for k in range(c + 1, min(c + self.cf, len(u))):
            u[k] = self._phi(level, k - 1, u[k - 1])
            if g is not None:
                u[k] = u[k] + g[k]

    def _f_relax(self, level, u, g, final: bool = False):
        req = self._exchange_start(u, level)
        n = len(u) - 1
        later = [(c, c + self.cf) for c in range(self.cf, n, self.cf)]
        if final and self._final is not None:
            self._final(u, later, False)  # intervals that do not need the ghost first
            self._exchange_end(req)
            self._final(u, [(0, self.cf)], False)
            return
        for c, _ in later:
            self._interval(level, u, g, c)
        self._exchange_end(req)
        self._interval(level, u, g, 0)

    def _c_relax(self, level, u, g):
        for k in range(self.cf, len(u), self.cf):
            u[k] = self._phi(level, k - 1, u[k - 1])
            if g is not None:
                u[k] = u[k] + g[k]

    def _coarsest(self, level, u, g, final: bool = False):
        """Exact solve on the coarsest level: sequential across ranks."""
        if self.prev != MPI.PROC_NULL:
            self.comm.Recv(u[0].numpy(), source=self.prev, tag=_tag(level))
        if final and self._final is not None:
            self._final(u, [(0, len(u) - 1)], True)
        else:
            for k in range(1, len(u)):
                u[k] = self._phi(level, k - 1, u[k - 1])
                if g is not None:
                    u[k] = u[k] + g[k]
        if self.next != MPI.PROC_NULL:
            self.comm.Send(u[-1].contiguous().numpy(), dest=self.next, tag=_tag(level))
            self.messages += 1
            STATS.add(self.comm, u[-1].numel() * u[-1].element_size())

    def _residual(self, level, u, g):
        """r_k = g_k - (u_k - Phi(u_{k-1})) at the C-points (index k)."""
        r = {}
        for k in range(self.cf, len(u), self.cf):
            res = -(u[k] - self._phi(level, k - 1, u[k - 1]))
            r[k] = res + g[k] if g is not None else res
        return r

    def _cycle(self, level, u, g, first: bool, last: bool = False, relaxed: bool = False,
               r=None):
        """A V-cycle from ``level``. ``relaxed``: the F-points already follow from the
        C-points (the previous cycle ended with an F-relaxation, and a first one would
        recompute the same values); ``r``: the C-point residual, when already known."""
        if level == self.levels - 1:
            self._coarsest(level, u, g)
            return
        if not (first and self.skip):
            if not relaxed:
                self._f_relax(level, u, g)
            if self.relax == "FCF":
                self._c_relax(level, u, g)
                self._f_relax(level, u, g)
        if r is None:
            # The ghost must be current for the coarse right-hand side (j = 1 uses v[0]).
            req = self._exchange_start(u, level)
            self._exchange_end(req)
            r = self._residual(level, u, g)
        v = [u[j * self.cf].clone() for j in range((len(u) - 1) // self.cf + 1)]
        gc = [None] + [v[j] - self._phi(level + 1, j - 1, v[j - 1]) + r[j * self.cf]
                       for j in range(1, len(v))]
        uc = [t.clone() for t in v]
        self._cycle(level + 1, uc, gc, first)
        for j in range(1, len(v)):  # correct the C-points
            u[j * self.cf] = u[j * self.cf] + (uc[j] - v[j])
        self._f_relax(level, u, g, final=last and level == 0)

    def norm(self, u, g=None) -> float:
        """The global 2-norm of the fine-level C-point residual (kept for the next
        cycle's restriction). Collective."""
        req = self._exchange_start(u, 0)
        self._exchange_end(req)
        r = self._residual(0, u, g) if self.levels > 1 else {}
        self._last_r = r
        local = sum(float((t.double() ** 2).sum()) for t in r.values())
        return math.sqrt(self.comm.allreduce(local, op=MPI.SUM))

    # -- the solve -------------------------------------------------------------------------
    def solve(self, u: list[torch.Tensor], iters: int | None = None,
              final=None) -> list[torch.Tensor]:
        """Runs MGRIT iterations from the guess ``u`` (local points 0..n; point 0 is the
        ghost, or the given initial state on the first rank); returns the states. Records
        the residual norm after each iteration; stops early below ``tol``.

        ``final(u, intervals, inclusive)``, when given, does the last fine-level sweep in
        place of the solver: for each (start, end) it sets u[start+1 .. end-1] (and u[end]
        when ``inclusive``, the one-level sequential solve) from u[start]. Collective."""
        iters = self.iters if iters is None else iters
        self.residuals = []
        self._final = final
        if self.levels == 1:
            self._coarsest(0, u, None, final=True)  # one level: the exact sequential solve
            return u
        for it in range(iters):
            last = it == iters - 1
            # After the first cycle the F-points are relaxed and, with F-relaxation, the
            # residual is the one the norm just computed.
            cached = self._last_r if it > 0 and self.relax == "F" else None
            self._cycle(0, u, None, first=(it == 0), last=last, relaxed=it > 0, r=cached)
            self.residuals.append(self.norm(u))
            if self.residuals[-1] <= self.tol and not last:
                # Converged early: one more F-relaxation (it changes nothing) as the sweep
                # whose values are final.
                self._f_relax(0, u, None, final=True)
                break
        return u
