"""The bad-input table, end to end: each command, as a careless or hostile user would type
it, ends with one `mltrain: error:` line naming the culprit, exit code 2, no traceback,
and every rank gone (the test's timeout turns a hang into a failure)."""
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import ROOT, mpiexec

pytestmark = pytest.mark.slow

HW = str(ROOT / "examples" / "hardware" / "dev-2core.toml")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Hostile and broken files the table points at ({name} in its arguments)."""
    d = tmp_path_factory.mktemp("bad")
    os.mkfifo(d / "fifo")
    (d / "binary.toml").write_bytes(b"\x7fELF\x02\x01\x01\x00" * 8)
    (d / "latin1.toml").write_bytes(b'[data]\npath = "donn\xe9es"\n')
    (d / "file").write_text("not a folder")
    with h5py.File(d / "neg.h5", "w") as f:
        f["x"] = np.zeros((10, 4), np.float32)
        f["y"] = np.arange(10) - 3
    with h5py.File(d / "flat.h5", "w") as f:
        f["x"] = np.zeros(10, np.float32)
        f["y"] = np.arange(10) % 2
    with h5py.File(d / "nan.h5", "w") as f:
        x = np.zeros((64, 4), np.float32)
        x[5, 2] = np.nan
        f["x"] = x
        f["y"] = np.arange(64) % 2
    spaces = {"space_ok": '["optim.lr"]\nlog = [0.01, 0.1]\n',
              "space_badkey": '["optim.lrr"]\nlog = [0.01, 0.1]\n',
              "space_empty": '["optim.momentum"]\nrange = [0.9, 0.5]\n',
              "space_badchoice": '["optim.name"]\nchoice = ["sgd", "lamb"]\n',
              "space_pipe": '["parallel.pipe"]\nchoice = [1, 2]\n',
              "space_nested": '["multilevel.nested_steps"]\nint = [2, 10]\n'}
    for name, text in spaces.items():
        (d / f"{name}.toml").write_text(text)
    (d / "wrongbench.json").write_text('{"bench": "tr", "cells": []}')
    (d / "emptydir").mkdir()
    (d / "stated").mkdir()
    (d / "stated" / "search-state.json").write_text("{}")
    return {p.name.split(".")[0]: str(p) for p in d.iterdir()}


MPI_CASES = [  # (ranks, arguments after `-m mltrain`, what the message must contain)
    (2, ["--config", "{fifo}"], "not a regular file"),
    (2, ["--config", "{binary}"], "a binary file"),
    (2, ["--config", "{latin1}"], "not UTF-8 text"),
    (2, ["--set", "run.seed=18446744073709551616"], "run.seed"),
    (2, ["--petsc", "'x"], "--petsc"),
    (2, ["--set", "model.width=1000000"], "model.width = 1000000"),
    (2, ["--set", "data.name=synthetic", "--set", "data.num_samples=1000000000000"],
     "data.num_samples = 1000000000000"),
    (2, ["--set", "optim.lr=1e300"], "optim.lr"),
    (2, ["--set", "optim.name=sgd", "--set", "optim.lr=1e30", "--set", "run.steps=30"],
     "training loss is nan at step 10"),
    (2, ["--set", "checkpoint.dir={file}", "--set", "run.epochs=100"], "checkpoint.dir"),
    (2, ["--set", "checkpoint.dir=/proc/mltrain-ck"], "checkpoint.dir"),
    (2, ["--set", "parallel.layer=2", "--set", "model.name=mlp"],
     "layer-parallel training (parallel.layer > 1) needs a residual network"),
    (2, ["--set", "comm.bucket_mb=0"], "comm.bucket_mb"),
    (2, ["--set", "run.threads=100000"], "run.threads"),
    (2, ["--set", "data.name=hdf5", "--set", "data.path={neg}"], "negative label -3"),
    (2, ["--set", "data.name=hdf5", "--set", "data.path={flat}"], "at least one feature"),
    (2, ["--set", "data.name=hdf5", "--set", "data.path={nan}"], "sample 5 is not finite"),
    (3, ["--set", "data.batch_size=64"], "not divisible by the 3 data-parallel ranks"),
    # Parameter servers: refusals before the split, on the workers (the servers end with
    # the same error) and during training (the servers learn of it at the end).
    (2, ["--set", "sync.name=ps", "--set", "parallel.servers=2"],
     "parallel.servers: 2 parameter servers on 2 ranks leave no worker"),
    (2, ["--set", "sync.name=ps", "--set", "sync.staleness=-2"], "sync.staleness"),
    (2, ["--set", "sync.name=ps", "--set", "run.steps=16777216"],
     "run.steps: 16777216 steps are beyond what a float32"),
    (2, ["bench", "tr", "--set", "sync.name=ps"], "parameter servers run through"),
    (2, ["--set", "sync.name=ps", "--set", "optim.name=tr"], "optim.name = 'tr'"),
    (2, ["--set", "sync.name=ps", "--set", "run.straggler=1:2"],
     "run.straggler: rank 1 is not a worker"),
    (3, ["--set", "sync.name=ps", "--set", "data.batch_size=63"],
     "not divisible by the 2 data-parallel ranks"),
    (2, ["--set", "sync.name=ps", "--set", "data.name=hdf5", "--set", "data.path={nan}"],
     "sample 5 is not finite"),
    (3, ["--set", "sync.name=ps", "--set", "optim.lr=1e30", "--set", "run.steps=30"],
     "training loss is nan at step 10"),
    (2, ["bench", "mgrit", "--cf", "0"], "--cf"),
    (2, ["bench", "dp", "--set", "data.batch_size=63"], "data.batch_size: 63"),
    (2, ["bench", "dp", "--steps", "-1"], "--steps -1"),
    (2, ["bench", "tr", "--budget", "nan"], "--budget"),
    (2, ["bench", "multilevel", "--resolution", "2"], "--resolution"),
    (2, ["bench", "multilevel", "--seeds", "0"], "--seeds"),
    (2, ["bench", "multilevel", "--target", "0.5", "--milestones", "0.8,0.4"],
     "--milestones: at most 20 distinct finite losses, each above --target 0.5"),
    (2, ["bench", "multilevel", "--from-json", "{wrongbench}", "--milestones", "0.5"],
     "--milestones: the work to a loss is recorded while training"),
    (2, ["bench", "multilevel", "--from-json", "{fifo}"], "not a regular file"),
    (2, ["bench", "multilevel", "--from-json", "{space_ok}"], "not JSON"),
    (2, ["bench", "multilevel", "--from-json", "{wrongbench}"], "a bench 'tr' result"),
    (2, ["bench", "multilevel", "--from-json", "{wrongbench}", "--markdown", "{wrongbench}"],
     "is the --from-json input"),
    (2, ["bench", "tr", "--from-json", "{wrongbench}"], "only bench multilevel"),
    (1, ["bench", "kernels", "--sizes", "abc"], "--sizes"),
    (2, ["bench", "kernels"], "run it as one process"),
    # Errors that were already clean, kept so they stay so.
    (2, ["--set", "nosection.key=1"], "unknown section 'nosection'"),
    (2, ["--set", "model.widht=3"], "model.widht: unknown key"),
    (2, ["--set", "model.width=wide"], "model.width: expected an integer"),
    (2, ["--set", "optim.name=lbfgs"], "optim.name: 'lbfgs' is not one of"),
    (2, ["--set", "optim.momentum=1.5"], "optim.momentum: 1.5 is above the maximum"),
    (2, ["--set", "run.steps=0", "--set", "run.epochs=0"], "nothing to train"),
    (2, ["--set", "data.name=idx"], "data.path: required"),
    (2, ["--set", "data.name=hdf5", "--set", "data.path=/nonexistent.h5"], "does not exist"),
    (2, ["--set", "data.name=hdf5", "--set", "data.path={binary}"], "not a readable HDF5"),
    (2, ["--set", "run.straggler=5:2"], "run.straggler: rank 5 does not exist"),
    (2, ["--set", "run.straggler=x"], "run.straggler: expected 'RANK:FACTOR'"),
    (2, ["--set", "parallel.pipe=2", "--set", "optim.name=tr"], "parallel.pipe"),
    (2, ["--set", "parallel.data=3"], "parallel: trial=1 x data=3"),
    (2, ["--set", "checkpoint.resume=true"], "checkpoint.resume: needs checkpoint.dir"),
    (2, ["--set", "sync.name=sgp", "--set", "sync.compression=topk"], "sync.compression"),
    (2, ["--set", "data.batch_size=100000"], "larger than the training set"),
    (2, ["--summary", "/nonexistent/s.json"], "--summary"),
    (2, ["--set", "optim.name=rmtr", "--set", "multilevel.levels=9"], "multilevel.levels"),
    (2, ["--set", "optim.name=apts", "--set", "apts.subdomains=3"], "apts.subdomains: 3"),
    (2, ["--set", "optim.name=apts", "--set", "apts.decomposition=weights", "--set",
         "apts.subdomains=1000"], "apts.subdomains: 1000 blocks"),
    (2, ["--set", "optim.name=apts", "--set", "parallel.pipe=2"], "parallel.pipe"),
    (2, ["search", "--space", "{space_badkey}"], "optim.lrr: unknown key"),
    (2, ["search", "--space", "{space_empty}"], "empty range range = [0.9, 0.5]"),
    (2, ["search", "--space", "{space_badchoice}"], "'lamb' is not a value the config takes"),
    (2, ["search", "--space", "{space_pipe}", "--set", "parallel.trial=2", "--set",
         "run.steps=5"], "['parallel.pipe']: the value 2 does not work with the base config on "
     "a trial group of 1 ranks"),
    (2, ["search", "--space", "{space_nested}", "--set", "multilevel.nested=true", "--set",
         "multilevel.levels=3", "--set", "run.steps=20"],
     "a trial with multilevel.nested_steps = 10 spends all its 20 steps on coarse levels"),
    (2, ["search", "--space", "{space_ok}", "--set", "sync.name=ps", "--set",
         "run.steps=5"], "parameter servers do not run inside search trials yet"),
    (2, ["search", "--space", "{space_ok}", "--set", "parallel.trial=3", "--set",
         "run.steps=5"], "parallel.trial: 2 ranks cannot be split into 3"),
    (2, ["search", "--space", "{space_ok}", "--set", "search.resource=steps"],
     "search.max_resource: 0 takes run.steps"),
    (2, ["search", "--space", "{space_ok}", "--set", "search.resource=work"],
     "search.max_resource: a trial's length in fine-gradient equivalents is required"),
    (2, ["search", "--space", "{space_ok}", "--set", "run.steps=5", "--budget", "4"],
     "--budget: 4 steps cannot train one trial"),
    (2, ["search", "--space", "{space_ok}", "--set", "run.steps=5", "--resume", "--out",
         "{emptydir}"], "--resume"),
    (2, ["search", "--space", "{fifo}", "--set", "run.steps=5"], "not a regular file"),
    (2, ["search", "--space", "{space_ok}", "--set", "run.steps=5", "--out", "{stated}"],
     "holds a search already"),
    (2, ["search", "--space", "{space_ok}", "--set", "run.steps=5", "--resume", "--out",
         "{stated}"], "is not a mltrain-search state"),
    (2, ["--set", "parallel.trial=2"], "parallel.trial: 2 trial groups are for `mltrain search`"),
]

SERIAL_CASES = [  # commands that start no MPI themselves
    (["partition", "--ranks", "10000000"], "10000000 ranks for 1438 training samples"),
    (["plan", "--hardware", HW, "--ranks", "1000000000"], "--ranks: rank count 1000000000"),
    (["plan", "--hardware", "{fifo}", "--ranks", "4"], "--hardware"),
    (["simulate", "--hardware", HW, "--ranks", "1,99999999999"], "rank count 99999999999"),
    (["simulate", "--hardware", "{binary}"], "a binary file"),
    (["jobscript", "--nodes", "2", "--ntasks-per-node", "2", "--set", "parallel.pipe=3"],
     "parallel: 4 ranks cannot be split"),
    (["jobscript", "--nodes", "1", "--ntasks-per-node", "2", "--signal-lead", "-5"],
     "--signal-lead"),
    (["study", "--grid", "optim.lr=0.1", "--ranks", "1", "--launcher", "no-such-launcher {ranks}"],
     "no program 'no-such-launcher'"),
    (["study", "--grid", "optim.lr=0.1", "--ranks", "1", "--launcher", "mpiexec -n {rank}"],
     "--launcher"),
    (["study", "--grid", "optim.lr=0.1", "--ranks", "1", "--out", "{file}"], "--out"),
]


def _fill(args, files):
    out = []
    for a in args:
        for name, path in files.items():
            a = a.replace("{" + name + "}", path)
        out.append(a)
    return out


def _assert_clean(r, message):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert r.stderr.count("mltrain: error:") == 1, r.stderr[-3000:]
    assert message in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Abort(" not in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("ranks, args, message", MPI_CASES,
                         ids=[" ".join(c[1])[:60] for c in MPI_CASES])
def test_bad_input_under_mpi(files, ranks, args, message):
    extra = [] if args[0] == "bench" else ["--quiet", "--set", "run.out_dir=/tmp/mltrain-bad"]
    r = mpiexec(ranks, ["-m", "mltrain", *_fill(args, files), *extra], timeout=240)
    _assert_clean(r, message)


@pytest.mark.parametrize("args, message", SERIAL_CASES,
                         ids=[" ".join(c[0])[:60] for c in SERIAL_CASES])
def test_bad_input_without_mpi(files, args, message):
    r = subprocess.run([sys.executable, "-m", "mltrain", *_fill(args, files)],
                       capture_output=True, text=True, cwd=ROOT, timeout=240)
    _assert_clean(r, message)


@pytest.mark.parametrize("sets, message", [
    (["run.device=cuda"], "run.device = cuda: no GPU is visible"),
    (["run.amp=bf16", "optim.name=tr"], "run.amp = bf16"),
    (["run.amp=bf16", "run.dtype=float64"], "run.amp = bf16"),
])
def test_device_and_amp_refusals_on_every_rank(sets, message):
    import torch

    if "run.device=cuda" in sets and torch.cuda.is_available():
        pytest.skip("a GPU is visible here: run.device = cuda is valid input")
    args = [x for s in sets for x in ("--set", s)]
    r = mpiexec(2, ["-m", "mltrain", "train", *args, "--quiet", "--set",
                    "run.out_dir=/tmp/mltrain-bad"], timeout=240)
    _assert_clean(r, message)


PS_ARGS = ["--set", "sync.name=ps", "--set", "sync.staleness=-1"]


@pytest.mark.parametrize("signame, nranks, extra", [("SIGTERM", 2, []), ("SIGUSR1", 2, []),
                                                    ("SIGTERM", 3, PS_ARGS)],
                         ids=["SIGTERM", "SIGUSR1", "SIGTERM-ps"])
def test_scheduler_signal_ends_with_a_checkpoint_and_resumes(tmp_path, signame, nranks,
                                                             extra):
    """What SLURM does at the time limit (SIGTERM) or with --signal (SIGUSR1): every rank
    receives the signal; the job finishes its step, writes a checkpoint, says so, exits
    128 + the signal's number, and a second run resumes from that checkpoint. With
    parameter servers the servers outlive the signal until the workers have saved."""
    from mltrain.launch import mpiexec_argv

    ckdir, out = tmp_path / "ck", tmp_path / "runs"
    args = ["-m", "mltrain", "--quiet", "--set", "run.steps=100000", "--set",
            f"checkpoint.dir={ckdir}", "--set", f"run.out_dir={out}", "--set",
            "run.log_every=1", *extra]
    launch, env = mpiexec_argv(nranks, {**os.environ, "OMP_NUM_THREADS": "1"})
    proc = subprocess.Popen([*launch, sys.executable, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        # Training has begun once a metrics line is written.
        while not any(p.stat().st_size for p in out.glob("run-*/metrics.jsonl")):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        ranks = subprocess.run(["pgrep", "-f", f"run.out_dir={out}"], capture_output=True,
                               text=True).stdout.split()
        ranks = [int(p) for p in ranks if int(p) != proc.pid
                 and "python" in open(f"/proc/{p}/cmdline", "rb").read().decode(errors="ignore")
                 and "mpiexec" not in open(f"/proc/{p}/cmdline", "rb").read().decode(errors="ignore")]
        assert len(ranks) == nranks, ranks
        for pid in ranks:  # SLURM signals every task of the step
            os.kill(pid, getattr(signal, signame))
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    number = int(getattr(signal, signame))
    assert proc.returncode == 128 + number, (proc.returncode, err[-3000:])
    assert f"mltrain: stopped by {signame} after step" in err, err[-3000:]
    assert "checkpoint.resume=true" in err and "Traceback" not in err
    saved = sorted(ckdir.glob("ckpt-*.h5"))
    assert len(saved) == 1
    step = int(saved[0].stem.split("-")[1])
    r = mpiexec(nranks, ["-m", "mltrain", "--quiet", "--set", f"run.steps={step + 3}",
                         "--set", f"checkpoint.dir={ckdir}", "--set", "checkpoint.resume=true",
                         "--set", f"run.out_dir={out}", *extra])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{step + 3} steps" in r.stdout
