"""``mltrain bench prices``: how reproducible the start-up prices behind every work figure
are (``mltrain.optim.costs``). What the run's optimizer prices (``price_levels``: every
level of RMTR or MG/OPT, the one network otherwise) is priced ``reps`` times on each rank's
first batch, as a run does at start-up, under two protocols:

- ``blocks``: each kind timed in a block of 3 calls, the median of each block divided by
  the median of level 0's gradient block (the protocol before 2026-12-04, except that
  every evaluation is warmed up first, where it warmed each kind just before its block);
- ``interleaved``: 15 rounds, every evaluation once per round, the median over rounds of
  each evaluation's time over the same round's level-0 gradient (the current protocol).

Per price (level, kind) the median over the repetitions and the spread (max - min) /
median; the table's last line gives each protocol's worst spread and their ratio.

A price is per sample: an evaluation on f times the first batch is charged f times its
price. ``batch scaling`` tests that against the clock: level 0's plain gradient on the
first batch repeated f times (``FACTORS``), timed in interleaved rounds on the slowest
rank (``mltrain.cli.timing.interleaved_medians``), and per factor the charge over the
time, f t(1) / t(f) (1 where time is linear in the batch; above 1 where a larger batch
costs less per sample than the priced one, as it does while per-layer overhead
dominates).

Measured prices are averaged over the ranks, as in a run. Collective on the
world communicator."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mltrain.config import load_config, model_label
from mltrain.cli.timing import interleaved_medians
from mltrain.linalg.curvature import Curvature
from mltrain.optim.costs import KINDS, measure, time_levels

__all__ = ["PROTOCOLS", "FACTORS", "bench_prices", "markdown"]

PROTOCOLS = {"blocks": (3, False), "interleaved": (15, True)}
FACTORS = (1, 4, 16, 64)  # batch scaling: multiples of the first batch


def bench_prices(config, overrides: list[str], comm, reps: int = 12) -> dict:
    """See the module docstring. Collective on ``comm``."""
    from mltrain.train import Trainer

    cfg = load_config(config, overrides)
    t = Trainer(cfg, comm, quiet=True, metrics=False, serve=False)
    try:
        return _measure(t, cfg, comm, reps)
    finally:
        t.close()


def _measure(t, cfg, comm, reps: int) -> dict:
    """``bench_prices`` on trainer ``t``. Collective on ``comm``."""
    st = getattr(t.method, "state", None)
    model = getattr(t.method, "model", t.model)  # a second-order method's (layer-parallel) net
    # What the run's optimizer prices at start-up; a first-order one pays plain gradients.
    levels = st.price_levels(model) if hasattr(st, "price_levels") else [(model, "lsr1", None)]
    x, y = t.loader.batch(0, 0)
    out = {"model": model_label(cfg.model),
           "levels": len(levels), "batch": len(x), "ranks": comm.Get_size(), "reps": reps,
           "protocols": {}}
    for name, (rounds, interleaved) in PROTOCOLS.items():
        runs = np.array([[p[k] for p in measure(time_levels(levels, F.cross_entropy, x, y,
                                                             rounds, interleaved),
                                                (comm,)).levels for k in KINDS]
                         for _ in range(reps)])
        med = np.median(runs, axis=0)
        priced = med > 0  # the level-0 gradient is 1 by definition; L-SR1 products are 0
        priced[0] = False
        spread = np.zeros_like(med)
        spread[priced] = (runs.max(0) - runs.min(0))[priced] / med[priced]
        out["protocols"][name] = {"rounds": rounds, "interleaved": interleaved,
                                  "median": med.tolist(), "spread": spread.tolist(),
                                  "worst_spread": float(spread.max())}
    out["batch_scaling"] = _scaling(levels[0], x, y, comm)
    blocks, inter = (out["protocols"][k]["worst_spread"] for k in PROTOCOLS)
    out["spread_ratio"] = blocks / inter if inter > 0 else None
    out["prices"] = [f"level {lv} {k}" for lv in range(len(levels)) for k in KINDS]
    return out


def _scaling(level, x, y, comm, rounds: int = 15) -> list[dict]:
    """Level 0's plain gradient on ``x`` repeated f times for each f of ``FACTORS``: the
    median over interleaved rounds of its seconds on the slowest rank and the charge
    over the time, f t(1) / t(f). Collective on ``comm`` (and on the network's axes, as
    its forward pass is)."""
    model, _, params = level

    def grad(f):
        xb, yb = torch.cat([x] * f), torch.cat([y] * f)

        def step():
            Curvature(model, F.cross_entropy, xb, yb, "lsr1", params).loss_and_grad()
            if xb.device.type == "cuda":  # kernels are queued: wait for them
                torch.cuda.synchronize(xb.device)
        return step

    med = interleaved_medians(comm, {f: grad(f) for f in FACTORS}, 1, rounds)
    return [{"factor": f, "samples": f * len(x), "seconds": med[f],
             "charged_over_time": f * med[1] / med[f]} for f in FACTORS]


def markdown(res: dict) -> str:
    """The table: per price, the median and spread of each protocol. Not collective."""
    names = list(res["protocols"])
    lines = [f"bench prices: {res['model']}, {res['levels']} level(s), batch {res['batch']} "
             f"per rank, {res['ranks']} rank(s), {res['reps']} start-ups per protocol",
             "", "| price | " + " | ".join(f"{n} median | {n} spread" for n in names) + " |",
             "|---|" + "---|---|" * len(names)]
    for i, label in enumerate(res["prices"]):
        cells = []
        for n in names:
            p = res["protocols"][n]
            cells += [f"{p['median'][i]:.3f}", f"{100 * p['spread'][i]:.0f}%"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ratio = res["spread_ratio"]
    lines += ["", "worst spread: " + ", ".join(
        f"{n} {100 * res['protocols'][n]['worst_spread']:.0f}%" for n in names)
        + (f"; blocks / interleaved = {ratio:.3g}x" if ratio else "")]
    lines += ["", "batch scaling (level 0 gradient on f x the first batch; charged / time = "
              "f t(1) / t(f), 1 if time were linear in the batch):", "",
              "| f | samples per rank | ms | charged / time |", "|---|---|---|---|"]
    lines += [f"| {b['factor']} | {b['samples']} | {1e3 * b['seconds']:.2f} | "
              f"{b['charged_over_time']:.2f} |" for b in res["batch_scaling"]]
    return "\n".join(lines)
