"""The vector operations a multilevel optimizer needs between the levels of a depth
hierarchy: restriction R, prolongation P, the adjoint P^T for gradients, lengths measured on
the finest level, and dot products.

``Transfers`` works on whole parameter vectors (serial and data-parallel training).
``LayerTransfers`` works on the parts of a vector distributed over the ranks of the layer
axis, where rank r holds the opening (rank 0), its blocks [lo, hi) and the closing (last
rank) on every level. The finest level's split is aligned to cf^(levels-1), so coarse level
l owns blocks [lo / cf^l, hi / cf^l) on the same rank and injection and piecewise-constant
prolongation never cross a rank boundary. Full weighting reads one fine cell of the left
neighbour and linear prolongation one coarse block of each neighbour (halo exchange); the
adjoint of the linear prolongation sends the contributions that belong to a neighbour's
blocks back to it. So every transfer equals the serial one on the gathered vector (to
round-off in the order of a sum for P^T), at the cost of neighbour messages only.
"""
from __future__ import annotations

import math

import torch
from mpi4py import MPI

from mltrain import ops
from mltrain.comm import irecv, isend
from mltrain.multilevel.hierarchy import (Hierarchy, _prolong_adjoint, finest_metric,
                                          prolong_vec, restrict_grad, restrict_vec, to_finest)

__all__ = ["Transfers", "LayerTransfers"]


class Transfers:
    """Whole vectors (every rank holds all of each). Not collective."""

    def __init__(self, hierarchy: Hierarchy):
        self.hierarchy = hierarchy

    def restrict(self, level: int, v: torch.Tensor) -> torch.Tensor:
        return restrict_vec(self.hierarchy, level, v)

    def prolong(self, level: int, v: torch.Tensor) -> torch.Tensor:
        return prolong_vec(self.hierarchy, level, v)

    def restrict_grad(self, level: int, g: torch.Tensor) -> torch.Tensor:
        return restrict_grad(self.hierarchy, level, g)

    def to_finest(self, level: int, v: torch.Tensor) -> torch.Tensor:
        return to_finest(self.hierarchy, level, v)

    def metric(self, level: int) -> torch.Tensor:
        return finest_metric(self.hierarchy, level)

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a @ b)

    def norm(self, v: torch.Tensor) -> float:
        return float(v.norm())

    def any(self, v: torch.Tensor) -> bool:
        return bool(v.any())


class LayerTransfers(Transfers):
    """Parts of vectors distributed over ``comm`` (the layer axis); ``ranges[l][r]`` is
    the [lo, hi) of level l's blocks on rank r. Every method is collective on ``comm``
    (neighbour messages, or a sum for dot products)."""

    def __init__(self, hierarchy: Hierarchy, comm: MPI.Comm, ranges: list[list[tuple[int, int]]]):
        super().__init__(hierarchy)
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.ranges = ranges
        self.left = self.rank - 1 if self.rank > 0 else MPI.PROC_NULL
        self.right = self.rank + 1 if self.rank < self.size - 1 else MPI.PROC_NULL
        # Each level's local vector: (name, shape) in order, and the block parameter names.
        self.layout = []
        for lv, model in enumerate(hierarchy.models):
            lo, hi = ranges[lv][self.rank]
            named = list(model.named_parameters())
            pick = []
            for n, p in named:
                if n.startswith("blocks."):
                    keep = lo <= int(n.split(".")[1]) < hi
                elif n.startswith("opening."):
                    keep = self.rank == 0
                else:
                    keep = self.rank == self.size - 1
                if keep:
                    pick.append((n, tuple(p.shape)))
            self.layout.append(pick)
        self.block_names = [n for n, _ in hierarchy.models[0].blocks[0].named_parameters()]

    # -- halo exchange -------------------------------------------------------------------
    def _shift(self, send: torch.Tensor, to_right: bool, rows: int) -> torch.Tensor:
        """Sends ``send`` to the right (or left) neighbour and returns the ``rows`` rows
        received from the other side (none at the end of the chain)."""
        dest, source = (self.right, self.left) if to_right else (self.left, self.right)
        tag = 31 + to_right
        # Through the staging helpers: the stacks live on the parameters' device.
        buf = torch.empty((rows, *send.shape[1:]), dtype=send.dtype, device=send.device)
        got = irecv(buf, source, self.comm, tag) if source != MPI.PROC_NULL else None
        sent = isend(send.contiguous(), dest, self.comm, tag) if dest != MPI.PROC_NULL else None
        for h in (got, sent):
            if h is not None:
                h.wait()
        return buf if got is not None else buf[:0]

    def _halo(self, t: torch.Tensor, left: int, right: int):
        """The last ``left`` rows of the left neighbour's stack and the first ``right`` of
        the right one's (empty at the ends of the chain)."""
        from_left = self._shift(t[len(t) - left:], True, left) if left else t[:0]
        from_right = self._shift(t[:right], False, right) if right else t[:0]
        return from_left, from_right

    def _restrict_stack(self, t: torch.Tensor) -> torch.Tensor:
        cf, mode = self.hierarchy.cf, self.hierarchy.restriction
        if mode == "injection":
            return ops.restrict(t, cf, mode)
        # Full weighting of coarse block j reads fine blocks cf j - (cf-1) .. cf j + cf-1:
        # one fine cell of the left neighbour.
        lh, _ = self._halo(t, cf, 0)
        out = ops.restrict(torch.cat([lh, t]), cf, mode)
        return out[len(lh) // cf:]

    def _prolong_stack(self, t: torch.Tensor) -> torch.Tensor:
        cf, mode = self.hierarchy.cf, self.hierarchy.prolongation
        if mode == "constant":
            return ops.prolong(t, cf, mode)
        # Linear: a fine cell reads its coarse block and the next (at the last cell of the
        # chain the previous), so one coarse block of each neighbour.
        lh, rh = self._halo(t, 1, 1)
        out = ops.prolong(torch.cat([lh, t, rh]), cf, mode)
        return out[len(lh) * cf:len(out) - len(rh) * cf]

    def _adjoint_stack(self, g: torch.Tensor) -> torch.Tensor:
        cf, mode = self.hierarchy.cf, self.hierarchy.prolongation
        if mode == "constant":
            return _prolong_adjoint(self.hierarchy, g)
        # The adjoint of this rank's rows of the windowed prolongation, then the parts that
        # fall on the neighbours' blocks sent to them and added.
        n = len(g) // cf
        nl = 1 if self.left != MPI.PROC_NULL else 0
        nr = 1 if self.right != MPI.PROC_NULL else 0
        with torch.enable_grad():
            leaf = torch.zeros((nl + n + nr, *g.shape[1:]), dtype=g.dtype, device=g.device,
                               requires_grad=True)
            fine = ops.prolong_reference(leaf, cf, mode)[nl * cf:(nl + n) * cf]
            (w,) = torch.autograd.grad(fine, leaf, g)
        w = w.detach()
        got_r = self._shift(w[:1], False, 1)  # my first window row: the left one's last block
        got_l = self._shift(w[-1:], True, 1)
        out = w[nl:nl + n].clone()
        if nl:
            out[0] += got_l[0]
        if nr:
            out[-1] += got_r[0]
        return out

    # -- vectors ---------------------------------------------------------------------------
    def _move(self, src: int, dst: int, flat: torch.Tensor, fn) -> torch.Tensor:
        parts, off = {}, 0
        for n, shape in self.layout[src]:
            k = math.prod(shape)
            parts[n] = flat[off:off + k].view(shape)
            off += k
        lo, hi = self.ranges[src][self.rank]
        moved = {}
        for bn in self.block_names:
            stacked = torch.stack([parts[f"blocks.{i}.{bn}"] for i in range(lo, hi)])
            dlo = self.ranges[dst][self.rank][0]
            for j, t in enumerate(fn(stacked)):
                moved[f"blocks.{dlo + j}.{bn}"] = t
        return torch.cat([(moved[n] if n in moved else parts[n]).reshape(-1)
                          for n, _ in self.layout[dst]])

    def restrict(self, level: int, v: torch.Tensor) -> torch.Tensor:
        return self._move(level, level + 1, v, self._restrict_stack)

    def prolong(self, level: int, v: torch.Tensor) -> torch.Tensor:
        return self._move(level + 1, level, v, self._prolong_stack)

    def restrict_grad(self, level: int, g: torch.Tensor) -> torch.Tensor:
        return self._move(level, level + 1, g, self._adjoint_stack)

    def to_finest(self, level: int, v: torch.Tensor) -> torch.Tensor:
        for lv in range(level - 1, -1, -1):
            v = self.prolong(lv, v)
        return v

    def metric(self, level: int) -> torch.Tensor:
        whole = dict(zip((n for n, _ in self.hierarchy.models[level].named_parameters()),
                         finest_metric(self.hierarchy, level).split(
                             [p.numel() for p in self.hierarchy.models[level].parameters()])))
        return torch.cat([whole[n] for n, _ in self.layout[level]])

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return self.comm.allreduce(float(a @ b))

    def norm(self, v: torch.Tensor) -> float:
        return math.sqrt(self.dot(v, v))

    def any(self, v: torch.Tensor) -> bool:
        return bool(self.comm.allreduce(int(bool(v.any())), op=MPI.MAX))
