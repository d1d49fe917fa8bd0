"""``mltrain plan`` and ``mltrain simulate``: the planner from the command line. Both run
in one process (no MPI): they profile the configured model's layers on this machine and
search decompositions for a hardware description."""
from __future__ import annotations

import json

import torch

from mltrain.config import ConfigError, check_ranks, to_toml

__all__ = ["run_plan", "run_simulate"]


def _profile(cfg, ranks: int):
    from mltrain.data import open_dataset
    from mltrain.nn import build_model
    from mltrain.planner.search import profile_model
    from mltrain.train.checks import stem
    from mltrain.utils import torch_dtype

    ds = open_dataset(cfg.data.name, cfg.data.path, cfg.data.num_samples)
    dtype = torch_dtype(cfg.run.dtype)
    torch.manual_seed(cfg.run.seed)
    stem(cfg, ds)
    model = build_model(cfg.model.name, ds.input_shape, ds.num_classes, width=cfg.model.width,
                        depth=cfg.model.depth, dtype=dtype, stem_pool=cfg.model.stem_pool)
    b = max(1, cfg.data.batch_size // max(ranks, 1))  # a rank's share, as it will run
    state = {"adam": 2.0, "sgd": 1.0 if cfg.optim.momentum else 0.0}.get(cfg.optim.name, 1.0)
    # Residual networks can also go layer-parallel: their blocks' span and MGRIT's costs.
    return profile_model(model, torch.randn(b, *ds.input_shape, dtype=dtype),
                         mgrit=cfg.mgrit.solver(), optimizer_state=state, optimizer=cfg.optim.name)


def _search(cfg, hw, ranks: int, profiled):
    from mltrain.planner.search import plan

    prof, residual = profiled
    mgrit = cfg.mgrit.solver()
    configs = plan(prof, hw, ranks, cfg.data.batch_size, residual=residual, mgrit=mgrit)
    if configs:
        return configs
    import dataclasses

    roomy = dataclasses.replace(hw, memory_per_rank=1e300)  # no limit
    need = plan(prof, roomy, ranks, cfg.data.batch_size, residual=residual, mgrit=mgrit)
    if not need:
        raise ConfigError(f"--ranks: no decomposition of {ranks} ranks splits the global batch "
                          f"of {cfg.data.batch_size} evenly")
    small = min(need, key=lambda c: c["memory_bytes"])
    raise ConfigError(f"no configuration fits in {hw.memory_per_rank / 2**20:.1f} MiB per rank: "
                      f"the smallest needs {small['memory_bytes'] / 2**20:.1f} MiB (data="
                      f"{small['data']}, pipe={small['pipe']}, microbatches="
                      f"{small['microbatches']}); more ranks or memory would fit")


def run_plan(cfg, args) -> int:
    from mltrain.planner.cost import load_hardware

    hw = load_hardware(args.hardware)
    check_ranks(args.ranks)
    if args.top < 1:
        raise ConfigError(f"--top: must be at least 1, got {args.top}")
    configs = _search(cfg, hw, args.ranks, _profile(cfg, args.ranks))
    top = configs[:args.top]
    print(f"plan: {cfg.model.name} depth {cfg.model.depth} width {cfg.model.width}, global "
          f"batch {cfg.data.batch_size}, {args.ranks} ranks ({len(configs)} feasible)")
    print(f"  {'data':>5}{'pipe':>5}{'layer':>6}{'M':>4}{'schedule':>9}{'step ms':>10}"
          f"{'memory MiB':>12}{'comm MB':>9}  balance")
    for c in top:
        print(f"  {c['data']:>5}{c['pipe']:>5}{c['layer']:>6}{c['microbatches']:>4}"
              f"{c['schedule']:>9}"
              f"{c['predicted_step_s'] * 1e3:>10.3f}{c['memory_bytes'] / 2**20:>12.1f}"
              f"{c['comm_bytes'] / 1e6:>9.2f}  {','.join(map(str, c['balance']))}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ranks": args.ranks, "configs": top}, f, indent=2)
    if args.write:
        best = top[0]
        cfg.parallel.data, cfg.parallel.pipe = best["data"], best["pipe"]
        cfg.parallel.layer = best["layer"]
        if best["pipe"] > 1:
            cfg.pipeline.microbatches = best["microbatches"]
            cfg.pipeline.schedule = best["schedule"]
            cfg.pipeline.balance = ",".join(map(str, best["balance"]))
        with open(args.write, "w") as f:
            f.write(to_toml(cfg))
        print(f"  wrote the best configuration to {args.write}")
    return 0


def run_simulate(cfg, args) -> int:
    from mltrain.planner.cost import load_hardware

    hw = load_hardware(args.hardware)
    try:
        counts = [int(r) for r in args.ranks.split(",")]
    except ValueError:
        raise ConfigError(f"--ranks: expected comma-separated rank counts, got "
                          f"{args.ranks!r}") from None
    for n in counts:
        check_ranks(n)
    prof, residual = _profile(cfg, 1)
    rows = []
    from mltrain.planner.search import plan

    for P in counts:
        configs = plan(prof, hw, P, cfg.data.batch_size, residual=residual,
                       mgrit=cfg.mgrit.solver())
        if not configs:
            rows.append({"ranks": P, "feasible": False})
            continue
        best = configs[0]
        rows.append({"ranks": P, "feasible": True, **best})
    base = next((r for r in rows if r["feasible"]), None)
    for r in rows:  # strong scaling of the fixed global batch
        if r["feasible"] and base is not None:
            r["efficiency"] = (base["predicted_step_s"] * base["ranks"]
                               / (r["predicted_step_s"] * r["ranks"]))
    print(f"simulate: {cfg.model.name} depth {cfg.model.depth} width {cfg.model.width}, "
          f"global batch {cfg.data.batch_size}")
    print(f"  {'ranks':>6}{'data':>5}{'pipe':>5}{'layer':>6}{'M':>4}{'step ms':>10}"
          f"{'efficiency':>11}{'MB/step':>9}")
    for r in rows:
        if not r["feasible"]:
            print(f"  {r['ranks']:>6}  no feasible configuration")
            continue
        print(f"  {r['ranks']:>6}{r['data']:>5}{r['pipe']:>5}{r['layer']:>6}{r['microbatches']:>4}"
              f"{r['predicted_step_s'] * 1e3:>10.3f}{r['efficiency']:>11.2f}"
              f"{r['comm_bytes'] / 1e6:>9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=2)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ok = [r for r in rows if r["feasible"]]
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
        ax[0].loglog([r["ranks"] for r in ok], [r["predicted_step_s"] for r in ok], "o-")
        ax[0].set(xlabel="ranks", ylabel="predicted step [s]")
        ax[1].semilogx([r["ranks"] for r in ok], [r["efficiency"] for r in ok], "o-")
        ax[1].set(xlabel="ranks", ylabel="scaling efficiency", ylim=(0, 1.05))
        for a in ax:
            a.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        plt.close(fig)
    return 0
