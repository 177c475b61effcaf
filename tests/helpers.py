"""Shared test helpers: small on-disk corpora, experiment files and subprocess runs."""

import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA flags of every test process and of the `python -m lm ...` children they start: the CPU
# backend's code generation without LLVM's optimisation passes. The tests' models are tiny, so
# their programs run about as fast either way, and compiling them (most of a test's time) takes
# about half as long. Results stay deterministic; they may differ from an optimised build's in
# the last bits, so a test compares runs made under the same flags.
XLA_TEST_FLAGS = "--xla_backend_optimization_level=0"


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
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices} {XLA_TEST_FLAGS}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def train_cmd(experiment: str, run_dir, sets=(), extra=()) -> list[str]:
    cmd = [sys.executable, "-m", "lm", "train", experiment, "--run-dir", str(run_dir), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    return cmd + list(extra)


def corpus_tokenizer(directory, vocab_size: int = 1024, n_docs: int = 300, tool_tokens: bool = False):
    """The project's real tokenizer (SentencePiece BPE, byte fallback, chat tokens; the tool
    tokens too with `tool_tokens`), trained on the first `n_docs` documents of the embedded
    default corpus (about a second)."""
    from data_pipeline import default_corpus
    from data_pipeline.tokenizer import train_tokenizer

    docs = [d.text() for d in default_corpus.documents()[:n_docs]]
    return train_tokenizer(docs, vocab_size, str(directory / "sp"), tool_tokens=tool_tokens)


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


def quiet(*_):
    """A log function that prints nothing."""


# -- the small base run of the post-training tests (SFT, reward, DPO, RL) -------------------
#
# A briefly pretrained model on the embedded default corpus with the project's real tokenizer
# (helpers.corpus_tokenizer: chat role tokens included). conftest.base_run trains it once per
# session; experiment files written by tests load BASE (formatted) to get its config. Its
# context (128) holds every conversation of conversations() whole; it trains on rows of 64.

BASE_VOCAB = 1024

BASE = """
from lm.config import Config, DataConfig, ModelConfig, OptimConfig, TrainerConfig

def config():
    return Config(
        name="base",
        model=ModelConfig(vocab_size={vocab}, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                          max_seq_len=64, attention_block=16),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        data=DataConfig(corpus="default", seq_len=64, batch_size=8, tokenizer={tok!r}, prefetch=2),
        trainer=TrainerConfig(steps=20, log_every=5, checkpoint_every=10, eval_batches=2, num_samples=0,
                              peak_flops_per_device=1e9))
"""

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()


def conversations(n: int, seed: int = 0) -> list[dict]:
    """Learnable chats: the assistant repeats the user's words in reverse order."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        turns = []
        for _ in range(1 + i % 2):
            words = list(rng.choice(WORDS, rng.integers(2, 5)))
            turns += [{"role": "user", "content": "reverse: " + " ".join(words)},
                      {"role": "assistant", "content": " ".join(words[::-1])}]
        if i % 3 == 0:
            turns = [{"role": "system", "content": "You reverse words."}] + turns
        out.append({"messages": turns})
    return out


def make_base_run(directory) -> dict:
    """Train the base run in `directory`: {"dir", "run", "chat" (a chat file of conversations()),
    "exp" (its experiment file), "cfg"}."""
    from lm import experiment
    from lm.stages.runner import train

    tok = corpus_tokenizer(directory, BASE_VOCAB)
    exp = directory / "base.py"
    exp.write_text(BASE.format(tok=tok.path, vocab=BASE_VOCAB))
    cfg = experiment.load(str(exp))
    run = directory / "base_run"
    train(cfg, str(run), log=quiet, progress=False)
    chat = directory / "chat.jsonl"
    chat.write_text("".join(json.dumps(c) + "\n" for c in conversations(400)))
    return {"dir": directory, "run": str(run), "chat": str(chat), "exp": str(exp), "cfg": cfg}


def sft_config(base: dict, **trainer):
    """An SFT run from the base run on its chat file (trainer settings overridable)."""
    from lm.config import Config, DataConfig, OptimConfig, SourceConfig, TrainerConfig

    t = dict(steps=30, log_every=1, eval_every=15, eval_batches=2, checkpoint_every=5, num_samples=0,
             init_from=base["run"], peak_flops_per_device=1e9)  # (a child need not measure the CPU's peak)
    t.update(trainer)
    return Config(
        name="sft", stage="sft", model=base["cfg"].model,
        optim=OptimConfig(lr=3e-3, warmup_steps=2, weight_decay=0.0),
        data=DataConfig(corpus="sources", seq_len=64, batch_size=8, prefetch=2,
                        sources=(SourceConfig(name="chat", kind="chat", paths=(base["chat"],), heldout_fraction=0.1),)),
        trainer=TrainerConfig(**t))


def pair_file(path, n: int = 300, seed: int = 0) -> str:
    """Pairs whose preferred reply follows a rule: it starts with "Yes" (and has the right sum)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.integers(0, 50, 2)
            wrong = int(a + b + rng.integers(1, 9))
            f.write(json.dumps({"prompt": f"What is {a} + {b}?", "chosen": f"Yes: {a} + {b} = {a + b}.",
                                "rejected": f"No: {a} + {b} = {wrong}."}) + "\n")
    return str(path)


def pref_config(base: dict, stage: str, path: str, **changes):
    """A reward-model or DPO-family run from the base run on the pairs of `path`."""
    import dataclasses

    from lm.config import Config, DataConfig, OptimConfig, PreferenceConfig, SourceConfig, TrainerConfig

    model = base["cfg"].model
    if stage == "reward":
        model = dataclasses.replace(model, scalar_heads=("reward",))
    cfg = Config(name=stage, stage=stage, model=model, pref=PreferenceConfig(),
                 optim=OptimConfig(lr=1e-3, warmup_steps=2, weight_decay=0.0),
                 data=DataConfig(corpus="sources", seq_len=48, batch_size=8, prefetch=2,
                                 sources=(SourceConfig(name="p", kind="preference", paths=(path,),
                                                       heldout_fraction=0.1),)),
                 trainer=TrainerConfig(steps=4, log_every=1, eval_every=0, eval_batches=2, checkpoint_every=2,
                                       num_samples=0, init_from=base["run"]))
    return dataclasses.replace(cfg, **changes)


def reward_run(base: dict, directory, n: int = 60) -> str:
    """A reward model trained briefly (pref_config: 4 steps) from the base run on `n` pairs of
    pair_file, in directory/rm: the run directory."""
    from lm.stages.runner import train

    run = directory / "rm"
    train(pref_config(base, "reward", pair_file(directory / "p.jsonl", n)), str(run), progress=False, log=quiet)
    return str(run)


# -- random models of a few Llama shapes (Hugging Face interop) ------------------------------

def _shapes():
    from lm.config import ModelConfig

    return [
        ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=16,
                    rope_theta=10000.0, norm_eps=1e-5),
        ModelConfig(vocab_size=61, d_model=48, n_layers=3, n_heads=6, n_kv_heads=6, d_ff=40, max_seq_len=16,
                    rope_theta=500000.0, norm_eps=1e-6, tie_embeddings=True),
        ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, n_kv_heads=1, head_dim=16, d_ff=64,
                    max_seq_len=16, rope_theta=1000.0),
    ]


# Three shapes: grouped-query attention; tied embeddings; one KV head with its own head size.
SHAPES = _shapes()
SHAPE_IDS = ["gqa", "tied", "mqa-headdim"]


def random_model(cfg, seed: int = 0):
    """A Transformer of `cfg` with random weights, its norm scales perturbed (a swapped norm shows)."""
    import jax
    from flax import nnx

    from lm.model.transformer import Transformer

    model = Transformer(cfg, nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    pure = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(seed + 1), x.shape),
                        state.to_pure_dict())
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


def random_tokens(cfg, b: int = 2, t: int = 12):
    import jax.numpy as jnp

    return jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t)), jnp.int32)


def tool_happy_run(d):
    """A random chat run (tool tokens in its tokenizer) whose every position puts much of its
    mass on <|tool_call|> and <|end|>: its samples call tools (malformed calls: error results)
    and end turns, so rollouts take the tool path. Returns the run directory."""
    from flax import nnx

    from data_pipeline.chat import chat_token_ids, tool_token_ids
    from lm.config import ModelConfig
    from lm.interop.hf import export_llama
    from lm.model.transformer import Transformer
    from lm.tools.hf_runs import import_run

    tok = corpus_tokenizer(d, 1024, tool_tokens=True)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                      max_seq_len=256, tie_embeddings=False)
    model = Transformer(cfg, nnx.Rngs(0))
    model.embed[...] = model.embed[...].at[:, 0].set(5.0)  # one large direction in every position's state
    head = model.head[...].at[0, :].set(0.0)
    model.head[...] = head.at[0, tool_token_ids(tok)["tool_call"]].set(1.0).at[0, chat_token_ids(tok)["end"]].set(0.8)
    export_llama(cfg, nnx.state(model, nnx.Param), str(d / "hf"), tokenizer_model=tok.path)
    run = d / "tool_run"
    import_run(str(d / "hf"), str(run), log=lambda *_: None)
    c = json.loads((run / "config.json").read_text())
    c["stage"] = "sft"
    (run / "config.json").write_text(json.dumps(c))
    return str(run)


def kill_at_checkpoint_then_resume(experiment: str, run, step: int = 3, lines: int = 4):
    """Train `experiment` into `run`, SIGKILL it once the checkpoint of `step` is written and
    metrics.jsonl has `lines` lines, then run it again to the end: the rerun's CompletedProcess."""
    import pathlib
    import signal
    import subprocess
    import time

    run = pathlib.Path(run)
    proc = subprocess.Popen(train_cmd(experiment, run), cwd=ROOT, env=cpu_env(1), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t0, path = time.time(), run / "metrics.jsonl"
    while time.time() - t0 < 400 and proc.poll() is None:
        if (run / "checkpoints" / str(step)).is_dir() and path.exists() and sum(1 for _ in open(path)) >= lines:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return subprocess.run(train_cmd(experiment, run), cwd=ROOT, env=cpu_env(1), capture_output=True, text=True,
                          timeout=600)
