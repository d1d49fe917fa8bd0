"""``mltrain bench mgrit``: forward + backward time of layer-parallel residual networks
against plain serial autograd on one rank, in the same run, and a work model checked
against every measured point.

For each depth the serial baseline (rank 0, one thread, ordinary autograd through the whole
network) and MGRIT with 1-3 levels and 1-3 forward iterations (1 adjoint iteration) over
all ranks of the job are timed (best of ``reps``, the slowest rank). Unit costs (a step, a
vector-Jacobian product, a message) are measured once; the work model
(``mltrain.mgrit.model``) turns them and the algorithm's step counts into a predicted time,
compared with every measurement, and extrapolated to 1024 ranks (for networks deep enough
to give every rank a whole coarsest interval). Collective on the job's communicator.
"""
from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F
from mpi4py import MPI

from mltrain.cli.timing import best_of_slowest
from mltrain.comm import broadcast_
from mltrain.config import ConfigError
from mltrain.mgrit import split_layers
from mltrain.mgrit.model import Costs, predict
from mltrain.mgrit.profile import pass_overhead, seconds_per_call, unit_costs
from mltrain.nn import ResNet
from mltrain.train.parallelize import layer_parallel

__all__ = ["bench_mgrit"]

CONFIGS = [(1, 1, 1)] + [(lv, it, 1) for lv in (2, 3) for it in (1, 2, 3)]


def _unit_costs(net: ResNet, batch: int, cf: int, chain: int, reps: int = 5) -> dict:
    """The solver's unit costs (``mltrain.mgrit.profile.unit_costs``) on ``net`` itself
    with chains of ``chain`` steps (a rank's share), and a serial forward and backward step
    through the whole network. Not collective."""
    width = net.blocks[0].linear.in_features
    N = len(net.blocks)
    x = torch.randn(batch, width)
    costs = unit_costs(net, x, cf, chain, reps, best=True)  # as the passes: their best
    yl = torch.zeros(batch, dtype=torch.long)
    with torch.no_grad():
        serial_forward = seconds_per_call(lambda: net(x), reps, True) / N

    def serial_pass():
        F.cross_entropy(net(x.clone().requires_grad_(True)), yl).backward()
    serial_backward = seconds_per_call(serial_pass, reps, True) / N - serial_forward
    net.zero_grad(set_to_none=True)
    return dict(costs, serial_forward=serial_forward,
                serial_backward=max(serial_backward, 0.0))


def _messages(batch: int, width: int, comm: MPI.Comm, reps: int = 100) -> dict:
    """Half a ping-pong between ranks 0 and 1, and a broadcast, of one state. Collective on
    ``comm``."""
    msg = bcast = 0.0
    P, rank = comm.Get_size(), comm.Get_rank()
    if P > 1:
        buf = torch.zeros(batch, width)
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            if rank == 0:
                comm.Send(buf.numpy(), dest=1)
                comm.Recv(buf.numpy(), source=1)
            elif rank == 1:
                comm.Recv(buf.numpy(), source=0)
                comm.Send(buf.numpy(), dest=0)
        msg = comm.bcast((time.perf_counter() - t0) / reps / 2)
        bcast = best_of_slowest(lambda: broadcast_(buf, comm), 20, comm)
    return {"message": msg, "broadcast": bcast}


def bench_mgrit(comm: MPI.Comm, depths=(64, 128, 256, 512, 1024), width: int = 32,
                batch: int = 64, reps: int = 5, cf: int = 2) -> dict:
    torch.set_num_threads(1)
    P, rank = comm.Get_size(), comm.Get_rank()
    messages = _messages(batch, width, comm)
    rows, costs_at = [], {}
    for N in depths:
        torch.manual_seed(0)
        net = ResNet(width, width, N, 10)
        x, y = torch.randn(batch, width), torch.randint(0, 10, (batch,))
        # One set of unit costs per depth for the model: every rank measures at once (as
        # they compute at once in the solve), the slowest rank's figures count.
        mine = _unit_costs(net, batch, cf, max(N // P, cf))
        costs = Costs(**{k: comm.allreduce(v, op=MPI.MAX) for k, v in mine.items()},
                      **messages)
        costs_at[N] = costs

        def clear():
            net.zero_grad(set_to_none=True)

        def serial():
            if rank == 0:
                F.cross_entropy(net(x), y).backward()
        t_serial = best_of_slowest(serial, reps, comm, clear)
        for levels, iters, bwd in CONFIGS:
            try:
                split_layers(N, P, levels, cf)
            except ConfigError:
                continue
            lp = layer_parallel(net, comm, dict(levels=levels, cf=cf, iters=iters,
                                                bwd_iters=bwd))

            def parallel():
                F.cross_entropy(lp(x), y).backward()
            t = best_of_slowest(parallel, reps, comm, clear)
            # This configuration's overhead per pass (its cycle control, beyond the steps),
            # measured on one rank's chain by every rank at once; the slowest counts.
            ov = pass_overhead(net, x, cf, max(N // P, cf), mine,
                               dict(levels=levels, iters=iters, bwd_iters=bwd), reps,
                               best=True)  # as the passes it predicts: their best
            pred = predict(N, P, levels, cf, iters, bwd, dataclasses.replace(
                costs, **{k: comm.allreduce(v, op=MPI.MAX) for k, v in ov.items()}))
            rows.append({"layers": N, "ranks": P, "levels": levels, "iters": iters,
                         "bwd_iters": bwd, "time_s": t, "serial_s": t_serial,
                         "speedup": t_serial / t, "predicted_s": pred["parallel_s"],
                         "predicted_serial_s": pred["serial_s"],
                         "predicted_speedup": pred["speedup"],
                         "model_error": abs(pred["parallel_s"] - t) / t})
    # The headline: per depth, the best 2-forward/1-adjoint-iteration configuration.
    speedup = {}
    for N in depths:
        cand = [r for r in rows if r["layers"] == N and r["iters"] == 2 and r["levels"] > 1]
        if cand:
            speedup[str(N)] = max(r["speedup"] for r in cand)
    scaling = []  # the model alone, also for deeper networks than measured
    for N in sorted(set(depths) | {4096, 16384}):
        costs = costs_at.get(N, costs_at[max(depths)])
        for Q in [2 ** k for k in range(11)]:
            best = None
            for levels in range(2, 7):  # deeper hierarchies than measured: model only
                try:
                    split_layers(N, Q, levels, cf)
                except ConfigError:
                    continue
                s = predict(N, Q, levels, cf, 2, 1, costs)["speedup"]
                if best is None or s > best[0]:
                    best = (s, levels)
            if best:
                scaling.append({"layers": N, "ranks": Q, "levels": best[1],
                                "predicted_speedup": best[0]})
    return {"ranks": P, "width": width, "batch": batch, "cf": cf,
            "costs": {str(N): c.__dict__ for N, c in costs_at.items()},
            "rows": rows, "speedup": speedup,
            "model_error": max((r["model_error"] for r in rows), default=None),
            "scaling": scaling}
