"""Limited-memory SR1 curvature model: B = gamma I + sum_i u_i u_i^T / (u_i . s_i), built
from the last ``memory`` pairs (s_i, y_i = change of gradient along s_i), with
u_i = y_i - B_{i-1} s_i. A pair whose |u_i . s_i| < r ||s_i|| ||u_i|| is skipped (the SR1
safeguard). SR1 may be indefinite, which the trust-region subproblem handles. Pure torch;
identical on every rank when fed averaged gradients. With ``dot`` (a global dot product
of distributed vectors) the vectors may be this rank's parts; then ``update`` and ``mv``
are collective as ``dot`` is."""
from __future__ import annotations

import torch

__all__ = ["LSR1"]


class LSR1:
    def __init__(self, memory: int = 5, r: float = 1e-8, dot=None):
        self.memory, self.r = memory, r
        self.dot = dot or (lambda a, b: float(a @ b))
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.gamma = 1.0
        self._terms: list[tuple[torch.Tensor, float]] = []

    def update(self, s: torch.Tensor, y: torch.Tensor) -> None:
        dot = self.dot
        sy = dot(s, y)
        if sy > 0:
            self.gamma = dot(y, y) / sy  # scale of the latest curvature seen
        self.pairs = (self.pairs + [(s.clone(), y.clone())])[-self.memory:]
        self._rebuild()

    def restore(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], gamma: float) -> None:
        """Sets the memory as ``update`` left it (pairs oldest first, and gamma), for a
        resumed run."""
        self.pairs, self.gamma = [(s.clone(), y.clone()) for s, y in pairs], gamma
        self._rebuild()

    def _rebuild(self) -> None:
        dot = self.dot
        self._terms = []
        for si, yi in self.pairs:
            u = yi - self.mv(si)
            d = dot(u, si)
            if abs(d) >= self.r * (dot(si, si) * dot(u, u)) ** 0.5 and d != 0.0:
                self._terms.append((u, d))

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        out = self.gamma * v
        for u, d in self._terms:
            out = out + (self.dot(u, v) / d) * u
        return out
