"""``mltrain bench dp``: mltrain's data-parallel step against torch DDP (gloo), and the
reducer's effective bandwidth against one raw mpi4py Allreduce of the same bytes.

Both variants run in the same processes, on the same model, batch and ranks, interleaved
in rounds so that machine noise hits both alike. Only ratios are meant to be compared.
"""
from __future__ import annotations

import copy
import json
import socket
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

from mltrain.comm import GradReducer, broadcast_parameters
from mltrain.config import ConfigError
from mltrain.nn import build_model
from mltrain.optim import build_optimizer
from mltrain.utils import seed_everything, set_threads, torch_dtype

# The benchmark's model when the config keeps the built-in default (which is too small to
# say anything about communication): a residual MLP of about 8.4 M parameters.
_BENCH_DEFAULTS = {"width": 1024, "depth": 8, "batch_size": 128}


def _init_gloo(comm: MPI.Comm):
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
    dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}",
                            rank=comm.Get_rank(), world_size=comm.Get_size())
    return dist


def _max_time(comm: MPI.Comm, fn, reps: int) -> float:
    """Seconds per call, the slowest rank's."""
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    comm.Barrier()
    return comm.allreduce((time.perf_counter() - t0) / reps, op=MPI.MAX)


def bench_dp(cfg, steps: int, reps: int, comm: MPI.Comm = MPI.COMM_WORLD) -> dict:
    """Runs the benchmark and returns its figures. Collective on ``comm``."""
    P = comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    threads = set_threads(cfg.run.threads, local.Get_size())
    local.Free()
    default = type(cfg.model)()
    width = cfg.model.width if cfg.model.width != default.width else _BENCH_DEFAULTS["width"]
    depth = cfg.model.depth if cfg.model.depth != default.depth else _BENCH_DEFAULTS["depth"]
    batch = (cfg.data.batch_size if cfg.data.batch_size != type(cfg.data)().batch_size
             else _BENCH_DEFAULTS["batch_size"])
    if batch % P:
        raise ConfigError(f"data.batch_size: {batch} is not divisible by {P} ranks")
    dtype = torch_dtype(cfg.run.dtype)
    seed_everything(cfg.run.seed)
    shape, classes = (1, 8, 8), 10
    model = build_model(cfg.model.name, shape, classes, width=width, depth=depth, dtype=dtype)
    broadcast_parameters(model, comm)
    ddp_model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(cfg.run.seed + comm.Get_rank())
    x = torch.randn(batch // P, *shape, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (batch // P,), generator=g)

    # (a) mltrain: bucketed overlapped reducer
    reducer = GradReducer(model.parameters(), comm, int(cfg.comm.bucket_mb * 2**20),
                          cfg.comm.grad_as_bucket_view, cfg.comm.max_inflight)
    opt = build_optimizer("sgd", model.parameters(), lr=1e-3, momentum=0.9)

    def ml_step():
        reducer.prepare()
        F.cross_entropy(model(x), y).backward()
        reducer.finish()
        opt.step()

    # (b) torch DDP with gloo
    dist = _init_gloo(comm)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(ddp_model, bucket_cap_mb=cfg.comm.bucket_mb)
    ddp_opt = build_optimizer("sgd", ddp.parameters(), lr=1e-3, momentum=0.9)

    def ddp_step():
        ddp_opt.zero_grad(set_to_none=True)
        F.cross_entropy(ddp(x), y).backward()
        ddp_opt.step()

    for _ in range(3):  # warm-up: allocator, first-touch, connection set-up
        ml_step()
        ddp_step()
    rounds = 3
    per = max(1, steps // rounds)
    t_ml, t_ddp = [], []
    for _ in range(rounds):
        t_ml.append(_max_time(comm, ml_step, per))
        t_ddp.append(_max_time(comm, ddp_step, per))
    step_ml, step_ddp = statistics.median(t_ml), statistics.median(t_ddp)

    # (c) reduction bandwidth: the reducer on ready gradients vs one raw Allreduce
    n = reducer.num_elements
    nbytes = n * torch.tensor([], dtype=dtype).element_size()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    flat = np.random.default_rng(0).standard_normal(n).astype(
        np.float64 if dtype == torch.float64 else np.float32)
    raw = lambda: comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)  # noqa: E731
    raw()
    reducer.reduce()
    t_raw, t_red = [], []
    for _ in range(rounds):
        t_raw.append(_max_time(comm, raw, max(1, reps // rounds)))
        t_red.append(_max_time(comm, reducer.reduce, max(1, reps // rounds)))
    t_raw_s, t_red_s = statistics.median(t_raw), statistics.median(t_red)
    dist.destroy_process_group()
    reducer.remove()
    return {
        "ranks": P, "threads_per_rank": threads, "model": cfg.model.name, "width": width,
        "depth": depth, "parameters": n, "global_batch": batch, "dtype": cfg.run.dtype,
        "bucket_mb": cfg.comm.bucket_mb, "grad_as_bucket_view": cfg.comm.grad_as_bucket_view,
        "mltrain_step_s": step_ml, "ddp_step_s": step_ddp,
        "step_ratio_vs_ddp": step_ml / step_ddp,
        "reduce_bytes": nbytes, "raw_allreduce_s": t_raw_s, "reducer_s": t_red_s,
        "raw_bandwidth_GBps": nbytes / t_raw_s / 1e9,
        "reducer_bandwidth_GBps": nbytes / t_red_s / 1e9,
        "bandwidth_ratio_vs_raw": t_raw_s / t_red_s,
    }


def run_bench(what: str, cfg, args, comm: MPI.Comm) -> int:
    """Runs one benchmark, prints its figures on rank 0, writes --json. Collective."""
    from mltrain.cli import check_writable
    from mltrain.comm import agree

    agree(comm, lambda: check_writable(args.json, "--json"), what="config")
    res = bench_dp(cfg, args.steps, args.reps, comm)
    if comm.Get_rank() == 0:
        print(f"bench dp: {res['ranks']} ranks x {res['threads_per_rank']} threads, "
              f"{res['model']} {res['parameters'] / 1e6:.2f} M parameters, global batch "
              f"{res['global_batch']}, {res['dtype']}")
        print(f"  step      mltrain {res['mltrain_step_s'] * 1e3:8.2f} ms   DDP(gloo) "
              f"{res['ddp_step_s'] * 1e3:8.2f} ms   ratio {res['step_ratio_vs_ddp']:.3f}"
              "  (lower is better)")
        print(f"  reduce    reducer {res['reducer_bandwidth_GBps']:8.2f} GB/s  raw Allreduce "
              f"{res['raw_bandwidth_GBps']:8.2f} GB/s  ratio {res['bandwidth_ratio_vs_raw']:.3f}"
              "  (higher is better)")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"bench": what, **res}, f, indent=2)
    return 0
