"""The command line end to end, in real MPI jobs launched from a serial test."""
import json
import math
import re

import pytest

from conftest import ROOT, mpiexec

from mltrain.config import ConfigError

pytestmark = pytest.mark.slow


def test_default_run_reaches_95_percent(tmp_path):
    out = tmp_path / "summary.json"
    r = mpiexec(2, ["-m", "mltrain", "train", "--summary", str(out),
                    "--set", f"run.out_dir={tmp_path}"])
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(out.read_text())
    for key in ("ranks", "steps", "epochs", "final_loss", "train_accuracy", "test_accuracy",
                "wall_s", "samples_per_s", "comm_bytes", "checkpoint"):
        assert key in s, key
    assert s["ranks"] == 2 and s["test_accuracy"] >= 0.95, s
    assert s["comm_bytes"] > 0
    assert r.stdout.count("mltrain:") == 1 and "test acc" in r.stdout  # one summary line
    metrics = [json.loads(line) for line in open(s["metrics"])]
    assert {"step", "loss", "lr", "time"} <= set(metrics[0])


def test_default_job_at_16_ranks(tmp_path):
    """The default job at 16 ranks (8 to a core here): every rank trains in one job (not 16
    one-rank jobs), the data is split 16 ways and the loss falls."""
    out = tmp_path / "summary.json"
    r = mpiexec(16, ["-m", "mltrain", "--quiet", "--set", "run.steps=40", "--summary",
                     str(out), "--set", f"run.out_dir={tmp_path}"], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["ranks"] == 16 and s["steps"] == 40 and s["comm_bytes"] > 0, s
    assert s["final_loss"] < 1.0 and s["test_accuracy"] > 0.6, s


def test_bench_startup(tmp_path):
    """bench startup runs both jobs at each rank count and reports what mltrain adds."""
    import subprocess
    import sys

    out = tmp_path / "startup.json"
    r = subprocess.run([sys.executable, "-m", "mltrain", "bench", "startup", "--ranks", "1,2",
                        "--reps", "1", "--json", str(out)], capture_output=True, text=True,
                       cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["ranks"] for row in rows] == [1, 2]
    for row in rows:
        assert row["floor_s"] > 0 and row["mltrain_s"] > 0 and row["floor_rss_mib"] > 50
        assert row["ratio"] == pytest.approx(row["mltrain_s"] / row["floor_s"])
    bad = subprocess.run([sys.executable, "-m", "mltrain", "bench", "startup", "--ranks",
                          "0,x"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("mltrain: error: --ranks")


def test_no_arguments_means_train(tmp_path):
    r = mpiexec(1, ["-m", "mltrain", "--quiet", "--set", "run.steps=3",
                    "--set", f"run.out_dir={tmp_path}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "3 steps" in r.stdout


@pytest.mark.parametrize("ranks, args, message", [
    (2, ["--set", "run.sede=1"], "run.sede: unknown key"),
    (3, ["--set", "data.batch_size=64"], "not divisible by the 3 data-parallel ranks"),
    (2, ["--set", "data.name=idx", "--set", "data.path=/nonexistent"], "not a folder"),
    (2, ["--config", "/nonexistent.toml"], "cannot read"),
    (2, ["--summary", "/nonexistent/dir/s.json"], "--summary"),
    (2, ["--set", "model.stem_pool=3"], "model.stem_pool: 3 does not divide the 8 x 8 images"),
    (2, ["--set", "multilevel.nested=true", "--set", "multilevel.levels=3", "--set",
         "multilevel.nested_steps=5", "--set", "run.steps=10"],
     "multilevel.nested_steps: 2 coarse levels x 5 steps = 10 covers all 10 steps of the "
     "run; the full-depth network would never train (raise run.steps or lower "
     "multilevel.nested_steps)"),
    # A run counted in epochs is told to raise run.epochs, the key that set its length.
    (2, ["--set", "multilevel.nested=true", "--set", "multilevel.levels=3", "--set",
         "multilevel.nested_steps=20", "--set", "run.epochs=1"],
     "the full-depth network would never train (raise run.epochs or lower "
     "multilevel.nested_steps)"),
    (2, ["--set", "multilevel.nested=true", "--set", "multilevel.levels=3", "--set",
         "data.batch_size=1438", "--set", "run.epochs=2"],  # one step per epoch
     "run.epochs: the run's 2 steps shared by 3 levels of nested iteration leave none for "
     "the full-depth network (raise run.epochs)"),
])
def test_user_errors_exit_cleanly_on_every_rank(ranks, args, message):
    r = mpiexec(ranks, ["-m", "mltrain", "train", "--quiet", *args], timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.count("mltrain: error:") == 1, r.stderr  # once, not once per rank
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "ckpt-00000010.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    r = mpiexec(2, ["-m", "mltrain", "train", "--quiet", "--set", f"checkpoint.dir={tmp_path}",
                    "--set", "checkpoint.resume=true"], timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("mltrain: error:") == 1
    assert "ckpt-00000010.h5" in r.stderr and "not a readable HDF5" in r.stderr


@pytest.mark.parametrize("mode", ["raise", "kill"])
def test_one_failing_rank_ends_the_job(mode):
    # The timeout only turns a hang into a failure; a healthy abort takes seconds.
    r = mpiexec(3, [str(ROOT / "tests" / "scripts" / "fault.py"), mode], timeout=120)
    assert r.returncode != 0
    if mode == "raise":
        assert "injected failure on rank 1" in r.stderr
        assert "aborting the job" in r.stderr


def test_info_reports_one_mpi():
    r = mpiexec(1, ["-m", "mltrain", "info", "--check-mpi"], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    info = dict(line.split(None, 1) for line in r.stdout.splitlines() if " " in line)
    assert info["same_mpi"].strip() == "True", r.stdout
    assert "MPICH" in info["mpi_library"] or "Open MPI" in info["mpi_library"]
    for key in ("mpi4py", "petsc", "petsc4py", "torch", "h5py", "cxx_extension", "ranks",
                "torch_threads"):
        assert key in info, key


def test_jobscript(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "mltrain", "jobscript", "--nodes", "2",
           "--ntasks-per-node", "4", "--set", "data.batch_size=64", "--account", "proj1"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --nodes=2" in r.stdout and "#SBATCH --account=proj1" in r.stdout
    from mltrain.cli.jobscript import srun_mpi_flag
    from mltrain.launch import mpi_vendor

    flag = srun_mpi_flag(mpi_vendor())  # pmi2 with the MPICH wheel, pmix with Open MPI
    assert f'\nsrun --mpi={flag} "$python" -m mltrain train' in r.stdout
    assert "batch_size = 64" in r.stdout
    bad = subprocess.run(cmd[:-4] + ["--set", "data.batch_size=63"], capture_output=True,
                         text=True, cwd=ROOT)
    assert bad.returncode == 2 and "not divisible by the 8" in bad.stderr


def test_bench_dp_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = mpiexec(2, ["-m", "mltrain", "bench", "dp", "--steps", "3", "--reps", "3", "--json",
                    str(out), "--set", "model.width=32", "--set", "model.depth=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["step_ratio_vs_ddp"] > 0 and res["bandwidth_ratio_vs_raw"] > 0
    assert res["ranks"] == 2 and "ratio" in r.stdout


def test_partition_command(tmp_path):
    import subprocess
    import sys

    out, png = tmp_path / "p.json", tmp_path / "p.png"
    cmd = [sys.executable, "-m", "mltrain", "partition", "--ranks", "5", "--set",
           "data.partition=shards", "--json", str(out), "--plot", str(png)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert len(res["sizes"]) == 5 and sum(res["sizes"]) == 1438
    assert [sum(h) for h in res["label_histograms"]] == res["sizes"]
    assert 0.3 < res["skew"] < 1.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run(cmd[:6] + ["--set", "data.partition=dirichlet", "--set",
                                    "data.min_size=1000"], capture_output=True, text=True,
                         cwd=ROOT)
    assert bad.returncode == 2 and "data.min_size" in bad.stderr


def test_study(tmp_path):
    import csv
    import subprocess
    import sys

    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "mltrain", "study", "--grid",
           "sync.name=allreduce,localsgd;data.partition=iid", "--ranks", "1,2", "--out",
           str(out), "--set", "run.epochs=2", "--set", "model.width=16"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(x["sync.name"], x["ranks"]) for x in rows] == [
        ("allreduce", "1"), ("allreduce", "2"), ("localsgd", "1"), ("localsgd", "2")]
    assert all(x["status"] == "ok" and float(x["test_accuracy"]) > 0.3 for x in rows)
    assert "| run |" in (out / "results.md").read_text()
    for png in ("test_accuracy_vs_epochs.png", "test_accuracy_vs_bytes.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    evals = [json.loads(line) for line in
             open(next((out / "runs" / "name-localsgd_partition-iid_P2").rglob("metrics.jsonl")))
             if '"eval"' in line]
    assert [e["epoch"] for e in evals] == [1.0, 2.0]  # study.eval_every = 1


@pytest.mark.parametrize("args, message", [
    (["--grid", "data.partition=iid,bogus"], "data.partition"),
    (["--grid", "nokey"], "--grid"),
    (["--grid", "sync.name=sgp", "--ranks", "1,x"], "--ranks"),
])
def test_study_rejects_bad_input_before_running(tmp_path, args, message):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "mltrain", "study", "--out", str(tmp_path / "s"),
                        *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "s" / "runs").exists()


def test_bench_sync_smoke(tmp_path):
    out = tmp_path / "sync.json"
    r = mpiexec(2, ["-m", "mltrain", "bench", "sync", "--steps", "4", "--json", str(out),
                    "--set", "model.width=16", "--set", "model.depth=2"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {x["scheme"]: x for x in res["schemes"]}
    assert rows["allreduce"]["bytes_ratio"] == 1.0 and rows["allreduce"]["step_ratio"] == 1.0
    assert rows["allreduce+fp16"]["bytes_ratio"] == pytest.approx(0.5, rel=1e-3)
    assert rows["allreduce+powersgd-2"]["bytes_ratio"] < 0.5
    assert all(x["step_s_straggler"] > 0 for x in rows.values())


def test_bench_ps_smoke(tmp_path):
    """bench ps at 3 ranks (2 workers + 1 server): every run trains the same samples; k = 0
    trains as allreduce does; the staleness figures are the servers'."""
    out, md = tmp_path / "ps.json", tmp_path / "ps.md"
    r = mpiexec(3, ["-m", "mltrain", "bench", "ps", "--steps", "6", "--json", str(out),
                    "--markdown", str(md), "--partitions", "iid", "--methods",
                    "allreduce,ps k=0,ps k=-1", "--set", "model.width=16", "--set",
                    "model.depth=2", "--set", "run.dtype=float64"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {x["scheme"]: x for x in res["rows"]}
    assert res["workers"] == 2 and set(rows) == {"allreduce", "ps k=0", "ps k=-1"}
    assert abs(rows["ps k=0"]["accuracy_vs_allreduce"]) <= 0.01
    assert rows["ps k=0"]["staleness_max"] == 0 and rows["ps k=0"]["missed_updates_max"] == 0
    assert rows["ps k=-1"]["staleness_max_straggler"] >= 0
    assert all(x["fast_samples_per_s"] > 0 and x["fast_throughput_ratio"] > 0
               for x in rows.values())
    assert "| iid | ps k=-1 |" in md.read_text()
    bad = mpiexec(2, ["-m", "mltrain", "bench", "ps"])
    assert bad.returncode == 2 and "at least 3 ranks" in bad.stderr, bad.stderr[-2000:]


def test_bench_ps_transport_smoke(tmp_path):
    """Both transports of the comparison end with initial - lr x every push."""
    out = tmp_path / "t.json"
    r = mpiexec(3, ["-m", "mltrain", "bench", "ps", "--transport", "--steps", "5", "--sizes",
                    "100,3000", "--json", str(out)], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [x["elements"] for x in rows] == [100, 3000]
    assert all(x["two_sided_max_error"] <= 1e-5 and x["one_sided_max_error"] <= 1e-5
               and x["one_sided_vs_two_sided"] > 0 for x in rows), rows


def test_bench_kernels_smoke(tmp_path):
    import subprocess
    import sys

    from mltrain import ops

    if not ops.has_ext:
        pytest.skip(ops.ext_status())
    out = tmp_path / "k.json"
    r = subprocess.run([sys.executable, "-m", "mltrain", "bench", "kernels", "--sizes",
                        "1e3,2e4", "--json", str(out)], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert {"pack_fp32_to_bf16", "restrict_full_weighting", "prolong_linear", "sum_4_buffers",
            "axpby"} <= set(res["speedup_at_largest"])
    assert all(v > 0 for v in res["speedup_at_largest"].values())


def test_petsc_options_pass_through_and_are_checked():
    base = ["-m", "mltrain", "train", "--quiet", "--set", "optim.name=tr", "--set", "run.steps=2"]
    r = mpiexec(2, base + ["--petsc", "-log_view"], timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for event in ("mltrain_gradient", "mltrain_curvature", "mltrain_reduce"):
        assert event in r.stdout, event
    bad = mpiexec(2, base + ["--petsc", "-mltrain_tr_ksp_mx_it 5"], timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("mltrain: error:") == 1
    assert "-mltrain_tr_ksp_mx_it" in bad.stderr
    wrong = mpiexec(2, base + ["--petsc", "-mltrain_tr_ksp_type nonsense"], timeout=300)
    assert wrong.returncode == 2 and "nonsense" in wrong.stderr


def test_bench_tr_smoke(tmp_path):
    out, png = tmp_path / "tr.json", tmp_path / "tr.png"
    r = mpiexec(2, ["-m", "mltrain", "bench", "tr", "--budget", "0.5", "--json", str(out),
                    "--plot", str(png), "--set", "model.width=16"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    names = [m["method"] for m in res["methods"]]
    assert {"sgd", "adam", "tr-hessian", "tr-ggn", "tr-lsr1"} <= set(names)
    assert all(m["work"] >= 0.5 and m["curve"][0]["work"] == 0.0 for m in res["methods"])
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bench_prices_smoke(tmp_path):
    """bench prices: both protocols price every level of a 3-level RMTR (the level-0
    gradient exactly 1, Hessian products priced, coarser gradients cheaper than the
    finest's in the median), with the spreads and their ratio reported."""
    out = tmp_path / "prices.json"
    r = mpiexec(2, ["-m", "mltrain", "bench", "prices", "--reps", "3", "--json", str(out),
                    "--set", "optim.name=rmtr", "--set", "multilevel.levels=3",
                    "--set", "model.depth=32", "--set", "tr.curvature=hessian"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["levels"] == 3 and res["reps"] == 3 and res["ranks"] == 2
    assert len(res["prices"]) == 12 and "blocks / interleaved" in r.stdout
    for p in res["protocols"].values():
        med = dict(zip(res["prices"], p["median"]))
        assert med["level 0 gradient"] == 1.0 and p["spread"][0] == 0.0
        assert med["level 0 product"] > 0 and med["level 2 product"] > 0
        assert med["level 2 gradient"] < med["level 0 gradient"], med
        assert all(s >= 0 for s in p["spread"]) and p["worst_spread"] == max(p["spread"])
    assert res["spread_ratio"] > 0
    # Batch scaling: every factor timed, the first batch's charge equal to its time.
    scaling = res["batch_scaling"]
    assert [b["factor"] for b in scaling] == [1, 4, 16, 64]
    assert [b["samples"] for b in scaling] == [32 * b["factor"] for b in scaling]
    assert scaling[0]["charged_over_time"] == pytest.approx(1.0)
    assert all(b["seconds"] > 0 for b in scaling) and "batch scaling" in r.stdout
    # It prices what the run's optimizer prices: APTS with Hessian products pays for them.
    # At 3 ranks as well (one subdomain each, prices averaged over the ranks).
    r = mpiexec(3, ["-m", "mltrain", "bench", "prices", "--reps", "2", "--json", str(out),
                    "--set", "optim.name=apts", "--set", "tr.curvature=hessian",
                    "--set", "model.depth=8", "--set", "data.batch_size=96"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["levels"] == 1 and res["ranks"] == 3, res
    assert res["protocols"]["interleaved"]["median"][2] > 0, res
    bad = mpiexec(2, ["-m", "mltrain", "bench", "prices", "--plot", str(tmp_path / "p.png")])
    assert bad.returncode == 2 and "error: config: --plot: bench prices" in bad.stderr, bad.stderr


def test_bench_multilevel_smoke(tmp_path):
    out, png, md = tmp_path / "ml.json", tmp_path / "ml.png", tmp_path / "ml.md"
    r = mpiexec(2, ["-m", "mltrain", "bench", "multilevel", "--budget", "1.0", "--target",
                    "1.5", "--milestones", "1.8,2.2", "--target-acc", "0.5", "--seeds", "2",
                    "--lrs", "2", "--regimes",
                    "hybrid", "--json", str(out), "--plot", str(png), "--markdown", str(md),
                    "--set",
                    "model.name=resnet", "--set", "model.depth=8", "--set", "model.width=16",
                    "--set", "tr.max_it=5", "--set", "apts.subdomains=2"], timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    from mltrain.cli.info import cpu_model

    # What produced the figures: this CPU and the overrides, in the order given.
    assert res["cpu"] == cpu_model() and res["cpu"].isprintable(), res["cpu"]
    assert res["overrides"] == ["model.name=resnet", "model.depth=8", "model.width=16",
                                "tr.max_it=5", "apts.subdomains=2"], res["overrides"]
    cells = {(c["init"], c["method"]): c for c in res["cells"]}
    assert set(cells) == {(i, m) for i in ("independent", "smooth") for m in
                          ("sgd", "adam", "lbfgs", "tr", "rmtr-3", "apts", "apts-tr",
                           "nested-adam")}
    for c in cells.values():
        assert [run["seed"] for run in c["runs"]] == [0, 1]
        for run in c["runs"]:  # each stops at both targets or the budget, never before
            assert run["curve"][0]["work"] == 0.0
            reached = run["work_to_target"] is not None and run["work_to_acc"] is not None
            assert reached or run["work"] >= 1.0, run
        w = c["work_to_target"]
        assert w["reached"] == sum(run["work_to_target"] is not None for run in c["runs"])
        for run in c["runs"]:  # the higher loss first, both on the way to the target
            first, second = run["work_to_milestones"]
            ends = [v for v in (first, second, run["work_to_target"]) if v is not None]
            assert ends == sorted(ends), run
            assert run["work_to_target"] is None or second is not None, run
        for k, s in enumerate(c["work_to_milestones"]):
            assert s["reached"] == sum(run["work_to_milestones"][k] is not None
                                       for run in c["runs"])
        for run in c["runs"]:  # each milestone's work is the first point after a step
            # below it within the budget (a last step past the budget does not count)
            for level, at in zip(res["milestones"], run["work_to_milestones"]):
                assert at is None or at <= 1.0, (level, at)
                before = [p for p in run["curve"][1:]
                          if p["work"] <= 1.0 and (at is None or p["work"] < at)]
                assert all(p["train_loss"] > level for p in before), (level, at, run["curve"])
                assert at is None or any(p["work"] == at and p["train_loss"] <= level
                                         for p in run["curve"]), (level, at, run["curve"])
        if w["median"] is not None:
            assert w["q25"] <= w["median"] <= w["q75"]
    assert res["milestones"] == [2.2, 1.8]  # sorted from the first met
    tr = cells["independent", "tr"]
    assert tr["work_ratio_vs_tr"] in (1.0, None)
    assert all(r in (1.0, None) for r in tr["milestone_ratios_vs_tr"])
    for key in cells:  # every second-order cell compared with Adam rerun to its steps
        eq = cells[key].get("vs_adam_equal_steps")
        if key[1] in ("tr", "rmtr-3", "apts", "apts-tr"):
            assert eq is not None and len(eq["per_seed"]) == 2, (key, eq)
            assert eq["min"] <= eq["median"] <= eq["max"]
        else:
            assert eq is None, key
    assert cells["independent", "nested-adam"]["lr"] == cells["independent", "adam"]["lr"]
    for key in (("independent", "sgd"), ("independent", "adam")):  # the rates tuning tried
        rates = cells[key]["rates"]
        assert len(rates) >= 2 and rates == sorted(rates) and cells[key]["lr"] in rates
    assert "rmtr-3" in r.stdout and "medians [IQR]" in r.stdout
    assert "work to each training loss (TR / this): 2.2, 1.8" in r.stdout
    assert png.read_bytes()[:4] == b"\x89PNG"
    text = md.read_text()
    assert text.count("| rmtr-3 |") == 4 and "hybrid batch, smooth initialization" in text
    assert "| method | loss 2.2 | loss 1.8 | loss 1.5 (target) |" in text
    # The saved run renders again without training: the same tables, the same plot panels.
    md2, png2 = tmp_path / "again.md", tmp_path / "again.png"
    again = mpiexec(2, ["-m", "mltrain", "bench", "multilevel", "--from-json", str(out),
                        "--markdown", str(md2), "--plot", str(png2)], timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert md2.read_text() == text and png2.read_bytes()[:4] == b"\x89PNG"
    def table(stdout):  # the table's rows, not the progress log's ("...: rates", ...)
        return [ln for ln in stdout.splitlines() if ln.startswith("  hybrid/")
                and ": " not in ln]
    assert table(r.stdout) and table(r.stdout) == table(again.stdout)
    assert "rates" not in again.stdout  # nothing was tuned or trained
    bad = mpiexec(2, ["-m", "mltrain", "bench", "multilevel", "--methods", "tr,rmtr-9"])
    assert bad.returncode == 2 and "rmtr-9" in bad.stderr
    bad = mpiexec(2, ["-m", "mltrain", "bench", "multilevel", "--regimes", "tiny"])
    assert bad.returncode == 2 and "--regimes" in bad.stderr


def test_equal_steps_compares_each_seed_with_adam_at_its_step_count():
    """Adam is rerun once per seed, to every step count a second-order method ended at on
    that seed, and each run is compared with Adam's accuracy at exactly its count."""
    from mltrain.cli.bench_multilevel import _equal_steps

    def runs(steps, accs):
        return [{"seed": i, "steps": n, "test_accuracy": a}
                for i, (n, a) in enumerate(zip(steps, accs))]
    cells = [{"method": "adam", "runs": runs([90, 90], [0.9, 0.9])},
             {"method": "apts", "runs": runs([7, 9], [0.80, 0.70])},
             {"method": "rmtr-3", "runs": runs([7, 4], [0.60, 0.75])}]
    asked = []

    def adam_run(seed, probes):
        asked.append((seed, sorted(probes)))
        return {"curve": [{"step": 0, "test_accuracy": 0.1}]
                + [{"step": n, "test_accuracy": 0.5 + 0.01 * n + 0.1 * seed}
                   for n in sorted(probes)]}
    _equal_steps(cells, adam_run)
    assert asked == [(0, [7]), (1, [4, 9])]
    apts = cells[1]["vs_adam_equal_steps"]
    assert apts["per_seed"] == pytest.approx([100 * (0.80 - 0.57), 100 * (0.70 - 0.69)])
    assert apts["median"] == pytest.approx(12.0) and apts["min"] == pytest.approx(1.0)
    assert cells[2]["vs_adam_equal_steps"]["per_seed"] == pytest.approx([3.0, 11.0])
    assert "vs_adam_equal_steps" not in cells[0]


def _saved_result() -> dict:
    """The smallest result ``bench multilevel --json`` could have written."""
    stats = {"reached": 1, "median": 2.0, "q25": 2.0, "q75": math.inf}
    point = {"work": 0.0, "wall_s": 0.0, "step": 0, "train_loss": 2.3, "test_accuracy": 0.1}
    cell = {"regime": "hybrid", "init": "smooth", "method": "rmtr-3", "lr": None,
            "runs": [{"curve": [point, dict(point, work=1.0, train_loss=0.5)]}],
            "work_to_target": stats, "wall_to_target": stats, "steps_to_target": stats,
            "work_to_acc": stats, "steps_to_acc": dict(stats, median=None, q25=None),
            "test_accuracy": {"median": 0.9, "q25": 0.9, "q75": 0.9},
            "work_ratio_vs_tr": None, "steps_ratio_vs_adam": None,
            "vs_adam_equal_steps": {"median": 1.0, "min": 0.0, "max": 2.0},
            "work_to_milestones": [dict(stats, median=1.0, q25=1.0, q75=1.5)],
            "milestone_ratios_vs_tr": [1.25]}
    return {"bench": "multilevel", "dataset": "digits", "data_path": "", "model": "resnet",
            "curvature": "lsr1", "ranks": 2, "seeds": 2, "batch": 64, "large_batch": 512,
            "budget": 1.0, "target": 0.1, "target_acc": None, "regimes": ["hybrid"],
            "inits": ["smooth"], "milestones": [0.5], "cells": [cell]}


@pytest.mark.parametrize("spoil, message", [
    (lambda r: r.pop("cells"), "missing 'cells'"),
    (lambda r: r.update(seeds=True), "'seeds' must be int, got bool"),
    (lambda r: r.update(regimes=["hybrid", "hybrid"]), "'regimes' must list distinct"),
    (lambda r: r.update(inits=[["smooth"]]), "'inits' must list distinct"),
    (lambda r: r.update(model="resnet\n| injected |"), "'model' must be a short printable"),
    (lambda r: r["cells"][0].update(method="rmtr-3 | x"), "cells[0]: its regime, init or"),
    (lambda r: r["cells"][0]["runs"][0]["curve"][1].update(train_loss="0.5"),
     "cells[0].runs[0].curve[1]: 'train_loss' must be int or float, got str"),
    (lambda r: r["cells"][0].update(runs=[]), "cells[0]: 'runs' is empty"),
    (lambda r: r["cells"][0]["work_to_target"].update(q25=None), "a median needs its"),
    (lambda r: r["cells"][0]["test_accuracy"].update(median=None),
     "cells[0].test_accuracy: 'median' must be int or float"),
    (lambda r: r["cells"][0].update(vs_adam_equal_steps={"median": 1.0}), "missing 'min'"),
    (lambda r: r.update(cells={"0": {}}), "'cells' must be list, got dict"),
    (lambda r: r["cells"][0].update(rates=[0.1, -1.0]), "cells[0]: 'rates' must list"),
    (lambda r: r["cells"][0].update(rates=[0.1] * 101), "cells[0]: 'rates' must list"),
    (lambda r: r["cells"][0].update(lr=10 ** 400), "cells[0]: 'lr' is out of range"),
    (lambda r: r.update(milestones=["0.5"]), "'milestones' must list at most 20 finite"),
    (lambda r: r.update(milestones=[0.5] * 21), "'milestones' must list at most 20 finite"),
    (lambda r: r.update(milestones=[math.nan]), "'milestones' must list at most 20 finite"),
    (lambda r: r["cells"][0].update(milestone_ratios_vs_tr=[math.nan]),
     "milestone_ratios_vs_tr[0]: must be a positive finite number or null"),
    (lambda r: r["cells"][0]["work_to_target"].update(reached=-1),
     "cells[0].work_to_target: 'reached' must lie in [0, 2]"),
    (lambda r: r["cells"][0]["work_to_milestones"][0].update(median=math.nan),
     "cells[0].work_to_milestones[0]: 'median' must be finite"),
    (lambda r: r["cells"][0].update(milestone_ratios_vs_tr=[]), "one work figure and one"),
    (lambda r: r["cells"][0]["work_to_milestones"][0].update(q25=None),
     "cells[0].work_to_milestones[0]: a median needs its quartiles"),
    (lambda r: r["cells"][0].update(milestone_ratios_vs_tr=["1"]),
     "cells[0].milestone_ratios_vs_tr[0]: must be a positive finite number or null"),
    (lambda r: r.update(cpu="AMD\n| injected |"), "'cpu' must be a short printable name"),
    (lambda r: r.update(cpu=7), "'cpu' must be str, got int"),
    (lambda r: r.update(overrides="a=b"), "'overrides' must list at most 200"),
    (lambda r: r.update(overrides=["a=b\n| x |"]), "'overrides' must list at most 200"),
    (lambda r: r.update(overrides=["a=b"] * 201), "'overrides' must list at most 200"),
])
def test_from_json_refuses_what_the_tables_could_not_read(tmp_path, spoil, message):
    """``--from-json`` reads an untrusted file: every field the tables and the plot read is
    checked, and the first bad one is named. The unspoiled result renders."""
    from mltrain.cli.bench_multilevel import load_result, markdown

    path = tmp_path / "run.json"
    path.write_text(json.dumps(_saved_result()))
    text = markdown(load_result(str(path)))
    assert "| rmtr-3 | - | 2.00 [2.00, inf] (1/2) |" in text
    assert "| rmtr-3 | 1.00 [1.00, 1.50] (1/2), 1.25x | 2.00 [2.00, inf] (1/2) |" in text
    old = _saved_result()  # saved before milestones were recorded: no such table
    del old["milestones"]
    path.write_text(json.dumps(old))
    assert "work to each training loss" not in markdown(load_result(str(path)))
    assert "rank(s) on" not in markdown(load_result(str(path)))  # nor a CPU line
    named = dict(_saved_result(), cpu="AMD EPYC", overrides=["model.depth=64"])
    path.write_text(json.dumps(named))
    assert markdown(load_result(str(path))).startswith(
        "2 rank(s) on AMD EPYC; overrides: `model.depth=64`\n")
    adam = _saved_result()  # a tuned rate at the end of the rates tried is marked
    adam["cells"][0].update(method="adam", lr=0.1, rates=[0.01, 0.1])
    path.write_text(json.dumps(adam))
    assert "| adam | 0.1 (edge) |" in markdown(load_result(str(path)))
    adam["cells"][0].update(lr=0.05, rates=[0.01, 0.05, 0.1])
    path.write_text(json.dumps(adam))
    assert "| adam | 0.05 |" in markdown(load_result(str(path)))
    res = _saved_result()
    spoil(res)
    path.write_text(json.dumps(res))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_result(str(path))


def test_bench_multilevel_statistics():
    """Order statistics over the seeds, a missed seed worse than any reached."""
    from mltrain.cli.bench_multilevel import _best_rate, _stats, lr_grid

    assert _stats([3.0, 1.0, 2.0, 5.0, 4.0], 5) == {"reached": 5, "median": 3.0, "q25": 2.0,
                                                   "q75": 4.0}
    s = _stats([3.0, None, 1.0, None, 2.0], 5)
    assert s["reached"] == 3 and s["median"] == 3.0 and s["q75"] == math.inf
    assert _stats([None, None, 1.0, 2.0], 4)["median"] == 2.0  # the lower median
    assert _stats([None, None, None, 2.0], 4)["median"] is None  # most missed: none
    rows = [(0.1, {"work_to_target": None, "train_loss": 0.5}),
            (0.2, {"work_to_target": 3.0, "train_loss": 0.1}),
            (0.3, {"work_to_target": 2.0, "train_loss": 0.2})]
    assert _best_rate(rows) == 0.3
    assert _best_rate([(0.1, {"work_to_target": None, "train_loss": 0.5}),
                       (0.2, {"work_to_target": None, "train_loss": float("nan")})]) == 0.1
    g = lr_grid("adam", 6)
    assert len(g) == 6 and g[0] == pytest.approx(1e-4) and g[-1] == pytest.approx(0.1)
    assert all(b / a == pytest.approx(g[1] / g[0]) for a, b in zip(g, g[1:]))


def test_bench_multilevel_tuning_goes_past_the_grid_while_its_end_is_best():
    """A best rate at an end of the grid is not tuned: tuning tries rates past that end,
    at the grid's spacing, until the best is inside (or EXTEND more were tried)."""
    from mltrain.cli.bench_multilevel import EXTEND, lr_grid, tune

    def race_at(best):  # work to the target least at ``best``, growing away from it
        return lambda lr: {"work_to_target": 1 + abs(math.log(lr / best)),
                           "train_loss": 0.1}

    g = lr_grid("adam", 6)
    ratio = g[1] / g[0]
    inside, tried = tune("adam", 6, race_at(g[2]))
    assert inside == g[2] and [lr for lr, _ in tried] == g  # nothing past the grid
    up, tried = tune("adam", 6, race_at(g[-1] * ratio ** 1.2))
    assert [lr for lr, _ in tried] == pytest.approx(g + [g[-1] * ratio, g[-1] * ratio ** 2])
    assert up == pytest.approx(g[-1] * ratio)
    down, tried = tune("adam", 6, race_at(1e-12))  # the low end, out of reach
    assert len(tried) == 6 + EXTEND and down == tried[0][0] == pytest.approx(g[0] / ratio ** 3)
    # A rate that diverges past the top end stops the search there.
    diverge = {"work_to_target": None, "train_loss": math.nan}
    top, tried = tune("adam", 6, lambda lr: race_at(1.0)(lr) if lr <= g[-1] else diverge)
    assert top == g[-1] and len(tried) == 7
    # An end tied with an inner rate is not strictly best: no search past it.
    tie = tune("adam", 6, lambda lr: {"work_to_target": 2.0 if lr < g[2] else 3.0,
                                      "train_loss": 0.1})
    assert tie[0] == g[0] and len(tie[1]) == 6
    assert len(tune("adam", 6, lambda lr: diverge)[1]) == 6  # nothing finite: nothing to chase
    assert len(tune("adam", 2, race_at(1e-12))[1]) == 2  # 2 rates: no spacing to extend by


def test_bench_mgrit_smoke(tmp_path):
    out = tmp_path / "mgrit.json"
    r = mpiexec(2, ["-m", "mltrain", "bench", "mgrit", "--depths", "32,64", "--cf", "4",
                    "--json", str(out)], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert set(res["speedup"]) == {"32", "64"} and all(v > 0 for v in res["speedup"].values())
    assert res["model_error"] == max(row["model_error"] for row in res["rows"])
    assert {(row["levels"], row["iters"]) for row in res["rows"]} >= {(1, 1), (2, 2), (3, 3)}
    assert max(s["ranks"] for s in res["scaling"]) >= 16
    bad = mpiexec(2, ["-m", "mltrain", "bench", "mgrit", "--depths", "x"])
    assert bad.returncode == 2 and "--depths" in bad.stderr


def test_bench_multilevel_gives_tr_the_curvature_of_rmtr():
    """TR is compared with RMTR at the same curvature model and batch schedule."""
    from mltrain.cli.bench_multilevel import _regime, _settings
    from mltrain.config import load_config

    assert "tr.curvature=lsr1" in _settings("tr", None, "lsr1", 30)
    assert load_config(None, _settings("tr", None, "lsr1", 30)).tr.curvature == \
        load_config(None, _settings("rmtr-3", None, "lsr1", 30)).tr.curvature == "lsr1"
    assert _regime("hybrid", True, 512, 1438, 2) == ["tr.batch=hybrid"]
    assert "tr.batch=minibatch" in _regime("large", True, 512, 1438, 2)
    assert _regime("full", False, 512, 1438, 3) == ["data.batch_size=1437"]


@pytest.mark.parametrize("method, name, levels, init, nested", [
    ("rmtr-4", "rmtr", 4, "none", 0), ("rmtr-3-nested", "rmtr", 3, "nested", 0),
    ("nested-tr", "tr", 3, "none", 7)])
def test_bench_multilevel_races_opt_in_methods_only_when_asked(method, name, levels, init,
                                                               nested):
    """rmtr-4 needs a network deep enough for three coarsenings, rmtr-3-nested is a
    variant of rmtr-3 (nested initialization) and nested-tr its control (TR after nested
    iteration with RMTR's init_cycles steps per coarse level): each runs only when
    --methods names it, with its levels and start, and counts as second order."""
    from mltrain.cli.bench_multilevel import SECOND_ORDER, _settings, chosen
    from mltrain.config import load_config

    assert method not in chosen(None) and "rmtr-3" in chosen([])
    assert chosen([method, "tr"]) == ["tr", method]
    cfg = load_config(None, _settings(method, None, "lsr1", 7) + ["model.name=resnet",
                                                                   "model.depth=16"])
    m = cfg.multilevel
    assert (cfg.optim.name, m.levels, m.init, m.nested_steps) == (name, levels, init, nested)
    assert m.nested == (nested > 0) and cfg.tr.curvature == "lsr1"
    assert method in SECOND_ORDER
