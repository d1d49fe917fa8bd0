"""Examples are tests: each script in examples/ runs at small size on 2 ranks."""
import pytest

from conftest import ROOT, mpiexec

pytestmark = pytest.mark.slow

EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_every_example_is_listed():
    assert {p.name for p in EXAMPLES} >= {"train_digits.py", "custom_model.py", "hdf5_dataset.py"}


RUNS = [(p, []) for p in EXAMPLES] + [
    (ROOT / "examples" / "custom_model.py", ["--set", "optim.name=rmtr", "--set", "multilevel.levels=2"]),
    (ROOT / "examples" / "custom_model.py", ["--set", "multilevel.nested=true", "--set",
                                             "multilevel.levels=2"])]


@pytest.mark.parametrize("script, extra", RUNS,
                         ids=lambda a: a.name if hasattr(a, "name") else "-".join(a[1::2]))
def test_example_runs(script, extra, tmp_path):
    args = [str(script), "--steps", "30", *extra]
    if script.name == "hdf5_dataset.py":
        args += ["--file", str(tmp_path / "d.h5")]
    r = mpiexec(2, args, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "test accuracy" in r.stdout and "on 2 ranks" in r.stdout
    acc = float(r.stdout.rsplit("test accuracy", 1)[1].split()[0])
    assert acc > 0.5, r.stdout  # 30 steps: well above chance (0.1)


def test_partition_study_config_plans():
    """The study example is a config, not a script: every run it describes must validate."""
    from mltrain.cli.study import plan
    from mltrain.config import load_config

    cfg_path = str(ROOT / "examples" / "partition_study" / "study.toml")
    cfg = load_config(cfg_path, ["data.path=/some/mnist"])
    runs = plan(cfg_path, ["data.path=/some/mnist"], cfg.study.grid, cfg.study.ranks)
    assert len(runs) == 3 * 3 * 2
    assert {r for _, r, _ in runs} == {2, 4}
