"""`lm tokenizer train`: train a SentencePiece tokenizer on a sample of configured sources."""

from __future__ import annotations

import argparse
import os
import time

from data_pipeline import cache
from data_pipeline.errors import UserError
from data_pipeline.sources import SourceConfig, open_source, source_configs
from data_pipeline.tokenizer import sample_texts, train_tokenizer

_KINDS = ((".jsonl", "jsonl"), (".jsonl.gz", "jsonl"), (".jsonl.bz2", "jsonl"), (".json", "json"),
          (".parquet", "parquet"), (".array_record", "arrayrecord"), (".arrayrecord", "arrayrecord"))


def guess_kind(path: str) -> str:
    for suffix, kind in sorted(_KINDS, key=lambda x: -len(x[0])):
        if path.endswith(suffix):
            return kind
    return "text"


def _positive(kind):
    """An argparse type: a positive number, checked at parse time."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{text} must be positive")
        return v

    return parse


def add_tokenizer_parser(sub, load_experiment) -> None:
    tok = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = tok.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a SentencePiece tokenizer")
    t.add_argument("--source", action="append", default=[],
                   help="a file or glob (kind from the extension), 'default' for the embedded corpus, "
                        "or NAME=GLOB; repeatable")
    t.add_argument("--experiment", help="use the sources (and weights) of this experiment instead")
    t.add_argument("--text-field", default="text", help="JSON/Parquet field holding the text")
    t.add_argument("--doc-per", default="file", choices=["file", "block", "line"], help="text files: document unit")
    t.add_argument("--vocab-size", type=_positive(int), required=True)
    t.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    t.add_argument("--tool-tokens", action="store_true",
                   help="reserve the tool-use tokens (<|tools|>, <|tool_call|>, <|tool|>) for chat models that "
                        "call tools")
    t.add_argument("--sample-mb", type=_positive(float), default=20.0, help="megabytes of text to train on")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default="tokenizer", help="output prefix: writes OUT.model")
    t.set_defaults(fn=cmd_tokenizer_train, load_experiment=load_experiment)


def add_data_parser(sub, load_experiment) -> None:
    """`load_experiment(spec, overrides)` -> a config with `.name`, `.data`, `.model.vocab_size`
    (passed in by `lm.cli`: the data pipeline does not import `lm`)."""
    data = sub.add_parser("data", help="data tools")
    dsub = data.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("cache", help="pre-tokenise an experiment's sources into a cache (resumable)")
    c.add_argument("experiment")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--run-dir", help="run directory whose tokenizer to use or create (default runs/<name>)")
    c.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    c.set_defaults(fn=cmd_data_cache, load_experiment=load_experiment)
    k = dsub.add_parser("curate", help="curate raw web text (extraction, language, quality, dedup, "
                                       "decontamination) into JSON Lines shards, on datatrove (resumable)")
    k.add_argument("config", help="a .py file (or a name under experiments/) with def config() -> CurateConfig")
    k.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting: tasks=64, workers=16, executor=slurm, slurm_partition=cpu, "
                        "gopher_quality.min_doc_words=100, c4_quality=None (repeatable)")
    k.add_argument("--report", action="store_true",
                   help="only write the report from finished stages (after a Slurm run)")
    k.set_defaults(fn=cmd_data_curate)


def cmd_data_cache(args) -> int:
    cfg = args.load_experiment(args.experiment, args.set)
    run_dir = args.run_dir or os.path.join("runs", cfg.name)
    cache_dir = cfg.data.cache_dir or os.path.join(run_dir, "token_cache")
    cache.build(cfg.data, cfg.model.vocab_size, run_dir, cache_dir, workers=args.workers)
    print(f"cache ready: train with --set data.cache_dir={cache_dir}")
    return 0


def cmd_data_curate(args) -> int:
    from data_pipeline.curate import main_curate  # lazy: a command imports what it runs

    return main_curate(args.config, report_only=args.report, sets=args.set)


def _sources(args) -> list[tuple[object, float]]:
    if args.experiment:
        configs = source_configs(args.load_experiment(args.experiment, []).data)
    else:
        if not args.source:
            raise UserError("lm tokenizer train: give --source PATH (repeatable) or --experiment NAME")
        configs = []
        for k, spec in enumerate(args.source):
            name, _, pattern = spec.partition("=") if "=" in spec else (f"s{k}", "", spec)
            if pattern == "default":
                configs.append(SourceConfig(name=name, kind="default", heldout_fraction=0.0))
            else:
                configs.append(SourceConfig(name=name, kind=guess_kind(pattern), paths=(pattern,),
                                            text_field=args.text_field, doc_per=args.doc_per,
                                            heldout_fraction=0.0))
    return [(open_source(c)[0], c.weight) for c in configs]


def cmd_tokenizer_train(args) -> int:
    sources = _sources(args)
    t0 = time.time()
    tok = train_tokenizer(sample_texts(sources, args.sample_mb, args.seed), args.vocab_size, args.out,
                          model_type=args.model_type, tool_tokens=args.tool_tokens)
    print(f"trained a {tok.vocab_size}-piece {args.model_type} tokenizer on up to {args.sample_mb:g} MB "
          f"from {len(sources)} source(s) in {time.time() - t0:.1f}s -> {os.path.abspath(tok.path)}")
    return 0
