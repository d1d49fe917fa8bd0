"""The gradient reducer against the average of every rank's gradients (gathered and
averaged in NumPy), in both modes and at bucket sizes that put boundaries everywhere, on
every device at hand (a GPU's buckets are staged through pinned host memory)."""
import numpy as np
import pytest
import torch
from torch import nn

from mltrain.comm import GradReducer, broadcast_parameters

from conftest import all_ranks

pytestmark = pytest.mark.mpi(min_size=1)


class Net(nn.Module):
    """Uneven parameter sizes, and a branch that some ranks skip (unused parameters)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(7, 13)
        self.b = nn.Linear(13, 3, bias=False)
        self.skip = nn.Linear(7, 3)
        self.scalar = nn.Parameter(torch.tensor(0.5))
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)

    def forward(self, x, use_skip):
        out = self.b(torch.tanh(self.a(x))) * self.scalar
        return out + self.skip(x) if use_skip else out


def local_grads(model, rank, use_skip):
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64)
    model.zero_grad(set_to_none=True)
    model(x, use_skip).square().sum().backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters() if p.requires_grad}


def exact_average(model, P):
    """What each of P ranks would compute alone from ``model``'s weights, averaged in NumPy."""
    ref = Net().double()
    ref.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    per_rank = [local_grads(ref, r, use_skip=(r % 2 == 0)) for r in range(P)]
    return {n: np.mean([g[n].numpy() for g in per_rank], axis=0) for n in per_rank[0]}


@pytest.mark.parametrize("inflight", [1, 3])
@pytest.mark.parametrize("views", [True, False])
@pytest.mark.parametrize("bucket_bytes", [1, 100, 400, 1 << 20])
def test_average_matches_numpy(comm, device, views, bucket_bytes, inflight):
    P, rank = comm.Get_size(), comm.Get_rank()
    torch.manual_seed(0)
    model = Net().double().to(device)
    broadcast_parameters(model, comm)
    expect = exact_average(model, P)

    red = GradReducer(model.parameters(), comm, bucket_bytes=bucket_bytes,
                      grad_as_bucket_view=views, max_inflight=inflight)
    for _ in range(2):  # twice: buffers must be reset between steps
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(5, 7, generator=g, dtype=torch.float64).to(device)
        red.prepare()
        model(x, use_skip=(rank % 2 == 0)).square().sum().backward()
        red.finish()
        for n, p in model.named_parameters():
            if not p.requires_grad:
                all_ranks(comm, p.grad is None, f"{n} frozen")
                continue
            all_ranks(comm, p.grad.device == p.device and np.allclose(
                p.grad.cpu().numpy(), expect[n], rtol=1e-13, atol=1e-15),
                      f"{n} views={views} bucket={bucket_bytes}")
    if bucket_bytes == 1:
        all_ranks(comm, len(red.buckets) == 6)  # one bucket per trainable parameter
    red.remove()


@pytest.mark.parametrize("views", [True, False])
def test_stages_ready_out_of_order_keep_the_call_order(comm, monkeypatch, views):
    """On a GPU a later bucket's host copy can finish before an earlier one's, and not in the
    same order on every rank; MPI pairs collectives by call order, so the allreduces must
    still start in bucket order. Simulated on the CPU with staged buckets whose stage says
    "not yet" to non-blocking queries: bucket ``rank mod 3`` on each rank, a different one
    per rank, until finish() blocks on it."""
    from mltrain.comm import reducer as red_mod

    rank = comm.Get_rank()
    real = red_mod._Stage.ready
    slow = []

    def ready(self, block=False):
        return real(self, block) if block or self not in slow else False

    monkeypatch.setattr(red_mod._Stage, "ready", ready)
    torch.manual_seed(0)
    model = Net().double()
    broadcast_parameters(model, comm)
    expect = exact_average(model, comm.Get_size())
    red = GradReducer(model.parameters(), comm, bucket_bytes=1, grad_as_bucket_view=views,
                      max_inflight=3, staged=True)
    slow.append(red.buckets[rank % 3].stage)
    for _ in range(2):
        x = torch.randn(5, 7, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
        red.prepare()
        model(x, use_skip=(rank % 2 == 0)).square().sum().backward()
        red.finish()
        for n, p in model.named_parameters():
            if p.requires_grad:
                all_ranks(comm, np.allclose(p.grad.numpy(), expect[n], rtol=1e-13, atol=1e-15),
                          f"{n} views={views}")
    red.remove()


def test_views_stay_views(comm, device):
    torch.manual_seed(0)
    model = Net().double().to(device)
    red = GradReducer(model.parameters(), comm, bucket_bytes=1 << 20)
    x = torch.ones(2, 7, dtype=torch.float64, device=device)
    red.prepare()
    model(x, True).sum().backward()
    red.finish()
    flat = red.buckets[0].flat
    lo, hi = flat.data_ptr(), flat.data_ptr() + flat.numel() * 8
    inside = all(lo <= p.grad.data_ptr() < hi for p in model.parameters() if p.requires_grad)
    all_ranks(comm, inside and len(red.buckets) == 1)
    red.remove()


def test_reduce_without_hooks_and_misuse(comm, device):
    P = comm.Get_size()
    model = nn.Linear(3, 2).double().to(device)
    red = GradReducer(model.parameters(), comm)
    for p in model.parameters():
        p.grad = torch.full_like(p, float(comm.Get_rank()))
    red.reduce()
    all_ranks(comm, all(torch.allclose(p.grad, torch.full_like(p, (P - 1) / 2))
                        for p in model.parameters()))
    with pytest.raises(RuntimeError, match="without prepare"):
        red.finish()
    red.prepare()
    with pytest.raises(RuntimeError, match="twice"):
        red.prepare()
    red.finish()
    red.remove()


def test_broadcast_parameters(comm, device):
    torch.manual_seed(comm.Get_rank())
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).double().to(device)
    model[1].running_mean.fill_(comm.Get_rank())
    broadcast_parameters(model, comm, root=0)
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).double()
    all_ranks(comm, torch.equal(model[0].weight.cpu(), ref[0].weight)
              and torch.equal(model[1].running_mean.cpu(), torch.zeros(4, dtype=torch.float64)))
