"""``mltrain bench ps --transport``: the parameter servers' two-sided progress loop against
MPI one-sided communication, on the case one-sided communication can do at all.

One-sided ``Accumulate`` can only add, so the comparison is asynchronous (k = -1) plain SGD
without momentum: every worker, every step, adds -lr g / W to the server's shard and reads
the shard back. Two-sided: ``PSClient.push_pull`` against ``PSServer.serve`` (what
``sync.name = ps`` runs). One-sided: the server exposes its shard in an ``MPI.Win``; a
worker locks it shared, ``Accumulate``s (element-wise atomic in MPI), flushes, reads the
shard (``Get_accumulate`` with ``NO_OP``, as ``sync.transport = rma`` does) and unlocks; the server waits in MPI until the workers are done. No compute:
the gradients are fixed vectors, so the figures are the transport alone. Both end with
the same parameters (checked: initial - lr x the sum of every push).
"""
from __future__ import annotations

import time

import numpy as np
import torch
from mpi4py import MPI

from mltrain.comm import waiting
from mltrain.comm.collectives import mpi_buffer
from mltrain.sync.ps import PSClient, PSServer
from mltrain.sync.ps_rma import read_atomic

LR = 0.01


def _grad(worker: int, n: int) -> torch.Tensor:
    return torch.full((n,), float(worker + 1), dtype=torch.float32)  # host: a fixed push


def _two_sided(comm: MPI.Comm, n: int, steps: int) -> tuple[float | None, torch.Tensor | None]:
    """(a worker's seconds per step, None) or (None, the server's final shard). Collective
    on ``comm`` (the last rank serves)."""
    P, rank = comm.Get_size(), comm.Get_rank()
    W = P - 1
    x0 = torch.zeros(n, dtype=torch.float32)  # host: the initial parameters
    if rank == W:
        srv = PSServer(comm, x0, list(range(W)), -1, lambda ps: torch.optim.SGD(ps, lr=LR))
        srv.serve()
        waiting.wait(comm.Ibarrier())
        return None, srv.param.detach().clone()
    client = PSClient(comm, [W], [(0, n)], W)
    g, out = _grad(rank, n), x0.clone()
    client.push_pull(g, 0, out)  # connection warm-up, counted in the check below
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        client.push_pull(g, step, out)
    dt = (time.perf_counter() - t0) / steps
    client.done()
    waiting.wait(comm.Ibarrier())
    return dt, None


def _one_sided(comm: MPI.Comm, n: int, steps: int) -> tuple[float | None, torch.Tensor | None]:
    """The same exchange through a window on the server. Collective on ``comm``."""
    P, rank = comm.Get_size(), comm.Get_rank()
    W = P - 1
    item = 4
    win = MPI.Win.Allocate(n * item if rank == W else 0, item, comm=comm)
    try:
        if rank == W:
            mem = np.frombuffer(win.tomemory(), dtype=np.float32, count=n)
            win.Lock(W, MPI.LOCK_EXCLUSIVE)
            mem[:] = 0.0
            win.Unlock(W)
        comm.Barrier()
        if rank == W:  # in MPI until the workers are done: passive-target progress
            waiting.wait(comm.Ibarrier())
            win.Lock(W, MPI.LOCK_SHARED)
            final = torch.from_numpy(mem.copy())
            win.Unlock(W)
            return None, final
        push = (_grad(rank, n) * (-LR / W)).numpy()
        out = np.empty(n, dtype=np.float32)

        def exchange():
            win.Lock(W, MPI.LOCK_SHARED)
            win.Accumulate(push, W, op=MPI.SUM)
            win.Flush(W)  # the add is done at the target before the read
            read_atomic(win, out, W)  # atomic against the other workers' adds
            win.Unlock(W)
        exchange()  # warm-up, counted in the check
        t0 = time.perf_counter()
        for _ in range(steps):
            exchange()
        dt = (time.perf_counter() - t0) / steps
        waiting.wait(comm.Ibarrier())
        return dt, None
    finally:
        win.Free()


def bench_transport(sizes: tuple[int, ...], steps: int, comm: MPI.Comm) -> dict | None:
    """Seconds per worker step of both transports at every size (alternating, so machine
    noise hits both), and their final parameters against the exact sum. The figures on
    rank 0 (None elsewhere). Collective on ``comm`` (at least 2 ranks)."""
    P = comm.Get_size()
    W = P - 1
    rows = []
    for n in sizes:
        row = {"elements": n}
        for name, fn in (("two_sided", _two_sided), ("one_sided", _one_sided)):
            dt, final = fn(comm, n, steps)
            times = comm.gather(dt, root=0)
            finals = comm.gather(final, root=0)
            if comm.Get_rank() == 0:
                got = next(f for f in finals if f is not None)
                # Every worker pushed steps + 1 times g_w / W = (w + 1) / W.
                want = -LR * (steps + 1) * sum(w + 1 for w in range(W)) / W
                row[name + "_step_s"] = sum(t for t in times if t is not None) / W
                row[name + "_max_error"] = float((got - want).abs().max() / abs(want))
        if comm.Get_rank() == 0:
            row["one_sided_vs_two_sided"] = row["one_sided_step_s"] / row["two_sided_step_s"]
            rows.append(row)
    return {"ranks": P, "workers": W, "steps": steps, "lr": LR, "dtype": "float32",
            "mpi": MPI.Get_library_version().splitlines()[0], "rows": rows} \
        if comm.Get_rank() == 0 else None


def markdown(res: dict) -> str:
    """Not collective."""
    lines = [f"{res['workers']} workers + 1 server, {res['steps']} steps each, float32, "
             f"{res['mpi']}.\n",
             "| elements | two-sided ms/step | one-sided ms/step | one-sided / two-sided | "
             "final error (two / one) |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['elements']:.0e} | {r['two_sided_step_s'] * 1e3:.3f} | "
                     f"{r['one_sided_step_s'] * 1e3:.3f} | {r['one_sided_vs_two_sided']:.2f} | "
                     f"{r['two_sided_max_error']:.1e} / {r['one_sided_max_error']:.1e} |")
    return "\n".join(lines) + "\n"
