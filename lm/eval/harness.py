"""A run directory as an lm-evaluation-harness model: any harness task on a JAX checkpoint.

`JaxLM(run_dir)` is a harness `LM`, registered as "lm-jax" when this module is imported:
- `loglikelihood`: `lm.eval.evaluate.loglikelihood_texts`, the scorer of `lm eval` (the
  harness's tokenization conventions, tested equal to its own), batched and sharded over
  the run's mesh;
- `loglikelihood_rolling`: `lm.eval.evaluate.loglikelihood_rolling` (the harness's rolling
  windows over the text's tokens, the first predicted from BOS);
- `generate_until`: the KV-cache sampler (lm/sampling/sampler.py), a batch of prompts at a time
  (requests grouped by their generation settings), greedy unless the task asks for
  `do_sample` with a temperature; the text is cut at the first stop string.

Three ways in:
    lm eval RUN_DIR --harness hellaswag,arc_easy [--limit N]          # writes eval.json
    python -m lm.eval.harness run --model lm-jax --model_args run_dir=RUN_DIR --tasks hellaswag
    lm_eval.simple_evaluate(model=JaxLM("runs/x"), tasks=[...])        # after importing this module
The harness downloads its task data from the Hugging Face Hub (or reads its cache), and
needs `pip install lm-eval`; the rest of this codebase does not.
"""

from __future__ import annotations

import json
import math
import os
from functools import partial
from typing import Callable, Sequence

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from data_pipeline.errors import UserError
from lm.eval.evaluate import loglikelihood_rolling, loglikelihood_texts, loglikelihoods, model_logits
from lm.sampling.sampler import generate
from lm.train.run import load_run
from lm.train.rundir import merge_json


@register_model("lm-jax")
class JaxLM(TemplateLM):
    """The newest checkpoint of a run (or `run`, an already loaded `lm.train.run.LoadedRun`)."""

    def __init__(self, run_dir: str | None = None, batch_size: int | str | None = 16, max_gen_toks: int = 256,
                 step: int | None = None, run=None, progress: bool = True, log: Callable = print,
                 **kwargs) -> None:
        super().__init__()
        if run is None:
            if not run_dir:
                raise ValueError("lm-jax needs run_dir=RUN_DIR (--model_args run_dir=runs/NAME)")

            # the parameters laid out by the run's mesh rules, over all devices
            run = load_run(run_dir, single_device=False, log=log, step=None if step is None else int(step))
        if run.tokenizer is None:
            raise FileNotFoundError(f"{run_dir} has no tokenizer.model: the harness gives text, which needs one")
        self.run, self.tok = run, run.tokenizer
        self.logits_fn = partial(model_logits, run.graphdef)
        self.sharding = run.trainer.batch_sharding["inputs"]
        ways = self.sharding.mesh.shape["data"] * self.sharding.mesh.shape["fsdp"]
        size = 16 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self._batch_size = -(-size // ways) * ways  # every device gets whole rows
        self._max_gen_toks = int(max_gen_toks)
        self.progress = progress

    # -- what the harness asks of a model --------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:  # the context of an empty context, as for a BOS model in HFLM
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self.run.cfg.model.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string, bos=add_special_tokens is not False)

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self.tok.decode(tokens)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [req.args[:2] for req in requests]
        out = loglikelihood_texts(self.logits_fn, self.run.params, self.tok, pairs, self.max_length,
                                  self.batch_size, self.progress and not disable_tqdm, "loglikelihood", self.sharding)
        for pair, answer in zip(pairs, out):
            self.cache_hook.add_partial("loglikelihood", pair, answer)
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return loglikelihoods(self.logits_fn, self.run.params, [(c, k) for _, c, k in requests], self.max_length,
                              self.batch_size, self.progress and not disable_tqdm, "loglikelihood", self.sharding)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        texts = [req.args[0] for req in requests]
        out = loglikelihood_rolling(self.logits_fn, self.run.params, self.tok, texts, self.max_length,
                                    self.batch_size, self.progress and not disable_tqdm, self.sharding)
        for text, ll in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), ll)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with the same generation settings decode together
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        bar = None
        if self.progress and not disable_tqdm:
            bar = tqdm(total=len(requests), desc="generate_until", unit="req", dynamic_ncols=True)
        for idx in groups.values():
            kw = dict(requests[idx[0]].args[1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in a {self.max_length}-token "
                                 "context")
            temperature = float(kw.get("temperature", 1.0)) if kw.get("do_sample", False) else 0.0
            idx = sorted(idx, key=lambda i: -len(requests[i].args[0]))  # similar lengths share a batch
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start: start + self.batch_size]
                prompts = [self.tok.encode(requests[i].args[0], bos=True) for i in chunk]
                prompts += [prompts[-1]] * (self.batch_size - len(prompts))  # one batch shape: one compilation
                new = generate(self.run.graphdef, self.run.params, prompts, max_new, self.max_length,
                               temperature=temperature, top_p=float(kw.get("top_p", 1.0)),
                               top_k=int(kw.get("top_k", 0) or 0), stop_ids=[self.tok.eos_id], seed=start,
                               bucket=64)
                for i, prompt, ids in zip(chunk, prompts, new):
                    text = self._continuation(prompt, [t for t in ids if t != self.tok.eos_id])
                    for stop in until:  # cut at the first stop string
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                if bar is not None:
                    bar.update(len(chunk))
        if bar is not None:
            bar.close()
        return out  # type: ignore[return-value]

    def _continuation(self, prompt: list[int], new: list[int]) -> str:
        """The text the new tokens add to the prompt's, leading spaces included (decoded alone,
        SentencePiece would drop the space of a first "▁word")."""
        before = self.tok.decode(prompt)
        after = self.tok.decode(list(prompt) + list(new))
        return after[len(before):] if after.startswith(before) else self.tok.decode(new)


# ---------------------------------------------------------------------------------------
# lm eval RUN --harness TASKS


def evaluate_harness(run_dir: str, tasks: Sequence[str | dict], limit: int | None = None, batch_size: int = 16,
                     num_fewshot: int | None = None, log: Callable = print, progress: bool = True,
                     **harness_kwargs) -> dict:
    """Run harness tasks (names, or task config dicts) on a run; results per task under
    "harness:TASK" with the harness's metric names, task version and item count, merged into
    RUN_DIR/eval.json. `harness_kwargs` go to `lm_eval.simple_evaluate`."""
    import lm_eval  # optional extra [harness]


    model = JaxLM(run_dir, batch_size=batch_size, log=log, progress=progress)
    try:
        out = lm_eval.simple_evaluate(model=model, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                      **{"log_samples": False, "bootstrap_iters": 0, **harness_kwargs})
    except Exception as e:  # noqa: BLE001 -- the harness fetching its data sets: say so in one line
        if not _unreachable(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"lm-evaluation-harness could not load the data sets of {', '.join(map(str, tasks))} "
                        f"({type(e).__name__}: {first}): it downloads them from the Hugging Face Hub; without a "
                        "network, use data sets it cached before (HF_DATASETS_OFFLINE=1) or local task YAMLs "
                        "(lm_eval --include-path)") from None
    results: dict = {"run": run_dir, "step": model.run.step}
    for task, metrics in out["results"].items():
        r = {}
        for key, value in metrics.items():  # "acc,none" -> "acc" (the harness's filter after the comma)
            name, _, filt = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in name:
                value = float(value)
                r[name if filt in ("none", "") else f"{name},{filt}"] = value if math.isfinite(value) else None
        n = out.get("n-samples", {}).get(task, {})
        r.update(version=out.get("versions", {}).get(task), n=n.get("effective", n.get("original")),
                 source=f"lm-evaluation-harness {getattr(lm_eval, '__version__', '')}".strip(), step=model.run.step)
        results[f"harness:{task}"] = r
    merge_json(os.path.join(run_dir, "eval.json"), results)
    return results


def _unreachable(e: BaseException) -> bool:
    """Whether `e` (or what caused it) is a data set the harness could not download."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        names = {t.__name__ for t in type(e).__mro__}
        if names & {"ConnectionError", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "HfHubHTTPError"} \
                or "Couldn't reach" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def main() -> None:
    """The harness's own command line, with "lm-jax" registered."""
    from lm_eval.__main__ import cli_evaluate  # optional extra [harness]

    cli_evaluate()


if __name__ == "__main__":
    main()
