"""What an evaluation costs, measured: the price list behind every work figure.

Work is counted in *fine-gradient equivalents*: one unit is one plain gradient (forward and
backward pass) of the full network over the whole training set, which is what a first-order
method pays per epoch. Second-order and multilevel methods also pay for curvature products,
gradients that keep their graph for Hessian products, loss-only evaluations and evaluations
on coarser networks, and none of those costs one gradient: measured here, a Hessian-vector
product costs 1.6-2x a gradient, a Gauss-Newton product more, a loss-only evaluation about a
quarter, and a coarse level with half the blocks far more than half when a wide opening
layer is shared by all levels. So each kind on each level is priced by timing it at
start-up on the rank's first batch (one untimed warm-up, then the median of ``reps`` runs),
relative to the finest level's plain gradient on that batch. The ranks average their
prices, so every rank reports the same work and stops a work budget at the same step.

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

__all__ = ["KINDS", "Prices", "time_level", "measure"]

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


def _median_seconds(fn, reps: int, device: torch.device) -> float:
    """Median wall time of ``fn``; on a GPU each run is waited for (kernels are queued
    asynchronously, so the clock would otherwise stop at the launch)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up: allocator, kernels, autograd graph caches
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_level(model: torch.nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor,
               curvature: str, params: list | None = None, reps: int = 3) -> dict[str, float]:
    """Seconds of each kind of evaluation of ``model`` on (x, y): a plain gradient, one
    keeping its graph (timed for ``hessian`` only), a curvature product of ``curvature``
    (hessian or ggn; 0 for lsr1), a loss-only forward. Changes nothing (no
    parameter, gradient or random state). Collective as the model's forward pass is."""
    def plain():
        Curvature(model, loss_fn, x, y, "lsr1", params).loss_and_grad()

    def graph():
        Curvature(model, loss_fn, x, y, "hessian", params).loss_and_grad()

    def loss():
        with torch.no_grad():
            float(loss_fn(model(x), y))

    device = x.device
    out = {"gradient": _median_seconds(plain, reps, device),
           "loss": _median_seconds(loss, reps, device)}
    # Only Hessian products keep the graph; the other kinds never charge it (and a
    # layer-parallel network has no double backward through MGRIT).
    out["graph_gradient"] = (_median_seconds(graph, reps, device) if curvature == "hessian"
                             else out["gradient"])
    kind = curvature if curvature in ("hessian", "ggn") else None
    if kind is None:
        out["product"] = 0.0  # L-SR1 products are vector operations, no pass over data
    else:
        curv = Curvature(model, loss_fn, x, y, kind, params)
        curv.loss_and_grad()
        n = sum(p.numel() for p in curv.params)
        first = curv.params[0]
        # any direction: the cost does not depend on it
        v = torch.full((n,), 1e-3, dtype=first.dtype, device=first.device)
        out["product"] = _median_seconds(lambda: curv.mv(v), reps, device)
    return out


def measure(times: list[dict[str, float]], comms=()) -> Prices:
    """Prices from the seconds ``times[l][kind]`` of each level, relative to level 0's plain
    gradient, averaged over each communicator of ``comms`` in turn (so every rank of their
    product holds the same prices). Collective on each of ``comms``."""
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
