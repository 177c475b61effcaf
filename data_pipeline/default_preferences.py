"""The embedded default preference set: a rule a small model can learn, no download.

Prompts and answers are the embedded standard-library Q&A set (`default_chat.py`): the
first question of each conversation and its answer. The chosen reply is the answer; the
rejected reply is either the same words in a shuffled order ("shuffled": a reward model
should rank these almost perfectly, the rule being fluency, which a pretrained model
already represents) or the answer to another question of the set ("mismatched": a
fluent reply that does not answer, which an SFT model only partly ranks below the right
one; the default for DPO).
"""

from __future__ import annotations

import random

from data_pipeline import jsonl
from data_pipeline.default_chat import conversations

EMBEDDED = "<embedded:stdlib_preferences>"
KINDS = ("shuffled", "mismatched")


def pairs(seed: int = 0, kind: str = "shuffled") -> list[dict]:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
    firsts = []
    for conv in conversations(seed):
        msgs = conv["messages"]
        k = next(i for i, m in enumerate(msgs) if m["role"] == "user")
        if len(msgs[k + 1]["content"].split()) >= 4:
            firsts.append((conv["id"], msgs[: k + 1], msgs[k + 1]["content"]))
    out = []
    for cid, prompt, answer in firsts:
        rng = random.Random(f"{seed}:{kind}:{cid}")
        if kind == "shuffled":
            words = answer.split()
            rejected = words[:]
            while rejected == words:
                rng.shuffle(rejected)
            rejected = " ".join(rejected)
        else:
            rejected = answer
            while rejected == answer:
                rejected = firsts[rng.randrange(len(firsts))][2]
        out.append({"prompt": prompt, "chosen": answer, "rejected": rejected, "id": cid})
    return out


def write_jsonl(path: str, seed: int = 0, kind: str = "shuffled") -> str:
    """Write the set to `path` (atomically, once); returns the path."""
    return jsonl.write_jsonl(path, pairs(seed, kind), once=True)
