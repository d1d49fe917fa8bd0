"""A real one-node SLURM cluster (Debian's slurm-wlm and munge): the batch scripts that
``mltrain jobscript`` writes and ``jobscripts/slurm.sbatch`` run 2 ranks as one job, and the
start-up guard stops a mismatched ``srun --mpi``.

The set-up installs ``slurm-wlm`` and ``munge`` with apt-get when run as root and they are
missing; then it starts munged (its own key and socket), slurmctld and slurmd as
children of this process, configured through ``SLURM_CONF`` in a temporary folder, and
stops them by PID at the end (they also die with this process: PR_SET_PDEATHSIG). Without
root or apt-get the tests skip, except in CI (MLTRAIN_CI=1), where they fail.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import CI, ROOT

# Generous: the first test may install the packages (apt-get) before starting the cluster.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "sinfo", "srun", "scancel", "munge")


def _unavailable(why: str):
    if CI:
        pytest.fail(f"a real SLURM is required in CI (MLTRAIN_CI=1): {why}")
    pytest.skip(why)


def _missing() -> list[str]:
    return [exe for exe in (*DAEMONS, *CLIENTS) if shutil.which(exe) is None]


def _install() -> None:
    """slurm-wlm and munge from Debian, when root with apt-get; else skip (CI: fail)."""
    if not _missing():
        return
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        _unavailable(f"not root, and {', '.join(_missing())} missing (apt-get install "
                     "slurm-wlm munge)")
    if shutil.which("apt-get") is None:
        _unavailable(f"{', '.join(_missing())} missing and no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "slurm-wlm", "munge"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if r.returncode != 0:  # stale package lists
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=180, env=env)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if r.returncode != 0 or _missing():
        _unavailable(f"apt-get install slurm-wlm munge failed: {r.stderr[-1500:]}")


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies (a timeout that ends
    pytest must not leave daemons behind)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line() -> tuple[str, str]:
    """(node name, the hardware part of its NodeName line) from ``slurmd -C``."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("NodeName=")), "")
    if not line:
        pytest.fail(f"slurmd -C printed no NodeName line: {out.stdout}{out.stderr}")
    name, _, rest = line.partition(" ")
    return name.split("=", 1)[1], rest


class Cluster:
    """munged + slurmctld + slurmd on this machine, in ``root`` (a temporary folder)."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.conf = root / "slurm.conf"
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_",
                                         "MLTRAIN_"))}
        from mltrain.launch import clean_env

        self.env = clean_env(self.env)  # no outer MPI job's wiring in the jobs
        self.env.update(SLURM_CONF=str(self.conf), PYTHONPATH=str(ROOT),
                        OMP_NUM_THREADS="1")

    def start(self) -> None:
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir()
        # munged refuses a socket in a folder others cannot traverse, and a key that others
        # can read.
        os.chmod(r, 0o755)
        os.chmod(r / "munge", 0o755)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = r / "munge" / "munge.socket"
        self._spawn("munged", ["munged", "--foreground", f"--key-file={key}",
                               f"--socket={sock}", f"--pid-file={r}/munge/munged.pid",
                               f"--seed-file={r}/munge/munged.seed"])
        self._wait(lambda: subprocess.run(["munge", "-n", "-S", str(sock)],
                                          capture_output=True, timeout=10).returncode == 0,
                   30, "munged to answer")
        node, hardware = _node_line()
        host = socket.gethostname().split(".")[0]
        self.node = node
        self.conf.write_text("\n".join([
            "ClusterName=mltraintest",
            # The controller must be this host by name (slurmctld refuses to run as the
            # controller of another name, e.g. localhost); the address avoids DNS.
            f"SlurmctldHost={host}(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={sock}",
            "MpiDefault=none",  # as on many sites: the job script must choose --mpi
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill", "ReturnToService=2", "MailProg=/bin/true",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none", "JobCompType=jobcomp/none",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd.log",
            f"NodeName={node} NodeAddr=127.0.0.1 {hardware} State=UNKNOWN",
            f"PartitionName=debug Nodes={node} Default=YES MaxTime=60 State=UP", ""]))
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", node])
        self._wait(self._idle, 90, f"sinfo to show node {node} idle")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = self.root / "log" / f"{name}.out"
        self.logs[name] = log
        with open(log, "wb") as f:
            self.procs[name] = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=self.env,
                                                preexec_fn=_die_with_parent)

    def _idle(self) -> bool:
        r = self.run(["sinfo", "-h", "-n", self.node, "-o", "%T"], timeout=15, check=False)
        return r.stdout.strip() == "idle"

    def _wait(self, ready, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    pytest.fail(f"{name} exited ({p.returncode}) while waiting for {what}:\n"
                                + self.tail())
            try:
                if ready():
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.5)
        pytest.fail(f"timed out after {timeout} s waiting for {what}:\n" + self.tail())

    def run(self, argv: list[str], *, timeout: float = 60, check: bool = True,
            env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           env={**self.env, **(env or {})}, cwd=cwd or self.root)
        if check and r.returncode != 0:
            pytest.fail(f"{' '.join(argv)} exited {r.returncode}: {r.stdout}{r.stderr}\n"
                        + self.tail())
        return r

    def submit(self, script: Path, *, env: dict | None = None,
               timeout: float = 300) -> tuple[int, int, str]:
        """sbatch --wait: (the job's exit code, job id, its output)."""
        try:
            r = self.run(["sbatch", "--wait", "--parsable", script.name], timeout=timeout,
                         check=False, env=env, cwd=script.parent)
        except subprocess.TimeoutExpired:
            self.run(["scancel", "--full", "--user", "root"], check=False)
            pytest.fail(f"sbatch --wait {script} did not return within {timeout} s\n"
                        + self.tail())
        m = re.match(r"(\d+)", r.stdout.strip())
        assert m, f"sbatch: {r.stdout}{r.stderr}"
        job = int(m.group(1))
        outs = list(script.parent.glob(f"*-{job}.out"))
        return r.returncode, job, outs[0].read_text() if outs else ""

    def tail(self, n: int = 30) -> str:
        parts = []
        for path in [*self.logs.values(), self.root / "log" / "slurmctld.log",
                     self.root / "log" / "slurmd.log"]:
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-n:]
                parts.append(f"---- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        try:
            if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
                self.run(["scancel", "--full", "--user", "root"], check=False, timeout=20)
        except (subprocess.SubprocessError, OSError):
            pass
        for name in reversed(list(self.procs)):  # slurmd, slurmctld, munged
            p = self.procs[name]
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=15)


@pytest.fixture(scope="module")
def cluster():
    if sys.platform != "linux":
        _unavailable("SLURM test needs Linux")
    _install()
    # Not under pytest's basetemp: munged needs every folder above its socket traversable.
    root = Path(tempfile.mkdtemp(prefix="mltrain-slurm-"))
    c = Cluster(root)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def jobdir(cluster):
    return Path(tempfile.mkdtemp(prefix="job-", dir=cluster.root))


def jobscript(d: Path, *args: str) -> Path:
    r = subprocess.run([sys.executable, "-m", "mltrain", "jobscript", "--nodes", "1",
                        "--ntasks-per-node", "2", "--time", "5", "--set", "run.steps=20",
                        "--set", "model.width=16", *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    path = d / "job.sbatch"
    path.write_text(r.stdout)
    return path


def assert_two_ranks(cluster, d: Path, code: int, job: int, out: str) -> None:
    assert code == 0, f"job {job} exited {code}:\n{out}\n{cluster.tail()}"
    assert not re.search(r"error|traceback", out, re.I), out
    summary = json.loads((d / f"summary-{job}.json").read_text())
    assert summary["ranks"] == 2 and summary["steps"] == 20, summary


@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
def test_generated_script_trains_on_two_ranks(cluster, jobdir, launcher):
    script = jobscript(jobdir, "--launcher", launcher)
    test = cluster.run(["sbatch", "--test-only", script.name], cwd=jobdir)
    assert "to start at" in test.stderr + test.stdout, test.stderr
    code, job, out = cluster.submit(script)
    assert_two_ranks(cluster, jobdir, code, job, out)


def test_guard_stops_a_step_without_mpi_wiring(cluster, jobdir):
    """srun --mpi=none starts 2 separate 1-rank jobs: the guard ends both with exit 2 and
    one line naming the plugin this MPI needs (pmi2 for the MPICH wheel, pmix for Open
    MPI)."""
    from mltrain.cli.jobscript import srun_mpi_flag
    from mltrain.launch import mpi_vendor

    script = jobscript(jobdir, "--mpi", "none")
    assert "\nsrun --mpi=none " in script.read_text()
    code, job, out = cluster.submit(script)
    assert code == 2, f"job {job} exited {code}:\n{out}"
    errors = [ln for ln in out.splitlines() if ln.startswith("mltrain: error:")]
    flag = srun_mpi_flag(mpi_vendor())
    assert len(errors) == 1 and f"--mpi={flag}" in errors[0], out
    assert not (jobdir / f"summary-{job}.json").exists(), out


def test_template_takes_venv_and_config(cluster, jobdir):
    template = jobdir / "slurm.sbatch"
    shutil.copy(ROOT / "jobscripts" / "slurm.sbatch", template)
    config = jobdir / "run.toml"
    config.write_text("[run]\nsteps = 20\n\n[model]\nwidth = 16\n")
    test = cluster.run(["sbatch", "--test-only", template.name], cwd=jobdir)
    assert "to start at" in test.stderr + test.stdout, test.stderr
    code, job, out = cluster.submit(template, env={"MLTRAIN_VENV": sys.prefix,
                                                   "MLTRAIN_CONFIG": str(config)})
    assert_two_ranks(cluster, jobdir, code, job, out)
    # Without a config: a clear message and exit 2, before any srun.
    code, job, out = cluster.submit(template, env={"MLTRAIN_VENV": sys.prefix})
    assert code == 2 and "mltrain: error: set MLTRAIN_CONFIG" in out, out
    code, job, out = cluster.submit(template, env={"MLTRAIN_VENV": str(jobdir / "nope"),
                                                   "MLTRAIN_CONFIG": str(config)})
    assert code == 2 and "mltrain: error: MLTRAIN_VENV=" in out, out
