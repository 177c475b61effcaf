"""Two local processes (4 CPU devices each, gloo collectives over 127.0.0.1) train exactly
as one process with 8 devices: same global batches, same losses."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = [
    "model.vocab_size=128", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
    "model.n_kv_heads=2", "model.d_ff=128", "model.max_seq_len=32", "model.attention_block=16",
    "data.seq_len=32", "data.batch_size=8", "trainer.steps=6", "trainer.log_every=1",
    "trainer.eval_batches=2", "mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(run_dir, extra=()):
    args = [sys.executable, "-m", "lm", "train", "experiments/bench_reference.py", "--run-dir", str(run_dir),
            "--no-progress"]
    for s in SETTINGS:
        args += ["--set", s]
    return args + list(extra)


def _env(devices: int):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_two_processes_match_one_process(tmp_path):
    single = tmp_path / "single"
    subprocess.run(_cmd(single), cwd=ROOT, env=_env(8), check=True, capture_output=True, timeout=300)

    multi = tmp_path / "multi"
    port = _free_port()
    procs = [
        subprocess.Popen(_cmd(multi, ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
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
