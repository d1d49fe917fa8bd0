"""Limited-memory SR1 curvature model: B = gamma I + sum_i u_i u_i^T / (u_i . s_i), built
from the last ``memory`` pairs (s_i, y_i = change of gradient along s_i), with
u_i = y_i - B_{i-1} s_i. A pair whose |u_i . s_i| < r ||s_i|| ||u_i|| is skipped (the SR1
safeguard). SR1 may be indefinite, which the trust-region subproblem handles. Pure torch;
identical on every rank when fed averaged gradients. Not collective."""
from __future__ import annotations

import torch

__all__ = ["LSR1"]


class LSR1:
    def __init__(self, memory: int = 5, r: float = 1e-8):
        self.memory, self.r = memory, r
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.gamma = 1.0
        self._terms: list[tuple[torch.Tensor, float]] = []

    def update(self, s: torch.Tensor, y: torch.Tensor) -> None:
        sy = float(s @ y)
        if sy > 0:
            self.gamma = float(y @ y) / sy  # scale of the latest curvature seen
        self.pairs = (self.pairs + [(s.clone(), y.clone())])[-self.memory:]
        self._terms = []
        for si, yi in self.pairs:
            u = yi - self.mv(si)
            d = float(u @ si)
            if abs(d) >= self.r * float(si.norm()) * float(u.norm()) and d != 0.0:
                self._terms.append((u, d))

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        out = self.gamma * v
        for u, d in self._terms:
            out = out + (float(u @ v) / d) * u
        return out
