"""Shared test helpers: small on-disk corpora, experiment files and subprocess runs."""

import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_experiment(directory, template: str, name: str) -> str:
    """A two-source corpus (JSON Lines + blank-line text), a 384-piece tokenizer, and an
    experiment module from `template` (formatted with paths a, b and tok) in `directory`."""
    from data_pipeline.tokenizer import train_tokenizer

    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()
    docs = [" ".join(rng.choice(words, rng.integers(5, 80))) for _ in range(300)]
    with open(directory / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in docs[:200])
    (directory / "b.txt").write_text("\n\n".join(docs[200:]))
    tok = train_tokenizer(docs, 384, str(directory / "sp"))
    path = directory / f"{name}.py"
    path.write_text(template.format(a=str(directory / "a.jsonl"), b=str(directory / "b.txt"), tok=tok.path))
    return str(path)


def cpu_env(devices: int) -> dict:
    """Environment for a child process with `devices` fake CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def train_cmd(experiment: str, run_dir, sets=(), extra=()) -> list[str]:
    cmd = [sys.executable, "-m", "lm", "train", experiment, "--run-dir", str(run_dir), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    return cmd + list(extra)


def corpus_tokenizer(directory, vocab_size: int = 1024, n_docs: int = 300):
    """The project's real tokenizer (SentencePiece BPE, byte fallback, chat tokens), trained on
    the first `n_docs` documents of the embedded default corpus (about a second)."""
    from data_pipeline import default_corpus
    from data_pipeline.tokenizer import train_tokenizer

    docs = [d.text() for d in default_corpus.documents()[:n_docs]]
    return train_tokenizer(docs, vocab_size, str(directory / "sp"))
