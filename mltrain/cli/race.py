"""What ``bench tr`` and ``bench multilevel`` share: train one configuration until it has
spent a budget of work (or reached a target loss), recording the curve; and the plot of
such curves. Collective on the trainer's communicator."""
from __future__ import annotations

import math
import time

from mltrain.train import Trainer

__all__ = ["race", "plot"]


def race(cfg, comm, budget: float, points: int, target: float = -math.inf,
         resolution: float = 0.01, target_acc: float | None = None,
         probes: frozenset[int] = frozenset(), milestones: tuple[float, ...] = ()) -> dict:
    """Trains ``cfg`` until ``budget`` fine-gradient equivalents are spent or the training
    loss over the whole training set reaches ``target`` (and, with ``target_acc``, the test
    accuracy that); returns the curve (work, wall time without evaluation, steps, training
    loss, test accuracy at ``points`` evenly spaced marks of work, and where a target was
    reached), its last point, and the work, wall time and steps to each target.

    The target is checked after every step whose work exceeds the last check's by the
    fraction ``resolution`` (so the work to the target is known to that relative
    resolution, and an expensive second-order step is always checked); checks are
    evaluations outside the optimizer, neither charged as work nor timed. The curve also
    holds a point after each step count in ``probes`` (an equal-steps comparison). The work
    to each loss of ``milestones`` (losses above ``target``, met on the way to it) is
    known at the same checks and resolution: ``work_to_milestones``, None where missed.
    A target first met by the step that took the work past ``budget`` counts as missed."""
    from mpi4py import MPI

    t = Trainer(cfg, comm, quiet=True, metrics=False, serve=False)
    if t.hierarchy is not None and not cfg.multilevel.nested_steps:
        # Nested iteration: equal steps per level, as many as spend the budget in all.
        per_step = cfg.data.batch_size / t.dataset.num_train
        t.total_steps = t.hierarchy.levels * math.ceil(
            budget / (per_step * sum(t.phases.cost)))
    ev = t.evaluate()
    curve = [{"work": 0.0, "wall_s": 0.0, "step": 0, "train_loss": ev["train_loss"],
              "test_accuracy": ev["test_accuracy"]}]
    wall, mark, hit, acc_hit, checked = 0.0, budget / points, None, None, 0.0
    checking = math.isfinite(target) or target_acc is not None or bool(milestones)
    passed: list[float | None] = [None] * len(milestones)
    if target_acc is None:
        acc_hit = {}  # nothing to reach

    while (t.work() < budget and t.step < t.total_steps
           and (hit is None or acc_hit is None)):
        t0 = time.perf_counter()
        t.advance()
        wall += time.perf_counter() - t0
        w = t.work()  # priced at the measured costs (mltrain.optim.costs)
        at_mark = (w >= mark or w >= budget or t.step == t.total_steps
                   or t.step in probes)
        if at_mark or (checking and w > checked * (1 + resolution)):
            ev = t.evaluate()
            checked = w
            point = {"work": w, "wall_s": comm.allreduce(wall, op=MPI.MAX), "step": t.step,
                     "train_loss": ev["train_loss"], "test_accuracy": ev["test_accuracy"]}
            new = False
            # A step is atomic, so the last one may end past the budget: what it reaches
            # there is recorded on the curve but not counted as reached.
            paid = w <= budget
            for i, level in enumerate(milestones):
                if paid and passed[i] is None and ev["train_loss"] <= level:
                    passed[i], new = w, True  # on the curve, as a target's hit
            if paid and hit is None and ev["train_loss"] <= target:
                hit, new = point, True
            if paid and acc_hit is None and ev["test_accuracy"] >= target_acc:
                acc_hit, new = point, True
            if at_mark or new:
                curve.append(point)
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
                "wall_to_target": hit["wall_s"] if hit else None,
                "steps_to_target": hit["step"] if hit else None,
                "work_to_acc": acc_hit.get("work") if acc_hit else None,
                "steps_to_acc": acc_hit.get("step") if acc_hit else None,
                "work_to_milestones": passed,
                "level_steps": t.level_steps})
    rep = t.method.report(t.dataset.num_train)
    row.update({k: rep[k] for k in ("accepted_steps", "rejected_steps", "coarse_corrections",
                                    "line_search") if k in rep})
    t.close()
    return row


def plot(res: dict, path: str, work_label: str = "gradient equivalents") -> None:
    """Training loss against work and wall time, test accuracy against work, one line per
    method; the target loss dashed when ``res`` has one."""
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
    if res.get("target") is not None:
        for ax in axes[:2]:
            ax.axhline(res["target"], color="k", lw=0.8, ls="--")
    axes[0].set(xlabel=work_label, ylabel="training loss", yscale="log")
    axes[1].set(xlabel="wall time [s]", ylabel="training loss", yscale="log")
    axes[2].set(xlabel=work_label, ylabel="test accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{res['dataset']}, {res['model']}, {res['ranks']} rank(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
