"""Depth hierarchies of residual networks.

A network that follows the residual-block protocol (``opening``, ``blocks``: a ModuleList
of N blocks of one structure, each with a step ``h``, ``closing``) is read as a forward-
Euler discretisation of an ODE. Level l has N / cf^l blocks with step h cf^l; the opening
and closing layers are the same on every level (transferred as they are). Block parameters
are stacked over depth and moved between levels by the depth-transfer kernels of
``mltrain.ops`` (restriction: injection or full weighting; prolongation: constant or
linear). Not collective.
"""
from __future__ import annotations

import copy
import weakref

import torch

from mltrain import ops
from mltrain.config import ConfigError
from mltrain.nn import check_residual

__all__ = ["check_protocol", "coarsen", "Hierarchy", "restrict_vec", "prolong_vec", "restrict_grad",
           "to_finest", "finest_metric", "coarse_first", "steps_per_level"]


check_protocol = check_residual  # the residual-block protocol lives in mltrain.nn


def coarse_first(step: int, per: int, levels: int) -> int:
    """The level that step ``step`` trains when the coarse levels come first, ``per`` steps
    each, coarsest first, then the finest (0) for good: nested iteration's phases and
    RMTR's nested start. Not collective."""
    return max(levels - 1 - step // per, 0)


def steps_per_level(nested_steps: int, total_steps: int, levels: int) -> int:
    """Steps on each coarse level of nested iteration: ``multilevel.nested_steps``, or (0)
    the run's steps shared equally by the levels. Not collective."""
    return nested_steps or max(total_steps // levels, 1)


def _stacked(blocks) -> dict[str, torch.Tensor]:
    names = [n for n, _ in blocks[0].named_parameters()]
    return {n: torch.stack([dict(b.named_parameters())[n].detach() for b in blocks])
            for n in names}


def _load_stacked(blocks, stacked: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for i, b in enumerate(blocks):
            params = dict(b.named_parameters())
            for n, t in stacked.items():
                params[n].copy_(t[i])


def coarsen(model: torch.nn.Module, cf: int, restriction: str = "injection"):
    """A copy of ``model`` with N / cf blocks of step h * cf, its block parameters the
    restriction of ``model``'s. Not collective."""
    check_protocol(model)
    n = len(model.blocks)
    if n % cf:
        raise ConfigError(f"multilevel.cf: {n} residual blocks are not divisible by cf = {cf}")
    coarse = copy.deepcopy(model)
    coarse.blocks = torch.nn.ModuleList(copy.deepcopy(model.blocks[i]) for i in range(n // cf))
    for b, fine_b in zip(coarse.blocks, model.blocks[::cf]):
        b.h = fine_b.h * cf
    stacked = {k: ops.restrict(v, cf, restriction) for k, v in _stacked(model.blocks).items()}
    _load_stacked(coarse.blocks, stacked)
    return coarse


class Hierarchy:
    """``models[0]`` is the finest (the given model), ``models[-1]`` the coarsest.

    ``restrict_to(l)`` overwrites level l+1's parameters with the restriction of level
    l's; ``prolong_to(l)`` overwrites level l's parameters with the prolongation of level
    l+1's (nested iteration). Not collective. (What a level costs is measured, not
    derived from it: ``mltrain.optim.costs``.)
    """

    def __init__(self, model: torch.nn.Module, levels: int, cf: int,
                 restriction: str = "injection", prolongation: str = "constant"):
        check_protocol(model)
        n = len(model.blocks)
        if levels < 1:
            raise ConfigError("multilevel.levels: must be at least 1")
        if n % cf ** (levels - 1):
            raise ConfigError(f"multilevel.levels: {n} residual blocks cannot be coarsened "
                              f"{levels - 1} times by cf = {cf} (need a multiple of "
                              f"{cf ** (levels - 1)})")
        self.cf, self.restriction, self.prolongation = cf, restriction, prolongation
        self.models = [model]
        for _ in range(levels - 1):
            self.models.append(coarsen(self.models[-1], cf, restriction))

    @property
    def levels(self) -> int:
        return len(self.models)

    def _shared(self, src, dst) -> None:
        with torch.no_grad():
            for a, b in ((src.opening, dst.opening), (src.closing, dst.closing)):
                for p, q in zip(a.parameters(), b.parameters()):
                    q.copy_(p)

    def restrict_to(self, level: int) -> None:
        fine, coarse = self.models[level], self.models[level + 1]
        self._shared(fine, coarse)
        _load_stacked(coarse.blocks, {k: ops.restrict(v, self.cf, self.restriction)
                                      for k, v in _stacked(fine.blocks).items()})

    def prolong_to(self, level: int) -> None:
        fine, coarse = self.models[level], self.models[level + 1]
        self._shared(coarse, fine)
        _load_stacked(fine.blocks, {k: ops.prolong(v, self.cf, self.prolongation)
                                    for k, v in _stacked(coarse.blocks).items()})


def _named_split(model: torch.nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    out, off = {}, 0
    for n, p in model.named_parameters():
        out[n] = flat[off:off + p.numel()].view(p.shape)
        off += p.numel()
    return out


class _Layout:
    """Where a model's parameters lie in its flat vector, read once: every transfer of a
    cycle used to walk ``named_parameters`` (a third of an RMTR run's time on a 64-block
    network). ``blocks`` is (start, per-block size, [(offset in a block, numel, shape)])
    when the blocks' parameters are one block-major range, else None."""

    def __init__(self, model: torch.nn.Module):
        entries, off = [], 0
        for n, p in model.named_parameters():
            entries.append((n, off, p.numel(), tuple(p.shape)))
            off += p.numel()
        self.size, self.nblocks = off, len(model.blocks)
        names = [n for n, _ in model.blocks[0].named_parameters()]
        at = {n: (o, k, sh) for n, o, k, sh in entries}
        first = [at.get(f"blocks.0.{bn}") for bn in names]
        self.blocks = None
        if names and all(first):
            start = first[0][0]
            inner = [(o - start, k, sh) for o, k, sh in first]
            per = sum(k for _, k, _ in inner)
            ok = [o for o, _, _ in inner] == [sum(k for _, k, _ in inner[:j])
                                              for j in range(len(inner))]
            ok = ok and all(at.get(f"blocks.{i}.{bn}") == (start + i * per + o, k, sh)
                            for i in range(self.nblocks)
                            for bn, (o, k, sh) in zip(names, inner))
            if ok:
                self.blocks = (start, per, inner)
        # Non-block parameters, for the check that two levels share them as they are.
        self.rest = [(n, o, k) for n, o, k, _ in entries if not n.startswith("blocks.")]

    def head_tail(self) -> tuple[int, int]:
        start, per, _ = self.blocks
        return start, start + per * self.nblocks


_LAYOUTS: "weakref.WeakKeyDictionary[torch.nn.Module, _Layout]" = weakref.WeakKeyDictionary()


def _layout(model: torch.nn.Module) -> _Layout:
    lay = _LAYOUTS.get(model)
    # Read again if the model's blocks were replaced by another count since (a vector of
    # another size is refused by ``_fast_transfer``'s size check).
    if lay is None or lay.nblocks != len(model.blocks):
        lay = _LAYOUTS[model] = _Layout(model)
    return lay


def _fast_transfer(src_model, dst_model, flat: torch.Tensor, fn) -> torch.Tensor | None:
    """``_transfer_vec`` by slicing the block range as a (blocks x per-block) matrix, when
    both models lay their blocks out block-major with the same parameters around them;
    None otherwise. The same values in the same order: bit for bit the general path."""
    src, dst = _layout(src_model), _layout(dst_model)
    if src.blocks is None or dst.blocks is None or flat.numel() != src.size:
        return None
    (s0, s1), (d0, d1) = src.head_tail(), dst.head_tail()
    if (s0, src.size - s1) != (d0, dst.size - d1) or src.blocks[1:] != dst.blocks[1:] or [
            (n, k) for n, _, k in src.rest] != [(n, k) for n, _, k in dst.rest]:
        return None
    _, per, inner = src.blocks
    grid = flat[s0:s1].view(src.nblocks, per)
    moved = [fn(grid[:, o:o + k].reshape(src.nblocks, *sh)).reshape(dst.nblocks, k)
             for o, k, sh in inner]
    return torch.cat([flat[:s0], torch.cat(moved, dim=1).reshape(-1), flat[s1:]])


def _transfer_vec(src_model, dst_model, flat: torch.Tensor, fn) -> torch.Tensor:
    """Maps a flat vector over ``src_model``'s parameters to ``dst_model``'s: block
    parameters (``blocks.<i>.<name>``) stacked over depth and passed through ``fn``, the
    opening and closing layers unchanged."""
    fast = _fast_transfer(src_model, dst_model, flat, fn)
    if fast is not None:
        return fast
    src = _named_split(src_model, flat)
    block_names = [n for n, _ in src_model.blocks[0].named_parameters()]
    moved = {}
    for bn in block_names:
        stacked = torch.stack([src[f"blocks.{i}.{bn}"] for i in range(len(src_model.blocks))])
        for j, t in enumerate(fn(stacked)):
            moved[f"blocks.{j}.{bn}"] = t
    return torch.cat([(moved[n] if n in moved else src[n]).reshape(-1)
                      for n, _ in dst_model.named_parameters()])


def restrict_vec(h: "Hierarchy", level: int, flat: torch.Tensor) -> torch.Tensor:
    """R: a vector over level ``level``'s parameters to level ``level + 1``'s."""
    return _transfer_vec(h.models[level], h.models[level + 1], flat,
                         lambda t: ops.restrict(t, h.cf, h.restriction))


def prolong_vec(h: "Hierarchy", level: int, flat: torch.Tensor) -> torch.Tensor:
    """P: a vector over level ``level + 1``'s parameters to level ``level``'s."""
    return _transfer_vec(h.models[level + 1], h.models[level], flat,
                         lambda t: ops.prolong(t, h.cf, h.prolongation))


def _prolong_adjoint(h: "Hierarchy", fine: torch.Tensor) -> torch.Tensor:
    """P^T over depth: the vector-Jacobian product of the (linear) prolongation."""
    with torch.enable_grad():
        leaf = torch.zeros((fine.shape[0] // h.cf, *fine.shape[1:]), dtype=fine.dtype,
                           device=fine.device, requires_grad=True)
        (out,) = torch.autograd.grad(ops.prolong_reference(leaf, h.cf, h.prolongation), leaf,
                                     fine)
    return out


def restrict_grad(h: "Hierarchy", level: int, flat: torch.Tensor) -> torch.Tensor:
    """P^T: a gradient over level ``level``'s parameters to level ``level + 1``'s. With it
    a coarse step s and its prolongation P s change the first-order models alike:
    (P^T g) . s = g . (P s)."""
    return _transfer_vec(h.models[level], h.models[level + 1], flat,
                         lambda t: _prolong_adjoint(h, t))


def to_finest(h: "Hierarchy", level: int, flat: torch.Tensor) -> torch.Tensor:
    """A vector over level ``level``'s parameters prolonged to the finest level."""
    for lv in range(level - 1, -1, -1):
        flat = prolong_vec(h, lv, flat)
    return flat


def finest_metric(h: "Hierarchy", level: int) -> torch.Tensor:
    """The diagonal of (P_0 ... P_{level-1})^T (P_0 ... P_{level-1}) over level ``level``'s
    parameters (float64): ||s||_finest^2 = sum(d s^2) exactly for constant prolongation,
    up to the off-diagonal couplings for linear."""
    model = h.models[level]
    n = len(model.blocks)
    # Row i: coarse block i as a stacked "layer". On the host: it is n x n and its column
    # sums are read back one by one as Python floats (a device sync each otherwise); the
    # weights themselves are made on the parameters' device.
    depth = torch.eye(n, dtype=torch.float64)  # host: small, read back as Python floats
    for _ in range(level):
        depth = ops.prolong_reference(depth, h.cf, h.prolongation)
    col = (depth * depth).sum(0)  # [n]: ||P e_i||^2 for each block
    parts = []
    for name, p in model.named_parameters():
        w = float(col[int(name.split(".")[1])]) if name.startswith("blocks.") else 1.0
        parts.append(torch.full((p.numel(),), w, dtype=torch.float64, device=p.device))
    return torch.cat(parts)
