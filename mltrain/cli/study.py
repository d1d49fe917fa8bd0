"""``mltrain study``: every combination of a parameter grid at several rank counts.

Each run is a separate MPI job (``mpiexec -n R python -m mltrain train ...``, one after
another) with its own summary and metrics; the study then writes ``results.csv``,
``results.md`` and two plots: test accuracy against epochs and against bytes sent.
The driver itself does not use MPI.
"""
from __future__ import annotations

import csv
import itertools
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from mltrain.config import ConfigError, load_config, writable_folder
from mltrain.launch import clean_env, mpiexec_argv

COLUMNS = ["run", "ranks", "status", "steps", "epochs", "final_loss", "train_accuracy",
           "test_accuracy", "comm_bytes", "comm_calls", "wall_s"]


def parse_grid(text: str) -> list[tuple[str, list[str]]]:
    """``"a.b=1,2;c.d=x,y"`` -> [("a.b", ["1", "2"]), ("c.d", ["x", "y"])]."""
    axes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        if "=" not in part:
            raise ConfigError(f"--grid: {part!r} is not key=value1,value2,...")
        key, values = part.split("=", 1)
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals or key.count(".") != 1:
            raise ConfigError(f"--grid: {part!r} is not section.key=value1,value2,...")
        axes.append((key.strip(), vals))
    if not axes:
        raise ConfigError("--grid: empty (e.g. \"data.partition=iid,dirichlet\")")
    return axes


def parse_ranks(text: str, most: int = 4096) -> list[int]:
    """Rank counts from "1,2,4", each in 1..``most`` (jobs this command starts itself)."""
    try:
        ranks = [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise ConfigError(f"--ranks: expected a list like 1,2,4, got {text!r}") from None
    if not ranks or min(ranks) < 1 or max(ranks) > most:
        raise ConfigError(f"--ranks: expected rank counts from 1 to {most}, got {text!r}")
    return ranks


def plan(config: str | None, overrides: list[str], grid: str, ranks: str):
    """The runs, checked before any is launched: (name, ranks, overrides)."""
    axes = parse_grid(grid)
    runs = []
    for combo in itertools.product(*(vals for _, vals in axes)):
        sets = [f"{k}={v}" for (k, _), v in zip(axes, combo)]
        load_config(config, overrides + sets)  # a bad key or value fails here, not mid-study
        for r in parse_ranks(ranks):
            name = "_".join(f"{k.split('.')[1]}-{v}" for (k, _), v in zip(axes, combo))
            runs.append((f"{name}_P{r}", r, sets))
    return runs


def _launcher(template: str | None, ranks: int) -> tuple[list[str], dict[str, str]]:
    """The launch prefix and a cleaned environment: this process may itself be an MPI
    singleton, whose wiring variables would break the child launcher (Open MPI). Raises
    ConfigError naming --launcher when the template cannot be used."""
    if not template:
        return mpiexec_argv(ranks)
    import shutil

    try:
        words = shlex.split(template.format(ranks=ranks))
    except (ValueError, KeyError, IndexError, AttributeError) as e:
        raise ConfigError(f"--launcher {template!r}: not a command with {{ranks}} ({e})") \
            from None
    if not words or shutil.which(words[0]) is None:
        raise ConfigError(f"--launcher {template!r}: no program "
                          f"{words[0] if words else ''!r} on PATH")
    return words, clean_env()


def run_study(args) -> int:
    """Runs the study; returns 0 if every run succeeded, 1 otherwise."""
    cfg = load_config(args.config, args.overrides)
    grid = args.grid or cfg.study.grid
    ranks = args.ranks or cfg.study.ranks
    if not grid:
        raise ConfigError("--grid (or study.grid) is required")
    runs = plan(args.config, args.overrides, grid, ranks)
    for r in sorted({r for _, r, _ in runs}):
        _launcher(args.launcher, r)  # a bad template fails before any run
    out = writable_folder(args.out or cfg.study.out_dir
                          or time.strftime("study-%Y%m%d-%H%M%S"), "--out")
    results, curves = [], {}
    for i, (name, r, sets) in enumerate(runs, 1):
        rundir = out / "runs" / name
        rundir.mkdir(parents=True, exist_ok=True)
        summary = rundir / "summary.json"
        launch, env = _launcher(args.launcher, r)
        cmd = launch + [
            sys.executable, "-m", "mltrain", "train", "--quiet", "--summary", str(summary),
            *(["--config", args.config] if args.config else []),
            *itertools.chain.from_iterable(("--set", s) for s in args.overrides + sets),
            "--set", f"run.out_dir={rundir}", "--set", f"run.eval_every={cfg.study.eval_every}"]
        print(f"[{i}/{len(runs)}] {name}: {' '.join(sets)} on {r} ranks", flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        (rundir / "log.txt").write_text(proc.stdout + proc.stderr)
        row = {"run": name, "ranks": r, **dict(s.split("=", 1) for s in sets)}
        if proc.returncode != 0 or not summary.exists():
            row["status"] = f"failed (exit {proc.returncode}; see {rundir / 'log.txt'})"
            print(f"    failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
        else:
            s = json.loads(summary.read_text())
            row.update({k: s.get(k) for k in COLUMNS if k in s}, status="ok")
            evals = [json.loads(line) for line in open(s["metrics"])]
            curves[name] = [e for e in evals if e.get("event") == "eval"]
            print(f"    test accuracy {s['test_accuracy']:.4f}, {s['comm_bytes'] / 2**20:.1f} "
                  f"MiB sent per rank, {time.time() - t0:.0f} s", flush=True)
        results.append(row)
    keys = [k for k, _ in parse_grid(grid)]
    write_tables(out, results, keys)
    if curves:
        write_plots(out, curves)
    print(f"study: {len(results)} runs -> {out}/results.csv, results.md"
          + (", test_accuracy_vs_epochs.png, test_accuracy_vs_bytes.png" if curves else ""))
    return 0 if all(r["status"] == "ok" for r in results) else 1


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_tables(out: Path, results: list[dict], keys: list[str]) -> None:
    cols = ["run"] + keys + [c for c in COLUMNS if c != "run"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in results]
    (out / "results.md").write_text("\n".join(md) + "\n")


def write_plots(out: Path, curves: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for xkey, label, fname in (("epoch", "epochs", "test_accuracy_vs_epochs.png"),
                               ("comm_bytes", "MiB sent per rank", "test_accuracy_vs_bytes.png")):
        fig, ax = plt.subplots(figsize=(10, 5))
        cmap = plt.get_cmap("tab20")
        lowest = float("inf")
        for i, (name, pts) in enumerate(sorted(curves.items())):
            pts = [p for p in pts if p.get("test_accuracy") is not None]
            xs = [p[xkey] / (2**20 if xkey == "comm_bytes" else 1) for p in pts]
            lowest = min([lowest, *xs])
            # 20 distinct colours, then the same colours dashed, then dotted.
            ax.plot(xs, [p["test_accuracy"] for p in pts], marker="o", ms=3, label=name,
                    color=cmap(i % 20), linestyle=("-", "--", ":")[(i // 20) % 3])
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        if xkey == "comm_bytes":
            if lowest > 0:
                ax.set_xscale("log")
            else:  # single-rank runs send nothing
                ax.set_xscale("symlog", linthresh=1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  ncol=1 + len(curves) // 25)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)

