"""Pipeline schedules (as data, without MPI) and the executor against unpipelined
training."""
import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

from mltrain.config import ConfigError
from mltrain.pipeline import (Action, Pipeline, build_schedule, check, default_balance,
                              sequential_layers)

from conftest import all_ranks


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("S", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 8])
def test_schedules_pair_up_and_never_deadlock(name, S, M):
    sched = build_schedule(name, S, M)
    res = check(sched, M)
    for s, acts in enumerate(sched):
        sends = sum(a.kind.startswith("SEND") for a in acts)
        assert sends == M * ((s < S - 1) + (s > 0))
    if name == "1f1b":  # at most S - s micro-batches in flight on stage s
        assert all(p <= min(S - s, M) for s, p in enumerate(res["peak_in_flight"]))
    else:
        assert res["peak_in_flight"] == [M] * S


def test_check_catches_broken_schedules():
    good = build_schedule("1f1b", 3, 4)
    # Stage 0 waits for a gradient before it sends the activation that produces it.
    dead = [[Action("F", 0), Action("RECV_GRAD", 0, 1), Action("SEND_ACT", 0, 1),
             Action("B", 0)],
            [Action("RECV_ACT", 0, 0), Action("F", 0), Action("B", 0),
             Action("SEND_GRAD", 0, 0)]]
    with pytest.raises(ValueError, match="deadlock"):
        check(dead, 1)
    swapped = [list(a) for a in good]
    f = next(k for k, a in enumerate(swapped[2]) if a.kind == "F")
    b = next(k for k, a in enumerate(swapped[2]) if a.kind == "B")
    swapped[2][f], swapped[2][b] = swapped[2][b], swapped[2][f]
    with pytest.raises(ValueError, match="before its forward"):
        check(swapped, 4)
    lost = [list(a) for a in good]
    lost[1] = [a for a in lost[1] if a != Action("RECV_GRAD", 3, 2)]
    with pytest.raises(ValueError, match="never received"):
        check(lost, 4)
    with pytest.raises(ValueError, match="schedule"):
        build_schedule("zigzag", 2, 2)


def test_layers_and_balance():
    from mltrain.nn import MLP, ResNet

    assert len(sequential_layers(ResNet(8, 4, 5, 3))) == 7
    assert len(sequential_layers(MLP(8, 4, 2, 3))) == 6
    with pytest.raises(ConfigError, match="not sequential"):
        sequential_layers(torch.nn.Linear(2, 2))
    assert default_balance(7, 3) == [3, 2, 2]
    layers = sequential_layers(ResNet(8, 4, 2, 3))
    with pytest.raises(ConfigError, match="pipeline.balance"):
        Pipeline(layers, MPI.COMM_SELF, microbatches=2, balance=[3])
    with pytest.raises(ConfigError, match="stages for a model"):
        Pipeline(layers[:0], MPI.COMM_SELF, microbatches=2)


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("M", [1, 3, 4])
@pytest.mark.parametrize("how", ["spin", "yield"])
def test_pipelined_gradients_equal_unpipelined(comm, schedule, M, how, monkeypatch):
    from mltrain.comm import waiting
    from mltrain.nn import ResNet

    # Both ways of waiting for a message (polling in MPI; testing and yielding the core,
    # as on an oversubscribed node) give the same transfers.
    monkeypatch.setattr(waiting, "polite", how == "yield")

    torch.manual_seed(0)
    model = ResNet(12, 8, 6, 5).double()
    ref = ResNet(12, 8, 6, 5).double()
    ref.load_state_dict(model.state_dict())
    x, y = torch.randn(10, 12, dtype=torch.float64), torch.randint(0, 5, (10,))
    loss_ref = F.cross_entropy(ref(x), y)
    loss_ref.backward()
    layers = sequential_layers(model)
    pipe = Pipeline(layers, comm, microbatches=M, schedule=schedule)
    loss = pipe.step(x, y)
    ok = abs(loss - float(loss_ref)) <= 1e-12 * float(loss_ref)
    lo = sum(pipe.balance[:pipe.s])
    worst = 0.0
    for mine, theirs in zip(layers[lo:lo + pipe.balance[pipe.s]],
                            sequential_layers(ref)[lo:lo + pipe.balance[pipe.s]]):
        for p, q in zip(mine.parameters(), theirs.parameters()):
            worst = max(worst, float((p.grad - q.grad).norm() / q.grad.norm()))
    all_ranks(comm, ok and worst < 1e-12, f"loss {loss} vs {float(loss_ref)}, grad {worst:.2e}")


def _factorings(P):
    return [(S, P // S) for S in range(1, P + 1) if P % S == 0]


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "mgrit"])
def test_layered_pipeline_gradients_equal_serial(comm, schedule, exact):
    # Every pipe x layer factoring of the rank count; MGRIT either in exact sweeps or with
    # enough two-level iterations to be exact (at most 16 blocks a stage: 9 iterations).
    from mltrain.comm import Grid
    from mltrain.nn import ResNet
    from mltrain.pipeline import LayeredPipeline

    P = comm.Get_size()
    torch.manual_seed(1)
    x, y = torch.randn(9, 12, dtype=torch.float64), torch.randint(0, 5, (9,))
    for S, L in _factorings(P):
        torch.manual_seed(0)
        model = ResNet(12, 8, 16, 5).double()
        ref = ResNet(12, 8, 16, 5).double()
        ref.load_state_dict(model.state_dict())
        loss_ref = F.cross_entropy(ref(x), y)
        loss_ref.backward()
        gc = Grid.for_world(P, pipe=S, layer=L).build(comm)
        pipe = LayeredPipeline(model, gc.comms["pipe"], gc.comms["layer"], microbatches=3,
                               schedule=schedule, levels=2, cf=2, iters=9, bwd_iters=9)
        pipe.lp.exact = exact
        loss = pipe.step(x, y)
        ok = abs(loss - float(loss_ref)) <= 1e-12 * float(loss_ref)
        mine = {id(p) for p in pipe.parameters()}
        worst, missing = 0.0, 0
        for p, q in zip(model.parameters(), ref.parameters()):
            if id(p) in mine:  # what this rank trains has the serial gradient
                missing += p.grad is None
                if p.grad is not None:
                    worst = max(worst, float((p.grad - q.grad).norm() / q.grad.norm()))
            else:  # and nothing else gets one
                missing += p.grad is not None
        # After gathering, every rank holds the whole network.
        for p in model.parameters():
            p.data.add_(1.0)
        pipe.gather(pipe.segments)
        again = all(torch.equal(p, q + 1.0) for p, q in zip(model.parameters(),
                                                            ref.parameters()))
        gc.free()
        all_ranks(comm, ok and worst < 1e-12 and not missing and again,
                  f"S={S} L={L}: loss {loss} vs {float(loss_ref)}, grad {worst:.2e}, "
                  f"{missing} wrong, gathered {again}")


def test_layered_balance_and_errors():
    from mltrain.nn import MLP, ResNet
    from mltrain.pipeline import LayeredPipeline, Segment, layered_balance

    assert layered_balance(16, 2, 2, 2, 2) == [9, 9]
    assert layered_balance(12, 3, 1, 2, 2) == [5, 4, 5]
    assert layered_balance(8, 1, 1, 3, 2) == [10]
    with pytest.raises(ConfigError, match="do not make 3 stages of 2 layer ranks"):
        layered_balance(8, 3, 2, 2, 2)
    model = ResNet(4, 3, 6, 2)
    seg = Segment(model, 3, 8)  # blocks 2..5 and the closing
    assert list(seg.blocks) == list(model.blocks[2:]) and seg.closing is model.closing
    assert isinstance(seg.opening, torch.nn.Identity)
    x = torch.randn(2, 4)
    assert torch.equal(Segment(model, 3, 8)(Segment(model, 0, 3)(x)), model(x))
    with pytest.raises(ConfigError, match="pipeline.balance"):
        LayeredPipeline(model, MPI.COMM_SELF, MPI.COMM_SELF, microbatches=1, balance=[7])
    with pytest.raises(ConfigError, match="pipeline.balance: stage 0 .*divisible"):
        LayeredPipeline(model, MPI.COMM_SELF, MPI.COMM_SELF, microbatches=1, levels=3, cf=2,
                        balance=[8])
    with pytest.raises(ConfigError, match="residual network"):
        LayeredPipeline(MLP(4, 3, 2, 2), MPI.COMM_SELF, MPI.COMM_SELF, microbatches=1)


PIPE = ["model.name=resnet", "model.depth=6", "model.width=16", "run.dtype=float64",
        "data.partition=strided", "data.shuffle=false", "data.batch_size=48", "run.steps=6",
        "optim.name=adam", "optim.lr=0.01", "run.threads=1", "pipeline.microbatches=3"]


def _train(cfg_list, comm):
    from mltrain.config import load_config
    from mltrain.linalg.vector import flat_params
    from mltrain.train import Trainer

    t = Trainer(load_config(None, cfg_list), comm, quiet=True, metrics=False)
    s = t.train()  # ends with an evaluation, which gathers every stage
    params = flat_params(t.net)
    t.close()
    return s, params


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_training_equals_serial(comm, schedule):
    # Every pipeline degree the rank count allows, data parallelism on the rest.
    P = comm.Get_size()
    _, ref = _train(PIPE, MPI.COMM_SELF)
    for pipe in [d for d in range(2, P + 1) if P % d == 0]:
        s, par = _train(PIPE + [f"parallel.pipe={pipe}", f"pipeline.schedule={schedule}"],
                        comm)
        diff = float((par - ref).norm() / ref.norm())
        all_ranks(comm, diff < 1e-10 and s["pipeline_stages"] == pipe, f"pipe={pipe}: {diff:.2e}")


@pytest.mark.mpi(min_size=2)
def test_pipeline_checkpoint_resumes_at_another_degree(comm, shared_tmp):
    from mltrain.config import load_config
    from mltrain.linalg.vector import flat_params
    from mltrain.train import Trainer

    ck = shared_tmp / "pipe-ck"
    base = PIPE + [f"checkpoint.dir={ck}"]
    _, written = _train(base + [f"parallel.pipe={comm.Get_size()}"], comm)
    rank = comm.Get_rank()
    sub = comm.Split(0 if rank == 0 else MPI.UNDEFINED, rank)
    ok = True
    if sub != MPI.COMM_NULL:  # serially, from the pipelined run's checkpoint
        t = Trainer(load_config(None, base + ["checkpoint.resume=true"]), sub, quiet=True,
                    metrics=False)
        params = list(t.net.parameters())
        ok = (torch.equal(flat_params(t.net), written) and t.step == 6
              and all("exp_avg" in t.optimizer.state[p] for p in params))
        t.close()
        sub.Free()
    all_ranks(comm, comm.allreduce(int(ok), op=MPI.MIN) == 1)


LAYERED = [c.replace("model.depth=6", "model.depth=16") for c in PIPE] + [
    "mgrit.levels=2", "mgrit.cf=2", "mgrit.iters=9", "mgrit.bwd_iters=9"]


@pytest.mark.mpi(min_size=4)
def test_layered_pipeline_training_and_checkpoint_equal_serial(comm, shared_tmp):
    # Grid data x pipe=2 x layer=2 (converged MGRIT) trains as the serial network does; its
    # checkpoint holds every stage's blocks and their Adam state (resumed serially).
    from mltrain.config import load_config
    from mltrain.linalg.vector import flat_params
    from mltrain.train import Trainer

    P = comm.Get_size()
    ck = shared_tmp / "layered-ck"
    _, ref = _train(LAYERED, MPI.COMM_SELF)
    s, par = _train(LAYERED + ["parallel.pipe=2", "parallel.layer=2", "pipeline.balance=7,11",
                               f"checkpoint.dir={ck}"], comm)
    diff = float((par - ref).norm() / ref.norm())
    ok = diff < 1e-10 and s["pipeline_stages"] == 2 and s["layer_parallel"] == 2
    ok = ok and len(s["mgrit_residuals"]["forward"]) == 9
    rank = comm.Get_rank()
    sub = comm.Split(0 if rank == 0 else MPI.UNDEFINED, rank)
    if sub != MPI.COMM_NULL:
        t = Trainer(load_config(None, LAYERED + [f"checkpoint.dir={ck}",
                                                 "checkpoint.resume=true"]), sub, quiet=True,
                    metrics=False)
        ok = ok and (torch.equal(flat_params(t.net), par) and t.step == 6
                     and all("exp_avg" in t.optimizer.state[p] for p in t.net.parameters()))
        t.close()
        sub.Free()
    all_ranks(comm, comm.allreduce(int(ok), op=MPI.MIN) == 1, f"P={P}: {diff:.2e}")


def test_layered_pipeline_errors():
    from conftest import cli_error

    cli_error(["parallel.pipe=2", "parallel.layer=2", "model.name=mlp", "run.steps=1"],
              "residual network", ranks=4)
    cli_error(["parallel.pipe=2", "parallel.layer=2", "model.name=resnet", "model.depth=8",
               "pipeline.balance=2,8", "run.steps=1"], "pipeline.balance: stage 0", ranks=4)


def test_pipeline_rank_count_errors():
    from conftest import cli_error

    cli_error(["parallel.pipe=2", "pipeline.balance=1,1", "run.steps=1"], "pipeline.balance")
    cli_error(["parallel.pipe=2", "pipeline.microbatches=1000", "run.steps=1"],
              "pipeline.microbatches")


def test_waiting_mode_follows_the_launcher_and_the_override(monkeypatch):
    import os

    from mltrain.comm import waiting

    cpus = len(os.sched_getaffinity(0))
    for var in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MLTRAIN_WAIT"):
        monkeypatch.delenv(var, raising=False)
    assert not waiting.oversubscribed()  # no launcher variables: one rank
    monkeypatch.setenv("MPI_LOCALNRANKS", str(cpus + 1))
    assert waiting.oversubscribed() and waiting._choose()
    monkeypatch.setenv("MLTRAIN_WAIT", "spin")
    assert not waiting._choose()
    monkeypatch.setenv("MPI_LOCALNRANKS", str(cpus))
    monkeypatch.setenv("MLTRAIN_WAIT", "yield")
    assert not waiting.oversubscribed() and waiting._choose()
    monkeypatch.delenv("MPI_LOCALNRANKS")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_SIZE", str(cpus + 3))
    monkeypatch.delenv("MLTRAIN_WAIT")
    assert waiting.oversubscribed()
