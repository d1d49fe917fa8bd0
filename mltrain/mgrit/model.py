"""A work model of layer-parallel MGRIT: step evaluations per rank and level, and the
critical path of one forward + backward pass, from which the speedup over serial
propagation is predicted for any rank count. Pure arithmetic; not collective.

Per V-cycle on level l with n_l local steps (n_{l+1} = n_l / cf): F-relaxation evaluates
n_l steps (FCF adds n_l/cf C-points and another F sweep), the coarse right-hand side
n_{l+1} coarse steps, then after the coarse correction another F-relaxation. The coarsest level is an exact solve that runs
through the ranks one after another, so its n_{L-1} steps count P times on the critical
path. With ``skip`` the first cycle does no work on the way down (the coarse problems are
the plain coarse discretisations). Each F-relaxation also takes the step into every
C-point, which gives the C-point residual: the norm after a cycle and the next cycle's
restriction use it, and a cycle after the first does not repeat the F-relaxation that ended
the one before. One level is the sequential solve.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["bookkeeping", "counts", "Costs", "messages", "predict", "waits"]


def counts(n: int, levels: int, cf: int, iters: int, relax: str = "F",
           skip: bool = True) -> list[int]:
    """Step evaluations per level of one MGRIT solve on a rank with ``n`` local steps
    (what ``MGRITSolver.evaluations`` records)."""
    ev = [0] * levels
    if levels == 1:
        ev[0] = n
        return ev

    def cycle(level: int, m: int, first: bool, relaxed: bool = False) -> None:
        if level == levels - 1:
            ev[level] += m
            return
        if first and skip:
            cycle(level + 1, m // cf, True)
        else:
            # An F-relaxation takes m steps: the F-points, and at each interval's end the
            # step that gives the C-point residual.
            if not relaxed:
                ev[level] += m
            if relax == "FCF":
                ev[level] += m // cf + m
            ev[level + 1] += m // cf  # coarse right-hand side
            cycle(level + 1, m // cf, False)
        ev[level] += m  # F-relaxation after the correction

    for it in range(iters):
        cycle(0, n, it == 0, relaxed=it > 0)
    return ev


@dataclass
class Costs:
    """Measured unit costs (seconds) of what the solver does per step: a fine step, a
    coarse step (re-discretised, plus its right-hand side), a vector-Jacobian product on
    the fine and on a coarse level, a step recorded for autograd, one step of an autograd
    pass through a recorded chain; a serial forward and backward step; one neighbour
    message and one broadcast of a state."""
    step: float
    step_coarse: float
    vjp: float
    vjp_coarse: float
    record: float
    chain_backward: float
    serial_forward: float
    serial_backward: float
    message: float
    broadcast: float
    op: float = 0.0  # one elementwise operation (or clone) on a state
    # What an adjoint product needs at a forward state, once per step and solve: a step
    # recorded for autograd, or the block's fast-path linearisation (None: as ``record``).
    linearize: float | None = None
    # Seconds per forward + backward pass beyond its steps: the solver's set-up, cycle
    # control and hand-over to autograd, a part fixed and a part per local step.
    overhead: float = 0.0
    overhead_step: float = 0.0


def bookkeeping(n: int, levels: int, cf: int, iters: int, skip: bool = True) -> int:
    """Elementwise operations on states besides the steps, per solve: per cycle and
    non-coarsest level with m points, for each of its m/cf C-points the residual (1), the
    coarse right-hand side (2), the correction (2) and the norm's share (1); a skipped first
    cycle only takes the residual (1)."""
    if levels == 1:
        return 0
    points = sum(n // cf ** lv // cf for lv in range(levels - 1))
    skipped = 1 if skip and iters else 0
    return skipped * points + (iters - skipped) * 6 * points


def messages(P: int, levels: int, iters: int) -> int:
    """Neighbour messages on a rank's critical path in one MGRIT solve on ``P`` ranks: one
    per level and direction of each V-cycle (2 levels - 1), one for the sequential solve of
    one level; none on one rank."""
    if P == 1:
        return 0
    return iters * (2 * levels - 1) if levels > 1 else 1


def waits(P: int, levels: int, iters: int, bwd_iters: int) -> int:
    """The times one forward and backward pass waits for a neighbour's just-produced
    state: the messages of both solves and the two broadcasts of the final state and of
    the input's gradient (none on one rank)."""
    if P == 1:
        return 0
    return messages(P, levels, iters) + messages(P, levels, bwd_iters) + 2


def predict(N: int, P: int, levels: int, cf: int, iters: int, bwd_iters: int,
            costs: Costs, relax: str = "F", skip: bool = True) -> dict:
    """Predicted serial and layer-parallel forward+backward times and their ratio for
    ``N`` layers on ``P`` ranks (the busiest rank: ceil of the balanced split).

    Forward: the step counts (the coarsest level's P times); the final F-relaxation
    records each interval as one autograd chain, its cf-th step too. Backward: the
    adjoint's vector-Jacobian products likewise, the forward graphs (or fast-path
    linearisations) they need, and, in
    place of its final F-relaxation, one autograd pass through every local step. One
    level: the recorded forward and one autograd pass, through the ranks in turn. Plus
    the bookkeeping operations, a message per relaxation, the two broadcasts and the
    fixed overhead of a pass."""
    unit = cf ** (levels - 1)
    n = -(-(N // unit) // P) * unit  # the busiest rank's steps

    def time(ev: list[int], fine: float, coarse: float) -> float:
        path = list(ev)
        path[-1] *= P  # the coarsest solve passes through all ranks
        return path[0] * fine + sum(path[1:]) * coarse

    def msgs(iters_: int) -> float:
        return messages(P, levels, iters_) * costs.message

    serial = N * (costs.serial_forward + costs.serial_backward)
    if levels == 1:
        fwd = P * n * costs.record + msgs(1)
        bwd = P * n * costs.chain_backward + msgs(1)
    else:
        fev = counts(n, levels, cf, iters, relax, skip)
        fev[0] -= n  # the final F-relaxation: recorded chains
        fwd = (time(fev, costs.step, costs.step_coarse) + n * costs.record + msgs(iters)
               + bookkeeping(n, levels, cf, iters, skip) * costs.op)
        bev = counts(n, levels, cf, bwd_iters, relax, skip)
        bev[0] -= n  # the final F-relaxation: one autograd pass
        # Linearisations: every coarse step's; the fine level's unless the only cycle is
        # a skipped one (its fine sweep is the recorded final pass).
        graphs = (0 if bwd_iters == 1 and skip else n) + sum(n // cf ** lv
                                                             for lv in range(1, levels))
        lin = costs.record if costs.linearize is None else costs.linearize
        bwd = (time(bev, costs.vjp, costs.vjp_coarse) + graphs * lin
               + n * costs.chain_backward + msgs(bwd_iters)
               + bookkeeping(n, levels, cf, bwd_iters, skip) * costs.op)
    if P > 1:
        fwd += costs.broadcast
        bwd += costs.broadcast
    bwd += costs.overhead + n * costs.overhead_step
    return {"serial_s": serial, "parallel_s": fwd + bwd, "speedup": serial / (fwd + bwd)}
