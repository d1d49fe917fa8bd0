"""``mltrain bench multilevel``: multilevel (RMTR), domain-decomposition (APTS) and
single-level training of one deep residual network, under a protocol meant to convince a
skeptical reviewer.

- **The same start.** Every method trains the same network from the same initial weights
  (``run.seed`` = the seed), in each initialization of ``inits``: ``independent`` draws per
  block, or ``smooth`` (blocks linear in depth, ``model.init``).
- **Batch regimes, reported apart.** ``hybrid``: first-order methods on mini-batches of
  ``data.batch_size``, second-order ones starting there and growing (``tr.batch =
  hybrid``); ``large``: every method at the fixed global batch ``large_batch`` (the
  many-rank case); ``full``: every method on the whole training set (first-order methods on
  the largest multiple of the rank count).
- **Baselines tuned.** SGD with momentum 0.9 and Adam, each over ``lrs`` log-spaced
  learning rates on the first seed (every rate the same budget), and past either end of
  that grid, at its spacing, while the end is strictly best (at most ``EXTEND`` more past
  each end; ``lrs`` >= 3); the rate that reaches the target with least work (else the
  lowest final loss) runs every seed. Nested iteration with Adam uses Adam's rate.
  Full-batch L-BFGS (``torch.optim.LBFGS``, strong Wolfe line search, gradients averaged
  over the ranks) in every regime, as the deterministic reference. TR runs with RMTR's
  curvature (``tr.curvature``, L-SR1 by default) and batch schedule. RMTR (3 levels) and
  APTS run their documented defaults, untuned (``apts``: the trust-region Adam local
  solver; ``apts-tr``: trust-region local solves on TR's curvature). Opt-in
  (``--methods``): ``rmtr-3-nested``, RMTR-3 after its nested start (``multilevel.init =
  nested``), with ``nested-tr`` as its control (TR after nested iteration with as many
  steps per coarse level, ``multilevel.nested_steps``), and ``rmtr-4``.
- **Cost three ways.** Work in fine-gradient equivalents at measured prices
  (``mltrain.optim.costs``; L-BFGS pays 1 per function evaluation), wall time at the run's
  rank count (evaluation excluded), and sequential steps; each to the target training loss
  (checked whenever the work grew by 1%, ``mltrain.cli.race``) and to the target test
  accuracy, within the budget (a target first met by the step that took the work past
  the budget is missed). A second-order step is dearer than Adam's, so also **accuracy at equal
  steps**: tuned Adam is rerun on each seed to each second-order method's final step count
  and evaluated exactly there; the cell reports the median over seeds of the method's
  final test accuracy minus Adam's at that step (the count the APTS papers compare by,
  per epoch at a fixed batch).
- **Statistics.** ``seeds`` seeds; the median and the inter-quartile range of every cost
  over the seeds (a seed that misses the target counts as missing: the median is reported
  only when at least half the seeds reached it), how many reached it, and the final test
  accuracy.

Collective on the world communicator.
"""
from __future__ import annotations

import math
import time

import numpy as np

from mltrain.cli.race import race
from mltrain.config import ConfigError, load_config, model_label

__all__ = ["METHODS", "REGIMES", "INITS", "bench_multilevel", "plot", "lbfgs_race", "markdown",
           "load_result", "stats_text"]

METHODS = ["sgd", "adam", "lbfgs", "tr", "rmtr-3", "rmtr-3-nested", "nested-tr", "rmtr-4", "apts",
           "apts-tr", "nested-adam"]
# Only when --methods names them: four levels need a deep network; the nested start is a
# variant of rmtr-3 measured apart.
OPT_IN = ("rmtr-3-nested", "nested-tr", "rmtr-4")
SECOND_ORDER = ("tr", "rmtr-3", "rmtr-3-nested", "nested-tr", "rmtr-4", "apts", "apts-tr")
REGIMES = ["hybrid", "large", "full"]
INITS = ["independent", "smooth"]
LR_GRIDS = {"sgd": (3e-3, 3.0), "adam": (1e-4, 0.1)}  # ends of each log-spaced grid
# Rates tried past an end of the grid, at most, while the best rate is that end: a baseline
# whose best rate is the largest one tried is not tuned (the stem-pooled MNIST network
# wants Adam's 0.1, the default grid's top).
EXTEND = 3


def chosen(only: list[str] | None) -> list[str]:
    """The methods a run races, in table order: ``only`` (every method but the opt-in ones
    when None or empty)."""
    return [m for m in METHODS if (m in only if only else m not in OPT_IN)]


def lr_grid(name: str, n: int) -> list[float]:
    lo, hi = LR_GRIDS[name]
    return [float(v) for v in np.geomspace(lo, hi, n)]


def tune(name: str, n: int, run_lr, extend: int = EXTEND) -> tuple[float, list]:
    """Tunes ``name``'s learning rate: the ``n`` rates of ``lr_grid(name, n)``, then, while
    the largest or the smallest rate tried is strictly better than every other
    (``_merit``), the next rate past it at the grid's spacing, at most ``extend`` more
    past each end. A grid of fewer than 3 rates is not extended (2 rates always have a
    best end, and their spacing is the whole range). ``run_lr(lr)`` races one rate and
    returns its row. Returns the best rate and every (rate, row) tried, in increasing
    rate. Collective on the bench's communicator (through ``run_lr``)."""
    grid = lr_grid(name, n)
    tried = [(lr, run_lr(lr)) for lr in grid]
    past = {1: 0, -1: 0}
    ratio = grid[1] / grid[0] if n >= 3 else None
    while ratio:
        tried.sort(key=lambda t: t[0])
        merits = [_merit(r) for _, r in tried]
        side = (1 if merits[-1] < min(merits[:-1]) else
                -1 if merits[0] < min(merits[1:]) else 0)
        if side == 0 or past[side] >= extend:
            break
        past[side] += 1
        lr = tried[-1][0] * ratio if side > 0 else tried[0][0] / ratio
        tried.append((lr, run_lr(lr)))
    return _best_rate(tried), sorted(tried, key=lambda t: t[0])


def _regime(regime: str, second_order: bool, large: int, num_train: int,
            ranks: int) -> list[str]:
    """The overrides of one batch regime for a first- or second-order method."""
    if regime == "hybrid":
        return ["tr.batch=hybrid"] if second_order else []
    if regime == "large":
        return [f"data.batch_size={large}"] + (["tr.batch=minibatch"] if second_order else [])
    full = num_train - num_train % ranks
    return ([f"data.batch_size={large}", "tr.batch=full"] if second_order else
            [f"data.batch_size={full}"])


def _settings(name: str, lr: float | None, curvature: str, init_cycles: int) -> list[str]:
    """A method's overrides; ``curvature``: RMTR's (``auto`` resolved), which TR shares;
    ``init_cycles``: the steps per coarse level of RMTR's nested start, which nested-tr
    takes as plain trust-region steps (the control that tells the start's saving from the
    cycles')."""
    return {
        "sgd": ["optim.name=sgd", f"optim.lr={lr}", "optim.momentum=0.9"],
        "adam": ["optim.name=adam", f"optim.lr={lr}"],
        "tr": ["optim.name=tr", f"tr.curvature={curvature}"],
        "rmtr-3": ["optim.name=rmtr", "multilevel.levels=3"],
        "rmtr-3-nested": ["optim.name=rmtr", "multilevel.levels=3", "multilevel.init=nested"],
        "nested-tr": ["optim.name=tr", f"tr.curvature={curvature}", "multilevel.nested=true",
                      "multilevel.levels=3", f"multilevel.nested_steps={init_cycles}"],
        "rmtr-4": ["optim.name=rmtr", "multilevel.levels=4"],
        "apts": ["optim.name=apts"],
        "apts-tr": ["optim.name=apts", "apts.local_solver=tr", f"tr.curvature={curvature}"],
        "nested-adam": ["optim.name=adam", f"optim.lr={lr}", "multilevel.nested=true",
                        "multilevel.levels=3"],
    }[name]


class _Reached(Exception):
    """Both targets reached: stops L-BFGS from inside its closure."""


def lbfgs_race(cfg, comm, budget: float, target: float, target_acc: float | None,
               history: int = 10, milestones: tuple[float, ...] = ()) -> dict:
    """Full-batch L-BFGS (one ``torch.optim.LBFGS.step`` with a strong Wolfe line search
    and at most ``budget`` function evaluations) on ``cfg``'s network and training set;
    every function evaluation is one full gradient, averaged over ``comm`` (every rank takes
    the same steps), and the targets are checked at every evaluated point (not charged;
    the wall time excludes the checks; ``milestones`` as ``race``'s). Collective on
    ``comm``."""
    import torch
    import torch.nn.functional as F
    from mpi4py import MPI

    from mltrain.comm import mean_
    from mltrain.nn import add_depth_penalty
    from mltrain.train import Trainer

    t = Trainer(cfg, comm, quiet=True, metrics=False, serve=False)
    model, x, y = t.model, t.loader.x, t.loader.y
    weight = len(x) * comm.Get_size() / t.dataset.num_train
    params = [p for p in model.parameters() if p.requires_grad]
    ev = t.evaluate()
    curve = [{"work": 0.0, "wall_s": 0.0, "step": 0, "train_loss": ev["train_loss"],
              "test_accuracy": ev["test_accuracy"]}]
    st = {"evals": 0, "checks": 0.0, "hit": None, "acc": None if target_acc else {}}
    t0 = time.perf_counter()

    def closure():
        for p in params:
            p.grad = None
        loss = add_depth_penalty(F.cross_entropy(model(x), y), model) * weight
        loss.backward()
        flat = torch.cat([p.grad.reshape(-1) for p in params] + [loss.detach().reshape(1)])
        mean_(flat, comm)
        off = 0
        for p in params:
            p.grad.copy_(flat[off:off + p.numel()].view_as(p))
            off += p.numel()
        st["evals"] += 1
        c0 = time.perf_counter()
        ev = t.evaluate()
        wall = comm.allreduce(c0 - t0 - st["checks"], op=MPI.MAX)
        st["checks"] += time.perf_counter() - c0
        point = {"work": float(st["evals"]), "wall_s": wall, "step": st["evals"],
                 "train_loss": ev["train_loss"], "test_accuracy": ev["test_accuracy"]}
        curve.append(point)
        # A line search can evaluate past max_eval: as in race, that is not reached.
        paid = st["evals"] <= budget
        if paid and st["hit"] is None and ev["train_loss"] <= target:
            st["hit"] = point
        if paid and st["acc"] is None and ev["test_accuracy"] >= target_acc:
            st["acc"] = point
        if st["hit"] is not None and st["acc"] is not None:
            raise _Reached
        return flat[-1]

    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=10 ** 9, max_eval=max(int(budget), 1),
                            tolerance_grad=0.0, tolerance_change=0.0, history_size=history,
                            line_search_fn="strong_wolfe")
    try:
        opt.step(closure)
    except _Reached:
        pass
    steps = int(opt.state[params[0]].get("n_iter", 0))
    t.close()
    hit, acc = st["hit"], st["acc"] or None
    # A step of L-BFGS is an iteration; the curve's "step" counts evaluations.
    return {"steps": steps, "curve": curve, **curve[-1],
            "work_to_target": hit["work"] if hit else None,
            "wall_to_target": hit["wall_s"] if hit else None,
            "steps_to_target": hit["step"] if hit else None,
            "work_to_acc": acc["work"] if acc else None,
            "steps_to_acc": acc["step"] if acc else None,
            # After a step, as race's checks (the starting point is no step's work).
            "work_to_milestones": [next((p["work"] for p in curve[1:]
                                         if p["train_loss"] <= level
                                         and p["work"] <= budget), None)
                                   for level in milestones]}


def _stats(values: list, seeds: int) -> dict:
    """The (lower) median and the inter-quartile range over the seeds, a seed that missed
    counting as worse than every one that reached (so the median exists only when at
    least half reached; q75 may be inf), and how many reached. Quantiles are order
    statistics (no interpolation with a missed seed)."""
    got = [v for v in values if v is not None]
    out = {"reached": len(got), "median": None, "q25": None, "q75": None}
    full = sorted(got) + [math.inf] * (len(values) - len(got))
    if full and math.isfinite(np.percentile(full, 50, method="lower")):
        q25, med = np.percentile(full, [25, 50], method="lower")
        q75 = np.percentile(full, 75, method="higher")
        out.update(median=float(med), q25=float(q25), q75=float(q75))
    return out


def _merit(row: dict) -> tuple:
    """How good a tuning run was, smaller better: reached the target (by its work), else
    a finite final loss (by it), else diverged."""
    if row["work_to_target"]:
        return (0, row["work_to_target"])
    loss = row["train_loss"]
    return (1, loss) if math.isfinite(loss) else (2, 0.0)


def _best_rate(rows: list[tuple[float, dict]]) -> float | None:
    """The rate whose run reached the target with least work, else the lowest final
    loss (ties: the lowest rate; nothing finite: the first rate). Not collective."""
    return min((_merit(r), lr) for lr, r in rows)[1] if rows else None


def bench_multilevel(config: str | None, overrides: list[str], comm, *, budget: float,
                     target: float, target_acc: float | None = None,
                     regimes: list[str] | None = None, inits: list[str] | None = None,
                     seeds: int = 5, lrs: int = 6, large_batch: int = 512,
                     only: list[str] | None = None, resolution: float = 0.01,
                     milestones: tuple[float, ...] = (), log=print) -> dict:
    """Every cell (regime x initialization x method x seed); see the module docstring.
    ``milestones``: training losses above ``target`` at which the work is reported too
    (the ratio to TR at several depths of the target, from the same runs). ``log``
    reports progress on rank 0. Collective on ``comm``."""
    regimes, inits = regimes or REGIMES, inits or INITS
    methods = chosen(only)
    base = load_config(config, overrides)
    from mltrain.data import open_dataset

    num_train = open_dataset(base.data.name, base.data.path).num_train
    ranks = comm.Get_size()
    if large_batch % ranks or large_batch > num_train:
        raise ConfigError(f"--large-batch: {large_batch} must divide among {ranks} ranks and "
                          f"fit the {num_train} training samples")

    full_batch = {}  # L-BFGS is full-batch in every regime: one run per (init, seed)
    as_rmtr = load_config(config, overrides + ["optim.name=rmtr"])
    curvature, init_cycles = as_rmtr.tr.curvature, as_rmtr.multilevel.init_cycles

    def run(name, regime, init, seed, lr=None, probes=frozenset()):
        second = name in SECOND_ORDER
        steps = max(probes) if probes else 100000000
        extra = [f"model.init={init}", f"run.seed={seed}", f"run.steps={steps}"]
        if name == "lbfgs":
            if (init, seed) not in full_batch:
                cfg = load_config(config, overrides + extra + ["optim.name=adam"])
                full_batch[init, seed] = lbfgs_race(cfg, comm, budget, target, target_acc,
                                                    milestones=milestones)
            return full_batch[init, seed]
        cfg = load_config(config, overrides + extra
                          + _settings(name, lr, curvature, init_cycles)
                          + _regime(regime, second, large_batch, num_train, ranks))
        if probes:  # Adam to exactly these step counts: no budget, no target
            return race(cfg, comm, math.inf, 1, probes=probes)
        return race(cfg, comm, budget, 16, target, resolution=resolution,
                    target_acc=target_acc, milestones=milestones)

    cells = []
    for regime in regimes:
        for init in inits:
            rates, rows, grids = {}, {}, {}
            for name in ("sgd", "adam"):
                if name not in methods and not (name == "adam" and "nested-adam" in methods):
                    continue
                rates[name], tried = tune(name, lrs, lambda lr: run(name, regime, init, 0,
                                                                    lr))
                grids[name] = [lr for lr, _ in tried]
                rows[name] = [dict(r, seed=0) for lr, r in tried if lr == rates[name]]
                log(f"  {regime}/{init} {name}: rates "
                    + ", ".join(f"{lr:.2g}" + ("*" if lr == rates[name] else "")
                                for lr, _ in tried))
            for name in methods:
                lr = rates.get("adam" if name == "nested-adam" else name)
                done = rows.get(name, [])
                for seed in range(len(done), seeds):
                    done.append(dict(run(name, regime, init, seed, lr), seed=seed))
                cell = {"regime": regime, "init": init, "method": name, "lr": lr,
                        "runs": done}
                tuned = grids.get("adam" if name == "nested-adam" else name)
                if tuned:  # the rates its tuning tried
                    cell["rates"] = tuned
                for key in ("work_to_target", "wall_to_target", "steps_to_target",
                            "work_to_acc", "steps_to_acc"):
                    cell[key] = _stats([r[key] for r in done], seeds)
                cell["work_to_milestones"] = [_stats([r["work_to_milestones"][i] for r in done],
                                                     seeds) for i in range(len(milestones))]
                acc = [r["test_accuracy"] for r in done]
                cell["test_accuracy"] = {"median": float(np.median(acc)),
                                         "q25": float(np.percentile(acc, 25)),
                                         "q75": float(np.percentile(acc, 75))}
                cells.append(cell)
                w = cell["work_to_target"]
                log(f"  {regime}/{init} {name}: reached {w['reached']}/{seeds}, median work "
                    f"{w['median'] if w['median'] is None else round(w['median'], 3)}, "
                    f"test acc {cell['test_accuracy']['median']:.4f}")
            if "adam" in rates:
                _equal_steps([c for c in cells if (c["regime"], c["init"]) == (regime, init)],
                             lambda seed, probes: run("adam", regime, init, seed,
                                                      rates["adam"], frozenset(probes)))
    _ratios(cells)
    from mltrain.cli.info import cpu_model

    model = model_label(base.model)
    # The CPU and the overrides, so that a figure can be traced to what produced it.
    return {"dataset": base.data.name, "data_path": base.data.path, "model": model,
            "cpu": cpu_model(), "overrides": list(overrides),
            "ranks": ranks, "budget": budget, "target": target, "target_acc": target_acc,
            "seeds": seeds, "lrs": lrs, "large_batch": large_batch,
            "batch": base.data.batch_size, "regimes": regimes, "inits": inits,
            "resolution": resolution, "curvature": curvature, "milestones": list(milestones),
            "cells": cells}


def _equal_steps(cells: list[dict], adam_run) -> None:
    """For each second-order cell of one (regime, init): its final test accuracy minus
    tuned Adam's after as many steps, seed by seed (``adam_run(seed, steps)`` reruns Adam
    on that seed, evaluating after each of those step counts), in points; the median and
    the range over the seeds. Collective (through ``adam_run``)."""
    mine = [c for c in cells if c["method"] in SECOND_ORDER]
    want: dict[int, set[int]] = {}
    for r in (r for c in mine for r in c["runs"] if r["steps"] > 0):
        want.setdefault(r["seed"], set()).add(r["steps"])
    at = {}
    for seed in sorted(want):
        at.update({(seed, p["step"]): p["test_accuracy"]
                   for p in adam_run(seed, want[seed])["curve"]})
    for c in mine:
        diffs = [100 * (r["test_accuracy"] - at[r["seed"], r["steps"]]) for r in c["runs"]
                 if (r["seed"], r["steps"]) in at]
        c["vs_adam_equal_steps"] = ({"median": float(np.median(diffs)), "min": min(diffs),
                                     "max": max(diffs), "per_seed": diffs}
                                    if len(diffs) == len(c["runs"]) else None)


def _ratios(cells: list[dict]) -> None:
    """Per (regime, init): each method's median work to the target relative to TR's
    (TR / method: above 1 is less work) and its median sequential steps to the target
    accuracy relative to Adam's (Adam / method); and the first ratio at each milestone."""
    def med(c, key):
        return c[key]["median"]

    for c in cells:
        peers = {d["method"]: d for d in cells
                 if (d["regime"], d["init"]) == (c["regime"], c["init"])}
        tr, adam = peers.get("tr"), peers.get("adam")
        c["work_ratio_vs_tr"] = (med(tr, "work_to_target") / med(c, "work_to_target")
                                 if tr and med(tr, "work_to_target") and med(c, "work_to_target")
                                 else None)
        c["steps_ratio_vs_adam"] = (med(adam, "steps_to_acc") / med(c, "steps_to_acc")
                                    if adam and med(adam, "steps_to_acc")
                                    and med(c, "steps_to_acc") else None)
        c["milestone_ratios_vs_tr"] = [
            tr["work_to_milestones"][i]["median"] / m["median"]
            if tr and tr["work_to_milestones"][i]["median"] and m["median"] else None
            for i, m in enumerate(c["work_to_milestones"])]
        c["accuracy_vs_adam"] = (c["test_accuracy"]["median"]
                                 - adam["test_accuracy"]["median"] if adam else None)


def plot(res: dict, path: str) -> None:
    """Per regime (rows) and initialization (pairs of columns), the first seed's training
    loss and test accuracy against work for every method. Not collective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(res["regimes"]), len(res["inits"])
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(4.6 * 2 * cols, 3.4 * rows),
                             squeeze=False)
    keys = [(r, i) for r in res["regimes"] for i in res["inits"]]
    for (loss_ax, acc_ax), (regime, init) in zip(axes.reshape(-1, 2), keys):
        lows = []
        for c in res["cells"]:
            if (c["regime"], c["init"]) != (regime, init):
                continue
            curve = c["runs"][0]["curve"]
            work = [p["work"] for p in curve]
            for ax, key in ((loss_ax, "train_loss"), (acc_ax, "test_accuracy")):
                ax.plot(work, [p[key] for p in curve], marker="o", ms=2, label=c["method"])
            lows += [p["test_accuracy"] for p in curve[1:]]
        if lows:  # the untrained start would squash the curves into the top of the panel
            acc_ax.set_ylim(max(0.0, min(lows) - 0.02), min(1.0, max(lows) + 0.01))
        if res["target"] > 0:  # a target of 0 (spend the budget) has no line on a log axis
            loss_ax.axhline(res["target"], color="k", lw=0.8, ls="--")
        if res["target_acc"] is not None:
            acc_ax.axhline(res["target_acc"], color="k", lw=0.8, ls="--")
        loss_ax.set(title=f"{regime} batch, {init} init", xlabel="fine-gradient equivalents",
                    ylabel="training loss", yscale="log")
        acc_ax.set(title=f"{regime} batch, {init} init", xlabel="fine-gradient equivalents",
                   ylabel="test accuracy")
        for ax in (loss_ax, acc_ax):
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    data = res["dataset"] + (f" {res['data_path']}" if res.get("data_path") else "")
    fig.suptitle(f"{data}, {res['model']}, {res['ranks']} rank(s), seed 0")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- a saved run (--json), rendered again with --from-json -----------------------------------
def _field(obj, key: str, kinds: tuple, where: str):
    """``obj[key]`` if ``obj`` is an object holding it as one of ``kinds`` (a bool is no
    number), else ConfigError naming ``where`` and the key."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected an object, got {type(obj).__name__}")
    if key not in obj:
        raise ConfigError(f"{where}: missing {key!r}")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ConfigError(f"{where}: {key!r} must be "
                          f"{' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__}")
    if float in kinds and isinstance(value, int) and abs(value) > 1e300:
        raise ConfigError(f"{where}: {key!r} is out of range")  # no float could print it
    return value


NUM, OPT_NUM = (int, float), (int, float, type(None))
MAX_MILESTONES = 20


def _check_stats(s, where: str, optional: bool, seeds: int | None = None) -> None:
    for key in ("median", "q25", "q75"):
        v = _field(s, key, OPT_NUM if optional else NUM, where)
        if v is not None and (math.isnan(v) or v == -math.inf
                              or (key != "q75" and v == math.inf)):
            raise ConfigError(f"{where}: {key!r} must be finite (q75: or inf)")
    if optional:
        reached = _field(s, "reached", (int,), where)
        if seeds is not None and not 0 <= reached <= seeds:
            raise ConfigError(f"{where}: 'reached' must lie in [0, {seeds}]")
        if s["median"] is not None and (s["q25"] is None or s["q75"] is None):
            raise ConfigError(f"{where}: a median needs its quartiles")


def _check_result(res, where: str) -> None:
    """Raises ConfigError naming the first field of a saved result that the tables and the
    plot could not read. Not collective."""
    if _field(res, "bench", (str,), where) != "multilevel":
        raise ConfigError(f"{where}: a bench {res['bench']!r} result, not bench multilevel")
    # data_path, cpu: absent from runs saved before they were recorded
    for key in ("dataset", "model", "curvature") + tuple(k for k in ("data_path", "cpu")
                                                         if k in res):
        text = _field(res, key, (str,), where)
        if len(text) > 1000 or not text.isprintable():
            raise ConfigError(f"{where}: {key!r} must be a short printable name")
    for key in ("ranks", "seeds", "batch", "large_batch"):
        if _field(res, key, (int,), where) < 1:
            raise ConfigError(f"{where}: {key!r} must be at least 1")
    for key in ("budget", "target"):
        _field(res, key, NUM, where)
    _field(res, "target_acc", OPT_NUM, where)
    overrides = res.get("overrides", [])  # absent from runs saved before it was recorded
    if (not isinstance(overrides, list) or len(overrides) > 200
            or not all(isinstance(o, str) and len(o) <= 1000 and o.isprintable()
                       for o in overrides)):
        raise ConfigError(f"{where}: 'overrides' must list at most 200 short printable "
                          "key=value settings")
    # milestones: absent from runs saved before they were recorded
    levels = res.get("milestones", [])
    if (not isinstance(levels, list) or len(levels) > MAX_MILESTONES
            or not all(type(v) in NUM and math.isfinite(v) and abs(v) < 1e300
                       for v in levels)):
        raise ConfigError(f"{where}: 'milestones' must list at most {MAX_MILESTONES} finite "
                          "numbers (losses)")
    for key, known in (("regimes", REGIMES), ("inits", INITS)):
        items = _field(res, key, (list,), where)
        if (not items or not all(isinstance(x, str) for x in items)
                or len(set(items)) != len(items) or not set(items) <= set(known)):
            raise ConfigError(f"{where}: {key!r} must list distinct names from "
                              f"{', '.join(known)}")
    for i, c in enumerate(_field(res, "cells", (list,), where)):
        at = f"{where}: cells[{i}]"
        if (_field(c, "regime", (str,), at) not in res["regimes"]
                or _field(c, "init", (str,), at) not in res["inits"]
                or _field(c, "method", (str,), at) not in METHODS):
            raise ConfigError(f"{at}: its regime, init or method is not one of the run's")
        _field(c, "lr", OPT_NUM, at)
        rates = c.get("rates")  # absent from runs saved before it was recorded
        if rates is not None and (not isinstance(rates, list) or not 0 < len(rates) <= 100
                                  or not all(type(r) in NUM and 0 < r < 1e300
                                             for r in rates)):
            raise ConfigError(f"{at}: 'rates' must list at most 100 positive learning rates")
        for key in ("work_to_target", "wall_to_target", "steps_to_target", "steps_to_acc"):
            _check_stats(_field(c, key, (dict,), at), f"{at}.{key}", optional=True,
                         seeds=res["seeds"])
        _check_stats(_field(c, "test_accuracy", (dict,), at), f"{at}.test_accuracy", False)
        for key in ("work_ratio_vs_tr", "steps_ratio_vs_adam"):
            _field(c, key, OPT_NUM, at)
        if levels:
            stats = _field(c, "work_to_milestones", (list,), at)
            ratios = _field(c, "milestone_ratios_vs_tr", (list,), at)
            if len(stats) != len(levels) or len(ratios) != len(levels):
                raise ConfigError(f"{at}: one work figure and one ratio per milestone")
            for k, (s, r) in enumerate(zip(stats, ratios)):
                _check_stats(s, f"{at}.work_to_milestones[{k}]", optional=True,
                             seeds=res["seeds"])
                if r is not None and (type(r) not in NUM or not 0 < r < 1e300):
                    raise ConfigError(f"{at}.milestone_ratios_vs_tr[{k}]: must be a positive "
                                      "finite number or null")
        if c.get("vs_adam_equal_steps") is not None:
            for key in ("median", "min", "max"):
                _field(c["vs_adam_equal_steps"], key, NUM, f"{at}.vs_adam_equal_steps")
        runs = _field(c, "runs", (list,), at)
        if not runs:
            raise ConfigError(f"{at}: 'runs' is empty")
        for j, p in enumerate(_field(runs[0], "curve", (list,), f"{at}.runs[0]")):
            for key in ("work", "train_loss", "test_accuracy"):
                _field(p, key, NUM, f"{at}.runs[0].curve[{j}]")


def load_result(path: str) -> dict:
    """The result a ``--json`` run wrote, checked field by field before anything is drawn
    (the file is untrusted: a small regular text file, JSON only). Raises ConfigError naming
    the file and the field. Not collective."""
    import json

    from mltrain.config import read_text

    where = f"--from-json {path}"
    text = read_text(path, "--from-json")
    try:
        res = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{where}: not JSON ({e})") from None
    _check_result(res, where)
    return res


def stats_text(s: dict, seeds: int, f: str = "{:.2f}") -> str:
    """A cost's statistics as "median [q25, q75]", "(k/n)" after it when some seeds missed,
    "- (k/n)" when most did. Not collective."""
    if s["median"] is None:
        return f"- ({s['reached']}/{seeds})"
    q75 = f.format(s["q75"]) if math.isfinite(s["q75"]) else "inf"
    extra = "" if s["reached"] == seeds else f" ({s['reached']}/{seeds})"
    return f"{f.format(s['median'])} [{f.format(s['q25'])}, {q75}]{extra}"


def _milestone_table(res: dict, regime: str, init: str) -> list[str]:
    """The work to each milestone loss and TR's over it, one column per milestone (and
    the target last), as markdown lines; none without milestones. Not collective."""
    levels = res.get("milestones") or []
    if not levels:
        return []
    out = [f"*{regime} batch, {init} initialization: work to each training loss, "
           "TR's over the method's (Nx)*", "",
           "| method | " + " | ".join(f"loss {v:g}" for v in levels)
           + f" | loss {res['target']:g} (target) |",
           "|---|" + "---|" * (len(levels) + 1)]
    for c in res["cells"]:
        if (c["regime"], c["init"]) != (regime, init):
            continue
        cols = list(zip(c["work_to_milestones"], c["milestone_ratios_vs_tr"]))
        cols.append((c["work_to_target"], c["work_ratio_vs_tr"]))
        out.append(f"| {c['method']} | " + " | ".join(
            stats_text(s, res["seeds"]) + (f", {r:.2f}x" if r else "") for s, r in cols)
            + " |")
    return out + [""]


def markdown(res: dict) -> str:
    """The cells as markdown tables, one per regime and initialization."""
    def fmt(s, f="{:.2f}"):
        return stats_text(s, res["seeds"], f)

    out = []
    if res.get("cpu") or res.get("overrides"):
        out += [f"{res['ranks']} rank(s) on {res.get('cpu') or 'an unrecorded CPU'}; "
                + ("overrides: " + ", ".join(f"`{o}`" for o in res["overrides"])
                   if res.get("overrides") else "no overrides"), ""]
    for regime in res["regimes"]:
        for init in res["inits"]:
            out += [f"**{regime} batch, {init} initialization**", "",
                    "| method | lr | work to target | wall s to target | steps to target | "
                    "steps to accuracy | test accuracy | TR / method (work) | "
                    "Adam / method (steps to accuracy) | vs Adam at equal steps (points) |",
                    "|---|---|---|---|---|---|---|---|---|---|"]
            for c in res["cells"]:
                if (c["regime"], c["init"]) != (regime, init):
                    continue
                acc = c["test_accuracy"]
                r1 = f"{c['work_ratio_vs_tr']:.2f}" if c["work_ratio_vs_tr"] else "-"
                r2 = f"{c['steps_ratio_vs_adam']:.2f}" if c["steps_ratio_vs_adam"] else "-"
                lr = f"{c['lr']:.3g}" if c["lr"] and c["method"] != "lbfgs" else "-"
                if lr != "-" and c.get("rates") and len(c["rates"]) > 1 and c["lr"] in (
                        min(c["rates"]), max(c["rates"])):
                    lr += " (edge)"  # tuning ran out of rates past this end
                eq = c.get("vs_adam_equal_steps")
                eq = (f"{eq['median']:+.1f} [{eq['min']:+.1f}, {eq['max']:+.1f}]" if eq
                      else "-")
                out.append(f"| {c['method']} | {lr} | {fmt(c['work_to_target'])} | "
                           f"{fmt(c['wall_to_target'], '{:.1f}')} | "
                           f"{fmt(c['steps_to_target'], '{:.0f}')} | "
                           f"{fmt(c['steps_to_acc'], '{:.0f}')} | {acc['median']:.4f} "
                           f"[{acc['q25']:.4f}, {acc['q75']:.4f}] | {r1} | {r2} | {eq} |")
            out.append("")
            out += _milestone_table(res, regime, init)
    return "\n".join(out)
