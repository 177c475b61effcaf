"""Prompts with checkable answers, for RL and for the SFT that precedes it, and the task
files of `lm eval`.

- "arith": synthetic additions of two `digits`-digit numbers ("What is 37 + 48?" -> "85").
  Training and held-out problems are disjoint (the held-out pairs are drawn first and
  excluded from training), and the split is the same on every machine (seeded).
- "calc": 4-digit additions and 3-digit x 2-digit products, for a model with a calculator
  tool (each problem also carries its "expression"); split as "arith" is. "calc_add": the
  additions only.
- "gsm8k": GSM8K word problems from ../shared/data/gsm8k (train.jsonl / test.jsonl);
  the answer is the number after "####" in the reference solution.
Each problem is {"messages": [user question], "answer": str} (GSM8K's also carry
"solution", the worked answer, and "where", its file:line).

Task files are user input and are read like the SFT and preference sources: blank lines
are skipped; a line that is not valid UTF-8, not JSON, or lacks a field of the right type
is counted and skipped, with one warning per file naming the first few `file:line`s and
why; a file with no usable record is one `DataError` line naming the file and what a
record must look like; a missing file is `TaskFileNotFound` (a `NotFound`). `load_task`
and `load_generation_task` read the files of lm/eval/evaluate.py's tasks (HellaSwag, ARC, PIQA,
Winogrande, LAMBADA, GSM8K, WMT22, Multi30k) this way into the same items it builds.
`drop_long_prompts` drops (and counts) prompts too long for the model's context.
"""

from __future__ import annotations

import json
import os
import random
import sys
from typing import Callable, Sequence

from data_pipeline import jsonl
from data_pipeline.config import SHARED_DATA
from data_pipeline.errors import NotFound
from data_pipeline.pipeline import DataStats
from data_pipeline.sources import DataError, _open_bytes

Log = Callable[[str], None]


class TaskFileNotFound(NotFound, DataError):
    """A task file that does not exist (a NotFound / FileNotFoundError, and a DataError)."""


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def arith(seed: int, n_train: int, n_heldout: int, digits: int = 2) -> tuple[list[dict], list[dict]]:
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    space = (hi - lo + 1) ** 2
    if n_train + n_heldout > space:
        raise DataError(f"only {space} distinct {digits}-digit additions exist; ask for fewer problems")
    rng = random.Random(f"arith:{seed}:{digits}")
    seen: set[tuple[int, int]] = set()

    def draw(n):
        out = []
        while len(out) < n:
            a, b = rng.randint(lo, hi), rng.randint(lo, hi)
            if (a, b) not in seen:
                seen.add((a, b))
                out.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"}], "answer": str(a + b)})
        return out

    heldout = draw(n_heldout)
    return draw(n_train), heldout


def calc(seed: int, n_train: int, n_heldout: int, ops: str = "+*") -> tuple[list[dict], list[dict]]:
    """Arithmetic a small model cannot do in its head, and a calculator can: 4-digit additions
    ("What is 4821 + 3907?") and products of a 3-digit and a 2-digit number ("What is 347 *
    86?"), alternately (`ops`: "+*", or "+" for additions only); "answer" is the exact
    result, "expression" what a calculator takes. Held-out problems are drawn first and never
    among the training ones."""
    rng = random.Random(f"calc:{seed}:{ops}" if ops != "+*" else f"calc:{seed}")
    seen: set[tuple] = set()

    def draw(n):
        out = []
        while len(out) < n:
            if ops[len(seen) % len(ops)] == "+":
                a, b, op = rng.randint(1000, 9999), rng.randint(1000, 9999), "+"
            else:
                a, b, op = rng.randint(100, 999), rng.randint(10, 99), "*"
            if (a, op, b) in seen:
                continue
            seen.add((a, op, b))
            out.append({"messages": [{"role": "user", "content": f"What is {a} {op} {b}?"}],
                        "answer": str(a + b if op == "+" else a * b), "expression": f"{a} {op} {b}"})
        return out

    heldout = draw(n_heldout)
    return draw(n_train), heldout


# ---------------------------------------------------------------------------------------
# Reading task files: count and skip bad lines, fail in one line when nothing is usable


def _read_lines(path: str, hint: str) -> list[bytes]:
    """The file's lines as bytes (plain, .gz or .bz2; without their line ends)."""
    if not os.path.isfile(path):
        raise TaskFileNotFound(f"{path} not found{hint}")
    try:
        with _open_bytes(path) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: unreadable ({e}); replace the file") from None
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"invalid UTF-8 ({e.reason} at byte {e.start})") from None


class _Bad:
    """Bad records of one file: counted, the first few located (data_pipeline.pipeline.DataStats)."""

    def __init__(self, name: str):
        self.name, self.stats = name, DataStats([name])

    def add(self, where: str, error: str) -> None:
        self.stats.record_bad(self.name, where, " ".join(error.split()))  # one line

    @property
    def count(self) -> int:
        return self.stats.bad[self.name]

    def finish(self, path: str, items: list, lines: int, record: str, log: Log | None) -> list:
        """`items`, after a warning if some records were skipped; DataError when none is usable."""
        if not items:
            why = ("the file is empty" if not lines else f"all {lines} lines are blank" if not self.count else
                   f"{self.count} bad record(s), first: " + "; ".join(self.stats.examples[self.name]))
            raise DataError(f"{path}: no usable record ({why}); {record}")
        if self.count:
            (log or _warn)(f"{self.stats.report()}; fix or remove those lines ({len(items)} usable)")
        return items


def read_jsonl(path: str, parse: Callable[[object], object], record: str, name: str | None = None,
               hint: str = "", log: Log | None = None) -> list[tuple[int, object]]:
    """(line number, parse(obj)) of each usable JSON Lines record of `path`; `parse` raises
    ValueError(why) for a bad one. Blank lines are skipped; bad lines (invalid UTF-8 or
    JSON, or rejected by `parse`) counted and skipped with one warning (via `log`, default
    stderr) naming the first few file:lines and why; DataError "{path}: no usable record
    (...); {record}" when none is usable; TaskFileNotFound "{path} not found{hint}"."""
    lines = _read_lines(path, hint)
    bad, items = _Bad(name or path), []
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            text = _utf8(raw)
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"malformed JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise ValueError("malformed JSON (nested too deeply)") from None
            items.append((n, parse(obj)))
        except ValueError as e:
            bad.add(f"{path}:{n}", str(e))
    return bad.finish(path, items, len(lines), record, log)


def _obj(r) -> dict:
    if not isinstance(r, dict):
        raise ValueError(f"record is {type(r).__name__}, not an object")
    return r


def _str(r: dict, key: str) -> str:
    if key not in r or r[key] is None:
        raise ValueError(f"missing field {key!r} (keys: {', '.join(sorted(map(str, r))[:6]) or 'none'})")
    if not isinstance(r[key], str):
        raise ValueError(f"field {key!r} is {type(r[key]).__name__}, not a string")
    if not r[key].strip():
        raise ValueError(f"field {key!r} is empty")
    return r[key]


def _strs(r: dict, key: str, least: int) -> list[str]:
    v = r.get(key)
    if not isinstance(v, list):
        raise ValueError(f"missing field {key!r}" if key not in r else
                         f"field {key!r} is {type(v).__name__}, not a list")
    if len(v) < least or not all(isinstance(s, str) and s.strip() for s in v):
        raise ValueError(f"field {key!r} must be a list of at least {least} non-empty strings")
    return list(v)


def _index(value, key: str, n: int) -> int:
    """A 0-based choice index from an int or a string of digits."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"field {key!r} is {type(value).__name__}, not an integer" if value is not None else
                         f"missing field {key!r}")
    if not 0 <= value < n:
        raise ValueError(f"field {key!r} is {value}, not a choice index 0..{n - 1}")
    return value


# ---------------------------------------------------------------------------------------
# GSM8K

GSM8K_RECORD = ('each line must be a JSON object like {"question": "How many ...?", "answer": '
                '"worked solution\\n#### 42"} (both strings; the answer ends with "#### <number>")')


def gsm8k_record(r) -> dict:
    """One GSM8K line's object -> {"question", "answer" (the worked solution), "final"}."""
    r = _obj(r)
    question, answer = _str(r, "question"), _str(r, "answer")
    if "####" not in answer:
        raise ValueError("field 'answer' has no final '#### <number>'")
    final = answer.split("####")[-1].strip().replace(",", "")
    if not final:
        raise ValueError("field 'answer' has nothing after '####'")
    return {"question": question, "answer": answer, "final": final}


def gsm8k(data_dir: str = SHARED_DATA, log: Log | None = None) -> tuple[list[dict], list[dict]]:
    """GSM8K's (train, test) problems; bad lines are skipped with a warning (see read_jsonl)."""
    data_dir = os.path.normpath(data_dir)
    hint = (f": put GSM8K's train.jsonl and test.jsonl in {os.path.join(data_dir, 'gsm8k')} (set LM_DATA to "
            "the folder holding gsm8k/) or use rl.task='arith'")

    def load(name):
        path = os.path.join(data_dir, "gsm8k", name)
        return [{"messages": [{"role": "user", "content": g["question"]}], "answer": g["final"],
                 "solution": g["answer"], "where": f"{path}:{n}"}
                for n, g in read_jsonl(path, gsm8k_record, GSM8K_RECORD, f"gsm8k/{name}", hint, log)]

    return load("train.jsonl"), load("test.jsonl")


def drop_long_prompts(problems: Sequence[dict], length: Callable[[dict], int], limit: int, label: str,
                      log: Log | None = None) -> list[dict]:
    """The problems whose prompt takes at most `limit` tokens (`length(problem)`), like SFT's
    dropping of over-long records: the others are counted and named in one warning (via
    `log`, default stderr); DataError when none fits. For RL: limit = model.max_seq_len -
    rl.max_new."""
    kept, long = [], []
    for i, p in enumerate(problems):
        n = length(p)
        if n <= limit:
            kept.append(p)
        else:
            long.append(f"{p.get('where', f'prompt {i}')} ({n} tokens)")
    if long and not kept:
        raise DataError(f"{label}: all {len(problems)} prompts are longer than {limit} tokens (model.max_seq_len - "
                        f"rl.max_new), e.g. {long[0]}; raise model.max_seq_len, lower rl.max_new or use shorter "
                        "prompts")
    if long:
        (log or _warn)(f"{label}: {len(long)} of {len(problems)} prompt(s) longer than {limit} tokens "
                       f"(model.max_seq_len - rl.max_new) dropped; first: {'; '.join(long[:5])}")
    return kept


# ---------------------------------------------------------------------------------------
# The task files of `lm eval` (lm/eval/evaluate.py): the same items, read as above

EVAL_HINT = ": pass --data-dir DIR (or set LM_DATA) to the folder holding hellaswag/, arc/, ..."
_MC_FILES = {"arc_easy": "arc/arc_easy.jsonl", "arc_challenge": "arc/arc_challenge.jsonl", "piqa": "piqa/piqa.jsonl",
             "winogrande": "winogrande/winogrande.jsonl", "lambada": "lambada_openai/lambada_openai.jsonl"}
_MC_RECORDS = {
    "query": 'each line must be a JSON object like {"query": "Question: ...", "choices": ["a", "b", ...], "gold": 0} '
             "(a string, at least 2 non-empty strings, the index of the right choice)",
    "winogrande": 'each line must be a JSON object like {"context_options": ["... Sarah", "... Maria"], '
                  '"continuation": "always got the easier cases.", "gold": 1} (the index of the right option)',
    "lambada": 'each line must be a JSON object like {"context": "text before the last word", "continuation": '
               '"last word"} (non-empty strings)',
}
HELLASWAG_ITEM = ("each item is 6 lines: the context, the index 0-3 of the right ending, then the 4 endings "
                  "(non-empty, UTF-8)")


def _query_item(r) -> dict:
    r = _obj(r)
    query, choices = _str(r, "query"), _strs(r, "choices", 2)
    return {"contexts": [query.rstrip() + "\nAnswer:"], "continuations": [" " + c for c in choices],
            "choices": choices, "gold": _index(r.get("gold"), "gold", len(choices))}


def _winogrande_item(r) -> dict:
    r = _obj(r)
    options, cont = _strs(r, "context_options", 2), _str(r, "continuation")
    return {"contexts": options, "continuations": [" " + cont], "choices": list(options),
            "gold": _index(r.get("gold"), "gold", len(options))}


def _lambada_item(r) -> dict:
    r = _obj(r)
    context, cont = _str(r, "context"), _str(r, "continuation")
    return {"contexts": [context], "continuations": [" " + cont], "choices": [cont], "gold": 0}


def _hellaswag(path: str, log: Log | None) -> list[dict]:
    lines = _read_lines(path, EVAL_HINT)
    while lines and not lines[-1].strip():  # blank lines at the end
        lines.pop()
    if len(lines) % 6:
        raise DataError(f"{path}: {len(lines)} lines, not a multiple of 6; {HELLASWAG_ITEM}: a line added or "
                        "missing shifts every item after it")
    bad, items = _Bad(path), []
    for i in range(0, len(lines), 6):
        k = i  # the line being checked
        try:
            texts = []
            for k in range(i, i + 6):
                texts.append(_utf8(lines[k]))
                if not texts[-1].strip():
                    raise ValueError("empty line")
            k = i + 1
            gold = texts[1].strip()
            if not gold.isdigit() or not 0 <= int(gold) < 4:
                raise ValueError(f"the gold label {gold[:20]!r} is not an index 0-3")
        except ValueError as e:
            bad.add(f"{path}:{k + 1}", f"{e} (item at line {i + 1})")
            continue
        items.append({"contexts": [texts[0]], "continuations": [" " + e for e in texts[2:]],
                      "choices": texts[2:], "gold": int(gold)})
    return bad.finish(path, items, len(lines), HELLASWAG_ITEM, log)


def load_task(name: str, data_dir: str = SHARED_DATA, log: Log | None = None) -> list[dict]:
    """lm/eval/evaluate.py's log-likelihood task items {"contexts", "continuations", "choices",
    "gold"}, with bad records skipped (one warning) and one-line errors (see read_jsonl)."""
    d = os.path.normpath(data_dir)
    if name == "hellaswag":
        return _hellaswag(os.path.join(d, "hellaswag", "hellaswag_val_full.txt.bz2"), log)
    if name not in _MC_FILES:
        raise DataError(f"unknown task {name!r}; available: hellaswag, {', '.join(_MC_FILES)}")
    parse, record = ((_winogrande_item, _MC_RECORDS["winogrande"]) if name == "winogrande" else
                     (_lambada_item, _MC_RECORDS["lambada"]) if name == "lambada" else
                     (_query_item, _MC_RECORDS["query"]))
    return [it for _, it in read_jsonl(os.path.join(d, _MC_FILES[name]), parse, record, _MC_FILES[name],
                                       EVAL_HINT, log)]


_LANG = {"en": "English", "de": "German"}


def _aligned(src: str, ref: str, log: Log | None) -> list[tuple[str, str]]:
    """(source, reference) line pairs; pairs of blank lines skipped, bad ones counted."""
    a, b = _read_lines(src, EVAL_HINT), _read_lines(ref, EVAL_HINT)
    if len(a) != len(b):
        raise DataError(f"{src} has {len(a)} lines but {ref} has {len(b)}: a source and its reference must be "
                        "aligned line by line; restore the missing lines")
    bad, pairs = _Bad(src), []
    for n, (s, r) in enumerate(zip(a, b), 1):
        if not s.strip() and not r.strip():
            continue
        texts = []
        for side, path, raw in (("source", src, s), ("reference", ref, r)):
            try:
                if not raw.strip():
                    raise ValueError(f"empty {side} line")
                texts.append(_utf8(raw))
            except ValueError as e:
                bad.add(f"{path}:{n}", str(e))
                break
        else:
            pairs.append(tuple(texts))
    return bad.finish(src, pairs, len(a), f"each line of {src} must be a non-empty UTF-8 sentence with its "
                      f"translation on the same line of {ref}", log)


def load_generation_task(name: str, data_dir: str = SHARED_DATA, shots: int = 3, log: Log | None = None) -> list[dict]:
    """lm/eval/evaluate.py's generation task items {"prompt", "reference"} (GSM8K 3-shot from its
    train split, translation zero-shot), with bad records skipped and one-line errors."""
    d = os.path.normpath(data_dir)
    if name == "gsm8k":
        train = read_jsonl(os.path.join(d, "gsm8k", "train.jsonl"), gsm8k_record, GSM8K_RECORD, "gsm8k/train.jsonl",
                           EVAL_HINT, log)[:shots]
        prefix = "".join(f"Question: {g['question']}\nAnswer: {g['answer']}\n\n" for _, g in train)
        return [{"prompt": prefix + f"Question: {g['question']}\nAnswer:", "reference": g["answer"]}
                for _, g in read_jsonl(os.path.join(d, "gsm8k", "test.jsonl"), gsm8k_record, GSM8K_RECORD,
                                       "gsm8k/test.jsonl", EVAL_HINT, log)]
    if name.startswith("wmt22_") or name.startswith("multi30k_"):
        parts = name.split("_")[1:]
        if len(parts) != 2 or not all(p in _LANG for p in parts):
            raise DataError(f"unknown generation task {name!r}")
        src, tgt = parts
        if name.startswith("wmt22_"):
            base = os.path.join(d, "wmt22-general-test", f"generaltest2022.{src}-{tgt}")
            files = f"{base}.src.{src}", f"{base}.ref.A.{tgt}"
        else:
            base = os.path.join(d, "multi30k", "test_2016_flickr")
            files = f"{base}.{src}.gz", f"{base}.{tgt}.gz"
        return [{"prompt": f"{_LANG[src]}: {s}\n{_LANG[tgt]}:", "reference": r} for s, r in _aligned(*files, log)]
    raise DataError(f"unknown generation task {name!r}; available: gsm8k, wmt22_en_de, wmt22_de_en, multi30k_en_de")


# ---------------------------------------------------------------------------------------
# Writing


def sft_records(problems: list[dict], solution: bool = False) -> list[dict]:
    """Chat records for SFT: the question and the answer (or GSM8K's worked solution)."""
    return [{"messages": p["messages"] + [{"role": "assistant",
                                           "content": p["solution"] if solution and "solution" in p else p["answer"]}]}
            for p in problems]


def write_jsonl(path: str, records: list[dict]) -> str:
    return jsonl.write_jsonl(path, records)
