"""Decisions of second-order optimizers (accept/reject, radius growth, boundary, recursion
skips, L-SR1 pair skips, line-search acceptance), each with its margin to its threshold.

Two machines (Intel vs AMD, AVX-512 vs AVX2, another BLAS) round the last bit of a norm or
a loss differently. A decision whose value lies within round-off of its threshold can go
either way there, and every iterate after it differs. So the optimizers record every
decision with its signed relative margin, and exactness tests

1. check that no decision of the reference run lies within ``TIE_BAND`` of its threshold
   (otherwise the test would pass or fail by luck of rounding), and
2. compare the decision sequences of two runs before their iterates, naming the first
   decision that differs and both margins.

The margin is ``(value - threshold) / scale`` where ``scale`` is the size of the operands
whose difference the decision takes (|f| + |f_trial| + |eta predicted| for a reduction
ratio, the bound for a length test), so round-off shows up as about 1e-16 whatever the
problem's units.

Not collective; pure Python (layer 0).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

__all__ = ["TIE_BAND", "BOUND_RTOL", "Decision", "DecisionLog", "first_difference"]

# A decision closer than this (relative) to its threshold is a near tie: different CPUs may
# take it differently. Two float64 runs that round differently drift apart by 1e-16 to
# 1e-10 relative over a test's run (summation order, MGRIT relaxation, L-SR1 steps that
# amplify it; the largest seen is 1.4e-10), and so do the values their decisions compare;
# the band sits three orders above that.
TIE_BAND = 1e-7
# Lengths within this relative distance of a trust-region bound count as on the bound
# (not beyond it). Larger than TIE_BAND, so a step that lands exactly on the bound by
# construction (a Krylov step to the boundary of a ball of radius equal to the bound) is
# decided the same way on every machine, with a margin of about BOUND_RTOL; a step may
# thus leave the bound by at most 1e-6 of it.
BOUND_RTOL = 1e-6


@dataclass(frozen=True)
class Decision:
    kind: str     # accept, grow, boundary, room, kappa, progress, lsr1, armijo, descent
    level: int    # multilevel level (0 = finest); 0 for single-level methods
    taken: bool   # the branch taken (accepted, cut to the boundary, skipped, ...)
    margin: float  # (value - threshold) / scale: positive when the branch is taken

    def __str__(self) -> str:
        return f"{self.kind}@{self.level}={'yes' if self.taken else 'no'} (margin {self.margin:.3g})"


class DecisionLog:
    """The decisions of one optimizer (shared by the levels of a multilevel one).

    Keeps the last ``maxlen`` decisions (tests compare whole short runs; long runs keep a
    bounded tail) and, for the whole run, the closest call: the decision with the smallest
    absolute margin."""

    def __init__(self, maxlen: int = 100_000):
        self.entries: deque[Decision] = deque(maxlen=maxlen)
        self.count = 0
        self.closest: Decision | None = None

    def record(self, kind: str, taken: bool, value: float, threshold: float, scale: float,
               level: int = 0) -> bool:
        """Records a decision ``taken`` made by comparing ``value`` with ``threshold`` (taken
        when value >= threshold, or > for a strict test); returns ``taken`` so that call
        sites read ``if log.record(...)``. A margin whose sign contradicts ``taken`` is a
        bug of the call site (ValueError)."""
        if not (math.isfinite(value) and math.isfinite(threshold)):
            margin = -math.inf if not taken else math.inf  # decided by a non-finite value
        elif scale > 0 and math.isfinite(scale):
            margin = (value - threshold) / scale
            if margin != 0 and (margin > 0) != bool(taken):
                raise ValueError(f"decision {kind}: taken={taken} but {value} vs {threshold}")
        else:
            margin = math.inf if value != threshold else 0.0
        d = Decision(kind, level, bool(taken), margin)
        self.entries.append(d)
        self.count += 1
        if self.closest is None or abs(margin) < abs(self.closest.margin):
            self.closest = d
        return bool(taken)

    def near_ties(self, band: float = TIE_BAND) -> list[tuple[int, Decision]]:
        """(index, decision) of every kept decision within ``band`` of its threshold."""
        return [(i, d) for i, d in enumerate(self.entries) if abs(d.margin) < band]

    def summary(self) -> dict:
        """For run summaries: how many decisions, and the closest call."""
        c = self.closest
        return {"decisions": self.count,
                "closest_decision": None if c is None else
                {"kind": c.kind, "level": c.level, "margin": abs(c.margin)}}


def first_difference(ref: DecisionLog, other: DecisionLog) -> str | None:
    """None if both runs took the same decisions in the same order; else a message naming
    the first decision that differs, with both margins."""
    a, b = list(ref.entries), list(other.entries)
    for i, (x, y) in enumerate(zip(a, b)):
        if (x.kind, x.level, x.taken) != (y.kind, y.level, y.taken):
            return f"decision {i} differs: reference {x}, other {y}"
    if len(a) != len(b):
        return f"the reference took {len(a)} decisions, the other {len(b)}"
    return None
