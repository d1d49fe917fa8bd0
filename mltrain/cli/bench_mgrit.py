"""``mltrain bench mgrit``: forward + backward time of layer-parallel residual networks
against plain serial autograd on one rank, in the same run, and a work model checked
against every measured point.

For each depth the serial baseline (rank 0, one thread, ordinary autograd through the whole
network) and MGRIT with 1-3 levels and 1-3 forward iterations (1 adjoint iteration) over
all ranks of the job are timed (best of ``reps``, the slowest rank). Unit costs (a step, a
vector-Jacobian product, a message) are measured once; the work model
(``mltrain.mgrit.model``) turns them and the algorithm's step counts into a predicted time,
compared with every measurement, and extrapolated to 1024 ranks (for networks deep enough
to give every rank a whole coarsest interval). Collective.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from mpi4py import MPI

from mltrain.comm import broadcast_
from mltrain.config import ConfigError
from mltrain.mgrit import LayerParallel, split_layers
from mltrain.mgrit.model import Costs, predict
from mltrain.nn import ResNet

__all__ = ["bench_mgrit"]

CONFIGS = [(1, 1, 1)] + [(lv, it, 1) for lv in (2, 3) for it in (1, 2, 3)]


def _best(fn, reps: int, comm: MPI.Comm) -> float:
    best = float("inf")
    for _ in range(reps):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        best = min(best, comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    return best


def _unit_costs(width: int, batch: int, comm: MPI.Comm, reps: int = 200) -> Costs:
    torch.manual_seed(0)
    net = ResNet(width, width, 64, 10)
    x = torch.randn(batch, width)
    block = net.blocks[0]
    xin = x.clone().requires_grad_(True)
    out = block(xin)
    lam = torch.randn_like(out)
    params = list(block.parameters())

    def per(fn, n=reps):
        for _ in range(5):  # warm-up (first autograd calls set up the engine)
            fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n

    with torch.no_grad():
        step = per(lambda: block(x))
    vjp = per(lambda: torch.autograd.grad(out, xin, lam, retain_graph=True))
    vjp_p = per(lambda: torch.autograd.grad(out, params, lam, retain_graph=True))

    def serial_pass():
        xr = x.clone().requires_grad_(True)
        F.cross_entropy(net(xr), torch.zeros(batch, dtype=torch.long)).backward()
    with torch.no_grad():
        fwd = per(lambda: net(x), 20) / 64
    both = per(serial_pass, 20) / 64
    msg = bcast = 0.0
    P, rank = comm.Get_size(), comm.Get_rank()
    if P > 1:  # half a ping-pong between ranks 0 and 1, and a broadcast, of one state
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
        bcast = _best(lambda: broadcast_(buf, comm), 20, comm)
    return Costs(step=step, vjp=vjp, vjp_params=vjp_p, serial_backward=max(both - fwd, 0.0),
                 message=msg, broadcast=bcast)


def bench_mgrit(comm: MPI.Comm, depths=(64, 128, 256, 512, 1024), width: int = 32,
                batch: int = 64, reps: int = 3, cf: int = 2) -> dict:
    torch.set_num_threads(1)
    P, rank = comm.Get_size(), comm.Get_rank()
    costs = _unit_costs(width, batch, comm)
    costs = Costs(**comm.bcast(costs.__dict__))  # one set of unit costs for the model
    rows = []
    for N in depths:
        torch.manual_seed(0)
        net = ResNet(width, width, N, 10)
        x, y = torch.randn(batch, width), torch.randint(0, 10, (batch,))

        def serial():
            if rank == 0:
                net.zero_grad(set_to_none=True)
                F.cross_entropy(net(x), y).backward()
        t_serial = _best(serial, reps, comm)
        for levels, iters, bwd in CONFIGS:
            try:
                split_layers(N, P, levels, cf)
            except ConfigError:
                continue
            lp = LayerParallel(net, comm, levels=levels, cf=cf, iters=iters, bwd_iters=bwd)

            def parallel():
                net.zero_grad(set_to_none=True)
                F.cross_entropy(lp(x), y).backward()
            t = _best(parallel, reps, comm)
            pred = predict(N, P, levels, cf, iters, bwd, costs)
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
        for Q in [2 ** k for k in range(11)]:
            best = None
            for levels, iters, bwd in CONFIGS:
                if levels == 1 or iters != 2:
                    continue
                try:
                    split_layers(N, Q, levels, cf)
                except ConfigError:
                    continue
                s = predict(N, Q, levels, cf, iters, bwd, costs)["speedup"]
                if best is None or s > best[0]:
                    best = (s, levels)
            if best:
                scaling.append({"layers": N, "ranks": Q, "levels": best[1],
                                "predicted_speedup": best[0]})
    return {"ranks": P, "width": width, "batch": batch, "cf": cf, "costs": costs.__dict__,
            "rows": rows, "speedup": speedup,
            "model_error": max((r["model_error"] for r in rows), default=None),
            "scaling": scaling}
