"""Test harness shared by the serial and the MPI runs.

Serial:  pytest tests                         (tests marked ``mpi`` are skipped)
MPI:     mpiexec -n P python -m mpi4py -m pytest --with-mpi -m mpi tests   (P = 1, 2, 3, 4)

Assertions that compare across ranks go through ``all_ranks`` so that one failing rank
fails every rank (and no rank runs ahead into the next test's collectives). Each MPI test
ends with a garbage collection and a barrier, so communicators freed by finalizers are
freed in step on all ranks.
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
CI = os.environ.get("MLTRAIN_CI") == "1"

# Oversubscribed ranks on a 2-core machine: one torch thread each.
torch.set_num_threads(1)


def all_ranks(comm, ok: bool, message: str = "") -> None:
    """Collective assert: raises on every rank if ``ok`` is false on any rank."""
    oks = comm.allgather((bool(ok), message))
    bad = [(r, m) for r, (o, m) in enumerate(oks) if not o]
    if bad:
        raise AssertionError("; ".join(f"rank {r}: {m}" for r, m in bad))


def devices() -> list[str]:
    """The devices this machine can train on: cpu, and cuda where a GPU is visible (without
    one the GPU variants are not collected: absent hardware, not a missing dependency)."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc):
    # One fixture gives every device-aware test its device.
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", devices())


@pytest.fixture
def comm():
    from mpi4py import MPI

    return MPI.COMM_WORLD


@pytest.fixture
def shared_tmp(comm, tmp_path_factory):
    """One temporary folder that every rank of the job sees (rank 0 makes it)."""
    path = str(tmp_path_factory.mktemp("shared")) if comm.Get_rank() == 0 else None
    path = Path(comm.bcast(path))
    yield path
    comm.Barrier()


@pytest.fixture(autouse=True)
def _mpi_teardown(request):
    yield
    if request.node.get_closest_marker("mpi") is not None:
        from mpi4py import MPI

        gc.collect()
        MPI.COMM_WORLD.Barrier()


def mpiexec(n: int, args: list[str], *, timeout: float = 300, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Runs ``python <args>`` on ``n`` ranks in a fresh MPI job (from a serial test).

    The timeout is a hang guard, not a performance limit.
    """
    from mltrain.launch import mpiexec_argv

    # The launcher that matches mpi4py, in an environment without the outer job's wiring.
    launch, full_env = mpiexec_argv(n, {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return subprocess.run([*launch, sys.executable, *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=cwd or ROOT)


def require(module: str):
    """Imports ``module``; in CI (MLTRAIN_CI=1) its absence fails instead of skipping."""
    try:
        return __import__(module)
    except ImportError as e:
        if CI:
            pytest.fail(f"{module} is required in CI: {e}")
        pytest.skip(f"{module} not installed")


def against_serial(comm, cfg):
    """Trains ``cfg`` on ``comm`` and, as the reference, on COMM_SELF (every rank runs the
    serial run itself). Returns (the parallel run's summary, its full training loss before
    training, the relative difference of the final parameters). Collective on ``comm``."""
    from mpi4py import MPI

    from mltrain.linalg.vector import flat_params
    from mltrain.train import Trainer

    par = Trainer(cfg, comm, quiet=True, metrics=False)
    before = par.evaluate()["train_loss"]
    summary = par.train()
    ser = Trainer(cfg, MPI.COMM_SELF, quiet=True, metrics=False)
    ser.train()
    # Second-order runs: the same decisions first, then the iterates.
    same_decisions(comm, decisions_of(ser), decisions_of(par))
    a, b = flat_params(par.model), flat_params(ser.model)
    par.close()
    ser.close()
    return summary, before, float((a - b).norm() / b.norm())


def decisions_of(trainer):
    """The decision log of a trainer's optimizer (None for first-order optimizers)."""
    return getattr(trainer.optimizer, "decisions", None)


def same_decisions(comm, ref, other, label: str = "") -> None:
    """Collective assert on ``comm`` that an exactness comparison is meaningful and holds
    decision by decision: no decision of the reference run lies within round-off
    (``TIE_BAND``) of its threshold, so no CPU or BLAS could take it the other way, and
    the other run took the same decisions in the same order (else: the first that
    differs, with both margins). Does nothing when ``ref`` is None."""
    from mltrain.utils.decisions import TIE_BAND, first_difference

    if ref is None:
        return
    ties = ref.near_ties()
    all_ranks(comm, not ties, f"{label}: {len(ties)} decisions of the reference run lie "
              f"within {TIE_BAND:g} of their thresholds, so the comparison would hold or "
              f"fail by luck of rounding: " + ", ".join(f"#{i} {d}" for i, d in ties[:4]))
    diff = first_difference(ref, other)
    all_ranks(comm, diff is None, f"{label}: {diff}")


def straight_and_resumed(comm, base: list, ckdir, steps: int = 8):
    """Trains ``base`` for ``steps`` steps straight, and for steps/2 + a resume to
    ``steps`` through checkpoints in ``ckdir``; returns (straight, resumed) trainers, trained
    (close them). Collective on ``comm``."""
    from mltrain.config import load_config
    from mltrain.train import Trainer

    def run(extra):
        t = Trainer(load_config(None, base + extra), comm, quiet=True, metrics=False)
        t.train()
        return t

    straight = run([f"run.steps={steps}"])
    run([f"run.steps={steps // 2}", f"checkpoint.dir={ckdir}"]).close()
    return straight, run([f"run.steps={steps}", f"checkpoint.dir={ckdir}",
                          "checkpoint.resume=true"])


def cli_error(args: list[str], match: str, ranks: int = 2) -> None:
    """Runs ``python -m mltrain train`` with ``--set`` overrides ``args`` on ``ranks``
    ranks and asserts it stops with exit code 2, one error message, naming ``match``."""
    cmd = ["-m", "mltrain", "train"] + [x for a in args for x in ("--set", a)]
    r = mpiexec(ranks, cmd)
    assert r.returncode == 2 and r.stderr.count("mltrain: error:") == 1, r.stderr[-2000:]
    assert match in r.stderr, r.stderr[-2000:]
