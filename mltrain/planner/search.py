"""The planner: profile a model's layers on this machine, then search data x pipe degrees,
micro-batch counts and stage boundaries for the fastest predicted step that fits in memory.
Not collective."""
from __future__ import annotations

import time

import torch
from torch import nn

from mltrain.planner.cost import (Hardware, Profile, allreduce_time, pipeline_time,
                                  p2p_time, stage_memory)
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


def plan(prof: Profile, hw: Hardware, ranks: int, batch: int, *,
         schedules=("1f1b", "gpipe"), microbatches=(1, 2, 4, 8, 16, 32)) -> list[dict]:
    """Every feasible configuration (data x pipe degrees, micro-batches, schedule, and the
    best stage boundaries for them), best predicted step first. A configuration is
    feasible when the global batch splits evenly and every stage fits in memory."""
    n = prof.layers
    configs = []
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
                p2p_bytes = sum(prof.activation_bytes[bounds[k + 1] - 1] * per_rank * 2
                                for k in range(S - 1))
                configs.append({
                    "data": D, "pipe": S, "layer": 1, "microbatches": M,
                    "schedule": sched if S > 1 else "none", "balance": balance,
                    "predicted_step_s": pipeline_time(stage_s, M) + reduce_s + update_s,
                    "compute_s": max(stage_s) * M, "allreduce_s": reduce_s,
                    "optimizer_s": update_s,
                    "memory_bytes": max(memory(bounds[k], bounds[k + 1]) for k in range(S)),
                    "comm_bytes": max(stage_params) * (2 if D > 1 else 0) + p2p_bytes,
                })
    configs.sort(key=lambda c: (c["predicted_step_s"], c["pipe"], c["microbatches"]))
    return configs
