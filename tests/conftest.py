"""Test setup: CPU with 8 fake devices, quick compiles and one JAX compilation cache per
session (all set before JAX is imported), --runslow, and the fixtures several test modules
share."""

import atexit
import os
import shutil
import sys
import tempfile

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TESTS))
sys.path.insert(0, TESTS)

import helpers  # noqa: E402 (imports no JAX)

_flags = os.environ.get("XLA_FLAGS", "").split()
_flags += [f for f in ["--xla_force_host_platform_device_count=8", *helpers.XLA_TEST_FLAGS.split()] if f not in _flags]
os.environ["XLA_FLAGS"] = " ".join(_flags)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# A persistent compilation cache, new for every test session and removed at its end, shared by
# everything the session runs: tests compile the same train steps and models again and again
# (each run jits its own step), and so do the `python -m lm ...` children they start (they
# inherit the environment). Nothing outside the session writes to it, so no entry is stale.
# A pytest-xdist worker uses its controller's cache (the controller set the variable).
_CACHE_VAR = "LM_TESTS_JAX_CACHE"
if not (os.environ.get("PYTEST_XDIST_WORKER") and os.path.isdir(os.environ.get(_CACHE_VAR, ""))):
    os.environ[_CACHE_VAR] = tempfile.mkdtemp(prefix="lm-tests-jax-cache-")
    atexit.register(shutil.rmtree, os.environ[_CACHE_VAR], True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_CACHE_VAR]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # every program, however quick to compile
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"  # and however small

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; run with --runslow (make test-all)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# -- shared runs (built once per session, only by the sessions that use them) ---------------
# Tests read these runs and never change them: a test that would change one copies it first
# (shutil.copytree into its tmp_path).


def _once_per_session(tmp_path_factory, name: str, build):
    """`build(directory) -> JSON-able dict`, run once per test session: under pytest-xdist the
    first worker that needs it builds it in the folder the workers share, the others wait for
    it (a file lock) and read what it returned."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build(tmp_path_factory.mktemp(name))
    import fcntl
    import json

    shared = tmp_path_factory.getbasetemp().parent  # the session's folder, above each worker's
    result = shared / f"{name}.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not result.exists():
            directory = shared / name
            directory.mkdir()
            result.write_text(json.dumps(build(directory)))
    return json.loads(result.read_text())


@pytest.fixture(scope="session")
def base_run(tmp_path_factory):
    """A briefly pretrained base run with the real tokenizer (chat tokens), and a chat file:
    {"dir", "run", "chat", "exp", "cfg"} (helpers.make_base_run)."""
    import pathlib

    from lm import experiment

    made = _once_per_session(tmp_path_factory, "base", lambda d: {
        k: str(v) for k, v in helpers.make_base_run(d).items() if k != "cfg"})
    return {**made, "dir": pathlib.Path(made["dir"]), "cfg": experiment.load(made["exp"])}


@pytest.fixture(scope="session")
def sft_run(base_run, tmp_path_factory):
    """A short full-parameter SFT run from the base run (60 steps, held-out evaluation at 30
    and 60, two samples): {"run", "summary", "logs"}."""
    from lm.stages.runner import train

    def build(directory):
        logs = []
        run = directory / "run"
        summary = train(helpers.sft_config(base_run, steps=60, eval_every=30, checkpoint_every=30, num_samples=2,
                                           sample_tokens=8),
                        str(run), log=logs.append, progress=False)
        return {"run": str(run), "summary": summary, "logs": "\n".join(map(str, logs))}

    return _once_per_session(tmp_path_factory, "sft", build)
