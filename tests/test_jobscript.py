"""``mltrain jobscript`` (launch line per MPI, hostile input), the SLURM start-up guard and
the thread policy, without SLURM. The real cluster is in test_slurm.py."""
from __future__ import annotations

import base64
import os
import re
import stat
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from conftest import ROOT, mpiexec
from mltrain.cli.jobscript import srun_mpi_flag
from mltrain.launch import mpi_vendor

# srun's plugin for this environment's MPI: pmi2 with the MPICH wheel, pmix with Open MPI.
FLAG = srun_mpi_flag(mpi_vendor())

pytestmark = pytest.mark.timeout(120)

SLURM_STEP = {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2",
              "SLURM_NTASKS": "2"}


def cli(args: list[str], cwd: Path = ROOT, env: dict | None = None):
    return subprocess.run([sys.executable, "-m", "mltrain", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def one_error(r, *needles: str) -> None:
    """Exit 2 and a stderr of exactly one ``mltrain: error:`` line containing ``needles``."""
    lines = r.stderr.splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("mltrain: error: "), r.stderr[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]


def recovered_config(script: str) -> str:
    """The config text frozen into a generated script (its base64 here-document)."""
    m = re.search(r"<<'(\w+)'\n(.*?)\n\1\n", script, re.S)
    assert m, script
    return base64.b64decode(m.group(2)).decode("utf-8")


def run_script(script: str, workdir: Path) -> subprocess.CompletedProcess:
    """Runs a generated batch script with bash, as sbatch would, with an ``srun`` and a
    ``sbatch`` on PATH that only record their arguments."""
    stub = workdir / "stub"
    stub.mkdir(exist_ok=True)
    for name in ("srun", "mpiexec"):
        exe = stub / name
        exe.write_text('#!/bin/sh\necho "$0 $*" >> launched.txt\n')
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    path = workdir / "job.sbatch"
    path.write_text(script)
    syntax = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr  # every generated script parses
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{stub}:{env['PATH']}", SLURM_JOB_ID="77", SLURM_NTASKS="2")
    return subprocess.run(["bash", str(path)], capture_output=True, text=True, cwd=workdir,
                          env=env, timeout=60)


def make(vendor: str, monkeypatch, sets=(), **kw) -> str:
    """The script text for a 1 x 2 job with ``mltrain.launch`` reporting ``vendor``."""
    import mltrain.launch
    from mltrain.cli.jobscript import jobscript
    from mltrain.config import load_config

    monkeypatch.setattr(mltrain.launch, "mpi_vendor", lambda exe=None: vendor)
    args = dict(nodes=1, ntasks_per_node=2, cpus_per_task=0, time="00:10:00", partition="",
                account="", job_name="mltrain", launcher="srun", mpi="", signal_lead=120)
    args.update(kw)
    return jobscript(load_config(None, ["run.steps=20", *sets]), Namespace(**args))


@pytest.mark.parametrize("launcher, line", [("srun", "#SBATCH --gpus-per-task=1"),
                                            ("mpiexec", "#SBATCH --gpus-per-node=2")])
def test_gpu_runs_ask_for_one_gpu_per_rank(launcher, line, monkeypatch):
    text = make("mpich", monkeypatch, sets=["run.device=cuda"], launcher=launcher)
    assert f"\n{line}\n" in text and "MLTRAIN_CUDA_AWARE_MPI=1" in text
    for device in ("cpu", "auto"):  # auto: the user's allocation decides
        assert "--gpus-per" not in make("mpich", monkeypatch, sets=[f"run.device={device}"],
                                        launcher=launcher)


@pytest.mark.parametrize("vendor,flag", [("mpich", "pmi2"), ("intel", "pmi2"),
                                         ("openmpi", "pmix")])
def test_launch_line_follows_the_mpi(vendor, flag, monkeypatch):
    text = make(vendor, monkeypatch)
    srun = [line for line in text.splitlines() if line.startswith("srun")]
    assert len(srun) == 1 and srun[0].startswith(f"srun --mpi={flag} \"$python\" -m mltrain "
                                                 "train"), srun
    # Overridden: the plugin as asked, whatever the MPI.
    text = make(vendor, monkeypatch, mpi="pmix_v4")
    assert "\nsrun --mpi=pmix_v4 " in text


def test_launch_line_mpiexec(monkeypatch):
    from mltrain.launch import mpiexec_path

    text = make("mpich", monkeypatch, launcher="mpiexec")
    exe = os.path.abspath(mpiexec_path(sys.prefix))
    assert f"\nmpiexec={exe}\n" in text
    assert '\n"$mpiexec" -n "$SLURM_NTASKS" "$python" -m mltrain train' in text
    assert "\nsrun" not in text
    from mltrain.config import ConfigError

    with pytest.raises(ConfigError, match="--mpi"):
        make("mpich", monkeypatch, launcher="mpiexec", mpi="pmi2")


def test_script_names_the_venv_and_checks_it(tmp_path):
    r = cli(["jobscript", "--nodes", "1", "--ntasks-per-node", "2"])
    assert r.returncode == 0, r.stderr
    venv = os.path.abspath(sys.prefix)
    assert f"\nvenv={venv}\n" in r.stdout and f"--mpi={FLAG}" in r.stdout
    # The script stops with exit 2 and a clear message when the environment is gone.
    gone = r.stdout.replace(f"\npython={venv}/bin/python\n",
                            f"\npython={tmp_path}/gone/bin/python\n")
    assert gone != r.stdout
    run = run_script(gone, tmp_path)
    assert run.returncode == 2 and "mltrain: error: no Python environment" in run.stderr
    assert not (tmp_path / "launched.txt").exists()


def test_script_runs_with_the_frozen_config(tmp_path):
    r = cli(["jobscript", "--nodes", "1", "--ntasks-per-node", "2", "--set", "run.steps=7"])
    assert r.returncode == 0, r.stderr
    run = run_script(r.stdout, tmp_path)
    assert run.returncode == 0, run.stderr
    launched = (tmp_path / "launched.txt").read_text()
    assert f"srun --mpi={FLAG}" in launched and "--config mltrain-77.toml" in launched
    assert "steps = 7" in (tmp_path / "mltrain-77.toml").read_text()


def test_script_asks_for_the_signal_and_resumes(tmp_path):
    """SIGUSR1 before the time limit (the job checkpoints and stops), and a frozen config
    that resumes, so submitting the same script again continues the run."""
    r = cli(["jobscript", "--nodes", "1", "--ntasks-per-node", "2", "--signal-lead", "300",
             "--set", f"checkpoint.dir={tmp_path}/ck"])
    assert r.returncode == 0, r.stderr
    assert "\n#SBATCH --signal=USR1@300\n" in r.stdout
    frozen = recovered_config(r.stdout)
    assert "resume = true" in frozen and f'dir = "{tmp_path}/ck"' in frozen
    plain = cli(["jobscript", "--nodes", "1", "--ntasks-per-node", "2", "--signal-lead", "0"])
    assert "--signal" not in plain.stdout and "resume = false" in recovered_config(plain.stdout)


def test_script_refuses_a_grid_the_job_cannot_start(tmp_path):
    one_error(cli(["jobscript", "--nodes", "2", "--ntasks-per-node", "2", "--set",
                   "parallel.pipe=3"]), "parallel: 4 ranks cannot be split")
    one_error(cli(["jobscript", "--nodes", "1", "--ntasks-per-node", "2", "--set",
                   "parallel.pipe=2", "--set", "pipeline.microbatches=65"]),
              "pipeline.microbatches")
    one_error(cli(["jobscript", "--nodes", "1", "--ntasks-per-node", "2", "--set",
                   "run.straggler=2:3"]), "run.straggler: rank 2")


HOSTILE = ["a\nMLTRAIN_CONFIG_BASE64\ntouch PWNED\n#", "x'; touch PWNED; echo '",
           "$(touch PWNED)", "`touch PWNED`", "\"; touch PWNED; \"", "\\\n", "\x00\x1b\r",
           "ü\u2028MLTRAIN_CONFIG_BASE64"]


@pytest.mark.parametrize("text", HOSTILE)
def test_embedded_text_cannot_end_or_escape(text, tmp_path):
    """Any text at all comes back byte for byte and nothing in it runs."""
    from mltrain.cli.jobscript import embed_text

    script = "\n".join(["set -eu", *embed_text(text, '"$out"', f"'{sys.executable}'"), ""])
    r = subprocess.run(["bash", "-c", script], capture_output=True, cwd=tmp_path, timeout=60,
                       env={**os.environ, "out": "got.txt"})
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "got.txt").read_bytes() == text.encode("utf-8")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("value", [
    "a\nMLTRAIN_CONFIG\ntouch PWNED\n#",             # the heredoc of the old script
    "a\nMLTRAIN_CONFIG_BASE64\ntouch PWNED\n#",      # the new one's delimiter
    "x'; touch PWNED; echo '", "$(touch PWNED)", "`touch PWNED`", 'q"; touch PWNED; #'])
def test_config_injection(value, tmp_path):
    import tomllib

    from mltrain.config import load_config, to_dict, to_toml

    bad = tmp_path / "inject.toml"
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    bad.write_text(f'[data]\npath = "{escaped}"\n')
    original = load_config(bad)
    assert original.data.path == value
    r = cli(["jobscript", "--nodes", "1", "--ntasks-per-node", "2", "--config", str(bad)])
    # Every string is written with TOML's escapes, so every value reads back.
    assert tomllib.loads(to_toml(original)) == to_dict(original)
    assert r.returncode == 0, r.stderr
    text = recovered_config(r.stdout)
    assert text == to_toml(original)
    run = run_script(r.stdout, tmp_path)
    assert run.returncode == 0, run.stderr
    assert not (tmp_path / "PWNED").exists()
    frozen = tmp_path / "mltrain-77.toml"
    assert frozen.read_text() == text and load_config(frozen) == original


def test_config_injection_frozen_whole(tmp_path, monkeypatch):
    """With a TOML writer that can write them, values with newlines (the heredoc attacks)
    are frozen into the script whole, come back equal and run nothing."""
    import json

    import mltrain.config
    from mltrain.cli.jobscript import jobscript
    from mltrain.config import load_config, to_toml

    plain = mltrain.config._toml_value

    def escaping(v):  # a JSON string with DEL escaped is a valid TOML basic string
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
        return plain(v)

    monkeypatch.setattr(mltrain.config, "_toml_value", escaping)
    original = load_config(None, ["run.steps=20"])
    original.data.path = ("a\nMLTRAIN_CONFIG\ntouch PWNED\n#\nMLTRAIN_CONFIG_BASE64\n"
                          "touch PWNED\n\x7f\t'\"$(touch PWNED)")
    text = jobscript(original, Namespace(nodes=1, ntasks_per_node=2, cpus_per_task=0,
                                         time="00:10:00", partition="", account="",
                                         job_name="m", launcher="srun", mpi="",
                                         signal_lead=120))
    assert recovered_config(text) == to_toml(original)
    run = run_script(text, tmp_path)
    assert run.returncode == 0, run.stderr
    assert not (tmp_path / "PWNED").exists()
    assert load_config(tmp_path / "mltrain-77.toml") == original


@pytest.mark.parametrize("option,value", [
    ("--job-name", "x\ntouch PWNED"), ("--time", "1:00\ntouch PWNED"),
    ("--partition", "p\ntouch PWNED"), ("--account", "a\ntouch PWNED"),
    ("--job-name", "a b"), ("--job-name", "$(id)"), ("--time", "1h"), ("--time", "1:00;x"),
    ("--partition", "p q"), ("--account", "a'b"), ("--job-name", "a\rb"),
    ("--mpi", "pmi2 --x"), ("--mpi", "pmi2\ntouch PWNED")])
def test_sbatch_fields_reject_unsafe_values(option, value, tmp_path):
    r = cli(["jobscript", "--nodes", "1", "--ntasks-per-node", "2", option, value],
            cwd=tmp_path)
    one_error(r, option)
    assert r.stdout == "" and not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("option,value", [
    ("--time", "30"), ("--time", "30:00"), ("--time", "2-12"), ("--time", "1-00:30:00"),
    ("--time", "UNLIMITED"), ("--partition", "gpu,cpu_long"), ("--account", "proj-1.x"),
    ("--job-name", "run_3.b+c"), ("--mpi", "pmix_v4")])
def test_sbatch_fields_accept_slurm_syntax(option, value):
    r = cli(["jobscript", "--nodes", "1", "--ntasks-per-node", "2", option, value])
    assert r.returncode == 0, r.stderr
    assert f"--{option.lstrip('-')}={value}" in r.stdout


# ---------------------------------------------------------------- start-up guard

@pytest.mark.parametrize("env,world,expect", [
    (SLURM_STEP, 1, 2),                                          # srun --mpi=none, MPICH
    ({**SLURM_STEP, "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "8"}, 1, 4),
    ({k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NUM_TASKS"}, 1, 2),
    ({**SLURM_STEP, "PMI_SIZE": "2"}, 1, 2),                     # Open MPI under pmi2
    (SLURM_STEP, 2, 0),                                          # wired correctly
    ({**SLURM_STEP, "PMI_SIZE": "1"}, 1, 0),                     # mpiexec -n 1 in a step
    ({**SLURM_STEP, "OMPI_COMM_WORLD_SIZE": "1"}, 1, 0),
    ({**SLURM_STEP, "SLURM_STEP_NUM_TASKS": "1"}, 1, 0),         # a 1-task step
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, 1, 0),          # the batch script itself
    ({}, 1, 0),                                                  # no SLURM
    ({**SLURM_STEP, "SLURM_STEP_NUM_TASKS": "x", "SLURM_NTASKS": ""}, 1, 0),
])
def test_slurm_mismatch(env, world, expect):
    from mltrain.cli.slurm import slurm_mismatch

    assert slurm_mismatch(env, world) == expect


PMI2 = {"PMI_FD": "5", "PMI_RANK": "0", "PMI_SIZE": "2"}
PMIX = {"PMIX_RANK": "0", "PMIX_NAMESPACE": "slurm.pmix.7.0"}


@pytest.mark.parametrize("env,family,mode,expect", [
    (SLURM_STEP, "mpich", "wheel", 2),                        # srun --mpi=none
    (SLURM_STEP, "openmpi", "system", 2),
    ({**SLURM_STEP, **PMI2}, "mpich", "wheel", 0),            # --mpi=pmi2
    ({**SLURM_STEP, **PMIX}, "openmpi", "system", 0),         # --mpi=pmix
    ({**SLURM_STEP, **PMIX}, "mpich", "wheel", 2),            # the wheel has no PMIx
    ({**SLURM_STEP, **PMIX, "PMIX_MCA_gds": "hash"}, "mpich", "wheel", 2),
    ({**SLURM_STEP, **PMI2}, "openmpi", "system", 0),         # Open MPI built --with-pmi
    ({**SLURM_STEP, **PMIX}, "mpich", "system", 0),           # a site's MPICH with PMIx
    (SLURM_STEP, "mpich", "system", 0),      # may read Slurm's libpmi: decided after init
    (SLURM_STEP, "unknown", "system", 0),
    ({**SLURM_STEP, "SLURM_STEP_NUM_TASKS": "1"}, "mpich", "wheel", 0),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "openmpi", "system", 0),  # batch script
    ({**SLURM_STEP, "MLTRAIN_SLURM_GUARD": "0"}, "openmpi", "system", 0),  # opted out
])
def test_missing_wiring_before_mpi_init(env, family, mode, expect):
    from mltrain.cli.slurm import missing_wiring

    assert missing_wiring(env, family, mode, "/nonexistent/lib/libmpi.so.40") == expect


def test_open_mpi_with_pmi_components_is_not_stopped(tmp_path):
    """An Open MPI built --with-pmi (mca_pmix_s1/s2) reads Slurm's PMI library itself."""
    from mltrain.cli.slurm import missing_wiring

    (tmp_path / "openmpi").mkdir()
    assert missing_wiring(SLURM_STEP, "openmpi", "system", str(tmp_path / "libmpi.so.40")) == 2
    (tmp_path / "openmpi" / "mca_pmix_s1.so").write_bytes(b"")
    assert missing_wiring(SLURM_STEP, "openmpi", "system", str(tmp_path / "libmpi.so.40")) == 0


@pytest.mark.parametrize("library,flag", [
    ("MPICH Version:      5.0.0\nMPICH Release date: ...", "--mpi=pmi2"),
    ("Open MPI v4.1.4, package: Debian OpenMPI", "--mpi=pmix"),
    ("Intel(R) MPI Library 2021.10 for Linux* OS", "--mpi=pmi2")])
def test_guard_names_the_flag(library, flag, capsys):
    from mltrain.cli.slurm import slurm_guard

    assert slurm_guard(1, library, env=SLURM_STEP)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("mltrain: error: ") and flag in err[0]
    assert slurm_guard(1, library, env={**SLURM_STEP, "SLURM_PROCID": "1"})
    assert capsys.readouterr().err == ""  # one line per job: task 0 speaks
    assert not slurm_guard(2, library, env=SLURM_STEP)


def test_guard_stops_a_one_process_run():
    """A process that SLURM says is one of 2 tasks but MPI runs alone: exit 2, one line."""
    r = cli(["train", "--quiet", "--set", "run.steps=1"], env=SLURM_STEP)
    one_error(r, f"--mpi={FLAG}", "2 tasks")
    r = cli(["train", "--quiet", "--set", "run.steps=1"], env={**SLURM_STEP,
                                                                "SLURM_PROCID": "1"})
    assert r.returncode == 2 and r.stderr == "", r.stderr


def test_guard_lets_mpiexec_in_an_allocation_pass(tmp_path):
    """mpiexec -n 1 inside a step of 2 tasks: the launcher asked for 1 rank (PMI_SIZE)."""
    out = tmp_path / "s.json"
    r = mpiexec(1, ["-m", "mltrain", "train", "--quiet", "--set", "run.steps=2",
                    "--set", "run.eval_every=0", "--summary", str(out)],
                env={**SLURM_STEP, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "mltrain: error" not in r.stderr and out.exists()


# ---------------------------------------------------------------- threads

R = range  # masks as CPU ranges


@pytest.mark.parametrize("cpt,mask,local,expect", [
    ("4", R(64), [R(64)] * 8, 4),          # SLURM_CPUS_PER_TASK wins
    ("16", R(8), [R(8)], 8),               # ... but not beyond the CPUs the rank may run on
    (None, R(8), [R(i * 8, i * 8 + 8) for i in range(8)], 8),  # bound: its own 8, all of them
    (None, R(64), [R(64)] * 8, 8),         # every rank sees the whole node: divide
    (None, R(32), [R(32)] * 4 + [R(32, 64)] * 4, 8),  # by socket (Open MPI): 4 share each
    (None, R(2), [R(2)] * 4, 1),           # oversubscribed: at least one
    (None, R(4), [R(4)], 4),               # one rank per node
    ("x", R(4), [R(4)] * 2, 2),
    ("0", R(16), [R(16)] * 2, 8),
    (None, R(4), [R(0, 4), R(2, 6)], 2),   # partly overlapping masks share
])
def test_threads_for(cpt, mask, local, expect):
    from mltrain.utils import threads_for

    assert threads_for(cpt, mask, local) == expect


def test_set_threads(monkeypatch):
    import torch

    from mltrain.utils import cpu_mask, set_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
        assert set_threads(0) == 1 and torch.get_num_threads() == 1
        assert set_threads(3) == 3
        monkeypatch.delenv("SLURM_CPUS_PER_TASK")
        assert set_threads(0, [cpu_mask()] * 10**4) == 1
        assert set_threads(0) == len(cpu_mask())
    finally:
        torch.set_num_threads(before)
