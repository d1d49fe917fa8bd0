"""Limited-memory SR1 curvature model: B = gamma I + sum_i u_i u_i^T / (u_i . s_i), built
from the last ``memory`` pairs (s_i, y_i = change of gradient along s_i), with
u_i = y_i - B_{i-1} s_i. A pair whose |u_i . s_i| < r ||s_i|| ||u_i|| is skipped (the SR1
safeguard). SR1 may be indefinite, which the trust-region subproblem handles. Pure torch;
identical on every rank when fed averaged gradients. With ``dot`` (a global dot product
of distributed vectors) the vectors may be this rank's parts; then ``update`` and ``mv``
are collective as ``dot`` is. ``decisions`` (a ``DecisionLog``) records both tests (the
positive-curvature test that sets gamma and each pair's safeguard) with their margins."""
from __future__ import annotations

import torch

__all__ = ["LSR1"]


class LSR1:
    def __init__(self, memory: int = 5, r: float = 1e-8, dot=None, decisions=None,
                 level: int = 0):
        self.memory, self.r = memory, r
        self.decisions, self.level = decisions, level
        self.dot = dot or (lambda a, b: float(a @ b))
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.gamma = 1.0
        self._terms: list[tuple[torch.Tensor, float]] = []

    def update(self, s: torch.Tensor, y: torch.Tensor) -> None:
        dot = self.dot
        sy, yy = dot(s, y), dot(y, y)
        if self._decide("curvature", sy > 0, sy, 0.0, (dot(s, s) * yy) ** 0.5):
            self.gamma = yy / sy  # scale of the latest curvature seen
        self.pairs = (self.pairs + [(s.clone(), y.clone())])[-self.memory:]
        self._rebuild(record=True)

    def restore(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], gamma: float) -> None:
        """Sets the memory as ``update`` left it (pairs oldest first, and gamma), for a
        resumed run."""
        self.pairs, self.gamma = [(s.clone(), y.clone()) for s, y in pairs], gamma
        self._rebuild()

    def _decide(self, kind, taken, value, threshold, scale) -> bool:
        if self.decisions is not None:
            self.decisions.record(kind, taken, value, threshold, scale, self.level)
        return taken

    def _rebuild(self, record: bool = False) -> None:
        """Rebuilds the terms from the pairs; ``record``: log the safeguard's decisions
        (not when restoring a checkpoint's memory, which repeats earlier ones)."""
        dot = self.dot
        self._terms = []
        for si, yi in self.pairs:
            u = yi - self.mv(si)
            d = dot(u, si)
            norms = (dot(si, si) * dot(u, u)) ** 0.5
            keep = abs(d) >= self.r * norms and d != 0.0
            if record:
                self._decide("lsr1", keep, abs(d), self.r * norms, norms)
            if keep:
                self._terms.append((u, d))

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        out = self.gamma * v
        for u, d in self._terms:
            out = out + (self.dot(u, v) / d) * u
        return out
