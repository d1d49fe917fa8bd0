"""What an evaluation costs, measured: the price list behind every work figure.

Work is counted in *fine-gradient equivalents*: one unit is one plain gradient (forward and
backward pass) of the full network over the whole training set, which is what a first-order
method pays per epoch. Second-order and multilevel methods also pay for curvature products,
gradients that keep their graph for Hessian products, loss-only evaluations and evaluations
on coarser networks, and none of those costs one gradient: measured here, a Hessian-vector
product costs 1.6-2x a gradient, a Gauss-Newton product more, a loss-only evaluation about a
quarter, and a coarse level with half the blocks far more than half when a wide opening
layer is shared by all levels. So each kind on each level is priced by timing it at
start-up on the rank's first batch, relative to the finest level's plain gradient on that
batch (``time_levels``: a warm-up, then interleaved rounds, the median of per-round
ratios). The ranks average their prices, so every rank reports the same work and stops a
work budget at the same step.

With ``run.costs = "unit"`` every evaluation is priced 1 on every level (counts, not cost:
reproducible to the bit, for tests and for comparing counts).

Timing is collective on the network's axes as its forward pass is (the layer axis for a
layer-parallel network); averaging is collective on the communicators given.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from mltrain.linalg.curvature import Curvature

__all__ = ["KINDS", "Prices", "time_levels", "measure", "price"]

# gradient: plain (no graph kept); graph_gradient: keeps the graph for Hessian products;
# product: one curvature product (Hessian or Gauss-Newton); loss: a forward pass only.
KINDS = ("gradient", "graph_gradient", "product", "loss")


@dataclass
class Prices:
    """``prices[l][kind]``: one evaluation of ``kind`` on level ``l`` over a batch, in plain
    gradients of level 0 over the same batch. Not collective."""

    levels: list[dict[str, float]]
    measured: bool = False

    @classmethod
    def unit(cls, levels: int = 1) -> "Prices":
        return cls([{k: 1.0 for k in KINDS} for _ in range(levels)])

    def work(self, samples: list[dict[str, float]], num_train: int) -> float:
        """Fine-gradient equivalents of ``samples[l][kind]`` (global samples evaluated by
        each kind on each level)."""
        return sum(p[k] * s.get(k, 0.0) for p, s in zip(self.levels, samples)
                   for k in KINDS) / num_train

    def as_dict(self) -> dict:
        return {"measured": self.measured,
                "levels": [{k: round(v, 4) for k, v in p.items()} for p in self.levels]}


def _seconds(fn, device: torch.device) -> float:
    """Wall time of one call of ``fn``; on a GPU the call is waited for (kernels are queued
    asynchronously, so the clock would otherwise stop at the launch)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def _evaluations(model: torch.nn.Module, loss_fn, x, y, curvature: str,
                 params: list | None) -> dict:
    """The kinds of evaluation a level pays for, as callables: a plain gradient, one keeping
    its graph (``hessian`` only), a curvature product (``hessian`` or ``ggn``), a loss-only
    forward. None of them changes a parameter, a gradient or the random state. With a
    curvature product it evaluates the gradient whose graph the products use, once, here
    (collective on the layer axis as the forward pass is; otherwise not collective)."""
    def plain():
        Curvature(model, loss_fn, x, y, "lsr1", params).loss_and_grad()

    def loss():
        with torch.no_grad():
            float(loss_fn(model(x), y))

    out = {"gradient": plain, "loss": loss}
    # Only Hessian products keep the graph; the other kinds never charge it (and a
    # layer-parallel network has no double backward through MGRIT).
    if curvature == "hessian":
        out["graph_gradient"] = lambda: Curvature(model, loss_fn, x, y, "hessian",
                                                  params).loss_and_grad()
    if curvature in ("hessian", "ggn"):
        curv = Curvature(model, loss_fn, x, y, curvature, params)
        curv.loss_and_grad()
        n = sum(p.numel() for p in curv.params)
        first = curv.params[0]
        # any direction: the cost does not depend on it
        v = torch.full((n,), 1e-3, dtype=first.dtype, device=first.device)
        out["product"] = lambda: curv.mv(v)
    return out


def time_levels(levels: list[tuple], loss_fn, x: torch.Tensor, y: torch.Tensor,
                rounds: int = 15, interleaved: bool = True) -> list[dict[str, float]]:
    """Each kind of evaluation of each level, ``levels[l] = (model, curvature, params)``,
    on (x, y), in plain gradients of level 0 (so level 0's ``gradient`` is 1): one untimed
    warm-up of every evaluation, then ``rounds`` timed rounds.

    ``interleaved`` (the default): every round times every evaluation once, and each
    evaluation's price is the median over the rounds of its time over the same round's
    level-0 gradient. A slow spell (another process, a frequency change) then slows the
    numerator and the denominator alike: over 12 start-ups on the 2-core development
    machine the prices of a 3-level RMTR spread by 7-10% (max - min over median) with 15
    rounds, against 22-45% timing each kind in a block of 3 and dividing medians
    (``interleaved=False``, close to the protocol before 2026-12-04; ``mltrain bench
    prices``). Every level's curvature graph (Hessian or Gauss-Newton) stays alive for
    the whole timing, so the start-up peak memory holds all of them at once.
    A graph-keeping gradient is priced as a plain one unless the curvature is
    ``hessian``, and an L-SR1 product 0 (vector operations, no pass over data).

    Not collective on the data axis; collective on the layer axis as the forward pass of
    a layer-parallel network is (every rank of it runs the same evaluations in the same
    order)."""
    device = x.device
    evals = [_evaluations(m, loss_fn, x, y, curvature, params)
             for m, curvature, params in levels]
    keys = [(lv, k) for lv, ev in enumerate(evals) for k in ev]
    for lv, k in keys:  # warm-up: allocator, kernels, autograd graph caches
        evals[lv][k]()
    if interleaved:
        ratios = {key: [] for key in keys}
        for _ in range(rounds):
            t = {(lv, k): _seconds(evals[lv][k], device) for lv, k in keys}
            for key in keys:
                ratios[key].append(t[key] / t[0, "gradient"])
        price = {key: statistics.median(v) for key, v in ratios.items()}
    else:
        med = {(lv, k): statistics.median(_seconds(evals[lv][k], device)
                                          for _ in range(rounds)) for lv, k in keys}
        price = {key: v / med[0, "gradient"] for key, v in med.items()}
    out = []
    for lv, ev in enumerate(evals):
        p = {k: price[lv, k] for k in ev}
        p.setdefault("graph_gradient", p["gradient"])
        p.setdefault("product", 0.0)
        out.append(p)
    return out


def price(levels: list[tuple], obj, comms=(), rounds: int = 15) -> Prices:
    """The prices of ``levels`` (as ``time_levels``) timed on objective ``obj``'s batch and
    averaged over ``comms`` (``measure``): what every optimizer's ``measure_costs`` does.
    Collective on each of ``comms`` (and the layer axis, as ``time_levels``)."""
    return measure(time_levels(levels, obj.loss_fn, obj.x, obj.y, rounds), comms)


def measure(times: list[dict[str, float]], comms=()) -> Prices:
    """Prices from the times ``times[l][kind]`` of each level (seconds, or already relative
    as ``time_levels`` gives them), relative to level 0's plain gradient, averaged over
    each communicator of ``comms`` in turn (so every rank of their product holds the same
    prices). Collective on each of ``comms``."""
    from mltrain.comm import mean_

    unit = times[0]["gradient"]
    flat = torch.tensor([t[k] / unit for t in times for k in KINDS],
                        dtype=torch.float64)  # host: ratios of host clock times, for MPI
    for comm in comms:
        if comm is not None:
            mean_(flat, comm)
    n = len(KINDS)
    return Prices([dict(zip(KINDS, flat[i * n:(i + 1) * n].tolist()))
                   for i in range(len(times))], measured=True)
