"""Training on a device (issue 20): every path against the CPU run of the same configuration.

``device`` comes from conftest's one fixture: cpu everywhere, cuda where a GPU is visible.
On cuda a path must match the CPU run (float64: to 1e-12 relative); on cpu the device run
stages every MPI buffer through a separate host copy (``MLTRAIN_STAGE_HOST=1``, the path a GPU
without a CUDA-aware MPI takes) and must match the direct run bit for bit.
"""
import pytest
import torch
from mpi4py import MPI

from mltrain.comm import GradReducer, allreduce_, broadcast_
from mltrain.config import load_config
from mltrain.linalg.vector import flat_params
from mltrain.train import Trainer
from mltrain.utils.device import cuda_aware_mpi, select_device

from conftest import all_ranks, decisions_of, same_decisions

BASE = ["model.width=8", "model.depth=4", "data.batch_size=24", "run.threads=1",
        "run.steps=6", "run.dtype=float64", "data.partition=strided", "data.shuffle=false",
        "optim.lr=0.05"]
PATHS = {
    "sgd": ["optim.name=sgd", "optim.momentum=0.9"],
    "sgd-copy": ["optim.name=sgd", "comm.grad_as_bucket_view=false", "comm.bucket_mb=0.001"],
    "adam": ["optim.name=adam", "optim.lr=0.01", "comm.bucket_mb=0.001", "comm.max_inflight=2"],
    "localsgd": ["optim.name=sgd", "sync.name=localsgd", "sync.period=2"],
    "easgd": ["optim.name=sgd", "sync.name=easgd", "sync.period=2"],
    "sgp": ["optim.name=sgd", "sync.name=sgp"],
    "dpsgd": ["optim.name=sgd", "sync.name=dpsgd"],
    "hierarchical": ["optim.name=sgd", "sync.name=hierarchical"],
    "fp16": ["optim.name=sgd", "sync.compression=fp16"],
    "topk": ["optim.name=sgd", "sync.compression=topk", "sync.topk_ratio=0.2"],
    "powersgd": ["optim.name=sgd", "sync.compression=powersgd", "model.name=cnn"],
    "pipe": ["optim.name=sgd", "parallel.pipe=2", "pipeline.microbatches=2"],
    "layer": ["optim.name=sgd", "parallel.layer=2", "model.name=resnet", "mgrit.exact_after=0"],
    "tr": ["optim.name=tr", "run.costs=unit"],
    "tr-lsr1": ["optim.name=tr", "tr.curvature=lsr1", "run.costs=unit"],
    # Hessian, not RMTR's default L-SR1: on this tiny model L-SR1's updates amplify
    # last-bit differences 1e8-fold in 30 solves (the skip rule admits denominators down to
    # 1e-8 of their scale), so no device could match the CPU to 1e-12 (see the test below).
    "rmtr": ["optim.name=rmtr", "multilevel.levels=2", "model.name=resnet", "run.costs=unit",
             "tr.curvature=hessian"],
    "mgopt": ["optim.name=mgopt", "multilevel.levels=2", "model.name=resnet",
              "run.costs=unit"],
    "apts": ["optim.name=apts", "run.costs=unit"],
}
NEEDS = {"pipe": 2, "layer": 2}  # ranks a model-parallel path needs at least


def _run(sets, comm, device):
    t = Trainer(load_config(None, BASE + sets + [f"run.device={device}"]), comm, quiet=True,
                metrics=False)
    t.train()
    return t


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("path", list(PATHS))
def test_path_on_device_matches_cpu(comm, device, path, monkeypatch):
    if comm.Get_size() < NEEDS.get(path, 1):
        pytest.skip(f"{path} needs {NEEDS[path]} ranks")
    # Model-parallel paths over every rank (3 ranks: 3 stages, 3 layer ranks).
    sets = [s.replace("=2", f"={comm.Get_size()}") if s.startswith("parallel.") else s
            for s in PATHS[path]] + ([f"model.depth={4 * comm.Get_size()}"] if path in NEEDS else [])
    ref = _run(sets, comm, "cpu")
    if device == "cpu":
        monkeypatch.setenv("MLTRAIN_STAGE_HOST", "1")
    run = _run(sets, comm, device)
    all_ranks(comm, all(p.device.type == device for p in run.net.parameters()),
              f"{path}: parameters left {device}")
    same_decisions(comm, decisions_of(ref), decisions_of(run), path)
    a, b = flat_params(run.net).cpu(), flat_params(ref.net)
    rel = float((a - b).norm() / b.norm())
    if device == "cpu":
        all_ranks(comm, torch.equal(a, b), f"{path}: staged run differs (relative {rel:.2e})")
    else:
        all_ranks(comm, rel <= 1e-12, f"{path}: {device} vs cpu relative {rel:.2e}")
    run.close()
    ref.close()


@pytest.mark.parametrize("path", ["tr", "tr-lsr1", "rmtr", "apts"])
def test_device_comparison_is_not_luck(path, monkeypatch):
    """A GPU rounds gradients and curvature products differently from the CPU in the last
    bit. The cuda-vs-cpu comparison above (1e-12) means something only where the path does
    not amplify such differences beyond it: perturb every gradient and product by a
    relative 2e-16 on the CPU and require the same decisions and iterates within 1e-13.
    (MG/OPT's gradients do not pass through Curvature; its comparison stays as it is.)"""
    from mltrain.linalg import curvature as cv

    sets = BASE + PATHS[path]
    comm = MPI.COMM_SELF
    ref = _run(sets, comm, "cpu")
    gen = torch.Generator().manual_seed(1)
    grad, mv = cv.Curvature.loss_and_grad, cv.Curvature.mv

    def noisy(v):
        return v * (1 + 2e-16 * torch.randn(v.shape, generator=gen, dtype=v.dtype))

    def loss_and_grad(self):
        f, g = grad(self)
        return f, noisy(g)

    monkeypatch.setattr(cv.Curvature, "loss_and_grad", loss_and_grad)
    monkeypatch.setattr(cv.Curvature, "mv", lambda self, v: noisy(mv(self, v)))
    run = _run(sets, comm, "cpu")
    same_decisions(comm, decisions_of(ref), decisions_of(run), path)
    a, b = flat_params(run.net), flat_params(ref.net)
    rel = float((a - b).norm() / b.norm())
    assert 0 < rel <= 1e-13, f"{path}: 2e-16 noise moved the iterate by {rel:.2e}"
    run.close()
    ref.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("k", [0, -1])
def test_parameter_servers_on_device_match_cpu(comm, device, k, monkeypatch):
    """sync.name = ps with workers on ``device`` (servers in host memory) against the same
    run on the CPU: equal bits when staging is forced on the CPU, 1e-12 on a GPU (k = 0;
    k = -1 on one worker, whose order cannot vary)."""
    if k < 0 and comm.Get_size() > 2:
        pytest.skip("asynchronous runs with several workers apply pushes in arrival order")
    sets = BASE + ["optim.name=sgd", "optim.momentum=0.9", "sync.name=ps",
                   f"sync.staleness={k}"]

    def final(dev):
        t = Trainer(load_config(None, sets + [f"run.device={dev}"]), comm, quiet=True,
                    metrics=False)
        t.train()
        flat, where = None, True
        if not t.serving:
            where = all(p.device.type == dev for p in t.net.parameters())
            with t._gathered():  # the servers' parameters
                flat = flat_params(t.net).cpu()
        t.close()
        return flat, where

    ref, _ = final("cpu")
    if device == "cpu":
        monkeypatch.setenv("MLTRAIN_STAGE_HOST", "1")
    got, where = final(device)
    all_ranks(comm, where, f"ps: parameters left {device}")
    if ref is None:
        all_ranks(comm, True)
    elif device == "cpu":
        all_ranks(comm, torch.equal(got, ref), "ps: staged run differs")
    else:
        rel = float((got - ref).norm() / ref.norm())
        all_ranks(comm, rel <= 1e-12, f"ps: {device} vs cpu relative {rel:.2e}")


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("views", [True, False])
def test_staged_reducer_gives_the_same_bytes(comm, device, views):
    """The staged reducer (host twins; pinned and on a side stream on a GPU) against the
    direct one (MPI reads the bucket: on a GPU only where the MPI is CUDA-aware), on the
    same gradients: the same bytes; and both against the average of the plain gradients."""
    variants = [True] + ([False] if device == "cpu" or cuda_aware_mpi() else [])
    out = {}
    for staged in [None] + variants:  # None: no reducer, this rank's own gradients
        net = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(),
                                  torch.nn.Linear(13, 5)).to(device, torch.float64)
        with torch.no_grad():
            for i, p in enumerate(net.parameters()):  # the same weights in every run
                p.copy_(torch.linspace(-1, 1, p.numel(), dtype=torch.float64).view(p.shape) * (i + 1))
        red = None if staged is None else GradReducer(
            net.parameters(), comm, bucket_bytes=200, grad_as_bucket_view=views,
            max_inflight=2, staged=staged)
        grads = []
        for step in range(3):
            x = torch.full((4, 7), float(comm.Get_rank() + step), dtype=torch.float64,
                           device=device)
            net.zero_grad(set_to_none=True)
            if red is not None:
                red.prepare()
            net(x).square().sum().backward()
            if red is not None:
                red.finish()
            grads.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]).cpu())
        if red is not None:
            red.remove()
        out[staged] = torch.cat(grads)
    if len(variants) == 2:
        all_ranks(comm, torch.equal(out[False], out[True]), "staged and direct reducers differ")
    mean = torch.from_numpy(comm.allreduce(out[None].numpy())) / comm.Get_size()
    rel = float((out[True] - mean).norm() / mean.norm())
    all_ranks(comm, rel <= 1e-14, f"staged reducer vs the mean of the gradients: {rel:.2e}")


@pytest.mark.mpi(min_size=1)
def test_collectives_on_device(comm, device, monkeypatch):
    """Tensor collectives on ``device`` (staged where it is a GPU, or forced on cpu) give
    what they give on host tensors."""
    monkeypatch.setenv("MLTRAIN_STAGE_HOST", "1")
    r, P = comm.Get_rank(), comm.Get_size()
    t = torch.arange(5, dtype=torch.float64, device=device) + r
    allreduce_(t, comm)
    want = torch.arange(5, dtype=torch.float64) * P + P * (P - 1) / 2
    all_ranks(comm, t.device.type == device and torch.equal(t.cpu(), want))
    b = torch.full((3,), float(r), device=device, dtype=torch.bfloat16)
    broadcast_(b, comm, root=P - 1)
    all_ranks(comm, torch.equal(b.cpu(), torch.full((3,), float(P - 1), dtype=torch.bfloat16)))


@pytest.mark.mpi(min_size=1)
def test_checkpoint_moves_between_devices(comm, device, shared_tmp):
    """Written on ``device``, resumed on the CPU (and written on the CPU, resumed on
    ``device``): the parameters bit for bit, and training goes on alike."""
    sets = PATHS["adam"] + ["run.dtype=float32"]
    straight = _run(sets + ["run.steps=8"], comm, device)
    for i, (first, second) in enumerate([(device, "cpu"), ("cpu", device)]):
        ck = shared_tmp / f"ck{i}"
        half = _run(sets + ["run.steps=4", f"checkpoint.dir={ck}"], comm, first)
        half.close()
        resumed = Trainer(load_config(None, BASE + sets + [
            "run.steps=4", f"checkpoint.dir={ck}", "checkpoint.resume=true",
            f"run.device={second}"]), comm, quiet=True, metrics=False)
        all_ranks(comm, resumed.step == 4 and torch.equal(
            flat_params(resumed.net).cpu(), flat_params(half.net).cpu()),
            f"{first} -> {second}: parameters not restored bit for bit")
        resumed.close()
    straight.close()


@pytest.mark.mpi(min_size=1)
@pytest.mark.parametrize("layout", ["data", "pipe"])
def test_bf16_autocast_trains_with_float32_master_weights(comm, device, layout):
    if layout == "pipe" and comm.Get_size() < 2:
        pytest.skip("a pipeline needs 2 ranks")
    sets = ["optim.name=sgd", "run.dtype=float32", "model.name=cnn", "run.steps=12",
            "optim.lr=0.1"] + ([f"parallel.pipe={comm.Get_size()}", "pipeline.microbatches=2"]
                               if layout == "pipe" else [])
    full = _run(sets, comm, device)
    amp = _run(sets + ["run.amp=bf16"], comm, device)
    a, b = flat_params(amp.net), flat_params(full.net)
    all_ranks(comm, all(p.dtype == torch.float32 for p in amp.net.parameters()),
              "master weights are not float32")
    # Autocast really ran in bfloat16 (the iterates differ from float32's) and trained as well.
    rel = float((a - b).norm() / b.norm())
    all_ranks(comm, 1e-6 < rel < 0.1, f"amp vs float32 relative difference {rel:.2e}")
    la, lf = amp.evaluate()["train_loss"], full.evaluate()["train_loss"]
    all_ranks(comm, abs(la - lf) < 0.1 * lf, f"amp loss {la:.4f} vs float32 {lf:.4f}")
    amp.close()
    full.close()


def test_device_selection():
    assert select_device("cpu", 3) == torch.device("cpu")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        assert select_device("cuda", 5) == torch.device("cuda", 5 % n)
        assert select_device("auto", 0).type == "cuda"
    else:
        assert select_device("auto", 0) == torch.device("cpu")
        with pytest.raises(ValueError, match="run.device = cuda: no GPU is visible"):
            select_device("cuda", 0)
    with pytest.raises(ValueError, match="run.device"):
        select_device("tpu", 0)


def test_info_reports_devices():
    from conftest import mpiexec

    r = mpiexec(1, ["-m", "mltrain", "info"])
    assert r.returncode == 0, r.stderr
    assert "cuda-aware MPI" in r.stdout and "device of rank 0" in r.stdout, r.stdout
