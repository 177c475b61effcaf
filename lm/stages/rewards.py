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
import os
import re
import sys
from typing import Callable

import numpy as np

from data_pipeline.errors import UserError
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
        if "" not in sys.path and os.getcwd() not in sys.path:  # as `python -m` does: the working directory's modules
            sys.path.insert(0, os.getcwd())
        try:
            return getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"rl.reward={name!r}: {e}") from None
    raise ConfigError(f"rl.reward={name!r}: choose one of {', '.join(REWARDS)} or 'module:function'")


class RewardError(UserError, ValueError):
    """A reward function that raised, or returned something other than a finite number."""


def _name(fn: Callable) -> str:
    mod, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None) or repr(fn)
    return f"{mod}:{name}" if mod else name


def _short(x, n: int = 80) -> str:
    text = repr(x)
    return text if len(text) <= n else text[: n - 3] + "..."


def checked(value, fn: Callable, completion: str, example: dict) -> float:
    """`value` as a float if it is a finite real number (bool, int, float or a NumPy scalar of
    those); anything else is a RewardError naming the function, the value and the example."""
    where = f"the reward function {_name(fn)} returned {_short(value)} for the reply {_short(completion)} " \
            f"to {_short(example)}"
    if value is None:
        raise RewardError(f"{where}: a reward is a finite number (does the function forget to `return`?)")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if not isinstance(value, (bool, int, float, np.bool_, np.integer, np.floating)):
        raise RewardError(f"{where}: a reward is one finite number (bool, int or float), not "
                          f"{type(value).__name__}")
    if not np.isfinite(float(value)):
        raise RewardError(f"{where}: a reward must be finite")
    return float(value)


def score_all(fn: Callable, pairs: list[tuple[str, dict]]) -> np.ndarray:
    """Rewards of (completion, example) pairs, each checked (`checked`): in one call when the
    function scores batches (`fn.batched`, e.g. a reward model), else one by one. A function
    that raises is a RewardError naming it and the example."""
    batched = getattr(fn, "batched", None)
    try:
        if batched is not None:
            values = list(batched(pairs))
            if len(values) != len(pairs):
                raise RewardError(f"the reward function {_name(fn)} scored {len(values)} of {len(pairs)} replies")
        else:
            values = []
            for c, e in pairs:
                values.append(fn(c, e))
    except RewardError:
        raise
    except Exception as e:  # noqa: BLE001 -- the user's function: say which, on what
        c, ex = pairs[len(values)] if batched is None else pairs[0]
        raise RewardError(f"the reward function {_name(fn)} raised {type(e).__name__}: {str(e)[:200]} "
                          f"(on the reply {_short(c)} to {_short(ex)})") from None
    return np.asarray([checked(v, fn, c, e) for v, (c, e) in zip(values, pairs)], np.float32)
