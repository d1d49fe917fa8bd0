"""Parameter servers (issue 21): bulk-synchronous pushes equal synchronous data parallelism,
no push is lost at any staleness (also when workers run different numbers of steps), the
staleness bound holds under a straggler, and the Trainer's ps runs (workers + servers)
match allreduce at k = 0, resume exactly and end cleanly. The last S ranks serve; float64.
"""
import time

import pytest
import torch
from mpi4py import MPI
from torch import nn

from mltrain.config import load_config
from mltrain.linalg.vector import FlatParams
from mltrain.config import ConfigError
from mltrain.sync.ps import PSClient, PSServer, flat_state, load_flat_state, shard_bounds
from mltrain.sync.ps_rma import RMAClient, RMAServer
from mltrain.train import Trainer

from conftest import all_ranks

MPI2 = pytest.mark.mpi(min_size=2)
LR, STEPS = 0.1, 6


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _batch(worker: int, step: int):
    g = torch.Generator().manual_seed(1000 * worker + step)
    return (torch.randn(8, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (8,), generator=g))


def _grad(net, flat, worker, step):
    net.zero_grad(set_to_none=True)
    x, y = _batch(worker, step)
    nn.functional.cross_entropy(net(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in flat.params])


def _run(comm, servers: int, k: int, slow: int | None = None, record=False,
         steps=lambda rank: STEPS, transport="messages"):
    """Trains ``steps(rank)`` steps with ``servers`` servers (the last ranks) over
    ``transport`` (rma: k = -1 only); returns (role, result): a worker's final parameters
    and pushes, a server's (bounds, final shard, report)."""
    P, rank = comm.Get_size(), comm.Get_rank()
    W = P - servers
    net = _net()
    flat = FlatParams(net)
    x0 = flat.get()
    bounds = shard_bounds(flat.numel, servers)
    group = comm.Split(int(rank >= W), rank)  # the workers' own communicator
    if rank >= W:
        group.Free()
        lo, hi = bounds[rank - W]
        if transport == "rma":
            srv = RMAServer(comm, x0[lo:hi], list(range(W)), first=rank == W)
        else:
            srv = PSServer(comm, x0[lo:hi], list(range(W)), k,
                           lambda ps: torch.optim.SGD(ps, lr=LR))
        report = srv.serve()
        return "server", (bounds[rank - W], srv.param.detach().clone(), report)
    if transport == "rma":
        client = RMAClient(comm, list(range(W, P)), bounds, W, LR, record=record)
        client.open()
    else:
        client = PSClient(comm, list(range(W, P)), bounds, W, record=record)
    out = x0.clone()
    for step in range(steps(rank)):
        if slow is not None and rank == slow:
            time.sleep(0.02)
        g = _grad(net, flat, rank, step)
        client.push_pull(g, step, out)
        flat.set(out)
    report = client.report_all(group) if transport == "rma" else None
    group.Free()
    client.done()
    return "worker", (flat.get(), client.pushed, report)


def test_shard_bounds():
    assert shard_bounds(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert shard_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="parallel.servers"):
        shard_bounds(2, 3)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_flat_state_round_trip(name):
    """Also with a one-element parameter first, whose moments look like Adam's step."""
    net = _net()
    net.scale = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
    params = [net.scale] + [p for n, p in net.named_parameters() if n != "scale"]
    opt = (torch.optim.SGD(params, lr=0.1, momentum=0.9) if name == "sgd" else
           torch.optim.Adam(params, lr=0.1))
    for _ in range(2):
        net.zero_grad(set_to_none=True)
        x, y = _batch(0, 0)
        nn.functional.cross_entropy(net(x) * net.scale, y).backward()
        opt.step()
    st = flat_state(opt, params)
    n = sum(p.numel() for p in params)
    assert st and all(v.numel() == (1 if k == "step" else n) for k, v in st.items()), \
        {k: v.shape for k, v in st.items()}
    other = (torch.optim.SGD(params, lr=0.1, momentum=0.9) if name == "sgd" else
             torch.optim.Adam(params, lr=0.1))
    load_flat_state(other, params, st)
    for p in params:
        for key, v in opt.state[p].items():
            assert torch.equal(other.state[p][key], v), key


@MPI2
@pytest.mark.parametrize("servers", [1, 2])
def test_bulk_synchronous_equals_data_parallel_sgd(comm, servers):
    P = comm.Get_size()
    if P - servers < 1:
        pytest.skip(f"{servers} servers leave no worker on {P} ranks")
    role, res = _run(comm, servers, k=0)
    workers = comm.Split(0 if role == "worker" else 1, comm.Get_rank())
    if role == "worker":  # the reference: allreduce of the mean gradient, SGD step
        net = _net()
        flat = FlatParams(net)
        W = workers.Get_size()
        for step in range(STEPS):
            g = _grad(net, flat, workers.Get_rank(), step)
            g = torch.from_numpy(workers.allreduce(g.numpy())) / W
            flat.set(flat.get() - LR * g)
        ref = flat.get()
        r = float((res[0] - ref).norm() / ref.norm())
        ok, msg = r <= 1e-10, f"ps k=0 vs data-parallel SGD: relative {r:.2e}"
    else:
        ok, msg = res[2]["staleness_max"] == 0, f"k = 0 applied stale pushes: {res[2]}"
    workers.Free()
    all_ranks(comm, ok, msg)


@MPI2
@pytest.mark.parametrize("k, transport", [(0, "messages"), (2, "messages"), (-1, "messages"),
                                          (-1, "rma")])
def test_no_push_is_lost(comm, k, transport):
    """Final = initial - lr * (sum of every push), whatever order the servers applied
    them in; worker r runs STEPS + r steps (the servers must not wait for the ones that
    finished) and worker 0 is slow. The one-sided transport's workers count every push."""
    servers = 1 if comm.Get_size() < 4 else 2
    role, res = _run(comm, servers, k, slow=0, record=True, steps=lambda r: STEPS + r,
                     transport=transport)
    workers = comm.gather(res if role == "worker" else None, root=0)
    shards = comm.gather(res if role == "server" else None, root=0)
    ok, msg = True, ""
    if comm.Get_rank() == 0:
        x0 = FlatParams(_net()).get()
        pushes = [g for r in workers if r is not None for g in r[1]]
        want = x0 - LR * torch.stack(pushes).sum(0)
        final = x0.clone()
        for s in shards:
            if s is not None:
                (lo, hi), shard, rep = s
                final[lo:hi] = shard
                if transport == "rma":  # the workers keep the record
                    rep = next(r for r in workers if r is not None)[2]
                ok = ok and rep["pushes"] == len(pushes) * (servers if transport == "rma"
                                                           else 1)
        r = float((final - want).norm() / want.norm())
        ok, msg = ok and r <= 1e-12, f"k = {k}: relative {r:.2e}, {len(pushes)} pushes"
    ok, msg = comm.bcast((ok, msg))
    all_ranks(comm, ok, msg)


@MPI2
@pytest.mark.parametrize("k", [0, 1, 2])
def test_staleness_bound_holds_under_a_straggler(comm, k):
    if comm.Get_size() < 3:
        pytest.skip("a straggler needs two workers")
    role, res = _run(comm, 1, k, slow=0)
    ok, msg = True, ""
    if role == "server":
        rep = res[2]
        ok = rep["staleness_max"] <= k and rep["pushes"] == (comm.Get_size() - 1) * STEPS
        msg = f"k = {k}: {rep}"
    all_ranks(comm, ok, msg)


# -- through the Trainer ---------------------------------------------------------------------
BASE = ["run.dtype=float64", "model.width=16", "model.depth=2", "run.threads=1",
        "data.name=synthetic", "optim.lr=0.05", "run.log_every=2"]


def _train(comm, extra, steps=8):
    """A Trainer run; returns (the parameters it ends with: the servers' for ps, the
    summary) on every rank of ``comm``."""
    t = Trainer(load_config(None, BASE + [f"run.steps={steps}"] + extra), comm, quiet=True,
                metrics=False)
    summary = t.train()
    if t.serving:
        flat = None
    else:
        with t._gathered():  # the servers' parameters (ps) or the replicas' (allreduce)
            flat = FlatParams(t.net).get()
    t.close()
    return flat, summary


def _workers_batch(W: int) -> str:
    return f"data.batch_size={12 * W}"


@MPI2
@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_trainer_bulk_synchronous_equals_allreduce(comm, optim):
    """sync.name = ps with k = 0 on P ranks (1 server) trains as allreduce on the P - 1
    workers alone, with the same global batch and the server-side optimizer."""
    P = comm.Get_size()
    W = P - 1
    extra = [f"optim.name={optim}", "optim.momentum=0.9", _workers_batch(W)]
    got, summary = _train(comm, extra + ["sync.name=ps", "sync.staleness=0"])
    sub = comm.Split(0 if comm.Get_rank() < W else MPI.UNDEFINED, comm.Get_rank())
    ok, msg = True, ""
    if sub != MPI.COMM_NULL:
        ref, _ = _train(sub, extra)
        r = float((got - ref).norm() / ref.norm())
        ok, msg = r <= 1e-10, f"ps k=0 vs allreduce on {W} ranks: relative {r:.2e}"
        sub.Free()
    else:  # the server ends with the workers' summary
        ok = summary["sync"] == "ps" and summary["staleness_max"] == 0
        msg = f"server's summary: {summary}"
    all_ranks(comm, ok and summary["pushes"] == W * 8, msg or f"{summary}")


@MPI2
@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_trainer_resume_is_exact_at_k0(comm, shared_tmp, optim):
    """4 steps, checkpoint, resume to 8 == 8 steps straight, bit for bit (parameters from
    the servers, the servers' optimizer state in the checkpoint)."""
    W = comm.Get_size() - 1
    extra = ["sync.name=ps", f"optim.name={optim}", "optim.momentum=0.9", _workers_batch(W)]
    ck = f"{shared_tmp}/ps-{optim}"
    straight, _ = _train(comm, extra, steps=8)
    _train(comm, extra + [f"checkpoint.dir={ck}"], steps=4)
    resumed, s = _train(comm, extra + [f"checkpoint.dir={ck}", "checkpoint.resume=true"],
                        steps=8)
    ok = straight is None or torch.equal(straight, resumed)
    all_ranks(comm, ok and s["resumed_from"] is not None and s["steps"] == 8,
              f"resumed from {s['resumed_from']}: differs from the straight run")
    # The servers resume the clocks too: no push of a bulk-synchronous run is stale.
    all_ranks(comm, s["staleness_max"] == 0 and s["pushes"] == W * 4, f"{s}")


@MPI2
@pytest.mark.parametrize("k", [-1, 2])
def test_trainer_with_a_straggler_ends_cleanly(comm, k):
    """A 3x straggler among the workers, several servers when there are ranks for them:
    every push is applied once and the bound holds."""
    P = comm.Get_size()
    S = 2 if P >= 4 else 1
    W = P - S
    extra = ["sync.name=ps", f"sync.staleness={k}", f"parallel.servers={S}",
             _workers_batch(W), "optim.name=sgd", "run.straggler=0:3", "run.log_every=100"]
    _, s = _train(comm, extra, steps=10)
    ok = (s["pushes"] == W * 10 * S and s["updates"] == W * 10
          and (k < 0 or s["staleness_max"] <= k) and s["test_accuracy"] is not None)
    all_ranks(comm, ok, f"k = {k}: {s}")


@MPI2
def test_trainer_one_sided_trains_as_the_server_loop(comm):
    """sync.transport = rma (k = -1, plain SGD): with one worker the same parameters as the
    server loop to 1e-12 (the add order cannot vary); with more every push is applied and
    recorded."""
    W = comm.Get_size() - 1
    extra = [_workers_batch(W), "optim.name=sgd", "optim.momentum=0", "sync.name=ps",
             "sync.staleness=-1"]
    loop, _ = _train(comm, extra)
    rma, s = _train(comm, extra + ["sync.transport=rma"])
    ok, msg = s["pushes"] == W * 8 and s["updates"] == W * 8, f"{s}"
    if loop is not None and W == 1:
        rel = float((rma - loop).norm() / loop.norm())
        ok, msg = ok and rel <= 1e-12 and s["staleness_max"] == 0, f"relative {rel:.2e}; {s}"
    all_ranks(comm, ok, msg)


@pytest.mark.parametrize("extra", [["sync.staleness=0"], ["optim.momentum=0.9"],
                                   ["optim.name=adam"], ["optim.weight_decay=0.1"],
                                   ["sync.name=allreduce"]])
def test_one_sided_refuses_what_it_cannot_do(extra):
    base = ["sync.name=ps", "sync.staleness=-1", "optim.name=sgd", "optim.momentum=0",
            "sync.transport=rma"]
    load_config(None, base)  # what it can do
    with pytest.raises(ConfigError, match="sync.transport"):
        load_config(None, base + extra)
