"""Two local processes (4 CPU devices each, gloo collectives over 127.0.0.1) train exactly
as one process with 8 devices: same global batches (each process reads its data shard
of a two-source mixture), same losses."""

import json
import os
import socket
import subprocess

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


@pytest.mark.slow  # run by .ci/run after make test
def test_two_processes_match_one_process(tmp_path):
    experiment = write_experiment(tmp_path, EXPERIMENT, "two_process")
    single = tmp_path / "single"
    done = subprocess.run(_cmd(experiment, single), cwd=ROOT, env=_env(8), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    multi = tmp_path / "multi"
    port = _free_port()
    procs = [
        subprocess.Popen(_cmd(experiment, multi, ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                      "--process-id", str(i), "--cpu-collectives"]),
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

    a, b = _losses(single), _losses(multi)
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert a[-1] < a[0]
    # held-out evaluation (both sources) agrees too
    ev = [[json.loads(line).get("eval_loss") for line in open(os.path.join(d, "metrics.jsonl"))][-1]
          for d in (single, multi)]
    np.testing.assert_allclose(ev[1], ev[0], rtol=1e-5)
