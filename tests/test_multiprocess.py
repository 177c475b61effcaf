"""Two local processes (4 CPU devices each, gloo collectives over 127.0.0.1) train exactly
as one process with 8 devices: same global batches (each process reads its data shard
of a two-source mixture), same losses."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, cpu_env, train_cmd, write_experiment

EXPERIMENT = """
from lm.config import Config, DataConfig, ModelConfig, OptimConfig, SourceConfig, TrainerConfig

def config():
    sources = (SourceConfig(name="a", kind="jsonl", paths=({a!r},), weight=0.7),
               SourceConfig(name="b", kind="text", doc_per="block", paths=({b!r},), weight=0.3))
    return Config(name="two_process", model=ModelConfig(vocab_size=384, max_seq_len=32),
                  optim=OptimConfig(lr=3e-3, warmup_steps=2),
                  data=DataConfig(corpus="sources", sources=sources, tokenizer={tok!r}, num_shards=2),
                  trainer=TrainerConfig(num_samples=0, peak_flops_per_device=1e9))
"""

SETTINGS = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
    "model.n_kv_heads=2", "model.d_ff=128", "model.max_seq_len=32", "model.attention_block=16",
    "data.seq_len=32", "data.batch_size=8", "trainer.steps=6", "trainer.log_every=1",
    "trainer.eval_batches=2", "mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(experiment, run_dir, extra=()):
    return train_cmd(experiment, run_dir, SETTINGS, extra)


def _env(devices: int):
    return cpu_env(devices)


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(run_dir, "metrics.jsonl"))]


WARM_UPS = ["trainer.batch_warmup_steps=4", "trainer.batch_warmup_start=2", "trainer.seq_warmup_steps=4",
            "trainer.seq_warmup_start=8"]


@pytest.mark.slow  # run by .ci/run after make test
@pytest.mark.parametrize("extra", [[], WARM_UPS], ids=["plain", "warm-ups"])
def test_two_processes_match_one_process(tmp_path, extra):
    """(with the warm-ups: each process keeps the first rows of its own data shard, and cuts them
    into the same pieces, so the global batches are the one process's)"""
    experiment = write_experiment(tmp_path, EXPERIMENT, "two_process")
    sets = [f for s in extra for f in ("--set", s)]
    single = tmp_path / "single"
    done = subprocess.run(_cmd(experiment, single, sets), cwd=ROOT, env=_env(8), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    multi = tmp_path / "multi"
    port = _free_port()
    procs = [
        subprocess.Popen(_cmd(experiment, multi, [*sets, "--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                                  "2", "--process-id", str(i), "--cpu-collectives"]),
                         cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("multi-process run timed out")
        outs.append(out)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "2 process(es)" in outs[0] and "8 cpu device(s)" in outs[0]
    if extra:
        assert "compiling the train step for 2 rows cut into pieces of 8 tokens" in outs[0], outs[0][-3000:]

    a, b = _losses(single), _losses(multi)
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert a[-1] < a[0]
    # held-out evaluation (both sources) agrees too
    ev = [[json.loads(line).get("eval_loss") for line in open(os.path.join(d, "metrics.jsonl"))][-1]
          for d in (single, multi)]
    np.testing.assert_allclose(ev[1], ev[0], rtol=1e-5)


RL_EXPERIMENT = """
import dataclasses
from lm import experiment
from lm.config import Config, MeshConfig, RLConfig


def config():
    b = experiment.load({exp!r})
    ppo = {stage!r} == "ppo"
    rl = (RLConfig(task="arith", group_size=1, max_new=6, eval_prompts=12, train_problems=100, updates_per_rollout=1,
                   minibatches=2, beta=0.05, kl_target=1.0, kl_horizon=64, reward="spread_reward:digits") if ppo else
          RLConfig(task="arith", group_size=4, max_new=6, eval_prompts=12, train_problems=100, updates_per_rollout=2,
                   temperature=1.5, reward="spread_reward:digits"))
    return Config(name={stage!r}, stage={stage!r},
                  model=dataclasses.replace(b.model, scalar_heads=("value",) if ppo else ()),
                  rl=rl, mesh=MeshConfig(data=2, fsdp=4, tensor=1),
                  optim=dataclasses.replace(b.optim, lr=1e-3, warmup_steps=1),
                  data=dataclasses.replace(b.data, batch_size=8, seq_len=32),
                  trainer=dataclasses.replace(b.trainer, steps=4, log_every=1, eval_every=2, checkpoint_every=2,
                                              init_from={run!r}, num_samples=0))
"""


# A reward that varies from sample to sample (the small base model never gets a sum right).
SPREAD_REWARD = """
def digits(completion, example):
    return sum(c.isdigit() or c == " " for c in completion) / max(1, len(completion))
"""


def _two_processes(cmd, timeout=400, env=None):
    port = _free_port()
    procs = [subprocess.Popen(cmd + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id",
                                     str(i), "--cpu-collectives"], cwd=ROOT, env=env or _env(4), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("multi-process run timed out")
    return procs, outs


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["grpo", "ppo", "grpo-tensor2"])
def test_rl_on_two_processes_matches_one(base_run, tmp_path, stage):
    """GRPO and PPO with 2 processes x 4 devices against 1 x 8 (mesh data=2, fsdp=4; and GRPO on
    data=2, fsdp=2, tensor=2, its rollouts decoded tensor-parallel): each process samples its
    half of every rollout and scores it, and every logged figure (loss, reward, KL, entropy,
    response length, held-out pass@1) is the single process's, within float32 noise."""
    exp = tmp_path / f"{stage}.py"
    text = RL_EXPERIMENT.format(exp=base_run["exp"], run=base_run["run"], stage=stage.split("-")[0])
    if stage.endswith("tensor2"):
        text = text.replace("MeshConfig(data=2, fsdp=4, tensor=1)", "MeshConfig(data=2, fsdp=2, tensor=2)")
    exp.write_text(text)
    (tmp_path / "spread_reward.py").write_text(SPREAD_REWARD)
    env = lambda n: {**_env(n), "PYTHONPATH": str(tmp_path)}  # noqa: E731
    single = tmp_path / "single"
    done = subprocess.run(train_cmd(str(exp), single), cwd=ROOT, env=env(8), capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    multi = tmp_path / "multi"
    procs, outs = _two_processes(train_cmd(str(exp), multi), env=env(4))
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]

    def rows(run):
        return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]

    a, b = rows(single), rows(multi)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    keys = ["loss", "reward", "response_length", "kl", "entropy", "pass@1"]
    for ra, rb in zip(a, b):
        for k in keys:
            if k in ra:
                np.testing.assert_allclose(rb[k], ra[k], rtol=2e-4, atol=2e-5, err_msg=f"{k} at step {ra['step']}")
    assert len({r["reward"] for r in a if "reward" in r}) > 1  # the rewards vary


DPO_EXPERIMENT = """
import dataclasses
import sys

sys.path.insert(0, {tests!r})
from helpers import pref_config

from lm import experiment
from lm.config import MeshConfig, PreferenceConfig


def config():
    base = {{"cfg": experiment.load({exp!r}), "run": {run!r}}}
    cfg = pref_config(base, "dpo", {pairs!r}, pref=PreferenceConfig(reference="precomputed"),
                      mesh=MeshConfig(data=2, fsdp=4, tensor=1))
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_shards=2),
                               trainer=dataclasses.replace(cfg.trainer, eval_every=2))
"""


@pytest.mark.slow
def test_dpo_with_a_reference_computed_ahead_on_two_processes_matches_one(base_run, tmp_path):
    """DPO's reference log-probabilities computed ahead by 2 processes x 4 devices (each its
    devices' rows; one file, written by process 0, read back by both on resume) give the
    single process's losses, preference accuracy and held-out figures."""
    from helpers import pair_file

    pairs = pair_file(tmp_path / "pairs.jsonl", n=200)
    exp = tmp_path / "dpo.py"
    exp.write_text(DPO_EXPERIMENT.format(tests=os.path.join(ROOT, "tests"), exp=base_run["exp"], run=base_run["run"],
                                         pairs=pairs))
    single = tmp_path / "single"
    done = subprocess.run(train_cmd(str(exp), single), cwd=ROOT, env=_env(8), capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    multi = tmp_path / "multi"
    procs, outs = _two_processes(train_cmd(str(exp), multi))
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "training pairs computed once" in outs[0]

    def rows(run):
        return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]

    a, b = rows(single), rows(multi)
    assert len(a) == len(b) >= 4
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        at_reference = abs(ra["loss"] - np.log(2)) < 1e-6  # margins 0 but for float noise: accuracy is a coin
        for k in ("loss", "accuracy", "margin", "eval_loss", "eval_accuracy"):
            if k in ra and not (k == "accuracy" and at_reference):
                np.testing.assert_allclose(rb[k], ra[k], rtol=2e-4, atol=2e-5, err_msg=f"{k} at step {ra['step']}")
    # the file holds every training pair (and process 0's held-out pairs; a resume computes the rest again)
    tables = [np.load(run / "reference_logps.npz") for run in (single, multi)]
    one, two = ({bytes(k): v for k, v in zip(t["keys"], t["values"])} for t in tables)
    assert set(two) <= set(one) and len(two) >= 180
    np.testing.assert_allclose([two[k] for k in two], [one[k] for k in two], rtol=1e-5)


@pytest.mark.slow
def test_a_killed_process_stops_the_other_in_one_line_and_the_rerun_resumes(base_run, tmp_path):
    """GRPO on 2 processes: SIGKILL one mid-run; the other exits 1 within 60 s with one line that
    says a peer went away (the runtime's dump kept in the run directory, not on the screen);
    the same two commands again resume from the last checkpoint and finish."""
    import signal
    import time

    exp = tmp_path / "grpo.py"
    exp.write_text(RL_EXPERIMENT.format(exp=base_run["exp"], run=base_run["run"], stage="grpo")
                   .replace("steps=4,", "steps=10,"))
    (tmp_path / "spread_reward.py").write_text(SPREAD_REWARD)
    env = {**_env(4), "PYTHONPATH": str(tmp_path)}
    run = tmp_path / "run"
    port = _free_port()
    cmd = train_cmd(str(exp), run) + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                      "--cpu-collectives"]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    metrics, start = run / "metrics.jsonl", time.monotonic()
    while not (metrics.exists() and sum(1 for _ in open(metrics)) >= 5):
        assert time.monotonic() - start < 300 and procs[0].poll() is None, "the run did not get going"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    try:
        out, _ = procs[0].communicate(timeout=60)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("the surviving process did not stop within 60 s of its peer's death")
    procs[1].wait()
    assert procs[0].returncode == 1 and time.monotonic() - killed < 60
    last = out.strip().splitlines()[-1]
    assert last.startswith("lm: error: process 0 stopped because another process of the run went away"), out[-2000:]
    assert "Traceback" not in out and "Check failure" not in out and "terminate called" not in out, out[-3000:]
    assert (run / "crash-process-0.log").exists()
    port = _free_port()
    again = [c if not c.startswith("127.0.0.1:") else f"127.0.0.1:{port}" for c in cmd]
    procs = [subprocess.Popen(again + ["--process-id", str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "resumed from the checkpoint of step" in outs[0]
    steps = [json.loads(line)["step"] for line in open(metrics)]
    assert steps[-1] == 10 and sorted(set(steps)) == list(range(1, 11))


TOOLS_RL_EXPERIMENT = """
import dataclasses
from lm import experiment
from lm.config import Config, DataConfig, MeshConfig, OptimConfig, RLConfig, TrainerConfig


def config():
    model = experiment.load({run!r} + "/config.json").model
    return Config(name="tools", stage="grpo", model=model, mesh=MeshConfig(data=2, fsdp=4, tensor=1),
                  rl=RLConfig(task="calc", tools="calculator", max_tool_calls=1, tool_result_tokens=4, group_size=4,
                              max_new=6, eval_prompts=12, train_problems=100, updates_per_rollout=2,
                              reward="length_reward:reward"),
                  optim=OptimConfig(lr=1e-3, warmup_steps=1),
                  data=DataConfig(corpus="default", batch_size=8, seq_len=32),
                  trainer=TrainerConfig(steps=4, log_every=1, eval_every=2, checkpoint_every=2, init_from={run!r},
                                        num_samples=0))
"""


@pytest.mark.slow
def test_rl_with_tools_on_two_processes_matches_one(tmp_path):
    """GRPO whose rollouts call tools, 2 processes x 4 devices against 1 x 8: each process runs
    the tools of the rows it sampled and the results are shared, so every logged figure (tool
    calls and errors included) is the single process's."""
    from helpers import tool_happy_run

    init = tool_happy_run(tmp_path)
    exp = tmp_path / "tools_rl.py"
    exp.write_text(TOOLS_RL_EXPERIMENT.format(run=init))
    (tmp_path / "length_reward.py").write_text("def reward(completion, example):\n    return len(completion) / 10\n")
    env = lambda n: {**_env(n), "PYTHONPATH": str(tmp_path)}  # noqa: E731
    single = tmp_path / "single"
    done = subprocess.run(train_cmd(str(exp), single), cwd=ROOT, env=env(8), capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    multi = tmp_path / "multi"
    procs, outs = _two_processes(train_cmd(str(exp), multi), env=env(4))
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]

    def rows(run):
        return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]

    a, b = rows(single), rows(multi)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in ("loss", "reward", "response_length", "tool_calls", "tool_error_rate", "kl", "pass@1"):
            if k in ra:
                np.testing.assert_allclose(rb[k], ra[k], rtol=2e-4, atol=2e-5, err_msg=f"{k} at step {ra['step']}")
    assert all(r["tool_calls"] > 0 for r in a if "tool_calls" in r)  # the tool path ran in every rollout


@pytest.mark.slow
def test_ppo_with_a_reward_model_on_two_processes_matches_one(base_run, tmp_path):
    """rl.reward = "run:DIR" with 2 processes x 4 devices: each process scores the replies it
    sampled with its copy of the reward model, and the rewards are shared; every logged figure
    (the held-out mean reward of greedy replies included) is the single process's."""
    from helpers import reward_run

    rm = reward_run(base_run, tmp_path)
    exp = tmp_path / "ppo_rm.py"
    exp.write_text(RL_EXPERIMENT.format(exp=base_run["exp"], run=base_run["run"], stage="ppo").replace(
        'reward="spread_reward:digits"', f'reward="run:{rm}"'))
    single = tmp_path / "single"
    done = subprocess.run(train_cmd(str(exp), single), cwd=ROOT, env=_env(8), capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    multi = tmp_path / "multi"
    procs, outs = _two_processes(train_cmd(str(exp), multi), env=_env(4))
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]

    def rows(run):
        return [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]

    a, b = rows(single), rows(multi)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in ("loss", "reward", "response_length", "kl", "reward@greedy"):
            if k in ra:
                np.testing.assert_allclose(rb[k], ra[k], rtol=2e-4, atol=2e-5, err_msg=f"{k} at step {ra['step']}")
    assert any("reward@greedy" in r for r in a) and len({r["reward"] for r in a if "reward" in r}) > 1


@pytest.mark.slow
def test_reward_model_accuracy_on_two_processes_matches_one(base_run, tmp_path):
    """`lm reward` with 2 processes x 4 devices against 1 x 8: each device scores its rows of
    every batch, the rewards are gathered, and process 0 alone prints the same line and
    writes the same per-pair rewards as the single process, bit for bit."""
    from helpers import pair_file, reward_run

    rm = reward_run(base_run, tmp_path)
    pairs = tmp_path / "eval.jsonl"
    lines = open(pair_file(pairs, 40, seed=5)).read().splitlines()
    for i in range(0, len(lines), 3):  # every third pair the other way round: an accuracy short of 1
        p = json.loads(lines[i])
        lines[i] = json.dumps({**p, "chosen": p["rejected"], "rejected": p["chosen"]})
    lines[5:5] = ['{"chosen": "no prompt, no rejected"}',  # skipped the same way by every process
                  json.dumps({"prompt": "What is 1 + 2? " * 40, "chosen": "Yes: 3.", "rejected": "No: 4."})]
    pairs.write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "lm", "reward", rm, "--pairs", str(pairs)]
    single = subprocess.run(cmd + ["--scores", str(tmp_path / "single.jsonl")], cwd=ROOT, env=_env(8),
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    procs, outs = _two_processes(cmd + ["--scores", str(tmp_path / "multi.jsonl")], timeout=300)
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]

    def result(out):
        return [line for line in out.splitlines() if "pairwise accuracy" in line]

    assert result(single.stdout) == result(outs[0]) and len(result(outs[0])) == 1 and result(outs[1]) == []
    assert "40 pairs (1 bad records and 1 over-long pairs skipped)" in result(outs[0])[0]
    assert "on 8 device(s) of 1 process(es), 2 of each batch's 16 rows on each device" in single.stdout
    assert "on 8 device(s) of 2 process(es), 2 of each batch's 16 rows on each device" in outs[0]
    one, two = ([json.loads(line) for line in open(tmp_path / f"{k}.jsonl")] for k in ("single", "multi"))
    assert one == two and len(one) == 40  # the same floats, bit for bit
    wins = [r["chosen"] > r["rejected"] for r in one]
    assert 0 < sum(wins) < 40 and len({r["chosen"] for r in one}) > 30
