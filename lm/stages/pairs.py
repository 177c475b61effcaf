"""What the preference stages (reward models, DPO) share: their data, their setup and their
report, and DPO's reference log-probabilities computed ahead (`ReferenceTable`)."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import zipfile
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from data_pipeline import default_preferences
from data_pipeline.config import SourceConfig
from data_pipeline.pipeline import global_batch
from data_pipeline.preferences import open_preference_source, pair_rows, preference_data
from data_pipeline.sources import source_configs
from lm.config import Config, ConfigError
from lm.model.sharding import all_processes_agree, process_rows, put_rows, to_host
from lm.objectives.preference import reply_logps
from lm.stages.common import base_evals, evaluators, run_meta, run_tokenizer
from lm.train.engine import make_engine
from lm.train.init import init_params_loader
from lm.train.loop import Setup


def data_config(cfg: Config, run_dir: str, kind: str):
    """The run's preference sources; the default corpus is the embedded stdlib pair set of
    `kind` ("shuffled" or "mismatched": see data_pipeline/default_preferences.py)."""
    d = cfg.data
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


def setup(cfg: Config, run_dir: str, log: Callable, mesh, objective, finish, embedded: str) -> Setup:
    """A preference stage: `objective` on the run's pairs (the embedded set of kind `embedded`
    by default), from the model `trainer.init_from` names; `finish(loader)` its report."""
    tok = run_tokenizer(cfg, run_dir)
    engine = make_engine(cfg, mesh, objective)
    data = preference_data(data_config(cfg, run_dir, embedded), run_dir, tokenizer=tok,
                           eval_batches=cfg.trainer.eval_batches, log=log)
    loader = init_params_loader(cfg, engine, log, run_dir)
    if loader is None and engine.frozen_names:
        raise ConfigError(f"pref.loss={cfg.pref.loss} compares the policy with the model it starts from: "
                          "set trainer.init_from (an SFT run)")
    if loader is None:
        log(f"WARNING: stage {cfg.stage!r} from random parameters (no trainer.init_from)")
    if objective.precomputed:
        if loader is None:
            raise ConfigError("pref.reference='precomputed' needs the model to start from: set trainer.init_from")
        data = ReferenceTable(data, cfg, engine, loader, os.path.join(run_dir, "reference_logps.npz"), log)
    return Setup(engine=engine, data=data, meta=run_meta(cfg, tok), init_params=loader, finish=finish(loader),
                 evaluators=evaluators(cfg, engine, tok, log))


def before_after(ctx, summary: dict, init_params, keys: dict[str, str]) -> None:
    """Held-out metrics of the starting model and of the trained one, printed side by side."""
    evals = summary.get("heldout") or ctx.evaluate()
    after = {k: evals.get(f"eval_{k}", float("nan")) for k in keys}
    before = None
    if all(np.isnan(v) for v in after.values()):  # nothing held out (the loop warned at the start)
        for k, label in keys.items():
            summary[f"heldout_{k}"] = None
            ctx.log(f"held-out {label}: n/a (no held-out pairs)")
        return
    if init_params is not None:
        m = base_evals(ctx, init_params)
        before = {k: m.get(f"eval_{k}", float("nan")) for k in keys}
    for k, label in keys.items():
        summary[f"heldout_{k}"] = after[k]
        if before is not None:
            summary[f"base_heldout_{k}"] = before[k]
            ctx.log(f"held-out {label}: {before[k]:.4f} before -> {after[k]:.4f} after")
        else:
            ctx.log(f"held-out {label}: {after[k]:.4f}")


SCORED = ("inputs", "targets", "segment_ids", "positions", "loss_mask")  # what the reference reads


def _key(pair_inputs) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(pair_inputs, np.int32).tobytes(), digest_size=16).digest()


class ReferenceTable:
    """Preference data whose batches carry the reference's log-probabilities ("ref_logps",
    (B, 2)), computed once before training over every training and held-out pair, keyed by
    the pair's tokens, and kept in the run directory so that a resumed run reads them back.
    Everything else is the wrapped data's.

    The reference runs on the whole mesh, its batches split over every device as the
    training batches are (across processes too: each process computes its devices' rows,
    and every process ends with the whole table; process 0 writes the file)."""

    def __init__(self, data, cfg: Config, engine, loader: Callable, path: str, log: Callable):
        self._data, self.path, self._loader = data, path, loader
        self.names, self.weights, self.stats, self.tokenizer = data.names, data.weights, data.stats, data.tokenizer
        self.heldout, self.heldout_bytes = data.heldout, data.heldout_bytes
        meta = f"{cfg.trainer.init_from}|{cfg.trainer.init_step}|{cfg.data.seq_len}"
        stored = None
        if os.path.exists(path):
            try:
                z = np.load(path, allow_pickle=False)
                stored, keys, values = str(z["meta"]), z["keys"], z["values"]
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # damaged: compute it again
                log(f"WARNING: {path} is unreadable ({type(e).__name__}); computing the reference again")
        if all_processes_agree(stored == meta):  # (every process reads it, or every process computes)
            self.table = dict(zip((bytes(k) for k in keys), values))
            log(f"reference log-probabilities: {len(self.table)} pairs read from {path}")
            self._heldout(engine, None)
            return
        self.table = {}
        fn, params = self._scorer(engine)
        b = cfg.data.batch_size

        for c in source_configs(data.data):
            train, _ = open_preference_source(c)
            rows = iter(pair_rows(train, data.tokenizer.path, cfg.data.seq_len, source=c.name, shuffle=False,
                                  repeat=False))
            while chunk := list(itertools.islice(rows, b)):
                batch = {k: put_rows(np.stack([e[k] for e in chunk] + [np.zeros_like(chunk[0][k])] * (b - len(chunk))),
                                     engine.batch_sharding[k]) for k in SCORED}
                ref = to_host(fn(params, batch))
                for r, e in enumerate(chunk):
                    self.table[_key(e["inputs"])] = ref[r]
        self._heldout(engine, (fn, params))
        if jax.process_index() == 0:
            keys = np.frombuffer(b"".join(self.table), np.uint8).reshape(len(self.table), 16)
            tmp = path + ".tmp.npz"
            np.savez(tmp, keys=keys, values=np.stack(list(self.table.values())).astype(np.float32),
                     meta=np.str_(meta))
            os.replace(tmp, path)
        log(f"reference log-probabilities: {len(self.table)} training pairs computed once, kept in {path}")

    def _scorer(self, engine):
        graphdef = engine.graphdef
        fn = jax.jit(lambda p, batch: reply_logps(nnx.merge(graphdef, p), batch)[0])
        return fn, jax.device_put(self._loader(), engine.param_sharding)

    def _heldout(self, engine, scorer) -> None:
        """Held-out batches (this process's rows of each) get their reference log-probabilities
        (stored with the table), computed together by all processes when any lacks one."""
        batches = [batch for batches in self._data.heldout.values() for batch in batches]
        known = all(_key(x) in self.table for batch in batches
                    for x, v in zip(batch["inputs"], batch["segment_ids"]) if v.any())
        if all_processes_agree(known):
            for batch in batches:
                batch["ref_logps"] = self._lookup(batch)
            return
        fn, params = scorer or self._scorer(engine)
        for batch in batches:
            shardings = {k: engine.batch_sharding[k] for k in SCORED}
            ref = to_host(fn(params, global_batch({k: batch[k] for k in SCORED}, shardings)))
            batch["ref_logps"] = ref[process_rows(engine.batch_sharding["inputs"], len(ref))]
            for x, v, r in zip(batch["inputs"], batch["segment_ids"], batch["ref_logps"]):
                if v.any():
                    self.table[_key(x)] = r

    def _lookup(self, batch: dict) -> np.ndarray:
        out = np.zeros(batch["inputs"].shape[:2], np.float32)
        for r, (x, v) in enumerate(zip(batch["inputs"], batch["segment_ids"])):
            if not v.any():
                continue  # a padding row of a short held-out batch
            try:
                out[r] = self.table[_key(x)]
            except KeyError:
                raise ConfigError(f"a pair has no precomputed reference log-probabilities; delete {self.path} "
                                  "to compute them again (the data changed?)") from None
        return out

    # The DataSource surface: the wrapped data's, with the reference added to each batch.

    def next_train(self) -> dict:
        batch = self._data.next_train()
        batch["ref_logps"] = self._lookup(batch)
        return batch

    def get_state(self) -> dict | None:
        return self._data.get_state()

    def set_state(self, state: dict) -> None:
        self._data.set_state(state)

    def metrics(self) -> dict:
        return self._data.metrics()

    def attach(self, ctx: Any) -> None:
        self._data.attach(ctx)
