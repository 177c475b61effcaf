"""What the preference stages (reward models, DPO) share: their data and their report."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

from lm.config import Config, ConfigError
from lm.engine import make_engine
from lm.init import init_params_loader
from lm.loop import Setup, evaluate
from lm.stages.pretrain import run_meta
from lm.stages.sft import store_tokenizer


def data_config(cfg: Config, run_dir: str):
    """The run's preference sources; the default corpus is the embedded stdlib pair set."""
    from data_pipeline import default_preferences
    from data_pipeline.config import SourceConfig

    d = cfg.data
    kind = "shuffled" if cfg.stage == "reward" else "mismatched"  # see default_preferences
    embedded = lambda: default_preferences.write_jsonl(  # noqa: E731
        os.path.join(run_dir, "data", f"stdlib_preferences_{kind}.jsonl"), d.seed, kind)
    if d.corpus == "default":
        src = SourceConfig(name="stdlib_preferences", kind="preference", paths=(embedded(),), chat_format="prompt",
                           heldout_fraction=d.heldout_fraction)
        return dataclasses.replace(d, corpus="sources", sources=(src,))
    if any(default_preferences.EMBEDDED in s.paths for s in d.sources):
        d = dataclasses.replace(d, sources=tuple(
            dataclasses.replace(s, paths=tuple(embedded() if p == default_preferences.EMBEDDED else p
                                               for p in s.paths)) for s in d.sources))
    if d.corpus != "sources":
        raise ConfigError(f"data.corpus={d.corpus!r}: stage {cfg.stage!r} reads preference pairs "
                          "(data.corpus='sources' with kind='preference' sources) or the embedded set "
                          "(data.corpus='default')")
    return d


def setup(cfg: Config, run_dir: str, log: Callable, mesh, objective, finish) -> Setup:
    from data_pipeline.preferences import PreferenceData

    tok = store_tokenizer(cfg, run_dir)
    if tok.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"tokenizer {tok.path} has {tok.vocab_size} pieces but model.vocab_size="
                          f"{cfg.model.vocab_size}; take the model config from the base run")
    engine = make_engine(cfg, mesh, objective)
    data = PreferenceData(data_config(cfg, run_dir), run_dir, tokenizer=tok, eval_batches=cfg.trainer.eval_batches,
                          log=log)
    loader = init_params_loader(cfg, engine, log)
    if loader is None and engine.frozen_names:
        raise ConfigError(f"pref.loss={cfg.pref.loss} compares the policy with the model it starts from: "
                          "set trainer.init_from (an SFT run)")
    if loader is None:
        log(f"WARNING: stage {cfg.stage!r} from random parameters (no trainer.init_from)")
    return Setup(engine=engine, data=data, meta=run_meta(cfg, tok), init_params=loader, finish=finish(loader))


def before_after(ctx, summary: dict, init_params, keys: dict[str, str]) -> None:
    """Held-out metrics of the starting model and of the trained one, printed side by side."""
    evals = summary.get("heldout") or ctx.evaluate()
    after = {k: evals.get(f"eval_{k}", float("nan")) for k in keys}
    before = None
    if init_params is not None:
        eng = ctx.engine
        plain = make_engine(dataclasses.replace(ctx.cfg, lora=dataclasses.replace(ctx.cfg.lora, rank=0)),
                            eng.mesh, eng.objective)
        params = init_params()
        frozen = {name: params for name in plain.frozen_names}
        m = evaluate(plain, plain.compile_eval_step(), params, frozen, ctx.data.heldout)
        before = {k: m.get(f"eval_{k}") for k in keys}
    for k, label in keys.items():
        summary[f"heldout_{k}"] = after[k]
        if before is not None:
            summary[f"base_heldout_{k}"] = before[k]
            ctx.log(f"held-out {label}: {before[k]:.4f} before -> {after[k]:.4f} after")
        else:
            ctx.log(f"held-out {label}: {after[k]:.4f}")
