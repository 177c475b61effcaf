"""The datatrove side of `lm data curate` (data_pipeline/curate.py): our readers, filters and
counters as datatrove pipeline steps, and the chain of executors that runs a `CurateConfig`.

Imported only when the command runs and the curate extra is installed (datatrove, py3langid,
trafilatura, warcio, orjson: `pip install -e .[curate]`); data_pipeline/curate.py holds the config,
the report and the one-line errors and imports this module lazily.

What datatrove gives and we use as is: the executors (local processes, Slurm) with their
completion markers, Trafilatura extraction, the Gopher / C4 / FineWeb quality filters, exact
deduplication (ExactDedupSignature / ExactFindDedups / ExactDedupFilter), MinHash
deduplication (signature, LSH buckets, clusters, filter), PII masking, JSON Lines writing and
reading of our own intermediate shards. What is ours:

- `InputReader`: reads raw inputs (JSON Lines, HTML files, WARC / WET) with every bad record
  counted by reason (unreadable or truncated files, invalid UTF-8, malformed JSON, missing or
  empty text, records over `max_record_bytes`), documents cut to `max_doc_chars`, and memory
  bounded by one record (datatrove's readers stop or crash on a truncated gzip and skip bad lines
  with only a log line);
- `WordTokenizer`: whitespace words, handed to datatrove's filters in place of the spaCy
  tokenizer they load for English (a large dependency, and its punctuation tokens skew the
  Gopher rules: see the class);
- `LanguageFilter` on py3langid (its model ships in the package: nothing is downloaded);
- `Decontaminate`: n-gram overlap with the evaluation sets (datatrove's decontamination needs
  lighteval);
- `Tally` and `RemovedLog`: per-step document and character counts and removed examples, saved
  per task so that a resumed run reports the tasks it skipped.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import sys
import time
import zlib

import datatrove.executor.base as _executor_base  # its task loggers are patched below
import numpy as np
import trafilatura  # noqa: F401 -- loaded before Trafilatura's extraction process forks from this one
import xxhash
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import (
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.readers.base import BaseReader
from datatrove.pipeline.writers import JsonlWriter, ParquetWriter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import TextNormConfig, simplify_text
from datatrove.utils.word_tokenizers import WhitespaceTokenizer
from py3langid.langid import MODEL_FILE, LanguageIdentifier
from trafilatura.utils import decode_file
from warcio.archiveiterator import ArchiveIterator

_add_task_logger = _executor_base.add_task_logger


def _quiet_task_logger(logging_dir, rank, local_rank=0, node_rank=-1):
    """datatrove's per-task logger with the terminal at ERROR level, as it sets for all but the
    first worker: each task's INFO lines go to its log file (work/logs/STAGE/logs/) only; the
    report says what they said. Installed wherever this module is imported, worker processes
    included (they import it to unpickle the pipeline)."""
    return _add_task_logger(logging_dir, rank, local_rank=max(local_rank, 1), node_rank=node_rank)


def _quiet_close_task_logger(logfile):
    """datatrove's end of a task, which puts its default INFO handler back on the terminal; ours
    keeps the terminal at WARNING (the tasks that run inside this process end here too)."""
    from loguru import logger

    _close_task_logger(logfile)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")


_close_task_logger = _executor_base.close_task_logger
_executor_base.add_task_logger = _quiet_task_logger
_executor_base.close_task_logger = _quiet_close_task_logger

EXAMPLES_CHARS = 2000  # removed examples are cut to this many characters in removed/


def save_json(path: str, obj) -> None:
    """Write `obj` as JSON atomically (a task killed mid-write leaves the old file or none)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# Words, for datatrove's filters and our decontamination

_NGRAM_WORD = re.compile(r"\w+")


class WordTokenizer(WhitespaceTokenizer):
    """Words are whitespace-separated, as in the Gopher paper's rules. datatrove loads spaCy for
    English, whose tokens split punctuation off: then "at least 80% of words contain a letter"
    removes ordinary prose with many commas and numbers (38 of 300 c4-demo documents). Sentences
    (C4's five-sentence rule): datatrove's regex splitter."""

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()


def ngram_words(text: str) -> list[str]:
    """The lower-cased words of `text` (punctuation ignored) that decontamination compares."""
    return [m.group().lower() for m in _NGRAM_WORD.finditer(text)]


def ngram_hashes(words: list[str], n: int) -> np.ndarray:
    """64-bit hashes of the word n-grams of `words`."""
    if len(words) < n:
        return np.zeros(0, dtype=np.uint64)
    return np.fromiter((xxhash.xxh64_intdigest(" ".join(words[i:i + n]).encode()) for i in range(len(words) - n + 1)),
                       dtype=np.uint64, count=len(words) - n + 1)


# ---------------------------------------------------------------------------------------
# Counting: documents and characters at a point of the pipeline, removed documents by reason


class Tally(PipelineStep):
    """Passes documents through, counting them and their characters; saves the counts of each
    task in `folder/label/RANK.json` when the stream ends."""

    type = "📊 - COUNT"
    name = "tally"

    def __init__(self, folder: str, label: str):
        super().__init__()
        self.folder, self.label = folder, label

    def run(self, data, rank: int = 0, world_size: int = 1):
        docs = chars = 0
        for doc in data or ():
            docs += 1
            chars += len(doc.text)
            yield doc
        save_json(os.path.join(self.folder, self.label, f"{rank:05d}.json"), {"docs": docs, "chars": chars})


class RemovedLog:
    """An `exclusion_writer` for datatrove's filters and dedup filters: counts the documents
    they remove and their characters per reason, keeps the first few of each reason, and (with
    `list_all`) lists every removed document's id; saved per task as `folder/step/RANK.json`."""

    def __init__(self, folder: str, step: str, default_reason: str, examples: int, list_all: bool = False):
        self.folder, self.step, self.default_reason = folder, step, default_reason
        self.examples, self.list_all = examples, list_all
        self._reset()

    def _reset(self):
        self.rank, self.reasons, self.kept, self.listed = None, {}, {}, []

    def __enter__(self):
        self._reset()
        return self

    def write(self, doc: Document, rank: int = 0, **_):
        self.rank = rank
        reason = doc.metadata.get("filter_reason") or self.default_reason
        n = self.reasons.setdefault(reason, {"docs": 0, "chars": 0})
        n["docs"] += 1
        n["chars"] += len(doc.text)
        examples = self.kept.setdefault(reason, [])
        if len(examples) < self.examples:
            examples.append({"id": doc.id, "source": doc.metadata.get("source"), "reason": reason,
                             **({"match": doc.metadata["contamination"]} if "contamination" in doc.metadata else {}),
                             "chars": len(doc.text), "text": doc.text[:EXAMPLES_CHARS]})
        if self.list_all:
            self.listed.append({"id": doc.id, "source": doc.metadata.get("source"),
                                "match": doc.metadata.get("contamination")})

    def __exit__(self, *exc):
        if self.rank is not None and exc[0] is None:
            save_json(os.path.join(self.folder, self.step, f"{self.rank:05d}.json"),
                      {"reasons": self.reasons, "examples": self.kept, "listed": self.listed})
        return False


# ---------------------------------------------------------------------------------------
# Reading raw inputs

_BAD_FILE_ERRORS = (OSError, EOFError, ValueError, zlib.error)


def _open_raw(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


class InputReader(BaseReader):
    """One configured input: its files (this task's share: every world_size-th from rank),
    read as `kind` ("jsonl": one document per line, text in `text_field`; "html": one page per
    file, .gz allowed; "warc": the HTML responses of WARC files; "wet": the text conversions of
    WET files). Bad records and files are counted by reason, never fatal; a document longer than
    `max_doc_chars` is cut to it (counted); a record over `max_record_bytes` is skipped unread."""

    name = "📥 input"

    def __init__(self, input_name: str, kind: str, files: list[str], text_field: str, id_field: str,
                 max_doc_chars: int, max_record_bytes: int, folder: str):
        super().__init__()
        self.input_name, self.kind, self.files = input_name, kind, files
        self.text_field, self.id_field = text_field, id_field
        self.max_doc_chars, self.max_record_bytes, self.folder = max_doc_chars, max_record_bytes, folder

    def _bad(self, reason: str, where: str, why: str = ""):
        self.counts["bad"][reason] = self.counts["bad"].get(reason, 0) + 1
        if len(self.counts["bad_examples"]) < 20:
            self.counts["bad_examples"].append(f"{where}: {reason}{f' ({why})' if why else ''}")

    def _doc(self, text: str, doc_id: str, fmt: str, where: str, url: str | None = None):
        if not text.strip():
            self._bad("empty_document", where)
            return None
        if len(text) > self.max_doc_chars:
            self.counts["cut_docs"] += 1
            self.counts["cut_chars"] += len(text) - self.max_doc_chars
            text = text[:self.max_doc_chars]
        self.counts["docs"] += 1
        self.counts["chars"] += len(text)
        meta = {"source": self.input_name, "format": fmt, "where": where}
        if url:
            meta["url"] = url
        return Document(text=text, id=doc_id, metadata=meta)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if data:
            yield from data
        self.counts = {"files": 0, "docs": 0, "chars": 0, "cut_docs": 0, "cut_chars": 0, "skipped_records": 0,
                       "bad": {}, "bad_examples": [], "seconds": 0.0}
        read = {"jsonl": self._jsonl, "html": self._html, "warc": self._warc, "wet": self._warc}[self.kind]
        for path in self.files[rank::world_size]:
            self.counts["files"] += 1
            try:
                for doc in self._timed(read(path)):
                    if doc is not None:
                        self.stat_update("documents")
                        yield doc
            except _BAD_FILE_ERRORS as e:  # a broken file ends its own reading, counted; the others go on
                self._bad("truncated_file" if isinstance(e, EOFError) or "end-of-stream" in str(e) else
                          "unreadable_file", path, f"{type(e).__name__}: {e}")
            except Exception as e:  # noqa: BLE001 -- a parser's own error on a corrupt file (warcio): counted
                self._bad("unreadable_file", path, f"{type(e).__name__}: {e}")
        save_json(os.path.join(self.folder, "read", self.input_name, f"{rank:05d}.json"), self.counts)

    def _timed(self, docs):
        """`docs`, adding the time spent reading and parsing them (not the steps after) to the counts."""
        while True:
            t0 = time.perf_counter()
            try:
                doc = next(docs)
            except StopIteration:
                return
            finally:
                self.counts["seconds"] += time.perf_counter() - t0
            yield doc

    def _lines(self, f):
        """Lines of at most max_record_bytes (longer ones: None, the rest skipped unread)."""
        limit = self.max_record_bytes
        while True:
            line = f.readline(limit + 1)
            if not line:
                return
            if len(line) > limit and not line.endswith(b"\n"):
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
                yield None
            else:
                yield line

    def _jsonl(self, path: str):
        with _open_raw(path) as f:
            for n, raw in enumerate(self._lines(f), 1):
                where = f"{path}:{n}"
                if raw is None:
                    self._bad("oversized_record", where, f"over {self.max_record_bytes} bytes")
                    continue
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    self._bad("invalid_utf8", where, f"{e.reason} at byte {e.start}")
                    continue
                except (json.JSONDecodeError, RecursionError) as e:
                    self._bad("malformed_json", where, str(e)[:80])
                    continue
                text = obj.get(self.text_field) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    self._bad("no_text_field", where, f"no string field {self.text_field!r}")
                    continue
                doc_id = obj.get(self.id_field)
                yield self._doc(text, str(doc_id) if doc_id is not None else
                                f"{self.input_name}/{os.path.basename(path)}:{n}",
                                "text", where, obj.get("url") if isinstance(obj.get("url"), str) else None)

    def _decode_html(self, raw: bytes, where: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.counts["non_utf8_html"] = self.counts.get("non_utf8_html", 0) + 1
            return decode_file(raw)

    def _html(self, path: str):
        with _open_raw(path) as f:
            raw = f.read(self.max_record_bytes + 1)
        if len(raw) > self.max_record_bytes:
            self._bad("oversized_record", path, f"over {self.max_record_bytes} bytes")
            return
        yield self._doc(self._decode_html(raw, path), f"{self.input_name}/{os.path.basename(path)}", "html", path)

    def _warc(self, path: str):
        with open(path, "rb") as f:
            records = ArchiveIterator(f)
            yield from self._records(path, records)
            # warcio ends quietly on a truncated gzip member: bytes left unread mean a cut file
            if records.offset < os.path.getsize(path):
                self._bad("truncated_file", path, f"{os.path.getsize(path) - records.offset} bytes after the last "
                          "whole record")

    def _records(self, path: str, records):
        want = "response" if self.kind == "warc" else "conversion"
        for n, record in enumerate(records, 1):
            where = f"{path}#{n}"
            if record.rec_type != want:
                self.counts["skipped_records"] += 1
                continue
            if want == "response":
                ctype = (record.http_headers.get_header("Content-Type") if record.http_headers else "") or ""
                if "html" not in ctype.lower():
                    self.counts["skipped_records"] += 1
                    continue
            raw = record.content_stream().read(self.max_record_bytes + 1)
            if len(raw) > self.max_record_bytes:
                self._bad("oversized_record", where, f"over {self.max_record_bytes} bytes")
                continue
            if getattr(record.raw_stream, "limit", 0) > 0:  # its block ends before its Content-Length
                self._bad("truncated_record", where, "shorter than its Content-Length")
                continue
            if want == "response":
                text = self._decode_html(raw, where)
            else:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    self._bad("invalid_utf8", where, f"{e.reason} at byte {e.start}")
                    continue
            doc_id = (record.rec_headers.get_header("WARC-Record-ID") or
                      f"{self.input_name}/{os.path.basename(where)}")
            yield self._doc(text, doc_id, "html" if want == "response" else "text", where,
                            record.rec_headers.get_header("WARC-Target-URI"))


# ---------------------------------------------------------------------------------------
# Steps of ours


class Extract(Trafilatura):
    """datatrove's Trafilatura step; also saves why documents were dropped (timeout, error, no
    main text) per task, for the report."""

    def __init__(self, folder: str, timeout: float):
        super().__init__(favour_precision=True, timeout=timeout)
        self.folder = folder

    def run(self, data, rank: int = 0, world_size: int = 1):
        yield from super().run(data, rank, world_size)
        reasons = {"extraction_timeout": self.stats["timeout"].total,
                   "extraction_error": self.stats["clean_error"].total + self.stats["broken_process"].total,
                   "no_main_text": self.stats["dropped"].total}
        save_json(os.path.join(self.folder, "extract", f"{rank:05d}.json"),
                  {"reasons": {k: {"docs": v, "chars": None} for k, v in reasons.items() if v}})


class LanguageFilter(BaseFilter):
    """Keeps documents whose language (py3langid, normalised probability, on the first
    `max_chars` characters) is one of `languages` with at least `min_score`."""

    name = "🌍 Language (py3langid)"

    def __init__(self, languages: tuple[str, ...], min_score: float, max_chars: int = 20000, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.languages, self.min_score, self.max_chars = set(languages), min_score, max_chars
        self._identifier = None

    def filter(self, doc: Document):
        if self._identifier is None:
            self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        lang, score = self._identifier.classify(doc.text[:self.max_chars])
        doc.metadata["language"], doc.metadata["language_score"] = lang, round(float(score), 4)
        if lang not in self.languages:
            return False, f"language_{lang}"
        if score < self.min_score:
            return False, "language_low_score"
        return True


class Decontaminate(BaseFilter):
    """Removes documents sharing a word n-gram with an evaluation item. `tables` maps an n-gram
    length to (sorted hashes, owner of each: the index in `labels`, "task:item"); items of n words
    or more give their n-grams, shorter ones (down to min_n) their whole word sequence. With
    `cut_lines`, a document loses only the lines that hold a matching n-gram, and is removed when
    fewer than `min_chars_left` characters remain; the cut documents are counted and listed in
    `folder/decontaminate_cuts/RANK.json`."""

    name = "🧪 Decontamination"

    def __init__(self, tables: dict[int, tuple[np.ndarray, np.ndarray]], labels: list[str], exclusion_writer=None,
                 cut_lines: bool = False, min_chars_left: int = 200, folder: str | None = None):
        super().__init__(exclusion_writer)
        self.tables, self.labels = tables, labels
        self.cut_lines, self.min_chars_left, self.folder = cut_lines, min_chars_left, folder

    def _matches(self, text: str, first_only: bool) -> list[tuple[int, int, str]]:
        """(first character, end character, item label) of the n-grams of `text` an item shares."""
        spans = [m.span() for m in _NGRAM_WORD.finditer(text)]
        words = None
        out = []
        for n, (table, owner) in sorted(self.tables.items(), reverse=True):
            if len(spans) < n:
                continue
            words = [text[a:b].lower() for a, b in spans] if words is None else words
            h = ngram_hashes(words, n)
            idx = np.minimum(np.searchsorted(table, h), len(table) - 1)
            for i in np.flatnonzero(table[idx] == h):
                out.append((spans[i][0], spans[i + n - 1][1], self.labels[int(owner[idx[i]])]))
                if first_only:
                    return out
        return out

    def filter(self, doc: Document):
        hits = self._matches(doc.text, first_only=not self.cut_lines)
        if not hits:
            return True
        doc.metadata["contamination"] = hits[0][2]
        if not self.cut_lines:
            return False, "contaminated"
        text, drop = doc.text, []
        for a, b, _ in hits:  # whole lines around each match
            drop.append((text.rfind("\n", 0, a) + 1, len(text) if (e := text.find("\n", b)) < 0 else e + 1))
        drop.sort()
        kept, pos = [], 0
        for a, b in drop:
            if a > pos:
                kept.append(text[pos:a])
            pos = max(pos, b)
        kept.append(text[pos:])
        new = "".join(kept).strip()
        if len(new) < self.min_chars_left:
            return False, "contaminated"
        self.cuts.append({"id": doc.id, "source": doc.metadata.get("source"), "match": sorted({h[2] for h in hits}),
                          "chars_cut": len(text) - len(new)})
        doc.text = new
        del doc.metadata["contamination"]
        return True

    def run(self, data, rank: int = 0, world_size: int = 1):
        self.cuts = []
        yield from super().run(data, rank, world_size)
        if self.folder:
            save_json(os.path.join(self.folder, "decontaminate_cuts", f"{rank:05d}.json"), {"cuts": self.cuts})


def ngram_table(items: list[tuple[str, str]], n: int, min_n: int | None = None):
    """(tables {length: (sorted hashes, owner of each)}, labels, labels too short to check) for
    (label, text) items: a text of n words or more gives its n-grams, one of min_n to n - 1 words
    its whole word sequence (as GPT-3's decontamination did for short items), a shorter one nothing;
    an item (a label) is unchecked when none of its texts gave a hash."""
    min_n = n if min_n is None else min_n
    hashes: dict[int, list] = {}
    owners: dict[int, list] = {}
    labels: list[str] = []
    index: dict[str, int] = {}
    seen: set[str] = set()
    checked: set[str] = set()
    for label, text in items:
        seen.add(label)
        words = ngram_words(text)
        size = n if len(words) >= n else len(words)
        if size < min_n:
            continue
        h = ngram_hashes(words, size)  # (one hash when the text is shorter than n)
        if label not in index:
            index[label] = len(labels)
            labels.append(label)
        checked.add(label)
        hashes.setdefault(size, []).append(h)
        owners.setdefault(size, []).append(np.full(len(h), index[label], dtype=np.uint32))
    tables = {}
    for size in hashes:
        table, owner = np.concatenate(hashes[size]), np.concatenate(owners[size])
        order = np.argsort(table, kind="stable")
        tables[size] = (table[order], owner[order])
    return tables, labels, sorted(seen - checked)


class MaskPII(PIIFormatter):
    """datatrove's e-mail and IP address masking; also counts the documents it changed."""

    def __init__(self, folder: str):
        super().__init__(remove_emails=True, remove_ips=True)
        self.folder = folder

    def format(self, text: str) -> str:
        new = super().format(text)
        self.masked += new != text
        return new

    def run(self, data, rank: int = 0, world_size: int = 1):
        self.masked = 0
        yield from super().run(data, rank, world_size)
        save_json(os.path.join(self.folder, "pii", f"{rank:05d}.json"), {"masked_docs": self.masked})


_NORM = TextNormConfig(lowercase=True, norm_whitespace=True, remove_punctuation=False,
                       norm_unicode_diacritics=False, norm_numbers=False)


def normalised_text(doc: Document) -> bytes:
    """Exact dedup's key: the text lower-cased with whitespace runs made one space (as UTF-8:
    xxhash 4 hashes bytes only)."""
    return simplify_text(doc.text, _NORM).encode("utf-8")


def final_record(self, doc: Document) -> dict:
    """A curated document as written: {"text", "id", "source", "url" (when known), "language"}."""
    keep = ("source", "url", "language")
    return {"text": doc.text, "id": doc.id, **{k: doc.metadata[k] for k in keep if doc.metadata.get(k) is not None}}


def final_row(self, doc: Document) -> dict:
    """A curated document as a Parquet row: the same fields, every one present (None when unknown)."""
    return {"text": doc.text, "id": doc.id, **{k: doc.metadata.get(k) for k in ("source", "url", "language")}}


# ---------------------------------------------------------------------------------------
# The pipeline: stages, each one datatrove executor

_QUALITY = {"gopher_repetition": GopherRepetitionFilter, "gopher_quality": GopherQualityFilter,
            "c4_quality": C4QualityFilter, "fineweb_quality": FineWebQualityFilter}


def quality_filter(step: str, conf, exclusion_writer=None):
    """datatrove's filter for a quality step ("gopher_quality", ...) with the thresholds of
    `conf` (the step's dataclass of data_pipeline/curate.py, under datatrove's parameter names);
    words split on whitespace."""
    kw = {k: (tuple(map(tuple, v)) if isinstance(v, (list, tuple)) else v) for k, v in vars(conf).items()}
    return _QUALITY[step](**kw, language=WordTokenizer(), exclusion_writer=exclusion_writer)


def stages(cfg, files: dict[str, list[str]], eval_items: list[tuple[str, str]], work: str, out_data: str):
    """[(stage name, pipeline, tasks)] for `cfg` (a CurateConfig); `files` maps each input to its
    files; `eval_items` are the (label, text) items to decontaminate against."""
    tally = os.path.join(work, "tally")
    removed = os.path.join(work, "removed")
    ex = cfg.examples_per_reason

    def log(step, reason, list_all=False):
        return RemovedLog(removed, step, reason, ex, list_all)

    def reader(inp):
        return InputReader(inp.name, inp.kind, files[inp.name], inp.text_field, inp.id_field, cfg.max_doc_chars,
                           int(cfg.max_record_mb * 2**20), tally)

    html = [i for i in cfg.inputs if i.kind in ("html", "warc")]
    text = [i for i in cfg.inputs if i.kind not in ("html", "warc")]
    first: list = [reader(i) for i in html]
    if html:
        first += [Tally(tally, "extract_in"), Extract(removed, cfg.extraction_timeout_s), Tally(tally, "extract")]
    first += [reader(i) for i in text] + [Tally(tally, "start")]
    tok = WordTokenizer()
    if cfg.languages:
        first += [LanguageFilter(cfg.languages, cfg.min_language_score, exclusion_writer=log("language", "language")),
                  Tally(tally, "language")]
    for step in ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality"):
        if getattr(cfg, step) is not None:
            first += [quality_filter(step, getattr(cfg, step), log(step, step)), Tally(tally, step)]
    if cfg.decontaminate:
        tables, labels, unchecked = ngram_table(eval_items, cfg.decontaminate_ngram, cfg.decontaminate_min_ngram)
        save_json(os.path.join(work, "decontaminate.json"),
                  {"unchecked_items": len(unchecked), "unchecked_examples": unchecked[:20],
                   "ngram_lengths": {str(k): len(v[0]) for k, v in sorted(tables.items())}})
        first += [Decontaminate(tables, labels, exclusion_writer=log("decontaminate", "contaminated", list_all=True),
                                cut_lines=cfg.decontaminate_spans, min_chars_left=cfg.decontaminate_min_chars_left,
                                folder=removed),
                  Tally(tally, "decontaminate")]
    if cfg.mask_pii:
        first += [MaskPII(removed), Tally(tally, "pii")]

    out = [("filter", first, cfg.tasks)]
    prev = os.path.join(work, "filtered")
    first.append(JsonlWriter(prev, output_filename="${rank}.jsonl.gz"))

    def read(folder):
        return JsonlReader(folder, glob_pattern="*.jsonl.gz")

    if cfg.exact_dedup:
        sigs, dups, nxt = (os.path.join(work, x) for x in ("exact_sigs", "exact_dups", "exact"))
        econf = ExactDedupConfig(content_getter=normalised_text)
        out += [("exact_signatures", [read(prev), ExactDedupSignature(sigs, econf)], cfg.tasks),
                ("exact_find", [ExactFindDedups(sigs, dups, econf)], 1),
                ("exact_filter", [read(prev), Tally(tally, "exact_in"),
                                  ExactDedupFilter(dups, econf, exclusion_writer=log("exact_dedup", "exact_duplicate")),
                                  Tally(tally, "exact_dedup"), JsonlWriter(nxt, output_filename="${rank}.jsonl.gz")],
                 cfg.tasks)]
        prev = nxt
    last: list = [read(prev), Tally(tally, "final_in")]
    if cfg.near_dedup:
        sigs, buckets, remove = (os.path.join(work, x) for x in ("minhash_sigs", "minhash_buckets", "minhash_remove"))
        # sha1 shingle hashes: datatrove hashes str shingles, which xxhash 4 refuses
        mconf = MinhashConfig(n_grams=cfg.minhash_ngram, num_buckets=cfg.minhash_bands,
                              hashes_per_bucket=cfg.minhash_rows, hash_config=HashConfig(hash_fc="sha1"))
        out += [("minhash_signatures", [read(prev), MinhashDedupSignature(sigs, mconf, language=tok)], cfg.tasks),
                ("minhash_buckets", [MinhashDedupBuckets(sigs, buckets, config=mconf)], cfg.minhash_bands),
                ("minhash_cluster", [MinhashDedupCluster(buckets, remove, config=mconf)], 1)]
        last += [MinhashDedupFilter(remove, exclusion_writer=log("near_dedup", "near_duplicate")),
                 Tally(tally, "near_dedup")]
    if cfg.output_format == "parquet":
        last.append(ParquetWriter(out_data, output_filename="${rank}.parquet", adapter=final_row))
    else:
        last.append(JsonlWriter(out_data, output_filename="${rank}.jsonl", compression=None, adapter=final_record))
    out.append(("write", last, cfg.tasks))
    return out


def step_labels(stage_list) -> dict[str, list[str | None]]:
    """For each stage, the report step that each of its pipeline steps belongs to (None for the
    counting steps; "io" for reading and writing intermediate shards), in pipeline order: the
    order of datatrove's stats.json, whose per-step times give the report's throughput."""
    kinds = ((InputReader, "read"), (Extract, "extract"), (LanguageFilter, "language"),
             (GopherRepetitionFilter, "gopher_repetition"), (GopherQualityFilter, "gopher_quality"),
             (C4QualityFilter, "c4_quality"), (FineWebQualityFilter, "fineweb_quality"),
             (Decontaminate, "decontaminate"), (MaskPII, "pii"),
             ((ExactDedupSignature, ExactFindDedups, ExactDedupFilter), "exact_dedup"),
             ((MinhashDedupSignature, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter), "near_dedup"),
             ((JsonlReader, JsonlWriter, ParquetWriter), "io"))

    def label(step):
        return next((name for cls, name in kinds if isinstance(step, cls)), None)

    return {name: [label(step) for step in pipeline] for name, pipeline, _ in stage_list}


class QuietLocalExecutor(LocalPipelineExecutor):
    """datatrove's local executor, defined here so that a worker process unpickling it imports
    this module, which quiets its task loggers (above), even for a stage made of datatrove's
    steps only."""


class QuietSlurmExecutor(SlurmPipelineExecutor):
    """datatrove's Slurm executor, for the same reason."""


def executors(cfg, stage_list, work: str) -> list:
    """One datatrove executor per stage, each with its logging dir (completions/, stats/, logs/)
    under work/logs/STAGE; on Slurm, each depends on the one before. datatrove's own log lines
    go to those logs; the terminal gets its warnings and errors only (the report says the rest)."""
    from loguru import logger  # datatrove's logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    made: list = []
    for name, pipeline, tasks in stage_list:
        logging_dir = os.path.join(work, "logs", name)
        if cfg.executor == "slurm":
            made.append(QuietSlurmExecutor(pipeline, tasks=tasks, time=cfg.slurm_time,
                                              partition=cfg.slurm_partition, cpus_per_task=1,
                                              mem_per_cpu_gb=cfg.slurm_mem_per_cpu_gb, workers=cfg.workers,
                                              job_name=f"curate_{name}", logging_dir=logging_dir,
                                              depends=made[-1] if made else None))
        else:
            made.append(QuietLocalExecutor(pipeline, tasks=tasks, workers=min(cfg.workers, tasks),
                                              logging_dir=logging_dir))
    return made


def completed(logging_dir: str) -> int:
    """Tasks of a stage marked done by datatrove (its completions/ files)."""
    with contextlib.suppress(FileNotFoundError):
        return len(os.listdir(os.path.join(logging_dir, "completions")))
    return 0
