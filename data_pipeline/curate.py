"""`lm data curate CONFIG`: raw web text (JSON Lines, HTML pages, WARC / WET) to clean JSON Lines
shards that a `SourceConfig(kind="jsonl")` reads, on Hugging Face's datatrove.

A curation is a Python module with `def config() -> CurateConfig` (experiments/curate_web.py).
Steps, each optional, in this order: main-text extraction from HTML (Trafilatura), language
(py3langid), Gopher repetition and quality rules, C4 rules, FineWeb rules, decontamination
against the evaluation sets, e-mail / IP masking, exact deduplication, MinHash near-duplicate
removal. The datatrove pipeline lives in data_pipeline/curate_steps.py, imported only when the
command runs (datatrove is an optional extra: `pip install -e .[curate]`).

Output, under `output_dir`: `data/RANK.jsonl` or `.parquet` ({"text", "id", "source", "url", "language"}),
`report.json` (documents and characters in and out of each step, removed per reason; tokens are
estimated as characters / 4), `removed/STEP.jsonl` (a few removed documents per reason, and every
decontaminated one), and `work/` (intermediate shards, signatures, per-task counts and datatrove's
logging dirs, whose completion markers let an interrupted run resume without redoing finished
tasks). Running the same config again skips every finished task and rewrites the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fcntl
import glob
import importlib.util
import json
import os
import re
import sys
import time
from typing import Literal

from data_pipeline.config import SHARED_DATA
from data_pipeline.errors import NotFound, UserError
from data_pipeline.tasks import GSM8K_RECORD, gsm8k_record, load_task, read_jsonl

INSTALL_HINT = "lm data curate needs datatrove and py3langid: pip install -e .[curate]"
EVAL_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "lambada", "gsm8k")
CHARS_PER_TOKEN = 4  # the report's token estimate: characters / 4


class CurateError(UserError):
    """A bad curation config or input; the message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class CurateInput:
    """One raw input. kind: "jsonl" (one document per line, text in `text_field`; .gz allowed),
    "html" (one page per file; .gz allowed), "warc" (the HTML responses of WARC files, .warc.gz
    allowed), "wet" (the text conversions of Common Crawl WET files)."""

    name: str
    kind: Literal["jsonl", "html", "warc", "wet"]
    paths: tuple[str, ...]  # globs
    text_field: str = "text"
    id_field: str = "id"


# Thresholds of the published rules, with datatrove's parameter names and defaults; a step is
# off when its field of CurateConfig is None.


@dataclasses.dataclass(frozen=True)
class GopherQuality:
    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: int | None = 3
    max_avg_word_length: int | None = 10
    max_symbol_word_ratio: float | None = 0.1  # '#' and ellipses per word
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    max_non_alpha_words_ratio: float | None = 0.8  # (sic: the minimum share of words with a letter)
    min_stop_words: int | None = 2


@dataclasses.dataclass(frozen=True)
class GopherRepetition:
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16))
    dup_n_grams: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))


@dataclasses.dataclass(frozen=True)
class C4Quality:
    """C4's rules: lines without terminal punctuation, with fewer than 3 words, mentioning
    javascript or cookie / terms-of-use policies are dropped from a document; a document with
    fewer than `min_num_sentences` sentences left, 'lorem ipsum' or a curly bracket is removed."""

    split_paragraph: bool = True
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


@dataclasses.dataclass(frozen=True)
class FineWebQuality:
    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3


@dataclasses.dataclass(frozen=True)
class CurateConfig:
    inputs: tuple[CurateInput, ...]
    output_dir: str
    # documents longer than this are cut to it (counted); raw records (a JSON line, an HTML file,
    # a WARC record) over max_record_mb are skipped unread (counted): memory stays bounded
    max_doc_chars: int = 1_000_000
    max_record_mb: float = 64.0
    extraction_timeout_s: float = 5.0  # Trafilatura, per HTML document
    languages: tuple[str, ...] = ("en",)  # ISO 639-1 codes kept; () turns the language step off
    min_language_score: float = 0.65  # py3langid's normalised probability
    gopher_repetition: GopherRepetition | None = GopherRepetition()
    gopher_quality: GopherQuality | None = GopherQuality()
    c4_quality: C4Quality | None = C4Quality()
    fineweb_quality: FineWebQuality | None = FineWebQuality()
    decontaminate: bool = True
    decontaminate_tasks: tuple[str, ...] = EVAL_TASKS  # read from eval_data_dir with data_pipeline/tasks.py
    decontaminate_files: tuple[str, ...] = ()  # more task files: JSON Lines (every string field) or text lines
    decontaminate_ngram: int = 13
    # an item text of fewer than decontaminate_ngram words (a short ARC question, a PIQA goal) is
    # matched whole down to this many words; shorter items are counted as unchecked in the report
    decontaminate_min_ngram: int = 8
    # False: a contaminated document is removed. True: only its lines holding a matching n-gram
    # are cut, and it is removed when fewer than decontaminate_min_chars_left characters remain
    decontaminate_spans: bool = False
    decontaminate_min_chars_left: int = 200
    eval_data_dir: str = SHARED_DATA
    mask_pii: bool = False  # e-mail and IP addresses replaced by placeholders (datatrove's PIIFormatter)
    exact_dedup: bool = True  # hash of the lower-cased, whitespace-normalised text; the first copy is kept
    near_dedup: bool = True  # MinHash LSH: one document per cluster of near duplicates is kept
    minhash_ngram: int = 5  # word n-gram shingles
    minhash_bands: int = 14  # LSH bands ...
    minhash_rows: int = 8  # ... of this many hashes: Jaccard threshold about (1/bands)**(1/rows) = 0.72
    examples_per_reason: int = 5  # removed documents kept per reason in removed/
    # data/RANK.jsonl, or data/RANK.parquet (snappy; needs pyarrow): a SourceConfig of kind "jsonl"
    # or "parquet" reads either
    output_format: Literal["jsonl", "parquet"] = "jsonl"
    tasks: int = 1  # datatrove tasks (shards of the inputs; output shards)
    workers: int = 1  # tasks run at once on this machine
    executor: Literal["local", "slurm"] = "local"
    slurm_partition: str = ""
    slurm_time: str = "4:00:00"
    slurm_mem_per_cpu_gb: int = 2

    @property
    def jaccard_threshold(self) -> float:
        """The similarity at which a pair becomes a candidate with probability about 1/2 ... 2/3:
        (1/bands)^(1/rows); a pair of Jaccard similarity s is found with 1 - (1 - s^rows)^bands."""
        return (1 / self.minhash_bands) ** (1 / self.minhash_rows)

    def validate(self, where: str = "curation config") -> CurateConfig:
        def bad(msg: str):
            raise CurateError(f"{where}: {msg}")

        if not self.inputs:
            bad("no inputs; add CurateInput(name=..., kind='jsonl'|'html'|'warc'|'wet', paths=(GLOB,))")
        names = set()
        for inp in self.inputs:
            if not isinstance(inp, CurateInput):
                bad(f"inputs holds a {type(inp).__name__}, not a CurateInput")
            if inp.kind not in ("jsonl", "html", "warc", "wet"):
                bad(f"input {inp.name!r}: kind {inp.kind!r} is not one of jsonl, html, warc, wet")
            if not inp.name or not inp.name.replace("_", "").replace("-", "").isalnum() or inp.name in names:
                bad(f"input name {inp.name!r} must be a unique word (letters, digits, - and _)")
            if isinstance(inp.paths, str) or not inp.paths:
                bad(f"input {inp.name!r}: paths must be a tuple of globs, e.g. paths=('data/*.jsonl',)")
            names.add(inp.name)
        if not self.output_dir:
            bad("output_dir is empty; name the folder for the curated shards")
        for field, low in (("max_doc_chars", 1), ("max_record_mb", 1e-6), ("extraction_timeout_s", 1e-3),
                           ("tasks", 1), ("workers", 1), ("minhash_ngram", 1), ("minhash_bands", 1),
                           ("minhash_rows", 1), ("decontaminate_ngram", 5), ("examples_per_reason", 0),
                           ("decontaminate_min_chars_left", 0)):
            if not getattr(self, field) >= low:
                bad(f"{field} = {getattr(self, field)!r}; it must be at least {low:g}")
        if not 1 <= self.decontaminate_min_ngram <= self.decontaminate_ngram:
            bad(f"decontaminate_min_ngram = {self.decontaminate_min_ngram!r}; it must be between 1 and "
                f"decontaminate_ngram ({self.decontaminate_ngram})")
        if not 0 <= self.min_language_score <= 1:
            bad(f"min_language_score = {self.min_language_score}; it is a probability in [0, 1]")
        if isinstance(self.languages, str) or not all(isinstance(x, str) and x for x in self.languages):
            bad(f"languages must be a tuple of language codes like ('en',), not {self.languages!r}")
        unknown = [t for t in self.decontaminate_tasks if t not in EVAL_TASKS]
        if unknown:
            bad(f"decontaminate_tasks: unknown task(s) {', '.join(unknown)}; known: {', '.join(EVAL_TASKS)}")
        if self.output_format not in ("jsonl", "parquet"):
            bad(f"output_format {self.output_format!r} is not 'jsonl' or 'parquet'")
        if self.executor not in ("local", "slurm"):
            bad(f"executor {self.executor!r} is not 'local' or 'slurm'")
        if self.executor == "slurm" and not self.slurm_partition:
            bad("executor='slurm' needs slurm_partition (the partition to submit to)")
        return self


# ---------------------------------------------------------------------------------------
# Loading a curation module


def load_config(spec: str) -> CurateConfig:
    """`experiments/curate_web.py`, a path to any .py file, or a name under experiments/."""
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        path = os.path.abspath(spec if spec.endswith(".py") else spec + ".py")
    else:
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", spec + ".py")
    if not os.path.isfile(path):
        raise NotFound(f"curation config {spec!r} not found ({path}); give a .py file with def config() -> "
                       "CurateConfig, e.g. experiments/curate_web.py")
    name = "curate_" + os.path.splitext(os.path.basename(path))[0]
    mod_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise CurateError(f"curation config {spec}: syntax error at line {e.lineno}: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 -- a failing import or top-level statement of the user's file
        raise CurateError(f"curation config {spec} failed to load: {type(e).__name__}: {e}") from None
    if not callable(getattr(module, "config", None)):
        raise CurateError(f"curation config {spec} defines no config() function; add def config() -> CurateConfig")
    try:
        cfg = module.config()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 -- an error inside the user's config()
        raise CurateError(f"curation config {spec}: config() failed: {type(e).__name__}: {e}") from None
    if not isinstance(cfg, CurateConfig):
        raise CurateError(f"curation config {spec}: config() returned {type(cfg).__name__}, not a CurateConfig")
    return cfg.validate(f"curation config {spec}")


_STEP_CLASSES = {"gopher_quality": GopherQuality, "gopher_repetition": GopherRepetition, "c4_quality": C4Quality,
                 "fineweb_quality": FineWebQuality}


def _convert(key: str, text: str, current, default):
    """`text` as the type of the field's current (or default) value."""
    like = current if current is not None else default
    if text.lower() == "none" and (current is None or default is None or key.split(".")[0] in _STEP_CLASSES):
        return None
    try:
        if isinstance(like, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if isinstance(like, int):
            return int(text)
        if isinstance(like, float):
            return float(text)
        if isinstance(like, tuple):
            return tuple(x.strip() for x in text.split(",") if x.strip())
    except ValueError:
        what = {bool: "true or false", int: "an integer", float: "a number"}.get(type(like), type(like).__name__)
        raise CurateError(f"--set {key}={text}: {text!r} is not {what}") from None
    return text


def apply_overrides(cfg: CurateConfig, sets: list[str]) -> CurateConfig:
    """`--set KEY=VALUE` on a curation config: a field (tasks=64, executor=slurm, languages=en,de),
    a step's threshold (gopher_quality.min_doc_words=100) or a step off (c4_quality=None)."""

    for item in sets:
        key, eq, text = item.partition("=")
        if not eq:
            raise CurateError(f"--set {item!r}: write KEY=VALUE, e.g. --set tasks=8")
        head, _, sub = key.partition(".")
        fields = {f.name: f for f in dataclasses.fields(CurateConfig)}
        if head not in fields or head == "inputs" or (sub and head not in _STEP_CLASSES):
            near = difflib.get_close_matches(head, [f for f in fields if f != "inputs"], n=1)
            raise CurateError(f"--set {key}: no such curation setting{f'; did you mean {near[0]}?' if near else ''}"
                              " (inputs are set in the config file)")
        if not sub:
            default = fields[head].default
            cfg = dataclasses.replace(cfg, **{head: _convert(key, text, getattr(cfg, head), default)})
            continue
        step = getattr(cfg, head) or _STEP_CLASSES[head]()
        sub_fields = {f.name: f for f in dataclasses.fields(step)}
        if sub not in sub_fields:
            near = difflib.get_close_matches(sub, list(sub_fields), n=1)
            raise CurateError(f"--set {key}: {head} has no setting {sub!r}{f'; did you mean {near[0]}?' if near else ''}")
        if isinstance(sub_fields[sub].default, tuple):
            raise CurateError(f"--set {key}: n-gram lists are set in the config file")
        value = _convert(key, text, getattr(step, sub), sub_fields[sub].default)
        cfg = dataclasses.replace(cfg, **{head: dataclasses.replace(step, **{sub: value})})
    return cfg.validate("curation config with --set")


def input_files(cfg: CurateConfig) -> dict[str, list[str]]:
    """Each input's files (sorted); an input whose globs match no file is an error."""
    out = {}
    for inp in cfg.inputs:
        files = sorted({f for p in inp.paths for f in glob.glob(os.path.expanduser(p), recursive=True)
                        if os.path.isfile(f)})
        if not files:
            raise CurateError(f"input {inp.name!r}: no file matches {', '.join(map(repr, inp.paths))}; fix the "
                              "path (shared data: set LM_DATA to the folder holding it)")
        out[inp.name] = files
    return out


# ---------------------------------------------------------------------------------------
# Evaluation items to decontaminate against


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def _task_file_item(obj) -> str:
    texts = _strings(obj)
    if not texts:
        raise ValueError("no string field")
    return "\n".join(texts)


_TEMPLATE_START = re.compile(r"^\s*Question:\s*")
_TEMPLATE_END = re.compile(r"\s*Answer:\s*$")


def eval_items(cfg: CurateConfig, log=None) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """(label, text) of every evaluation item, and the item count per task. A multiple-choice
    item's texts are its context followed by its right answer (with and without the prompt's
    "Question:" and "Answer:"), its context alone and each choice alone; GSM8K's (test split) the
    question with its worked answer and the question alone; a task file's: its record's strings
    joined (JSON Lines) or its line (other files)."""
    items: list[tuple[str, str]] = []
    counts: dict[str, int] = {}
    for task in cfg.decontaminate_tasks:
        if task == "gsm8k":
            path = os.path.join(cfg.eval_data_dir, "gsm8k", "test.jsonl")
            records = read_jsonl(path, gsm8k_record, GSM8K_RECORD, "gsm8k/test.jsonl",
                                 ": set eval_data_dir (or LM_DATA) or drop 'gsm8k' from decontaminate_tasks", log)
            got = [(f"gsm8k:{n}", text) for n, g in records for text in (g["question"] + "\n" + g["answer"],
                                                                         g["question"])]
        else:
            got = []
            for i, it in enumerate(load_task(task, cfg.eval_data_dir, log)):
                ctx = it["contexts"][it["gold"] if len(it["contexts"]) > 1 else 0]
                cont = it["continuations"][0 if len(it["continuations"]) == 1 else it["gold"]]
                core = _TEMPLATE_END.sub("", _TEMPLATE_START.sub("", ctx))  # without "Question: ... Answer:"
                # the context alone too: C4's rules may cut an answer line from a page and keep the question
                got += [(f"{task}:{i}", t) for t in (ctx + cont, core + cont, core, *it["choices"])]
        items += got
        counts[task] = len({label for label, _ in got})
    for path in cfg.decontaminate_files:
        name = os.path.basename(path)
        if path.endswith((".jsonl", ".jsonl.gz", ".jsonl.bz2")):
            got = [(f"{name}:{n}", t) for n, t in read_jsonl(path, _task_file_item, "each line must be a JSON "
                                                             "object with string fields", name, "", log)]
        else:
            if not os.path.isfile(path):
                raise NotFound(f"decontaminate_files: {path} not found; fix the path")
            with open(path, encoding="utf-8", errors="replace") as f:
                got = [(f"{name}:{n}", line) for n, line in enumerate(f, 1) if line.strip()]
        items += got
        counts[name] = len(got)
    return items, counts


# ---------------------------------------------------------------------------------------
# Running and reporting


def _steps_module():
    """data_pipeline.curate_steps, or the one-line install hint when datatrove or py3langid is missing."""
    try:
        import datatrove  # noqa: F401 -- optional: the curate extra
        import py3langid  # noqa: F401 -- optional: the curate extra

        from data_pipeline import curate_steps  # lazy: imports datatrove, trafilatura, warcio at its top
    except ImportError as e:
        if (e.name or "").split(".")[0] not in ("datatrove", "py3langid", "trafilatura", "warcio", "orjson"):
            raise  # a bug, not a missing package
        raise UserError(INSTALL_HINT) from None
    return curate_steps


# how the work is run, not what it computes: these may change between a run and its resumption
_HOW_RUN = ("workers", "executor", "slurm_partition", "slurm_time", "slurm_mem_per_cpu_gb")


def _check_output(cfg: CurateConfig, work: str) -> None:
    """The output dir holds nothing, or a curation of this same config (then it resumes)."""
    path = os.path.join(work, "config.json")
    mine = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            theirs = json.load(f)
        changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k) and k not in _HOW_RUN)
        if changed:
            raise CurateError(f"{cfg.output_dir} holds a curation made with another config (changed: "
                              f"{', '.join(changed)}); use a new output_dir or delete {cfg.output_dir} to start over")
    elif os.path.isdir(cfg.output_dir) and set(os.listdir(cfg.output_dir)) - {".lock"}:
        raise CurateError(f"{cfg.output_dir} exists and is not a curation output; choose an empty or new output_dir")
    os.makedirs(work, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(mine, f, indent=1)


def curate(cfg: CurateConfig, log=print, report_only: bool = False) -> dict:
    """Run the curation (resuming finished tasks), write report.json and removed/, print the
    table via `log`; return the report. On Slurm: submit the stages and return {} (run again
    with report_only=True when the jobs are done)."""
    cfg = cfg.validate()
    steps = _steps_module()
    files = input_files(cfg)  # (an input that matches nothing fails here, before any folder is made)
    with _lock(cfg.output_dir):
        return _curate(cfg, steps, files, log, report_only)


@contextlib.contextmanager
def _lock(output_dir: str):
    """One curation at a time per output folder: a second copy stops with one line (two copies
    would run the same tasks and step on each other's files)."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, ".lock"), "a+") as f:
        try:
            # a POSIX record lock: held by this process only, not by the workers it forks (which
            # could outlive a kill -9 of it and keep the folder locked)
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise CurateError(f"another lm data curate (pid {pid}) is writing {output_dir}: wait for it to finish, "
                              "or give this one another output_dir") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield


def _curate(cfg: CurateConfig, steps, files: dict, log, report_only: bool) -> dict:
    work = os.path.join(cfg.output_dir, "work")
    if not report_only:
        _check_output(cfg, work)
    items, item_counts = eval_items(cfg, log) if cfg.decontaminate else ([], {})
    stage_list = steps.stages(cfg, files, items, work, os.path.join(cfg.output_dir, "data"))
    steps.save_json(os.path.join(work, "step_labels.json"), steps.step_labels(stage_list))
    execs = steps.executors(cfg, stage_list, work)
    timings = {}
    if not report_only:
        if cfg.executor == "slurm":
            execs[-1].run()  # submits the chain (each stage depends on the one before)
            log(f"submitted {len(execs)} Slurm stages; when they finish, run `lm data curate CONFIG --report`")
            return {}
        for (name, _, tasks), ex in zip(stage_list, execs):
            before = steps.completed(os.path.join(work, "logs", name))
            t0 = time.time()
            ex.run()
            timings[name] = {"seconds": round(time.time() - t0, 2), "tasks": tasks, "skipped_done": before}
    for name, _, tasks in stage_list:
        done = steps.completed(os.path.join(work, "logs", name))
        if done < tasks:
            raise CurateError(f"stage {name} has {done} of {tasks} tasks done; run `lm data curate` again to finish")
    report = build_report(cfg, files, work, item_counts, timings, steps.save_json)
    with open(os.path.join(cfg.output_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, ensure_ascii=False)
    log(format_table(report))
    return report


def _load_all(folder: str) -> list[dict]:
    if not os.path.isdir(folder):
        return []
    out = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                out.append(json.load(f))
    return out


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _sum(folder: str) -> dict:
    total = {"docs": 0, "chars": 0}
    for part in _load_all(folder):
        for k in total:
            total[k] += part[k]
    return total


def _tokens(chars) -> int | None:
    return None if chars is None else round(chars / CHARS_PER_TOKEN)


def build_report(cfg: CurateConfig, files: dict[str, list[str]], work: str, item_counts: dict[str, int],
                 timings: dict, save_json) -> dict:
    """report.json's content from the per-task counts under work/; writes removed/STEP.jsonl."""
    tally = os.path.join(work, "tally")
    inputs = {}
    for inp in cfg.inputs:
        agg: dict = {"kind": inp.kind, "files": 0, "docs": 0, "chars": 0, "cut_docs": 0, "cut_chars": 0, "seconds": 0,
                     "skipped_records": 0, "non_utf8_html": 0, "bad": {}, "bad_examples": []}
        for part in _load_all(os.path.join(tally, "read", inp.name)):
            for k in ("files", "docs", "chars", "cut_docs", "cut_chars", "skipped_records", "non_utf8_html", "seconds"):
                agg[k] += part.get(k, 0)
            for k, v in part["bad"].items():
                agg["bad"][k] = agg["bad"].get(k, 0) + v
            agg["bad_examples"] += part["bad_examples"][:20 - len(agg["bad_examples"])]
        agg["files_matched"] = len(files[inp.name])
        inputs[inp.name] = agg
    order = [("extract", "extract_in", "extract"), ("language", "start", "language"),
             ("gopher_repetition", None, "gopher_repetition"), ("gopher_quality", None, "gopher_quality"),
             ("c4_quality", None, "c4_quality"), ("fineweb_quality", None, "fineweb_quality"),
             ("decontaminate", None, "decontaminate"), ("pii", None, "pii"),
             ("exact_dedup", "exact_in", "exact_dedup"), ("near_dedup", "final_in", "near_dedup")]
    steps = []
    prev = _sum(os.path.join(tally, "start"))
    removed_dir = os.path.join(cfg.output_dir, "removed")
    os.makedirs(removed_dir, exist_ok=True)
    listed = []
    for step, before, after in order:
        if not os.path.isdir(os.path.join(tally, after)):
            continue
        tin = _sum(os.path.join(tally, before)) if before else prev
        tout = _sum(os.path.join(tally, after))
        reasons: dict = {}
        examples = []
        parts = _load_all(os.path.join(work, "removed", step))
        for part in parts:
            for r, n in part.get("reasons", {}).items():
                agg = reasons.setdefault(r, {"docs": 0, "chars": 0})
                agg["docs"] += n["docs"]
                agg["chars"] = None if n["chars"] is None or agg["chars"] is None else agg["chars"] + n["chars"]
            for r, ex in part.get("examples", {}).items():
                examples += ex
            listed += part.get("listed", [])
        for r in reasons.values():
            r["tokens_est"] = _tokens(r["chars"])
        entry = {"step": step, "docs_in": tin["docs"], "docs_out": tout["docs"],
                 "docs_removed": tin["docs"] - tout["docs"],
                 "chars_in": tin["chars"], "chars_out": tout["chars"], "tokens_in_est": _tokens(tin["chars"]),
                 "tokens_out_est": _tokens(tout["chars"]), "removed_by_reason": reasons}
        known = [r["chars"] for r in reasons.values()]
        if None not in known:  # characters cut from documents that were kept (C4 drops lines)
            entry["chars_cut_from_kept"] = tin["chars"] - tout["chars"] - sum(known)
        if step == "pii":
            entry["docs_masked"] = sum(p.get("masked_docs", 0) for p in parts)
        if step == "decontaminate" and cfg.decontaminate_spans:
            cuts = [c for p in _load_all(os.path.join(work, "removed", "decontaminate_cuts")) for c in p["cuts"]]
            entry["docs_cut"] = len(cuts)
            listed += [{**c, "cut": True} for c in cuts]
        steps.append(entry)
        prev = tout
        with open(os.path.join(removed_dir, f"{step}.jsonl"), "w", encoding="utf-8") as f:
            for ex in examples:
                f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    if listed:
        with open(os.path.join(removed_dir, "decontaminated_all.jsonl"), "w", encoding="utf-8") as f:
            for x in listed:
                f.write(json.dumps(x, ensure_ascii=False) + "\n")
    written = _sum(os.path.join(tally, "final_in")) if not cfg.near_dedup else _sum(os.path.join(tally, "near_dedup"))
    read_docs = sum(i["docs"] for i in inputs.values())
    return {
        "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
        "tokens_estimate": f"characters / {CHARS_PER_TOKEN}",
        "inputs": inputs,
        "read": {"docs": read_docs, "chars": sum(i["chars"] for i in inputs.values()),
                 "bad_records": sum(sum(i["bad"].values()) for i in inputs.values()),
                 "cut_docs": sum(i["cut_docs"] for i in inputs.values())},
        "steps": steps,
        "written": {"docs": written["docs"], "chars": written["chars"], "tokens_est": _tokens(written["chars"]),
                    "shards": sorted(glob.glob(os.path.join(cfg.output_dir, "data", f"*.{cfg.output_format}")))},
        "near_dedup_jaccard_threshold": round(cfg.jaccard_threshold, 3) if cfg.near_dedup else None,
        "decontamination": {"ngram": cfg.decontaminate_ngram, "min_ngram": cfg.decontaminate_min_ngram,
                            "items_per_task": item_counts, **_read_json(os.path.join(work, "decontaminate.json")),
                            "removed": listed[:1000],
                            "removed_total": sum(not x.get("cut") for x in listed),
                            "cut_total": sum(bool(x.get("cut")) for x in listed)} if cfg.decontaminate else None,
        "stages": timings,
        "throughput": _throughput(work, inputs, steps, timings),
    }


def _throughput(work: str, inputs: dict, steps: list[dict], timings: dict) -> dict:
    """Seconds, documents/s and MB/s of each step: datatrove's per-step times from each stage's
    stats.json (summed over tasks: the speed of one worker process), our reader's own timing, and
    the stage's wall-clock for the stages datatrove times as a whole (exact_find, minhash_cluster)."""
    labels = _read_json(os.path.join(work, "step_labels.json"))
    secs: dict[str, float] = {"read": sum(i.get("seconds", 0) for i in inputs.values())}
    for stage, labs in labels.items():
        path = os.path.join(work, "logs", stage, "stats.json")
        stats = []
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                stats = json.load(f)
        timed = [(lab, e["time_stats"]["total"]) for lab, e in zip(labs, stats)
                 if lab and lab != "read" and isinstance(e.get("time_stats"), dict)]
        if not timed and stage in timings:
            timed = [(next((lab for lab in labs if lab), "io"), timings[stage]["seconds"])]
        for lab, t in timed:
            secs[lab] = secs.get(lab, 0.0) + t
    read_docs = sum(i["docs"] for i in inputs.values())
    read_chars = sum(i["chars"] for i in inputs.values())
    rows = [("read", read_docs, read_chars)] + [(s["step"], s["docs_in"], s["chars_in"]) for s in steps]
    out = []
    for step, docs, chars in rows:
        t = secs.get(step)
        if t is None:
            continue
        out.append({"step": step, "seconds": round(t, 3), "docs_in": docs,
                    "docs_per_s": round(docs / t, 1) if t > 0 else None,
                    "mb_per_s": round(chars / 1e6 / t, 3) if t > 0 else None})
    wall = sum(t["seconds"] for t in timings.values())
    return {"per_step": out, "io_seconds": round(secs.get("io", 0.0), 3), "wall_seconds": round(wall, 2),
            "docs_per_s": round(read_docs / wall, 1) if wall else None,
            "mb_per_s": round(read_chars / 1e6 / wall, 3) if wall else None,
            "note": "per step: seconds summed over tasks (one worker process's speed); MB = 10^6 characters; "
                    "wall: the stages run by this invocation, process start-up included"}


def format_table(report: dict) -> str:
    """The short table printed after a run."""
    speed = {x["step"]: x for x in (report.get("throughput") or {}).get("per_step", [])}

    def rate(step):
        x = speed.get(step)
        return (f"{x['seconds']:.2f}", f"{x['docs_per_s']:.0f}" if x["docs_per_s"] else "") if x else ("", "")

    rows = [("step", "docs in", "removed", "docs out", "chars out", "~tokens out", "s", "docs/s", "top reasons")]
    r = report["read"]
    rows.append(("read", f"{r['docs'] + r['bad_records']}", f"{r['bad_records']} bad", f"{r['docs']}",
                 f"{r['chars']}", "", *rate("read"), f"{r['cut_docs']} cut to max_doc_chars" if r["cut_docs"] else ""))
    for s in report["steps"]:
        top = sorted(s["removed_by_reason"].items(), key=lambda kv: -kv[1]["docs"])[:3]
        rows.append((s["step"], str(s["docs_in"]), str(s["docs_removed"]), str(s["docs_out"]), str(s["chars_out"]),
                     str(s["tokens_out_est"]), *rate(s["step"]), ", ".join(f"{k} {v['docs']}" for k, v in top) +
                     (f"{s.get('docs_masked', 0)} masked" if s["step"] == "pii" else "") +
                     (f"; {s['docs_cut']} cut (lines removed)" if s.get("docs_cut") else "")))
    w = report["written"]
    rows.append(("written", "", "", str(w["docs"]), str(w["chars"]), str(w["tokens_est"]), "", "",
                 f"{len(w['shards'])} shard(s)"))
    widths = [max(len(row[i]) for row in rows) for i in range(8)]
    lines = ["  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row[:8])) +
             "  " + row[8] for row in rows]
    t = report.get("throughput") or {}
    foot = "(tokens estimated as characters / 4; s: seconds of one worker process, summed over tasks"
    if t.get("wall_seconds"):
        foot += f"; whole curation {t['wall_seconds']:.1f} s wall, {t['docs_per_s']:.0f} docs/s, " \
                f"{t['mb_per_s']:.2f} MB/s"
    return "\n".join(lines) + "\n" + foot + ")"


def main_curate(spec: str, report_only: bool = False, sets: list[str] = ()) -> int:
    """The body of `lm data curate CONFIG [--set KEY=VALUE ...]`."""
    cfg = apply_overrides(load_config(spec), list(sets))
    report = curate(cfg, log=lambda m: print(m, file=sys.stdout, flush=True), report_only=report_only)
    if report:
        print(f"curated {report['written']['docs']} documents -> {os.path.join(cfg.output_dir, 'data')}; "
              f"report: {os.path.join(cfg.output_dir, 'report.json')}")
    return 0
