"""Post-training that never gives a wrong answer silently (the hostile-user cases): rewards
that are not finite numbers, pass@1 above 100%, `lm eval --tasks heldout` on stages it does
not measure, and a base model read with another tokenizer."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from data_pipeline.errors import UserError
from lm.config import Config, ConfigError, TrainerConfig
from lm.stages import common, rollouts
from lm.stages.rewards import RewardError, exact, score_all
from lm.stages.runner import evaluate_heldout

PAIRS = [("12", {"answer": 12}), ("3", {"answer": 4})]


def score_tuple(completion, example):
    return 1.0, len(completion)


def forgets_return(completion, example):
    float(completion == example["answer"])


def sometimes_nan(completion, example):
    return float("nan") if completion == "3" else 1.0


def raises(completion, example):
    raise KeyError("solution")


@pytest.mark.parametrize("fn, says", [
    (score_tuple, "returned (1.0, 2) for the reply '12'"),
    (forgets_return, "returned None for the reply '12'"),
    (sometimes_nan, "returned nan for the reply '3'"),
    (raises, "raised KeyError: 'solution' (on the reply '12'"),
])
def test_a_reward_that_is_not_one_finite_number_is_a_one_line_error_naming_it(fn, says):
    with pytest.raises(RewardError) as e:
        score_all(fn, PAIRS)
    msg = str(e.value)
    assert f"test_hardening:{fn.__name__}" in msg and says in msg and "\n" not in msg, msg
    assert isinstance(e.value, UserError)  # the CLI prints it in one line


def test_numbers_of_every_kind_are_rewards():
    assert score_all(exact, PAIRS).tolist() == [1.0, 0.0]
    kinds = [True, 1, 0.5, np.float32(0.25), np.int64(2), np.bool_(False), np.asarray(0.75)]
    for value in kinds:
        assert score_all(lambda c, e, v=value: v, PAIRS[:1]).tolist() == [float(value)]
    batched = types.SimpleNamespace(batched=lambda pairs: [0.5])  # a reward model that scored one of two
    with pytest.raises(RewardError, match="scored 1 of 2 replies"):
        score_all(batched, PAIRS)


def test_pass_at_1_counts_passes_and_never_exceeds_one(monkeypatch):
    """A reward above 1 (a graded reward, or (score, length) summed) counts one pass per prompt."""
    n = 5
    sampler = types.SimpleNamespace(items=[{"answer": i} for i in range(n)], text=lambda out, count, start: "x")
    zeros = np.zeros(4, int)
    monkeypatch.setattr(rollouts, "sample", lambda *a, **k: rollouts.Sample(
        None, None, np.zeros((4, 1)), np.ones(4), None, np.ones(4, bool), np.ones((4, 1), bool), zeros, zeros, zeros))
    generous = lambda c, e: 2.75  # noqa: E731
    assert rollouts.pass_at_1(None, None, sampler, generous, batch=4) == 1.0
    half = lambda c, e: 0.5  # noqa: E731
    assert rollouts.pass_at_1(None, None, sampler, half, batch=4) == 0.0  # no full pass
    assert rollouts.pass_at_1(None, None, sampler, half, batch=4, mean=True) == pytest.approx(0.5)  # a reward model


@pytest.mark.parametrize("stage", ["reward", "dpo", "grpo", "ppo"])
def test_heldout_is_refused_for_stages_it_does_not_measure(stage):
    run = types.SimpleNamespace(cfg=Config(stage=stage))
    with pytest.raises(UserError, match=f"is a {stage} run, whose measure is its held-out"):
        evaluate_heldout(run, "runs/x")
    said = []
    assert evaluate_heldout(run, "runs/x", log=said.append, required=False) is None  # `lm eval` with every task
    assert said and stage in said[0]


def test_a_base_model_is_not_read_with_another_tokenizer(tmp_path):
    base = tmp_path / "base"
    (base / "checkpoints").mkdir(parents=True)
    (base / "config.json").write_text(json.dumps({"name": "base"}))
    (base / "tokenizer.model").write_bytes(b"the base's pieces")
    other = tmp_path / "other.model"
    other.write_bytes(b"other pieces, same size")
    copy = tmp_path / "copy.model"
    copy.write_bytes(b"the base's pieces")
    cfg = Config(stage="sft", trainer=TrainerConfig(init_from=str(base)))
    with pytest.raises(ConfigError, match="is not the one trainer.init_from=.* was trained with") as e:
        common.check_base_tokenizer(cfg, str(other))
    assert "\n" not in str(e.value)
    common.check_base_tokenizer(cfg, str(copy))  # the same tokenizer, copied: fine
    common.check_base_tokenizer(Config(stage="sft"), str(other))  # no base: nothing to compare


def test_sample_chat_with_a_question_the_context_cannot_hold_is_one_line(sft_run, capsys):
    from lm.cli import main

    assert main(["sample", sft_run["run"], "--chat", "word " * 400, "--max-new", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lm: error: not sent: the message is") and "\n" not in err, err
    assert main(["sample", sft_run["run"], "--chat", "hi", "--max-new", "100000"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_output_to_a_reader_that_leaves_is_not_an_error(sft_run):
    """`lm sample ... | head -c 1`: the pipe closes under the stream; exit 0, no traceback."""
    import subprocess
    import sys

    from helpers import cpu_env

    cmd = f"{sys.executable} -m lm sample {sft_run['run']} --prompt 'the' --max-new 200 --temperature 0 | head -c 1"
    p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, env=cpu_env(1),
                       timeout=300)
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr[-2000:]
    assert p.returncode == 0, p.stderr[-2000:]


def test_reward_model_scores_within_the_model_context_and_says_what_it_cut(base_run):
    """Replies that differ only after the run's training rows (data.seq_len) get different
    rewards; longer than the model's context, they are scored on their last tokens, said once."""
    import dataclasses

    import jax

    from data_pipeline.tokenizer import Tokenizer
    from lm.eval.reward_model import score
    from lm.model.sharding import make_mesh
    from lm.train.engine import make_engine
    from lm.train.run import LoadedRun

    base = base_run["cfg"]
    cfg = dataclasses.replace(base, stage="reward", model=dataclasses.replace(base.model, scalar_heads=("reward",)),
                              data=dataclasses.replace(base.data, seq_len=16))
    engine = make_engine(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    state, _ = engine.init_state(0)
    leaves, tree = jax.tree.flatten(state.params)  # (the fresh reward head is zero: give it weights)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
    run = LoadedRun(cfg=cfg, trainer=engine, params=params, step=0,
                    tokenizer=Tokenizer(base_run["run"] + "/tokenizer.model"), run_dir="rm")
    from data_pipeline.chat import render

    prompt = [{"role": "user", "content": "Say it."}]
    head = "The module reads files, "
    replies = [head + "good", head + "shuffled words these are", head + "zz qq xx"]
    ids = [render(run.tokenizer, prompt + [{"role": "assistant", "content": r}])[0] for r in replies]
    assert all(16 < len(x) <= 64 for x in ids) and ids[0][:16] == ids[1][:16] == ids[2][:16]  # (cut at 16: equal)
    said = []
    rewards = score(run, [(prompt, r) for r in replies], log=said.append)
    assert len(set(rewards)) == 3, rewards  # read at each reply's own end, past the 16-token rows
    assert said == []
    long = [(prompt, head * 20 + end) for end in ("good", "bad")]
    rewards = score(run, long, log=said.append) + score(run, long, log=said.append)
    assert rewards[0] != rewards[1] and rewards[:2] == rewards[2:]
    assert len(said) == 1 and "scored 2 conversation(s) longer than its context of 64 tokens" in said[0], said


@pytest.mark.slow
def test_a_lora_run_is_read_from_any_directory_onto_its_pinned_base(base_run, tmp_path, monkeypatch):
    """A LoRA run started with a relative init_from, read from another directory and through a
    symlink, merges onto the base step it recorded."""
    import dataclasses
    import os

    import jax.numpy as jnp
    from helpers import sft_config

    from lm.config import LoraConfig
    from lm.stages.runner import train
    from lm.train.run import load_run

    quiet = lambda *_: None  # noqa: E731
    monkeypatch.chdir(os.path.dirname(base_run["run"]))
    cfg = dataclasses.replace(sft_config({**base_run, "run": os.path.basename(base_run["run"])}, steps=4,
                                         eval_every=4, checkpoint_every=4), lora=LoraConfig(rank=4, alpha=8.0))
    run = tmp_path / "lora"
    train(cfg, str(run), log=quiet, progress=False)
    x = jnp.asarray(np.arange(16).reshape(1, 16) % 300 + 4)
    here = np.asarray(load_run(str(run), log=quiet).model()(x))
    monkeypatch.chdir(tmp_path)  # init_from ("base_run") means nothing here
    (tmp_path / "link").symlink_to(run)
    for path in (str(run), "link"):
        np.testing.assert_array_equal(np.asarray(load_run(path, log=quiet).model()(x)), here)


def test_a_reward_module_in_the_working_directory_is_found(tmp_path, monkeypatch):
    import sys

    from lm.stages import rewards

    (tmp_path / "my_rewards_wd.py").write_text("def length(completion, example):\n    return len(completion)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])  # as under `lm ...`
    assert rewards.get("my_rewards_wd:length")("abc", {}) == 3


def test_pairs_whose_replies_are_the_same_are_warned_about(base_run, tmp_path):
    from data_pipeline.config import DataConfig, SourceConfig
    from data_pipeline.preferences import preference_data
    from data_pipeline.tokenizer import Tokenizer

    pairs = tmp_path / "same.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"question {i}?", "chosen": f"answer {i}", "rejected": f"answer {i}"})
                             + "\n" for i in range(40)))
    d = DataConfig(corpus="sources", seq_len=64, batch_size=8, prefetch=0,
                   sources=(SourceConfig(name="same", kind="preference", paths=(str(pairs),), chat_format="prompt"),))
    said = []
    preference_data(d, str(tmp_path / "run"), tokenizer=Tokenizer(base_run["run"] + "/tokenizer.model"),
                    eval_batches=1, log=said.append, process_index=0, process_count=1)
    assert any("in 100% of the pairs checked the chosen and the rejected reply are the same" in m for m in said), said


def test_a_non_ascii_api_key_is_refused(base_run, capsys):
    pytest.importorskip("starlette")
    from lm.cli import main

    assert main(["serve", base_run["run"], "--api-key", "clé secrète"]) == 2
    assert "printable ASCII" in capsys.readouterr().err


def test_eval_without_task_files_scores_the_held_out_data(base_run, tmp_path, capsys):
    import shutil

    from lm.cli import main

    run = tmp_path / "run"
    shutil.copytree(base_run["run"], run)
    assert main(["eval", str(run), "--data-dir", str(tmp_path / "absent")]) == 0
    out = capsys.readouterr()
    assert "| heldout | eval_loss |" in out.out and "evaluating the held-out data only" in out.err + out.out


def test_the_server_refuses_a_prompt_over_the_context_before_tokenising_it(base_run, monkeypatch):
    """A 4 MB prompt is refused (400, context_length_exceeded) without being tokenised: the
    tokeniser's memory grows with what it encodes (gigabytes for a burst of such prompts)."""
    pytest.importorskip("starlette")
    from data_pipeline.tokenizer import Tokenizer
    from lm.serve.server import APIError, Service

    tok = Tokenizer(base_run["run"] + "/tokenizer.model")
    batcher = types.SimpleNamespace(max_len=64, w=types.SimpleNamespace(cfg=types.SimpleNamespace(vocab_size=1024)))
    service = Service(batcher, tok, "m", chat=True)
    encoded = []
    real_encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, **kw: encoded.append(len(text)) or real_encode(text, **kw))
    monkeypatch.setattr(tok.sp, "encode", lambda *a, **kw: encoded.append(a) or [])
    huge = "word " * (4 << 18)
    for body, chat in (({"model": "m", "prompt": huge}, False),
                       ({"model": "m", "messages": [{"role": "user", "content": huge}]}, True)):
        with pytest.raises(APIError) as e:
            service.request(body, chat)
        assert e.value.status == 400 and e.value.code == "context_length_exceeded", e.value.message
        assert "characters, more than 64 tokens" in e.value.message
    assert encoded == []
    monkeypatch.undo()
    with pytest.raises(APIError, match="but the prompt has"):  # a shorter one over the context: after tokenising
        service.request({"model": "m", "prompt": "word " * 200}, False)


def test_the_server_answers_its_own_name_json_and_the_options_it_has(base_run):
    """Without an API key a loopback server answers only requests addressed to a loopback name
    (DNS rebinding), reads only JSON bodies, and refuses other servers' sampling options."""
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from data_pipeline.tokenizer import Tokenizer
    from lm.serve.server import Service, make_app

    tok = Tokenizer(base_run["run"] + "/tokenizer.model")
    batcher = types.SimpleNamespace(max_len=64, w=types.SimpleNamespace(cfg=types.SimpleNamespace(vocab_size=1024)))
    client = TestClient(make_app(Service(batcher, tok, "m", chat=False, log=lambda *_: None)),
                        base_url="http://127.0.0.1:8000")
    body = {"model": "m", "prompt": "x", "top_k": 5}
    r = client.post("/v1/completions", json=body, headers={"Host": "rebound.example:8000"})
    assert r.status_code == 421 and "rebound.example" in r.json()["error"]["message"]
    r = client.post("/v1/completions", content=json.dumps(body), headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"
    r = client.post("/v1/completions", json={**body, "top_k": None, "min_tokens": 3}, headers={"Host": "localhost"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"
    keyed = TestClient(make_app(Service(batcher, tok, "m", chat=False, api_key="k", log=lambda *_: None)))
    r = keyed.post("/v1/completions", json=body, headers={"Authorization": "Bearer k", "Host": "my.host"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"  # with a key: any name


def test_harness_data_sets_out_of_reach_are_one_line(base_run, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm.eval import harness

    def offline(**kwargs):
        try:
            raise OSError("LocalEntryNotFoundError: offline")
        except OSError as e:
            raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (LocalEntryNotFoundError)") from e

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    with pytest.raises(UserError, match="could not load the data sets of arc_easy .*HF_DATASETS_OFFLINE") as e:
        harness.evaluate_harness(base_run["run"], ["arc_easy"], log=lambda *_: None, progress=False)
    assert "\n" not in str(e.value)
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kw: 1 / 0)  # a bug stays a bug
    with pytest.raises(ZeroDivisionError):
        harness.evaluate_harness(base_run["run"], ["arc_easy"], log=lambda *_: None, progress=False)


def test_seeds_differing_above_32_bits_draw_differently():
    import jax

    from lm.sampling import decode

    same = lambda a, b: bool((np.asarray(a) == np.asarray(b)).all())  # noqa: E731
    assert same(decode.seed_key(7), jax.random.PRNGKey(7))  # the seeds people use draw as before
    assert not same(decode.seed_key(7 + (1 << 32)), decode.seed_key(7))
    assert not same(decode.request_base((1 << 63) - 1), decode.request_base((1 << 31) - 1))
    assert same(decode.request_base(5), jax.random.fold_in(decode.seed_key(5), 0))


def test_mfu_is_never_claimed_above_one():
    from lm.train.loop import _Meter

    meter = _Meter(peak=1e9 / 8, remeasure=lambda: 4e9 / 8)  # (8 fake devices)
    assert meter.mfu(2e9) == pytest.approx(0.5)  # 2e9 FLOP/s of a peak measured again at 4e9
    assert meter.remeasure is None and meter.mfu(1e9) == pytest.approx(0.25)
    assert meter.mfu(8e9) is None  # beats even the new measurement: no figure
    assert _Meter(1e9 / 8).mfu(2e9) is None  # a peak that cannot be measured again


def test_export_then_import_keeps_a_chat_model_a_chat_model(base_run, sft_run, tmp_path):
    from lm.serve.chat import Chat, is_chat_model
    from lm.tools.hf_runs import export_run, import_run
    from lm.train.run import load_run

    quiet = lambda *_: None  # noqa: E731
    for name, src, chat in (("sft", sft_run["run"], True), ("base", base_run["run"], False)):
        export_run(src, str(tmp_path / f"{name}_hf"), log=quiet)
        import_run(str(tmp_path / f"{name}_hf"), str(tmp_path / f"{name}_run"), log=quiet)
        assert is_chat_model(load_run(str(tmp_path / f"{name}_run"), log=quiet)) is chat
    replies = []
    for run_dir in (sft_run["run"], str(tmp_path / "sft_run")):
        c = Chat(load_run(run_dir, log=quiet), max_new=8, temperature=0.0)
        replies.append(c.reply("reverse: lazy dog"))
    assert replies[0] == replies[1]


def test_importing_a_reward_model_export_says_what_it_is(tmp_path):
    import jax
    from flax import nnx

    from lm.config import ModelConfig
    from lm.interop.hf import HFFormatError, export_llama, import_llama
    from lm.model.transformer import Transformer

    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32, max_seq_len=16,
                      scalar_heads=("reward",))
    params = nnx.state(Transformer(cfg, nnx.Rngs(0)), nnx.Param)
    export_llama(cfg, jax.device_get(params), str(tmp_path / "rm"))
    with pytest.raises(HFFormatError, match="is a reward model .*LlamaForSequenceClassification"):
        import_llama(str(tmp_path / "rm"))


@pytest.mark.slow
def test_the_server_stops_in_order_on_sigterm(tmp_path):
    """SIGTERM: admissions end at once (queued and new requests get 503 with Retry-After), the
    running requests finish (or end with an error event and [DONE]), nothing is cut, exit 0."""
    pytest.importorskip("starlette")
    httpx = pytest.importorskip("httpx")
    import concurrent.futures as cf
    import re
    import signal
    import subprocess
    import sys
    import time

    from flax import nnx
    from helpers import corpus_tokenizer, cpu_env

    from lm.config import ModelConfig
    from lm.interop.hf import export_llama
    from lm.model.transformer import Transformer
    from lm.tools.hf_runs import import_run

    tok = corpus_tokenizer(tmp_path, 1024)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                      max_seq_len=256, init_std=0.2)
    export_llama(cfg, nnx.state(Transformer(cfg, nnx.Rngs(0)), nnx.Param), str(tmp_path / "hf"), tokenizer_model=tok.path)
    import_run(str(tmp_path / "hf"), str(tmp_path / "run"), log=lambda *_: None)
    proc = subprocess.Popen([sys.executable, "-m", "lm", "serve", str(tmp_path / "run"), "--port", "0", "--slots", "1"],
                            env=cpu_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = None
    while url is None:
        line = proc.stdout.readline()
        assert line, "lm serve exited before listening"
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        url = m.group(1) if m else None
    body = {"model": "run", "prompt": "def f(x):", "max_tokens": 240, "temperature": 1.0, "seed": 1}

    def plain(i):
        r = httpx.post(url + "/v1/completions", json={**body, "seed": i}, timeout=60)
        return ("plain", r.status_code, r.headers.get("retry-after"), r.text)

    def streamed(i):
        with httpx.stream("POST", url + "/v1/completions", json={**body, "seed": i, "stream": True}, timeout=60) as r:
            text = "".join(r.iter_text())
        return ("stream", r.status_code, r.headers.get("retry-after"), text)

    with cf.ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(streamed if i % 3 == 0 else plain, i) for i in range(24)]
        time.sleep(1.5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        late = pool.submit(plain, 99)
        results = [f.result() for f in futures]
        late_result = late.result() if not isinstance(late.exception(), httpx.ConnectError) else None
    assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # (uvicorn re-raises the signal once it has stopped)
    refused = [r for r in results if r[1] == 503]
    assert refused and all(r[2] == "5" and "shutting down" in r[3] for r in refused)
    for kind, status, _, text in results:
        assert status in (200, 503), (kind, status, text[:300])
        if kind == "stream" and status == 200:
            assert text.rstrip().endswith("data: [DONE]"), text[-300:]  # finished, or an error event then [DONE]
    assert late_result is None or late_result[1] == 503


def test_bytes_in_flight_are_bounded(base_run):
    """While one request's body is being read, another whose bytes would take the bytes in flight
    over the bound is answered 503 (Retry-After) at once; when the first is done, room is back."""
    pytest.importorskip("starlette")
    httpx = pytest.importorskip("httpx")
    import asyncio

    from data_pipeline.tokenizer import Tokenizer
    from lm.serve.server import Service, make_app

    tok = Tokenizer(base_run["run"] + "/tokenizer.model")
    batcher = types.SimpleNamespace(max_len=64, w=types.SimpleNamespace(cfg=types.SimpleNamespace(vocab_size=1024)))
    service = Service(batcher, tok, "m", chat=False, log=lambda *_: None, max_in_flight=1000)
    body = json.dumps({"model": "m", "prompt": "word " * 150, "max_tokens": 0}).encode()
    assert 600 < len(body) < 1000

    async def main():
        release = asyncio.Event()

        async def slow_body():
            yield body[:-10]
            await release.wait()
            yield body[-10:]

        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(service)), base_url="http://127.0.0.1")
        headers = {"Content-Type": "application/json"}
        first = asyncio.create_task(client.post("/v1/completions", content=slow_body(),
                                                headers={**headers, "Content-Length": str(len(body))}))
        await asyncio.sleep(0.2)
        assert service.in_flight == len(body) - 10  # what it has sent so far
        second = await client.post("/v1/completions", content=body, headers=headers)
        release.set()
        first = await first
        third = await client.post("/v1/completions", content=body, headers=headers)
        await client.aclose()
        return first, second, third

    first, second, third = asyncio.run(main())
    assert second.status_code == 503 and second.headers["retry-after"] == "1", second.text
    assert second.json()["error"]["code"] == "too_many_bytes_in_flight"
    for r in (first, third):  # read whole, then refused for its own reason (over this fake's context)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert service.in_flight == 0
