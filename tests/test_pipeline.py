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
def test_pipelined_gradients_equal_unpipelined(comm, schedule, M):
    from mltrain.nn import ResNet

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
