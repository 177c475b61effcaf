"""Reward functions for RL: plain Python callables `reward(completion, example) -> float`.

`completion` is the decoded reply (stop token removed); `example` the prompt's record
(with its "answer"). Verifiable rewards, 1.0 or 0.0:
- "exact": the reply, stripped, is the answer (the synthetic arithmetic task);
- "number": the reply's last number is the answer;
- "gsm8k_strict": the reply ends its reasoning with "#### N" and N is the answer (GSM8K's format);
- "gsm8k_lenient": the last number of the reply is the answer, whatever the format.
`rl.reward = "package.module:function"` names any other callable.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

from lm.config import ConfigError

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _norm(n: str) -> str:
    n = n.replace(",", "").rstrip(".")
    return n[:-2] if n.endswith(".0") else n


def last_number(text: str) -> str | None:
    nums = _NUMBER.findall(text)
    return _norm(nums[-1]) if nums else None


def exact(completion: str, example: dict) -> float:
    return float(completion.strip() == str(example["answer"]).strip())


def number(completion: str, example: dict) -> float:
    return float(last_number(completion) == _norm(str(example["answer"])))


def gsm8k_strict(completion: str, example: dict) -> float:
    m = re.search(r"####\s*(-?[\d,]+(?:\.\d+)?)\s*$", completion.strip())
    return float(m is not None and _norm(m.group(1)) == _norm(str(example["answer"])))


def gsm8k_lenient(completion: str, example: dict) -> float:
    return number(completion, example)


REWARDS: dict[str, Callable[[str, dict], float]] = {
    "exact": exact, "number": number, "gsm8k_strict": gsm8k_strict, "gsm8k_lenient": gsm8k_lenient}


def get(name: str) -> Callable[[str, dict], float]:
    if name in REWARDS:
        return REWARDS[name]
    if name.startswith("run:"):
        raise ConfigError(f"rl.reward={name!r}: a reward model's run scores replies in PPO (stage 'ppo'); GRPO "
                          f"takes a rule: one of {', '.join(REWARDS)} or 'module:function'")
    if ":" in name:
        module, fn = name.split(":", 1)
        try:
            return getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"rl.reward={name!r}: {e}") from None
    raise ConfigError(f"rl.reward={name!r}: choose one of {', '.join(REWARDS)} or 'module:function'")
