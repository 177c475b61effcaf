"""A corpus with planted duplicates and contamination, and the score of a curation on it.

`plant(folder, ...)` writes `folder/web_NNN.jsonl`: unique documents (English-like prose sampled
from the word frequencies of the Python documentation this interpreter carries, so nothing is
downloaded), exact copies of some (case and whitespace changed: equal after normalising), near
copies of others (a few words replaced, case and whitespace changed) and documents that quote an
evaluation item inside prose. `score(truth, kept_ids)` says what a curation removed of each.

Used by tests/test_curate.py (recall on a planted corpus) and `lm bench curate` (throughput).
"""

from __future__ import annotations

import collections
import json
import os
import random
import re

from data_pipeline import curate as C
from data_pipeline.default_corpus import _pydoc_topics
from data_pipeline.errors import UserError

_WORD = re.compile(r"[A-Za-z]{2,12}")


def _vocabulary(size: int = 6000) -> tuple[list[str], list[int]]:
    """The `size` most frequent lower-case words of the interpreter's documentation topics, with counts."""
    counts = collections.Counter(w.lower() for text in _pydoc_topics().values() for w in _WORD.findall(text))
    words, freq = zip(*counts.most_common(size))
    return list(words), list(freq)


class Prose:
    """Random sentences whose words follow the documentation's frequencies (stop words included)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.words, freq = _vocabulary()
        self.cum = list(_accumulate(freq))

    def sentence(self) -> str:
        n = self.rng.randint(8, 20)
        words = self.rng.choices(self.words, cum_weights=self.cum, k=n)
        return " ".join(words).capitalize() + "."

    def document(self, min_words: int = 150, max_words: int = 450) -> str:
        target = self.rng.randint(min_words, max_words)
        lines, count = [], 0
        while count < target:
            line = " ".join(self.sentence() for _ in range(self.rng.randint(2, 4)))
            lines.append(line)
            count += len(line.split())
        return "\n".join(lines)


def _accumulate(xs):
    total = 0
    for x in xs:
        total += x
        yield total


def respace(text: str, rng: random.Random) -> str:
    """Case and whitespace changed (equal after lower-casing and collapsing whitespace runs)."""
    words = text.split(" ")
    out = [w.upper() if rng.random() < 0.1 else w for w in words]
    return "".join(w + (" " * rng.randint(1, 3)) for w in out).strip()


def near_copy(text: str, changed: int, rng: random.Random, vocabulary: list[str]) -> str:
    """`changed` words replaced by others, then case and whitespace changed."""
    words = text.split(" ")
    for i in rng.sample(range(len(words)), changed):
        words[i] = rng.choice(vocabulary)
    return respace(" ".join(words), rng)


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    """Word n-grams of the lower-cased words, punctuation ignored (what MinHash compares, about)."""
    w = re.findall(r"\w+", text.lower())
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / max(1, len(sa | sb))


def plant(folder: str, uniques: int = 1000, exact: int = 100, near: int = 200,
          eval_items: list[tuple[str, str]] = (), max_changed: int = 4, seed: int = 0, shards: int = 1) -> dict:
    """Write folder/web_NNN.jsonl (`shards` files, documents shuffled) and return the truth: {"uniques": [id], "exact": {copy id:
    original id}, "near": {copy id: [original id, words changed, Jaccard of 5-grams]},
    "contaminated": {id: [item label, item text]}}. Exact and near copies are made of distinct uniques."""
    if exact + near > uniques:
        raise ValueError(f"exact + near ({exact + near}) must not exceed uniques ({uniques})")
    rng = random.Random(seed)
    prose = Prose(seed)
    docs = {f"u{i}": prose.document() for i in range(uniques)}
    records = [{"id": k, "text": v} for k, v in docs.items()]
    originals = rng.sample(sorted(docs), exact + near)
    truth: dict = {"uniques": sorted(docs), "exact": {}, "near": {}, "contaminated": {}}
    for i, orig in enumerate(originals[:exact]):
        truth["exact"][f"x{i}"] = orig
        records.append({"id": f"x{i}", "text": respace(docs[orig], rng)})
    for i, orig in enumerate(originals[exact:]):
        k = 1 + i % max_changed
        text = near_copy(docs[orig], k, rng, prose.words)
        truth["near"][f"n{i}"] = [orig, k, round(jaccard(docs[orig], text), 4)]
        records.append({"id": f"n{i}", "text": text})
    for i, (label, item) in enumerate(eval_items):
        host = prose.document(60, 120).split("\n")
        host.insert(rng.randint(0, len(host)), respace(item, rng))
        truth["contaminated"][f"c{i}"] = [label, item]
        records.append({"id": f"c{i}", "text": "\n".join(host)})
    rng.shuffle(records)
    os.makedirs(folder, exist_ok=True)
    for k in range(shards):
        with open(os.path.join(folder, f"web_{k:03d}.jsonl"), "w", encoding="utf-8") as f:
            for r in records[k::shards]:
                f.write(json.dumps(r) + "\n")
    return truth


def _norm(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def still_quoted(item: str, text: str) -> bool:
    """Whether a line of `item` (of 3 words or more) is still in `text`, ignoring case and punctuation."""
    body = f" {_norm(text)} "
    return any(f" {line} " in body for line in map(_norm, item.split("\n")) if len(line.split()) >= 3)


def evaluation_items(folder: str, per_task: int = 5, made: int = 20) -> tuple[list, tuple, tuple]:
    """Items to quote in the planted corpus, and what a CurateConfig needs to look for them:
    (items [(label, text)], decontaminate_tasks, decontaminate_files). `made` made-up items are
    written to folder/items.jsonl (a task file); `per_task` real items of each evaluation set,
    as they are scored (context and answer, 8 words or more), when ../shared/data is present."""
    try:
        every, _ = C.eval_items(C.CurateConfig(inputs=(), output_dir=folder), log=lambda *_: None)
        tasks = C.EVAL_TASKS
    except UserError:  # no ../shared/data
        every, tasks = [], ()
    by_task: dict = {}
    for label, text in every:  # an item's first text: its context and right answer
        chosen = by_task.setdefault(label.split(":")[0], {})
        if len(text.split()) >= 8 and len(chosen) < per_task:
            chosen.setdefault(label, text)
    items = [(label, text) for chosen in by_task.values() for label, text in chosen.items()]
    path = os.path.join(folder, "items.jsonl")
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(made):
            text = Prose(1000 + i).document(15, 30).replace("\n", " ")
            f.write(json.dumps({"question": text}) + "\n")
            items.append((f"items.jsonl:{i + 1}", text))
    return items, tasks, (path,)


def score(truth: dict, kept: dict[str, str]) -> dict:
    """What a curation that kept the documents `kept` ({id: text as written}) did to the planted
    corpus. Each original has at most one copy; a copy counts as removed unless both it and its
    original were kept (which of the two survives is the deduplicator's choice); a unique is lost
    when neither it nor its copy was kept; an evaluation item is caught when the document quoting
    it is gone, or no line of the item is left in it (a quality rule may drop the lines)."""
    copy_of = {c: o for c, o in truth["exact"].items()} | {c: v[0] for c, v in truth["near"].items()}
    has_copy = {o: c for c, o in copy_of.items()}

    def removed(copy: str) -> bool:
        return not (copy in kept and copy_of[copy] in kept)

    by_changed: dict[int, list[int]] = {}
    for c, (_, k, _) in truth["near"].items():
        by_changed.setdefault(k, [0, 0])[0] += removed(c)
        by_changed[k][1] += 1
    js = sorted(v[2] for v in truth["near"].values())
    lost = [u for u in truth["uniques"] if u not in kept and has_copy.get(u) not in kept]
    missed = sorted(lab for c, (lab, item) in truth["contaminated"].items() if c in kept and still_quoted(item, kept[c]))
    return {
        "exact_removed": sum(map(removed, truth["exact"])), "exact": len(truth["exact"]),
        "near_removed": sum(map(removed, truth["near"])), "near": len(truth["near"]),
        "near_recall_by_words_changed": {k: round(h / n, 4) for k, (h, n) in sorted(by_changed.items())},
        "near_jaccard_min_median": [js[0], js[len(js) // 2]] if js else None,
        "uniques_lost": len(lost), "uniques": len(truth["uniques"]), "uniques_lost_ids": lost[:20],
        "eval_caught": len(truth["contaminated"]) - len(missed), "eval_planted": len(truth["contaminated"]),
        "eval_cut_not_removed": sum(c in kept for c in truth["contaminated"]) - len(missed),
        "eval_missed": missed[:20],
    }
