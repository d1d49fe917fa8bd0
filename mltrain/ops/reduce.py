"""Multi-buffer reductions: ``sum_buffers(out, bufs)`` (out = sum of k buffers) and
``axpby(out, a, x, b, y)`` (out = a x + b y, push-sum mixing). Both accumulate in float32
(float64 for float64 data) and round once; the C++ kernels and the references agree bit
for bit. ``out`` may be one of the inputs. Not collective.
"""
from __future__ import annotations

from typing import Sequence

import torch

from mltrain import ops


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def sum_buffers_reference(out: torch.Tensor, bufs: Sequence[torch.Tensor]) -> torch.Tensor:
    if not bufs:
        raise ValueError("sum_buffers: needs at least one buffer")
    # On out's device, so a mix of host and device buffers works (no-op moves otherwise).
    acc = bufs[0].to(out.device, _acc(out.dtype), copy=True)
    for b in bufs[1:]:
        acc += b.to(acc.device, acc.dtype)
    return out.copy_(acc.view(out.shape))


def axpby_reference(out: torch.Tensor, a: float, x: torch.Tensor, b: float,
                    y: torch.Tensor) -> torch.Tensor:
    acc = _acc(out.dtype)
    return out.copy_(x.to(out.device, acc) * a + y.to(out.device, acc) * b)


def _use_ext(out, tensors) -> bool:
    return (ops.has_ext and out.device.type == "cpu" and out.is_contiguous()
            and out.is_floating_point()
            and all(t.device.type == "cpu" and t.is_contiguous() and t.dtype == out.dtype
                    and t.numel() == out.numel() for t in tensors))


def sum_buffers(out: torch.Tensor, bufs: Sequence[torch.Tensor]) -> torch.Tensor:
    """out = bufs[0] + bufs[1] + ... (in that order, accumulated wide)."""
    if bufs and _use_ext(out, bufs):
        ops._C.sum_buffers(out, list(bufs))
        return out
    return sum_buffers_reference(out, bufs)


def axpby(out: torch.Tensor, a: float, x: torch.Tensor, b: float, y: torch.Tensor) -> torch.Tensor:
    """out = a*x + b*y."""
    if _use_ext(out, (x, y)):
        ops._C.axpby(out, float(a), x, float(b), y)
        return out
    return axpby_reference(out, a, x, b, y)
