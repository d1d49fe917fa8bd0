"""``mltrain bench search``: every search algorithm, and Optuna's TPE sampler with its
median pruner as the outside baseline, at the same budget on the same space, over seeds.

Each search runs through the same driver (``run_search``: trial groups, budget accounting,
snapshots); TPE enters as one more ask/tell algorithm built on Optuna's ask-and-tell
interface (in-memory storage), reporting at the same rungs ASHA uses so its pruner can
stop trials. The figures: the best test accuracy against the budget spent, the budget
ASHA needs to reach random search's final best, how often the best of mltrain's
algorithms matches TPE, and the search's wall time with T trial groups against one.
Collective on the world communicator.
"""
from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

from mltrain.config import ConfigError
from mltrain.search import algorithms as algos
from mltrain.search.driver import make_plan, run_search

METHODS = ["random", "grid", "asha", "pbt", "thompson", "crowding", "tpe"]

SPACE = """
["optim.lr"]
log = [0.003, 1.0]
["optim.momentum"]
range = [0.0, 0.95]
["data.batch_size"]
choice = [16, 32, 64]
["sync.name"]
choice = ["allreduce", "localsgd"]
["sync.period"]
int = [2, 8]
when = { "sync.name" = "localsgd" }
["data.partition"]
choice = ["iid", "dirichlet"]
"""

DATASETS = {  # base configs: a small MLP, plain SGD, the length of a full trial
    "digits": ["data.name=digits", "model.name=mlp", "model.width=64", "model.depth=1",
               "run.steps=60"],
    "mnist": ["data.name=idx", "model.name=mlp", "model.width=128", "model.depth=1",
              "run.steps=150"],
}
# One torch thread per rank: the one-group run of the wall-time comparison would otherwise
# take every core of the node for its single rank, and the comparison would be of
# intra-op threads against trial groups instead of T groups against one.
COMMON = ["optim.name=sgd", "run.log_every=10", "search.eta=3", "search.interval=0",
          "data.alpha=0.5", "run.threads=1"]
# ASHA's (and TPE's reporting) lowest rung: R / 9, three rungs (R / 27 is a couple of
# steps on these problems, too few to tell learning rates apart).
RUNG_DIVISOR = 9


class TPE(algos.Algorithm):
    """Optuna's TPE sampler with its median pruner behind the ask/tell protocol: a new
    trial samples the space (conditions as define-by-run); it reports its score at each
    of ASHA's rungs and is pruned there when the median pruner says so, else it continues
    from its snapshot (continuations first, as ASHA's promotions)."""

    name = "tpe"

    def __init__(self, space, opts, R, budget, base_seed=0, maximize=True):
        import optuna

        super().__init__(space, opts, R, budget, base_seed, maximize)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        self.study = optuna.create_study(
            direction="maximize", sampler=optuna.samplers.TPESampler(seed=opts.seed),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0))
        self.rungs = algos.asha_rungs(R, algos.asha_min_resource(opts, R), opts.eta)
        self.trials: dict[int, object] = {}
        self.queue: list[tuple[int, int, str | None]] = []  # (trial, at, snapshot)
        self.values: dict[int, dict] = {}

    def _suggest(self, ot) -> dict:
        out: dict = {}
        for p in self.space.params:
            if not p.active(out):
                continue
            if p.kind == "choice":
                out[p.key] = ot.suggest_categorical(p.key, list(p.values))
            elif p.kind == "int":
                out[p.key] = ot.suggest_int(p.key, int(p.low), int(p.high))
            else:
                out[p.key] = ot.suggest_float(p.key, p.low, p.high, log=p.kind == "log")
        return out

    def ask(self, remaining: int):
        if self.queue:
            t, at, snap = self.queue[0]
            nxt = next(r for r in self.rungs if r > at)
            if nxt - at <= remaining:
                self.queue.pop(0)
                return self._job(self.values[t], at, nxt, trial=t, snapshot=snap,
                                 keep=nxt < self.R, rung=self.rungs.index(nxt))
        if self.rungs[0] > remaining:
            return None
        ot = self.study.ask()
        job = self._job(self._suggest(ot), 0, self.rungs[0], keep=len(self.rungs) > 1, rung=0)
        self.trials[job["trial"]], self.values[job["trial"]] = ot, job["values"]
        return job

    def tell(self, job: dict, result: dict) -> None:
        ot = self.trials[job["trial"]]
        score = result.get("score")
        if score is None:
            self.study.tell(ot, state=self.optuna.trial.TrialState.FAIL)
            return
        ot.report(score, step=job["stop"])
        if job["stop"] >= self.R:
            self.study.tell(ot, score)
        elif ot.should_prune():
            self.study.tell(ot, state=self.optuna.trial.TrialState.PRUNED)
        else:
            self.queue.append((job["trial"], job["stop"], result.get("snapshot")))

    def live_snapshots(self) -> set[str]:
        return {s for _, _, s in self.queue if s}


def _search(comm, folder: Path, base: list[str], method: str, budget: int, seed: int,
            trials: int) -> dict:
    """One search; returns its summary on every rank. Collective on ``comm``."""
    from mltrain.comm import agree

    space = folder / "space.toml"
    if comm.Get_rank() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        space.write_text(SPACE)
    comm.Barrier()
    algo = "random" if method == "tpe" else method
    sets = [*base, f"search.seed={seed}", f"parallel.trial={trials}"]
    if method == "crowding":  # a population that leaves budget for offspring
        sets.append("search.population=4")
    R = int(next(x for x in base if x.startswith("run.steps=")).split("=")[1])
    sets.append(f"search.min_resource={max(1, R // RUNG_DIVISOR)}")
    out = folder / f"{method}-s{seed}-T{trials}"
    plan = agree(comm, lambda: make_plan(None, sets, str(space), comm.Get_size(), algo=algo,
                                         budget=budget, out=str(out)), what="config")
    factory = None
    if method == "tpe":
        plan.algo = "tpe"
        factory = lambda p: TPE(p.space, p.opts, p.R, p.budget, p.base.run.seed,  # noqa: E731
                                p.maximize)
    t0 = time.perf_counter()
    summary = run_search(plan, comm, quiet=True, algorithm=factory)
    wall = comm.bcast(time.perf_counter() - t0)
    summary = comm.bcast(summary)
    summary["wall_s"] = wall
    summary["R"] = plan.R
    return summary


def _best_at(curve: list, spent: float) -> float | None:
    """The best metric after ``spent`` budget (None before the first result)."""
    best = None
    for s, v in curve:
        if s <= spent:
            best = v
    return best


def _reach(curve: list, target: float) -> float | None:
    """The budget at which ``curve`` first reaches ``target`` (None: never)."""
    return next((s for s, v in curve if v >= target), None)


def _median(xs: list) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def bench_search(comm, datasets: list[str], methods: list[str], seeds: int,
                 budget_trials: float, data_path: str | None, log) -> dict:
    """Collective on ``comm``."""
    P = comm.Get_size()
    tmp = comm.bcast(tempfile.mkdtemp(prefix="mltrain-bench-search-")
                     if comm.Get_rank() == 0 else None)
    folder = Path(tmp)
    out = {"ranks": P, "seeds": seeds, "methods": methods, "datasets": {}}
    for ds in datasets:
        base = DATASETS[ds] + COMMON
        if ds == "mnist":
            base = base + [f"data.path={data_path}"]
        R = int(next(s for s in base if s.startswith("run.steps=")).split("=")[1])
        budget = int(round(budget_trials * R))
        rows = {m: [] for m in methods}
        for seed in range(seeds):
            for m in methods:
                s = _search(comm, folder / ds, base, m, budget, seed, P)
                rows[m].append(s)
                log(f"  {ds} seed {seed} {m:<9} best {s['best']:.4f} after {s['spent']} of "
                    f"{budget} steps, {s['jobs']} jobs, {s['wall_s']:.1f} s")
        res = {"R": R, "budget": budget, "runs": {m: [
            {"best": s["best"], "spent": s["spent"], "jobs": s["jobs"], "trials": s["trials"],
             "failed": s["failed"], "wall_s": s["wall_s"], "best_so_far": s["best_so_far"]}
            for s in rows[m]] for m in methods}}
        res["final_best_median"] = {m: _median([s["best"] for s in rows[m]]) for m in methods}
        if "asha" in methods and "random" in methods:
            fr = []
            for a, r in zip(rows["asha"], rows["random"]):
                at = _reach(a["best_so_far"], r["best"])
                fr.append(None if at is None else at / budget)
            res["asha_fraction_to_random_best"] = fr
            res["asha_fraction_median"] = _median([f if f is not None else math.inf for f in fr])
        if "tpe" in methods:
            ours = [m for m in methods if m != "tpe"]
            if ours:
                top = max(ours, key=lambda m: res["final_best_median"][m] or -1)
                wins = [s["best"] >= t["best"] for s, t in zip(rows[top], rows["tpe"])]
                res["best_mltrain"] = top
                res["matches_tpe"] = wins
        out["datasets"][ds] = res
    # Wall time of one budget with T groups against one group (same group size: one
    # rank; the other ranks wait), random search on the first dataset.
    if P > 1:
        ds = datasets[0]
        base = DATASETS[ds] + COMMON + (
            [f"data.path={data_path}"] if ds == "mnist" else [])
        R = int(next(s for s in base if s.startswith("run.steps=")).split("=")[1])
        budget = int(round(budget_trials * R))
        from mpi4py import MPI

        budget = 3 * budget  # long enough that start-up costs do not decide it
        one = comm.Split(0 if comm.Get_rank() == 0 else MPI.UNDEFINED, 0)
        wT = _search(comm, folder / "scaling", base, "random", budget, 0, P)["wall_s"]
        w1 = None
        if one != MPI.COMM_NULL:
            w1 = _search(one, folder / "scaling", base, "random", budget, 0, 1)["wall_s"]
            one.Free()
        req = comm.Ibarrier()  # the idle ranks sleep, leaving the cores to rank 0
        while not req.Test():
            time.sleep(0.005)
        w1 = comm.bcast(w1)
        out["scaling"] = {"dataset": ds, "budget": budget, "wall_T1": w1, f"wall_T{P}": wT,
                          "T": P, "ratio": wT / w1, "ideal": 1 / P}
        log(f"  scaling: one group {w1:.1f} s, {P} groups {wT:.1f} s (ratio {wT / w1:.2f}, "
            f"ideal {1 / P:.2f})")
    if comm.Get_rank() == 0:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return out


def check(methods: list[str], datasets: list[str], data_path: str | None) -> None:
    """Not collective."""
    if "tpe" in methods:
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("bench search: --methods tpe needs Optuna, which mltrain does "
                              "not install (pip install optuna), or leave tpe out") from None
    if "mnist" in datasets and not data_path:
        raise ConfigError("bench search: mnist needs the IDX folder: --set data.path=DIR "
                          "(../shared/data/mnist when it exists)")


def markdown(res: dict) -> str:
    lines = []
    for ds, r in res["datasets"].items():
        lines.append(f"**{ds}**: a trial is {r['R']} steps; budget {r['budget']} steps "
                     f"({r['budget'] / r['R']:g} full trials); {res['ranks']} trial groups "
                     f"of 1 rank; {res['seeds']} seeds.\n")
        lines.append("| method | best test accuracy (median) | per seed | jobs (median) | "
                     "wall s (median) |")
        lines.append("|---|---|---|---|---|")
        for m, runs in r["runs"].items():
            lines.append(f"| {m} | {r['final_best_median'][m]:.4f} | "
                         + " ".join(f"{x['best']:.3f}" for x in runs)
                         + f" | {_median([x['jobs'] for x in runs]):g} | "
                         f"{_median([x['wall_s'] for x in runs]):.1f} |")
        if "asha_fraction_to_random_best" in r:
            fr = r["asha_fraction_to_random_best"]
            lines.append("\nASHA's budget to reach random search's final best, per seed: "
                         + ", ".join("never" if f is None else f"{f:.2f}" for f in fr)
                         + f" (median {r['asha_fraction_median']:.2f}; target at most 0.33)")
        if "matches_tpe" in r:
            w = r["matches_tpe"]
            lines.append(f"\nBest mltrain algorithm by median: {r['best_mltrain']}; it matches "
                         f"or beats TPE in {sum(w)} of {len(w)} seeds (target 3 of 5)")
        lines.append("")
    if "scaling" in res:
        s = res["scaling"]
        wT = s["wall_T%d" % s["T"]]
        lines.append(f"Wall time of random search to {s['budget']} steps on {s['dataset']}: "
                     f"one group {s['wall_T1']:.1f} s, {s['T']} groups {wT:.1f} s: ratio "
                     f"{s['ratio']:.2f} (ideal {s['ideal']:.2f})")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dss = list(res["datasets"])
    fig, axes = plt.subplots(1, len(dss), figsize=(6 * len(dss), 4), squeeze=False)
    for ax, ds in zip(axes[0], dss):
        r = res["datasets"][ds]
        grid = [r["budget"] * i / 50 for i in range(1, 51)]
        for i, (m, runs) in enumerate(r["runs"].items()):
            med = [_median([_best_at(x["best_so_far"], g) for x in runs]) for g in grid]
            pts = [(g, v) for g, v in zip(grid, med) if v is not None]
            ax.plot([p[0] / r["R"] for p in pts], [p[1] for p in pts], label=m,
                    color=f"C{i}", lw=2 if m in ("asha", "tpe") else 1.2)
        ax.set_xlabel("budget spent (full trials)")
        ax.set_ylabel("best test accuracy (median over seeds)")
        ax.set_title(f"{ds}: best so far")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
