import pytest

from mltrain.config import (Config, ConfigError, describe_keys, load_config, parse_override,
                            to_toml)

from conftest import ROOT


def test_default_is_valid():
    cfg = load_config()
    assert cfg.data.name == "digits" and cfg.model.name == "resnet"


def test_toml_file_and_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[run]\nseed = 3\ndtype = "float64"\n[optim]\nname = "sgd"\nlr = 1\n')
    cfg = load_config(f, ["optim.momentum=0.5", "data.path=/scratch/mnist", "run.steps=7",
                          "checkpoint.dir=2024", "data.shuffle=false"])
    assert cfg.run.seed == 3 and cfg.run.dtype == "float64"
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.momentum == 0.5 and cfg.run.steps == 7
    assert cfg.data.path == "/scratch/mnist" and cfg.checkpoint.dir == "2024"
    assert cfg.data.shuffle is False


@pytest.mark.parametrize("override, key", [
    ("run.sede=1", "run.sede"),               # unknown key
    ("rnu.seed=1", "rnu.seed"),               # unknown section
    ("run.seed=1.5", "run.seed"),             # wrong type
    ("run.seed=true", "run.seed"),            # bool is not an int
    ("run.dtype=float16", "run.dtype"),       # not a choice
    ("optim.lr=-1", "optim.lr"),              # below minimum
    ("optim.momentum=2", "optim.momentum"),   # above maximum
    ("data.shuffle=1", "data.shuffle"),       # int is not a bool
    ("optim.lr=nan", "optim.lr"),             # not finite
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nseed = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    flat = tmp_path / "flat.toml"
    flat.write_text("seed = 1\n")
    with pytest.raises(ConfigError, match="seed: expected a \\[seed\\] table"):
        load_config(flat)


def test_cross_key_checks():
    with pytest.raises(ConfigError, match="data.path"):
        load_config(None, ["data.name=idx"])
    with pytest.raises(ConfigError, match="checkpoint.resume"):
        load_config(None, ["checkpoint.resume=true"])
    with pytest.raises(ConfigError, match="nothing to train"):
        load_config(None, ["run.epochs=0"])


def test_override_syntax():
    assert parse_override("a.b=[1, 2]") == ("a", "b", [1, 2])
    with pytest.raises(ConfigError):
        parse_override("novalue")
    with pytest.raises(ConfigError):
        parse_override("a.b.c=1")


def test_toml_round_trip(tmp_path):
    cfg = load_config(None, ["run.seed=5", "data.path=a \"quoted\" \\path", "optim.lr=0.25"])
    f = tmp_path / "rt.toml"
    f.write_text(to_toml(cfg))
    assert load_config(f) == cfg
    assert Config() == load_config()


def test_docs_list_every_key():
    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = [k for k, *_ in describe_keys() if f"`{k}`" not in text]
    assert not missing, f"docs/configuration.md lacks {missing}"


@pytest.mark.parametrize("extra, match", [
    (["parallel.layer=2", "optim.name=mgopt"], "optim.name"),
    (["parallel.layer=2", "optim.name=rmtr", "optim.curvature=hessian"], "optim.curvature"),
    (["parallel.layer=2", "optim.name=rmtr", "optim.nested=true", "optim.levels=2"], "nested"),
    (["parallel.layer=2", "optim.name=tr", "optim.curvature=ggn"], "optim.curvature"),
    (["parallel.layer=2", "sync.name=localsgd"], "sync.name"),
    (["parallel.pipe=2", "optim.name=tr"], "optim.name"),
    (["parallel.pipe=2", "sync.name=localsgd"], "sync.name"),
    (["parallel.pipe=2", "parallel.layer=2", "optim.name=tr"], "optim.name"),
    (["pipeline.balance=2,x"], "pipeline.balance"),
    (["pipeline.balance=2,0"], "at least one layer"),
])
def test_model_parallel_config_errors(extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, extra)
