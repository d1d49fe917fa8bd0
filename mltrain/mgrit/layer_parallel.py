"""Layer-parallel residual networks: the residual blocks split over the ranks of the
``layer`` axis, forward and backward propagation by MGRIT.

A network with the residual-block protocol (``opening``, ``blocks`` with steps ``h``,
``closing``; see ``mltrain.nn.check_residual``) keeps its opening and closing
layers on every layer rank (they are cheap and this keeps the autograd graph ordinary):
every rank runs the opening on the batch, the blocks go through MGRIT, the last rank's
final state is broadcast and every rank runs the closing layer and the loss. Rank r owns
the blocks [lo, hi) of ``split_layers``; it computes gradients only for those (the other
blocks' parameters get none).

Forward: FAS MGRIT over depth (``solver.MGRITSolver``); level l re-discretises with every
cf^l-th block and step h cf^l: Phi(x) = x + cf^l (block(x) - x). Backward: an adjoint MGRIT
solve in reverse layer order built from vector-Jacobian products of the same steps at the
forward states, then one sweep over the local blocks accumulates parameter gradients; the
gradient with respect to the opening's output is broadcast from the first rank, so the
whole is an ordinary autograd function.

Collective on the layer communicator (construction is not).
"""
from __future__ import annotations

import torch
from mpi4py import MPI
from torch import nn

from mltrain.comm import broadcast_
from mltrain.comm.ownership import gather_params, gather_state
from mltrain.config import ConfigError
from mltrain.mgrit.solver import MGRITSolver
from mltrain.nn import check_residual

__all__ = ["LayerParallel", "split_layers"]


def split_layers(n: int, ranks: int, levels: int, cf: int,
                 align: int = 1) -> list[tuple[int, int]]:
    """Balanced contiguous [lo, hi) block ranges, one per rank, whose ends are multiples
    of cf^(levels-1) (C-points on every level) times ``align`` (a depth hierarchy's
    cf^(multilevel.levels-1), so that every level of it splits on the same boundaries). Raises
    ConfigError when the depth cannot carry the ranks, levels or coarsening factor. Not
    collective."""
    unit = cf ** (levels - 1) * align
    what = "mgrit.cf^(mgrit.levels-1)" + (f" x multilevel.cf^(multilevel.levels-1) = {cf ** (levels - 1)}"
                                          f" x {align}" if align > 1 else "")
    if n < ranks:
        raise ConfigError(f"parallel.layer: {n} residual blocks cannot be shared by {ranks} "
                          "layer ranks")
    if n % unit:
        raise ConfigError(f"mgrit.levels: {n} residual blocks are not divisible by "
                          f"{what} = {unit}")
    m = n // unit
    if m < ranks:
        raise ConfigError(f"mgrit.levels: {n} residual blocks in units of {what} = {unit} "
                          f"leave {m} coarsest intervals for {ranks} layer ranks; use fewer "
                          "levels or ranks")
    out, lo = [], 0
    for r in range(ranks):
        k = m // ranks + (r < m % ranks)
        out.append((lo, lo + k * unit))
        lo += k * unit
    return out


class _Chain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lp: "LayerParallel", z: torch.Tensor, record: bool, *params):
        ctx.lp = lp
        out, ctx.states = lp._forward(z.detach(), record)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gz, gparams = ctx.lp._backward(ctx.states, grad_out.detach().contiguous())
        del ctx.states
        return (None, gz, None, *gparams)


class LayerParallel(nn.Module):
    """Wraps ``model`` (residual-block protocol) for layer-parallel training on ``comm``.

    ``levels``, ``cf``, ``relax`` ("F" or "FCF"), ``iters`` (forward MGRIT iterations),
    ``bwd_iters`` (adjoint iterations), ``tol`` (stop when the C-point residual norm is at
    most this), ``skip`` (no work on the first down-cycle: it starts with the coarse
    solve, as XBraid's skip). ``exact = True`` runs
    exact (serial-equivalent, sequential across ranks) sweeps instead.
    """

    def __init__(self, model: nn.Module, comm: MPI.Comm, *, levels: int = 2, cf: int = 2,
                 relax: str = "F", iters: int = 2, bwd_iters: int = 1, tol: float = 0.0,
                 skip: bool = True, align: int = 1,
                 ranges: list[tuple[int, int]] | None = None):
        """``align``: see ``split_layers``; ``ranges``: the blocks of each rank, given
        (a coarse level of a layer-parallel hierarchy splits where its finest level does)."""
        super().__init__()
        check_residual(model, "layer-parallel training (parallel.layer > 1)")
        self.model, self.comm = model, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.ranges = (split_layers(len(model.blocks), self.size, levels, cf, align)
                       if ranges is None else list(ranges))
        self.lo, self.hi = self.ranges[self.rank]
        self.levels, self.cf, self.relax = levels, cf, relax
        self.iters, self.bwd_iters, self.tol, self.skip = iters, bwd_iters, tol, skip
        self.exact = False
        # Parameter lists of the local blocks, looked up once (nn.Module.parameters()
        # walks the module tree on every call).
        self._params = [list(b.parameters()) for b in model.blocks[self.lo:self.hi]]
        self._blocks = list(model.blocks)
        # Blocks with the fast path (mgrit_step, mgrit_linearize, mgrit_vjp) relax without
        # autograd and take their adjoint products by hand; others go through autograd.
        self._fast = all(hasattr(b, a) for b in self._blocks
                         for a in ("mgrit_step", "mgrit_linearize", "mgrit_vjp"))
        # Blocks of one class with sweeps (mgrit_sweep, mgrit_steps, mgrit_linearize_many,
        # mgrit_vjp_sweep) take a relaxation interval, or a level's steps, in one call.
        self._cls = type(self._blocks[0]) if self._blocks else None
        self._sweeps = all(type(b) is self._cls for b in self._blocks) and all(
            hasattr(self._cls, a)
            for a in ("mgrit_sweep", "mgrit_steps", "mgrit_linearize_many", "mgrit_vjp_sweep"))
        self.residuals: dict[str, list[float]] = {"forward": [], "backward": []}

    def sibling(self, model: nn.Module, shrink: int) -> "LayerParallel":
        """``model`` (a coarser network of the same hierarchy, ``shrink`` times fewer
        blocks) layer-parallel with these MGRIT settings, its blocks split where these
        are. Not collective."""
        return LayerParallel(model, self.comm, levels=self.levels, cf=self.cf,
                             relax=self.relax, iters=self.iters, bwd_iters=self.bwd_iters,
                             tol=self.tol, skip=self.skip,
                             ranges=[(a // shrink, b // shrink) for a, b in self.ranges])

    def owned_parameters(self) -> list[nn.Parameter]:
        """The parameters of this rank's blocks."""
        return [p for ps in self._params for p in ps]

    def vector_parameters(self) -> list[nn.Parameter]:
        """This rank's part of the parameter vector distributed over the layer axis: the
        opening on the first rank, its own blocks, the closing on the last rank (every
        parameter on exactly one rank; the model's order)."""
        first = list(self.model.opening.parameters()) if self.rank == 0 else []
        last = list(self.model.closing.parameters()) if self.rank == self.size - 1 else []
        return first + self.owned_parameters() + last

    def sync_replicated(self) -> None:
        """Copies the opening from the first rank and the closing from the last to every
        rank (after an update of the distributed vector). Collective on the layer axis."""
        groups: list[list[nn.Parameter]] = [[] for _ in range(self.size)]
        groups[0] += list(self.model.opening.parameters())
        groups[-1] += list(self.model.closing.parameters())
        gather_params(groups, self.comm)

    def local_modules(self) -> nn.ModuleList:
        """What this rank trains: the (replicated) opening and closing and its own blocks;
        gradient reduction over the data axis covers these only."""
        return nn.ModuleList([self.model.opening, *self.model.blocks[self.lo:self.hi],
                              self.model.closing])

    def _groups(self) -> list[list[nn.Parameter]]:
        return [[p for b in self.model.blocks[lo:hi] for p in b.parameters()]
                for lo, hi in self.ranges]

    def gather(self) -> None:
        """Brings every block's parameters from its owner to every rank (one broadcast per
        rank), so each rank holds the whole current network. Collective on the layer axis."""
        gather_params(self._groups(), self.comm)

    def gather_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Brings the optimizer state of every block's parameters from its owner to every
        rank, so a checkpoint from any rank holds all of it. Collective on the layer axis."""
        gather_state(optimizer, self._groups(), self.comm)


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model.opening(x)
        # Keep the final sweep's graphs only when a backward can follow.
        z = _Chain.apply(self, z, torch.is_grad_enabled(), *self.owned_parameters())
        return self.model.closing(z)

    # -- the chain -------------------------------------------------------------------------
    def _step(self, level: int, k: int, x: torch.Tensor) -> torch.Tensor:
        """Local step k of ``level``: block lo + k cf^level with step h cf^level."""
        s = self.cf ** level
        block = self._blocks[self.lo + k * s]
        if self._fast and not torch.is_grad_enabled():
            return block.mgrit_step(x, s)
        y = block(x)
        return y if s == 1 else x + s * (y - x)

    def _sweep(self, level: int, k: int, x: torch.Tensor, m: int, adds):
        """Local steps k .. k+m-1 of ``level`` from ``x``: the m states (the solver's
        ``sweep``; only used without autograd)."""
        s = self.cf ** level
        i = self.lo + k * s
        return self._cls.mgrit_sweep(self._blocks[i:i + m * s:s], x, s, adds)

    def _steps(self, level: int, ks, xs):
        """Local steps ks of ``level``, each from its own state (the solver's ``steps``)."""
        s = self.cf ** level
        return self._cls.mgrit_steps([self._blocks[self.lo + k * s] for k in ks], xs, s)

    def _solver(self, step, reverse: bool, iters: int, sweep=None,
                steps=None) -> MGRITSolver:
        up = self.rank - 1 if self.rank > 0 else MPI.PROC_NULL
        down = self.rank + 1 if self.rank < self.size - 1 else MPI.PROC_NULL
        prev, nxt = (down, up) if reverse else (up, down)
        levels = 1 if self.exact else self.levels
        batched = self._fast and self._sweeps
        return MGRITSolver(self.comm, self.hi - self.lo, step, prev=prev, next=nxt,
                           levels=levels, cf=self.cf, relax=self.relax, iters=iters,
                           tol=self.tol, skip=self.skip, sweep=sweep if batched else None,
                           steps=steps if batched else None)

    def _forward(self, z: torch.Tensor, record: bool = True):
        """MGRIT forward from the opening's output ``z``; returns the final state
        (broadcast) and (local states, the recorded final sweep). With ``record`` the final
        sweep runs each interval as one autograd chain from its (leaf) start point through
        the interval's steps, for the backward. Collective on the layer axis."""
        n = self.hi - self.lo
        chains: dict[int, tuple] = {}

        def final(u, intervals, inclusive):
            ends = []
            for c, e in intervals:
                with torch.enable_grad():
                    leaf = u[c].detach().requires_grad_(True)
                    t = leaf
                    for k in range(c, e):
                        t = self._step(0, k, t)
                        if k + 1 < e:
                            u[k + 1] = t.detach()
                chains[c] = (leaf, t)
                if inclusive:
                    u[e] = t.detach()
                ends.append(t.detach())
            return ends

        with torch.no_grad():
            # Initial guess: the input everywhere. The solver rebinds points and writes only
            # into point 0 (the ghost it receives), so the others may share one tensor.
            u = [z.clone()] + [z] * n
            solver = self._solver(self._step, reverse=False, iters=self.iters,
                                  sweep=self._sweep, steps=self._steps)
            u = solver.solve(u, final=final if record else None)
        self.residuals["forward"] = solver.residuals
        out = u[-1].clone().contiguous()
        broadcast_(out, self.comm, root=self.size - 1)
        return out, (u, chains)

    def _adjoint_step(self, u: list[torch.Tensor]):
        """The adjoint's step function over the forward states ``u`` (local points), and
        the dict of forward graphs it builds on first use."""
        n = self.hi - self.lo
        graphs: dict = {}  # (level, step): its autograd graph, or the fast path's linearisation

        def adjoint_step(level: int, k: int, lam: torch.Tensor) -> torch.Tensor:
            m = n // self.cf ** level - 1 - k  # adjoint step k runs forward step m backwards
            key = (level, m)
            if self._fast:
                s = self.cf ** level
                block = self._blocks[self.lo + m * s]
                with torch.no_grad():
                    if key not in graphs:
                        graphs[key] = block.mgrit_linearize(u[m * s])
                    return block.mgrit_vjp(graphs[key], lam, s)
            if key not in graphs:  # forward step m of ``level`` at its forward state
                with torch.enable_grad():
                    xin = u[m * self.cf ** level].detach().requires_grad_(True)
                    graphs[key] = (xin, self._step(level, m, xin))
            xin, out = graphs[key]
            (g,) = torch.autograd.grad(out, xin, lam, retain_graph=True)
            return g

        def adjoint_sweep(level: int, k: int, lam: torch.Tensor, count: int, adds):
            s = self.cf ** level
            ms = range(n // s - 1 - k, n // s - 1 - k - count, -1)  # forward steps, in turn
            todo = [m for m in ms if (level, m) not in graphs]
            if todo:
                masks = self._cls.mgrit_linearize_many(
                    [self._blocks[self.lo + m * s] for m in todo], [u[m * s] for m in todo])
                graphs.update(((level, m), t) for m, t in zip(todo, masks))
            return self._cls.mgrit_vjp_sweep([self._blocks[self.lo + m * s] for m in ms],
                                             [graphs[level, m] for m in ms], lam, s, adds)
        return adjoint_step, graphs, adjoint_sweep

    def _backward(self, saved, grad_out: torch.Tensor):
        """Adjoint MGRIT from the gradient of the final state; returns the gradient of the
        opening's output (broadcast) and this rank's parameter gradients. The final sweep
        is one autograd pass per interval through the forward's recorded chain, giving the
        adjoint at its points and the gradients of its blocks' parameters. Collective on the
        layer axis."""
        u, chains = saved
        n = self.hi - self.lo
        grads: list[list[torch.Tensor] | None] = [None] * n
        adjoint_step, graphs, adjoint_sweep = self._adjoint_step(u)

        def final(lam, intervals, inclusive):
            # Adjoint interval (t0, t1) is forward interval (n - t1, n - t0). Nothing reads
            # the adjoint at its F-points again (the residual comes from the pass's end), so
            # the pass does not ask for them.
            ends = []
            for t0, t1 in intervals:
                c, e = n - t1, n - t0
                leaf, out = chains[c]
                params = [p for ps in self._params[c:e] for p in ps]
                g = torch.autograd.grad(out, [leaf, *params], lam[t0])
                if inclusive:
                    lam[t1] = g[0]
                ends.append(g[0])
                off = 1
                for m in range(c, e):
                    k = len(self._params[m])
                    grads[m] = list(g[off:off + k])
                    off += k
            return ends

        lam = [grad_out.clone()] + [grad_out] * n  # adjoint point t = forward n - t
        solver = self._solver(adjoint_step, reverse=True, iters=self.bwd_iters,
                              sweep=adjoint_sweep)
        with torch.no_grad():
            lam = solver.solve(lam, final=final)
        self.residuals["backward"] = solver.residuals
        flat = [g for m in range(n) for g in grads[m]]
        graphs.clear()
        gz = lam[n].clone().contiguous() if self.rank == 0 else torch.empty_like(grad_out)
        broadcast_(gz, self.comm, root=0)
        return gz, flat
