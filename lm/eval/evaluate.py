"""Evaluation: held-out loss, multiple-choice tasks by log-likelihood, LAMBADA.

Every task reduces to log-likelihood requests (context, continuation), tokenized and
scored as lm-evaluation-harness does, so our numbers mean what the harness's mean (the
harness-parity tests check it request by request against its Hugging Face backend):
- `encode_pair`: trailing whitespace of the context moves to the continuation; the
  continuation's tokens are those of BOS + encode(context + continuation) after the
  tokens of BOS + encode(context). (Encoding the two texts apart would score another
  text: SentencePiece gives every encoded string a dummy-prefix "▁", so " ending" alone
  starts with "▁▁".)
- Requests are scored in batches by one jit-compiled function: the sum of the
  continuation's log-probabilities and whether every token is the greedy one.
- Multiple choice: "acc" picks the choice with the highest log-likelihood, "acc_norm"
  the highest log-likelihood per character of the choice's text (the harness's
  doc_to_choice, without the " " before it); ties go to the first. Winogrande puts the
  choice in the context and scores the shared rest of the sentence (acc only). LAMBADA:
  "acc" when the last word is the greedy continuation, "perplexity" = exp(-mean
  log-likelihood of the last word) over the items.
- `loglikelihood_rolling`: the log-likelihood of a whole text in windows of the context
  length, each token predicted once, the first from BOS (the harness's rolling windows).

Task files are read by path from a data folder (default: the optional ../shared/data
beside the repository, or LM_DATA, or --data-dir; a missing folder is a clear error) in
the formats its README documents: HellaSwag (bzip2 text, 6 lines per item), ARC-Easy and
-Challenge, PIQA (JSON Lines: query, choices, gold), Winogrande (context_options,
continuation, gold), LAMBADA (context, continuation), GSM8K (question, answer with
"#### N"), WMT22 general test and Multi30k (aligned source/reference lines). Prompts are
the harness's: "Question: ...\\nAnswer:" for ARC and PIQA, the activity label and context
for HellaSwag.

Generation tasks decode greedily with the KV-cache sampler, in batches: GSM8K (3-shot
from its train split) is scored by exact match of the final number; translation
(zero-shot "English: ... German:" prompts) by sacrebleu's corpus BLEU and chrF.
"""

from __future__ import annotations

import math
import os
import re
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from data_pipeline import tasks
from data_pipeline.config import SHARED_DATA
from data_pipeline.errors import NotFound
from lm.config import ConfigError
from lm.eval.text_metrics import translation_scores
from lm.sampling.sampler import generate
from lm.train.run import load_run
from lm.train.rundir import merge_json

DEFAULT_DATA = SHARED_DATA

MC_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande")
GEN_TASKS = ("gsm8k", "wmt22_en_de", "wmt22_de_en", "multi30k_en_de")
TASKS = ("heldout",) + MC_TASKS + ("lambada",) + GEN_TASKS
# The metrics the harness reports for each task, and the version of our task definitions
# (prompts and scoring; 2 = harness conventions), written to eval.json beside the figures.
TASK_METRICS = {**{t: ("acc", "acc_norm") for t in MC_TASKS}, "winogrande": ("acc",), "lambada": ("acc", "perplexity")}
TASK_VERSIONS = {t: 2 for t in MC_TASKS + ("lambada",)}


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
    """(sum log p(continuation | context), continuation is greedy) for each token request.

    `logits_fn(params, tokens (B, T)) -> (B, T, V)` is compiled once per shape (it is a
    static argument: pass the same function object). Contexts are cut from the left to
    fit `max_len` (as the harness does). With `batch_sharding` (a NamedSharding over the
    batch axis) the rows of each batch are spread over the devices.
    """
    out: list[tuple[float, bool]] = [None] * len(requests)  # type: ignore[list-item]
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]) - len(requests[i][1]))
    bar = None
    if progress:
        bar = tqdm(total=len(requests), desc=desc or "score", unit="req", dynamic_ncols=True)
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        seqs = []
        for i in idx:
            ctx, cont = requests[i]
            if not cont:
                raise ValueError(f"request {i} has an empty continuation")
            if len(cont) > max_len:
                raise ValueError(f"request {i}: its continuation ({len(cont)} tokens) is longer than the context "
                                 f"({max_len})")
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


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of a text request, as lm-evaluation-harness makes them.

    Trailing whitespace of the context moves to the front of the continuation; the
    continuation's ids are those of BOS + encode(context + continuation) that follow the
    len(BOS + encode(context)) first ones. An empty context is BOS alone."""
    if not context:
        cont = tokenizer.encode(continuation)
        return ([tokenizer.bos_id], cont) if not cont or cont[0] != tokenizer.bos_id else (cont[:1], cont[1:])
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = tokenizer.encode(context + continuation, bos=True)
    ctx = tokenizer.encode(context, bos=True)
    return ctx, whole[len(ctx):]


def loglikelihood_texts(logits_fn: Callable, params, tokenizer, pairs: Sequence[tuple[str, str]], max_len: int,
                        batch_size: int = 16, progress: bool = False, desc: str = "",
                        batch_sharding=None) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy) of each (context, continuation) text pair (`encode_pair`)."""
    requests = [encode_pair(tokenizer, ctx, cont) for ctx, cont in pairs]
    return loglikelihoods(logits_fn, params, requests, max_len, batch_size, progress, desc, batch_sharding)


def rolling_requests(tokens: Sequence[int], prefix_id: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """Token requests that predict every token of `tokens` once, each window with as much
    context as fits `max_len`: the first predicts up to `max_len` tokens from `prefix_id`,
    each next one the following up to `max_len` tokens after the `max_len + 1 - n` before
    them (the harness's rolling windows with context_len=1, made disjoint)."""
    tokens = list(tokens)
    if not tokens:
        return []
    n = min(max_len, len(tokens))
    out = [([prefix_id], tokens[:n])]
    done = n
    while done < len(tokens):
        end = min(len(tokens), done + max_len)
        out.append((tokens[end - max_len - 1: done], tokens[done:end]))
        done = end
    return out


def loglikelihood_rolling(logits_fn: Callable, params, tokenizer, texts: Sequence[str], max_len: int,
                          batch_size: int = 16, progress: bool = False, batch_sharding=None) -> list[float]:
    """log p(text) of each text (no BOS in the text; its first token is predicted from BOS)."""
    requests, owner = [], []
    for i, text in enumerate(texts):
        windows = rolling_requests(tokenizer.encode(text), tokenizer.bos_id, max_len)
        requests += windows
        owner += [i] * len(windows)
    scores = loglikelihoods(logits_fn, params, requests, max_len, batch_size, progress, "rolling", batch_sharding)
    out = [0.0] * len(texts)
    for i, (ll, _) in zip(owner, scores):
        out[i] += ll
    return out


# ---------------------------------------------------------------------------------------
# Tasks: each item is {"contexts", "continuations", "choices", "gold"} with one context or
# one continuation; "choices" are the texts whose lengths normalise acc_norm.


def load_task(name: str, data_dir: str = DEFAULT_DATA, log: Callable | None = None) -> list[dict]:
    """Items {"contexts": [...], "continuations": [...], "choices": [...], "gold": int}, read
    (bad lines counted and skipped, a file with none usable a one-line error) by
    data_pipeline.tasks.load_task."""
    if name not in TASKS or name in GEN_TASKS or name == "heldout":
        raise ValueError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return tasks.load_task(name, data_dir, log)


def multiple_choice_requests(items: Sequence[dict]) -> list[tuple[str, str]]:
    """The (context, continuation) texts of the items, item after item, one per choice."""
    pairs = []
    for item in items:
        ctxs, conts = item["contexts"], item["continuations"]
        pairs += [(c, conts[0]) for c in ctxs] if len(ctxs) > 1 else [(ctxs[0], c) for c in conts]
    return pairs


def _choices(item: dict) -> list[str]:
    if "choices" in item:
        return item["choices"]
    texts = item["contexts"] if len(item["contexts"]) > 1 else item["continuations"]
    return [t[1:] if t.startswith(" ") else t for t in texts]


def multiple_choice_metrics(items: Sequence[dict], lls: Sequence[float]) -> dict:
    """acc, acc_norm (per character of the choice) and the chance level, from the
    log-likelihoods of `multiple_choice_requests(items)`, in that order."""
    hits = hits_norm = 0
    chance = 0.0
    k = 0
    for item in items:
        choices = _choices(item)
        ll = np.asarray(lls[k: k + len(choices)], np.float64)
        k += len(choices)
        hits += int(np.argmax(ll) == item["gold"])
        hits_norm += int(np.argmax(ll / np.asarray([float(len(c)) for c in choices])) == item["gold"])
        chance += 1.0 / len(choices)
    if k != len(lls):
        raise ValueError(f"{len(lls)} log-likelihoods for items with {k} choices")
    n = max(len(items), 1)
    return {"acc": hits / n, "acc_norm": hits_norm / n, "chance": chance / n, "n": len(items)}


def score_multiple_choice(logits_fn, params, tokenizer, items: Sequence[dict], max_len: int, batch_size: int = 16,
                          progress: bool = False, desc: str = "", batch_sharding=None) -> dict:
    """acc (highest log-likelihood) and acc_norm (highest log-likelihood per character)."""
    scores = loglikelihood_texts(logits_fn, params, tokenizer, multiple_choice_requests(items), max_len, batch_size,
                                 progress, desc, batch_sharding)
    return multiple_choice_metrics(items, [ll for ll, _ in scores])


def score_lambada(logits_fn, params, tokenizer, items: Sequence[dict], max_len: int, batch_size: int = 16,
                  progress: bool = False, batch_sharding=None) -> dict:
    """Accuracy (the last word is the greedy continuation) and perplexity of the last word
    (exp of minus the mean log-likelihood per item, as the harness aggregates it)."""
    pairs = [(it["contexts"][0], it["continuations"][0]) for it in items]
    scores = loglikelihood_texts(logits_fn, params, tokenizer, pairs, max_len, batch_size, progress, "lambada",
                                 batch_sharding)
    return lambada_metrics(scores)


def lambada_metrics(scores: Sequence[tuple[float, bool]]) -> dict:
    """acc and perplexity from the (log-likelihood, greedy) of each item's last word."""
    n = max(len(scores), 1)
    return {"acc": sum(g for _, g in scores) / n, "perplexity": math.exp(-sum(ll for ll, _ in scores) / n),
            "chance": 0.0, "n": len(scores)}


# ---------------------------------------------------------------------------------------
# Generation tasks


def load_generation_task(name: str, data_dir: str = DEFAULT_DATA, shots: int = 3,
                         log: Callable | None = None) -> list[dict]:
    """Items {"prompt": str, "reference": str} (data_pipeline.tasks.load_generation_task)."""
    if name not in GEN_TASKS:
        raise ValueError(f"unknown generation task {name!r}; available: {', '.join(GEN_TASKS)}")
    return tasks.load_generation_task(name, data_dir, shots, log)


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
    """sacreBLEU's corpus BLEU and chrF, with their signatures."""
    return {**translation_scores(outputs, references), "n": len(outputs)}


def generate_texts(graphdef, params, tokenizer, prompts: Sequence[str], max_new: int, max_len: int,
                   batch_size: int = 16, stop: str = "\n", progress: bool = False, desc: str = "") -> list[str]:
    """Greedy continuations of `prompts`, each cut at the first `stop`."""
    out = []
    bar = None
    if progress:
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
                 batch_size: int = 16, log: Callable = print, progress: bool = True,
                 heldout: Callable | None = None) -> dict:
    """Evaluate the newest checkpoint of a run; writes RUN_DIR/eval.json and returns the results.

    The task "heldout" is the run's own held-out data, which only its stage knows:
    `heldout(run, run_dir, log) -> {"eval_loss": ..., ...}` (`lm.stages.runner.evaluate_heldout`)."""
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
            if heldout is None:
                raise ValueError("the task 'heldout' needs the run's stage: pass heldout=evaluate_heldout")
            r = heldout(run, run_dir, log)
            if r is not None:  # (None: the run's stage has no such measure, and it was not asked for by name)
                results[task] = r
            continue
        if task in GEN_TASKS:
            items = load_generation_task(task, data_dir, log=log)
            items = items[:limit] if limit else items
            gsm = task == "gsm8k"
            outs = generate_texts(run.graphdef, run.params, run.tokenizer, [it["prompt"] for it in items],
                                  256 if gsm else 128, max_len, batch_size, stop="\n\n" if gsm else "\n",
                                  progress=progress, desc=task)
            refs = [it["reference"] for it in items]
            results[task] = score_gsm8k(outs, refs) if gsm else score_translation(outs, refs)
            results[task]["examples"] = [{"output": o, "reference": r} for o, r in list(zip(outs, refs))[:3]]
            continue
        results[task] = score_task(task, logits_fn, run.params, run.tokenizer, max_len, data_dir, limit, batch_size,
                                   progress, sharding)
    for task in tasks:  # each task's figures say which checkpoint they are of
        if task in results:
            results[task]["step"] = run.step
    # Earlier results of other tasks are kept (merged per task); strict JSON.

    merge_json(os.path.join(run_dir, "eval.json"), results)
    return results


def score_task(task: str, logits_fn: Callable, params, tokenizer, max_len: int, data_dir: str = DEFAULT_DATA,
               limit: int | None = None, batch_size: int = 16, progress: bool = False, batch_sharding=None) -> dict:
    """A log-likelihood task's harness metrics (TASK_METRICS), its chance level, item count and
    the version of its definition."""
    items = load_task(task, data_dir)
    items = items[:limit] if limit else items
    if task == "lambada":
        r = score_lambada(logits_fn, params, tokenizer, items, max_len, batch_size, progress, batch_sharding)
    else:
        r = score_multiple_choice(logits_fn, params, tokenizer, items, max_len, batch_size, progress, task,
                                  batch_sharding)
    return {**{k: r[k] for k in TASK_METRICS[task]}, "chance": r["chance"], "n": r["n"],
            "version": TASK_VERSIONS[task]}


def task_evaluator(cfg, engine, tokenizer, log: Callable = print) -> Callable | None:
    """`trainer.eval_tasks` as a function of the model's parameters -> {"task/hellaswag/acc": ...}
    (None without tasks). The items are read once, here: a missing task folder fails before
    training starts."""
    tasks, n = cfg.trainer.eval_tasks, cfg.trainer.eval_task_items
    if not tasks:
        return None
    if tokenizer is None:
        raise ConfigError("trainer.eval_tasks needs a tokenizer (text tasks); this run's data has none "
                          "(data.corpus='synthetic'?)")
    data_dir = cfg.trainer.eval_data_dir or DEFAULT_DATA
    try:
        items = {t: load_task(t, data_dir, log)[:n] for t in tasks}
    except FileNotFoundError as e:
        raise ConfigError(f"trainer.eval_tasks: task files not found ({e}); set trainer.eval_data_dir (or LM_DATA) "
                          "to the folder holding hellaswag/, arc/, ...") from None
    logits_fn = partial(model_logits, engine.graphdef)
    sharding = engine.batch_sharding["inputs"]
    ways = sharding.mesh.shape["data"] * sharding.mesh.shape["fsdp"]
    batch_size = -(-16 // ways) * ways
    max_len = cfg.model.max_seq_len
    log(f"each evaluation also scores {', '.join(f'{t} ({len(v)} items)' for t, v in items.items())}")

    def run(params) -> dict:
        out = {}
        for task, its in items.items():
            if task == "lambada":
                r = score_lambada(logits_fn, params, tokenizer, its, max_len, batch_size, batch_sharding=sharding)
            else:
                r = score_multiple_choice(logits_fn, params, tokenizer, its, max_len, batch_size,
                                          batch_sharding=sharding)
            out.update({f"task/{task}/{k}": float(r[k]) for k in TASK_METRICS[task]})
        return out

    return run


def model_logits(graphdef, params, tokens):
    return nnx.merge(graphdef, params)(tokens)


def format_table(results: dict) -> str:
    """A Markdown table: each task's metrics, beside the chance level where there is one."""
    rows = ["| task | metric | value | chance | n |", "|---|---|---|---|---|"]
    for task, r in results.items():
        if not isinstance(r, dict):
            continue
        chance = r.get("chance")
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("n", "chance", "step", "version"):
                c = f"{chance:.4f}" if chance is not None and k.startswith("acc") else ""
                rows.append(f"| {task} | {k} | {v:.4f} | {c} | {r.get('n', '')} |")
    return "\n".join(rows)
