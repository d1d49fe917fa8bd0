"""A model's trainable parameters as views of one flat buffer, so that the optimizers'
vector (a PETSc Vec made with ``linalg.petsc.wrap``) and the torch parameters are the same
memory: a step PETSc writes is the model's new weights, with no copy in between. Flat
vectors live on the parameters' device (PETSc wraps only CPU ones). Pure torch; not
collective."""
from __future__ import annotations

import torch

from mltrain import ops

__all__ = ["ParamBuffer", "FlatParams", "flat_params", "set_flat_params"]


class ParamBuffer:
    """After construction every trainable ``p`` of ``model`` is ``flat[off:off+n].view(p.shape)``
    and its ``.grad`` the same slice of ``grad`` (same Parameter objects, so optimizers and
    hooks that hold them keep working). Backward accumulates into ``grad`` in place; call
    ``zero_grad()`` (not the optimizer's, which would drop the views) between steps."""

    def __init__(self, model: torch.nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(f"ParamBuffer: parameters have several dtypes {dtypes}")
        devices = {p.device for p in self.params}
        if len(devices) != 1:
            raise ValueError(f"ParamBuffer: parameters are on several devices {devices}")
        self.flat = torch.empty(sum(p.numel() for p in self.params), dtype=dtypes.pop(),
                                device=devices.pop())
        self.grad = torch.zeros_like(self.flat)
        self._offsets = []
        off = 0
        with torch.no_grad():
            for p in self.params:
                view = self.flat[off:off + p.numel()].view(p.shape)
                view.copy_(p)
                p.data = view
                self._offsets.append(off)
                off += p.numel()
        self.zero_grad()

    def zero_grad(self) -> None:
        """Zeroes the gradient buffer and (re)attaches every ``.grad`` to its slice."""
        self.grad.zero_()
        for p, off in zip(self.params, self._offsets):
            p.grad = self.grad[off:off + p.numel()].view(p.shape)

    def views_intact(self) -> bool:
        """False if something replaced a parameter's storage (e.g. ``model.to(...)``)."""
        lo = self.flat.data_ptr()
        hi = lo + self.flat.numel() * self.flat.element_size()
        return all(lo <= p.data_ptr() < hi for p in self.params if p.numel())


class FlatParams:
    """The trainable parameters of a model (or a list of parameters) as one flat vector
    (packed with the C++ kernel).

    ``get()`` copies them out, ``set(flat)`` copies back. Not collective.
    """

    def __init__(self, model: torch.nn.Module | list):
        params = model.parameters() if isinstance(model, torch.nn.Module) else model
        self.params = [p for p in params if p.requires_grad]
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise ValueError(f"flat parameter vectors need one parameter dtype, got {dtypes}")
        self.dtype = dtypes.pop()
        devices = {p.device for p in self.params}
        if len(devices) != 1:
            raise ValueError(f"flat parameter vectors need one device, got {devices}")
        self.device = devices.pop()
        self.numel = sum(p.numel() for p in self.params)

    def get(self, out: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.empty(self.numel, dtype=self.dtype, device=self.device) if out is None \
            else out
        with torch.no_grad():
            ops.pack([p.detach() for p in self.params], out)
        return out

    def set(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            ops.unpack(flat, [p.data for p in self.params])


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    """A copy of the trainable parameters as one flat vector. Not collective."""
    return FlatParams(model).get()


def set_flat_params(model: torch.nn.Module, flat: torch.Tensor) -> None:
    """Copies ``flat`` into the trainable parameters (bit for bit). Not collective."""
    FlatParams(model).set(flat)
