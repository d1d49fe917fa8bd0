"""``mltrain bench multilevel``: single-level against multilevel training of one deep
residual network, by work and wall time to a target training loss.

Every method trains the same network from the same initial weights until it has spent
``budget`` fine-gradient equivalents (samples through a gradient or a curvature product on
level l, times level l's cost relative to the full network, divided by the training-set
size; a loss-only evaluation counts one half) or has reached ``target`` training loss over
the whole training set (checked at ``points`` evenly spaced marks of work). Nested
iteration is scored on the network it is training at the time; when it stops on a coarse
level the row also holds the loss and accuracy of the full-depth network prolonged from it. Methods: SGD,
Adam, single-level trust region, RMTR with 2 and 3 levels (the same trust-region settings
on every level), MG/OPT (Adam smoother) and nested iteration (Adam). Collective on the
world communicator.
"""
from __future__ import annotations

import math
import time

from mltrain.config import load_config
from mltrain.train import Trainer

__all__ = ["METHODS", "bench_multilevel", "plot"]


def methods(curvature: str) -> list[tuple[str, list[str]]]:
    tr = ["optim.name=tr", f"optim.curvature={curvature}"]
    return [
        ("sgd", ["optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9"]),
        ("adam", ["optim.name=adam", "optim.lr=0.003"]),
        ("tr", tr),
        ("rmtr-2", ["optim.name=rmtr", "optim.levels=2", f"optim.curvature={curvature}"]),
        ("rmtr-3", ["optim.name=rmtr", "optim.levels=3", f"optim.curvature={curvature}"]),
        ("mgopt-3", ["optim.name=mgopt", "optim.levels=3", "optim.smoother=adam",
                     "optim.lr=0.003"]),
        ("nested-3", ["optim.name=adam", "optim.lr=0.003", "optim.nested=true",
                      "optim.levels=3"]),
    ]


METHODS = [name for name, _ in methods("ggn")]


def _work(t: Trainer) -> float:
    """Fine-gradient equivalents so far, loss-only evaluations at one half."""
    w = t.work()
    if hasattr(t.optimizer, "report"):
        cost = t.hierarchy.cost[t.phase] if t.hierarchy is not None else 1.0
        w += 0.5 * t.optimizer.report(t.dataset.num_train)["loss_evals"] * cost
    return w


def _race(cfg, comm, budget: float, points: int, target: float) -> dict:
    from mpi4py import MPI

    t = Trainer(cfg, comm, quiet=True, metrics=False)
    if t.hierarchy is not None:
        # Nested iteration: equal steps per level, as many as spend the budget in all.
        per_step = cfg.data.batch_size / t.dataset.num_train
        t.total_steps = t.hierarchy.levels * math.ceil(
            budget / (per_step * sum(t.hierarchy.cost)))
    ev = t.evaluate()
    curve = [{"work": 0.0, "wall_s": 0.0, "train_loss": ev["train_loss"],
              "test_accuracy": ev["test_accuracy"]}]
    wall, mark, hit = 0.0, budget / points, None
    while _work(t) < budget and t.step < t.total_steps and hit is None:
        t0 = time.perf_counter()
        t.advance()
        wall += time.perf_counter() - t0
        w = _work(t)
        if w >= mark or w >= budget or t.step == t.total_steps:
            ev = t.evaluate()
            curve.append({"work": w, "wall_s": comm.allreduce(wall, op=MPI.MAX),
                          "train_loss": ev["train_loss"], "test_accuracy": ev["test_accuracy"]})
            if ev["train_loss"] <= target:
                hit = curve[-1]
            while mark <= w:
                mark += budget / points
    row = {}
    if t.phase > 0:  # stopped on a coarse level: what the full-depth network makes of it
        t.finish_phases()
        ev = t.evaluate()
        row = {"full_depth_loss": ev["train_loss"],
               "full_depth_test_accuracy": ev["test_accuracy"]}
    row.update({"steps": t.step, "curve": curve, **curve[-1],
           "work_to_target": hit["work"] if hit else None,
           "wall_to_target": hit["wall_s"] if hit else None, "level_steps": t.level_steps})
    if hasattr(t.optimizer, "report"):
        rep = t.optimizer.report(t.dataset.num_train)
        row.update({k: rep[k] for k in ("accepted_steps", "rejected_steps", "coarse_corrections",
                                        "line_search") if k in rep})
    t.close()
    return row


def bench_multilevel(config: str | None, overrides: list[str], comm, *, budget: float,
                     target: float, points: int = 16, curvature: str = "ggn",
                     only: list[str] | None = None) -> dict:
    results = []
    for name, extra in methods(curvature):
        if only and name not in only:
            continue
        cfg = load_config(config, overrides + extra + ["run.steps=100000000"])
        results.append({"method": name, **_race(cfg, comm, budget, points, target)})
    tr = next((r for r in results if r["method"] == "tr"), None)
    for r in results:
        r["work_ratio_vs_tr"] = (tr["work_to_target"] / r["work_to_target"]
                                 if tr and tr["work_to_target"] and r["work_to_target"]
                                 else None)
    return {"dataset": cfg.data.name, "model": f"{cfg.model.name} width {cfg.model.width} "
            f"depth {cfg.model.depth}", "ranks": comm.Get_size(), "budget": budget,
            "target": target, "curvature": curvature, "batch": cfg.data.batch_size,
            "methods": results}


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for r in res["methods"]:
        c = r["curve"]
        axes[0].plot([p["work"] for p in c], [p["train_loss"] for p in c], marker="o", ms=3,
                     label=r["method"])
        axes[1].plot([p["wall_s"] for p in c], [p["train_loss"] for p in c], marker="o", ms=3)
        axes[2].plot([p["work"] for p in c], [p["test_accuracy"] for p in c], marker="o", ms=3)
    for ax in axes[:2]:
        ax.axhline(res["target"], color="k", lw=0.8, ls="--")
    axes[0].set(xlabel="fine-gradient equivalents", ylabel="training loss", yscale="log")
    axes[1].set(xlabel="wall time [s]", ylabel="training loss", yscale="log")
    axes[2].set(xlabel="fine-gradient equivalents", ylabel="test accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{res['dataset']}, {res['model']}, {res['ranks']} rank(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
