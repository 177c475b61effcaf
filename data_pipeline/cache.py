"""Pre-tokenisation cache: tokenize every source once, read token ids by random access.

`lm data cache EXPERIMENT` (or `build()`) tokenizes each source's train and validation
documents in parallel worker processes, in shards of `shard_docs` documents, with a
progress bar. A shard is two NumPy files written atomically (`.tokens.npy`, then
`.offsets.npy`, whose presence marks the shard complete), so an interrupted build
resumes where it stopped. `meta.json` records the tokenizer (its SHA-256), the counts
and the bad records met (with their first locations); the tokenizer itself is stored
beside it. Training then reads the cache (`--set data.cache_dir=DIR`) through
memory-mapped arrays: `TokenCache` is a document source whose records carry token ids.

Layout: DIR/tokenizer.model, DIR/<source>/<split>/{meta.json, shard_NNNNN.tokens.npy,
shard_NNNNN.offsets.npy}.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
from typing import Callable

import numpy as np
from tqdm import tqdm

from data_pipeline.config import DataConfig
from data_pipeline.sources import DataError, DocumentSource, Record, open_source, source_configs
from data_pipeline.tokenizer import Tokenizer, file_sha256, tokenizer_for_run

_WORKER: dict = {}


def _init_worker(docs: DocumentSource, tokenizer_path: str) -> None:
    _WORKER["docs"] = docs
    _WORKER["tok"] = Tokenizer(tokenizer_path)


def _encode_shard(job: tuple[int, int, int, str, str]) -> tuple[int, int, list[str]]:
    k, lo, hi, out_dir, dtype = job
    docs, tok = _WORKER["docs"], _WORKER["tok"]
    pieces, offsets, bad = [], [0], []
    for i in range(lo, hi):
        rec = docs[i]
        if rec.text is None:
            bad.append(f"{rec.where}: {rec.error}")
            ids = []
        else:
            ids = tok.encode(rec.text, bos=True, eos=True) if rec.text.strip() else []
        pieces.append(np.asarray(ids, dtype))
        offsets.append(offsets[-1] + len(ids))
    tokens = np.concatenate(pieces) if pieces else np.zeros((0,), dtype)
    base = os.path.join(out_dir, f"shard_{k:05d}")
    _save_atomic(base + ".tokens.npy", tokens)
    _save_atomic(base + ".offsets.npy", np.asarray(offsets, np.int64))  # last: marks the shard complete
    return k, int(tokens.size), bad


def _save_atomic(path: str, arr: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)


def build_split(docs: DocumentSource, tokenizer_path: str, out_dir: str, vocab_size: int, *,
                shard_docs: int = 256, workers: int | None = None, progress: bool = True,
                desc: str = "") -> dict:
    """Tokenize `docs` into `out_dir` (resuming a partial build); returns its meta dict."""
    os.makedirs(out_dir, exist_ok=True)
    sha = file_sha256(tokenizer_path)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        meta = json.load(open(meta_path))
        if meta.get("complete") and meta.get("tokenizer_sha256") == sha and meta.get("num_docs") == len(docs):
            return meta
        if meta.get("tokenizer_sha256") != sha:  # built with another tokenizer: start over
            shutil.rmtree(out_dir)
            os.makedirs(out_dir)
    dtype = "uint16" if vocab_size <= 65536 else "uint32"
    n = len(docs)
    jobs = [(k, lo, min(lo + shard_docs, n), out_dir, dtype)
            for k, lo in enumerate(range(0, n, shard_docs))
            if not os.path.exists(os.path.join(out_dir, f"shard_{k:05d}.offsets.npy"))]
    bad: list[str] = []
    bar = None
    if progress:
        done = n - sum(hi - lo for _, lo, hi, _, _ in jobs)
        bar = tqdm(total=n, initial=done, desc=desc or out_dir, unit="doc", dynamic_ncols=True)
    workers = workers or os.cpu_count() or 1
    if jobs:
        if workers > 1 and len(jobs) > 1:
            ctx = mp.get_context("spawn")  # never fork a process that may hold JAX threads
            sizes = {job[0]: job[2] - job[1] for job in jobs}
            with ctx.Pool(workers, initializer=_init_worker, initargs=(docs, tokenizer_path)) as pool:
                for k, _, b in pool.imap_unordered(_encode_shard, jobs):
                    bad += b
                    if bar is not None:
                        bar.update(sizes[k])
        else:
            _init_worker(docs, tokenizer_path)
            for job in jobs:
                _, _, b = _encode_shard(job)
                bad += b
                if bar is not None:
                    bar.update(job[2] - job[1])
    if bar is not None:
        bar.close()
    num_shards = (n + shard_docs - 1) // shard_docs
    tokens = sum(int(np.load(os.path.join(out_dir, f"shard_{k:05d}.offsets.npy"), mmap_mode="r")[-1])
                 for k in range(num_shards))
    meta = {"complete": True, "tokenizer_sha256": sha, "vocab_size": vocab_size, "dtype": dtype,
            "num_docs": n, "shard_docs": shard_docs, "num_shards": num_shards, "num_tokens": tokens,
            "bad_records": len(bad), "bad_examples": bad[:10]}
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(meta_path + ".tmp", meta_path)
    return meta


def build(data: DataConfig, vocab_size: int, run_dir: str, cache_dir: str, workers: int | None = None,
          progress: bool = True, log: Callable = print) -> dict:
    """Tokenize every source (train and validation) of data config `data` into `cache_dir`."""
    configs = source_configs(data)
    opened = [open_source(c) for c in configs]
    os.makedirs(cache_dir, exist_ok=True)
    cached_tok = os.path.join(cache_dir, "tokenizer.model")
    tok_path = data.tokenizer or (cached_tok if os.path.exists(cached_tok) else None)
    tok = tokenizer_for_run([(t, c.weight) for c, (t, _) in zip(configs, opened)], vocab_size,
                            run_dir, tok_path, data.tokenizer_sample_mb, data.seed, log)
    if os.path.abspath(tok.path) != os.path.abspath(cached_tok):
        shutil.copyfile(tok.path, cached_tok)
    metas = {}
    for c, (train, val) in zip(configs, opened):
        for split, docs in (("train", train), ("validation", val)):
            if len(docs) == 0:
                continue
            meta = build_split(docs, cached_tok, os.path.join(cache_dir, c.name, split), tok.vocab_size,
                               workers=workers, progress=progress, desc=f"{c.name}/{split}")
            metas[f"{c.name}/{split}"] = meta
            if meta["bad_records"]:
                log(f"{c.name}/{split}: {meta['bad_records']} bad record(s) left out; first: "
                    + "; ".join(meta["bad_examples"][:3]))
            log(f"{c.name}/{split}: {meta['num_docs']:,} documents, {meta['num_tokens']:,} tokens")
    return metas


class TokenCache(DocumentSource):
    """A cached split: record i carries the token ids of document i (memory-mapped)."""

    def __init__(self, split_dir: str, tokenizer_path: str | None = None):
        meta_path = os.path.join(split_dir, "meta.json")
        if not os.path.exists(meta_path):
            raise DataError(f"no token cache at {split_dir}; build it with `lm data cache EXPERIMENT "
                            "--set data.cache_dir=...` (or unset data.cache_dir to tokenize on the fly)")
        self.meta = json.load(open(meta_path))
        if not self.meta.get("complete"):
            raise DataError(f"the token cache at {split_dir} is incomplete; run `lm data cache` again to finish it")
        if tokenizer_path and file_sha256(tokenizer_path) != self.meta["tokenizer_sha256"]:
            raise DataError(f"the token cache at {split_dir} was built with another tokenizer than "
                            f"{tokenizer_path}; rebuild it or use the cache's tokenizer.model")
        self.dir = split_dir
        self.shard_docs = self.meta["shard_docs"]
        self._offsets = [np.load(os.path.join(split_dir, f"shard_{k:05d}.offsets.npy"))
                         for k in range(self.meta["num_shards"])]
        self._tokens: dict[int, np.ndarray] = {}

    def __len__(self):
        return self.meta["num_docs"]

    size_unit = "tokens"

    def sizes(self):
        """Tokens per document (exact: the offsets)."""
        return np.concatenate([np.diff(o) for o in self._offsets])[: len(self)].astype(np.int64)

    def key(self, i):
        return f"{self.dir}#{i}"

    def __getstate__(self):  # memory maps are reopened in each worker
        return {**self.__dict__, "_tokens": {}}

    def __getitem__(self, i):
        k, j = divmod(i, self.shard_docs)
        tokens = self._tokens.get(k)
        if tokens is None:
            tokens = np.load(os.path.join(self.dir, f"shard_{k:05d}.tokens.npy"), mmap_mode="r")
            self._tokens[k] = tokens
        off = self._offsets[k]
        ids = np.asarray(tokens[off[j]: off[j + 1]], np.int32)
        return Record("", f"{self.dir}#{i}", None, ids)
