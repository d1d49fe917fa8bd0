"""A work model of layer-parallel MGRIT: step evaluations per rank and level, and the
critical path of one forward + backward pass, from which the speedup over serial
propagation is predicted for any rank count. Pure arithmetic; not collective.

Per V-cycle on level l with n_l local steps (n_{l+1} = n_l / cf): F-relaxation evaluates
the n_l - n_l/cf F-points (FCF adds n_l/cf C-points and another F sweep), the C-point
residual n_l/cf steps, the coarse right-hand side n_{l+1} coarse steps, then after the
coarse correction another F-relaxation. The coarsest level is an exact solve that runs
through the ranks one after another, so its n_{L-1} steps count P times on the critical
path. The first cycle skips the down-cycle relaxation (``skip``); a residual norm follows
each cycle and serves the next cycle's restriction; a cycle after the first does not repeat
the F-relaxation that ended the one before. One level is the sequential solve.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["counts", "Costs", "predict"]


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
        f = m - m // cf
        if not (first and skip):
            ev[level] += (0 if relaxed else f) + ((m // cf + f) if relax == "FCF" else 0)
        if not (relaxed and relax == "F"):
            ev[level] += m // cf  # C-point residual (otherwise the norm's, reused)
        ev[level + 1] += m // cf  # coarse right-hand side
        cycle(level + 1, m // cf, first)
        ev[level] += f  # F-relaxation after the correction

    for it in range(iters):
        cycle(0, n, it == 0, relaxed=it > 0)
        ev[0] += n // cf  # the residual norm
    return ev


@dataclass
class Costs:
    """Measured unit costs (seconds): a forward step, a vector-Jacobian product with
    respect to the state, one with respect to the parameters, a serial autograd backward
    of one layer, one neighbour message of a state, the broadcast of a state."""
    step: float
    vjp: float
    vjp_params: float
    serial_backward: float
    message: float
    broadcast: float


def predict(N: int, P: int, levels: int, cf: int, iters: int, bwd_iters: int,
            costs: Costs, relax: str = "F", skip: bool = True) -> dict:
    """Predicted serial and layer-parallel forward+backward times and their ratio for
    ``N`` layers on ``P`` ranks (the busiest rank: ceil of the balanced split)."""
    unit = cf ** (levels - 1)
    n = -(-(N // unit) // P) * unit  # the busiest rank's steps

    def path(ev: list[int], unit_cost: float, iters_: int) -> float:
        # Parallel levels count once; the coarsest solve passes through all P ranks.
        coarse = ev[-1] * P if P > 1 else ev[-1]
        msgs = (iters_ * (2 * levels + 1) if levels > 1 else 1) if P > 1 else 0
        return (sum(ev[:-1]) + coarse) * unit_cost + msgs * costs.message

    fwd = path(counts(n, levels, cf, iters, relax, skip), costs.step, iters)
    bev = counts(n, levels, cf, bwd_iters, relax, skip)
    graphs = sum(n // cf ** lv for lv in range(levels))  # forward graphs for the vjps
    bwd = (path(bev, costs.vjp, bwd_iters) + graphs * costs.step + n * costs.vjp_params)
    if P > 1:
        bwd += costs.broadcast
        fwd += costs.broadcast
    serial = N * (costs.step + costs.serial_backward)
    return {"serial_s": serial, "parallel_s": fwd + bwd, "speedup": serial / (fwd + bwd)}
