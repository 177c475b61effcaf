"""Prompts with checkable answers, for RL and for the SFT that precedes it.

- "arith": synthetic additions of two `digits`-digit numbers ("What is 37 + 48?" -> "85").
  Training and held-out problems are disjoint (the held-out pairs are drawn first and
  excluded from training), and the split is the same on every machine (seeded).
- "gsm8k": GSM8K word problems from ../shared/data/gsm8k (train.jsonl / test.jsonl);
  the answer is the number after "####" in the reference solution.
Each problem is {"messages": [user question], "answer": str}.
"""

from __future__ import annotations

import json
import os
import random

from data_pipeline.config import SHARED_DATA
from data_pipeline.sources import DataError


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


def gsm8k(data_dir: str = SHARED_DATA) -> tuple[list[dict], list[dict]]:
    def load(name):
        path = os.path.join(data_dir, "gsm8k", name)
        if not os.path.exists(path):
            raise DataError(f"GSM8K not found at {path}: set rl.task data or use task 'arith'")
        out = []
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                out.append({"messages": [{"role": "user", "content": r["question"]}],
                            "answer": r["answer"].split("####")[-1].strip().replace(",", ""),
                            "solution": r["answer"]})
        return out

    return load("train.jsonl"), load("test.jsonl")


def sft_records(problems: list[dict], solution: bool = False) -> list[dict]:
    """Chat records for SFT: the question and the answer (or GSM8K's worked solution)."""
    return [{"messages": p["messages"] + [{"role": "assistant",
                                           "content": p["solution"] if solution and "solution" in p else p["answer"]}]}
            for p in problems]


def write_jsonl(path: str, records: list[dict]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
    return path
