"""Pack a list of tensors into one flat buffer (and back), with an optional scale.

The C++ kernel (csrc/pack.cpp) runs for CPU tensors when built; the references below define
the semantics and run otherwise. Not collective.
"""
from __future__ import annotations

from typing import Sequence

import torch

from mltrain import ops


def pack_reference(tensors: Sequence[torch.Tensor], flat: torch.Tensor, scale: float = 1.0) -> int:
    """flat[:n] = scale * concat(t.flatten() for t in tensors); returns n."""
    offset = 0
    for t in tensors:
        n = t.numel()
        dst = flat[offset:offset + n]
        if scale == 1.0:
            dst.copy_(t.reshape(-1))
        else:
            torch.mul(t.reshape(-1), scale, out=dst)
        offset += n
    return offset


def unpack_reference(flat: torch.Tensor, tensors: Sequence[torch.Tensor], scale: float = 1.0) -> int:
    """Inverse of pack_reference: each tensor = scale * its slice of flat; returns n."""
    offset = 0
    for t in tensors:
        n = t.numel()
        src = flat[offset:offset + n].view(t.shape)
        if scale == 1.0:
            t.copy_(src)
        else:
            torch.mul(src, scale, out=t)
        offset += n
    return offset


def _use_ext(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> bool:
    return ops.has_ext and flat.device.type == "cpu" and all(
        t.device.type == "cpu" and t.is_contiguous() and t.dtype == flat.dtype for t in tensors)


def pack(tensors: Sequence[torch.Tensor], flat: torch.Tensor, scale: float = 1.0) -> int:
    """Writes scale * concat(tensors) to the front of ``flat``; returns the element count."""
    if _use_ext(flat, tensors):
        return ops._C.pack(list(tensors), flat, float(scale))
    return pack_reference(tensors, flat, scale)


def unpack(flat: torch.Tensor, tensors: Sequence[torch.Tensor], scale: float = 1.0) -> int:
    """Writes scale * (their slices of flat) into ``tensors``; returns the element count."""
    if _use_ext(flat, tensors):
        return ops._C.unpack(flat, list(tensors), float(scale))
    return unpack_reference(flat, tensors, scale)
