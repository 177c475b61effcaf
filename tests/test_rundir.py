"""Never lose a run: refusing incompatible configs instead of starting over, --fresh that
checks before it deletes, one process per run directory, results kept and strict JSON."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from lm.config import Config, DataConfig, ModelConfig, OptimConfig, SourceConfig, TrainerConfig
from lm.train.rundir import RunDirError, RunLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(steps=6, **model) -> Config:
    """A one-layer model on synthetic data. Its vocabulary fits a SentencePiece tokenizer, so a
    run on text (test_a_run_given_a_tokenizer_keeps_a_checked_copy) compiles the same programs."""
    m = dict(vocab_size=300, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=16)
    m.update(model)
    return Config(name="guard", model=ModelConfig(**m), optim=OptimConfig(lr=1e-3, warmup_steps=1),
                  data=DataConfig(corpus="synthetic", seq_len=16, batch_size=8),
                  trainer=TrainerConfig(steps=steps, log_every=1, checkpoint_every=2, eval_batches=1, num_samples=0))


def _train(cfg, run, **kw):
    from lm.stages.runner import train

    logs = []
    summary = train(cfg, str(run), log=logs.append, progress=False, **kw)
    return summary, "\n".join(map(str, logs))


def _snapshot(run):
    """Every file of a run directory with its size and modification time."""
    out = {}
    for dirpath, _, files in os.walk(run):
        for f in files:
            p = os.path.join(dirpath, f)
            if f != ".lock":
                st = os.stat(p)
                out[os.path.relpath(p, run)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished run of tiny(), trained once for the module; tests use copies of it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    _train(tiny(), run)
    return run


@pytest.fixture
def finished(trained, tmp_path):
    """A copy of the finished run, this test's to change."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


def test_another_model_shape_is_refused_and_nothing_changes(finished):
    before = _snapshot(finished)
    with pytest.raises(RunDirError) as e:
        _train(tiny(d_model=64, d_ff=128), finished)
    msg = str(e.value)
    assert "model.d_model: 32 -> 64" in msg and "--fresh" in msg and "--run-dir" in msg and "\n" not in msg
    assert _snapshot(finished) == before  # no checkpoint deleted, no metric truncated, config kept


def test_settings_that_keep_the_shapes_continue_and_say_so(finished):
    cfg = tiny(steps=8)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=5e-4))
    summary, logs = _train(cfg, finished)
    assert "continuing" in logs and "optim.lr: 0.001 -> 0.0005" in logs and "trainer.steps: 6 -> 8" in logs
    assert "resumed from the checkpoint of step 6" in logs and summary["steps"] == 8


def test_unreadable_checkpoints_are_refused_not_replaced(finished):
    for step in os.listdir(finished / "checkpoints"):
        for dirpath, _, files in os.walk(finished / "checkpoints" / step / "state"):
            for f in files:
                with open(os.path.join(dirpath, f), "r+b") as fh:
                    fh.truncate(os.path.getsize(os.path.join(dirpath, f)) // 3)
    before = _snapshot(finished)
    with pytest.raises(RunDirError, match="no checkpoint of .* restores"):
        _train(tiny(), finished)
    assert _snapshot(finished) == before


def test_a_finished_run_without_checkpoints_is_refused(finished):
    shutil.rmtree(finished / "checkpoints")
    before = _snapshot(finished)
    with pytest.raises(RunDirError, match="finished run whose checkpoints are gone"):
        _train(tiny(), finished)
    assert _snapshot(finished) == before


def test_fresh_checks_before_it_deletes(finished, tmp_path):
    before = _snapshot(finished)
    bad = dataclasses.replace(tiny(), data=DataConfig(corpus="sources", seq_len=16, batch_size=8, sources=(
        SourceConfig(name="gone", kind="jsonl", paths=(str(tmp_path / "missing*.jsonl"),)),)))
    with pytest.raises(Exception, match="gone"):
        _train(bad, finished, resume=False)
    assert _snapshot(finished) == before  # the old run is back, untouched
    summary, logs = _train(tiny(d_model=64, d_ff=128), finished, resume=False)
    assert "resumed" not in logs and summary["steps"] == 6
    rows = [json.loads(line) for line in open(finished / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 7))  # only the new run's metrics
    assert json.load(open(finished / "config.json"))["model"]["d_model"] == 64
    assert not [n for n in os.listdir(finished) if n.startswith(".replaced")]


def test_a_second_process_on_the_run_directory_is_refused(tmp_path):
    run = tmp_path / "run"
    with RunLock(str(run)):
        with pytest.raises(RunDirError, match=f"in use by pid {os.getpid()}"):
            _train(tiny(), run)
    assert not os.path.exists(run / "metrics.jsonl")
    # a killed holder leaves no stale lock: the kernel releases it with the process
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, %r)\n"
        "from lm.train.rundir import RunLock\n"
        "with RunLock(%r):\n    print('locked', flush=True); time.sleep(60)\n") % (ROOT, str(run))],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirError, match=f"in use by pid {holder.pid}"):
        _train(tiny(), run)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    time.sleep(0.1)
    summary, _ = _train(tiny(), run)
    assert summary["steps"] == 6


def test_rerunning_a_finished_run_keeps_its_figures_in_strict_json(finished):
    first = json.load(open(finished / "summary.json"))
    summary, logs = _train(tiny(), finished)
    assert "already complete" in logs
    text = open(finished / "summary.json").read()
    again = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert again["final_train_loss"] == first["final_train_loss"] and again["tokens_per_s"] == first["tokens_per_s"]
    assert again["heldout_loss"] == pytest.approx(first["heldout_loss"], rel=1e-6)


def test_eval_results_of_other_tasks_are_kept(finished):
    from lm.stages.runner import evaluate_run

    with open(finished / "eval.json", "w") as f:
        json.dump({"hellaswag": {"acc": 0.25, "step": 6}}, f)
    evaluate_run(str(finished), ["heldout"], log=lambda *_: None)
    kept = json.load(open(finished / "eval.json"))
    assert kept["hellaswag"] == {"acc": 0.25, "step": 6} and kept["heldout"]["step"] == 6


def test_run_dir_that_is_a_file_is_a_one_line_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        _train(tiny(), f)


def test_export_and_import_refuse_to_overwrite_without_force(finished, tmp_path, capsys):
    from lm.cli import main

    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    (out / "notes.txt").write_text("keep me")
    assert main(["export-hf", str(finished), str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and json.load(open(out / "config.json")) == {"mine": True}
    assert main(["export-hf", str(finished), str(out), "--force"]) == 0
    assert json.load(open(out / "config.json"))["model_type"] == "llama"
    assert (out / "notes.txt").read_text() == "keep me"  # only the export's files are replaced
    before = _snapshot(finished)
    assert main(["import-hf", str(out), str(finished)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert _snapshot(finished) == before
    assert main(["import-hf", str(out), str(finished), "--force"]) == 0
    assert sorted(os.listdir(finished / "checkpoints")) == ["0"]


@pytest.mark.parametrize("content", ["missing_field", "random_bytes", "huge_line"])
def test_a_source_with_no_usable_record_fails_fast_naming_it(tmp_path, content):
    import threading

    from data_pipeline.pipeline import DataError, text_data
    from data_pipeline.tokenizer import train_tokenizer

    path = tmp_path / "bad.jsonl"
    if content == "missing_field":
        path.write_text("".join(json.dumps({"body": f"text {i}"}) + "\n" for i in range(500)))
    elif content == "random_bytes":
        path.write_bytes(os.urandom(200_000))
    else:
        path.write_text("x" * 3_000_000)  # one huge non-JSON line
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"the quick brown fox {i}"}) + "\n" for i in range(200)))
    tok = train_tokenizer([f"the quick brown fox {i} jumps" for i in range(300)], 300, str(tmp_path / "sp"))
    data = DataConfig(corpus="sources", seq_len=16, batch_size=8, tokenizer=tok.path, sources=(
        SourceConfig(name="good", kind="jsonl", paths=(str(good),)),
        SourceConfig(name="broken", kind="jsonl", paths=(str(path),))))
    out = {}

    def attempt():
        try:
            text_data(data, str(tmp_path / "run"), vocab_size=300, process_index=0, process_count=1,
                    log=lambda *_: None).next_train()
        except DataError as e:
            out["error"] = str(e)

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the pipeline hangs on a source with nothing usable"
    assert "source 'broken'" in out.get("error", "") and "check its paths" in out["error"]


def test_an_unreadable_final_checkpoint_is_moved_aside_and_redone(finished):
    state = finished / "checkpoints" / "6" / "state"
    for dirpath, _, files in os.walk(state):
        for f in files:
            with open(os.path.join(dirpath, f), "r+b") as fh:
                fh.truncate(os.path.getsize(os.path.join(dirpath, f)) // 3)
    summary, logs = _train(tiny(), finished)
    assert "resumed from the checkpoint of step 4" in logs and "moved the unreadable checkpoint of step 6" in logs
    assert summary["stopped"] is None and summary["steps"] == 6
    names = os.listdir(finished / "checkpoints")
    assert "6" in names and any(n.startswith(".unreadable-6-") for n in names)


def test_a_run_whose_final_checkpoint_fails_to_save_says_so(tmp_path, monkeypatch):
    from lm.train.checkpoint import Checkpointer

    real = Checkpointer.save

    def failing(self, step, *a, **kw):
        if step == 6:
            self.log(f"WARNING: saving the checkpoint of step {step} failed (OSError: No space left on device)")
            return False
        return real(self, step, *a, **kw)

    monkeypatch.setattr(Checkpointer, "save", failing)
    summary, logs = _train(tiny(), tmp_path / "run")
    assert "final checkpoint (step 6) was not saved" in summary["stopped"]


def test_a_run_given_a_tokenizer_keeps_a_checked_copy(tmp_path, capsys):
    """data.tokenizer=PATH: the run directory keeps its own copy, and sampling from the run
    refuses a tokenizer.model that is not the one its checkpoint was trained with."""
    from data_pipeline.tokenizer import train_tokenizer
    from lm.cli import main

    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    texts = [" ".join(words[(i + j) % 8] for j in range(12)) for i in range(200)]
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = train_tokenizer(texts, 300, str(tmp_path / "sp"))
    cfg = dataclasses.replace(tiny(), data=DataConfig(
        corpus="sources", seq_len=16, batch_size=8, tokenizer=tok.path,
        sources=(SourceConfig(name="a", kind="jsonl", paths=(str(src),)),)))
    run = tmp_path / "run"
    _train(cfg, run)
    assert open(run / "tokenizer.model", "rb").read() == open(tok.path, "rb").read()
    assert main(["sample", str(run), "--prompt", "alpha", "--max-new", "4"]) == 0
    other = train_tokenizer(texts[::-1] + ["omega " * 5], 300, str(tmp_path / "other"))
    (run / "tokenizer.model").write_bytes(open(other.path, "rb").read())
    assert main(["sample", str(run), "--prompt", "alpha", "--max-new", "4"]) == 2
    assert "not the tokenizer the checkpoint" in capsys.readouterr().err


def test_corrupted_bytes_inside_a_checkpoint_are_caught_by_checksums(finished):
    import numpy as np

    state = finished / "checkpoints" / "6" / "state"
    rng = np.random.default_rng(0)
    for f in [p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"]:
        # 1,000 random bytes in the middle of every array-data file
        raw = bytearray(f.read_bytes())
        if len(raw) > 4000:
            mid = len(raw) // 2
            raw[mid: mid + 1000] = rng.integers(0, 256, 1000, dtype=np.uint8).tobytes()
            f.write_bytes(bytes(raw))
    summary, logs = _train(tiny(steps=8), finished)
    assert "checkpoints/6 cannot be restored" in logs, logs
    assert "resumed from the checkpoint of step 4" in logs and summary["steps"] == 8


def test_checksums_detect_a_changed_array_and_nan_states_are_not_saved(tmp_path):
    import jax.numpy as jnp

    from lm.train.checkpoint import Checkpointer, fingerprint, verify

    state = {"w": jnp.arange(12.0).reshape(3, 4), "n": jnp.int32(3)}
    sums, finite = fingerprint(state)
    assert finite
    verify(state, {"checksums": sums}, 1)
    swapped = {"w": state["w"][::-1], "n": state["n"]}  # same values, other places
    with pytest.raises(ValueError, match="checksum mismatch in w"):
        verify(swapped, {"checksums": sums}, 1)
    ck = Checkpointer(str(tmp_path), log=lambda *_: None)
    assert not ck.save(1, {"w": state["w"].at[0, 0].set(jnp.nan)}, None, {})
    assert ck.save(2, state, None, {})
    ck.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    from lm.tools.hf_runs import export_run

    return export_run(str(trained), str(tmp_path_factory.mktemp("exported") / "hf"), log=lambda *_: None)


@pytest.mark.parametrize("damage", ["no_config", "bad_json", "missing_key", "missing_layer", "extra_layer",
                                    "truncated", "random_bytes"])
def test_malformed_hugging_face_folders_are_one_line_errors(exported, tmp_path, damage, capsys):
    from lm.cli import main
    from lm.interop.hf import load_safetensors, save_safetensors

    hf = tmp_path / "hf"
    shutil.copytree(exported, hf)
    weights, config = hf / "model.safetensors", hf / "config.json"
    if damage == "no_config":
        config.unlink()
    elif damage == "bad_json":
        config.write_text("{not json")
    elif damage == "missing_key":
        c = json.loads(config.read_text())
        del c["hidden_size"]
        config.write_text(json.dumps(c))
    elif damage in ("missing_layer", "extra_layer"):
        t = load_safetensors(str(weights))
        if damage == "missing_layer":
            t = {k: v for k, v in t.items() if not k.startswith("model.layers.0.")}
        else:
            t.update({k.replace("layers.0.", "layers.7."): v for k, v in t.items() if "layers.0." in k})
        save_safetensors(t, str(weights))
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        weights.write_bytes(os.urandom(weights.stat().st_size))
    assert main(["import-hf", str(hf), str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lm: error:") and "\n" not in err and "Traceback" not in err


def test_a_failed_save_is_reported_once_and_the_next_one_still_happens(tmp_path):
    import jax.numpy as jnp

    from lm.train.checkpoint import Checkpointer

    logs = []
    ck = Checkpointer(str(tmp_path), keep=5, log=logs.append)
    real = ck.manager.save

    def disk_full_at_step_2(step, *a, **kw):
        if step == 2:
            os.makedirs(os.path.join(ck.dir, "2.orbax-checkpoint-tmp-123"), exist_ok=True)  # what a failed save leaves
            raise OSError(28, "No space left on device")
        return real(step, *a, **kw)

    ck.manager.save = disk_full_at_step_2
    state = {"w": jnp.ones(3)}
    assert ck.save(1, state, None, {}) and not ck.save(2, state, None, {}) and ck.save(3, state, None, {})
    ck.close()
    warnings = [m for m in logs if "WARNING" in m]
    assert len(warnings) == 1 and "step 2" in warnings[0] and "No space left" in warnings[0]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "3"]  # the partial folder is gone
