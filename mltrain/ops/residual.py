"""Sweeps of residual steps for MGRIT's relaxation: ``residual_sweep`` takes the steps
x <- x + s (x + h_i relu(W_i x + b_i) - x) (+ adds[i]) and returns every state;
``residual_steps`` one such step from each of several states; ``residual_masks`` the
ReLU masks at given states (what the products need);
``residual_vjp_sweep`` the chain lam <- lam + s h_i W_i^T (mask_i * lam) (+ adds[i]).

``residual_step``, ``residual_mask`` and ``residual_vjp`` are the single operations
(``ResidualBlock``'s fast path calls them). The C++ kernels run the same ATen operations in
the same order as the references, so the two agree bit for bit; they save the interpreter's cost per step, which at MGRIT's sizes is about that of the
arithmetic. Not collective.
"""
from __future__ import annotations

from typing import Sequence

import torch

from mltrain import ops

Tensors = Sequence[torch.Tensor]


def residual_step(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, h: float,
                  scale: int = 1) -> torch.Tensor:
    """One step x + s (x + h relu(W x + b) - x), in the operations the kernels repeat."""
    y = torch.addmm(b, x, w.t()).relu_().mul_(h)
    y.add_(x)
    return y if scale == 1 else y.sub_(x).mul_(scale).add_(x)


def residual_mask(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Where the step's ReLU at ``x`` is active."""
    return torch.addmm(b, x, w.t()) > 0


def residual_vjp(lam: torch.Tensor, mask: torch.Tensor, w: torch.Tensor, h: float,
                 scale: int = 1) -> torch.Tensor:
    """lam + s h W^T (mask * lam): lam^T times the step's Jacobian where ``mask`` was taken."""
    return torch.addmm(lam, lam * mask, w, alpha=h * scale)


def residual_sweep_reference(x: torch.Tensor, weights: Tensors, biases: Tensors,
                             h: Sequence[float], scale: int,
                             adds: Tensors | None = None) -> list[torch.Tensor]:
    out = []
    for i, (w, b) in enumerate(zip(weights, biases)):
        x = residual_step(x, w, b, h[i], scale)
        if adds is not None:
            x.add_(adds[i])
        out.append(x)
    return out


def residual_steps_reference(xs: Tensors, weights: Tensors, biases: Tensors,
                             h: Sequence[float], scale: int) -> list[torch.Tensor]:
    return [residual_step(x, w, b, hi, scale) for x, w, b, hi in zip(xs, weights, biases, h)]


def residual_masks_reference(xs: Tensors, weights: Tensors, biases: Tensors) -> list[torch.Tensor]:
    return [residual_mask(x, w, b) for x, w, b in zip(xs, weights, biases)]


def residual_vjp_sweep_reference(lam: torch.Tensor, masks: Tensors, weights: Tensors,
                                 h: Sequence[float], scale: int,
                                 adds: Tensors | None = None) -> list[torch.Tensor]:
    out = []
    for i, (m, w) in enumerate(zip(masks, weights)):
        lam = residual_vjp(lam, m, w, h[i], scale)
        if adds is not None:
            lam.add_(adds[i])
        out.append(lam)
    return out


def _use_ext(x: torch.Tensor, weights: Tensors) -> bool:
    """The C++ sweeps are CPU kernels: tensors elsewhere (a GPU) take the references."""
    return (ops.has_ext and x.device.type == "cpu"
            and all(w.device.type == "cpu" for w in weights))


def residual_sweep(x: torch.Tensor, weights: Tensors, biases: Tensors, h: Sequence[float],
                   scale: int, adds: Tensors | None = None) -> list[torch.Tensor]:
    """The states after each of ``len(weights)`` residual steps from ``x``."""
    if _use_ext(x, weights):
        return ops._C.residual_sweep(x, list(weights), list(biases), list(h), scale,
                                     [] if adds is None else list(adds))
    return residual_sweep_reference(x, weights, biases, h, scale, adds)


def residual_steps(xs: Tensors, weights: Tensors, biases: Tensors, h: Sequence[float],
                   scale: int) -> list[torch.Tensor]:
    """One residual step from each state (block i from ``xs[i]``)."""
    if xs and _use_ext(xs[0], weights):
        return ops._C.residual_steps(list(xs), list(weights), list(biases), list(h), scale)
    return residual_steps_reference(xs, weights, biases, h, scale)


def residual_masks(xs: Tensors, weights: Tensors, biases: Tensors) -> list[torch.Tensor]:
    """relu'(W_i x_i + b_i) as booleans, one per state."""
    if xs and _use_ext(xs[0], weights):
        return ops._C.residual_masks(list(xs), list(weights), list(biases))
    return residual_masks_reference(xs, weights, biases)


def residual_vjp_sweep(lam: torch.Tensor, masks: Tensors, weights: Tensors,
                       h: Sequence[float], scale: int,
                       adds: Tensors | None = None) -> list[torch.Tensor]:
    """The adjoints after each of ``len(weights)`` vector-Jacobian products from ``lam``."""
    if _use_ext(lam, weights):
        return ops._C.residual_vjp_sweep(lam, list(masks), list(weights), list(h), scale,
                                         [] if adds is None else list(adds))
    return residual_vjp_sweep_reference(lam, masks, weights, h, scale, adds)
