"""Pack a list of tensors into one flat buffer (and back), with an optional scale and
dtype conversion between floating types (e.g. float32 gradients into a bfloat16 message).

Semantics (the C++ kernel and the reference agree bit for bit): each element becomes
``cast(acc(x) * scale)`` where ``acc`` is float64 if either side is float64 and float32
otherwise, rounded once. Not collective.
"""
from __future__ import annotations

from typing import Sequence

import torch

from mltrain import ops


def _acc(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in (a, b) else torch.float32


def _convert(src: torch.Tensor, dst: torch.Tensor, scale: float) -> None:
    if src.dtype == dst.dtype and scale == 1.0:
        dst.copy_(src)
    elif not src.dtype.is_floating_point:
        if src.dtype != dst.dtype or scale != 1.0:
            raise RuntimeError(f"pack/unpack: a scale other than 1 or a dtype conversion needs "
                               f"floating-point dtypes, not {src.dtype} -> {dst.dtype}")
        dst.copy_(src)
    else:
        dst.copy_((src.to(_acc(src.dtype, dst.dtype)) * scale).to(dst.dtype))


def pack_reference(tensors: Sequence[torch.Tensor], flat: torch.Tensor, scale: float = 1.0) -> int:
    """flat[:n] = cast(scale * concat(t.flatten() for t in tensors)); returns n."""
    offset = 0
    for t in tensors:
        n = t.numel()
        _convert(t.reshape(-1), flat[offset:offset + n], scale)
        offset += n
    return offset


def unpack_reference(flat: torch.Tensor, tensors: Sequence[torch.Tensor], scale: float = 1.0) -> int:
    """Inverse of pack_reference: each tensor = cast(scale * its slice of flat); returns n."""
    offset = 0
    for t in tensors:
        n = t.numel()
        _convert(flat[offset:offset + n].view(t.shape), t, scale)
        offset += n
    return offset


def _use_ext(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> bool:
    if not ops.has_ext or flat.device.type != "cpu" or not tensors:
        return False
    dtype = tensors[0].dtype
    return all(t.device.type == "cpu" and t.is_contiguous() and t.dtype == dtype
               for t in tensors)


def pack(tensors: Sequence[torch.Tensor], flat: torch.Tensor, scale: float = 1.0) -> int:
    """Writes cast(scale * concat(tensors)) to the front of ``flat``; returns the count."""
    if _use_ext(flat, tensors):
        return ops._C.pack(list(tensors), flat, float(scale))
    return pack_reference(tensors, flat, scale)


def unpack(flat: torch.Tensor, tensors: Sequence[torch.Tensor], scale: float = 1.0) -> int:
    """Writes cast(scale * (their slices of flat)) into ``tensors``; returns the count."""
    if _use_ext(flat, tensors):
        return ops._C.unpack(flat, list(tensors), float(scale))
    return unpack_reference(flat, tensors, scale)
