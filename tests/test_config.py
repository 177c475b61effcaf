import dataclasses
import os

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
def test_every_experiment_loads_validates_and_round_trips(name, tmp_path):
    """Each experiment's config is valid, named after its module, loads the same by name and
    by path, and comes back equal from the config.json a run stores (as `lm train
    RUN/config.json` reads it). Its engine and state are built in test_experiments.py."""
    import json

    from lm.config import to_dict

    cfg = experiment.load(name)
    assert cfg.validate() == cfg and cfg.name == name
    assert experiment.load(f"experiments/{name}.py") == cfg
    (tmp_path / "config.json").write_text(json.dumps(to_dict(cfg)))
    assert experiment.load(str(tmp_path / "config.json")) == cfg


def test_unknown_experiment_lists_available():
    with pytest.raises(ConfigError, match="pretrain_tiny"):
        experiment.load("pretrain_tinyy")


@pytest.mark.parametrize("override", [
    "data.batch_size=0", "model.n_heads=0", "model.d_model=0", "model.n_layers=0", "data.seq_len=0",
    "trainer.log_every=0", "trainer.microbatches=0", "mesh.tensor=0", "trainer.steps=-5", "optim.lr=-1e-3",
    "model.vocab_size=-1", "trainer.eval_every=-1", "mesh.data=-2",
])
def test_zero_or_negative_sizes_are_one_line_errors(override, capsys):
    assert cli_main(["info", "pretrain_tiny", "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lm: error:") and "\n" not in err and override.split("=")[0] in err


def test_batch_that_does_not_divide_the_devices_is_a_clear_error():
    import jax

    from lm.model.sharding import make_mesh
    from lm.train.engine import make_engine

    cfg = apply_overrides(experiment.load("pretrain_tiny"), ["data.batch_size=12"])
    with pytest.raises(ConfigError, match="does not divide over the 8 data-parallel devices"):
        make_engine(cfg, make_mesh(cfg.mesh, jax.devices()))


def test_broken_experiment_files_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("def config(:\n    pass\n")
    assert cli_main(["info", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "syntax error at line 1" in err and "\n" not in err
    failing = tmp_path / "failing.py"
    failing.write_text("import os\nimport not_a_module_anywhere\n")
    assert cli_main(["info", str(failing)]) == 2
    err = capsys.readouterr().err.strip()
    assert "line 2" in err and "not_a_module_anywhere" in err and "\n" not in err


@pytest.mark.parametrize("args", [
    ["sample", "RUN", "--temperature", "-1"], ["sample", "RUN", "--top-p", "0"], ["sample", "RUN", "--top-p", "1.5"],
    ["sample", "RUN", "--max-new", "-3"], ["sample", "RUN", "--num", "0"], ["eval", "RUN", "--limit", "0"],
    ["tokenizer", "train", "--source", "x", "--vocab-size", "0"],
    ["tokenizer", "train", "--source", "x", "--vocab-size", "100", "--sample-mb", "0"],
])
def test_nonsense_values_are_refused_at_parse_time(args, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(args)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_sample_on_a_missing_run_is_a_one_line_error(tmp_path, capsys):
    assert cli_main(["sample", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a run directory" in err and "\n" not in err
    assert not os.path.exists(tmp_path / "nope")


@pytest.mark.parametrize("content,vocab", [("", 300), ("random", 300), ("text", 10)])
def test_tokenizer_training_failures_are_one_line_errors(tmp_path, content, vocab, capsys):
    src = tmp_path / "src.txt"
    if content == "random":
        src.write_bytes(os.urandom(50_000))
    else:
        src.write_text("hello world " * 100 if content == "text" else "")
    assert cli_main(["tokenizer", "train", "--source", str(src), "--vocab-size", str(vocab),
                     "--out", str(tmp_path / "tok")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lm: error:") and "\n" not in err


def test_user_errors_are_one_type_caught_in_one_place(monkeypatch, capsys):
    """Every error a user can fix is a `UserError`, whichever module raises it; the CLI turns
    it into one line and exit code 2 in one place, and keeps the traceback of anything else."""
    import ast
    import glob

    import lm.cli
    from data_pipeline.chat import ChatFormatError
    from data_pipeline.errors import NotFound, UserError
    from data_pipeline.sources import DataError
    from lm.interop.hf import HFFormatError
    from lm.train.rundir import RunDirError

    for cls in (ConfigError, DataError, ChatFormatError, NotFound, RunDirError, HFFormatError):
        assert issubclass(cls, UserError), cls
    assert issubclass(NotFound, FileNotFoundError) and issubclass(DataError, ValueError)

    def missing(args):
        raise NotFound("the thing is missing; make it first")

    monkeypatch.setattr(lm.cli, "cmd_info", missing)
    assert cli_main(["info", "pretrain_tiny"]) == 2
    assert capsys.readouterr().err == "lm: error: the thing is missing; make it first\n"

    def bug(args):
        raise KeyError("a bug")

    monkeypatch.setattr(lm.cli, "cmd_info", bug)
    with pytest.raises(KeyError):  # not a user error: the traceback stays
        cli_main(["info", "pretrain_tiny"])
    assert cli_main(["tokenizer", "train", "--vocab-size", "300"]) == 2  # no --source
    assert "give --source" in capsys.readouterr().err

    # one place: "lm: error:" is printed by a single handler, the one for UserError (and for
    # paths the system refuses: permissions, a read-only or full disk)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tree = ast.parse(open(os.path.join(root, "lm", "cli.py")).read())
    printing = [h for h in ast.walk(tree) if isinstance(h, ast.ExceptHandler) and "lm: error" in ast.unparse(h)]
    assert [ast.unparse(h.type) for h in printing] == ["(UserError, OSError)"]
    assert ast.unparse(tree).count("lm: error") == 1
    # and data_pipeline, which defines it, never imports lm
    for path in glob.glob(os.path.join(root, "data_pipeline", "*.py")):
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not [n for n in names if n == "lm" or n.startswith("lm.")], (path, names)


@pytest.mark.parametrize("override,allowed", [
    ("optim.eps=0", "must be positive"), ("optim.b1=1", "[0, 1)"), ("optim.b2=-0.1", "[0, 1)"),
    ("optim.min_lr_ratio=1.5", "[0, 1]"), ("optim.decay_fraction=-0.1", "[0, 1]"),
    ("optim.weight_decay=-1", "not be negative"), ("optim.muon_momentum=1", "[0, 1)"),
    ("data.prefetch=-1", "not be negative"), ("data.num_workers=-2", "not be negative"),
    ("data.num_shards=-1", "not be negative"), ("data.shuffle_rows=-1", "not be negative"),
    ("data.chunk_tokens=-2", "-1"), ("data.heldout_fraction=-0.1", "[0, 1)"), ("data.heldout_fraction=1", "[0, 1)"),
    ("trainer.eval_batches=0", "must be positive"), ("trainer.checkpoint_keep=0", "at least 1"),
    ("trainer.sample_temperature=-0.5", "not be negative"), ("trainer.checkpoint_minutes=-1", "not be negative"),
    ("data.tokenizer=/nonexistent/tok.model", "does not exist"), ("data.tokenizer=/", "is a directory"),
])
def test_out_of_range_values_are_one_line_errors_naming_key_and_range(override, allowed, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli_main(["train", "experiments/sft_tiny.py", "--run-dir", str(run_dir), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lm: error:") and "\n" not in err, err
    assert override.split("=")[0] in err and allowed in err, err
    assert not run_dir.exists()  # refused before any work


def test_values_at_the_edges_of_their_ranges_are_accepted():
    cfg = apply_overrides(experiment.load("sft_tiny"), [
        "optim.b1=0", "optim.min_lr_ratio=0", "optim.min_lr_ratio=1", "optim.decay_fraction=1", "data.prefetch=0",
        "data.shuffle_rows=0", "data.chunk_tokens=0", "data.chunk_tokens=-1", "data.heldout_fraction=0",
        "trainer.sample_temperature=0", "trainer.checkpoint_keep=1"])
    assert cfg.data.chunk_tokens == -1 and cfg.optim.min_lr_ratio == 1


@pytest.mark.parametrize("key,value,allowed", [
    ("weight", -1, "must be positive"), ("weight", 0, "must be positive"),
    ("heldout_fraction", 1, "[0, 1)"), ("heldout_fraction", -0.2, "[0, 1)"),
])
def test_source_weight_and_heldout_fraction_are_checked(key, value, allowed):
    from lm.config import DataConfig, SourceConfig

    cfg = dataclasses.replace(Config(), data=DataConfig(corpus="sources", sources=(
        SourceConfig(name="a", paths=("a.txt",)), SourceConfig(name="b", paths=("b.txt",)))))
    with pytest.raises(ConfigError) as e:
        apply_overrides(cfg, [f"data.sources.b.{key}={value}"])
    assert f"data.sources.b.{key}" in str(e.value) and allowed in str(e.value)


def _json_config(tmp_path, edit=None, text=None):
    import json

    from lm.config import DataConfig, SourceConfig, to_dict

    d = json.loads(json.dumps(to_dict(dataclasses.replace(Config(), data=DataConfig(
        corpus="sources", sources=(SourceConfig(name="wiki", paths=("a.txt",)),))))))
    if edit:
        edit(d)
    path = tmp_path / "cfg.json"
    path.write_text(text if text is not None else json.dumps(d))
    return str(path)


@pytest.mark.parametrize("edit,text,expected", [
    (lambda d: d["trainer"].update(stepz=2), None, ["'trainer.stepz'", "did you mean 'trainer.steps'"]),
    (lambda d: d["data"]["sources"][0].update(pathz=["x"]), None,
     ["'data.sources.wiki.pathz'", "did you mean 'data.sources.wiki.paths'"]),
    (lambda d: d.update(modle=d.pop("model")), None, ["unknown config section 'modle'", "did you mean 'model'"]),
    (lambda d: d.update(lr=1e-3), None, ["'lr'", "did you mean 'optim.lr'"]),
    (lambda d: d["trainer"].update(steps="2"), None, ["trainer.steps='2'", "expected an integer, got a string"]),
    (lambda d: d["optim"].update(lr="fast"), None, ["optim.lr='fast'", "expected a number"]),
    (lambda d: d["model"].update(remat="some"), None, ["model.remat='some'", "one of 'none'"]),
    (lambda d: d["data"]["sources"][0].update(paths="a.txt"), None, ["data.sources.wiki.paths", "a list of strings"]),
    (lambda d: d["data"]["sources"][0].pop("name"), None, ["'data.sources[0]'", "'name'"]),
    (lambda d: d.update(model="tiny"), None, ["'model' must be an object", "got a string"]),
    (None, "[1, 2]", ["the config must be an object", "got a list"]),
    (None, '{"name": "x", "optim": {"lr": 0.1', ["not valid JSON", "line 1"]),
    (None, '{"optim": {"lr": NaN}}', ["NaN"]),
    (lambda d: d["optim"].update(eps=0), None, ["optim.eps=0.0 must be positive"]),
])
def test_json_config_is_checked_like_overrides(tmp_path, capsys, edit, text, expected):
    path = _json_config(tmp_path, edit, text)
    run_dir = tmp_path / "run"
    assert cli_main(["train", path, "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lm: error: {path}") and "\n" not in err, err
    for part in expected:
        assert part in err, err
    assert not run_dir.exists()


def test_json_config_round_trips_and_takes_overrides(tmp_path):
    from lm.config import from_dict, to_dict

    path = _json_config(tmp_path)
    cfg = experiment.load(path, ["trainer.steps=3", "data.sources.wiki.weight=2"])
    assert cfg.trainer.steps == 3 and cfg.data.sources[0].weight == 2.0 and cfg.data.sources[0].paths == ("a.txt",)
    for name in ("pretrain_tiny", "sft_mixture", "pretrain_mixture"):  # every field type survives config.json
        original = experiment.load(name)
        assert from_dict(to_dict(original)) == original
