"""Rollouts that call tools (lm/stages/rollouts.py): a turn that calls tools gets their results
and goes on; the results are in the rows but never in the loss. The model's turns are
scripted here (the decode is replaced), so the test checks the bookkeeping exactly."""

import json

import jax
import numpy as np
import pytest

from data_pipeline import default_corpus, tasks
from data_pipeline.chat import chat_token_ids, tool_token_ids
from data_pipeline.tokenizer import train_tokenizer
from lm.agent import registry
from lm.stages import rollouts
from lm.stages.sft import tool_records


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = [d.text() for d in default_corpus.documents()[:150]]
    return train_tokenizer(corpus, 768, str(tmp_path_factory.mktemp("tok") / "sp"), tool_tokens=True)


def _call(tok, expression):
    return [tool_token_ids(tok)["tool_call"],
            *tok.encode(json.dumps({"name": "calculator", "arguments": {"expression": expression}}))]


def test_a_row_that_calls_a_tool_gets_its_result_and_goes_on(tok, monkeypatch):
    end = chat_token_ids(tok)["end"]
    items = [{"messages": [{"role": "user", "content": "What is 1234 + 5678?"}], "answer": "6912"},
             {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "answer": "4"}]
    sampler = rollouts.Sampler(tok, items, max_new=128, tools=registry.resolve("calculator"), max_tool_calls=2,
                               result_tokens=8)
    turns = {  # (round, row) -> the tokens the "model" samples
        (0, 0): _call(tok, "1234 + 5678") + [end],
        (0, 1): tok.encode("4") + [end],
        (1, 0): _call(tok, "6912 ^ 9 ^ 9") + _call(tok, "1") + _call(tok, "2") + [end],  # three calls: 2 run
        (2, 0): tok.encode("6912") + [end],
    }
    seen = []

    def scripted(graphdef, params, tokens, lengths, key, temperature, max_new, stops, mesh=None):
        k = len(seen)
        seen.append((tokens.copy(), lengths.copy()))
        n = len(tokens)
        out, count, logps = np.zeros((n, max_new), np.int32), np.zeros(n, np.int32), np.zeros((n, max_new))
        for r in range(n):
            ids = turns.get((k, r), [end])
            out[r, : len(ids)], count[r], logps[r, : len(ids)] = ids, len(ids), -0.5
        return out, count, logps.astype(np.float32), np.ones(n, bool)

    monkeypatch.setattr(rollouts, "_decode", scripted)
    s = rollouts.sample(None, None, sampler, [0, 1], jax.random.PRNGKey(0), 1.0)
    assert len(seen) == 3  # the first turn, then two rounds of results for row 0 only
    assert [sampler.text(s.out[r], s.count[r], s.start[r]) for r in range(2)] == ["6912", "4"]
    assert s.calls.tolist() == [1 + 3, 0] and s.errors.tolist() == [2, 0]  # the tower and the third call
    row = s.out[0, : s.count[0]].tolist()
    text = tok.decode(row)
    assert "6912" in text and "error: Calculat 1 6912" in text  # results cut to 8 tokens
    assert "at most 2 tool calls" not in text  # the third call gets no result turn (only the first 2 are run)
    # the rows the second round decoded start with the prompt and hold the first result
    prompt = sampler.ids[0]
    assert seen[1][0][0, : len(prompt)].tolist() == prompt
    cont = seen[1][0][0, : seen[1][1][0]].tolist()
    assert cont[len(prompt):] == row[: len(cont) - len(prompt)]
    assert cont[-1] == chat_token_ids(tok)["assistant"]
    # sampled: exactly the scripted turns' tokens, never the results
    assert s.sampled[0].sum() == sum(len(turns[(k, 0)]) for k in range(3))
    k = len(turns[(0, 1)])
    assert s.sampled[1].sum() == k and not s.sampled[1, k:].any()
    batch = rollouts.training_rows(s.tokens, s.lengths, s.out, s.count, s.logps, np.zeros(2), sampler.response_width,
                                   s.sampled)
    p = s.lengths[0]
    mask = batch["loss_mask"][0]
    assert mask.sum() == s.sampled[0].sum()
    tool = tool_token_ids(tok)["tool"]
    results_at = [p - 1 + i for i, t in enumerate(row) if t == tool]
    assert len(results_at) == 3 and all(mask[i] == 0 for i in results_at)
    assert batch["old_logps"][0][mask > 0].tolist() == [-0.5] * int(mask.sum())


def test_sft_demonstrations_call_the_tool_and_some_answer_alone():
    train, _ = tasks.calc(0, 20, 5)
    tools = registry.resolve("calculator")
    recs = tool_records(train, tools, without=0.25)
    alone = [r for r in recs if "tools" not in r]
    assert len(alone) == 5
    r = next(r for r in recs if "tools" in r)
    call = r["messages"][1]["tool_calls"][0]["function"]
    assert json.loads(call["arguments"])["expression"] in r["messages"][0]["content"]
    assert r["messages"][2] == {"role": "tool", "content": r["messages"][3]["content"]}  # the tool's exact result
    a, op, b = json.loads(call["arguments"])["expression"].split()
    assert r["messages"][3]["content"] == str(int(a) + int(b) if op == "+" else int(a) * int(b))


def test_calc_problems_are_hard_sums_and_products_with_a_disjoint_held_out_split():
    train, held = tasks.calc(0, 400, 100)
    assert {p["expression"] for p in train}.isdisjoint(p["expression"] for p in held)
    ops = [p["expression"].split()[1] for p in train]
    assert 150 < ops.count("+") < 250 and ops.count("+") + ops.count("*") == 400
    assert tasks.calc(0, 400, 100) == (train, held)


# ---------------------------------------------------------------------------------------
# GRPO whose rollouts call tools: killed and resumed, every step as in the uninterrupted run

TOOL_GRPO = """
import sys

sys.path.insert(0, {here!r})  # the reward below

import dataclasses

from lm import experiment
from lm.config import Config, DataConfig, OptimConfig, RLConfig, TrainerConfig


def config():
    model = experiment.load({run!r} + "/config.json").model
    return Config(name="tools", stage={stage!r}, model=dataclasses.replace(model, scalar_heads={heads!r}),
                  rl=RLConfig(task="calc", tools="calculator", max_tool_calls=1, tool_result_tokens=4, group_size={group},
                              reward="length_reward:reward",
                              max_new=6, eval_prompts=8, train_problems=100, updates_per_rollout=2),
                  optim=OptimConfig(lr=1e-3, warmup_steps=1),
                  data=DataConfig(corpus="default", batch_size=8, seq_len=32),
                  trainer=TrainerConfig(steps=6, log_every=1, eval_every=0, checkpoint_every=3, init_from={run!r},
                                        num_samples=0))
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_sigkill_during_rl_with_tools_then_resume_reproduces_every_step(tmp_path, stage):
    import os
    import subprocess

    from helpers import ROOT, cpu_env, kill_at_checkpoint_then_resume, tool_happy_run, train_cmd

    init = tool_happy_run(tmp_path)
    exp = tmp_path / "grpo_tools.py"
    exp.write_text(TOOL_GRPO.format(run=init, here=str(tmp_path), stage=stage,
                                    heads=("value",) if stage == "ppo" else (), group=4 if stage == "grpo" else 1))
    # a reward that varies within groups (a random model never answers right): advantages move the policy
    (tmp_path / "length_reward.py").write_text("def reward(completion, example):\n    return len(completion) / 10\n")

    def steps(run):
        rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
        return [(r["step"], r["loss"], r["reward"], r["response_length"], r["tool_calls"], r["tool_error_rate"])
                for r in rows if "loss" in r]

    ref = tmp_path / "ref"
    p = subprocess.run(train_cmd(str(exp), ref), cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert all(calls > 0 for *_, calls, _ in steps(ref))  # the tool path ran: calls in every rollout
    assert any(loss != 0 for _, loss, *_ in steps(ref))
    assert "without tools" in p.stdout + p.stderr
    run = tmp_path / "run"
    p = kill_at_checkpoint_then_resume(str(exp), run)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from the checkpoint of step" in p.stdout + p.stderr
    assert steps(run) == steps(ref) and len(steps(ref)) == 6
