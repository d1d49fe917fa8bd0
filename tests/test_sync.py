"""Synchronization schemes and compression against exact references."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from mltrain.comm import CollectiveError
from mltrain.config import load_config
from mltrain.sync import DPSGD, AsyncPushSum, PushSum, exponential_peers
from mltrain.sync.compression import PowerSGD, TopK, ring_allreduce_
from mltrain.train import Trainer

from conftest import all_ranks

pytestmark = pytest.mark.mpi(min_size=1)

BASE = ["run.dtype=float64", "data.batch_size=24", "model.width=16", "model.depth=2",
        "run.threads=1", "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9"]


def run(comm, extra, steps=20):
    t = Trainer(load_config(None, BASE + [f"run.steps={steps}"] + extra), comm, quiet=True,
                metrics=False)
    summary = t.train()
    flat = torch.cat([p.detach().reshape(-1) for p in t.model.parameters()])
    t.close()
    return flat, summary


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_localsgd_period_1_is_allreduce(comm):
    ref, _ = run(comm, ["sync.name=allreduce"])
    loc, s = run(comm, ["sync.name=localsgd", "sync.period=1"])
    all_ranks(comm, rel(loc, ref) < 1e-10, f"{rel(loc, ref):.2e}")
    warm, _ = run(comm, ["sync.name=localsgd", "sync.period=7", "sync.warmup_steps=20"])
    all_ranks(comm, rel(warm, ref) < 1e-10, "20 warm-up steps are synchronous steps")


def test_localsgd_local_phase_sends_one_period_th(comm):
    if comm.Get_size() == 1:
        pytest.skip("one rank sends nothing")
    _, a = run(comm, ["sync.name=allreduce"], steps=32)
    _, b = run(comm, ["sync.name=localsgd", "sync.period=16"], steps=32)
    all_ranks(comm, b["comm_bytes"] * 16 <= a["comm_bytes"] * 1.0001,
              f"{b['comm_bytes']} vs {a['comm_bytes']}")


def test_easgd_alpha_0_is_independent_training(comm):
    never, _ = run(comm, ["sync.name=localsgd", "sync.period=1000000"])
    ea, s = run(comm, ["sync.name=easgd", "sync.alpha=0", "sync.period=1"])
    all_ranks(comm, torch.equal(never, ea), "alpha = 0 must not move a replica")
    if comm.Get_size() > 1:
        others = comm.allgather(ea.numpy())
        all_ranks(comm, any(not np.array_equal(others[0], o) for o in others[1:]),
                  "replicas on different partitions should differ")


@pytest.mark.parametrize("rounds_extra", [0, 3])
def test_pushsum_conserves_and_averages(comm, rounds_extra):
    P, r = comm.Get_size(), comm.Get_rank()
    ps = PushSum(comm, 5, torch.float64)
    x = torch.arange(5, dtype=torch.float64) * 8 + 64 * r  # integers: sums are exact
    w = 1.0
    total_x = comm.allreduce(float(x.sum()))
    m = len(exponential_peers(P))
    for k in range(m + rounds_extra):
        w = ps.mix(x, w, k)
        all_ranks(comm, comm.allreduce(float(x.sum())) == total_x and
                  comm.allreduce(w) == P, "push-sum must conserve sum(x) and sum(w)")
    mean = torch.arange(5, dtype=torch.float64) * 8 + 64 * (P - 1) / 2
    if P & (P - 1) == 0:  # power of two: exact after log2(P) rounds
        all_ranks(comm, torch.equal(x / w, mean), f"{(x / w).tolist()} vs {mean.tolist()}")
    else:
        all_ranks(comm, torch.allclose(x / w, mean, rtol=0.3), "moves toward the mean")


def test_async_pushsum_conserves_after_flush(comm):
    P, r = comm.Get_size(), comm.Get_rank()
    ps = AsyncPushSum(comm, 4, torch.float64, slots=2, max_pending=3)
    x = torch.full((4,), 16.0 * (r + 1), dtype=torch.float64)
    w = 1.0
    total = comm.allreduce(float(x.sum()))
    for k in range(7 + r):  # uneven round counts: ranks run ahead of each other
        w = ps.push(x, w, k)
    w = ps.flush(x, w)
    all_ranks(comm, comm.allreduce(float(x.sum())) == total and comm.allreduce(w) == P,
              f"x {comm.allreduce(float(x.sum()))} vs {total}, w {comm.allreduce(w)}")
    ps.close()


@pytest.mark.parametrize("asynchronous", [False, True])
def test_sgp_debiased_parameters_take_the_optimizers_step_whatever_the_weight(asynchronous):
    """Asynchronous rounds drift the push-sum weight w away from 1; the parameters the
    optimizer sees (z = x / w) must still move by exactly its step, not by step / w (with
    w = 0.1 that was 10x the learning rate). One rank: no mixing, the weight stays set."""
    from mpi4py import MPI

    from mltrain.sync import SGP

    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    sgp = SGP(model, MPI.COMM_SELF, asynchronous=asynchronous)
    for w in (1.0, 0.1, 3.0):
        sgp.w = w
        sgp.x = sgp.flat.get() * w  # the state (x, w) whose de-biased point is the model
        z = sgp.flat.get()
        step = torch.randn(z.numel(), dtype=torch.float64)
        sgp.flat.set(z + step)  # what an optimizer step leaves in the parameters
        sgp.after_step(0)
        moved = sgp.flat.get() - z
        assert torch.allclose(moved, step, rtol=1e-12, atol=1e-14), \
            (w, float((moved - step).norm()))
        assert torch.allclose(sgp.x / sgp.w, sgp.flat.get(), rtol=1e-15, atol=0)
    sgp.close()


def test_exponential_peers():
    assert exponential_peers(1) == [] and exponential_peers(2) == [1]
    assert exponential_peers(4) == [1, 2] and exponential_peers(5) == [1, 2, 4]
    assert exponential_peers(8) == [1, 2, 4]


def test_dpsgd_mixing_matrix(comm):
    P, r = comm.Get_size(), comm.Get_rank()
    model = nn.Linear(3, 2, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(float(r + 1) ** 2)
    DPSGD(model, comm).after_backward(0)
    X = np.array([(q + 1.0) ** 2 for q in range(P)])
    if P == 1:
        W = np.eye(1)
    elif P == 2:
        W = np.full((2, 2), 0.5)
    else:
        W = np.zeros((P, P))
        for i in range(P):
            for j in (i - 1, i, i + 1):
                W[i, j % P] = 1 / 3
    expect = (W @ X)[r]
    all_ranks(comm, np.allclose(model.weight.detach().numpy(), expect, rtol=1e-15),
              f"{model.weight[0, 0].item()} vs {expect}")


def _rank_grads(comm, shapes, seed=0):
    g = torch.Generator().manual_seed(seed + comm.Get_rank())
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]


def _exact_mean(comm, grads):
    return [torch.from_numpy(np.mean(comm.allgather(x.numpy()), axis=0)) for x in grads]


SHAPES = [(6, 5), (7,), (4, 3, 2), (1, 9)]


def _params(grads):
    ps = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    return ps


def test_topk_ratio_1_and_error_feedback(comm):
    grads = _rank_grads(comm, SHAPES)
    mean = _exact_mean(comm, grads)
    ps = _params(grads)
    TopK(comm, 1.0).average_grads(ps)
    all_ranks(comm, all(torch.allclose(p.grad, m, rtol=1e-13, atol=1e-15)
                        for p, m in zip(ps, mean)))
    tk = TopK(comm, 0.2)
    residual = torch.zeros(sum(g.numel() for g in grads), dtype=torch.float64)
    for step in range(3):
        grads = _rank_grads(comm, SHAPES, seed=10 * step)
        acc = torch.cat([g.reshape(-1) for g in grads]) + residual
        tk.average_grads(_params(grads))
        all_ranks(comm, torch.equal(tk.last_sent + tk.residual, acc),
                  "error feedback: sent + residual = gradient + previous residual")
        all_ranks(comm, int((tk.last_sent != 0).sum()) <= math.ceil(0.2 * acc.numel()))
        residual = tk.residual.clone()


def test_topk_breaks_exact_ties_towards_the_lower_index(comm, device):
    """Exact ties at the k-th magnitude occur in real gradients (mirror-symmetric weights,
    seen in the device test's run); torch.topk resolves them differently on a CPU and a
    GPU, so the selection takes the lowest indices among the tied, on every device."""
    from mltrain.sync.compression import _top_indices

    mag = torch.tensor([0.5, 2.0, 1.0, 3.0, 1.0, 1.0, 0.0, 1.0], dtype=torch.float64,
                       device=device)
    all_ranks(comm, sorted(_top_indices(mag, 4).tolist()) == [1, 2, 3, 4])
    all_ranks(comm, sorted(_top_indices(mag.flip(0), 4).tolist()) == [0, 2, 4, 6])
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1000, generator=g, dtype=torch.float64).to(device)  # no ties: topk's set
    all_ranks(comm, sorted(_top_indices(x, 37).tolist())
              == sorted(torch.topk(x, 37).indices.tolist()))
    x[5] = float("nan")  # NaN compares false: still exactly k entries
    all_ranks(comm, _top_indices(x, 37).numel() == 37)


def test_powersgd_full_rank_and_error_feedback(comm):
    grads = _rank_grads(comm, SHAPES)
    mean = _exact_mean(comm, grads)
    ps = _params(grads)
    PowerSGD(comm, rank=100).average_grads(ps)
    all_ranks(comm, all(torch.allclose(p.grad, m, rtol=1e-10, atol=1e-12)
                        for p, m in zip(ps, mean)), "full rank must equal plain averaging")
    ps2 = _params(grads)
    comp = PowerSGD(comm, rank=1)
    comp.average_grads(ps2)
    st = comp.state[0]
    M = grads[0]  # first step: no earlier residual
    approx = ps2[0].grad
    all_ranks(comm, torch.allclose(approx + st["err"], M, rtol=0, atol=1e-12),
              "error feedback: approximation + residual = gradient")
    agree = comm.allgather(approx.numpy())
    all_ranks(comm, all(np.array_equal(agree[0], a) for a in agree), "same on every rank")


@pytest.mark.parametrize("wire", [torch.float16, torch.bfloat16])
def test_ring_allreduce_16bit(comm, wire):
    g = torch.Generator().manual_seed(comm.Get_rank())
    x = torch.randn(101, generator=g)
    expect = torch.from_numpy(np.sum(comm.allgather(x.numpy()), axis=0))
    out = ring_allreduce_(x.clone(), comm, wire)
    tol = 1e-2 if wire == torch.bfloat16 else 2e-3
    all_ranks(comm, torch.allclose(out, expect, rtol=tol, atol=tol * comm.Get_size()))
    every = comm.allgather(out.numpy())
    all_ranks(comm, all(np.array_equal(every[0], e) for e in every), "bitwise equal replicas")


def test_topk_and_powersgd_in_training_match_plain(comm):
    ref, _ = run(comm, ["sync.name=allreduce"])
    tk, _ = run(comm, ["sync.compression=topk", "sync.topk_ratio=1"])
    ps, _ = run(comm, ["sync.compression=powersgd", "sync.rank=64"])
    all_ranks(comm, rel(tk, ref) < 1e-10 and rel(ps, ref) < 1e-8,
              f"topk {rel(tk, ref):.1e} powersgd {rel(ps, ref):.1e}")


def test_hierarchical(comm):
    P = comm.Get_size()
    rpn = 2 if P % 2 == 0 else 1
    flat, s = run(comm, ["sync.name=hierarchical", f"sync.ranks_per_node={rpn}",
                         "sync.period=5"], steps=20)
    every = comm.allgather(flat.numpy())
    # 20 steps = 4 syncs, the last one after the final step: all replicas equal.
    all_ranks(comm, all(np.array_equal(every[0], e) for e in every))
    if P == 3:
        with pytest.raises(CollectiveError, match="equal size"):
            run(comm, ["sync.name=hierarchical", "sync.ranks_per_node=2"], steps=1)


@pytest.mark.parametrize("extra", [
    ["sync.name=allreduce"], ["sync.name=localsgd", "sync.period=4"],
    ["sync.name=localsgd", "sync.period=4", "sync.warmup_steps=10"],
    ["sync.name=easgd", "sync.alpha=0.2", "sync.period=2"], ["sync.name=sgp"],
    ["sync.name=sgp", "sync.asynchronous=true", "run.straggler=0:2"],
    ["sync.name=dpsgd"], ["sync.name=hierarchical", "sync.ranks_per_node=1"],
    ["sync.compression=fp16"], ["sync.compression=bf16"],
    ["sync.compression=topk", "sync.topk_ratio=0.05"],
    ["sync.compression=powersgd", "sync.rank=2"],
], ids=lambda e: "-".join(x.split("=")[1] for x in e))
def test_every_scheme_drives_the_loss_down(comm, extra):
    # Asynchronous push-sum depends on timing (what has arrived when); give it room so the
    # check does not depend on how busy the machine is.
    steps = 200 if "sync.asynchronous=true" in extra else 60
    cfg = load_config(None, [f"run.steps={steps}", "data.batch_size=48", "model.width=32",
                             "run.threads=1", "data.partition=dirichlet", "data.alpha=1"]
                      + extra)
    t = Trainer(cfg, comm, quiet=True, metrics=False)
    before = t.evaluate()
    s = t.train()
    all_ranks(comm, s["final_loss"] < 0.75 * before["train_loss"] and
              s["test_accuracy"] > 0.5, f"{before['train_loss']:.3f} -> {s['final_loss']:.3f}"
              f", test {s['test_accuracy']:.2f}")
    if t.sync.drifts:
        all_ranks(comm, t.sync.distance() >= 0.0)
    t.close()


def test_resume_with_drifting_scheme_is_a_config_error():
    from mltrain.config import ConfigError

    with pytest.raises(ConfigError, match="checkpoint.resume"):
        load_config(None, ["sync.name=sgp", "checkpoint.dir=x", "checkpoint.resume=true"])
    with pytest.raises(ConfigError, match="sync.compression"):
        load_config(None, ["sync.name=sgp", "sync.compression=topk"])


def test_straggler_option(comm):
    from mltrain.config import ConfigError

    for bad in ("1", "a:2", "0:0.5", "-1:2"):
        with pytest.raises(ConfigError, match="run.straggler"):
            load_config(None, [f"run.straggler={bad}"])
    with pytest.raises(CollectiveError, match="does not exist"):
        Trainer(load_config(None, [f"run.straggler={comm.Get_size()}:2"]), comm, quiet=True,
                metrics=False)


def test_async_pushsum_large_messages_no_deadlock(comm):
    """Large messages go by rendezvous: a sender's wait needs the receiver to keep
    receiving. Ranks that stop at different rounds and hit the pending-send bound must
    still flush without deadlock."""
    P, r = comm.Get_size(), comm.Get_rank()
    n = 1 << 18  # 2 MiB in float64: far above any eager threshold
    ps = AsyncPushSum(comm, n, torch.float64, slots=1, max_pending=1)
    x = torch.full((n,), float(r + 1), dtype=torch.float64)
    w = 1.0
    total = comm.allreduce(float(x.sum()))
    for k in range(3 + 4 * r):
        w = ps.push(x, w, k)
    w = ps.flush(x, w)
    all_ranks(comm, comm.allreduce(float(x.sum())) == total and comm.allreduce(w) == P)
    ps.close()
