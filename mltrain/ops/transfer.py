"""Depth transfer of stacked per-layer parameters ``[N, ...]`` (multilevel training).

``restrict(fine, cf, mode)`` gives ``[N / cf, ...]`` by ``injection`` or
``full_weighting``; ``prolong(coarse, cf, mode)`` gives ``[Nc * cf, ...]`` by ``constant``
or ``linear`` interpolation in depth. The exact definitions are in csrc/transfer.cpp; the
references below implement the same arithmetic in vectorised torch. Both directions are
linear maps, differentiable through ``restrict``/``prolong`` (autograd uses the reference's
graph for the backward pass). Not collective.
"""
from __future__ import annotations

import torch

from mltrain import ops

RESTRICTIONS = ("injection", "full_weighting")
PROLONGATIONS = ("constant", "linear")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(x: torch.Tensor, cf: int, what: str) -> None:
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"{what}: needs stacked layers [N, ...], got shape {tuple(x.shape)}")
    if cf < 1:
        raise ValueError(f"{what}: the coarsening factor must be at least 1, got {cf}")


def restrict_reference(fine: torch.Tensor, cf: int, mode: str) -> torch.Tensor:
    _check(fine, cf, "restrict")
    n = fine.shape[0]
    if n % cf:
        raise ValueError(f"restrict: {n} layers are not divisible by cf = {cf}")
    if mode == "injection":
        return fine[::cf].clone()
    if mode != "full_weighting":
        raise ValueError(f"restrict: mode must be one of {RESTRICTIONS}, not {mode!r}")
    nc = n // cf
    acc_t = _acc(fine.dtype)
    dev = fine.device  # the reference is also the GPU path: temporaries live with the data
    rows = torch.arange(nc, device=dev) * cf
    acc = torch.zeros((nc, *fine.shape[1:]), dtype=acc_t, device=dev)
    wsum = torch.zeros(nc, dtype=torch.int64, device=dev)
    for k in range(-(cf - 1), cf):
        idx = rows + k
        ok = (idx >= 0) & (idx < n)
        w = float(cf - abs(k))
        acc[ok] = acc[ok] + w * fine[idx[ok]].to(acc_t)
        wsum[ok] += cf - abs(k)
    shape = (nc,) + (1,) * (fine.dim() - 1)
    return (acc / wsum.to(acc_t).view(shape)).to(fine.dtype)


def prolong_reference(coarse: torch.Tensor, cf: int, mode: str) -> torch.Tensor:
    _check(coarse, cf, "prolong")
    nc = coarse.shape[0]
    if mode not in PROLONGATIONS:
        raise ValueError(f"prolong: mode must be one of {PROLONGATIONS}, not {mode!r}")
    if mode == "constant" or nc == 1:
        return coarse.repeat_interleave(cf, dim=0)
    acc_t = _acc(coarse.dtype)
    j = torch.arange(nc * cf, device=coarse.device)
    i = torch.clamp(j // cf, max=nc - 2)
    t = (j - i * cf).to(torch.float64) / cf
    shape = (nc * cf,) + (1,) * (coarse.dim() - 1)
    a, b = (1.0 - t).to(acc_t).view(shape), t.to(acc_t).view(shape)
    c = coarse.to(acc_t)
    return (a * c[i] + b * c[i + 1]).to(coarse.dtype)


# Injection and constant prolongation are pure copies: torch's own copy is as fast from
# about 1e7 elements and faster at 1e8 (bench kernels, docs/benchmarks.md), so the
# reference runs there.
COPY_REFERENCE_FROM = 10**7


def _use_ext(x: torch.Tensor, mode: str) -> bool:
    if mode in ("injection", "constant") and x.numel() >= COPY_REFERENCE_FROM:
        return False
    return ops.has_ext and x.device.type == "cpu" and x.is_floating_point() and x.numel() > 0


class _Transfer(torch.autograd.Function):
    """The kernel forward; the backward through the reference's autograd graph (both maps
    are linear, so this is exact)."""

    @staticmethod
    def forward(ctx, x, cf, mode, kernel, reference):
        ctx.save_for_backward(x)
        ctx.args = (cf, mode, reference)
        return kernel(x.contiguous(), cf, mode)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        cf, mode, reference = ctx.args
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(reference(leaf, cf, mode), leaf, grad)
        return g, None, None, None, None


def _run(x, cf, mode, kernel, reference, what):
    if _use_ext(x, mode):
        _check(x, cf, what)
        try:
            return _Transfer.apply(x, cf, mode, kernel, reference)
        except RuntimeError as e:  # the kernel's argument checks: same message, ValueError
            raise ValueError(str(e).splitlines()[0]) from None
    return reference(x, cf, mode)


def restrict(fine: torch.Tensor, cf: int, mode: str = "injection") -> torch.Tensor:
    """Coarse layers from fine ones (see the module doc)."""
    kernel = (lambda x, c, m: ops._C.restrict_depth(x, c, m)) if ops.has_ext else None
    return _run(fine, cf, mode, kernel, restrict_reference, "restrict")


def prolong(coarse: torch.Tensor, cf: int, mode: str = "constant") -> torch.Tensor:
    """Fine layers from coarse ones (see the module doc)."""
    kernel = (lambda x, c, m: ops._C.prolong_depth(x, c, m, 0)) if ops.has_ext else None
    return _run(coarse, cf, mode, kernel, prolong_reference, "prolong")
