"""Every tensor collective against the same reduction done in NumPy, on every device at hand
(a GPU's tensors are staged through host memory unless the MPI is CUDA-aware)."""
import numpy as np
import pytest
import torch

from mltrain.comm import STATS, allgather, allreduce_, allreduce_scalar, broadcast_, iallreduce_, reduce_

from conftest import all_ranks

pytestmark = pytest.mark.mpi(min_size=1)


def local(rank, dtype, shape=(3, 5)):
    g = np.random.default_rng(100 + rank)
    return g.integers(-50, 50, shape).astype(dtype)


def everyone(comm, dtype, shape=(3, 5)):
    return [local(r, dtype, shape) for r in range(comm.Get_size())]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.int32])
@pytest.mark.parametrize("op, npop", [("sum", np.sum), ("max", np.max), ("min", np.min)])
def test_allreduce(comm, device, dtype, op, npop):
    t = torch.from_numpy(local(comm.Get_rank(), dtype)).to(device)
    allreduce_(t, comm, op)
    expect = npop(np.stack(everyone(comm, dtype)), axis=0)
    all_ranks(comm, t.device.type == device and np.array_equal(t.cpu().numpy(), expect),
              f"{op} {dtype}")


def test_iallreduce_and_stats(comm, device):
    t = torch.from_numpy(local(comm.Get_rank(), np.float64, (1000,))).to(device)
    b0, c0 = STATS.snapshot()
    h = iallreduce_(t, comm)
    h.wait()
    expect = np.sum(np.stack(everyone(comm, np.float64, (1000,))), axis=0)
    all_ranks(comm, np.array_equal(t.cpu().numpy(), expect))
    b1, c1 = STATS.snapshot()
    P = comm.Get_size()
    all_ranks(comm, (b1 - b0, c1 - c0) == ((8000, 1) if P > 1 else (0, 0)), str((b1 - b0, c1 - c0)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_broadcast_any_dtype(comm, device, dtype):
    root = comm.Get_size() - 1
    t = torch.full((4, 3), float(comm.Get_rank() + 1)).to(device, dtype)
    broadcast_(t, comm, root=root)
    all_ranks(comm, torch.equal(t.cpu(), torch.full((4, 3), float(root + 1)).to(dtype)))


def test_allgather(comm, device):
    t = torch.from_numpy(local(comm.Get_rank(), np.float32)).to(device)
    out = allgather(t, comm)
    all_ranks(comm, out.device.type == device
              and np.array_equal(out.cpu().numpy(), np.stack(everyone(comm, np.float32))))


def test_reduce_to_root(comm, device):
    P = comm.Get_size()
    t = torch.from_numpy(local(comm.Get_rank(), np.float64)).to(device)
    before = t.clone()
    reduce_(t, comm, root=P // 2)
    if comm.Get_rank() == P // 2:
        ok = np.array_equal(t.cpu().numpy(), np.sum(np.stack(everyone(comm, np.float64)), axis=0))
    else:
        ok = torch.equal(t, before)
    all_ranks(comm, ok)


def test_scalar_and_errors(comm):
    P = comm.Get_size()
    all_ranks(comm, allreduce_scalar(comm.Get_rank() + 1.0, comm) == P * (P + 1) / 2)
    with pytest.raises(TypeError, match="bfloat16"):
        allreduce_(torch.ones(3, dtype=torch.bfloat16), comm)
    with pytest.raises(ValueError, match="contiguous"):
        allreduce_(torch.ones(3, 3).t(), comm)
    with pytest.raises(ValueError, match="unknown reduction"):
        allreduce_(torch.ones(3), comm, op="avg")


@pytest.mark.mpi(min_size=1)
def test_local_cpu_masks_and_thread_share(comm):
    """The masks of the ranks on this node, gathered node-locally, against each rank's own
    (every rank of the test job shares this machine), and the thread share they give."""
    from mpi4py import MPI

    from mltrain.comm import local_cpu_masks
    from mltrain.utils import cpu_mask, threads_for

    masks = local_cpu_masks(comm)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    expect = local.allgather(cpu_mask())
    local.Free()
    all_ranks(comm, masks == expect and cpu_mask() in masks, str(masks))
    sharing = sum(1 for m in masks if set(m) & set(cpu_mask()))
    all_ranks(comm, threads_for(None, cpu_mask(), masks) == max(1, len(cpu_mask()) // sharing))
