"""SFT on the one engine: packed = unpacked loss, zero gradient on masked tokens, starting
from another run's parameters only, a run that learns, chat with the template, LoRA, and
exact resume after SIGKILL."""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from helpers import WORDS, cpu_env, sft_config, train_cmd  # noqa: E402

from lm.config import LoraConfig  # noqa: E402


def _engine_and_batch(base, cfg=None):
    from data_pipeline.pipeline import global_batch
    from lm.model.sharding import make_mesh
    from lm.stages import sft
    from lm.train.engine import make_engine

    cfg = cfg or sft_config(base)
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=1))
    engine = make_engine(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    data = sft.open_data(cfg, str(base["dir"] / "scratch"), log=lambda *_: None)
    local = data.next_train()
    return engine, data, local, global_batch({k: local[k] for k in engine.objective.batch_axes}, engine.batch_sharding)


def test_packed_sft_loss_equals_unpacked(base_run):
    """The loss of a packed batch equals the loss of its conversations each in a row of its own."""
    engine, _, local, batch = _engine_and_batch(base_run)
    state, _ = engine.init_state(0)
    _, aux = engine.loss_fn(state.params, batch)
    packed_sum = float(aux["loss"] * aux["weight"])
    rows, shared = [], 0
    for r in range(local["inputs"].shape[0]):
        seg = local["segment_ids"][r]
        shared += len(set(seg[seg > 0].tolist())) >= 2
        for s in sorted(set(seg[seg > 0].tolist())):
            idx = np.flatnonzero(seg == s)
            row = {k: np.zeros_like(local[k][r]) for k in engine.objective.batch_axes}
            for k in row:
                row[k][: len(idx)] = local[k][r][idx]
            row["segment_ids"][: len(idx)] = 1
            assert row["positions"][0] == 0  # positions restart in every conversation
            rows.append(row)
    assert shared and len(rows) > local["inputs"].shape[0]  # rows that pack several conversations
    total, count = 0.0, 0.0
    for i in range(0, len(rows), 8):
        chunk = rows[i: i + 8]
        chunk += [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (8 - len(chunk))
        b = {k: jnp.asarray(np.stack([c[k] for c in chunk])) for k in rows[0]}
        _, a = engine.loss_fn(state.params, b)
        total += float(a["loss"] * a["weight"])
        count += float(a["weight"])
    assert count == float(aux["weight"])  # the same assistant tokens are counted
    np.testing.assert_allclose(packed_sum, total, rtol=2e-5)


def test_masked_tokens_get_exactly_zero_gradient(base_run):
    """The gradient of the SFT loss reaches the logits of assistant targets only, and
    changing a non-assistant target token leaves the loss bit-identical."""
    engine, _, local, batch = _engine_and_batch(base_run)
    state, _ = engine.init_state(0)
    model = engine.model(state.params)
    from lm.objectives.losses import cross_entropy

    b, t = batch["inputs"].shape
    h = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
    logits = model.logits(h)
    mask = batch["loss_mask"].reshape(-1)
    g = jax.grad(lambda lg: cross_entropy(lg, batch["targets"].reshape(-1), mask, 0.0)[0])(logits)
    g = np.asarray(g)
    off = np.asarray(mask) == 0
    assert off.sum() > 0 and (~off).sum() > 0
    assert np.all(g[off] == 0.0)
    assert np.abs(g[~off]).sum(axis=-1).min() > 0
    # the user/system/template tokens as targets do not matter
    targets = np.array(local["targets"])
    targets[local["loss_mask"] == 0] = 7
    changed = dict(batch, targets=jnp.asarray(targets))
    assert float(engine.loss_fn(state.params, batch)[0]) == float(engine.loss_fn(state.params, changed)[0])


def test_init_from_reads_parameters_only(base_run, tmp_path):
    """Starting from a run reads its parameters, from its newest or a named checkpoint, onto
    this run's layout; another model shape is refused before any work."""
    import shutil

    from lm.model.sharding import make_mesh
    from lm.train.checkpoint import Checkpointer
    from lm.train.engine import make_engine
    from lm.train.init import load_params
    from lm.train.run import load_run

    src = tmp_path / "src"
    shutil.copytree(base_run["run"], src)
    cfg = sft_config(base_run, init_from=str(src))
    engine = make_engine(cfg, make_mesh(dataclasses.replace(cfg.mesh, data=1), jax.devices()[:1]))
    params, step = load_params(str(src), engine.abstract_params(), log=lambda *_: None)
    assert step == 20
    ref = load_run(base_run["run"], log=lambda *_: None)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a named step
    _, step10 = load_params(str(src), engine.abstract_params(), step=10, log=lambda *_: None)
    assert step10 == 10
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 7"):
        load_params(str(src), engine.abstract_params(), step=7, log=lambda *_: None)
    # another shape: a clear error before any work
    from lm.config import ConfigError
    from lm.train.init import check_model_matches

    bad = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=32))
    with pytest.raises(ConfigError, match="another model shape.*d_model"):
        check_model_matches(bad, str(src))
    ckpt = Checkpointer(base_run["run"])
    ckpt.close()


def test_sft_run_learns_records_origin_and_resumes_itself(base_run, sft_run, tmp_path):
    import shutil

    from lm.stages.runner import train

    summary, text = sft_run["summary"], sft_run["logs"]
    assert summary["base_heldout_loss"] > summary["heldout_loss"] + 0.5, text
    assert "before SFT" in text and "parameters from" in text
    assert summary["init_from"]["path"] == base_run["run"]
    assert os.path.exists(os.path.join(sft_run["run"], "tokenizer.model"))
    # a second run of the same command resumes the SFT run itself (not the base again); on a
    # copy: other tests read the shared run
    run = str(tmp_path / "sft")
    shutil.copytree(sft_run["run"], run)
    logs2 = []
    summary2 = train(sft_config(base_run, steps=60, eval_every=30), run, log=logs2.append, progress=False)
    assert any("already complete" in str(m) for m in logs2)
    assert any("resumed from the checkpoint of step 60" in str(m) for m in logs2)
    assert summary2["init_from"]["path"] == base_run["run"]
    assert summary2["heldout_loss"] == pytest.approx(summary["heldout_loss"], rel=1e-6)


def test_chat_with_the_template_keeps_history_within_the_context(base_run, sft_run):
    from lm.serve.chat import Chat, is_chat_model
    from lm.train.run import load_run

    loaded = load_run(sft_run["run"], log=lambda *_: None)
    assert is_chat_model(loaded)
    assert not is_chat_model(load_run(base_run["run"], log=lambda *_: None))
    chat = Chat(loaded, max_new=12, temperature=0.0)
    reply = chat.reply("reverse: quick fox")
    assert chat.history == [{"role": "user", "content": "reverse: quick fox"}, {"role": "assistant", "content": reply}]
    assert reply == Chat(loaded, max_new=12, temperature=0.0).reply("reverse: quick fox")  # greedy: the same again
    # the context is 64 tokens: long exchanges push the oldest ones out of the prompt
    for _ in range(4):
        chat.reply("reverse: " + " ".join(WORDS[:6]))
    ids = chat.prompt_ids("reverse: dog")
    assert len(ids) <= loaded.cfg.model.max_seq_len - chat.max_new and chat.dropped > 0
    assert ids[0] == loaded.tokenizer.bos_id  # trimmed by whole exchanges, never mid-template
    chat.reset()
    assert chat.history == [] and chat.dropped == 0


def test_a_warmed_up_chat_compiles_nothing_in_its_turns(sft_run):
    """`lm chat` compiles every program of a conversation ahead (Chat.warm_up, while the first
    message is typed): turns of growing length then run only programs already compiled (they
    once stalled seconds to compile a new prompt width and cache length)."""
    from lm.sampling import sampler
    from lm.serve.chat import Chat
    from lm.train.run import load_run

    loaded = load_run(sft_run["run"], log=lambda *_: None)
    chat = Chat(loaded, max_new=10, temperature=0.7, seed=1)
    assert chat.warm_up() >= 4
    sizes = sampler._prefill_jit._cache_size(), sampler._step_jit._cache_size()
    for words in (2, 5, 9, 3, 12):
        chat.reply("reverse: " + " ".join(WORDS[:words]))
    assert (sampler._prefill_jit._cache_size(), sampler._step_jit._cache_size()) == sizes


def test_cli_chat_and_sample(base_run, sft_run, monkeypatch, capsys):
    from lm.cli import main

    lines = iter(["reverse: lazy dog", "/reset", "reverse: hex", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", sft_run["run"], "--temperature", "0", "--max-new", "12", "--system", "You reverse."]) == 0
    out = capsys.readouterr().out
    assert "chatting with" in out and "system prompt 'You reverse.'" in out and "(history cleared)" in out
    lines = iter(["the quick", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", base_run["run"], "--max-new", "4"]) == 0
    assert "is a base model" in capsys.readouterr().out
    assert main(["sample", base_run["run"], "--chat", "hi"]) == 2
    assert "base model" in capsys.readouterr().err
    assert main(["sample", sft_run["run"], "--chat", "reverse: fox dog", "--temperature", "0", "--max-new", "8"]) == 0


@pytest.mark.slow  # make test-all / CI's slow phase
def test_chat_with_a_draft_gives_the_same_greedy_replies_and_counts_what_it_accepts(base_run, sft_run, monkeypatch,
                                                                                     capsys):
    """`lm chat --draft`: each reply decoded speculatively (the base run, same tokenizer,
    drafting for the fine-tuned one) equals the reply decoded alone, turn after turn."""
    from lm.cli import main
    from lm.sampling import decode, speculative
    from lm.serve.chat import Chat
    from lm.train.run import load_run

    loaded = load_run(sft_run["run"], log=lambda *_: None)
    base = load_run(base_run["run"], log=lambda *_: None)
    draft = decode.prepare(base.graphdef, base.params)
    alone = Chat(loaded, max_new=10, temperature=0.0)
    drafted = Chat(loaded, max_new=10, temperature=0.0, draft=draft, draft_k=3)
    assert drafted.warm_up() >= 2  # every prompt width's program, compiled ahead (lm chat: while the user types)
    programs = speculative._speculate._cache_size()
    shown = []
    for words in (2, 5):
        message = "reverse: " + " ".join(WORDS[:words])
        assert drafted.reply(message, on_text=shown.append) == alone.reply(message)
        assert drafted.ended == alone.ended
    assert shown == [m["content"] for m in alone.history if m["role"] == "assistant"]  # each reply shown whole
    assert drafted.history == alone.history
    assert speculative._speculate._cache_size() == programs  # no turn compiled anything
    assert 0 < drafted.drafted and 0 <= drafted.accepted <= drafted.drafted
    lines = iter(["reverse: lazy dog", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", sft_run["run"], "--temperature", "0", "--max-new", "8", "--draft", base_run["run"],
                 "--draft-k", "2"]) == 0
    captured = capsys.readouterr()
    assert "drafted tokens accepted" in captured.err, captured
    assert main(["chat", sft_run["run"], "--draft", base_run["run"], "--quantize", "int8"]) == 2
    assert "drop --tensor and --quantize" in capsys.readouterr().err


def test_eval_reports_assistant_token_loss(sft_run):
    from lm.stages.runner import evaluate_run

    r = evaluate_run(sft_run["run"], ["heldout"], log=lambda *_: None)
    assert r["heldout"]["tokens"] == "assistant"
    assert r["heldout"]["eval_loss"] == pytest.approx(sft_run["summary"]["heldout_loss"], rel=1e-4)


def test_init_from_a_hugging_face_folder(base_run, tmp_path):
    from lm.model.sharding import make_mesh
    from lm.tools.hf_runs import export_run
    from lm.train.engine import make_engine
    from lm.train.init import load_params
    from lm.train.run import load_run

    hf = export_run(base_run["run"], str(tmp_path / "hf"), log=lambda *_: None)
    cfg = sft_config(base_run, init_from=hf)
    engine = make_engine(cfg, make_mesh(dataclasses.replace(cfg.mesh, data=1), jax.devices()[:1]))
    params, step = load_params(hf, engine.abstract_params())
    assert step is None
    ref = load_run(base_run["run"], log=lambda *_: None).params
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # make test time; CI's slow phase runs it
def test_lora_trains_only_adapters_and_merges(base_run, tmp_path):
    from lm.model import lora
    from lm.model.sharding import make_mesh
    from lm.stages.runner import train
    from lm.train.checkpoint import Checkpointer
    from lm.train.engine import make_engine
    from lm.train.run import load_run

    cfg = dataclasses.replace(sft_config(base_run, steps=12, eval_every=6, checkpoint_every=6),
                              lora=LoraConfig(rank=4, alpha=8.0))
    run = tmp_path / "lora"
    summary = train(cfg, str(run), log=lambda *_: None, progress=False)
    assert summary["heldout_loss"] < summary["base_heldout_loss"]
    engine = make_engine(cfg, make_mesh(dataclasses.replace(cfg.mesh, data=1), jax.devices()[:1]))
    state = engine.abstract_state()
    n_adapters = lora.count(state.params)
    moments = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert moments == 2 * n_adapters  # AdamW's two moments, of the adapters only
    ck = Checkpointer(str(run))
    restored = ck.restore_latest(engine.abstract_state())
    ck.close()
    assert set(restored[0].params) == set(cfg.lora.targets)  # the checkpoint holds adapters
    # the merged model differs from the base (the adapters were trained) and equals base+adapters
    merged = load_run(str(run), log=lambda *_: None)
    base = load_run(base_run["run"], log=lambda *_: None)
    x = jnp.asarray(np.arange(16).reshape(1, 16) % 300 + 4)
    assert not np.allclose(merged.model()(x), base.model()(x), atol=1e-4)
    frozen = {"base": jax.device_put(base.params, engine.param_sharding)}
    unmerged = engine.model(engine.model_params(restored[0].params, frozen))(x)
    np.testing.assert_allclose(np.asarray(merged.model()(x)), np.asarray(unmerged), atol=1e-5)


@pytest.mark.slow
def test_a_run_keeps_the_base_step_it_started_from(base_run, tmp_path):
    """A base run trained further after a LoRA run started from it changes nothing for that
    run: its merged model, and its resumption, read the base step it recorded; a recorded
    step that is gone from the base is a one-line error, not a silent switch."""
    import shutil

    from lm.config import ConfigError
    from lm.stages.runner import train
    from lm.train.init import PIN_FILE
    from lm.train.run import load_run

    base = tmp_path / "base"
    shutil.copytree(base_run["run"], base)
    quiet = lambda *_: None  # noqa: E731
    cfg = dataclasses.replace(sft_config({**base_run, "run": str(base)}, steps=4, eval_every=4, checkpoint_every=2),
                              lora=LoraConfig(rank=4, alpha=8.0))
    run = tmp_path / "lora"
    train(cfg, str(run), log=quiet, progress=False)
    assert json.loads((run / PIN_FILE).read_text()) == {"path": str(base), "step": 20}
    x = jnp.asarray(np.arange(16).reshape(1, 16) % 300 + 4)
    before = np.asarray(load_run(str(run), log=quiet).model()(x))
    # the base trains on (steps 20 -> 30): the LoRA run still merges onto step 20
    train(dataclasses.replace(base_run["cfg"], trainer=dataclasses.replace(base_run["cfg"].trainer, steps=30)),
          str(base), log=quiet, progress=False)
    np.testing.assert_array_equal(np.asarray(load_run(str(run), log=quiet).model()(x)), before)
    lines = []
    train(dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, steps=6)), str(run), log=lines.append,
          progress=False)
    assert any("(step 20, the step this run started from)" in str(m) for m in lines), lines
    shutil.rmtree(base / "checkpoints" / "20")
    with pytest.raises(ConfigError, match="started from step 20"):
        load_run(str(run), log=quiet)


SFT_EXPERIMENT = """
import sys
sys.path.insert(0, {tests!r})
from helpers import sft_config
from lm import experiment

def config():
    base = {{"run": {run!r}, "chat": {chat!r}, "cfg": experiment.load({exp!r})}}
    return sft_config(base, steps=16, log_every=1, checkpoint_every=2, eval_every=8)
"""


@pytest.mark.slow
def test_sigkill_during_sft_then_resume_gives_identical_losses(base_run, tmp_path):
    exp = tmp_path / "sft_exp.py"
    exp.write_text(SFT_EXPERIMENT.format(tests=os.path.dirname(os.path.abspath(__file__)), run=base_run["run"],
                                         chat=base_run["chat"], exp=base_run["exp"]))

    def losses(run):
        rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
        return [r["step"] for r in rows], [r["loss"] for r in rows]

    ref = tmp_path / "ref"
    p = subprocess.run(train_cmd(str(exp), ref), cwd=ROOT, env=cpu_env(1), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(str(exp), run), cwd=ROOT, env=cpu_env(1), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    import time

    t0 = time.time()
    path = run / "metrics.jsonl"
    while time.time() - t0 < 240 and proc.poll() is None:
        if path.exists() and sum(1 for _ in open(path)) >= 7:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    p = subprocess.run(train_cmd(str(exp), run), cwd=ROOT, env=cpu_env(1), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from the checkpoint of step" in p.stdout + p.stderr
    assert losses(run) == losses(ref)


def test_extra_scalar_head_without_copying_the_transformer(base_run):
    """A model with a reward head is the same transformer plus a (D,) vector: it starts from a
    run without the head (the head at zero, every other parameter equal), and the head reads
    the same final hidden states as the language-model logits."""
    from lm.model.sharding import make_mesh
    from lm.train.engine import make_engine
    from lm.train.init import load_params
    from lm.train.run import load_run

    cfg = sft_config(base_run)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scalar_heads=("reward",)),
                              mesh=dataclasses.replace(cfg.mesh, data=1))
    engine = make_engine(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    params, _ = load_params(base_run["run"], engine.abstract_params(), log=lambda *_: None)
    model = engine.model(params)
    assert np.all(np.asarray(model.scalar_heads["reward"][...]) == 0)
    base = load_run(base_run["run"], log=lambda *_: None).model()
    x = jnp.asarray(np.arange(12).reshape(2, 6) + 4)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(base(x)))  # the LM is untouched
    w = np.random.default_rng(0).normal(size=cfg.model.d_model).astype(np.float32)
    model.scalar_heads["reward"][...] = jnp.asarray(w)
    h = model.hidden(x)
    np.testing.assert_allclose(np.asarray(model.scalar(h, "reward")), np.asarray(h) @ w, rtol=1e-5, atol=1e-5)
