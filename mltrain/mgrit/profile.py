"""Measured unit costs of layer-parallel MGRIT on this machine: what the solver does per
step (a relaxation step, a coarse step, a vector-Jacobian product, a recorded step, an
autograd pass step, a bookkeeping operation), measured through the solver itself on a
residual network's own blocks, for the work model (``mltrain.mgrit.model``). Not
collective: each rank measures on its own (``MPI.COMM_SELF``).
"""
from __future__ import annotations

import time

import torch
from mpi4py import MPI
from torch import nn

from mltrain.mgrit.layer_parallel import LayerParallel
from mltrain.mgrit.model import Costs, predict

__all__ = ["SOLVER_COSTS", "pass_overhead", "seconds_per_call", "unit_costs"]

# The solver's unit costs ``unit_costs`` returns (fields of ``model.Costs``).
SOLVER_COSTS = ("step", "step_coarse", "vjp", "vjp_coarse", "record", "linearize",
                "chain_backward", "op", "overhead", "overhead_step")


def _sync() -> None:
    """Waits for queued GPU work (kernels run asynchronously), so the clock sees it."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def seconds_per_call(fn, reps: int, best: bool = False) -> float:
    """Seconds per call of ``fn`` over runs of ``reps`` calls, after two warm-up calls
    (the first autograd calls set up the engine): the median of three runs (robust to a
    passing disturbance), or with ``best`` the fastest of five (the undisturbed one, where
    other processes share the cores)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(5 if best else 3):
        _sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync()
        times.append((time.perf_counter() - t0) / reps)
    return min(times) if best else sorted(times)[1]


def _chain(net: nn.Module, m: int) -> nn.Module:
    """The first ``m`` blocks of ``net`` as one rank would hold them, without the opening
    and closing (the chain alone is timed)."""
    part = nn.Module()
    part.opening, part.closing = nn.Identity(), nn.Identity()
    part.blocks = nn.ModuleList(list(net.blocks[:m]))
    return part


def _clear(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def unit_costs(net: nn.Module, x: torch.Tensor, cf: int, chain: int, reps: int = 5,
               settings: dict | None = None, best: bool = False) -> dict[str, float]:
    """The solver's unit costs (``SOLVER_COSTS``, seconds per step) for the residual
    network ``net`` (opening, blocks, closing) on the batch of states ``x`` (the blocks'
    input, e.g. the opening's output), with chains of ``chain`` steps (a rank's share:
    long chains run slower per step than short ones, their states and graphs leave the
    caches). Needs ``chain >= cf`` blocks. With ``settings`` (``LayerParallel``'s) also
    ``pass_overhead`` with them (else 0). ``best``: see ``seconds_per_call``. Not
    collective."""

    def per(fn, n=reps):
        return seconds_per_call(fn, n, best)
    n = chain - chain % cf
    if n < cf or n > len(net.blocks):
        raise ValueError(f"unit_costs: a chain of {chain} steps needs {cf} to "
                         f"{len(net.blocks)} blocks")
    part = _chain(net, n)
    lp = LayerParallel(part, MPI.COMM_SELF, levels=2, cf=cf)
    x = x.detach()
    g = torch.randn_like(x)

    # Steps as the solver takes them (its loops and bookkeeping included): F-relaxation
    # on the fine level, the sequential solve on a coarse one, and the same for the
    # adjoint with its graphs already built.
    solver = lp._solver(lp._step, reverse=False, iters=1, sweep=lp._sweep)
    with torch.no_grad():
        u = [x.clone() for _ in range(n + 1)]
        # F-points and C-point residuals
        step = per(lambda: solver._f_relax(0, u, None)) / n
        uc = [x.clone() for _ in range(n // cf + 1)]
        gc = [None] + [g] * (n // cf)
        step_coarse = per(lambda: solver._coarsest(1, uc, gc)) / (n // cf)
    adjoint_step, graphs, adjoint_sweep = lp._adjoint_step(u)
    adj = lp._solver(adjoint_step, reverse=True, iters=1, sweep=adjoint_sweep)
    lam = [g.clone() for _ in range(n + 1)]
    with torch.no_grad():
        warm = per(lambda: adj._f_relax(0, lam, None))
        # Building what the products need (a recorded step, or the fast path's
        # linearisation): the relaxation with it built afresh, less the relaxation alone.
        fresh = per(lambda: (graphs.clear(), adj._f_relax(0, lam, None)))
        lc = [g.clone() for _ in range(n // cf + 1)]
        vjp_c = per(lambda: adj._coarsest(1, lc, gc)) / (n // cf)
    graphs.clear()

    # The final sweeps as they run: a recorded forward through the rank's blocks, and the
    # backward through it, which also hands the parameter gradients to autograd and frees
    # the graphs (the one-level solve on one rank is exactly that pass).
    exact = LayerParallel(part, MPI.COMM_SELF, levels=1, cf=cf)
    probe = torch.randn(x.shape[-1], 1, dtype=x.dtype).to(x.device)  # drawn on the CPU

    def record_pass():
        _clear(part)
        exact(x)

    def chain_pass():
        _clear(part)
        (exact(x) @ probe).sum().backward()
    record = per(record_pass) / n
    chain_backward = per(chain_pass) / n - record
    with torch.no_grad():
        op = per(lambda: [u[k] - u[k + 1] for k in range(n)]) / n
    _clear(part)
    costs = dict(step=step, step_coarse=step_coarse, vjp=warm / n, vjp_coarse=vjp_c,
                 record=record, linearize=max(fresh - warm, 0.0) / n,
                 chain_backward=max(chain_backward, 0.0), op=op, overhead=0.0,
                 overhead_step=0.0)
    if settings is not None:
        costs.update(pass_overhead(net, x, cf, chain, costs, settings, reps, best))
    return costs


def pass_overhead(net: nn.Module, x: torch.Tensor, cf: int, chain: int, costs: dict,
                  settings: dict, reps: int = 5, best: bool = False) -> dict[str, float]:
    """What a real forward + backward pass with the solver settings ``settings``
    (``LayerParallel``'s, ``levels`` among them) on one rank costs beyond the work model's
    account of its steps (``costs``: ``unit_costs``), over the first ``chain`` blocks of
    ``net`` and over half as many: ``overhead`` (fixed per pass) and ``overhead_step`` (per
    local step). Not collective."""
    unit = cf ** (settings["levels"] - 1)
    known = {k: v for k, v in costs.items() if k not in ("overhead", "overhead_step")}
    model = Costs(**{"serial_forward": 0.0, "serial_backward": 0.0, "message": 0.0,
                     "broadcast": 0.0, **known})
    x = x.detach()
    probe = torch.randn(x.shape[-1], 1, dtype=x.dtype).to(x.device)  # drawn on the CPU

    def overhead(m: int) -> float:  # a real pass over m blocks less the work model's
        part = _chain(net, m)
        lp = LayerParallel(part, MPI.COMM_SELF, **{**settings, "cf": cf})

        def solve_pass():
            _clear(part)
            (lp(x) @ probe).sum().backward()
        measured = seconds_per_call(solve_pass, reps, best)
        _clear(part)
        return measured - predict(m, 1, lp.levels, cf, lp.iters, lp.bwd_iters, model,
                                  lp.relax, lp.skip)["parallel_s"]
    n1 = min(chain, len(net.blocks))
    n1 -= n1 % unit
    n2 = n1 // 2 - (n1 // 2) % unit
    if n1 < unit:
        return {"overhead": 0.0, "overhead_step": 0.0}
    o1 = overhead(n1)
    if n2 < unit:
        return {"overhead": max(o1, 0.0), "overhead_step": 0.0}
    per_step = max((o1 - overhead(n2)) / (n1 - n2), 0.0)
    return {"overhead": max(o1 - per_step * n1, 0.0), "overhead_step": per_step}
