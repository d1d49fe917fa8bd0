"""Sweeps of residual steps for MGRIT's relaxation: ``residual_sweep`` takes the steps
x <- x + s (x + h_i relu(W_i x + b_i) - x) (+ adds[i]) and returns every state;
``residual_steps`` one such step from each of several states; ``residual_masks`` the
ReLU masks at given states (what the products need);
``residual_vjp_sweep`` the chain lam <- lam + s h_i W_i^T (mask_i * lam) (+ adds[i]).

The C++ kernels run the same ATen operations in the same order as the references (which
are ``ResidualBlock.mgrit_step`` and ``mgrit_vjp`` written out), so the two agree bit for
bit; they save the interpreter's cost per step, which at MGRIT's sizes is about that of the
arithmetic. Not collective.
"""
from __future__ import annotations

from typing import Sequence

import torch

from mltrain import ops

Tensors = Sequence[torch.Tensor]


def residual_sweep_reference(x: torch.Tensor, weights: Tensors, biases: Tensors,
                             h: Sequence[float], scale: int,
                             adds: Tensors | None = None) -> list[torch.Tensor]:
    out = []
    for i, (w, b) in enumerate(zip(weights, biases)):
        y = torch.addmm(b, x, w.t()).relu_().mul_(h[i])
        y.add_(x)
        if scale != 1:
            y.sub_(x).mul_(scale).add_(x)
        if adds is not None:
            y.add_(adds[i])
        out.append(y)
        x = y
    return out


def residual_steps_reference(xs: Tensors, weights: Tensors, biases: Tensors,
                             h: Sequence[float], scale: int) -> list[torch.Tensor]:
    return [residual_sweep_reference(x, [w], [b], [hi], scale)[0]
            for x, w, b, hi in zip(xs, weights, biases, h)]


def residual_masks_reference(xs: Tensors, weights: Tensors, biases: Tensors) -> list[torch.Tensor]:
    return [torch.addmm(b, x, w.t()) > 0 for x, w, b in zip(xs, weights, biases)]


def residual_vjp_sweep_reference(lam: torch.Tensor, masks: Tensors, weights: Tensors,
                                 h: Sequence[float], scale: int,
                                 adds: Tensors | None = None) -> list[torch.Tensor]:
    out = []
    for i, (m, w) in enumerate(zip(masks, weights)):
        y = torch.addmm(lam, lam * m, w, alpha=h[i] * scale)
        if adds is not None:
            y.add_(adds[i])
        out.append(y)
        lam = y
    return out


def residual_sweep(x: torch.Tensor, weights: Tensors, biases: Tensors, h: Sequence[float],
                   scale: int, adds: Tensors | None = None) -> list[torch.Tensor]:
    """The states after each of ``len(weights)`` residual steps from ``x``."""
    if ops.has_ext:
        return ops._C.residual_sweep(x, list(weights), list(biases), list(h), scale,
                                     [] if adds is None else list(adds))
    return residual_sweep_reference(x, weights, biases, h, scale, adds)


def residual_steps(xs: Tensors, weights: Tensors, biases: Tensors, h: Sequence[float],
                   scale: int) -> list[torch.Tensor]:
    """One residual step from each state (block i from ``xs[i]``)."""
    if ops.has_ext:
        return ops._C.residual_steps(list(xs), list(weights), list(biases), list(h), scale)
    return residual_steps_reference(xs, weights, biases, h, scale)


def residual_masks(xs: Tensors, weights: Tensors, biases: Tensors) -> list[torch.Tensor]:
    """relu'(W_i x_i + b_i) as booleans, one per state."""
    if ops.has_ext:
        return ops._C.residual_masks(list(xs), list(weights), list(biases))
    return residual_masks_reference(xs, weights, biases)


def residual_vjp_sweep(lam: torch.Tensor, masks: Tensors, weights: Tensors,
                       h: Sequence[float], scale: int,
                       adds: Tensors | None = None) -> list[torch.Tensor]:
    """The adjoints after each of ``len(weights)`` vector-Jacobian products from ``lam``."""
    if ops.has_ext:
        return ops._C.residual_vjp_sweep(lam, list(masks), list(weights), list(h), scale,
                                         [] if adds is None else list(adds))
    return residual_vjp_sweep_reference(lam, masks, weights, h, scale, adds)
