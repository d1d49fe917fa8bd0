import pytest

from mltrain.config import (Config, ConfigError, describe_keys, load_config, parse_override,
                            resolve, to_toml)

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
    assert resolve(Config()) == load_config()


def test_docs_list_every_key():
    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = [k for k, *_ in describe_keys() if f"`{k}`" not in text]
    assert not missing, f"docs/configuration.md lacks {missing}"


@pytest.mark.parametrize("extra, match", [
    (["parallel.layer=2", "optim.name=mgopt"], "optim.name"),
    (["parallel.layer=2", "optim.name=rmtr", "tr.curvature=hessian"], "tr.curvature"),
    (["parallel.layer=2", "optim.name=rmtr", "multilevel.nested=true", "multilevel.levels=2"], "nested"),
    (["parallel.layer=2", "optim.name=tr", "tr.curvature=ggn"], "tr.curvature"),
    (["parallel.layer=2", "sync.name=localsgd"], "sync.name"),
    (["parallel.pipe=2", "optim.name=tr"], "optim.name"),
    (["parallel.pipe=2", "sync.name=localsgd"], "sync.name"),
    (["parallel.pipe=2", "parallel.layer=2", "optim.name=tr"], "optim.name"),
    (["pipeline.balance=2,x"], "pipeline.balance"),
    (["pipeline.balance=2,0"], "at least one layer"),
    (["model.depth_penalty=0.1", "model.name=mlp"], "model.depth_penalty: couples"),
    (["model.depth_penalty=0.1", "parallel.layer=2"], "parallel.layer = 2"),
    (["model.depth_penalty=0.1", "parallel.pipe=2", "optim.name=sgd"], "parallel.pipe = 2"),
    (["model.depth_penalty=-1"], "model.depth_penalty"),
    (["multilevel.nested_steps=5", "optim.name=tr"], "multilevel.nested_steps: sets"),
    (["model.stem_pool=2", "model.name=cnn"], "model.stem_pool: pools"),
    (["model.stem_pool=0"], "model.stem_pool"),
    (["multilevel.nested_steps=-1", "multilevel.nested=true", "multilevel.levels=2"],
     "multilevel.nested_steps"),
    (["model.depth_penalty=1e39"], "beyond float32"),
])
def test_model_parallel_config_errors(extra, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, extra)


def test_rules_table_in_the_docs_is_the_one_the_loader_checks():
    from mltrain.config import rules_table

    assert rules_table() in (ROOT / "docs" / "configuration.md").read_text()


@pytest.mark.parametrize("old, new", [("optim.curvature=lsr1", "tr.curvature"),
                                      ("optim.levels=2", "multilevel.levels"),
                                      ("optim.smoother=tr", "mgopt.smoother")])
def test_moved_keys_name_their_new_place(tmp_path, old, new):
    with pytest.raises(ConfigError, match=f"moved to {new}"):
        load_config(None, [old])
    section, rest = old.split(".")
    key, value = rest.split("=")
    f = tmp_path / "old.toml"
    f.write_text(f'[{section}]\n{key} = "{value}"\n' if not value.isdigit() else
                 f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError, match=f"moved to {new}"):
        load_config(f)


def test_every_rule_can_be_broken_and_names_a_key():
    """Each rule of the table fires on some config, and its message names a key of its row."""
    from mltrain.config import RULES

    breaking = {
        0: ["run.steps=0", "run.epochs=0"], 1: ["data.partition=dirichlet", "data.alpha=0"],
        2: ["data.name=idx"], 3: ["parallel.pipe=2", "optim.name=tr"],
        4: ["parallel.pipe=2", "sync.name=sgp"], 5: ["parallel.layer=2", "optim.name=mgopt"],
        6: ["parallel.layer=2", "optim.name=tr", "tr.curvature=hessian"], 7: ["parallel.layer=2", "sync.name=sgp"],
        8: ["optim.lr=1e39"], 9: ["model.init=smooth", "model.name=mlp"],
        10: ["model.depth_penalty=0.1", "model.name=mlp"],
        11: ["multilevel.nested=true"],
        12: ["multilevel.init=nested", "optim.name=tr"],
        13: ["optim.name=tr", "tr.radius=20"], 14: ["optim.name=tr", "sync.name=sgp"],
        15: ["sync.name=sgp", "sync.compression=fp16"],
        16: ["sync.compression=topk", "sync.topk_ratio=0"],
        17: ["sync.name=ps", "multilevel.nested=true", "multilevel.levels=2"],
        18: ["sync.transport=rma"],
        19: ["sync.name=sgp", "checkpoint.resume=true", "checkpoint.dir=x"],
        20: ["checkpoint.every=3"], 21: ["run.amp=bf16", "run.dtype=float64"],
    }
    assert sorted(breaking) == list(range(len(RULES)))
    for i, rule in enumerate(RULES):
        with pytest.raises(ConfigError) as err:
            load_config(None, breaking[i])
        named = [k.strip("`").rstrip("*") for k in rule.keys.split(", ")]
        assert any(k in str(err.value) for k in named), (i, str(err.value))


@pytest.mark.parametrize("sets, match", [
    (["run.amp=bf16", "run.dtype=float64"], "float32 master weights"),
    (["run.amp=bf16", "optim.name=tr"], "trust-region ratios"),
    (["run.amp=bf16", "optim.name=sgd", "multilevel.nested=true", "multilevel.levels=2"],
     "nested iteration"),
    (["run.amp=bf16", "parallel.layer=2"], "MGRIT"),
    (["run.device=tpu"], "run.device"),
])
def test_amp_and_device_refusals_name_the_key(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, sets)
