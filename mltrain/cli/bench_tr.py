"""``mltrain bench tr``: first- and second-order training under the same budget of work.

SGD, Adam and trust region with each curvature model (Hessian, GGN, L-SR1) train the
same model on the same data from the same initial weights until they have spent
``budget`` gradient equivalents of work (samples through a gradient or a curvature product,
divided by the training-set size; a loss-only evaluation counts one half). Training loss
over the whole training set and test accuracy are recorded at ``points`` marks, with wall
time (evaluation excluded). Collective on the world communicator.
"""
from __future__ import annotations

from mltrain.cli.race import race
from mltrain.config import load_config, model_label

METHODS = [
    ("sgd", ["optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9"]),
    ("adam", ["optim.name=adam", "optim.lr=0.003"]),
    ("tr-hessian", ["optim.name=tr", "tr.curvature=hessian"]),
    ("tr-ggn", ["optim.name=tr", "tr.curvature=ggn"]),
    ("tr-lsr1", ["optim.name=tr", "tr.curvature=lsr1"]),
    ("tr-ggn-hybrid", ["optim.name=tr", "tr.curvature=ggn", "tr.batch=hybrid"]),
    ("tr-ggn-full", ["optim.name=tr", "tr.curvature=ggn", "tr.batch=full"]),
]


def bench_tr(config: str | None, overrides: list[str], comm, budget: float = 10.0,
             points: int = 10) -> dict:
    results = []
    for name, extra in METHODS:
        cfg = load_config(config, overrides + extra + ["run.steps=100000000"])
        results.append({"method": name, **race(cfg, comm, budget, points)})
    return {"dataset": cfg.data.name, "model": model_label(cfg.model),
            "ranks": comm.Get_size(), "budget": budget, "methods": results}
