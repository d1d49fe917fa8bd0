"""HDF5 checkpoints: exact resume, round trip, atomic writes, and clear errors."""
import os

import h5py
import numpy as np
import pytest
import torch

from mltrain.comm import CollectiveError
from mltrain.config import load_config
from mltrain.io import latest_checkpoint, list_checkpoints, load_checkpoint
from mltrain.train import Trainer

from conftest import all_ranks

pytestmark = pytest.mark.mpi(min_size=1)

BASE = ["model.width=16", "model.depth=2", "data.batch_size=24", "run.threads=1",
        "data.partition=iid", "data.shuffle=true"]


def params(t: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in t.model.parameters()]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_resume_is_bit_exact(comm, shared_tmp, dtype, optim):
    common = BASE + [f"run.dtype={dtype}", f"optim.name={optim}"]
    straight = Trainer(load_config(None, common + ["run.steps=40"]), comm, quiet=True,
                       metrics=False)
    straight.train()
    ckdir = shared_tmp / f"ck-{dtype}-{optim}"
    first = Trainer(load_config(None, common + ["run.steps=20", f"checkpoint.dir={ckdir}"]),
                    comm, quiet=True, metrics=False)
    first.train()
    # Scribble over the RNG and weights: resume must restore them, not inherit them.
    torch.manual_seed(12345)
    second = Trainer(load_config(None, common + ["run.steps=40", f"checkpoint.dir={ckdir}",
                                                 "checkpoint.resume=true"]),
                     comm, quiet=True, metrics=False)
    all_ranks(comm, second.step == 20 and second.resumed_from is not None)
    summary = second.train()
    same = all(torch.equal(a, b) for a, b in zip(params(straight), params(second)))
    all_ranks(comm, same, "resumed parameters differ from the straight run")
    all_ranks(comm, summary["steps"] == 40 and summary["steps_this_run"] == 20)
    for t in (straight, first, second):
        t.close()


def test_round_trip_and_keep(comm, shared_tmp):
    ckdir = shared_tmp / "rt"
    cfg = load_config(None, BASE + ["run.steps=6", "checkpoint.every=2", "checkpoint.keep=2",
                                    f"checkpoint.dir={ckdir}", "optim.name=adam"])
    t = Trainer(cfg, comm, quiet=True, metrics=False)
    t.train()
    names = [p.name for p in list_checkpoints(ckdir)]
    all_ranks(comm, names == ["ckpt-00000004.h5", "ckpt-00000006.h5"], str(names))
    path = latest_checkpoint(ckdir)
    if comm.Get_rank() == 0:
        with h5py.File(path) as f:
            assert f.attrs["format"] == "mltrain-checkpoint" and f.attrs["step"] == 6
            assert "[model]" in f.attrs["config"]
            assert set(f["model"]) == {n for n, _ in t.model.named_parameters()}
            assert f["rng/torch"].shape[0] == comm.Get_size()
    fresh = Trainer(cfg, comm, quiet=True, metrics=False)
    meta = load_checkpoint(path, fresh.model, fresh.optimizer, comm)
    all_ranks(comm, meta["step"] == 6)
    all_ranks(comm, all(torch.equal(a, b) for a, b in zip(params(t), params(fresh))))
    sa, sb = t.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    all_ranks(comm, all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i]))
    t.close()
    fresh.close()


def test_crash_mid_write_keeps_previous(comm, shared_tmp, monkeypatch):
    ckdir = shared_tmp / "atomic"
    t = Trainer(load_config(None, BASE + ["run.steps=2", f"checkpoint.dir={ckdir}"]), comm,
                quiet=True, metrics=False)
    t.train()
    good = latest_checkpoint(ckdir)

    def crash(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", crash)
    t.step = 3
    with pytest.raises(CollectiveError, match="disk full"):
        t.save()
    monkeypatch.undo()
    left = sorted(p.name for p in ckdir.iterdir())
    all_ranks(comm, left == [good.name], str(left))  # no temporary file left behind
    load_checkpoint(good, t.model, t.optimizer, comm)
    t.close()


def _corrupt(kind: str, good, path):
    data = good.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "foreign":
        with h5py.File(path, "w") as f:
            f["x"] = np.zeros(3)
    elif kind == "shape":
        path.write_bytes(data)
        with h5py.File(path, "r+") as f:
            name = next(iter(f["model"]))
            del f["model"][name]
            f["model"][name] = np.zeros((1, 2, 3), dtype=np.float32)


@pytest.mark.parametrize("kind, match", [
    ("truncated", "not a readable HDF5"), ("garbage", "not a readable HDF5"),
    ("foreign", "not an mltrain checkpoint"), ("shape", "has shape"), ("missing", "no such"),
])
def test_bad_checkpoints_fail_on_every_rank(comm, shared_tmp, kind, match):
    ckdir = shared_tmp / f"bad-{kind}"
    t = Trainer(load_config(None, BASE + ["run.steps=1", f"checkpoint.dir={ckdir}"]), comm,
                quiet=True, metrics=False)
    t.train()
    bad = ckdir / "ckpt-99999999.h5"
    if comm.Get_rank() == 0 and kind != "missing":
        _corrupt(kind, latest_checkpoint(ckdir), bad)
    comm.Barrier()
    with pytest.raises(CollectiveError, match=match) as e:
        load_checkpoint(bad, t.model, t.optimizer, comm)
    all_ranks(comm, e.value.kind == "CheckpointError" and str(bad) in str(e.value))
    t.close()


def test_model_or_optimizer_mismatch(comm, shared_tmp):
    ckdir = shared_tmp / "mismatch"
    t = Trainer(load_config(None, BASE + ["run.steps=1", f"checkpoint.dir={ckdir}"]), comm,
                quiet=True, metrics=False)
    t.train()
    for extra, match in ((["model.width=8"], "has shape"), (["run.dtype=float64"], "run.dtype"),
                         (["optim.name=sgd"], "optimizer"), (["model.depth=3"], "missing")):
        other = Trainer(load_config(None, BASE + ["run.steps=1"] + extra), comm, quiet=True,
                        metrics=False)
        with pytest.raises(CollectiveError, match=match):
            load_checkpoint(latest_checkpoint(ckdir), other.model, other.optimizer, comm)
        other.close()
    t.close()


def test_written_at_p_ranks_loads_on_one(comm, shared_tmp):
    from mpi4py import MPI

    ckdir = shared_tmp / "p-to-1"
    cfg = load_config(None, BASE + ["run.steps=3", f"checkpoint.dir={ckdir}"])
    t = Trainer(cfg, comm, quiet=True, metrics=False)
    t.train()
    solo = Trainer(load_config(None, BASE + ["run.steps=5", f"checkpoint.dir={ckdir}",
                                             "checkpoint.resume=true"]),
                   MPI.COMM_SELF, quiet=True, metrics=False)
    all_ranks(comm, solo.step == 3)
    all_ranks(comm, all(torch.equal(a, b) for a, b in zip(params(t), params(solo))))
    comm.Barrier()  # every rank has read the file before any rank's solo run writes more
    t.close()
    solo.close()
