"""Pure-torch references of the linear-algebra operations that run on PETSc, used by the
tests as the oracle and by mltrain when PETSc is not installed (``has_petsc``)."""
from __future__ import annotations

import math

import torch

__all__ = ["steihaug_cg"]


def steihaug_cg(op, g: torch.Tensor, radius: float, max_it: int = 50, rtol: float = 1e-6):
    """Steihaug-Toint truncated CG for min g.s + 1/2 s.Hs, ||s|| <= radius (``op(v)`` = Hv).

    Returns (s, predicted reduction -m(s), reason): "converged", "boundary" (a step hit the
    radius), "negative_curvature" (followed to the boundary) or "max_it". Not collective.
    """
    s = torch.zeros_like(g)
    r = -g.clone()  # residual of H s = -g
    d = r.clone()
    rr = float(r @ r)
    stop = rtol * math.sqrt(rr)
    reason = "max_it"

    def to_boundary(s, d):
        # tau >= 0 with ||s + tau d|| = radius
        a, b, c = float(d @ d), 2 * float(s @ d), float(s @ s) - radius**2
        return (-b + math.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a)

    for _ in range(max_it):
        if math.sqrt(rr) <= stop:
            reason = "converged"
            break
        hd = op(d)
        dhd = float(d @ hd)
        if dhd <= 0:
            s = s + to_boundary(s, d) * d
            reason = "negative_curvature"
            break
        alpha = rr / dhd
        if float((s + alpha * d).norm()) >= radius:
            s = s + to_boundary(s, d) * d
            reason = "boundary"
            break
        s = s + alpha * d
        r = r - alpha * hd
        rr_new = float(r @ r)
        d = r + (rr_new / rr) * d
        rr = rr_new
    model = float(g @ s) + 0.5 * float(s @ op(s))
    return s, -model, reason
