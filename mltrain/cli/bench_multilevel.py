"""``mltrain bench multilevel``: single-level against multilevel training of one deep
residual network, by work and wall time to a target training loss.

Every method trains the same network from the same initial weights until it has spent
``budget`` fine-gradient equivalents (every evaluation at its price measured at start-up,
``mltrain.optim.costs``) or has reached ``target`` training loss over the whole training
set (checked whenever the work grew by 1%, ``mltrain.cli.race``). Nested
iteration is scored on the network it is training at the time; when it stops on a coarse
level the row also holds the loss and accuracy of the full-depth network prolonged from
it. Methods: SGD, Adam, single-level trust region, RMTR with 2 and 3 levels (the same trust-region settings
on every level), MG/OPT (Adam smoother) and nested iteration (Adam). Collective on the
world communicator.
"""
from __future__ import annotations

from mltrain.cli.race import plot as race_plot
from mltrain.cli.race import race
from mltrain.config import load_config

__all__ = ["METHODS", "bench_multilevel", "plot"]


def methods(curvature: str) -> list[tuple[str, list[str]]]:
    tr = ["optim.name=tr", f"tr.curvature={curvature}"]
    return [
        ("sgd", ["optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9"]),
        ("adam", ["optim.name=adam", "optim.lr=0.003"]),
        ("tr", tr),
        ("rmtr-2", ["optim.name=rmtr", "multilevel.levels=2", f"tr.curvature={curvature}"]),
        ("rmtr-3", ["optim.name=rmtr", "multilevel.levels=3", f"tr.curvature={curvature}"]),
        ("mgopt-3", ["optim.name=mgopt", "multilevel.levels=3", "mgopt.smoother=adam",
                     "optim.lr=0.003"]),
        ("nested-3", ["optim.name=adam", "optim.lr=0.003", "multilevel.nested=true",
                      "multilevel.levels=3"]),
    ]


METHODS = [name for name, _ in methods("ggn")]


def bench_multilevel(config: str | None, overrides: list[str], comm, *, budget: float,
                     target: float, points: int = 16, curvature: str = "ggn",
                     only: list[str] | None = None) -> dict:
    results = []
    for name, extra in methods(curvature):
        if only and name not in only:
            continue
        cfg = load_config(config, overrides + extra + ["run.steps=100000000"])
        results.append({"method": name, **race(cfg, comm, budget, points, target)})
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
    race_plot(res, path, "fine-gradient equivalents")
