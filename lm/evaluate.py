"""Evaluation: held-out loss, multiple-choice tasks by log-likelihood, LAMBADA.

Every task reduces to log-likelihood requests (context tokens, continuation tokens),
scored in batches by one jit-compiled function: the sum of the continuation's
log-probabilities and whether it is the greedy continuation. Multiple-choice accuracy
picks the choice with the highest log-likelihood ("acc") or the highest per byte of the
choice's text ("acc_norm"); LAMBADA counts a hit when the last word is the greedy
continuation.

Task files are read by path from a data folder (default: the optional ../shared/data
beside the repository, or LM_DATA, or --data-dir; a missing folder is a clear error) in
the formats its README documents: HellaSwag (bzip2 text, 6 lines per item), ARC-Easy and
-Challenge, PIQA (JSON Lines: query, choices, gold), Winogrande (context_options,
continuation, gold), LAMBADA (context, continuation), GSM8K (question, answer with
"#### N"), WMT22 general test and Multi30k (aligned source/reference lines).

Generation tasks decode greedily with the KV-cache sampler, in batches: GSM8K (3-shot
from its train split) is scored by exact match of the final number; translation
(zero-shot "English: ... German:" prompts) by corpus BLEU and chrF.
"""

from __future__ import annotations

import bz2
import json
import math
import os
import re
from functools import partial
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline.errors import NotFound

DEFAULT_DATA = os.environ.get("LM_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))

MC_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande")
GEN_TASKS = ("gsm8k", "wmt22_en_de", "wmt22_de_en", "multi30k_en_de")
TASKS = ("heldout",) + MC_TASKS + ("lambada",) + GEN_TASKS


# ---------------------------------------------------------------------------------------
# Scoring


@partial(jax.jit, static_argnums=0)
def _score(logits_fn, params, tokens, targets, mask):
    """Sum of log p(target) over masked positions, and whether all were argmax."""
    logits = logits_fn(params, tokens).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    tgt = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == targets
    return (tgt * mask).sum(-1), jnp.all(greedy | (mask == 0), axis=-1)


def loglikelihoods(logits_fn: Callable, params, requests: Sequence[tuple[list[int], list[int]]], max_len: int,
                   batch_size: int = 16, progress: bool = False, desc: str = "",
                   batch_sharding=None) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), continuation is greedy) for each request.

    `logits_fn(params, tokens (B, T)) -> (B, T, V)` is compiled once per shape (it is a
    static argument: pass the same function object). Contexts are cut from the left to
    fit `max_len`. With `batch_sharding` (a NamedSharding over the batch axis) the rows
    of each batch are spread over the devices.
    """
    out: list[tuple[float, bool]] = [None] * len(requests)  # type: ignore[list-item]
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc=desc or "score", unit="req", dynamic_ncols=True)
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        seqs = []
        for i in idx:
            ctx, cont = requests[i]
            if not cont:
                raise ValueError(f"request {i} has an empty continuation")
            seq = (list(ctx) + list(cont))[-(max_len + 1):]
            seqs.append((seq, len(cont)))
        width = max(len(s) - 1 for s, _ in seqs)
        width = min(max_len, int(2 ** math.ceil(math.log2(max(width, 8)))))  # few distinct shapes
        tokens = np.zeros((batch_size, width), np.int32)
        targets = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), np.float32)
        for r, (seq, n_cont) in enumerate(seqs):
            n = len(seq) - 1
            tokens[r, :n] = seq[:-1]
            targets[r, :n] = seq[1:]
            mask[r, n - n_cont: n] = 1.0
        if batch_sharding is not None:
            tokens, targets, mask = (jax.device_put(a, batch_sharding) for a in (tokens, targets, mask))
        ll, greedy = jax.device_get(_score(logits_fn, params, tokens, targets, mask))
        for r, i in enumerate(idx):
            out[i] = (float(ll[r]), bool(greedy[r]))
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return out


# ---------------------------------------------------------------------------------------
# Tasks: each item is (contexts, continuations, gold) with one context or one continuation


def _jsonl(path: str) -> Iterable[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def load_task(name: str, data_dir: str = DEFAULT_DATA) -> list[dict]:
    """Items {"contexts": [...], "continuations": [...], "gold": int} (or LAMBADA pairs)."""
    d = os.path.normpath(data_dir)
    if name == "hellaswag":
        with bz2.open(os.path.join(d, "hellaswag", "hellaswag_val_full.txt.bz2"), "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
        return [{"contexts": [lines[i]], "continuations": [" " + e for e in lines[i + 2: i + 6]],
                 "gold": int(lines[i + 1])} for i in range(0, len(lines) - 5, 6)]
    if name in ("arc_easy", "arc_challenge", "piqa"):
        folder = "arc" if name.startswith("arc") else "piqa"
        return [{"contexts": [r["query"].rstrip() + "\nAnswer:"], "continuations": [" " + c for c in r["choices"]],
                 "gold": int(r["gold"])} for r in _jsonl(os.path.join(d, folder, f"{name}.jsonl"))]
    if name == "winogrande":  # the choice is in the context; the shared continuation is scored
        return [{"contexts": r["context_options"], "continuations": [" " + r["continuation"]],
                 "gold": int(r["gold"])} for r in _jsonl(os.path.join(d, "winogrande", "winogrande.jsonl"))]
    if name == "lambada":
        return [{"contexts": [r["context"]], "continuations": [" " + r["continuation"]], "gold": 0}
                for r in _jsonl(os.path.join(d, "lambada_openai", "lambada_openai.jsonl"))]
    raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")


def score_multiple_choice(logits_fn, params, tokenizer, items: Sequence[dict], max_len: int, batch_size: int = 16,
                          progress: bool = False, desc: str = "", batch_sharding=None) -> dict:
    """acc (highest log-likelihood) and acc_norm (highest log-likelihood per byte)."""
    requests, spans = [], []
    for item in items:
        ctxs, conts = item["contexts"], item["continuations"]
        pairs = [(c, conts[0]) for c in ctxs] if len(ctxs) > 1 else [(ctxs[0], c) for c in conts]
        spans.append((len(requests), len(pairs), [len(c.encode()) for _, c in pairs]))
        for ctx, cont in pairs:
            requests.append((tokenizer.encode(ctx, bos=True), tokenizer.encode(cont)))
    scores = loglikelihoods(logits_fn, params, requests, max_len, batch_size, progress, desc, batch_sharding)
    hits = hits_norm = 0
    for item, (start, n, nbytes) in zip(items, spans):
        ll = [scores[start + k][0] for k in range(n)]
        hits += int(np.argmax(ll) == item["gold"])
        hits_norm += int(np.argmax([v / max(b, 1) for v, b in zip(ll, nbytes)]) == item["gold"])
    n = max(len(items), 1)
    return {"acc": hits / n, "acc_norm": hits_norm / n, "n": len(items)}


def score_lambada(logits_fn, params, tokenizer, items: Sequence[dict], max_len: int, batch_size: int = 16,
                  progress: bool = False, batch_sharding=None) -> dict:
    """Accuracy (last word is the greedy continuation) and perplexity of the last word."""
    requests = [(tokenizer.encode(it["contexts"][0], bos=True), tokenizer.encode(it["continuations"][0]))
                for it in items]
    scores = loglikelihoods(logits_fn, params, requests, max_len, batch_size, progress, "lambada", batch_sharding)
    n_tok = sum(len(c) for _, c in requests)
    return {"acc": sum(g for _, g in scores) / max(len(items), 1),
            "ppl": math.exp(-sum(ll for ll, _ in scores) / max(n_tok, 1)), "n": len(items)}


# ---------------------------------------------------------------------------------------
# Generation tasks

_LANG = {"en": "English", "de": "German"}


def _lines(path: str) -> list[str]:
    opener = __import__("gzip").open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def load_generation_task(name: str, data_dir: str = DEFAULT_DATA, shots: int = 3) -> list[dict]:
    """Items {"prompt": str, "reference": str}."""
    d = os.path.normpath(data_dir)
    if name == "gsm8k":
        train = list(_jsonl(os.path.join(d, "gsm8k", "train.jsonl")))[:shots]
        prefix = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in train)
        return [{"prompt": prefix + f"Question: {r['question']}\nAnswer:", "reference": r["answer"]}
                for r in _jsonl(os.path.join(d, "gsm8k", "test.jsonl"))]
    if name.startswith("wmt22_") or name.startswith("multi30k_"):
        src, tgt = name.split("_")[1:]
        if name.startswith("wmt22_"):
            base = os.path.join(d, "wmt22-general-test", f"generaltest2022.{src}-{tgt}")
            sources, refs = _lines(f"{base}.src.{src}"), _lines(f"{base}.ref.A.{tgt}")
        else:
            base = os.path.join(d, "multi30k", "test_2016_flickr")
            sources, refs = _lines(f"{base}.{src}.gz"), _lines(f"{base}.{tgt}.gz")
        return [{"prompt": f"{_LANG[src]}: {s}\n{_LANG[tgt]}:", "reference": r} for s, r in zip(sources, refs)]
    raise ValueError(f"unknown generation task {name!r}; available: {', '.join(GEN_TASKS)}")


def final_number(text: str) -> str | None:
    """The answer of a GSM8K-style solution: after "####" if present, else the last number."""
    if "####" in text:
        text = text.split("####")[-1]
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    if not nums:
        return None
    n = nums[0] if "####" in text else nums[-1]
    n = n.replace(",", "").rstrip(".")
    return n[:-2] if n.endswith(".0") else n


def score_gsm8k(outputs: Sequence[str], references: Sequence[str]) -> dict:
    hits = sum(final_number(o) is not None and final_number(o) == final_number(r)
               for o, r in zip(outputs, references))
    return {"exact_match": hits / max(len(outputs), 1), "n": len(outputs)}


def score_translation(outputs: Sequence[str], references: Sequence[str]) -> dict:
    from lm.metrics_text import corpus_bleu, corpus_chrf

    return {"bleu": corpus_bleu(outputs, references), "chrf": corpus_chrf(outputs, references), "n": len(outputs)}


def generate_texts(graphdef, params, tokenizer, prompts: Sequence[str], max_new: int, max_len: int,
                   batch_size: int = 16, stop: str = "\n", progress: bool = False, desc: str = "") -> list[str]:
    """Greedy continuations of `prompts`, each cut at the first `stop`."""
    from lm.sampling import generate

    out = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc=desc or "generate", unit="item", dynamic_ncols=True)
    for start in range(0, len(prompts), batch_size):
        chunk = [tokenizer.encode(p, bos=True) for p in prompts[start: start + batch_size]]
        chunk += [chunk[-1]] * (batch_size - len(chunk))  # a fixed batch shape: one compilation
        ids = generate(graphdef, params, chunk, max_new, max_len, temperature=0.0, stop_ids=[tokenizer.eos_id],
                       bucket=64)
        for o in ids[: min(batch_size, len(prompts) - start)]:
            text = tokenizer.decode([t for t in o if t != tokenizer.eos_id])
            text = text.lstrip()  # a leading line break is not the end of the answer
            out.append(text.split(stop)[0].strip() if stop else text.strip())
        if bar is not None:
            bar.update(min(batch_size, len(prompts) - start))
    if bar is not None:
        bar.close()
    return out


# ---------------------------------------------------------------------------------------
# A run


def evaluate_run(run_dir: str, tasks: Sequence[str], data_dir: str = DEFAULT_DATA, limit: int | None = None,
                 batch_size: int = 16, log: Callable = print, progress: bool = True) -> dict:
    """Evaluate the newest checkpoint of a run; writes RUN_DIR/eval.json and returns the results."""
    from lm.run import load_run

    if any(t != "heldout" for t in tasks) and not os.path.isdir(data_dir):
        raise NotFound(f"task files not found: {os.path.normpath(data_dir)} does not exist; pass "
                                "--data-dir DIR (or set LM_DATA) to the folder holding hellaswag/, arc/, ...")
    run = load_run(run_dir, single_device=False, log=log)  # parameters laid out by the run's mesh rules
    sharding = run.trainer.batch_sharding["inputs"]
    data_ways = sharding.mesh.shape["data"] * sharding.mesh.shape["fsdp"]
    batch_size = -(-batch_size // data_ways) * data_ways  # every device gets whole rows
    if run.tokenizer is None and any(t != "heldout" for t in tasks):
        raise NotFound(f"{run_dir} has no tokenizer.model: task evaluation needs one")
    logits_fn = partial(model_logits, run.graphdef)
    max_len = run.cfg.model.max_seq_len
    results: dict = {"run": run_dir, "step": run.step}
    for task in tasks:
        if task == "heldout":
            results[task] = _heldout(run, run_dir, log)
            continue
        if task in GEN_TASKS:
            items = load_generation_task(task, data_dir)
            items = items[:limit] if limit else items
            gsm = task == "gsm8k"
            outs = generate_texts(run.graphdef, run.params, run.tokenizer, [it["prompt"] for it in items],
                                  256 if gsm else 128, max_len, batch_size, stop="\n\n" if gsm else "\n",
                                  progress=progress, desc=task)
            refs = [it["reference"] for it in items]
            results[task] = score_gsm8k(outs, refs) if gsm else score_translation(outs, refs)
            results[task]["examples"] = [{"output": o, "reference": r} for o, r in list(zip(outs, refs))[:3]]
            continue
        items = load_task(task, data_dir)[:limit] if limit else load_task(task, data_dir)
        if task == "lambada":
            results[task] = score_lambada(logits_fn, run.params, run.tokenizer, items, max_len, batch_size,
                                          progress, sharding)
        else:
            results[task] = score_multiple_choice(logits_fn, run.params, run.tokenizer, items, max_len,
                                                  batch_size, progress, task, sharding)
    for task in tasks:  # each task's figures say which checkpoint they are of
        results[task]["step"] = run.step
    # Earlier results of other tasks are kept (merged per task); strict JSON.
    from lm.rundir import merge_json

    merge_json(os.path.join(run_dir, "eval.json"), results)
    return results


def model_logits(graphdef, params, tokens):
    from flax import nnx

    return nnx.merge(graphdef, params)(tokens)


def _heldout(run, run_dir: str, log) -> dict:
    """Held-out loss of the run's own data: pretraining text, or for SFT runs the loss on
    the assistant tokens of the held-out conversations."""
    from lm.train import evaluate

    if run.cfg.stage == "sft":
        from lm.stages import sft

        data = sft.open_data(run.cfg, run_dir, log=lambda *_: None, tokenizer=run.tokenizer)
    else:
        from data_pipeline.pipeline import RunData

        data = RunData(run.cfg.data, run_dir, vocab_size=run.cfg.model.vocab_size,
                       eval_batches=run.cfg.trainer.eval_batches, log=lambda *_: None)
    out = evaluate(run.trainer, run.trainer.compile_eval_step(), run.params, {}, data.heldout, data.heldout_bytes)
    out["ppl"] = math.exp(out["eval_loss"])
    if run.cfg.stage == "sft":
        out["tokens"] = "assistant"
    return out


def format_table(results: dict) -> str:
    rows = ["| task | metric | value |", "|---|---|---|"]
    for task, r in results.items():
        if not isinstance(r, dict):
            continue
        for k, v in r.items():
            if isinstance(v, (int, float)) and k != "n":
                rows.append(f"| {task} | {k} | {v:.4f} |")
    return "\n".join(rows)
