"""Checkpoints as untrusted input: every file below is refused from its metadata, before
any of its data is read, on every rank with the same message."""
import shutil

import h5py
import numpy as np
import pytest
import torch

from mltrain.comm import CollectiveError
from mltrain.config import load_config
from mltrain.io import list_checkpoints
from mltrain.train import Trainer

from conftest import all_ranks

pytestmark = pytest.mark.mpi(min_size=1)

BASE = ["model.width=8", "model.depth=2", "data.batch_size=24", "run.threads=1",
        "optim.name=sgd", "optim.momentum=0.9"]
PARAM = "opening.1.weight"  # a parameter every resnet has; its momentum is /optim/0


def _replace(f, name, **kw):
    del f[name]
    return f.create_dataset(name, **kw)


def _huge_state(f):  # 3e9 float32 declared, a few KB in the file
    _replace(f, "optim/0/momentum_buffer", shape=(3_000_000_000,), dtype="f4", chunks=(4096,))


def _chunked_state(f):  # the right shape, but chunked storage mltrain never writes
    data = f["optim/0/momentum_buffer"][...]
    _replace(f, "optim/0/momentum_buffer", data=data, chunks=data.shape)


def _huge_rng(f):
    rows = f["rng/torch"].shape[0]
    _replace(f, "rng/torch", shape=(rows, 5_000_000_000), dtype="u1", chunks=(1, 4096))


def _unallocated(f):  # declared with no bytes behind it: reads back as fill values
    shape, dtype = f[f"model/{PARAM}"].shape, f[f"model/{PARAM}"].dtype
    _replace(f, f"model/{PARAM}", shape=shape, dtype=dtype)


def _external_storage(f):  # the parameter's bytes would come from another file
    shape, dtype = f[f"model/{PARAM}"].shape, f[f"model/{PARAM}"].dtype
    _replace(f, f"model/{PARAM}", shape=shape, dtype=dtype,
             external=[("/etc/passwd", 0, int(np.prod(shape)) * dtype.itemsize)])


def _virtual(f):
    shape, dtype = f[f"model/{PARAM}"].shape, f[f"model/{PARAM}"].dtype
    layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
    layout[...] = h5py.VirtualSource("/elsewhere.h5", "x", shape=shape)
    del f[f"model/{PARAM}"]
    f.create_virtual_dataset(f"model/{PARAM}", layout)


def _external_link(f):
    del f[f"model/{PARAM}"]
    f[f"model/{PARAM}"] = h5py.ExternalLink("/elsewhere.h5", "/x")


def _soft_link(f):
    f["optim/0/alias"] = h5py.SoftLink(f"/model/{PARAM}")


def _nan_parameter(f):
    ds = f[f"model/{PARAM}"]
    ds[(0,) * ds.ndim] = np.nan


def _nan_state(f):
    ds = f["optim/0/momentum_buffer"]
    ds[(0,) * ds.ndim] = np.inf


def _state_dtype(f):  # a float64 momentum for float32 parameters
    data = f["optim/0/momentum_buffer"][...].astype(np.float64)
    _replace(f, "optim/0/momentum_buffer", data=data)


def _unknown_state(f):
    f.create_dataset("optim/0/exp_avg", data=f["optim/0/momentum_buffer"][...])


def _foreign_object(f):
    f.create_group("payload")


def _big_config(f):
    f.attrs["config"] = "#" * (2 << 20)


def _world_size(f):
    f.attrs["world_size"] = -1


def _optim_dataset(f):  # /optim itself a dataset: declared 2 GB, read row by row if let in
    del f["optim"]
    f.create_dataset("optim", shape=(1, 500_000_000), dtype="f4", chunks=(1, 4096))


def _scalar_state(f):  # a momentum that is no parameter's shape fails only at the first step
    _replace(f, "optim/0/momentum_buffer", data=np.float32(0.5))


def _string_model(f):
    shape = f[f"model/{PARAM}"].shape
    del f[f"model/{PARAM}"]
    f.create_dataset(f"model/{PARAM}", shape=shape, dtype=h5py.string_dtype())


HOSTILE = [
    (_huge_state, "has shape (3000000000,)"),
    (_chunked_state, "chunked or filtered"),
    (_huge_rng, "/rng/torch is missing or is not"),
    (_unallocated, "declares"),
    (_external_storage, "external file"),
    (_virtual, "virtual dataset"),
    (_external_link, "external link"),
    (_soft_link, "soft link"),
    (_nan_parameter, "non-finite"),
    (_nan_state, "non-finite"),
    (_state_dtype, "is float64, expected float32"),
    (_unknown_state, "no state that SGD keeps"),
    (_foreign_object, "/payload is not part of an mltrain checkpoint"),
    (_big_config, "over 1048576 bytes"),
    (_world_size, "'world_size' is missing or out of range"),
    (_string_model, "the model is torch.float32"),
    (_optim_dataset, "/optim is not a group"),
    (_scalar_state, "has shape (), expected (8, 64)"),
]


@pytest.fixture
def good(comm, shared_tmp):
    """A valid checkpoint of a short run (momentum state on every parameter)."""
    ckdir = shared_tmp / "good"
    t = Trainer(load_config(None, BASE + ["run.steps=2", f"checkpoint.dir={ckdir}"]), comm,
                quiet=True, metrics=False)
    t.train()
    t.close()
    return list_checkpoints(ckdir)[-1]


@pytest.mark.parametrize("attack, message", HOSTILE, ids=[f.__name__[1:] for f, _ in HOSTILE])
def test_hostile_checkpoint_is_refused_before_reading(comm, shared_tmp, good, attack, message):
    ckdir = shared_tmp / f"hostile-{attack.__name__}"
    if comm.Get_rank() == 0:
        ckdir.mkdir()
        shutil.copy(good, ckdir / good.name)
        with h5py.File(ckdir / good.name, "r+") as f:
            attack(f)
    comm.Barrier()
    cfg = load_config(None, BASE + ["run.steps=4", f"checkpoint.dir={ckdir}",
                                    "checkpoint.resume=true"])
    with pytest.raises(CollectiveError) as err:
        Trainer(cfg, comm, quiet=True, metrics=False)
    all_ranks(comm, err.value.kind in ("CheckpointError", "ConfigError"), err.value.kind)
    all_ranks(comm, message in str(err.value) and good.name in str(err.value),
              str(err.value))


def test_unmodified_checkpoint_still_resumes(comm, shared_tmp, good):
    """The checks refuse nothing that mltrain itself writes."""
    ckdir = shared_tmp / "plain"
    if comm.Get_rank() == 0:
        ckdir.mkdir()
        shutil.copy(good, ckdir / good.name)
    comm.Barrier()
    t = Trainer(load_config(None, BASE + ["run.steps=4", f"checkpoint.dir={ckdir}",
                                          "checkpoint.resume=true"]), comm, quiet=True,
                metrics=False)
    all_ranks(comm, t.step == 2 and t.resumed_from is not None)
    with h5py.File(good, "r") as f:
        saved = torch.from_numpy(f[f"model/{PARAM}"][...])
    all_ranks(comm, torch.equal(dict(t.net.named_parameters())[PARAM].detach(), saved))
    t.close()


@pytest.mark.parametrize("optim", ["adam", "tr", "rmtr", "apts", "apts-tr"])
def test_every_optimizers_checkpoint_passes_the_checks(comm, shared_tmp, optim):
    """Adam's moments and step, trust region's radius and L-SR1 memory, RMTR's levels,
    APTS's subdomain memories or Adam moments: all within what the checks accept, and
    resumed."""
    extra = {"adam": ["optim.name=adam"],
             "tr": ["optim.name=tr", "tr.curvature=lsr1", "tr.memory=3"],
             "rmtr": ["optim.name=rmtr", "multilevel.levels=2", "model.depth=4",
                      "tr.curvature=lsr1"],
             "apts": ["optim.name=apts"],
             "apts-tr": ["optim.name=apts", "apts.local_solver=tr", "tr.curvature=lsr1"]}[optim]
    ckdir = shared_tmp / f"ok-{optim}"
    common = BASE + extra
    t = Trainer(load_config(None, common + ["run.steps=3", f"checkpoint.dir={ckdir}"]), comm,
                quiet=True, metrics=False)
    t.train()
    t.close()
    t = Trainer(load_config(None, common + ["run.steps=5", f"checkpoint.dir={ckdir}",
                                            "checkpoint.resume=true"]), comm, quiet=True,
                metrics=False)
    all_ranks(comm, t.step == 3)
    t.close()


def test_start_up_removes_stale_temporaries_only(comm, shared_tmp):
    ckdir = shared_tmp / "stale"
    keep = [".ckpt-notes.tmp", "ckpt-00000002.h5.tmp", "mine.h5"]
    if comm.Get_rank() == 0:
        ckdir.mkdir()
        (ckdir / ".ckpt-00000004.h5.x1y2z3.tmp").write_bytes(b"\0" * 1000)
        for name in keep:
            (ckdir / name).write_text("not mltrain's temporary")
        (ckdir / ".ckpt-00000006.h5.link.tmp").symlink_to(ckdir / "mine.h5")
    comm.Barrier()
    t = Trainer(load_config(None, BASE + ["run.steps=1", f"checkpoint.dir={ckdir}"]), comm,
                quiet=True, metrics=False)
    left = sorted(p.name for p in ckdir.iterdir())
    all_ranks(comm, ".ckpt-00000004.h5.x1y2z3.tmp" not in left, str(left))
    all_ranks(comm, all(name in left for name in keep + [".ckpt-00000006.h5.link.tmp"]),
              str(left))
    t.close()


@pytest.mark.parametrize("where, message", [("file", "exists and is not a folder"),
                                            ("/proc/mltrain-no", "not a writable folder")])
def test_unusable_checkpoint_folder_fails_before_training(comm, shared_tmp, where, message):
    path = shared_tmp / "a-file" if where == "file" else where
    if comm.Get_rank() == 0 and where == "file":
        path.write_text("x")
    comm.Barrier()
    with pytest.raises(CollectiveError) as err:
        Trainer(load_config(None, BASE + ["run.steps=100", f"checkpoint.dir={path}"]), comm,
                quiet=True, metrics=False)
    all_ranks(comm, "checkpoint.dir" in str(err.value) and message in str(err.value),
              str(err.value))


def _tampered_resume(comm, ckdir, args: list, tamper) -> CollectiveError:
    """Trains ``args`` 2 steps with checkpoints in ``ckdir``, lets rank 0 ``tamper(f)`` with
    the last checkpoint (open for writing), and returns the error of resuming it.
    Collective on ``comm``."""
    t = Trainer(load_config(None, args + ["run.steps=2", f"checkpoint.dir={ckdir}"]), comm,
                quiet=True, metrics=False)
    t.train()
    t.close()
    if comm.Get_rank() == 0:
        with h5py.File(list_checkpoints(ckdir)[-1], "r+") as f:
            tamper(f)
    comm.Barrier()
    with pytest.raises(CollectiveError) as err:
        Trainer(load_config(None, args + ["run.steps=4", f"checkpoint.dir={ckdir}",
                                          "checkpoint.resume=true"]), comm, quiet=True,
                metrics=False)
    return err.value


def test_incomplete_optimizer_state_is_a_clear_error(comm, shared_tmp):
    """Adam's moments without its step count pass every per-dataset check; restoring them
    must still end as a CheckpointError on every rank, not a traceback."""
    adam = [a for a in BASE if not a.startswith("optim.")] + ["optim.name=adam"]

    def drop_step(f):
        for idx in f["optim"]:
            del f["optim"][idx]["step"]
    err = _tampered_resume(comm, shared_tmp / "adam-no-step", adam, drop_step)
    all_ranks(comm, err.kind == "CheckpointError" and "does not fit Adam" in str(err),
              f"{err.kind}: {err}")


def test_impossible_adam_state_is_a_clear_error(comm, shared_tmp):
    """Adam's own step count below zero is a finite float the per-dataset checks pass; the
    value check refuses it as for APTS's subdomains."""
    adam = [a for a in BASE if not a.startswith("optim.")] + ["optim.name=adam"]

    def spoil(f):
        f["optim/0/step"][...] = -1.0
    err = _tampered_resume(comm, shared_tmp / "adam-negative-step", adam, spoil)
    all_ranks(comm, err.kind == "CheckpointError" and "Adam state" in str(err),
              f"{err.kind}: {err}")


@pytest.mark.parametrize("damage", ["step", "moment"])
def test_impossible_apts_adam_state_is_a_clear_error(comm, shared_tmp, damage):
    """A subdomain's Adam step count below zero or negative second moments are finite
    floats that pass the per-dataset checks but would divide by zero in the next step:
    refused as a CheckpointError on every rank."""
    apts = [a for a in BASE if not a.startswith("optim.")] + ["optim.name=apts",
                                                              "apts.local_solver=adam"]

    def spoil(f):
        if damage == "step":
            f["optim/0/level1.step"][...] = -1.0
        else:
            ds = f["optim/0/level1.exp_avg_sq"]
            ds[...] = -ds[...] - 1.0
    err = _tampered_resume(comm, shared_tmp / f"apts-adam-{damage}", apts, spoil)
    all_ranks(comm, err.kind == "CheckpointError" and "Adam state" in str(err),
              f"{err.kind}: {err}")


def test_a_subdomain_beyond_the_run_is_refused(comm, shared_tmp):
    """APTS stores subdomain j's memory under level<j+1>.: a checkpoint naming a subdomain
    the run does not have is refused before anything is read for it."""
    apts = [a for a in BASE if not a.startswith("optim.")] + ["optim.name=apts",
                                                              "apts.local_solver=tr",
                                                              "tr.curvature=lsr1"]

    def add_level(f):
        keys = [k for k in f["optim/0"] if k.startswith("level1.lsr1_s")]
        assert keys, list(f["optim/0"])
        f["optim/0"].create_dataset("level99.lsr1_s0", data=f["optim/0"][keys[0]][...])
    err = _tampered_resume(comm, shared_tmp / "apts-extra-level", apts, add_level)
    all_ranks(comm, err.kind == "CheckpointError" and "level99" in str(err),
              f"{err.kind}: {err}")
