"""``mltrain search`` as a user runs it: the command line, its outputs, and a search that
is killed and resumed ending exactly as an uninterrupted one."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, mpiexec

pytestmark = pytest.mark.slow

BASE = """
[run]
steps = 9
dtype = "float64"
threads = 1
log_every = 3
costs = "unit"
[data]
name = "digits"
batch_size = 32
[model]
name = "mlp"
width = 16
[search]
eta = 3
min_resource = 1
"""

SPACE = """
["optim.lr"]
log = [0.01, 0.5]
["optim.momentum"]
range = [0.0, 0.9]
["data.batch_size"]
choice = [16, 32]
"""


@pytest.fixture
def files(tmp_path):
    (tmp_path / "base.toml").write_text(BASE)
    (tmp_path / "space.toml").write_text(SPACE)
    return tmp_path


def _args(d, out, *extra):
    return ["-m", "mltrain", "search", "--config", str(d / "base.toml"), "--space",
            str(d / "space.toml"), "--out", str(out), "--quiet", *extra]


def _rows(out):
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    keep = ("job", "trial", "status", "start", "stop", "spent", "score", "train_loss",
            "test_accuracy", "info", "optim.lr", "optim.momentum", "data.batch_size")
    return [{k: r[k] for k in keep} for r in rows]


@pytest.mark.parametrize("algo", ["random", "asha", "pbt"])
def test_every_output_of_a_search(files, algo):
    out = files / algo
    r = mpiexec(2, _args(files, out, "--algo", algo, "--budget", "36", "--set",
                         "parallel.trial=2", "--summary", str(files / "s.json")), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"mltrain: search {algo}:" in r.stdout
    s = json.loads((files / "s.json").read_text())
    assert s["spent"] <= 36 and s["jobs"] >= 2 and s["failed"] == 0
    rows = _rows(out)
    assert len(rows) == s["jobs"] and {r["status"] for r in rows} == {"ok"}
    assert max(int(r["spent"]) for r in rows) == s["spent"]
    for png in ("best_so_far.png", "curves.png", "space.png"):
        assert (out / png).stat().st_size > 1000
    from mltrain.config import load_config

    best = load_config(out / "best.toml")  # a config `mltrain train` takes as it is
    assert best.run.steps == 9 and best.parallel.trial == 1
    assert best.optim.lr == pytest.approx(s["best_values"]["optim.lr"], rel=0, abs=0)


def _finished(out) -> int:
    try:
        st = json.loads((out / "search-state.json").read_text())
    except (OSError, ValueError):
        return 0
    return sum(r.get("result") is not None for r in st["records"])


@pytest.mark.parametrize("algo, signame", [("asha", "SIGKILL"), ("crowding", "SIGKILL"),
                                           ("asha", "SIGTERM")])
def test_a_killed_search_resumes_to_the_uninterrupted_result(files, algo, signame):
    """One trial group of two ranks (deterministic order). The killed run loses the job in
    flight (SIGTERM: stops it at its next logged step and exits 128 + 15); --resume runs
    it again from its snapshot and the search ends with the same jobs, configurations and
    results to the last bit. A state or snapshot changed on disk is refused."""
    sets = ["--algo", algo, "--budget", "72", "--set", "search.population=4"]
    full = files / "full"
    r = mpiexec(2, _args(files, full, *sets), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = _rows(full)

    from mltrain.launch import mpiexec_argv

    killed = files / "killed"
    # A slow rank 0 (sleeping, not computing differently) so the kill lands mid-search.
    launch, env = mpiexec_argv(2, {**os.environ, "OMP_NUM_THREADS": "1"})
    p = subprocess.Popen([*launch, sys.executable,
                          *_args(files, killed, *sets, "--set", "run.straggler=0:20")],
                         env=env, cwd=ROOT, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while _finished(killed) < 3 and p.poll() is None:
            time.sleep(0.02)
    finally:
        os.killpg(p.pid, getattr(signal, signame))
        code = p.wait(timeout=300)
        if signame != "SIGKILL":
            os.killpg(p.pid, signal.SIGKILL) if p.poll() is None else None
    done = _finished(killed)
    assert 3 <= done < len(expected), "the kill did not land inside the search"
    if signame == "SIGTERM":
        assert code != 0
    import shutil

    state = json.loads((killed / "search-state.json").read_text())
    snaps = sorted((killed / "snapshots").glob("*.h5"))
    if algo == "asha" and snaps and state["snapshots"]:
        bad = files / "tampered"
        shutil.copytree(killed, bad)
        name = next(iter(state["snapshots"].values()))["file"]
        f = bad / "snapshots" / name
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 1
        f.write_bytes(bytes(data))
        r = mpiexec(2, _args(files, bad, *sets, "--set", "run.straggler=0:20", "--resume"),
                    timeout=600)
        assert r.returncode == 2 and r.stderr.count("mltrain: error:") == 1, r.stderr[-2000:]
        assert "SHA-256" in r.stderr or "snapshot" in r.stderr
    damaged = files / "damaged"
    shutil.copytree(killed, damaged)
    state["records"] = [1, 2, 3]
    (damaged / "search-state.json").write_text(json.dumps(state))
    r = mpiexec(2, _args(files, damaged, *sets, "--set", "run.straggler=0:20", "--resume"),
                timeout=600)
    assert r.returncode == 2 and r.stderr.count("mltrain: error:") == 1, r.stderr[-2000:]
    assert "damaged" in r.stderr and "Traceback" not in r.stderr
    r = mpiexec(2, _args(files, killed, *sets, "--set", "run.straggler=0:20"), timeout=600)
    assert r.returncode == 2 and "holds a search already" in r.stderr
    r = mpiexec(2, _args(files, killed, *sets, "--set", "run.straggler=0:20", "--resume"),
                timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _rows(killed) == expected
    # the resumed search refuses to continue under another budget
    r = mpiexec(2, _args(files, killed, "--algo", algo, "--budget", "90", "--set",
                         "search.population=4", "--resume"), timeout=600)
    assert r.returncode == 2 and "--resume" in r.stderr and "--budget" in r.stderr


def test_bench_search_smoke(tmp_path):
    """Two methods, one seed: each search spends at most its budget, ASHA's fraction and
    the scaling figures are there, and the outputs are written."""
    out, md, png = tmp_path / "s.json", tmp_path / "s.md", tmp_path / "s.png"
    r = mpiexec(2, ["-m", "mltrain", "bench", "search", "--methods", "random,asha",
                    "--seeds", "1", "--budget", "3", "--json", str(out), "--markdown",
                    str(md), "--plot", str(png)], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    d = res["datasets"]["digits"]
    assert d["budget"] == 3 * d["R"]
    for m in ("random", "asha"):
        (run,) = d["runs"][m]
        assert 0 < run["spent"] <= d["budget"] and run["failed"] == 0
        assert run["best"] == run["best_so_far"][-1][1]
        spent = [s for s, _ in run["best_so_far"]]
        assert spent == sorted(spent)
    assert d["runs"]["random"][0]["jobs"] == 3 and d["runs"]["asha"][0]["jobs"] > 3
    assert len(d["asha_fraction_to_random_best"]) == 1
    assert res["scaling"]["T"] == 2 and res["scaling"]["wall_T1"] > 0
    assert "ASHA's budget" in md.read_text() and png.read_bytes()[:4] == b"\x89PNG"


def test_bench_search_without_optuna_says_so(tmp_path):
    """Optuna is the benchmark's outside baseline, not a dependency: without it, tpe is
    one error line."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "optuna.py").write_text("raise ImportError('optuna is not installed here')\n")
    r = mpiexec(2, ["-m", "mltrain", "bench", "search", "--methods", "random,tpe"],
                env={"PYTHONPATH": f"{shim}:{ROOT}"}, timeout=300)
    assert r.returncode == 2 and r.stderr.count("mltrain: error:") == 1, r.stderr[-2000:]
    assert "pip install optuna" in r.stderr


def test_the_example_search_runs(tmp_path):
    """examples/search as the README shows it, on 2 ranks in 2 trial groups, with a
    smaller budget."""
    ex = ROOT / "examples" / "search"
    r = mpiexec(2, ["-m", "mltrain", "search", "--config", str(ex / "base.toml"), "--space",
                    str(ex / "space.toml"), "--algo", "asha", "--budget", "360", "--set",
                    "parallel.trial=2", "--out", str(tmp_path / "out"), "--quiet"],
                timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(tmp_path / "out")
    assert len(rows) > 3 and {r["status"] for r in rows} == {"ok"}
    assert max(float(r["test_accuracy"]) for r in rows) > 0.5
