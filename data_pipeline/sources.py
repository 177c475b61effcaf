"""Document sources: random-access lists of documents that grain can shuffle and shard.

A source turns a `SourceConfig` into a `DocumentSource`: `len(src)` documents, and
`src[i]` returns a `Record` with the document's text or, for a bad record (malformed
JSON, invalid UTF-8, a missing text field, an unreadable file, an empty document), the
reason and its `file:line` location. Bad records are never dropped silently: the
pipeline counts and reports them (and raises on the first one in `strict` mode).

Kinds: the embedded default corpus; plain-text files (one document per file, or per
blank-line-separated block); JSON Lines / JSON arrays with a configurable text field,
plain or `.gz` / `.bz2`; Parquet; ArrayRecord; TFDS datasets prepared locally
(`tfds.data_source`). Paths are globs. A source is split into train and validation
either by explicit `validation_paths` or by a deterministic hash of each document's
location (`heldout_fraction`), or, for text files, by position: the last `heldout_fraction` of
each file's bytes (`heldout_split="tail"`, nanoGPT's split of Tiny Shakespeare).

`Pieces` cuts long documents into pieces of about a row's worth of tokens, so that the
pipeline can shuffle pieces rather than whole documents (data_pipeline/pipeline.py).
Sources that can tell the size of each document cheaply (`DocumentSource.sizes`: text
files, JSON Lines, the default corpus, the token cache) are cut; the others (Parquet,
ArrayRecord, TFDS) are read whole.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import json
import os
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from data_pipeline import default_corpus
from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.default_corpus import _pydoc_topics
from data_pipeline.errors import UserError


class DataError(UserError, ValueError):
    """Bad data configuration or input; the message names the input and the fix."""


class Record(NamedTuple):
    text: str | None  # None for a bad record
    where: str  # "path:line" (or "path#row"), for error reports
    error: str | None = None
    tokens: Any = None  # token ids, when read from the pre-tokenisation cache
    # A piece of a longer document (`Pieces`): BOS only before its first piece, EOS only after
    # its last; `doc` is the document's index in its source (for batch-diversity counts).
    bos: bool = True
    eos: bool = True
    doc: int = -1


def expand(patterns: Sequence[str]) -> list[str]:
    """Sorted, de-duplicated files matching the globs; a pattern matching nothing is an error."""
    files: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        hits = sorted(glob.glob(pattern, recursive=True))
        hits = [h for h in hits if os.path.isfile(h)]
        if not hits:
            raise DataError(f"no files match {pattern!r}; check the path (globs like data/*.jsonl are allowed)")
        files += hits
    return list(dict.fromkeys(files))


def _open_bytes(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".bz2"):
        return bz2.open(path, "rb")
    return open(path, "rb")


def _decode(raw: bytes, where: str) -> Record:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Record(None, where, f"invalid UTF-8 ({e.reason} at byte {e.start})")
    if not text.strip():
        return Record(None, where, "empty document")
    return Record(text, where)


class DocumentSource:
    """Base class: a sequence of Records with a stable key per document."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> Record:
        raise NotImplementedError

    def key(self, i: int) -> str:
        """A stable identity of document i (for the hash split)."""
        raise NotImplementedError

    def sizes(self) -> np.ndarray | None:
        """The approximate size of every document in characters (bytes will do), read without
        reading the documents; None where that is not cheap (the documents are then not cut)."""
        return None

    size_unit = "chars"  # or "tokens" (the token cache)


class TextFiles(DocumentSource):
    """Plain text: a document per file, per blank-line-separated block, or per line.

    Blocks and lines are located by a scan of the files when the source is built, and
    read by offset afterwards (random access, nothing held in memory).
    """

    def __init__(self, files: Sequence[str], doc_per: str = "file"):
        self.files = list(files)
        self.doc_per = doc_per
        self.index: list[tuple[int, int, int, int]] = []  # (file, start byte, end byte, line)
        for fi, path in enumerate(self.files):
            if doc_per == "file":
                self.index.append((fi, 0, -1, 1))
                continue
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                self.index.append((fi, 0, -1, 1))  # reported when read
                continue
            self.index += _spans(data, fi, doc_per)

    def __len__(self):
        return len(self.index)

    def key(self, i):
        fi, start, _, _ = self.index[i]
        return f"{os.path.basename(self.files[fi])}:{start}"

    def sizes(self):
        out = np.zeros(len(self.index), np.int64)
        for k, (fi, start, end, _) in enumerate(self.index):
            if end < 0:
                try:
                    end = os.path.getsize(self.files[fi])  # (compressed: an underestimate, which is fine)
                except OSError:
                    end = start
            out[k] = end - start
        return out

    def __getitem__(self, i):
        fi, start, end, line = self.index[i]
        path = self.files[fi]
        where = f"{path}:{line}"
        try:
            with _open_bytes(path) as f:
                if start:
                    f.seek(start)
                raw = f.read() if end < 0 else f.read(end - start)
        except OSError as e:
            return Record(None, where, f"unreadable file ({e.strerror or e})")
        return _decode(raw, where)

    def tail_split(self, fraction: float) -> tuple["TextFiles", "TextFiles"]:
        """(train, validation): the last `fraction` of every file's bytes is held out, cut at
        the same byte whatever the documents (nanoGPT's split of Tiny Shakespeare: the last
        10% of the characters, which are bytes in ASCII text). A document that straddles the
        cut is cut too."""
        train, held = TextFiles([]), TextFiles([])
        train.files = held.files = self.files
        train.doc_per = held.doc_per = self.doc_per
        ends: dict[int, int] = {}
        for fi, path in enumerate(self.files):
            if path.endswith((".gz", ".bz2")):
                raise DataError(f"{path}: the tail split needs uncompressed text files")
            with open(path, "rb") as f:
                data = f.read()
            cut = int(len(data) * (1.0 - fraction))
            while 0 < cut < len(data) and data[cut] & 0xC0 == 0x80:  # not inside a UTF-8 character
                cut -= 1
            ends[fi] = len(data)
            for _, start, end, line in (x for x in self.index if x[0] == fi):
                end = len(data) if end < 0 else end
                if start < cut:
                    train.index.append((fi, start, min(end, cut), line))
                if end > cut:
                    held.index.append((fi, max(start, cut), end, line + data[start:max(start, cut)].count(b"\n")))
        return train, held


def _spans(data: bytes, fi: int, doc_per: str) -> list[tuple[int, int, int, int]]:
    """Byte spans of lines, or of blank-line-separated blocks, with their first line number."""
    spans = []
    pos, line_no = 0, 1
    start, start_line = None, 1
    for raw_line in data.splitlines(keepends=True):
        blank = not raw_line.strip()
        if doc_per == "line":
            if not blank:
                spans.append((fi, pos, pos + len(raw_line.rstrip(b"\r\n")), line_no))
        else:
            if blank and start is not None:
                spans.append((fi, start, pos, start_line))
                start = None
            elif not blank and start is None:
                start, start_line = pos, line_no
        pos += len(raw_line)
        line_no += 1
    if doc_per == "block" and start is not None:
        spans.append((fi, start, pos, start_line))
    return spans


class JsonLines(DocumentSource):
    """JSON Lines (one object per line) or JSON arrays of objects; plain, .gz or .bz2.

    Uncompressed files are indexed by line offset and read by random access; compressed
    files and JSON arrays are decoded once into memory when the source is built (use the
    pre-tokenised cache for large compressed corpora).
    """

    def __init__(self, files: Sequence[str], text_field: str = "text", array: bool = False):
        self.files = list(files)
        self.text_field = text_field
        self.index: list[tuple[int, int, int, int]] = []  # (file, start, end, line) for plain files
        self.loaded: list[tuple[bytes | object, str]] = []  # (raw line or parsed item, where)
        for fi, path in enumerate(self.files):
            compressed = path.endswith((".gz", ".bz2"))
            try:
                if array or path.endswith((".json", ".json.gz", ".json.bz2")):
                    with _open_bytes(path) as f:
                        items = json.loads(f.read().decode("utf-8"))
                    if not isinstance(items, list):
                        raise DataError(f"{path}: a .json source must hold a list of objects")
                    self.loaded += [(item, f"{path}#{k}") for k, item in enumerate(items)]
                elif compressed:
                    with _open_bytes(path) as f:
                        for k, raw in enumerate(f, 1):
                            if raw.strip():
                                self.loaded.append((raw, f"{path}:{k}"))
                else:
                    with open(path, "rb") as f:
                        data = f.read()
                    self.index += _spans(data, fi, "line")
            except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
                self.loaded.append((None, f"{path}:0 unreadable ({e})"))

    def __len__(self):
        return len(self.index) + len(self.loaded)

    def sizes(self):
        spans = [end - start for _, start, end, _ in self.index]
        loaded = [len(raw) if isinstance(raw, bytes) else len(str(raw.get(self.text_field, "")))
                  if isinstance(raw, dict) else 0 for raw, _ in self.loaded]
        return np.asarray(spans + loaded, np.int64)

    def key(self, i):
        if i < len(self.index):
            fi, start, _, _ = self.index[i]
            return f"{os.path.basename(self.files[fi])}:{start}"
        return self.loaded[i - len(self.index)][1]

    def __getitem__(self, i):
        if i < len(self.index):
            fi, start, end, line = self.index[i]
            path = self.files[fi]
            where = f"{path}:{line}"
            try:
                with open(path, "rb") as f:
                    f.seek(start)
                    raw = f.read(end - start)
            except OSError as e:
                return Record(None, where, f"unreadable file ({e.strerror or e})")
            return parse_json_record(raw, where, self.text_field)
        raw, where = self.loaded[i - len(self.index)]
        if raw is None:
            return Record(None, where.split(" ", 1)[0], where.split(" ", 1)[-1])
        if isinstance(raw, bytes):
            return parse_json_record(raw, where, self.text_field)
        return json_text_field(raw, where, self.text_field)


def parse_json_record(raw: bytes, where: str, text_field: str) -> Record:
    """A Record from one JSON object's bytes (a bad record says why)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return Record(None, where, f"invalid UTF-8 ({e.reason} at byte {e.start})")
    except json.JSONDecodeError as e:
        return Record(None, where, f"malformed JSON ({e.msg})")
    return json_text_field(obj, where, text_field)


def json_text_field(obj, where: str, text_field: str) -> Record:
    if not isinstance(obj, dict) or text_field not in obj:
        return Record(None, where, f"missing text field {text_field!r}")
    text = obj[text_field]
    if isinstance(text, list) and all(isinstance(t, str) for t in text):
        text = " ".join(text)  # e.g. SciTLDR keeps an abstract as a list of sentences
    if not isinstance(text, str):
        return Record(None, where, f"field {text_field!r} is {type(text).__name__}, not a string")
    if not text.strip():
        return Record(None, where, "empty document")
    return Record(text, where)


class Parquet(DocumentSource):
    """Parquet files; a document per row of `text_field` (read by row group on demand)."""

    def __init__(self, files: Sequence[str], text_field: str = "text"):
        import pyarrow.parquet as pq  # optional: only Parquet sources need it

        self.files = list(files)
        self.text_field = text_field
        self.index: list[tuple[int, int, int]] = []  # (file, row group, row)
        for fi, path in enumerate(self.files):
            meta = pq.ParquetFile(path).metadata
            if text_field not in meta.schema.names:
                raise DataError(f"{path}: no column {text_field!r} (columns: {meta.schema.names}); "
                                "set the source's text_field")
            for g in range(meta.num_row_groups):
                self.index += [(fi, g, r) for r in range(meta.row_group(g).num_rows)]
        self._cache: tuple | None = None

    def __len__(self):
        return len(self.index)

    def key(self, i):
        fi, g, r = self.index[i]
        return f"{os.path.basename(self.files[fi])}#{g}.{r}"

    def __getitem__(self, i):
        import pyarrow.parquet as pq  # optional: only Parquet sources need it

        fi, g, r = self.index[i]
        where = f"{self.files[fi]}#row-group{g}.row{r}"
        if self._cache is None or self._cache[0] != (fi, g):
            table = pq.ParquetFile(self.files[fi]).read_row_group(g, columns=[self.text_field])
            self._cache = ((fi, g), table.column(0).to_pylist())
        text = self._cache[1][r]
        if not isinstance(text, str) or not text.strip():
            return Record(None, where, "empty or missing text")
        return Record(text, where)


class ArrayRecord(DocumentSource):
    """ArrayRecord files whose records are UTF-8 text or JSON objects with `text_field`."""

    def __init__(self, files: Sequence[str], text_field: str = "text"):
        # optional: only ArrayRecord sources
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.files = list(files)
        self.text_field = text_field
        self.src = ArrayRecordDataSource(self.files)

    def __len__(self):
        return len(self.src)

    def key(self, i):
        return f"arrayrecord#{i}"

    def __getitem__(self, i):
        where = f"{','.join(self.files)}#{i}"
        raw = self.src[i]
        if raw[:1] == b"{":
            return parse_json_record(raw, where, self.text_field)
        return _decode(raw, where)


class TFDS(DocumentSource):
    """A TFDS dataset prepared locally, read by random access (`tfds.data_source`)."""

    def __init__(self, name: str, split: str, text_field: str, data_dir: str | None):
        import tensorflow_datasets as tfds  # heavy (TensorFlow): only TFDS sources

        self.name, self.split, self.text_field = name, split, text_field
        try:
            self.src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # not prepared, unknown name, or no network
            raise DataError(
                f"TFDS dataset {name!r} (split {split!r}) is not available locally: {e}. "
                f"Prepare it once where there is network access: `tfds build {name.split('/')[0]}` "
                f"(or `python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}').download_and_prepare()\"`), "
                "then point tfds_data_dir at the folder it wrote (default ~/tensorflow_datasets)") from e

    def __len__(self):
        return len(self.src)

    def key(self, i):
        return f"{self.name}/{self.split}#{i}"

    def __getitem__(self, i):
        where = f"tfds:{self.name}/{self.split}#{i}"
        item = self.src[i]
        text = item.get(self.text_field) if isinstance(item, dict) else None
        if isinstance(text, bytes):
            return _decode(text, where)
        if not isinstance(text, str) or not text.strip():
            return Record(None, where, f"missing text field {self.text_field!r}")
        return Record(text, where)


class DefaultCorpus(DocumentSource):
    """The embedded default corpus (see default_corpus.py)."""

    def __init__(self, docs):
        self.docs = list(docs)

    def __len__(self):
        return len(self.docs)

    def key(self, i):
        return self.docs[i].key

    def sizes(self):
        def size(d) -> int:
            if d.kind == "code":
                return os.path.getsize(d.path)
            if d.key.startswith("doc:topic:"):
                return len(_pydoc_topics()[d.key[len("doc:topic:"):]])
            return 0  # a module's docstring: unknown without parsing the module; taken whole

        return np.asarray([size(d) for d in self.docs], np.int64)

    def __getitem__(self, i):
        d = self.docs[i]
        try:
            text = d.text()
        except OSError as e:
            return Record(None, d.key, f"unreadable file ({e})")
        # A module without a docstring is not bad input: it simply has no prose document.
        return Record(text if text.strip() else "", d.key)


class Subset(DocumentSource):
    """Documents `indices` of `parent` (a train or validation split)."""

    def __init__(self, parent: DocumentSource, indices: Sequence[int]):
        self.parent, self.indices = parent, list(indices)

    def __len__(self):
        return len(self.indices)

    def key(self, i):
        return self.parent.key(self.indices[i])

    def sizes(self):
        full = self.parent.sizes()
        return None if full is None else full[np.asarray(self.indices, np.int64)]

    @property
    def size_unit(self):
        return self.parent.size_unit

    def __getitem__(self, i):
        return self.parent[self.indices[i]]


class Pieces(DocumentSource):
    """The documents of `docs`, each cut into pieces of about `chunk_tokens` tokens.

    A document of size s (in `docs.size_unit`) becomes ceil(s / budget) pieces, where the
    budget is `chunk_tokens` tokens (or that many times `chars_per_token` characters).
    Piece j of n covers the characters from about j/n to (j+1)/n of the document's text,
    each cut moved back to just after a newline (else a space) within half a piece, so the
    pieces tile the text exactly and each is a pure function of (document, j): a piece is
    read by random access like a document, and the pipeline shuffles pieces. Only the first
    piece gets BOS and only the last EOS; token records (the cache) are cut into equal
    slices of their ids. Sizes are estimates: a document longer than its estimate gives
    longer pieces, never lost text. `chunk_tokens <= 0`, or a source that cannot tell its
    sizes, gives whole documents. Every record carries its document's index (`doc`).
    """

    def __init__(self, docs: DocumentSource, chunk_tokens: int = 0, chars_per_token: float = 4.0):
        self.docs = docs
        sizes = docs.sizes() if chunk_tokens > 0 else None
        if sizes is None:
            counts = np.ones(len(docs), np.int64)
        else:
            budget = chunk_tokens * (1.0 if docs.size_unit == "tokens" else chars_per_token)
            counts = np.maximum(1, np.ceil(np.asarray(sizes, np.float64) / budget)).astype(np.int64)
        self.counts = counts
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self):
        return int(self.starts[-1])

    def _locate(self, k: int) -> tuple[int, int, int]:
        i = int(np.searchsorted(self.starts, k, side="right")) - 1
        return i, int(k - self.starts[i]), int(self.counts[i])

    def key(self, k):
        i, j, n = self._locate(k)
        return self.docs.key(i) if n == 1 else f"{self.docs.key(i)}#{j}"

    def __getitem__(self, k):
        i, j, n = self._locate(k)
        rec = self.docs[i]
        if n == 1:
            return rec._replace(doc=i)
        where = f"{rec.where} (piece {j + 1}/{n})"
        if rec.tokens is not None:  # BOS and EOS are among the cached ids
            size = len(rec.tokens)
            return Record("", where, None, rec.tokens[j * size // n: (j + 1) * size // n], doc=i)
        if rec.text is None:  # a bad document is reported once, by its first piece
            return rec._replace(doc=i) if j == 0 else Record("", where, bos=False, eos=False, doc=i)
        text = rec.text
        return Record(text[piece_cut(text, j, n): piece_cut(text, j + 1, n)], where, bos=j == 0, eos=j == n - 1,
                      doc=i)


def piece_cut(text: str, j: int, n: int) -> int:
    """Where piece j of n of `text` starts: about j/n of the way, just after a newline (else a
    space) in the half piece before. Strictly increasing in j while n <= len(text) / 2."""
    target = j * len(text) // n
    if target <= 0 or target >= len(text):
        return min(max(target, 0), len(text))
    window = (len(text) // n) // 2  # cuts of consecutive pieces never cross (targets are >= 2 windows apart)
    if window:
        p = text.rfind("\n", target - window, target)
        if p < 0:
            p = text.rfind(" ", target - window, target)
        if p >= 0:
            return p + 1
    return target


def _open(cfg: SourceConfig, patterns: Sequence[str]) -> DocumentSource:
    if cfg.kind == "text":
        return TextFiles(expand(patterns), cfg.doc_per)
    if cfg.kind in ("jsonl", "json"):
        return JsonLines(expand(patterns), cfg.text_field, array=cfg.kind == "json")
    if cfg.kind == "parquet":
        return Parquet(expand(patterns), cfg.text_field)
    if cfg.kind == "arrayrecord":
        return ArrayRecord(expand(patterns), cfg.text_field)
    raise DataError(f"source {cfg.name!r}: unknown kind {cfg.kind!r}")


def _hash_fraction(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def open_source(cfg: SourceConfig) -> tuple[DocumentSource, DocumentSource]:
    """(train, validation) document sources for one configured source."""
    if cfg.kind == "default":
        train, held = default_corpus.split(cfg.heldout_fraction)
        return DefaultCorpus(train), DefaultCorpus(held)
    if cfg.kind == "tfds":
        if not cfg.tfds_name:
            raise DataError(f"source {cfg.name!r}: set tfds_name, e.g. 'wikipedia/20230601.en'")
        train = TFDS(cfg.tfds_name, cfg.tfds_split, cfg.text_field, cfg.tfds_data_dir)
        if cfg.validation_paths:  # for TFDS, validation_paths names the validation split
            return train, TFDS(cfg.tfds_name, cfg.validation_paths[0], cfg.text_field, cfg.tfds_data_dir)
        return _hash_split(train, cfg.heldout_fraction)
    if cfg.kind == "chat":
        raise DataError(f"source {cfg.name!r} has kind 'chat': conversations are read by an SFT run "
                        "(Config(stage='sft')); for pretraining text use kind jsonl/json/text/...")
    if not cfg.paths:
        raise DataError(f"source {cfg.name!r}: no paths given")
    try:
        train = _open(cfg, cfg.paths)
        if cfg.validation_paths:
            return train, _open(cfg, cfg.validation_paths)
        if cfg.heldout_split == "tail":
            if not isinstance(train, TextFiles):
                raise DataError(f"source {cfg.name!r}: heldout_split='tail' needs kind 'text' (got {cfg.kind!r})")
            return train.tail_split(cfg.heldout_fraction)
    except DataError as e:
        if str(e).startswith("source "):
            raise
        raise DataError(f"source {cfg.name!r}: {e}") from None
    return _hash_split(train, cfg.heldout_fraction)


def open_split(cfg: SourceConfig, open_: Callable[[Sequence[str]], DocumentSource]):
    """(train, held-out) of a record source opened by `open_(patterns)`: its
    validation_paths, else a hash split of its paths (data.heldout_fraction)."""
    train = open_(cfg.paths)
    if cfg.validation_paths:
        return train, open_(cfg.validation_paths)
    return _hash_split(train, cfg.heldout_fraction)


def _hash_split(src: DocumentSource, fraction: float) -> tuple[DocumentSource, DocumentSource]:
    held = [i for i in range(len(src)) if _hash_fraction(src.key(i)) < fraction]
    held_set = set(held)
    if len(src) and not held and fraction > 0:  # tiny sources: keep at least one document
        held, held_set = [len(src) - 1], {len(src) - 1}
    return Subset(src, [i for i in range(len(src)) if i not in held_set]), Subset(src, held)


def source_configs(d: DataConfig) -> list[SourceConfig]:
    """The sources of a run's data config (the default corpus is one source)."""
    if d.corpus == "sources":
        return list(d.sources)
    if d.corpus == "default":
        return [SourceConfig(name="default", kind="default", heldout_fraction=d.heldout_fraction)]
    raise DataError(f"unknown corpus {d.corpus!r}; choose 'default', 'sources' or 'synthetic'")
