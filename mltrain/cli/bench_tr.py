"""``mltrain bench tr``: first- and second-order training under the same budget of work.

SGD, Adam and trust region with each curvature model (Hessian, GGN, L-SR1) train the
same model on the same data from the same initial weights until they have spent
``budget`` gradient equivalents of work (samples through a gradient or a curvature product,
divided by the training-set size; a loss-only evaluation counts one half). Training loss
over the whole training set and test accuracy are recorded at ``points`` marks, with wall
time (evaluation excluded). Collective on the world communicator.
"""
from __future__ import annotations

import time

from mltrain.config import load_config
from mltrain.optim.tr import TrustRegion
from mltrain.train import Trainer

METHODS = [
    ("sgd", ["optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9"]),
    ("adam", ["optim.name=adam", "optim.lr=0.003"]),
    ("tr-hessian", ["optim.name=tr", "optim.curvature=hessian"]),
    ("tr-ggn", ["optim.name=tr", "optim.curvature=ggn"]),
    ("tr-lsr1", ["optim.name=tr", "optim.curvature=lsr1"]),
    ("tr-ggn-hybrid", ["optim.name=tr", "optim.curvature=ggn", "optim.batch=hybrid"]),
    ("tr-ggn-full", ["optim.name=tr", "optim.curvature=ggn", "optim.batch=full"]),
]


def work_of(t: Trainer) -> float:
    if isinstance(t.optimizer, TrustRegion):
        c = t.optimizer.counts
        return (c["gradient_samples"] + c["product_samples"] + 0.5 * c["loss_samples"]) \
            / t.dataset.num_train
    return t.step * t.cfg.data.batch_size / t.dataset.num_train


def bench_tr(config: str | None, overrides: list[str], comm, budget: float = 10.0,
             points: int = 10) -> dict:
    results = []
    for name, extra in METHODS:
        cfg = load_config(config, overrides + extra + ["run.steps=100000000"])
        t = Trainer(cfg, comm, quiet=True, metrics=False)
        ev = t.evaluate()
        curve = [{"work": 0.0, "wall_s": 0.0, "train_loss": ev["train_loss"],
                  "test_accuracy": ev["test_accuracy"]}]
        wall, mark = 0.0, budget / points
        while work_of(t) < budget:
            epoch, pos = divmod(t.step, t.steps_per_epoch)
            x, y = t.loader.batch(epoch, pos)
            t0 = time.perf_counter()
            t.train_step(x, y)
            wall += time.perf_counter() - t0
            t.step += 1
            if work_of(t) >= mark or work_of(t) >= budget:
                ev = t.evaluate()
                curve.append({"work": work_of(t), "wall_s": comm.allreduce(wall, op=max_op()),
                              "train_loss": ev["train_loss"],
                              "test_accuracy": ev["test_accuracy"]})
                while mark <= work_of(t):
                    mark += budget / points
        row = {"method": name, "steps": t.step, "curve": curve, **curve[-1]}
        if isinstance(t.optimizer, TrustRegion):
            row.update(accepted=t.optimizer.counts["accepted"],
                       rejected=t.optimizer.counts["rejected"])
        t.close()
        results.append(row)
    return {"dataset": cfg.data.name, "model": f"{cfg.model.name} width {cfg.model.width} "
            f"depth {cfg.model.depth}", "ranks": comm.Get_size(), "budget": budget,
            "methods": results}


def max_op():
    from mpi4py import MPI

    return MPI.MAX


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
    axes[0].set(xlabel="gradient equivalents", ylabel="training loss", yscale="log")
    axes[1].set(xlabel="wall time [s]", ylabel="training loss", yscale="log")
    axes[2].set(xlabel="gradient equivalents", ylabel="test accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{res['dataset']}, {res['model']}, {res['ranks']} rank(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
