"""The planner: profile a model's layers on this machine, then search data x pipe degrees,
micro-batch counts and stage boundaries for the fastest predicted step that fits in memory.
Not collective."""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from mltrain.planner.cost import (Hardware, Profile, allreduce_time, handover_time,
                                  pipeline_time, p2p_time, stage_memory)
from mltrain.planner.partition import best_partition

__all__ = ["profile_layers", "profile_model", "plan"]


def _per_sample(full: float, half: float, b: int, h: int) -> float:
    """The per-sample slope of a time measured on b and on h < b samples (never negative;
    with one sample, all of it)."""
    return max((full - half) / (b - h), 0.0) if b > h else full / b


def profile_layers(layers: list[nn.Module], sample: torch.Tensor, *, reps: int = 5,
                   optimizer_state: float = 2.0, optimizer: str = "adam") -> Profile:
    """Each layer's forward and backward time on this machine (the best of ``reps``),
    measured on the batch ``sample`` and on half of it to separate the cost per sample from
    the fixed cost of a call; its output's bytes per sample, its parameter bytes and
    ``optimizer_state`` times those (Adam: 2); and each layer's share of one ``optimizer``
    step, by its parameter count."""
    def run(batch: torch.Tensor):
        times, x = [], batch
        for layer in layers:
            tf = tb = float("inf")
            for _ in range(reps):
                xin = x.detach().requires_grad_(x.is_floating_point())
                t0 = time.perf_counter()
                out = layer(xin)
                t1 = time.perf_counter()
                out.backward(torch.ones_like(out))
                t2 = time.perf_counter()
                tf, tb = min(tf, t1 - t0), min(tb, t2 - t1)
            layer.zero_grad(set_to_none=True)
            times.append((tf, tb, out))
            x = out.detach()
        return times

    b = len(sample)
    full = run(sample)
    half = run(sample[:max(b // 2, 1)]) if b > 1 else full
    h = len(sample[:max(b // 2, 1)])
    fwd, bwd, fixed, act, par = [], [], [], [], []
    for (tf, tb, out), (hf, hb, _) in zip(full, half):
        slope_f, slope_b = _per_sample(tf, hf, b, h), _per_sample(tb, hb, b, h)
        fwd.append(slope_f)
        bwd.append(slope_b)
        fixed.append(max(tf + tb - (slope_f + slope_b) * b, 0.0))
        act.append(out.numel() * out.element_size() / b)
    for layer in layers:
        par.append(float(sum(p.numel() * p.element_size() for p in layer.parameters())))
    params = [p for layer in layers for p in layer.parameters()]
    opt_s = 0.0
    if params:
        from mltrain.optim import build_optimizer

        opt = build_optimizer(optimizer if optimizer in ("sgd", "adam") else "sgd", params,
                              lr=1e-12)
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()  # state created
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            opt.step()
            best = min(best, time.perf_counter() - t0)
        opt_s = best
        for p in params:
            p.grad = None
    total = sum(par) or 1.0
    return Profile(forward_s=fwd, backward_s=bwd, activation_bytes=act, parameter_bytes=par,
                   optimizer_bytes=[optimizer_state * p for p in par], fixed_s=fixed,
                   optimizer_s=[opt_s * p / total for p in par])


def profile_model(model: nn.Module, sample: torch.Tensor, *, mgrit: dict | None = None,
                  reps: int = 5, optimizer_state: float = 2.0, optimizer: str = "adam"):
    """``profile_layers`` of the model's sequential layers on ``sample``, and for a
    residual network (opening, blocks, closing) its MGRIT unit costs and overhead per pass
    measured through the solver with the settings ``mgrit`` (``LayerParallel``'s;
    ``mltrain.mgrit.profile.unit_costs``, chains of all its blocks) on the batch and on
    half of it. Returns (profile, the blocks' span in the layers or None). Not
    collective."""
    from mltrain.pipeline import residual_span, sequential_layers

    prof = profile_layers(sequential_layers(model), sample, reps=reps,
                          optimizer_state=optimizer_state, optimizer=optimizer)
    span = residual_span(model)
    mgrit = mgrit or {}
    cf = mgrit.get("cf", 2)
    if span is not None and len(model.blocks) >= cf:
        from mltrain.mgrit.profile import SOLVER_COSTS, unit_costs

        with torch.no_grad():
            state = model.opening(sample)
        b, h = len(state), max(len(state) // 2, 1)
        N = len(model.blocks)
        # The fastest runs, as for the layers: a profile taken while other ranks wait
        # on shared cores is otherwise disturbed.
        full = unit_costs(model, state, cf, N, reps, mgrit, best=True)
        half = unit_costs(model, state[:h], cf, N, reps, mgrit, best=True) if b > h else full
        slope = [_per_sample(full[k], half[k], b, h) for k in SOLVER_COSTS]
        prof.mgrit_slope = slope
        prof.mgrit_fixed = [max(full[k] - a * b, 0.0) for k, a in zip(SOLVER_COSTS, slope)]
    return prof, span


def _divisors(n: int) -> list[int]:
    """The divisors of ``n``, ascending (in sqrt(n) steps: rank counts can be large)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def _chain_costs(prof: Profile, hw: Hardware, lo: int, hi: int, b: float, inter: bool):
    """MGRIT's unit costs for the residual blocks lo .. hi-1 of the profile on ``b``
    samples, from their mean (one block's timing is noisy, and the work model multiplies
    it): a step or a recorded step as a block's forward, a vector-Jacobian product or an
    autograd pass step as its backward, messages as point-to-point transfers."""
    from mltrain.mgrit.model import Costs

    t = prof.compute_s(lo, hi, b) / (hi - lo) / hw.compute_speed
    fwd, bwd = sum(prof.forward_s[lo:hi]), sum(prof.backward_s[lo:hi])
    f = t * fwd / max(fwd + bwd, 1e-30)
    bk = t - f
    state = prof.activation_bytes[lo] * b
    links = dict(message=p2p_time(state, hw, inter), broadcast=p2p_time(state, hw, inter))
    measured = prof.mgrit_costs(b)
    if measured is not None:  # through the solver: its fast paths and loops as they run
        return Costs(**{k: v / hw.compute_speed for k, v in measured.items()},
                     serial_forward=f, serial_backward=bk, **links)
    return Costs(step=f, step_coarse=1.3 * f, vjp=bk, vjp_coarse=1.3 * bk, record=f,
                 chain_backward=bk, serial_forward=f, serial_backward=bk, op=0.1 * f,
                 **links)


def _layer_parallel(prof: Profile, hw: Hardware, ranks: int, batch: int,
                    residual: tuple[int, int], mgrit: dict, schedules, microbatches
                    ) -> list[dict]:
    """Configurations with a layer axis: data x layer (MGRIT over the residual blocks,
    layers ``residual`` = (first, end) of the profile) and data x pipe x layer (pipeline
    stages whose blocks go layer-parallel). Stage boundaries fall on MGRIT's coarsest grid
    (units of cf^(levels-1) blocks), found by the same dynamic programming over those units
    as the pipeline's; a stage's time per micro-batch is its MGRIT forward and backward
    (the work model, ``mltrain.mgrit.model``) plus the opening or closing it holds and its
    transfers."""
    from mltrain.mgrit.model import predict, waits

    lo, hi = residual
    n, N = prof.layers, hi - lo
    levels, cf = mgrit["levels"], mgrit["cf"]
    unit = cf ** (levels - 1)
    if N % unit:
        return []
    units = N // unit
    params = max(sum(prof.parameter_bytes), 1.0)
    opt_ratio = sum(prof.optimizer_bytes) / params
    out = []
    for L in _divisors(ranks):
        for S in _divisors(ranks // L) if L > 1 else ():
            D = ranks // (L * S)
            if batch % D or units < S * L:
                continue
            per_rank = batch // D
            layer_inter = L > hw.ranks_per_node
            pipe_inter = S * L > hw.ranks_per_node  # a stage's layer ranks sit together
            for M in (microbatches if S > 1 else (1,)):
                if M > per_rank or per_rank % M:
                    continue
                b = per_rank / M

                def chain(i, j, b=b, L=L, inter=layer_inter):
                    return predict((j - i) * unit, L, levels, cf, mgrit["iters"],
                                   mgrit["bwd_iters"],
                                   _chain_costs(prof, hw, lo + i * unit, lo + j * unit, b,
                                                inter))["parallel_s"]

                def bounds(i, j):  # units i .. j-1 as profile layers, the ends included
                    return (0 if i == 0 else lo + i * unit, n if j == units else lo + j * unit)

                def local_params(i, j, L=L):
                    a, z = bounds(i, j)
                    blocks = sum(prof.parameter_bytes[lo + i * unit:lo + j * unit])
                    share = -(-(j - i) // L) / (j - i)  # the busiest layer rank's blocks
                    return (sum(prof.parameter_bytes[a:z]) - blocks) + blocks * share

                def cost(i, j, b=b, S=S, L=L, inter=pipe_inter):
                    if j - i < L:  # MGRIT needs a coarse interval per layer rank
                        return math.inf
                    a, z = bounds(i, j)
                    ends = (prof.compute_s(a, lo + i * unit, b)
                            + prof.compute_s(lo + j * unit, z, b)) / hw.compute_speed
                    t = chain(i, j) + ends
                    if S > 1 and j < units:  # output forward (shape ahead), gradient back
                        nbytes = prof.activation_bytes[z - 1] * b
                        t += 2 * p2p_time(nbytes, hw, inter) + p2p_time(0, hw, inter)
                    return t

                for sched in (schedules if S > 1 else ("mgrit",)):
                    def memory(i, j, b=b, L=L, k=M if sched == "gpipe" else min(S, M)):
                        p = local_params(i, j)
                        n_local = -(-(j - i) // L) * unit
                        # states, graphs and adjoints of the local blocks per micro-batch
                        act = prof.activation_bytes[lo + i * unit] * b * n_local * 3
                        return stage_memory(p, p * opt_ratio, act, k)
                    found = best_partition(units, S, cost, memory, hw.memory_per_rank)
                    if found is None:
                        continue
                    cuts = [sum(found[1][:k]) for k in range(S + 1)]
                    stages = list(zip(cuts, cuts[1:]))
                    stage_s = [cost(i, j) for i, j in stages]
                    stage_p = [local_params(i, j) for i, j in stages]
                    reduce_s = max(allreduce_time(p, D, hw, ranks > hw.ranks_per_node)
                                   for p in stage_p)
                    update_s = prof.step_s(0, n) * max(stage_p) / params / hw.compute_speed
                    wake_s = handover_time(sched, S, M, hw, ranks, waits(
                        L, levels, mgrit["iters"], mgrit["bwd_iters"]), data=D)
                    p2p_bytes = sum(prof.activation_bytes[bounds(i, j)[1] - 1] * per_rank * 2
                                    for i, j in stages[:-1])
                    out.append({
                        "data": D, "pipe": S, "layer": L, "microbatches": M,
                        "schedule": sched,
                        "balance": [bounds(i, j)[1] - bounds(i, j)[0] for i, j in stages],
                        "predicted_step_s": (pipeline_time(stage_s, M) + reduce_s + update_s)
                        * hw.oversubscription(ranks) + wake_s,
                        "compute_s": max(stage_s) * M, "allreduce_s": reduce_s,
                        "optimizer_s": update_s, "handover_s": wake_s,
                        "memory_bytes": max(memory(i, j) for i, j in stages),
                        "comm_bytes": max(stage_p) * (2 if D > 1 else 0) + p2p_bytes})
    return out


def plan(prof: Profile, hw: Hardware, ranks: int, batch: int, *,
         schedules=("1f1b", "gpipe"), microbatches=(1, 2, 4, 8, 16, 32),
         residual: tuple[int, int] | None = None, mgrit: dict | None = None) -> list[dict]:
    """Every feasible configuration (data x pipe degrees, micro-batches, schedule, and the
    best stage boundaries for them; and data x layer with MGRIT over the residual blocks
    ``residual`` = (first, end) of the profile, when given), best predicted step first. A
    configuration is feasible when the global batch splits evenly and every stage fits in
    memory."""
    n = prof.layers
    configs = []
    if residual is not None:
        configs += _layer_parallel(prof, hw, ranks, batch, residual, mgrit or {
            "levels": 2, "cf": 8, "iters": 2, "bwd_iters": 1}, schedules, microbatches)
    for S in _divisors(ranks):
        D = ranks // S
        if S > n or batch % D:
            continue
        per_rank = batch // D
        # Stages of one pipeline sit on neighbouring ranks: across nodes once they span more.
        pipe_inter = S > hw.ranks_per_node
        data_inter = ranks > hw.ranks_per_node
        for M in (microbatches if S > 1 else (1,)):
            if M > per_rank or per_rank % M:
                continue
            b = per_rank / M
            for sched in (schedules if S > 1 else (schedules[0],)):
                in_flight = M if sched == "gpipe" else min(S, M)

                def cost(i, j):
                    t = prof.compute_s(i, j, b) / hw.compute_speed
                    if j < n:  # its output forward (its shape ahead), the gradient back
                        nbytes = prof.activation_bytes[j - 1] * b
                        t += 2 * p2p_time(nbytes, hw, pipe_inter) + p2p_time(0, hw, pipe_inter)
                    return t

                def memory(i, j):
                    return stage_memory(sum(prof.parameter_bytes[i:j]),
                                        sum(prof.optimizer_bytes[i:j]),
                                        sum(prof.activation_bytes[i:j]) * b, in_flight)
                found = best_partition(n, S, cost, memory, hw.memory_per_rank)
                if found is None:
                    continue
                _, balance = found
                bounds = [sum(balance[:k]) for k in range(S + 1)]
                stage_s = [cost(bounds[k], bounds[k + 1]) for k in range(S)]
                stage_params = [sum(prof.parameter_bytes[bounds[k]:bounds[k + 1]])
                                for k in range(S)]
                reduce_s = max(allreduce_time(p, D, hw, data_inter) for p in stage_params)
                update_s = max(prof.step_s(bounds[k], bounds[k + 1])
                               for k in range(S)) / hw.compute_speed
                wake_s = handover_time(sched, S, M, hw, ranks, data=D)
                p2p_bytes = sum(prof.activation_bytes[bounds[k + 1] - 1] * per_rank * 2
                                for k in range(S - 1))
                configs.append({
                    "data": D, "pipe": S, "layer": 1, "microbatches": M,
                    "schedule": sched if S > 1 else "none", "balance": balance,
                    "predicted_step_s": (pipeline_time(stage_s, M) + reduce_s + update_s)
                    * hw.oversubscription(ranks) + wake_s,
                    "compute_s": max(stage_s) * M, "allreduce_s": reduce_s,
                    "optimizer_s": update_s, "handover_s": wake_s,
                    "memory_bytes": max(memory(bounds[k], bounds[k + 1]) for k in range(S)),
                    "comm_bytes": max(stage_params) * (2 if D > 1 else 0) + p2p_bytes,
                })
    configs.sort(key=lambda c: (c["predicted_step_s"], c["pipe"], c["microbatches"]))
    return configs
