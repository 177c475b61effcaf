import dataclasses

import pytest

from lm import experiment
from lm.cli import main as cli_main
from lm.config import Config, ConfigError, apply_overrides


def test_override_applies_and_converts_types():
    cfg = apply_overrides(Config(), ["optim.lr=3e-4", "model.n_layers=2", "model.qk_norm=true",
                                     "model.head_dim=None", "optim.schedule=wsd", "trainer.steps=5"])
    assert cfg.optim.lr == 3e-4 and cfg.model.n_layers == 2 and cfg.model.qk_norm is True
    assert cfg.model.head_dim is None and cfg.optim.schedule == "wsd" and cfg.trainer.steps == 5
    # ints are accepted where floats are expected
    assert apply_overrides(Config(), {"optim.lr": 1}).optim.lr == 1.0


@pytest.mark.parametrize("key,suggestion", [
    ("optim.lrr", "optim.lr"),
    ("model.n_layer", "model.n_layers"),
    ("trainer.step", "trainer.steps"),
    ("lr", "optim.lr"),
])
def test_mistyped_key_names_nearest_valid_key(key, suggestion):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), [f"{key}=1"])
    assert repr(suggestion) in str(e.value) and repr(key) in str(e.value)


@pytest.mark.parametrize("item,expected", [
    ("optim.lr=fast", "expected float"),
    ("model.n_layers=2.5", "expected int"),
    ("model.qk_norm=3", "expected bool"),
    ("optim.schedule=linear", "one of 'cosine', 'wsd', 'constant'"),
    ("model.d_model", "expected KEY=VALUE"),
])
def test_wrong_type_is_refused_with_key_and_type(item, expected):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), [item])
    assert expected in str(e.value)
    assert item.split("=")[0] in str(e.value)


def test_inconsistent_config_is_refused():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        apply_overrides(Config(), ["model.n_kv_heads=3"])


def test_cli_reports_bad_override_before_any_work(capsys):
    assert cli_main(["train", "experiments/pretrain_tiny.py", "--set", "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'optim.lr'" in err


@pytest.mark.parametrize("name", experiment.list_experiments())
def test_every_experiment_builds(name):
    cfg = experiment.load(name)
    assert isinstance(cfg, Config) and dataclasses.is_dataclass(cfg)
    cfg.validate()
    # the path form loads the same config
    assert experiment.load(f"experiments/{name}.py") == cfg


def test_unknown_experiment_lists_available():
    with pytest.raises(ConfigError, match="pretrain_tiny"):
        experiment.load("pretrain_tinyy")
