"""What a search leaves behind: results.csv (one row per job), best.toml (ready for
``mltrain train --config``) and three plots. Written by world rank 0 only; not
collective."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

__all__ = ["write_results", "write_plots", "summarize", "best_record", "best_so_far"]

COLUMNS = ["job", "trial", "group", "status", "start", "stop", "spent", "score",
           "train_loss", "train_accuracy", "test_accuracy", "wall_s", "info"]


def _done(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("result") is not None]


def best_record(records: list[dict]) -> dict | None:
    """The best finished job among those trained the furthest (a trial that reached the
    full resource beats one stopped at a low rung), then by score, then the earliest."""
    ok = [r for r in _done(records) if r["result"].get("score") is not None]
    if not ok:
        return None
    return min(ok, key=lambda r: (-r["job"]["stop"], -r["result"]["score"], r["job"]["id"]))


def best_so_far(records: list[dict], maximize: bool) -> list[tuple[int, float]]:
    """(budget spent, best metric so far) after every result, in the order they came."""
    out, best = [], None
    for r in sorted(_done(records), key=lambda r: r["result"]["spent"]):
        s = r["result"].get("score")
        if s is not None and (best is None or s > best):
            best = s
        if best is not None:
            out.append((r["result"]["spent"], best if maximize else -best))
    return out


def write_results(plan, records: list[dict], out: Path) -> None:
    keys = plan.space.keys
    rows = []
    for r in sorted(_done(records), key=lambda r: r["job"]["id"]):
        job, res = r["job"], r["result"]
        m = res.get("metrics") or {}
        row = {"job": job["id"], "trial": job["trial"], "group": res.get("group"),
               "status": res["status"], "start": job["start"], "stop": job["stop"],
               "spent": res.get("spent"), "score": res.get("score"),
               **{k: m.get(k) for k in ("train_loss", "train_accuracy", "test_accuracy",
                                        "wall_s")},
               "info": json.dumps(job.get("info", {}), sort_keys=True),
               **{k: job["values"].get(k, "") for k in keys},
               "run.seed": job.get("seed") if job.get("seed") is not None else "",
               "message": res.get("message", "")}
        rows.append(row)
    cols = COLUMNS + keys + ["run.seed", "message"]
    tmp = out / ".results.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for row in rows:  # repr keeps floats exact; None as empty
            w.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v)
                        for k, v in row.items()})
    tmp.replace(out / "results.csv")
    best = best_record(records)
    if best is not None:
        from mltrain.config import to_toml

        job = best["job"]
        cfg = plan.trial_config(job["values"], job.get("seed"))
        cfg.checkpoint = type(plan.base.checkpoint)()
        cfg.run.out_dir = plan.base.run.out_dir
        metric = plan.opts.metric
        value = best["result"]["metrics"].get(metric)
        lines = [f"# mltrain search ({plan.algo}): trial {job['trial']}, job {job['id']}, "
                 f"{metric} = {value!r} after {job['stop']} {plan.opts.resource}",
                 "# train it with: mltrain train --config best.toml"]
        if plan.algo == "pbt":
            lines.append("# PBT changed this member's hyperparameters during training: these "
                         "are its last ones, from the weights of trial "
                         f"{job['info'].get('parent')} onwards")
        tmp = out / ".best.toml.tmp"
        tmp.write_text("\n".join(lines) + "\n\n" + to_toml(cfg))
        tmp.replace(out / "best.toml")


def summarize(plan, records: list[dict], used: int) -> dict:
    done = _done(records)
    best = best_record(records)
    curve = best_so_far(records, plan.maximize)
    return {"algo": plan.algo, "budget": plan.budget, "spent": used, "jobs": len(done),
            "trials": len({r["job"]["trial"] for r in done}),
            "failed": sum(r["result"]["status"] != "ok" for r in done),
            "metric": plan.opts.metric,
            "best": None if not curve else curve[-1][1],
            "best_trial": None if best is None else best["job"]["trial"],
            "best_values": None if best is None else best["job"]["values"],
            "best_so_far": curve, "out": str(plan.out)}


def write_plots(plan, records: list[dict], out: Path) -> None:
    """best_so_far.png (the metric against the budget spent), curves.png (every trial's
    training loss against its steps), space.png (the metric against each key)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = _done(records)
    metric = plan.opts.metric
    curve = best_so_far(records, plan.maximize)
    fig, ax = plt.subplots(figsize=(6, 4))
    if curve:
        ax.step([c[0] for c in curve], [c[1] for c in curve], where="post")
    ax.set_xlabel(f"budget spent ({plan.opts.resource})")
    ax.set_ylabel(f"best {metric}")
    ax.set_title(f"{plan.algo}: best so far")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "best_so_far.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    by_trial: dict[int, list] = {}
    for r in sorted(done, key=lambda r: r["job"]["id"]):
        by_trial.setdefault(r["job"]["trial"], []).extend(r["result"].get("curve") or [])
    for t, pts in sorted(by_trial.items()):
        pts = [p for p in pts if p[1] is not None and math.isfinite(p[1])]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.8, alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mini-batch mean)")
    ax.set_yscale("log")
    ax.set_title(f"{plan.algo}: learning curves of {len(by_trial)} trials")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)

    params = plan.space.params
    n = max(len(params), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    top = max((r["job"]["stop"] for r in done), default=0)
    for ax, p in zip(axes.flat, params):
        xs, ys, full = [], [], []
        for r in done:
            v = r["job"]["values"].get(p.key)
            m = (r["result"].get("metrics") or {}).get(metric)
            if v is None or m is None:
                continue
            xs.append(p.values.index(v) if p.kind == "choice" else v)
            ys.append(m)
            full.append(r["job"]["stop"] == top)
        ax.scatter([x for x, f in zip(xs, full) if not f], [y for y, f in zip(ys, full) if not f],
                   s=10, c="0.7", label="stopped early")
        ax.scatter([x for x, f in zip(xs, full) if f], [y for y, f in zip(ys, full) if f],
                   s=14, c="C0", label="full resource")
        if p.kind == "log":
            ax.set_xscale("log")
        if p.kind == "choice":
            ax.set_xticks(range(len(p.values)))
            ax.set_xticklabels([str(v) for v in p.values], rotation=30, fontsize=7)
        ax.set_xlabel(p.key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(params):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "space.png", dpi=110)
    plt.close(fig)
