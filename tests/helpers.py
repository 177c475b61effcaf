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


def write_task_files(directory, n: int = 12) -> str:
    """Task files of every log-likelihood task in the formats of ../shared/data (its README),
    with `n` made-up items each, including the awkward whitespace real items have (a PIQA
    query ending in a line break, contexts ending in spaces, unicode); returns the folder."""
    import bz2

    rng = np.random.default_rng(0)
    nouns = "cat dog river bread lamp garden violin Zoë café winter".split()
    verbs = "opens eats paints carries finds cleans bakes hears".split()

    def phrase(k):
        return " ".join(f"{rng.choice(verbs)} the {rng.choice(nouns)}" for _ in range(k))

    root = directory / "tasks"
    for sub in ("hellaswag", "arc", "piqa", "winogrande", "lambada_openai"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        ctx = f"Activity {i}: A person {phrase(2)}." + (" they " if i % 3 == 0 else " they")
        lines += [ctx, str(i % 4)] + [phrase(int(rng.integers(1, 4))) + "." for _ in range(4)]
    with bz2.open(root / "hellaswag" / "hellaswag_val_full.txt.bz2", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    for name, folder, k in (("arc_easy", "arc", 4), ("arc_challenge", "arc", 4), ("piqa", "piqa", 2)):
        with open(root / folder / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for i in range(n):
                query = f"Question: Who {phrase(1)} {i}?" + ("\n" if name == "piqa" else "")
                choices = [phrase(int(rng.integers(1, 3))) for _ in range(k)]
                f.write(json.dumps({"query": query, "choices": choices, "gold": int(i % k)}) + "\n")
    with open(root / "winogrande" / "winogrande.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            a, b = rng.choice(nouns, 2, replace=False)
            stem = f"The {a} {phrase(1)} because the "
            f.write(json.dumps({"context_options": [stem + a, stem + b], "continuation": f"{phrase(1)}.",
                                "gold": int(i % 2)}) + "\n")
    with open(root / "lambada_openai" / "lambada_openai.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"context": f"{phrase(3)}.\n\n\"{phrase(2)}\" {phrase(1)} the",
                                "continuation": str(rng.choice(nouns))}) + "\n")
    return str(root)
