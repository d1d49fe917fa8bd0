"""``mltrain bench hardware`` and ``mltrain bench pipeline``.

hardware: ranks per node and nodes (from MPI's shared-memory split), memory per rank (the
node's memory over its ranks), point-to-point latency (8-byte ping-pong) and bandwidth
(16 MiB ping-pong) within a node and, when the job spans nodes, between nodes; the cores
a node's ranks may run on (the union of their CPU affinities); when they are fewer than the
node's ranks, the cost of a pipeline hand-over on shared cores (below); the compute speed is
1 (the planner profiles on the machine it plans for). Collective on the job's communicator.

pipeline: the training step of the configured model (forward, backward, data-axis gradient
average, optimizer) for every decomposition the rank count allows: unpipelined (pure data
parallelism, the baseline) and pipelined with 2 stages, 1 to 8 micro-batches, both
schedules; the planner's predicted step time for each, from the layer profile and the
hardware measured in the same run; the model's error, and where the planner's top choice
ranks among the measured. The decompositions are timed in interleaved rounds. Collective
on the job's communicator.
"""
from __future__ import annotations

import os
import time

import torch
from mpi4py import MPI

from mltrain.cli.timing import interleaved_medians
from mltrain.planner.cost import Hardware, extra_waits

__all__ = ["measure_hardware", "bench_pipeline", "hardware_toml"]


def _pingpong(comm: MPI.Comm, a: int, b: int, nbytes: int, reps: int) -> float:
    """Half the round trip of ``nbytes`` between ranks a and b (others wait)."""
    rank = comm.Get_rank()
    buf = torch.zeros(max(nbytes // 8, 1), dtype=torch.float64)
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        if rank == a:
            comm.Send(buf.numpy(), dest=b)
            comm.Recv(buf.numpy(), source=b)
        elif rank == b:
            comm.Recv(buf.numpy(), source=a)
            comm.Send(buf.numpy(), dest=a)
    return comm.bcast((time.perf_counter() - t0) / reps / 2, root=a)


def _handover(comm: MPI.Comm, M: int = 8, steps: int = 10, rounds: int = 3) -> float:
    """What a pipeline stage's wait for its neighbour costs when ranks share cores: every
    pair of ranks runs a fixed synthetic 2-stage pipeline (5 linear layers of width 256, a
    batch of 32 in ``M`` micro-batches; an odd last rank runs it alone) with both schedules
    in interleaved rounds. 1F1B makes ``cost.extra_waits`` more waits than GPipe, so the
    cost of one is the difference of the median steps over that count. The model is
    synthetic so that the figure belongs to the machine, not to the model being planned.
    Collective on ``comm``."""
    from torch import nn

    from mltrain.pipeline import Pipeline

    P, rank = comm.Get_size(), comm.Get_rank()
    pair = comm.Split(rank // 2 if rank < P - P % 2 else P, rank)
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(256, 256), nn.ReLU()) for _ in range(4)]
    layers.append(nn.Linear(256, 10))
    x, y = torch.randn(32, 256), torch.randint(0, 10, (32,))
    pipes = {s: Pipeline(layers, pair, microbatches=M, schedule=s) for s in ("gpipe", "1f1b")}
    med = interleaved_medians(comm, {s: (lambda p=p: p.step(x, y)) for s, p in pipes.items()},
                               steps, rounds)
    pair.Free()
    return max(med["1f1b"] - med["gpipe"], 0.0) / extra_waits("1f1b", 2, M)


def measure_hardware(comm: MPI.Comm) -> Hardware:
    """Collective on ``comm``."""
    P = comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    per_node = local.Get_size()
    # The cores this node's ranks may run on: the union of their affinities.
    mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(
        range(os.cpu_count() or 1))
    cores = len(set().union(*local.allgather(mine)))
    local.Free()
    per_node = comm.allreduce(per_node, op=MPI.MAX)
    cores = comm.allreduce(cores, op=MPI.MIN)
    nodes = max(P // per_node, 1)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / per_node
    big = 16 * 2 ** 20
    if P > 1:
        lat = _pingpong(comm, 0, 1, 8, 200)
        bw = big / max(_pingpong(comm, 0, 1, big, 10) - lat, 1e-9)
    else:  # one rank: a memory copy stands in for the link
        src, dst = torch.zeros(big // 8, dtype=torch.float64), torch.empty(big // 8,
                                                                           dtype=torch.float64)
        t0 = time.perf_counter()
        for _ in range(10):
            dst.copy_(src)
        bw, lat = big / ((time.perf_counter() - t0) / 10), 1e-6
    ilat, ibw = lat, bw
    if nodes > 1:  # rank 0 and the first rank of the next node
        ilat = _pingpong(comm, 0, per_node, 8, 200)
        ibw = big / max(_pingpong(comm, 0, per_node, big, 10) - ilat, 1e-9)
    # With a core per rank a wait costs the latency, which the model has already.
    handover = _handover(comm) if per_node > cores and P > 1 else 0.0
    return Hardware(ranks_per_node=per_node, nodes=nodes, memory_per_rank=float(mem),
                    compute_speed=1.0, intra_bandwidth=float(bw), intra_latency=float(lat),
                    inter_bandwidth=float(ibw), inter_latency=float(ilat),
                    cores_per_node=int(cores), handover_s=float(handover))


def hardware_toml(hw: Hardware) -> str:
    lines = ["# Measured by `python -m mltrain bench hardware`.", "[hardware]"]
    for k, v in hw.__dict__.items():
        lines.append(f"{k} = {v!r}")
    return "\n".join(lines) + "\n"


def bench_pipeline(cfg, comm: MPI.Comm, steps: int = 10, rounds: int = 3) -> dict:
    """``rounds`` rounds of ``steps`` timed steps of every decomposition. Collective on
    ``comm``."""
    import dataclasses

    from mltrain.comm import Grid
    from mltrain.config import model_label
    from mltrain.data import open_dataset
    from mltrain.nn import build_model
    from mltrain.optim.base import Batches, Context, Straggler
    from mltrain.planner.search import plan, profile_model
    from mltrain.train.checks import stem
    from mltrain.train.optimizers import build_method, layer_alignment
    from mltrain.train.parallelize import parallelize

    P, rank = comm.Get_size(), comm.Get_rank()
    torch.set_num_threads(1)
    hw = measure_hardware(comm)
    ds = open_dataset(cfg.data.name, cfg.data.path, cfg.data.num_samples)
    B = cfg.data.batch_size
    stem(cfg, ds)

    def fresh():
        torch.manual_seed(cfg.run.seed)
        return build_model(cfg.model.name, ds.input_shape, ds.num_classes,
                           width=cfg.model.width, depth=cfg.model.depth,
                           stem_pool=cfg.model.stem_pool)
    x_all = torch.randn(B, *ds.input_shape)
    y_all = torch.randint(0, ds.num_classes, (B,))
    state = {"adam": 2.0, "sgd": 1.0 if cfg.optim.momentum else 0.0}.get(cfg.optim.name, 1.0)
    # The profile at a rank's share of the batch, measured on every rank at once (as they
    # will compute at once; in turn on an oversubscribed node); the slowest rank's figures
    # count.
    def measure():
        return profile_model(fresh(), x_all[:max(B // P, 1)], mgrit=cfg.mgrit.solver(),
                             optimizer_state=state, optimizer=cfg.optim.name)
    if hw.oversubscription(P) > 1:
        # More ranks than cores: the model prices the sharing of cores itself, so each
        # rank measures with a core to itself, in turn, while the others sleep (ranks that
        # wait by yielding still take time slices, which disturbs a whole MGRIT pass).
        for r in range(P):
            if r == rank:
                mine, residual = measure()
            req = comm.Ibarrier()
            while not req.Test():
                time.sleep(1e-3)
    else:
        mine, residual = measure()
    every = comm.allgather(mine)
    prof = type(mine)(**{k: None if getattr(mine, k) is None else
                         [max(vals) for vals in zip(*(getattr(q, k) for q in every))]
                         for k in mine.__dict__})
    mgrit = cfg.mgrit.solver()
    predicted = {(c["data"], c["pipe"], c["layer"], c["microbatches"], c["schedule"]): c
                 for c in plan(prof, hw, P, B, microbatches=(1, 2, 4, 8), residual=residual,
                               mgrit=mgrit)}
    runs = []  # (row, step function, clean-up) for every decomposition measured
    for (D, S, L, M, sched), pred in sorted(predicted.items()):
        if S > 2:
            continue  # measured: unpipelined and 2 stages
        # The decomposition as the trainer runs it: its layout and its optimizer.
        run_cfg = dataclasses.replace(
            cfg, parallel=dataclasses.replace(cfg.parallel, data=D, pipe=S, layer=L),
            pipeline=dataclasses.replace(cfg.pipeline, microbatches=M, schedule=sched,
                                         balance=",".join(map(str, pred["balance"]))
                                         if S > 1 else ""))
        gc = Grid.for_world(P, data=D, pipe=S, layer=L).build(comm)
        layout = parallelize(fresh(), gc, run_cfg, align=layer_alignment(run_cfg))
        method = build_method(Context(run_cfg, layout, layout.module, Straggler()))
        dr = gc.coords["data"]
        x, y = x_all[dr * (B // D):(dr + 1) * (B // D)], y_all[dr * (B // D):(dr + 1) * (B // D)]

        def step(method=method, x=x, y=y):
            method.step(Batches(None, 0, D, B, fixed=(x, y)))

        def done(method=method, layout=layout, gc=gc):
            method.close()
            layout.close()
            gc.free()
        row = {"data": D, "pipe": S, "layer": L, "microbatches": M, "schedule": sched,
               "balance": pred["balance"], "predicted_s": pred["predicted_step_s"]}
        runs.append((row, step, done))
    med = interleaved_medians(comm, {i: step for i, (_, step, _) in enumerate(runs)},
                               steps, rounds)
    rows = []
    for i, (row, _, done) in enumerate(runs):
        done()
        t = med[i]
        rows.append({**row, "time_s": t, "model_error": abs(row["predicted_s"] - t) / t})
    base = next(r for r in rows if r["pipe"] == 1 and r["layer"] == 1)
    for r in rows:
        r["ratio_vs_unpipelined"] = r["time_s"] / base["time_s"]
    top = min(rows, key=lambda r: r["predicted_s"])
    fastest = min(r["time_s"] for r in rows)
    return {"ranks": P, "hardware": hw.__dict__, "model": model_label(cfg.model),
            "batch": B, "rows": rows,
            "model_error": max(r["model_error"] for r in rows),
            "top_choice": {k: top[k] for k in ("data", "pipe", "layer", "microbatches",
                                               "schedule")},
            "top_choice_vs_fastest": top["time_s"] / fastest}
