"""The planner: profile a model's layers on this machine, then search data x pipe degrees,
micro-batch counts and stage boundaries for the fastest predicted step that fits in memory.
Not collective."""
from __future__ import annotations

import time

import torch
from torch import nn

from mltrain.planner.cost import (Hardware, Profile, allreduce_time, handover_time,
                                  pipeline_time, p2p_time, stage_memory)
from mltrain.planner.partition import best_partition

__all__ = ["profile_layers", "plan"]


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
        slope_f = max((tf - hf) / (b - h), 0.0) if b > h else tf / b
        slope_b = max((tb - hb) / (b - h), 0.0) if b > h else tb / b
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


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _layer_parallel(prof: Profile, hw: Hardware, ranks: int, batch: int,
                    residual: tuple[int, int], mgrit: dict) -> list[dict]:
    """Configurations data x layer (MGRIT over the residual blocks, layers ``residual`` =
    (first, end) of the profile), priced by the MGRIT work model with unit costs from the
    profile: a step or a recorded step as a block's forward, a vector-Jacobian product or
    an autograd pass step as its backward, messages as point-to-point transfers."""
    from mltrain.config import ConfigError
    from mltrain.mgrit import split_layers
    from mltrain.mgrit.model import Costs, predict

    lo, hi = residual
    N = hi - lo
    out = []
    for L in _divisors(ranks):
        D = ranks // L
        if L == 1 or batch % D:
            continue
        try:
            split_layers(N, L, mgrit["levels"], mgrit["cf"])
        except ConfigError:
            continue
        b = batch // D
        inter = L > hw.ranks_per_node
        f = prof.compute_s(lo, lo + 1, b) * prof.forward_s[lo] / max(
            prof.forward_s[lo] + prof.backward_s[lo], 1e-30) / hw.compute_speed
        bk = prof.compute_s(lo, lo + 1, b) / hw.compute_speed - f
        state = prof.activation_bytes[lo] * b
        c = Costs(step=f, step_coarse=1.3 * f, vjp=bk, vjp_coarse=1.3 * bk, record=f,
                  chain_backward=bk, serial_forward=f, serial_backward=bk,
                  message=p2p_time(state, hw, inter), broadcast=p2p_time(state, hw, inter),
                  op=0.1 * f)
        chain = predict(N, L, mgrit["levels"], mgrit["cf"], mgrit["iters"], mgrit["bwd_iters"],
                        c)["parallel_s"]
        ends = prof.compute_s(0, lo, b) + prof.compute_s(hi, prof.layers, b)
        n_local = -(-N // L)
        local_params = (sum(prof.parameter_bytes[:lo]) + sum(prof.parameter_bytes[hi:])
                        + sum(prof.parameter_bytes[lo:hi]) * n_local / N)
        reduce_s = allreduce_time(local_params, D, hw, ranks > hw.ranks_per_node)
        update_s = (prof.step_s(0, prof.layers) * local_params
                    / max(sum(prof.parameter_bytes), 1.0) / hw.compute_speed)
        memory = stage_memory(local_params, local_params * (
            sum(prof.optimizer_bytes) / max(sum(prof.parameter_bytes), 1.0)),
            prof.activation_bytes[lo] * b * n_local * 3, 1)  # states, graphs, adjoints
        if memory > hw.memory_per_rank:
            continue
        out.append({"data": D, "pipe": 1, "layer": L, "microbatches": 1, "schedule": "mgrit",
                    "balance": [N], "predicted_step_s": (chain + ends / hw.compute_speed
                                                         + reduce_s + update_s)
                    * hw.oversubscription(ranks), "compute_s": chain,
                    "allreduce_s": reduce_s, "optimizer_s": update_s, "handover_s": 0.0,
                    "memory_bytes": memory,
                    "comm_bytes": local_params * (2 if D > 1 else 0)})
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
            "levels": 2, "cf": 8, "iters": 2, "bwd_iters": 1})
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
                wake_s = handover_time(sched, S, M, hw, ranks)
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
