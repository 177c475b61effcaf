"""The embedded default preference set: a rule a small model can learn, no download.

Prompts and answers are the embedded standard-library Q&A set (`default_chat.py`): the
first question of each conversation and its answer. The chosen reply is the answer; the
rejected reply is the same words in a shuffled order. A reward model should rank them
almost perfectly (the rule is fluency, which a pretrained model already represents),
and DPO should move a model's likelihood towards the fluent reply.
"""

from __future__ import annotations

import json
import os
import random

from data_pipeline.default_chat import conversations

EMBEDDED = "<embedded:stdlib_preferences>"


def pairs(seed: int = 0) -> list[dict]:
    out = []
    for conv in conversations(seed):
        msgs = conv["messages"]
        k = next(i for i, m in enumerate(msgs) if m["role"] == "user")
        answer = msgs[k + 1]["content"]
        words = answer.split()
        if len(words) < 4:
            continue
        rng = random.Random(f"{seed}:{conv['id']}")
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        out.append({"prompt": msgs[: k + 1], "chosen": answer, "rejected": " ".join(shuffled), "id": conv["id"]})
    return out


def write_jsonl(path: str, seed: int = 0) -> str:
    """Write the set to `path` (atomically, once); returns the path."""
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for rec in pairs(seed):
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
    return path
