"""Data parallelism is exact: P ranks with global batch B follow the same iterates as one
rank with batch B (float64, strided partition, no shuffle). The serial reference runs on
each rank itself, on COMM_SELF."""
import pytest
import torch
from mpi4py import MPI

from mltrain.comm import CollectiveError
from mltrain.config import load_config
from mltrain.train import Trainer

from conftest import all_ranks, require

pytestmark = pytest.mark.mpi(min_size=1)

EXACT = ["run.dtype=float64", "data.partition=strided", "data.shuffle=false", "optim.name=sgd",
         "optim.lr=0.05", "optim.momentum=0.9", "run.steps=20", "data.batch_size=24",
         "model.width=16", "model.depth=3", "run.threads=1"]


def max_rel_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    worst = 0.0
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        worst = max(worst, ((p - q).norm() / q.norm().clamp_min(1e-300)).item())
    return worst


@pytest.mark.parametrize("model", ["mlp", "resnet", "cnn"])
@pytest.mark.parametrize("views", [True, False])
def test_matches_serial_large_batch(comm, model, views):
    cfg = load_config(None, EXACT + [f"model.name={model}", f"comm.grad_as_bucket_view={str(views).lower()}",
                                     "comm.bucket_mb=0.001"])
    par = Trainer(cfg, comm, quiet=True, metrics=False)
    s_par = par.train()
    ser = Trainer(cfg, MPI.COMM_SELF, quiet=True, metrics=False)
    ser.train()
    diff = max_rel_diff(par.model, ser.model)
    all_ranks(comm, diff <= 1e-10, f"{model}: relative difference {diff:.2e}")
    # Replicas agree bit for bit (the averaged gradient is the same on every rank).
    flat = torch.cat([p.detach().reshape(-1) for p in par.model.parameters()])
    all_ranks(comm, torch.equal(flat, torch.from_numpy(comm.bcast(flat.numpy()))))
    all_ranks(comm, s_par["steps"] == 20 and s_par["ranks"] == comm.Get_size())
    if comm.Get_size() > 1:
        all_ranks(comm, s_par["comm_bytes"] > 0 and s_par["comm_calls"] >= 20)
    par.close()
    ser.close()


@pytest.mark.parametrize("optim", ["sgd", "adam", "tr"])
def test_depth_penalty_matches_serial_and_smooths_the_blocks(comm, optim):
    """model.depth_penalty on the first-order path (every rank adds it, the average counts
    it once) and in the trust region's objective and Hessian: the iterates of P ranks are
    the serial ones, and the trained blocks differ less from one another than without the
    penalty."""
    from mltrain.nn import depth_penalty, set_depth_penalty

    if optim == "tr":
        require("petsc4py")
    base = EXACT + ["model.name=resnet", "model.depth=4", f"optim.name={optim}",
                    "run.steps=10"]
    cfg = load_config(None, base + ["model.depth_penalty=0.5"])
    par = Trainer(cfg, comm, quiet=True, metrics=False)
    par.train()
    ser = Trainer(cfg, MPI.COMM_SELF, quiet=True, metrics=False)
    ser.train()
    diff = max_rel_diff(par.model, ser.model)
    all_ranks(comm, diff <= 1e-10, f"{optim}: relative difference {diff:.2e}")
    plain = Trainer(load_config(None, base), MPI.COMM_SELF, quiet=True, metrics=False)
    plain.train()
    set_depth_penalty(plain.model, 0.5)
    with torch.no_grad():
        smoothed, unpenalized = float(depth_penalty(ser.model)), float(depth_penalty(plain.model))
    all_ranks(comm, smoothed < 0.9 * unpenalized, f"{smoothed} vs {unpenalized}")
    for t in (par, ser, plain):
        t.close()


def test_indivisible_batch_is_a_config_error_everywhere(comm):
    P = comm.Get_size()
    if P == 1:
        pytest.skip("every batch divides among 1 rank")
    cfg = load_config(None, [f"data.batch_size={P * 5 + 1}"])
    with pytest.raises(CollectiveError, match="not divisible") as e:
        Trainer(cfg, comm, quiet=True, metrics=False)
    all_ranks(comm, e.value.kind == "ConfigError")


@pytest.mark.parametrize("kind", ["shards", "dirichlet", "classes", "quantity"])
def test_training_on_skewed_partitions(comm, kind):
    P = comm.Get_size()
    cfg = load_config(None, [f"data.partition={kind}", "run.steps=30", "data.batch_size=24",
                             "model.width=16", f"data.classes_per_rank={max(2, -(-10 // P))}",
                             "data.alpha=0.5", "run.threads=1"])
    t = Trainer(cfg, comm, quiet=True, metrics=False)
    before = t.evaluate()["train_loss"]
    after = t.train()["final_loss"]
    all_ranks(comm, after < before, f"{kind}: loss {before:.3f} -> {after:.3f}")
    sizes = comm.allgather(len(t.loader.x))
    all_ranks(comm, sum(sizes) == t.dataset.num_train, str(sizes))  # complete, disjoint
    t.close()
