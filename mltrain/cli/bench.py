"""``mltrain bench dp``: mltrain's data-parallel step against torch DDP (NCCL when every
rank has a GPU of its own, gloo otherwise) and against a plain single-process PyTorch loop
(the same model, optimizer and batch, no communication: what one rank costs at best), and
the reducer's effective bandwidth against one raw mpi4py Allreduce of the same bytes in host
memory (on a GPU: the staged reducer, copies included). ``run.device`` picks the device.

Both variants run in the same processes, on the same model, batch and ranks, interleaved
in rounds so that machine noise hits both alike. Only ratios are meant to be compared.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import socket
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

from mltrain.cli.timing import mean_of_slowest
from mltrain.comm import GradReducer, broadcast_parameters, local_cpu_masks
from mltrain.config import ConfigError
from mltrain.nn import build_model
from mltrain.optim import build_optimizer
from mltrain.utils import seed_everything, set_threads, torch_dtype

# The benchmark's model when the config keeps the built-in default (which is too small to
# say anything about communication): a residual MLP of about 8.4 M parameters.
_BENCH_DEFAULTS = {"width": 1024, "depth": 8, "batch_size": 128}


def _bench_shape(cfg) -> tuple[int, int, int]:
    """(width, depth, global batch): the config's where it departs from the built-in
    default, the benchmark's defaults otherwise."""
    model_default, data_default = type(cfg.model)(), type(cfg.data)()
    pick = lambda value, default, key: value if value != default else _BENCH_DEFAULTS[key]  # noqa: E731
    return (pick(cfg.model.width, model_default.width, "width"),
            pick(cfg.model.depth, model_default.depth, "depth"),
            pick(cfg.data.batch_size, data_default.batch_size, "batch_size"))


def _ddp_backend(comm: MPI.Comm, device: torch.device) -> str:
    """NCCL when every rank drives a GPU no other rank drives (NCCL refuses two ranks on
    one GPU), gloo otherwise. Collective on ``comm``."""
    import torch.distributed as dist

    gpu = None
    if device.type == "cuda" and dist.is_nccl_available():
        gpu = (MPI.Get_processor_name(), str(torch.cuda.get_device_properties(device).uuid))
    gpus = comm.allgather(gpu)
    return "nccl" if None not in gpus and len(set(gpus)) == len(gpus) else "gloo"


def _init_dist(comm: MPI.Comm, backend: str = "gloo"):
    import torch.distributed as dist

    if dist.is_initialized():
        return dist
    host = comm.bcast(socket.gethostname() if comm.Get_rank() == 0 else None)
    port = None
    if comm.Get_rank() == 0:
        with socket.socket() as s:  # a free port chosen by the OS
            s.bind(("", 0))
            port = s.getsockname()[1]
    port = comm.bcast(port)
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}",
                            rank=comm.Get_rank(), world_size=comm.Get_size())
    return dist


def _synced(device: torch.device):
    """A decorator that ends each call when the device's queued kernels have run (every
    method alike: a training loop that logs its loss waits for it each step)."""
    def wrap(fn):
        if device.type != "cuda":
            return fn

        def call():
            fn()
            torch.cuda.synchronize(device)
        return call
    return wrap


def _torch_step(model: torch.nn.Module, x, y):
    """One step of the usual PyTorch loop (SGD with momentum, as mltrain's side runs)."""
    opt = build_optimizer("sgd", model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def bench_dp(cfg, steps: int, reps: int, comm: MPI.Comm = MPI.COMM_WORLD) -> dict:
    """Runs the benchmark and returns its figures. Collective on ``comm``."""
    from mltrain.comm import Grid
    from mltrain.optim.base import Batches, Context, Straggler
    from mltrain.train.optimizers import build_method
    from mltrain.train.parallelize import parallelize

    from mltrain.comm import node_rank
    from mltrain.utils.device import select_device

    P = comm.Get_size()
    threads = set_threads(cfg.run.threads, local_cpu_masks(comm))
    device = select_device(cfg.run.device, node_rank(comm)[0])
    width, depth, batch = _bench_shape(cfg)
    if batch % P:
        raise ConfigError(f"data.batch_size: {batch} is not divisible by {P} ranks")
    dtype = torch_dtype(cfg.run.dtype)
    seed_everything(cfg.run.seed)
    shape, classes = (1, 8, 8), 10
    model = build_model(cfg.model.name, shape, classes, width=width, depth=depth,
                        dtype=dtype).to(device)
    broadcast_parameters(model, comm)
    ddp_model, plain_model = copy.deepcopy(model), copy.deepcopy(model)
    g = torch.Generator().manual_seed(cfg.run.seed + comm.Get_rank())
    x = torch.randn(batch // P, *shape, generator=g, dtype=dtype).to(device)
    y = torch.randint(0, classes, (batch // P,), generator=g).to(device)
    synced = _synced(device)

    # (a) mltrain: the Trainer's own step (its layout and optimizer: SGD with the allreduce
    # scheme, whose bucketed reducer overlaps the backward pass)
    run = dataclasses.replace(
        cfg, optim=dataclasses.replace(cfg.optim, name="sgd", lr=1e-3, momentum=0.9),
        parallel=dataclasses.replace(cfg.parallel, data=0, pipe=1, layer=1),
        sync=dataclasses.replace(cfg.sync, name="allreduce", compression="none"))
    gc = Grid.for_world(P).build(comm)
    layout = parallelize(model, gc, run)
    method = build_method(Context(run, layout, layout.module, Straggler()))

    @synced
    def ml_step():
        method.step(Batches(None, 0, P, batch, fixed=(x, y)))

    # (b) torch DDP
    backend = _ddp_backend(comm, device)
    dist = _init_dist(comm, backend)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(ddp_model, bucket_cap_mb=cfg.comm.bucket_mb,
              device_ids=[device.index] if backend == "nccl" else None)
    ddp_step = synced(_torch_step(ddp, x, y))
    # (c) the plain PyTorch loop: this rank alone, no communication
    plain_step = synced(_torch_step(plain_model, x, y))

    for _ in range(3):  # warm-up: allocator, first-touch, connection set-up, CUDA kernels
        ml_step()
        ddp_step()
        plain_step()
    rounds = 3
    per = max(1, steps // rounds)
    t_ml, t_ddp, t_plain = [], [], []
    for _ in range(rounds):
        t_ml.append(mean_of_slowest(comm, ml_step, per))
        t_ddp.append(mean_of_slowest(comm, ddp_step, per))
        t_plain.append(mean_of_slowest(comm, plain_step, per))
    step_ml, step_ddp = statistics.median(t_ml), statistics.median(t_ddp)
    step_plain = statistics.median(t_plain)

    method.close()
    gc.free()
    # (c) reduction bandwidth: the reducer itself (a component benchmark) on ready
    # gradients vs one raw Allreduce of the same bytes
    reducer = GradReducer(model.parameters(), comm, int(cfg.comm.bucket_mb * 2**20),
                          cfg.comm.grad_as_bucket_view, cfg.comm.max_inflight)
    n = reducer.num_elements
    nbytes = n * torch.tensor([], dtype=dtype).element_size()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    flat = np.random.default_rng(0).standard_normal(n).astype(
        np.float64 if dtype == torch.float64 else np.float32)
    raw = lambda: comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)  # noqa: E731
    reduce = synced(reducer.reduce)
    raw()
    reduce()
    t_raw, t_red = [], []
    for _ in range(rounds):
        t_raw.append(mean_of_slowest(comm, raw, max(1, reps // rounds)))
        t_red.append(mean_of_slowest(comm, reduce, max(1, reps // rounds)))
    t_raw_s, t_red_s = statistics.median(t_raw), statistics.median(t_red)
    dist.destroy_process_group()
    reducer.remove()
    return {
        "ranks": P, "threads_per_rank": threads, "model": cfg.model.name, "width": width,
        "depth": depth, "parameters": n, "global_batch": batch, "dtype": cfg.run.dtype,
        "device": str(device), "gpu": torch.cuda.get_device_name(device)
        if device.type == "cuda" else None, "ddp_backend": backend,
        "staged": any(b.stage.staged for b in reducer.buckets),
        "bucket_mb": cfg.comm.bucket_mb, "grad_as_bucket_view": cfg.comm.grad_as_bucket_view,
        "mltrain_step_s": step_ml, "ddp_step_s": step_ddp, "plain_step_s": step_plain,
        "step_ratio_vs_ddp": step_ml / step_ddp, "step_ratio_vs_plain": step_ml / step_plain,
        "reduce_bytes": nbytes, "raw_allreduce_s": t_raw_s, "reducer_s": t_red_s,
        # One rank reduces nothing: no bandwidth to speak of.
        "raw_bandwidth_GBps": nbytes / t_raw_s / 1e9 if P > 1 else None,
        "reducer_bandwidth_GBps": nbytes / t_red_s / 1e9 if P > 1 else None,
        "bandwidth_ratio_vs_raw": t_raw_s / t_red_s if P > 1 else None,
    }


# Schemes compared by `bench sync`: (label, config overrides).
SYNC_SCHEMES = [
    ("allreduce", []),
    ("localsgd-16", ["sync.name=localsgd", "sync.period=16"]),
    ("easgd-4", ["sync.name=easgd", "sync.period=4"]),
    ("sgp", ["sync.name=sgp"]),
    ("sgp-async", ["sync.name=sgp", "sync.asynchronous=true"]),
    ("dpsgd", ["sync.name=dpsgd"]),
    ("hierarchical-8", ["sync.name=hierarchical", "sync.period=8", "sync.ranks_per_node=1"]),
    ("allreduce+fp16", ["sync.compression=fp16"]),
    ("allreduce+bf16", ["sync.compression=bf16"]),
    ("allreduce+topk-0.01", ["sync.compression=topk", "sync.topk_ratio=0.01"]),
    ("allreduce+powersgd-2", ["sync.compression=powersgd", "sync.rank=2"]),
]


def bench_sync(cfg, steps: int, comm: MPI.Comm = MPI.COMM_WORLD) -> dict:
    """Step time and bytes per step of every scheme relative to allreduce, without and
    with a 2x straggler on the last rank. Collective on ``comm``."""
    from mltrain.comm import STATS
    from mltrain.config import load_config, to_toml
    from mltrain.train import Trainer

    P = comm.Get_size()
    base_text = to_toml(cfg)
    width, depth, batch = _bench_shape(cfg)
    rows = []
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(base_text)
        f.flush()
        for label, extra in SYNC_SCHEMES:
            row = {"scheme": label}
            for tag, straggle in (("", []), ("_straggler", [f"run.straggler={P - 1}:2"])):
                c = load_config(f.name, [f"model.width={width}", f"model.depth={depth}",
                                         f"data.batch_size={batch}", "data.name=synthetic",
                                         "optim.name=sgd", "optim.lr=0.01",
                                         f"run.steps={steps + 3}", "checkpoint.dir=",
                                         "checkpoint.every=0", "checkpoint.resume=false"]
                                + extra + straggle)
                t = Trainer(c, comm, quiet=True, metrics=False)
                for _ in range(3):  # warm-up
                    x, y = t.loader.batch(0, t.step % t.steps_per_epoch)
                    t.train_step(x, y)
                    t.step += 1
                comm.Barrier()
                b0 = STATS.bytes
                t0 = time.perf_counter()
                for _ in range(steps):
                    x, y = t.loader.batch(t.step // t.steps_per_epoch,
                                          t.step % t.steps_per_epoch)
                    t.train_step(x, y)
                    t.step += 1
                mine = (time.perf_counter() - t0) / steps
                sent = (STATS.bytes - b0) / steps
                t.close()
                comm.Barrier()
                # Mean over ranks: a scheme that lets fast ranks run on shows it here.
                row["step_s" + tag] = comm.allreduce(mine) / P
                row["bytes_per_step" + tag] = comm.allreduce(sent) / P
            row["straggler_growth"] = row["step_s_straggler"] / row["step_s"]
            rows.append(row)
    ref = rows[0]
    for row in rows:
        row["step_ratio"] = row["step_s"] / ref["step_s"]
        row["bytes_ratio"] = (row["bytes_per_step"] / ref["bytes_per_step"]
                              if ref["bytes_per_step"] else float("nan"))
    return {"ranks": P, "model": f"resnet width {width} depth {depth}", "global_batch": batch,
            "steps": steps, "schemes": rows}


def _write_json(path: str | None, what: str, res: dict) -> None:
    """Writes a benchmark's figures to ``--json`` (rank 0 only calls it)."""
    if path:
        with open(path, "w") as f:
            json.dump({"bench": what, **res}, f, indent=2)


def parse_sizes(text: str) -> tuple[int, ...] | None:
    """``--sizes`` ("1e4,1e6") as element counts, None when empty; ConfigError naming it
    otherwise. Not collective."""
    if not text:
        return None
    try:
        sizes = tuple(int(float(s)) for s in text.split(","))
    except (ValueError, OverflowError):
        raise ConfigError(f"--sizes: expected comma-separated element counts such as "
                          f"1e4,1e6, got {text!r}") from None
    if not all(1 <= s <= 1 << 31 for s in sizes):
        raise ConfigError(f"--sizes: element counts must lie in 1..{1 << 31}, got {text!r}")
    return sizes


def check_args(what: str, cfg, args, ranks: int) -> None:
    """Every bench option and config value a benchmark depends on, checked before any
    measurement: ConfigError naming the option. Not collective (every rank alike)."""
    if args.steps < 0 or args.reps < 0:
        raise ConfigError(f"--steps {args.steps} / --reps {args.reps}: counts cannot be "
                          "negative (0 = the benchmark's default)")
    if not (math.isfinite(args.budget) and args.budget > 0):
        raise ConfigError(f"--budget: expected a positive number of gradient equivalents, "
                          f"got {args.budget}")
    if not (math.isfinite(args.target) and args.target >= 0):
        raise ConfigError(f"--target: expected a training loss >= 0, got {args.target}")
    if args.from_json and what != "multilevel":
        raise ConfigError(f"--from-json: only bench multilevel renders a saved run, not "
                          f"bench {what}")
    if what == "mgrit" and args.cf < 2:
        raise ConfigError(f"--cf: the coarsening factor must be at least 2, got {args.cf}")
    if what == "kernels":
        if ranks > 1:
            raise ConfigError("bench kernels: run it as one process (no mpiexec -n > 1)")
        parse_sizes(args.sizes)
    if what in ("dp", "sync"):
        batch = _bench_shape(cfg)[2]
        if batch % ranks:
            raise ConfigError(f"data.batch_size: {batch} is not divisible by {ranks} ranks")


def run_bench(what: str, cfg, args, comm: MPI.Comm) -> int:
    """Runs one benchmark (``BENCHMARKS[what]``), prints its figures on rank 0, writes
    --json. Collective on ``comm``."""
    from mltrain.cli import check_writable
    from mltrain.comm import agree

    agree(comm, lambda: check_writable(args.json, "--json"), what="config")
    agree(comm, lambda: check_args(what, cfg, args, comm.Get_size()), what="config")
    return BENCHMARKS[what](what, cfg, args, comm)


def _tr(what: str, cfg, args, comm: MPI.Comm) -> int:
    from mltrain.cli import check_writable
    from mltrain.cli.bench_tr import bench_tr
    from mltrain.cli.race import plot
    from mltrain.comm import agree

    agree(comm, lambda: check_writable(args.plot, "--plot"), what="config")
    res = bench_tr(args.config, args.overrides, comm, budget=args.budget)
    if comm.Get_rank() == 0:
        print(f"bench tr: {res['dataset']}, {res['model']}, {res['ranks']} rank(s), "
              f"{res['budget']:g} gradient equivalents of work each")
        print(f"  {'method':<12}{'steps':>7}{'work':>8}{'wall s':>9}{'train loss':>12}"
              f"{'test acc':>10}")
        for r in res["methods"]:
            print(f"  {r['method']:<12}{r['steps']:>7}{r['work']:>8.2f}{r['wall_s']:>9.2f}"
                  f"{r['train_loss']:>12.4f}{r['test_accuracy']:>10.4f}")
        _write_json(args.json, what, res)
        if args.plot and plot is not None:
            plot(res, args.plot)
    return 0


def _kernels(what: str, cfg, args, comm: MPI.Comm) -> int:
    from mltrain.cli.bench_kernels import bench_kernels

    sizes = parse_sizes(args.sizes)
    res = bench_kernels(sizes) if sizes else bench_kernels()
    print(f"bench kernels: {res['threads']} threads; speedup = torch reference time / "
          "kernel time (best of several runs)")
    names = list(res["speedup_at_largest"])
    sizes = sorted({r["elements"] for r in res["rows"]})
    print(f"  {'kernel':<26}" + "".join(f"{n:>10.0e}" for n in sizes))
    for name in names:
        cells = {r["elements"]: r["speedup"] for r in res["rows"] if r["kernel"] == name}
        print(f"  {name:<26}" + "".join(f"{cells[n]:>10.2f}" for n in sizes))
    _write_json(args.json, what, res)
    return 0


def _sync(what: str, cfg, args, comm: MPI.Comm) -> int:
    # A whole number of every scheme's period (16, 8, 4) in the timed window.
    res = bench_sync(cfg, args.steps or 32, comm)
    if comm.Get_rank() == 0:
        print(f"bench sync: {res['ranks']} ranks, {res['model']}, global batch "
              f"{res['global_batch']}, {res['steps']} timed steps; ratios vs allreduce")
        print(f"  {'scheme':<22}{'step ms':>9}{'ratio':>7}{'MB/step':>10}{'bytes ratio':>13}"
              f"{'2x straggler ms':>17}{'growth':>8}")
        for r in res["schemes"]:
            print(f"  {r['scheme']:<22}{r['step_s'] * 1e3:>9.1f}{r['step_ratio']:>7.2f}"
                  f"{r['bytes_per_step'] / 1e6:>10.3f}{r['bytes_ratio']:>13.4f}"
                  f"{r['step_s_straggler'] * 1e3:>17.1f}{r['straggler_growth']:>8.2f}")
        _write_json(args.json, what, res)
    return 0


def _dp(what: str, cfg, args, comm: MPI.Comm) -> int:
    res = bench_dp(cfg, args.steps or 30, args.reps or 20, comm)
    if comm.Get_rank() == 0:
        print(f"bench dp: {res['ranks']} ranks x {res['threads_per_rank']} threads on "
              f"{res['device']}{' (' + res['gpu'] + ')' if res['gpu'] else ''}, "
              f"{res['model']} {res['parameters'] / 1e6:.2f} M parameters, global batch "
              f"{res['global_batch']}, {res['dtype']}"
              f"{', reducer staged through host memory' if res['staged'] else ''}")
        print(f"  step      mltrain {res['mltrain_step_s'] * 1e3:8.2f} ms   "
              f"DDP({res['ddp_backend']}) {res['ddp_step_s'] * 1e3:8.2f} ms   ratio "
              f"{res['step_ratio_vs_ddp']:.3f}  (lower is better)")
        print(f"  step      mltrain {res['mltrain_step_s'] * 1e3:8.2f} ms   plain loop "
              f"{res['plain_step_s'] * 1e3:8.2f} ms   ratio {res['step_ratio_vs_plain']:.3f}"
              "  (one rank's best; lower is better)")
        if res["ranks"] > 1:
            print(f"  reduce    reducer {res['reducer_bandwidth_GBps']:8.2f} GB/s  raw "
                  f"Allreduce {res['raw_bandwidth_GBps']:8.2f} GB/s  ratio "
                  f"{res['bandwidth_ratio_vs_raw']:.3f}  (higher is better)")
        _write_json(args.json, what, res)
    return 0


def _print_multilevel(res: dict) -> None:
    """The console table of a bench multilevel result. Not collective."""
    from mltrain.cli.bench_multilevel import stats_text

    print(f"bench multilevel: {res['dataset']}, {res['model']}, batch {res['batch']} "
          f"(large {res['large_batch']}), {res['ranks']} rank(s), {res['seeds']} seeds; "
          f"target training loss {res['target']:g}"
          + (f", test accuracy {res['target_acc']:g}" if res["target_acc"] else "")
          + f"; budget {res['budget']:g} fine-gradient equivalents; medians [IQR]"
          + (f"; CPU {res['cpu']}" if res.get("cpu") else ""))

    def cell(s, fmt="{:.2f}"):
        return stats_text(s, res["seeds"], fmt)

    print(f"  {'regime/init':<20}{'method':<12}{'work@target':>24}{'wall s@target':>24}"
          f"{'steps@target':>22}{'steps@acc':>20}{'test acc':>9}{'TR/this':>8}"
          f"{'Adam/this steps':>16}")
    for c in res["cells"]:
        r1 = f"{c['work_ratio_vs_tr']:.2f}" if c["work_ratio_vs_tr"] else "-"
        r2 = f"{c['steps_ratio_vs_adam']:.2f}" if c["steps_ratio_vs_adam"] else "-"
        print(f"  {c['regime'] + '/' + c['init']:<20}{c['method']:<12}"
              f"{cell(c['work_to_target']):>24}{cell(c['wall_to_target'], '{:.1f}'):>24}"
              f"{cell(c['steps_to_target'], '{:.0f}'):>22}"
              f"{cell(c['steps_to_acc'], '{:.0f}'):>20}"
              f"{c['test_accuracy']['median']:>9.4f}{r1:>8}{r2:>16}")
    if res.get("milestones"):
        print("  work to each training loss (TR / this): "
              + ", ".join(f"{v:g}" for v in res["milestones"]))
        for c in res["cells"]:
            print(f"  {c['regime'] + '/' + c['init']:<20}{c['method']:<12}" + "".join(
                f"{cell(s) + (f', {r:.2f}x' if r else ''):>32}"
                for s, r in zip(c["work_to_milestones"], c["milestone_ratios_vs_tr"])))


def _multilevel(what: str, cfg, args, comm: MPI.Comm) -> int:
    """Runs bench multilevel, or with ``--from-json`` renders a saved run again (no
    training). Collective on ``comm``."""
    import os

    from mltrain.cli import check_writable
    from mltrain.cli.bench_multilevel import (INITS, MAX_MILESTONES, METHODS, REGIMES,
                                              bench_multilevel, load_result, markdown, plot)
    from mltrain.comm import agree

    def listed(text, choices, flag):
        items = [m for m in text.split(",") if m]
        unknown = sorted(set(items) - set(choices))
        if unknown:
            raise ConfigError(f"{flag}: unknown {', '.join(unknown)} (choose from "
                              f"{', '.join(choices)})")
        return items

    def check():
        check_writable(args.plot, "--plot")
        check_writable(args.markdown, "--markdown")
        if args.from_json:
            if args.milestones:
                raise ConfigError("--milestones: the work to a loss is recorded while "
                                  "training; a saved run (--from-json) has the milestones "
                                  "it was run with")
            for flag, out in (("--json", args.json), ("--plot", args.plot),
                              ("--markdown", args.markdown)):
                if out and os.path.exists(out) and os.path.samefile(out, args.from_json):
                    raise ConfigError(f"{flag} {out}: is the --from-json input; it would be "
                                      "overwritten")
            return load_result(args.from_json)
        for flag, value in (("--seeds", args.seeds), ("--lrs", args.lrs),
                            ("--large-batch", args.large_batch)):
            if value < 1:
                raise ConfigError(f"{flag}: must be at least 1, got {value}")
        if not 0 <= args.resolution < 1:
            raise ConfigError(f"--resolution: must lie in [0, 1), got {args.resolution}")
        if not (args.budget > 0 and math.isfinite(args.budget)):
            raise ConfigError(f"--budget: must be positive and finite, got {args.budget}")
        return (milestones(),) + (listed(args.methods, METHODS, "--methods"),
                listed(args.regimes, REGIMES, "--regimes") or REGIMES,
                listed(args.inits, INITS, "--inits") or INITS)

    def milestones():
        try:
            levels = [float(v) for v in args.milestones.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--milestones: expected comma-separated losses, got "
                              f"{args.milestones!r}") from None
        if len(levels) > MAX_MILESTONES or len(set(levels)) != len(levels) or not all(
                math.isfinite(v) and v > args.target for v in levels):
            raise ConfigError(f"--milestones: at most {MAX_MILESTONES} distinct finite losses, "
                              f"each above --target {args.target:g} (a run may end once it "
                              f"reaches the target), got {args.milestones!r}")
        return tuple(sorted(levels, reverse=True))
    checked = agree(comm, check, what="config")
    rank0 = comm.Get_rank() == 0
    if args.from_json:
        res = checked
        res.pop("bench")
    else:
        levels, only, regimes, inits = checked
        res = bench_multilevel(args.config, args.overrides, comm, budget=args.budget,
                               target=args.target, target_acc=args.target_acc,
                               regimes=regimes, inits=inits, seeds=args.seeds, lrs=args.lrs,
                               large_batch=args.large_batch, only=only or None,
                               resolution=args.resolution, milestones=levels,
                               log=(lambda m: print(m, flush=True)) if rank0
                               else (lambda m: None))
    if rank0:
        _print_multilevel(res)
        _write_json(args.json, "multilevel", res)
        if args.plot:
            plot(res, args.plot)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(markdown(res))
    return 0


def _mgrit(what: str, cfg, args, comm: MPI.Comm) -> int:
    from mltrain.cli.bench_mgrit import bench_mgrit
    from mltrain.comm import agree

    def depths():
        try:
            return tuple(int(d) for d in args.depths.split(","))
        except ValueError:
            raise ConfigError(f"--depths: expected comma-separated integers, got "
                              f"{args.depths!r}") from None
    if args.cf < 2:
        raise ConfigError(f"--cf: the coarsening factor must be at least 2, got {args.cf}")
    res = bench_mgrit(comm, agree(comm, depths, what="config"), cf=args.cf)
    if comm.Get_rank() == 0:
        c = res["costs"][max(res["costs"], key=int)]
        print(f"bench mgrit: {res['ranks']} rank(s), width {res['width']}, batch "
              f"{res['batch']}, cf {res['cf']}; unit costs at the largest depth [us]: "
              + ", ".join(f"{k} {v * 1e6:.1f}" for k, v in c.items()
                          if not k.startswith("overhead"))  # per configuration
              + "; a pass's overhead is measured per configuration")
        print(f"  {'layers':>6}{'levels':>7}{'iters':>6}{'serial s':>10}{'mgrit s':>9}"
              f"{'speedup':>8}{'model s':>9}{'model err':>10}")
        for r in res["rows"]:
            print(f"  {r['layers']:>6}{r['levels']:>7}{r['iters']:>6}{r['serial_s']:>10.4f}"
                  f"{r['time_s']:>9.4f}{r['speedup']:>8.2f}{r['predicted_s']:>9.4f}"
                  f"{r['model_error']:>10.2f}")
        print(f"  speedup (2 forward, 1 adjoint iteration): {res['speedup']}; largest model "
              f"error {res['model_error']:.2f}")
        _write_json(args.json, "mgrit", res)
    return 0


def _pipeline(what: str, cfg, args, comm: MPI.Comm) -> int:
    from mltrain.cli import check_writable
    from mltrain.cli.bench_pipeline import bench_pipeline, hardware_toml, measure_hardware
    from mltrain.comm import agree

    agree(comm, lambda: check_writable(args.out, "--out"), what="config")
    if what == "hardware":
        hw = measure_hardware(comm)
        if comm.Get_rank() == 0:
            text = hardware_toml(hw)
            print(text, end="")
            if args.out:
                with open(args.out, "w") as f:
                    f.write(text)
            _write_json(args.json, what, hw.__dict__)
        return 0
    res = bench_pipeline(cfg, comm, args.steps or 10)
    if comm.Get_rank() == 0:
        print(f"bench pipeline: {res['ranks']} rank(s), {res['model']}, global batch "
              f"{res['batch']}; step times (median), planner predictions")
        print(f"  {'data':>5}{'pipe':>5}{'layer':>6}{'M':>4}{'schedule':>9}{'step ms':>9}"
              f"{'vs unpiped':>11}{'model ms':>9}{'error':>7}  balance")
        for r in res["rows"]:
            print(f"  {r['data']:>5}{r['pipe']:>5}{r['layer']:>6}{r['microbatches']:>4}"
                  f"{r['schedule']:>9}"
                  f"{r['time_s'] * 1e3:>9.2f}{r['ratio_vs_unpipelined']:>11.2f}"
                  f"{r['predicted_s'] * 1e3:>9.2f}{r['model_error']:>7.2f}  "
                  f"{','.join(map(str, r['balance']))}")
        print(f"  largest model error {res['model_error']:.2f}; the planner's top choice "
              f"{res['top_choice']} measures {res['top_choice_vs_fastest']:.2f}x the fastest")
        _write_json(args.json, what, res)
    return 0


# `mltrain bench WHAT`: each runner takes (what, cfg, args, comm); startup runs without MPI
# (mltrain.cli.bench_startup, started by the CLI itself).
def _search(what: str, cfg, args, comm: MPI.Comm) -> int:
    from mltrain.cli import check_writable
    from mltrain.cli.bench_search import DATASETS, METHODS, bench_search, check, markdown, plot
    from mltrain.comm import agree

    def parse():
        check_writable(args.plot, "--plot")
        check_writable(args.markdown, "--markdown")
        methods = [m for m in args.methods.split(",") if m] or METHODS
        datasets = [d for d in args.datasets.split(",") if d]
        for items, known, flag in ((methods, METHODS, "--methods"),
                                   (datasets, list(DATASETS), "--datasets")):
            unknown = sorted(set(items) - set(known))
            if unknown or not items:
                raise ConfigError(f"{flag}: unknown or empty {', '.join(unknown)} (choose "
                                  f"from {', '.join(known)})")
        if args.seeds < 1:
            raise ConfigError(f"--seeds: must be at least 1, got {args.seeds}")
        if not (math.isfinite(args.budget) and 1 <= args.budget <= 1000):
            raise ConfigError(f"--budget: full trials per search, from 1 to 1000, got "
                              f"{args.budget}")
        check(methods, datasets, cfg.data.path)
        return methods, datasets
    methods, datasets = agree(comm, parse, what="config")
    res = bench_search(comm, datasets, methods, args.seeds, args.budget, cfg.data.path,
                       _say(comm))
    return _publish(what, args, comm, res, markdown, plot)


def _ps(what: str, cfg, args, comm: MPI.Comm) -> int:
    from mltrain.cli import check_writable
    from mltrain.cli.bench_ps import DEFAULT, bench_ps, check, markdown, plot
    from mltrain.comm import agree

    if args.transport:
        return _ps_transport(what, args, comm)

    def parse():
        check_writable(args.plot, "--plot")
        check_writable(args.markdown, "--markdown")
        schemes = [m for m in args.methods.split(",") if m] or DEFAULT
        parts = [p for p in args.partitions.split(",") if p]
        check(schemes, parts, comm.Get_size(), args.steps or 200)
        if cfg.data.batch_size % (comm.Get_size() - 1):
            raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is not divisible by "
                              f"the {comm.Get_size() - 1} workers")
        return schemes, parts
    schemes, parts = agree(comm, parse, what="config")
    res = bench_ps(cfg, schemes, parts, args.steps or 200, comm, _say(comm))
    return _publish(what, args, comm, res, markdown, plot)


def _ps_transport(what: str, args, comm: MPI.Comm) -> int:
    from mltrain.cli import check_writable
    from mltrain.cli.bench_ps_transport import bench_transport, markdown
    from mltrain.comm import agree

    def parse():
        check_writable(args.markdown, "--markdown")
        if comm.Get_size() < 2:
            raise ConfigError("bench ps --transport: needs at least 2 ranks (a server and a "
                              "worker)")
        if args.steps < 0:
            raise ConfigError(f"--steps: at least 1, got {args.steps}")
        return parse_sizes(args.sizes) or (10_000, 1_000_000, 2_000_000)
    sizes = agree(comm, parse, what="config")
    res = bench_transport(sizes, args.steps or 100, comm)
    return _publish(what, args, comm, res, markdown, None)


def _say(comm: MPI.Comm):
    """Progress lines: printed on rank 0, dropped elsewhere. Not collective."""
    return (lambda m: print(m, flush=True)) if comm.Get_rank() == 0 else (lambda m: None)


def _publish(what: str, args, comm: MPI.Comm, res, markdown, plot) -> int:
    """Rank 0 prints ``markdown(res)`` and writes --json, --markdown and --plot. Not
    collective."""
    if comm.Get_rank() == 0:
        text = markdown(res)
        print(text)
        _write_json(args.json, what, res)
        if args.markdown:
            Path(args.markdown).write_text(text)
        if args.plot:
            plot(res, args.plot)
    return 0


def _prices(what: str, cfg, args, comm: MPI.Comm) -> int:
    from mltrain.cli import check_writable
    from mltrain.cli.bench_prices import bench_prices, markdown
    from mltrain.comm import agree

    def check():
        if args.plot:
            raise ConfigError("--plot: bench prices draws no plot (use --json or --markdown)")
        check_writable(args.markdown, "--markdown")
    agree(comm, check, what="config")
    res = bench_prices(args.config, args.overrides, comm, reps=args.reps or 12)
    return _publish(what, args, comm, res, markdown, None)


BENCHMARKS = {"dp": _dp, "sync": _sync, "kernels": _kernels, "tr": _tr,
              "multilevel": _multilevel, "mgrit": _mgrit, "hardware": _pipeline,
              "pipeline": _pipeline, "search": _search, "ps": _ps,
              "prices": _prices}
