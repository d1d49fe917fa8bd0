"""``mltrain bench ps``: parameter servers against collective and gossip data parallelism,
with and without a straggler, on the data partitions asked for.

Every scheme trains on the same W = P - 1 workers (the same global batch, partition, seed
and number of steps per worker, so every run sees the same number of samples); ``ps``
uses the last rank as its server, the others leave it idle (waiting without holding a
core). One worker can be slowed 2x (``run.straggler``). Per run: the fast workers'
throughput (their own samples over their own time; a scheme that lets them run on keeps
it), the throughput over all workers (every sample over the slowest worker's time), the
test accuracy of the model the run stands for after the last step (the servers'
parameters for ``ps``, the average for the gossip schemes) and, for ``ps``, the staleness
of the applied pushes. The ratios compare each run with the same scheme without the
straggler, and each accuracy with allreduce's in the same setting.
"""
from __future__ import annotations

import tempfile
import time

from mpi4py import MPI

from mltrain.comm import waiting
from mltrain.config import ConfigError, model_label

SCHEMES = {  # label -> config overrides
    "allreduce": ["sync.name=allreduce"],
    "sgp": ["sync.name=sgp"],
    "sgp-async": ["sync.name=sgp", "sync.asynchronous=true"],
    "ps k=0": ["sync.name=ps", "sync.staleness=0"],
    "ps k=4": ["sync.name=ps", "sync.staleness=4"],
    "ps k=-1": ["sync.name=ps", "sync.staleness=-1"],
    # One-sided transport: plain SGD only (run it with --set optim.momentum=0).
    "ps-rma k=-1": ["sync.name=ps", "sync.staleness=-1", "sync.transport=rma"],
}
DEFAULT = [k for k in SCHEMES if "rma" not in k]
PARTITIONS = {"iid": ["data.partition=iid"],
              "dirichlet": ["data.partition=dirichlet", "data.alpha=0.1"]}
FACTOR = 2.0


def check(schemes: list[str], partitions: list[str], ranks: int, steps: int) -> None:
    """Not collective."""
    for items, known, flag in ((schemes, SCHEMES, "--methods"),
                               (partitions, PARTITIONS, "--partitions")):
        unknown = sorted(set(items) - set(known))
        if unknown or not items:
            raise ConfigError(f"{flag}: unknown or empty {', '.join(unknown)} (choose from "
                              f"{', '.join(known)})")
    if ranks < 3:
        raise ConfigError(f"bench ps: needs at least 3 ranks (a server and two workers, one "
                          f"of them the straggler), got {ranks}")
    if steps < 1:
        raise ConfigError(f"--steps: at least 1, got {steps}")


def _idle(comm: MPI.Comm) -> None:
    """Meets every rank of ``comm`` without holding a core while waiting. Collective on
    ``comm``."""
    waiting.wait(comm.Ibarrier())


def _one(base_text: str, overrides: list[str], steps: int, world: MPI.Comm) -> dict | None:
    """One run on the first P - 1 ranks (and the last as ps server); the figures on world
    rank 0 (None elsewhere). Collective on ``world``."""
    from mltrain.config import load_config
    from mltrain.train import Trainer

    P = world.Get_size()
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(base_text)
        f.flush()
        cfg = load_config(f.name, overrides + [f"run.steps={steps}", "run.log_every="
                                               f"{steps}", "run.eval_every=0",
                                               "checkpoint.dir=", "checkpoint.every=0",
                                               "checkpoint.resume=false"])
    ps = cfg.sync.name == "ps"
    group = world if ps else world.Split(0 if world.Get_rank() < P - 1 else MPI.UNDEFINED,
                                         world.Get_rank())
    out = None
    if group != MPI.COMM_NULL:
        t = Trainer(cfg, group, quiet=True, metrics=False)
        if not t.serving:
            t.model.train()
            waiting.wait(t.comm.Ibarrier())
            t0 = time.perf_counter()
            while t.step < t.until:
                t.advance()
            mine = time.perf_counter() - t0
            ev = t.evaluate()  # the servers' parameters (ps), the average (gossip)
            report = t.method.report(t.dataset.num_train)
            times = t.comm.gather(mine, root=0)
            if t.rank == 0:
                W = len(times)
                slow = cfg.run.straggler_spec[0] if cfg.run.straggler_spec else None
                fast = [s for r, s in enumerate(times) if r != slow]
                local = cfg.data.batch_size // W
                out = {"fast_samples_per_s": sum(local * steps / s for s in fast) / len(fast)
                       * W, "samples_per_s": W * local * steps / max(times),
                       "test_accuracy": ev["test_accuracy"], "train_loss": ev["train_loss"],
                       "staleness_mean": report.get("staleness_mean"),
                       "staleness_max": report.get("staleness_max"),
                       "staleness_histogram": report.get("staleness_histogram"),
                       "missed_updates_mean": report.get("missed_updates_mean"),
                       "missed_updates_max": report.get("missed_updates_max")}
        t.close()
        if not ps:
            group.Free()
    _idle(world)
    return out


def bench_ps(cfg, schemes: list[str], partitions: list[str], steps: int,
             comm: MPI.Comm, say=print) -> dict:
    """Every scheme x partition, without and with a 2x straggler (the last worker).
    Returns the rows on rank 0 (None elsewhere). Collective on ``comm``."""
    from mltrain.config import to_toml

    P = comm.Get_size()
    W = P - 1
    base = to_toml(cfg)
    rows = []
    # A discarded run first: allocator, thread pools and MPI connections warm up.
    _one(base, SCHEMES["ps k=0"] + ["parallel.servers=1"], min(steps, 20), comm)
    for part in partitions:
        for label in schemes:
            row = {"partition": part, "scheme": label}
            for tag, straggle in (("", []), ("_straggler", [f"run.straggler={W - 1}:{FACTOR:g}"])):
                r = _one(base, SCHEMES[label] + PARTITIONS[part] + straggle
                         + ["parallel.servers=1"], steps, comm)
                if comm.Get_rank() == 0:
                    row.update({k + tag: v for k, v in r.items()})
            if comm.Get_rank() == 0:
                row["fast_throughput_ratio"] = (row["fast_samples_per_s_straggler"]
                                                / row["fast_samples_per_s"])
                row["throughput_ratio"] = row["samples_per_s_straggler"] / row["samples_per_s"]
                rows.append(row)
                say(f"  {part:<10} {label:<10} fast workers keep {row['fast_throughput_ratio']:.2f}"
                    f"x with the straggler, test acc {row['test_accuracy']:.4f} / "
                    f"{row['test_accuracy_straggler']:.4f}")
    if comm.Get_rank() != 0:
        return None
    for row in rows:
        ref = next(r for r in rows if r["partition"] == row["partition"]
                   and r["scheme"] == "allreduce") if "allreduce" in schemes else None
        for tag in ("", "_straggler"):
            row["accuracy_vs_allreduce" + tag] = (
                row["test_accuracy" + tag] - ref["test_accuracy" + tag] if ref else None)
    return {"ranks": P, "workers": W, "servers": 1, "steps": steps,
            "global_batch": cfg.data.batch_size, "dataset": cfg.data.name,
            "model": model_label(cfg.model),
            "straggler_factor": FACTOR, "rows": rows}


def markdown(res: dict) -> str:
    """The table docs/benchmarks.md shows. Not collective."""
    lines = [f"{res['dataset']}, {res['model']}, {res['workers']} workers (+1 server for ps), "
             f"global batch {res['global_batch']}, {res['steps']} steps per worker, worker "
             f"{res['workers'] - 1} slowed {res['straggler_factor']:g}x in the straggler "
             "columns.\n",
             "| partition | scheme | fast workers samples/s | with straggler | kept | all "
             "workers kept | test acc | with straggler | vs allreduce (pts) | staleness "
             "mean / max | with straggler | missed updates mean (straggler) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        st = " | ".join(f"{r['staleness_mean' + t]:.2f} / {r['staleness_max' + t]}"
                        if r.get("staleness_mean" + t) is not None else "-"
                        for t in ("", "_straggler"))
        st += (f" | {r['missed_updates_mean']:.1f} ({r['missed_updates_mean_straggler']:.1f})"
               if r.get("missed_updates_mean") is not None else " | -")
        d = r["accuracy_vs_allreduce"]
        ds = r["accuracy_vs_allreduce_straggler"]
        lines.append(
            f"| {r['partition']} | {r['scheme']} | {r['fast_samples_per_s']:.0f} | "
            f"{r['fast_samples_per_s_straggler']:.0f} | {r['fast_throughput_ratio']:.2f}x | "
            f"{r['throughput_ratio']:.2f}x | {r['test_accuracy']:.4f} | "
            f"{r['test_accuracy_straggler']:.4f} | "
            + (f"{100 * d:+.2f} / {100 * ds:+.2f}" if d is not None else "-") + f" | {st} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: str) -> None:
    """Fast workers' throughput kept under the straggler and test accuracy, per scheme and
    partition. Not collective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = list(dict.fromkeys(r["partition"] for r in res["rows"]))
    schemes = list(dict.fromkeys(r["scheme"] for r in res["rows"]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    width = 0.8 / max(len(parts), 1)
    for i, part in enumerate(parts):
        rows = {r["scheme"]: r for r in res["rows"] if r["partition"] == part}
        xs = [j + i * width for j in range(len(schemes))]
        axes[0].bar(xs, [rows[s]["fast_throughput_ratio"] for s in schemes], width,
                    label=part)
        axes[1].bar([x - width / 4 for x in xs], [rows[s]["test_accuracy"] for s in schemes],
                    width / 2, label=f"{part}")
        axes[1].bar([x + width / 4 for x in xs],
                    [rows[s]["test_accuracy_straggler"] for s in schemes], width / 2,
                    label=f"{part}, straggler", alpha=0.6)
    for ax in axes:
        ax.set_xticks([j + width * (len(parts) - 1) / 2 for j in range(len(schemes))],
                      schemes, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    axes[0].axhline(0.9, color="k", lw=0.8, ls="--")
    axes[0].set(ylabel="fast workers' throughput kept with a 2x straggler")
    axes[1].set(ylabel="test accuracy")
    fig.suptitle(f"{res['dataset']}, {res['model']}, {res['workers']} workers, "
                 f"{res['steps']} steps each")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
