"""Checkpoints and resilience: SIGKILL/SIGTERM and resume, corrupted checkpoints, NaN steps,
and resuming on another device count."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from helpers import cpu_env, train_cmd, write_experiment  # noqa: E402

# (peak_flops_per_device: a `lm train` child skips measuring the CPU's matmul peak, seconds each)
EXPERIMENT = """
from lm.config import Config, DataConfig, ModelConfig, OptimConfig, SourceConfig, TrainerConfig

def config():
    return Config(
        name="resilience",
        model=ModelConfig(vocab_size=384, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                          max_seq_len=32, attention_block=16),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        data=DataConfig(corpus="sources", seq_len=32, batch_size=8, tokenizer={tok!r}, prefetch=2,
                        sources=(SourceConfig(name="a", kind="jsonl", paths=({a!r},), weight=0.7),
                                 SourceConfig(name="b", kind="text", doc_per="block", paths=({b!r},),
                                              weight=0.3))),
        trainer=TrainerConfig(steps=16, log_every=1, checkpoint_every=2, checkpoint_keep=3,
                              eval_every=8, eval_batches=2, num_samples=0, peak_flops_per_device=1e9))
"""


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    return write_experiment(tmp_path_factory.mktemp("exp"), EXPERIMENT, "resilience")


def _env(devices=1):
    return cpu_env(devices)


def _cmd(experiment, run_dir, *sets):
    return train_cmd(experiment, run_dir, sets)


def _run(experiment, run_dir, *sets, devices=1):
    p = subprocess.run(_cmd(experiment, run_dir, *sets), cwd=ROOT, env=_env(devices), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


def _losses(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def _wait_for_lines(run_dir, n, proc, timeout=120):
    path = os.path.join(run_dir, "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(path) and sum(1 for _ in open(path)) >= n:
            return
        if proc.poll() is not None:
            return
        time.sleep(0.05)
    raise AssertionError("training made no progress")


@pytest.fixture(scope="module")
def reference_run(experiment, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref")
    _run(experiment, run)
    steps, losses = _losses(run)
    assert steps == list(range(1, 17))
    return run


@pytest.fixture(scope="module")
def reference(reference_run):
    return _losses(reference_run)[1]


@pytest.mark.slow  # make test-all / CI's slow phase
def test_sigkill_at_three_points_then_resume_gives_bit_identical_losses(experiment, reference, tmp_path):
    run = tmp_path / "run"
    for kill_after in (3, 7, 12):
        p = subprocess.Popen(_cmd(experiment, run), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        _wait_for_lines(run, kill_after, p)
        p.send_signal(signal.SIGKILL)
        p.wait()
    out = _run(experiment, run)
    assert "resumed from the checkpoint of step" in out
    steps, losses = _losses(run)
    assert steps == list(range(1, 17))  # every step once: lines after the checkpoint were dropped
    assert losses == reference  # bit-identical, not "close"


def _kill_during_a_save(experiment, run, after_step: int) -> bool:
    """Start the run; SIGKILL it as soon as a save of a step after `after_step` is being
    written (its temporary folder exists). Whether the folder was still there (the kill
    really cut a save in two)."""
    p = subprocess.Popen(_cmd(experiment, run), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    folder = run / "checkpoints"
    t0 = time.time()
    while time.time() - t0 < 300:
        assert p.poll() is None, "the run ended before a save after step %d" % after_step
        names = os.listdir(folder) if folder.is_dir() else []
        partial = [n for n in names if "orbax-checkpoint-tmp" in n and int(n.split(".")[0]) > after_step]
        if partial:
            p.send_signal(signal.SIGKILL)
            p.wait()
            return (folder / partial[0]).exists()
        time.sleep(0.001)
    raise AssertionError("no save started")


@pytest.mark.slow  # run by .ci/run after make test
def test_sigkill_in_the_middle_of_saves_then_resume_gives_identical_losses_and_parameters(experiment, reference_run,
                                                                                           tmp_path):
    run = tmp_path / "run"
    cut = [_kill_during_a_save(experiment, run, after) for after in (2, 8, 12)]
    assert any(cut), "no kill landed inside a save"  # (a save of this small model takes little time)
    out = _run(experiment, run)
    assert "resumed from the checkpoint of step" in out
    assert _losses(run) == _losses(reference_run)  # every step once, bit-identical
    for a, b in zip(_saved_params(run / "checkpoints" / "16"), _saved_params(reference_run / "checkpoints" / "16")):
        np.testing.assert_array_equal(a, b)
    assert not [n for n in os.listdir(run / "checkpoints") if "orbax-checkpoint-tmp" in n]


@pytest.mark.slow  # run by .ci/run after make test
def test_sigterm_saves_and_the_run_resumes(experiment, reference, tmp_path):
    run = tmp_path / "run"
    p = subprocess.Popen(_cmd(experiment, run), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    _wait_for_lines(run, 5, p)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out[-3000:]
    assert "received SIGTERM" in out and "run the same command again to resume" in out
    stopped_at = _losses(run)[0][-1]
    assert stopped_at < 16 and str(stopped_at) in os.listdir(run / "checkpoints")
    out = _run(experiment, run)
    assert f"resumed from the checkpoint of step {stopped_at}" in out
    assert _losses(run)[1] == reference


class _Watched:
    """A `lm train` child whose output lines are collected (with their times) as they come."""

    def __init__(self, cmd, env=None):
        import threading

        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env or _env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.time(), line))

    @property
    def out(self) -> str:
        return "".join(line for _, line in self.lines)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        t0 = time.time()
        while text not in self.out:
            assert self.proc.poll() is None and time.time() - t0 < timeout, f"no {text!r} in:\n{self.out[-3000:]}"
            time.sleep(0.02)

    def stop(self, sig, timeout: float = 30) -> float:
        """Send `sig`; the seconds until the process ended."""
        t0 = time.time()
        self.proc.send_signal(sig)
        self.proc.wait(timeout=timeout)
        self._reader.join(5)
        return time.time() - t0


def _one_line_stop(out: str, name: str, phase: str) -> None:
    assert "Traceback" not in out and "Exception ignored" not in out, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith(f"lm: stopped by {name} while {phase}") and "run the same command again" in last, out


def _reader_of(fifo: str) -> int | None:
    """A write end of `fifo` once a process has opened it for reading (else None)."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: nobody reads it yet
        return None


def test_sigint_while_preparing_the_data_ends_at_once_in_one_line(experiment, tmp_path):
    """Start-up stuck in a read (the tokenizer on a file system that hangs: a FIFO nobody
    writes): Ctrl-C ends it within seconds, one line, exit 130, no traceback or crash."""
    fifo = str(tmp_path / "tokenizer.model")
    os.mkfifo(fifo)
    p = _Watched(_cmd(experiment, tmp_path / "run", f"data.tokenizer={fifo}"))
    t0, writer = time.time(), None
    while writer is None:  # the run is now blocked reading the tokenizer
        assert p.proc.poll() is None and time.time() - t0 < 120, p.out
        writer = _reader_of(fifo)
        time.sleep(0.05)
    try:
        elapsed = p.stop(signal.SIGINT)
    finally:
        os.close(writer)
    assert p.proc.returncode == 130, p.out
    _one_line_stop(p.out, "SIGINT", "preparing the data and tokenizer")
    assert elapsed < 15, f"{elapsed:.0f}s"


def test_sigterm_while_compiling_ends_at_once_in_one_line(tmp_path):
    (tmp_path / "tiny.py").write_text(TINY)
    # without the session's compilation cache: a cached step would be "compiled" before the signal
    p = _Watched(train_cmd(str(tmp_path / "tiny.py"), tmp_path / "run"),
                 env={**_env(), "JAX_ENABLE_COMPILATION_CACHE": "false"})
    p.wait_for("compiling the train step")
    elapsed = p.stop(signal.SIGTERM)
    assert p.proc.returncode == 143, p.out
    _one_line_stop(p.out, "SIGTERM", "compiling the train step")
    assert "compiled the train step" not in p.out and elapsed < 15, (elapsed, p.out)
    assert not os.listdir(tmp_path / "run" / "checkpoints")  # nothing was trained: nothing saved


# Enough rows per run that grain's read-ahead (hundreds of documents) runs dry mid-run.
STALL_SETS = ("trainer.steps=40", "data.batch_size=64")


@pytest.fixture(scope="module")
def stalled(experiment, tmp_path_factory):
    """A run whose data source stops answering mid-run (its files become FIFOs nobody writes:
    opening one blocks, as a read on a hung file system does), then SIGTERM: (experiment
    copy, run dir, output, seconds to exit, exit code). The files are real again after."""
    d = tmp_path_factory.mktemp("stalled")
    for name in ("a.jsonl", "b.txt", "sp.model", "resilience.py"):
        shutil.copy(os.path.join(os.path.dirname(experiment), name), d / name)
    exp = d / "resilience.py"
    exp.write_text(exp.read_text().replace(os.path.dirname(experiment), str(d)))
    run = d / "run"
    p = _Watched(_cmd(str(exp), run, *STALL_SETS))
    sources = [str(d / "a.jsonl"), str(d / "b.txt")]
    try:
        p.wait_for("compiling the train step")  # start-up has read what it needs
        for path in sources:  # from now on, every read of a document blocks
            os.rename(path, path + ".real")
            os.mkfifo(path)
        _wait_for_lines(run, 1, p.proc)
        logged, t0 = -1, time.time()
        while True:  # the steps stop: the read-ahead is used up and the loop waits for data
            n = len(open(run / "metrics.jsonl").readlines())
            if n == logged and time.time() - t0 > 3:
                break
            if n != logged:
                logged, t0 = n, time.time()
            assert p.proc.poll() is None, p.out
            time.sleep(0.1)
        assert 0 < logged < 40, p.out
        elapsed = p.stop(signal.SIGTERM)
    finally:
        if p.proc.poll() is None:
            p.proc.kill()
        for path in sources:
            if os.path.exists(path + ".real"):
                os.replace(path + ".real", path)
    return exp, run, p.out, elapsed, p.proc.returncode


@pytest.mark.slow  # ~20 s (a run that must use up grain's read-ahead); run by .ci/run after make test
def test_sigterm_while_waiting_for_data_ends_at_once_and_saves_the_last_step(stalled):
    exp, run, out, elapsed, code = stalled
    assert code == 0 and elapsed < 15, (elapsed, out[-3000:])
    assert "Traceback" not in out and "Exception ignored" not in out, out[-3000:]
    line = [line for line in out.splitlines() if "received SIGTERM while waiting for data" in line]
    assert line and "saved the checkpoint of step" in line[0], out
    stopped_at = int(line[0].split("checkpoint of step ")[1].split()[0])
    assert 0 < stopped_at < 40 and str(stopped_at) in os.listdir(run / "checkpoints")
    assert _losses(run)[0][-1] == stopped_at


@pytest.mark.slow  # run by .ci/run after make test
def test_a_run_stopped_while_waiting_for_data_resumes_exactly(stalled, tmp_path):
    """The checkpoint saved in a data wait holds the data position after the last step's batch:
    the resumed run's losses equal an uninterrupted run's, bit for bit."""
    exp, run, out, _, _ = stalled
    stopped_at = _losses(run)[0][-1]
    resumed = _run(str(exp), run, *STALL_SETS)
    assert f"resumed from the checkpoint of step {stopped_at}" in resumed
    _run(str(exp), tmp_path / "reference", *STALL_SETS)
    assert _losses(run) == _losses(tmp_path / "reference")


@pytest.mark.slow  # run by .ci/run after make test
def test_truncated_latest_checkpoint_falls_back_to_the_previous(experiment, reference_run, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)  # a finished run of the experiment
    ckpts = sorted(int(s) for s in os.listdir(run / "checkpoints") if s.isdigit())
    assert ckpts[-1] == 16 and len(ckpts) >= 2
    # truncate every data file of the latest checkpoint's state
    state_dir = run / "checkpoints" / "16" / "state"
    for dirpath, _, files in os.walk(state_dir):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "r+b") as fh:
                fh.truncate(max(0, os.path.getsize(path) // 3))
    out = _run(experiment, run, "trainer.steps=18")
    assert "checkpoints/16 cannot be restored" in out
    assert f"resumed from the checkpoint of step {ckpts[-2]}" in out
    steps, losses = _losses(run)
    # steps after the fallback are recomputed (with the 18-step schedule, so not compared)
    assert steps == list(range(1, 19)) and losses[:ckpts[-2]] == reference[:ckpts[-2]]


def test_nan_steps_are_skipped_then_the_run_stops(tmp_path):
    from lm.config import Config, DataConfig, ModelConfig, OptimConfig, TrainerConfig
    from lm.stages.runner import train

    cfg = Config(model=ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64,
                                   max_seq_len=16),
                 optim=OptimConfig(lr=1e30, warmup_steps=0, schedule="constant", clip_norm=0.0),
                 data=DataConfig(corpus="synthetic", seq_len=16, batch_size=8),
                 trainer=TrainerConfig(steps=30, log_every=1, checkpoint_every=1, max_bad_steps=3, num_samples=0))
    logs = []
    summary = train(cfg, str(tmp_path), log=logs.append, progress=False)
    assert summary["stopped"] and "3 consecutive steps" in summary["stopped"]
    # lr=1e30 makes every update absurd (parameters ~1e30): the step refuses each one, from
    # the first, so the run stops after three and nothing was checkpointed
    assert summary["skipped_steps"] == 3 and summary["steps"] == 3
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["skipped"] for r in rows] == [1, 1, 1] and rows[-1]["skipped_steps"] == 3
    assert os.listdir(tmp_path / "checkpoints") == []


def _cut_back(run, step: int) -> None:
    """Make a finished run look as if it had been killed just after saving the checkpoint of
    `step`: later checkpoints, metric lines and the summary are gone, so whatever follows
    `step` in the run's metrics afterwards was computed again by the resumed run."""
    for name in os.listdir(run / "checkpoints"):
        if name.isdigit() and int(name) > step:
            shutil.rmtree(run / "checkpoints" / name)
    rows = [line for line in open(run / "metrics.jsonl") if json.loads(line)["step"] <= step]
    (run / "metrics.jsonl").write_text("".join(rows))
    (run / "summary.json").unlink()
    assert _losses(run)[0][-1] == step


def _saved_params(step_dir) -> list[np.ndarray]:
    """The parameter arrays of a checkpoint folder (a step, or one set aside)."""
    import orbax.checkpoint as ocp

    tree = ocp.PyTreeCheckpointer().restore(os.path.join(step_dir, "state"))
    return [np.asarray(x) for x in jax.tree.leaves(tree["params"])]


@pytest.mark.slow  # make test-all / CI's slow phase
def test_a_huge_learning_rate_never_saves_absurd_parameters_and_the_last_good_checkpoint_resumes(tmp_path):
    """lr=1e30 once wrote parameters of magnitude 1e28-1e30 into a checkpoint that looked good
    (finite): the step now refuses such an update, so no checkpoint (kept or set aside) holds
    one, and the run resumes from its last good checkpoint with a sane learning rate."""
    import dataclasses

    from lm.config import Config, DataConfig, ModelConfig, OptimConfig, TrainerConfig
    from lm.stages.runner import train

    good = Config(name="huge_lr",
                  model=ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64,
                                    max_seq_len=16),
                  optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant", clip_norm=0.0),
                  data=DataConfig(corpus="synthetic", seq_len=16, batch_size=8),
                  trainer=TrainerConfig(steps=4, log_every=1, checkpoint_every=1, max_bad_steps=3, eval_batches=1,
                                        num_samples=0))
    quiet = dict(log=lambda *_: None, progress=False)
    train(good, str(tmp_path), **quiet)
    longer = dataclasses.replace(good.trainer, steps=12)
    huge = dataclasses.replace(good, optim=dataclasses.replace(good.optim, lr=1e30), trainer=longer)
    summary = train(huge, str(tmp_path), **quiet)
    assert summary["stopped"] and "3 consecutive steps" in summary["stopped"]
    folders = [n for n in os.listdir(tmp_path / "checkpoints") if n.isdigit() or n.startswith(".suspect-")]
    assert not [n for n in folders if n.isdigit() and int(n) > 4], folders  # the bad steps were not saved
    # the state saved just before the first bad step is set aside (kept) in case it caused them,
    # so that a resume starts from a state that is really good
    assert [n for n in folders if n.startswith(".suspect-4-")] and "set aside" in summary["stopped"], folders
    for name in folders:  # kept or set aside: every saved state is finite and sane
        largest = max(float(np.abs(x).max()) for x in _saved_params(tmp_path / "checkpoints" / name))
        assert largest < 100, (name, largest)
    logs = []
    summary = train(dataclasses.replace(good, trainer=longer), str(tmp_path), log=logs.append, progress=False)
    last_good = max(int(n) for n in folders if n.isdigit())
    assert f"resumed from the checkpoint of step {last_good}" in "\n".join(map(str, logs))
    assert summary["stopped"] is None and summary["steps"] == 12 and np.isfinite(summary["final_train_loss"])


@pytest.mark.slow  # run by .ci/run after make test
def test_resume_on_a_different_device_count(experiment, tmp_path):
    import shutil

    sets = ("mesh.data=1", "mesh.fsdp=-1", "trainer.checkpoint_keep=20")
    full = tmp_path / "full"
    _run(experiment, full, *sets, devices=8)
    part = tmp_path / "part"  # the same run, as if it had stopped at step 8
    shutil.copytree(full, part)
    _cut_back(part, 8)
    out = _run(experiment, part, *sets, devices=4)  # saved with fsdp=8, resumed with fsdp=4
    assert "resumed from the checkpoint of step 8" in out and "4 cpu device(s)" in out
    (steps, a), (resumed_steps, b) = _losses(full), _losses(part)
    assert resumed_steps == steps == list(range(1, 17))
    # steps 9-16 were taken again on 4 devices: the same losses up to the order of float sums
    np.testing.assert_allclose(b[8:], a[8:], rtol=2e-4)


def test_failed_save_is_reported_and_keeps_earlier_checkpoints_and_best_is_kept(tmp_path):
    import jax.numpy as jnp

    from lm.train.checkpoint import Checkpointer

    logs = []
    ck = Checkpointer(str(tmp_path), keep=2, log=logs.append)
    state = {"w": jnp.arange(4.0)}
    losses = {1: 3.0, 2: 1.0, 3: 2.5, 4: 2.0, 5: 2.2}  # step 2 is the best
    for step, loss in losses.items():
        assert ck.save(step, {"w": state["w"] + step}, None, {"step": step}, {"eval_loss": loss})
    ck.wait()
    assert ck.steps() == [2, 4, 5]  # the last two, plus the best by held-out loss

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    ck.manager.save = full_disk
    assert ck.save(6, state, None, {"step": 6}) is False
    assert "saving the checkpoint of step 6 failed" in logs[-1] and "No space left" in logs[-1]
    assert ck.steps() == [2, 4, 5] and ck.failed_saves == 1
    restored = ck.restore_latest({"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
    assert restored[3] == 5 and np.allclose(restored[0]["w"], np.arange(4.0) + 5)
    ck.close()


@contextlib.contextmanager
def _unwritable(directory):
    """`directory` made unwritable: by its mode for a normal user; root ignores modes, so for
    root by the immutable attribute (chattr +i), or the test is skipped."""
    directory = str(directory)
    if os.geteuid() != 0:
        os.chmod(directory, 0o555)
        undo = lambda: os.chmod(directory, 0o755)  # noqa: E731
    else:
        if not shutil.which("chattr") or subprocess.run(["chattr", "+i", directory], capture_output=True).returncode:
            pytest.skip("running as root, where a mode does not stop writes, and chattr +i is not available here")
        undo = lambda: subprocess.run(["chattr", "-i", directory], check=True)  # noqa: E731
    try:
        try:
            os.mkdir(os.path.join(directory, "probe"))
            os.rmdir(os.path.join(directory, "probe"))
            pytest.skip(f"could not make {directory} unwritable")
        except PermissionError:
            pass
        yield
    finally:
        undo()


TINY = """
from lm.config import Config, DataConfig, ModelConfig, OptimConfig, TrainerConfig

def config():
    return Config(
        name="tiny",
        model=ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, max_seq_len=16),
        optim=OptimConfig(lr=1e-3, warmup_steps=1),
        data=DataConfig(corpus="synthetic", seq_len=16, batch_size=8),
        trainer=TrainerConfig(steps=4, log_every=1, checkpoint_every=2, eval_batches=1, num_samples=0,
                              peak_flops_per_device=1e9))
"""


def test_an_unwritable_checkpoint_directory_fails_each_save_once_and_the_run_ends(tmp_path, capfd):
    """Each failed save is one line, no Orbax thread outlives the run (the process hung ~5
    minutes after its last step) or prints tracebacks, and no final checkpoint means exit 1."""
    import threading

    from lm.cli import main

    (tmp_path / "tiny.py").write_text(TINY)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with _unwritable(run / "checkpoints"):
        assert main(["train", str(tmp_path / "tiny.py"), "--run-dir", str(run), "--no-progress"]) == 1
    out = "".join(capfd.readouterr())
    assert "Traceback" not in out and "ERROR" not in out, out[-3000:]
    for step in (2, 4):
        assert len([line for line in out.splitlines() if f"checkpoint of step {step} failed" in line]) == 1, out
    assert "the final checkpoint (step 4) was not saved" in out
    t0 = time.time()
    while time.time() - t0 < 10 and [t for t in threading.enumerate() if not t.daemon and t.name != "MainThread"]:
        time.sleep(0.1)
    assert not [t.name for t in threading.enumerate() if not t.daemon and t.name != "MainThread"]


@pytest.mark.slow  # run by .ci/run after make test
def test_an_unwritable_checkpoint_directory_lets_the_process_exit_at_once(experiment, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with _unwritable(run / "checkpoints"):
        p = subprocess.Popen(_cmd(experiment, run, "trainer.steps=4"), cwd=ROOT, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = [(time.time(), line) for line in p.stdout]  # until the process closes its output
        p.wait(timeout=300)
        ended = time.time()
    out = "".join(line for _, line in lines)
    assert p.returncode == 1 and "the final checkpoint (step 4) was not saved" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert ended - lines[-1][0] < 10, f"exited {ended - lines[-1][0]:.0f}s after its last line"


# Threads of the failed save that outlive its first error hit a closed event loop (asyncio
# reports it as unraisable): noise inside Orbax, not a second report of the failure.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_save_failing_in_the_background_is_one_line_and_leaves_no_partial_folder(tmp_path, caplog, capfd):
    import jax.numpy as jnp

    from lm.train.checkpoint import Checkpointer

    logs = []
    ck = Checkpointer(str(tmp_path), log=logs.append)
    # metadata JSON cannot encode: the background writer fails (as a full disk would, mid-save)
    assert ck.save(1, {"w": jnp.ones(3)}, None, {"unencodable": {1, 2}})
    assert ck.save(2, {"w": jnp.ones(3)}, None, {})
    ck.close()
    assert [m for m in logs if "WARNING" in m] == [logs[0]] and "step 1 failed" in logs[0], logs
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    assert "Traceback" not in capfd.readouterr().err
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


@pytest.mark.slow  # make test-all / CI's slow phase
def test_muon_state_resumes_exactly(experiment, tmp_path):
    """The default job trains with Muon: its momentum (and the AdamW moments of the other
    parameters) come back from a checkpoint, so a run resumed from the middle takes the
    same steps as one that never stopped."""
    sets = ("optim.name=muon", "trainer.steps=8", "trainer.eval_every=0")
    ref = tmp_path / "ref"
    _run(experiment, ref, *sets)
    steps, ref_losses = _losses(ref)
    assert steps == list(range(1, 9))
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    kept = sorted(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit())
    assert 4 in kept and kept[-1] == 8
    _cut_back(run, 4)
    out = _run(experiment, run, *sets)
    assert "resumed from the checkpoint of step 4" in out, out[-1000:]
    steps, losses = _losses(run)
    assert steps == list(range(1, 9)), out[-1000:]
    assert losses[4:] == ref_losses[4:]  # steps 5-8, taken again from the checkpoint: bit-identical
