"""Data pipeline: sources, bad input, tokenizer, packing, mixtures, exact resume."""

import bz2
import dataclasses
import gzip
import json
import os

import numpy as np
import pytest

from data_pipeline import default_corpus
from data_pipeline.config import SHARED_DATA
from data_pipeline.pipeline import DataStats, packed_rows, text_data, to_example
from data_pipeline.sources import DataError, JsonLines, TextFiles, open_source
from data_pipeline.tokenizer import BOS_ID, CHAT_TOKENS, EOS_ID, PAD_ID, Tokenizer, train_tokenizer
from lm.config import Config, DataConfig, ModelConfig, SourceConfig, TrainerConfig, apply_overrides


def pretraining_data(cfg, run_dir, **kw):
    """The data of experiment config `cfg` (as the pretraining stage opens it)."""
    return text_data(cfg.data, run_dir, vocab_size=cfg.model.vocab_size, eval_batches=cfg.trainer.eval_batches, **kw)


WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega").split()


def make_text(rng, n_words):
    return " ".join(rng.choice(WORDS, n_words))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rng = np.random.default_rng(0)
    texts = [make_text(rng, 200) + "\n    def f(x):\n        return x + 1\n" for _ in range(200)]
    return train_tokenizer(texts, 320, str(tmp_path_factory.mktemp("tok") / "sp"))


def test_tokenizer_round_trip_specials_and_batching(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (PAD_ID, BOS_ID, EOS_ID)
    for text in ["def f(x):\n\treturn  x  + 12345\n", "naïve café — ünïcödé ✓ 日本", "   \n\n  "]:
        assert tokenizer.decode(tokenizer.encode(text)) == text  # byte fallback: exact
    ids = tokenizer.encode("alpha", bos=True, eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    # chat-role markers are reserved control tokens, never produced from plain text
    chat_ids = [tokenizer.sp.piece_to_id(t) for t in CHAT_TOKENS]
    assert len(set(chat_ids)) == 4 and all(i > EOS_ID for i in chat_ids)
    assert not set(tokenizer.encode("<|user|> hi <|end|>")) & set(chat_ids)
    # digits are split
    assert len(tokenizer.encode("987654")) >= 6
    assert tokenizer.encode_batch(["alpha beta", "gamma"]) == [tokenizer.encode("alpha beta"), tokenizer.encode("gamma")]


def test_default_corpus_split_is_deterministic_and_disjoint():
    train, held = default_corpus.split(0.05)
    assert train and held
    assert {d.key for d in train}.isdisjoint({d.key for d in held})
    assert [d.key for d in default_corpus.split(0.05)[1]] == [d.key for d in held]
    # a file's code and its docstring always fall on the same side
    held_keys = {d.key for d in held}
    for d in held:
        if d.key.startswith("code:"):
            assert "doc:module:" + d.key[5:] in held_keys
    assert any(d.kind == "code" for d in train) and any(d.kind == "prose" for d in train)


def test_every_kind_of_bad_line_is_counted_and_good_lines_still_arrive(tmp_path, tokenizer):
    path = tmp_path / "mixed.jsonl"
    good = [json.dumps({"text": f"good document {i} " + "alpha beta " * 5}) for i in range(6)]
    lines = [
        good[0].encode(),
        b'{"text": "unterminated',  # malformed JSON
        good[1].encode(),
        b'{"text": "bad \xff\xfe utf8"}',  # invalid UTF-8
        good[2].encode(),
        json.dumps({"body": "no text field"}).encode(),  # missing field
        good[3].encode(),
        json.dumps({"text": "   "}).encode(),  # empty document
        json.dumps({"text": 42}).encode(),  # wrong type
        good[4].encode(),
        good[5].encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    src = JsonLines([str(path)], "text")
    records = [src[i] for i in range(len(src))]
    assert len(records) == 11
    errors = {r.where: r.error for r in records if r.text is None}
    assert errors == {
        f"{path}:2": "malformed JSON (Unterminated string starting at)",
        f"{path}:4": errors[f"{path}:4"],
        f"{path}:6": "missing text field 'text'",
        f"{path}:8": "empty document",
        f"{path}:9": "field 'text' is int, not a string",
    }
    assert errors[f"{path}:4"].startswith("invalid UTF-8")
    assert [r.text for r in records if r.text is not None] == [json.loads(g)["text"] for g in good]

    # through the pipeline: counted per source with locations, good documents all arrive
    stats = DataStats(["mixed"])
    rows = packed_rows(src, tokenizer.path, 16, source="mixed", shuffle=False, repeat=False, stats=stats)
    got = list(rows)
    assert stats.bad["mixed"] == 5 and stats.total() == 5
    assert stats.reasons["mixed"] == {"malformed JSON": 1, "invalid UTF-8": 1, "missing text field 'text'": 1,
                                      "empty document": 1, "field 'text' is int, not a string": 1}
    assert f"{path}:2" in stats.report()
    n_docs = sum(len(set(r["segment_ids"][r["segment_ids"] > 0]) - {0}) for r in got)
    tokens = np.concatenate([r["inputs"][r["segment_ids"] > 0] for r in got])
    assert (tokens == BOS_ID).sum() == 6 and n_docs >= 6

    # strict mode turns the first bad record into an error naming it
    rows = packed_rows(src, tokenizer.path, 16, source="mixed", shuffle=False, repeat=False, strict=True)
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: malformed JSON"):
        list(rows)


def test_unreadable_file_is_reported_not_fatal(tmp_path):
    ok = tmp_path / "a.txt"
    ok.write_text("hello world")
    gone = tmp_path / "b.txt"
    gone.write_text("soon gone")
    src = TextFiles([str(ok), str(gone)])
    os.remove(gone)
    assert src[0].text == "hello world"
    assert src[1].text is None and "unreadable file" in src[1].error and str(gone) in src[1].where


def test_text_blocks_lines_compressed_json_and_globs(tmp_path):
    (tmp_path / "t.txt").write_text("first block\nline two\n\n\nsecond block\n\nthird\n")
    blocks = open_source(SourceConfig(name="t", kind="text", paths=(str(tmp_path / "*.txt"),),
                                      doc_per="block", heldout_fraction=0.0))[0]
    assert [blocks[i].text for i in range(len(blocks))] == ["first block\nline two\n", "second block\n", "third\n"]
    lines = TextFiles([str(tmp_path / "t.txt")], doc_per="line")
    assert [lines[i].text for i in range(len(lines))] == ["first block", "line two", "second block", "third"]
    rows = [json.dumps({"content": f"doc {i}"}) for i in range(4)]
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("\n".join(rows[:2]) + "\n")
    with bz2.open(tmp_path / "b.jsonl.bz2", "wt") as f:
        f.write("\n".join(rows[2:]) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"content": "doc 4"}, {"content": "doc 5"}]))
    src, _ = open_source(SourceConfig(name="j", kind="jsonl", paths=(str(tmp_path / "*.jsonl.*"),),
                                      text_field="content", heldout_fraction=0.0))
    assert sorted(src[i].text for i in range(len(src))) == ["doc 0", "doc 1", "doc 2", "doc 3"]
    arr, _ = open_source(SourceConfig(name="a", kind="json", paths=(str(tmp_path / "c.json"),),
                                      text_field="content", heldout_fraction=0.0))
    assert [arr[i].text for i in range(len(arr))] == ["doc 4", "doc 5"]
    with pytest.raises(DataError, match="no files match"):
        open_source(SourceConfig(name="x", kind="text", paths=(str(tmp_path / "nothing*.txt"),)))


def test_parquet_and_arrayrecord_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"row {i}" for i in range(5)], "id": list(range(5))}),
                   tmp_path / "d.parquet", row_group_size=2)
    src, _ = open_source(SourceConfig(name="p", kind="parquet", paths=(str(tmp_path / "d.parquet"),),
                                      heldout_fraction=0.0))
    assert [src[i].text for i in range(len(src))] == [f"row {i}" for i in range(5)]
    with pytest.raises(DataError, match="no column 'body'"):
        open_source(SourceConfig(name="p", kind="parquet", paths=(str(tmp_path / "d.parquet"),), text_field="body"))

    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
    for rec in [b"plain text record", json.dumps({"text": "json record"}).encode(), b"\xff\xfe"]:
        w.write(rec)
    w.close()
    src, _ = open_source(SourceConfig(name="ar", kind="arrayrecord", paths=(str(tmp_path / "d.array_record"),),
                                      heldout_fraction=0.0))
    recs = [src[i] for i in range(len(src))]
    assert [r.text for r in recs[:2]] == ["plain text record", "json record"]
    assert recs[2].text is None and "invalid UTF-8" in recs[2].error


def test_tfds_not_prepared_gives_instructions(tmp_path):
    with pytest.raises(DataError, match="tfds build"):
        open_source(SourceConfig(name="w", kind="tfds", tfds_name="mnist", tfds_data_dir=str(tmp_path)))


def test_heldout_fraction_split_is_deterministic(tmp_path):
    for i in range(200):
        (tmp_path / f"{i}.txt").write_text(f"document {i}")
    cfg = SourceConfig(name="t", kind="text", paths=(str(tmp_path / "*.txt"),), heldout_fraction=0.2)
    train, val = open_source(cfg)
    assert len(train) + len(val) == 200 and 20 <= len(val) <= 60
    train2, val2 = open_source(cfg)
    assert [val.key(i) for i in range(len(val))] == [val2.key(i) for i in range(len(val2))]
    assert not {train.key(i) for i in range(len(train))} & {val.key(i) for i in range(len(val))}


def test_to_example_masks_predictions_across_documents():
    row = {"tokens": np.array([2, 10, 11, 3, 2, 20, 3, 0]), "tokens_segment_ids": np.array([1, 1, 1, 1, 2, 2, 2, 0]),
           "tokens_positions": np.array([0, 1, 2, 3, 0, 1, 2, 0])}
    ex = to_example(row, source_id=3)
    np.testing.assert_array_equal(ex["inputs"], [2, 10, 11, 3, 2, 20, 3])
    np.testing.assert_array_equal(ex["targets"], [10, 11, 3, 2, 20, 3, 0])
    # EOS->BOS of the next document and anything into padding is not a prediction
    np.testing.assert_array_equal(ex["loss_mask"], [1, 1, 1, 0, 1, 1, 0])
    assert ex["source_id"] == 3


# -- whole-run data: mixtures, packing, resume ----------------------------------------------


def corpus_dir(tmp_path, rng):
    """Three sources with very different document lengths."""
    for name, n_docs, words in (("short", 400, 8), ("medium", 200, 60), ("long", 40, 600)):
        d = tmp_path / name
        d.mkdir()
        with open(d / "docs.jsonl", "w") as f:
            for _ in range(n_docs):
                f.write(json.dumps({"text": make_text(rng, words)}) + "\n")
    return tmp_path


def mixture_config(root, tokenizer, weights=(0.6, 0.3, 0.1), **data):
    sources = tuple(SourceConfig(name=n, kind="jsonl", paths=(str(root / n / "*.jsonl"),), weight=w,
                                 heldout_fraction=0.05)
                    for n, w in zip(("short", "medium", "long"), weights))
    return Config(model=ModelConfig(vocab_size=tokenizer.vocab_size, max_seq_len=64),
                  data=DataConfig(corpus="sources", sources=sources, seq_len=64, batch_size=8,
                                  tokenizer=tokenizer.path, prefetch=2, **data),
                  trainer=TrainerConfig(eval_batches=2))


def test_mixture_realised_token_shares_match_weights(tmp_path, tokenizer):
    root = corpus_dir(tmp_path, np.random.default_rng(1))
    data = pretraining_data(mixture_config(root, tokenizer), str(tmp_path / "run"), log=lambda *_: None,
                   process_index=0, process_count=1)
    tokens = np.zeros(3)
    for _ in range(200):  # 1,600 rows
        b = data.next_train()
        np.add.at(tokens, b["source_id"], (b["segment_ids"] > 0).sum(1))
    share = tokens / tokens.sum()
    np.testing.assert_allclose(share, [0.6, 0.3, 0.1], atol=0.02)
    assert set(data.heldout) == {"short", "medium", "long"}


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_resume_from_iterator_state_is_bit_identical(tmp_path, tokenizer, packing):
    root = corpus_dir(tmp_path, np.random.default_rng(2))
    cfg = mixture_config(root, tokenizer, packing=packing)
    run = str(tmp_path / "run")
    first = pretraining_data(cfg, run, log=lambda *_: None, process_index=0, process_count=1)
    for _ in range(7):
        first.next_train()
    state = first.get_state()
    expected = [first.next_train() for _ in range(5)]

    again = pretraining_data(cfg, run, log=lambda *_: None, process_index=0, process_count=1)
    again.set_state(json.loads(json.dumps(state)))  # as a checkpoint stores it
    for want in expected:
        got = again.next_train()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def _whole_segments(row: dict, documents: list[list[int]]) -> list[bool]:
    """For each segment of a packed row: is it the whole of the document the row names for it
    (its tokens BOS to EOS, positions from 0)? A row holds seq_len + 1 tokens: a segment that
    reaches the end of the inputs may end in the last target."""
    inputs, targets, seg, pos = row["inputs"], row["targets"], row["segment_ids"], row["positions"]
    out = []
    for s in sorted(set(seg[seg > 0].tolist())):
        idx = np.flatnonzero(seg == s)
        want = documents[int(row["doc_ids"][s - 1]) - 1]
        got = inputs[idx].tolist()
        if got != want and idx[-1] == len(inputs) - 1:  # may end in the row's last token, the last target
            got.append(int(targets[-1]))
        contiguous = np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx)))
        out.append(contiguous and got == want and np.array_equal(pos[idx], np.arange(len(idx))))
    return out


@pytest.mark.parametrize("packing", ["first_fit", "concat"])
def test_first_fit_packing_keeps_every_document_whole(tmp_path, tokenizer, packing):
    """First-fit packing puts each document (all shorter than a row) whole into one row, every
    document once: each segment is exactly the tokens of the document the row names for it.
    Concatenate-and-split packing, the contrast, cuts documents across rows: the same check
    finds cut ones there."""
    rng = np.random.default_rng(7)
    texts = [make_text(rng, int(n)) for n in rng.integers(2, 13, 60)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    documents = [tokenizer.encode(t, bos=True, eos=True) for t in texts]
    seq_len = 48
    assert max(map(len, documents)) <= seq_len + 1 < sum(map(len, documents)) // 10  # each fits; rows hold several
    rows = list(packed_rows(JsonLines([str(path)], "text"), tokenizer.path, seq_len, packing=packing,
                            shuffle=False, repeat=False))
    assert all(r["inputs"].shape == (seq_len,) for r in rows)
    whole = [w for r in rows for w in _whole_segments(r, documents)]
    if packing == "concat":
        assert not all(whole)
        return
    assert all(whole) and len(whole) == len(documents)
    placed = sorted(int(r["doc_ids"][s - 1]) for r in rows for s in set(r["segment_ids"][r["segment_ids"] > 0].tolist()))
    assert placed == list(range(1, len(documents) + 1))  # every document once
    assert len(rows) < 0.75 * len(documents)  # and packed: documents share rows


def test_source_overrides_by_name(tmp_path, tokenizer):
    root = corpus_dir(tmp_path, np.random.default_rng(4))
    cfg = apply_overrides(mixture_config(root, tokenizer), ["data.sources.long.weight=0.5",
                                                             "data.sources.short.paths=a.jsonl,b.jsonl"])
    by_name = {s.name: s for s in cfg.data.sources}
    assert by_name["long"].weight == 0.5 and by_name["short"].paths == ("a.jsonl", "b.jsonl")
    with pytest.raises(ValueError, match="data.sources.long.weight"):
        apply_overrides(cfg, ["data.sources.long.weigth=1"])


@pytest.mark.slow
def test_two_processes_together_produce_the_global_batches_of_one(tmp_path, tokenizer):
    root = corpus_dir(tmp_path, np.random.default_rng(5))
    cfg = mixture_config(root, tokenizer, num_shards=2)
    run = str(tmp_path / "run")
    quiet = dict(log=lambda *_: None)
    one = pretraining_data(cfg, run, process_index=0, process_count=1, **quiet)
    two = [pretraining_data(cfg, run, process_index=i, process_count=2, **quiet) for i in range(2)]
    for _ in range(6):
        g = one.next_train()
        parts = [p.next_train() for p in two]
        for k in g:
            np.testing.assert_array_equal(np.concatenate([parts[0][k], parts[1][k]]), g[k])
    # the state saved by the two processes restores a single process exactly
    merged = {"num_shards": 2, "shards": {**two[0].get_state()["shards"], **two[1].get_state()["shards"]}}
    expected = one.next_train()
    resumed = pretraining_data(cfg, run, process_index=0, process_count=1, **quiet)
    resumed.set_state(merged)
    got = resumed.next_train()
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])
    with pytest.raises(DataError, match="num_shards"):
        pretraining_data(mixture_config(root, tokenizer, num_shards=3), run, process_index=0, process_count=2, **quiet)


def test_tokenizer_cli_trains_from_files(tmp_path, capsys):
    from lm.cli import main

    rng = np.random.default_rng(6)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": make_text(rng, 300)}) for _ in range(30)))
    (tmp_path / "b.txt").write_text(make_text(rng, 3000))
    out = tmp_path / "tok" / "sp"
    rc = main(["tokenizer", "train", "--source", str(tmp_path / "*.jsonl"), "--source", f"txt={tmp_path / 'b.txt'}",
               "--text-field", "body", "--vocab-size", "300", "--model-type", "unigram", "--sample-mb", "1",
               "--out", str(out)])
    assert rc == 0 and "300-piece unigram" in capsys.readouterr().out
    tok = Tokenizer(str(out) + ".model")
    assert tok.vocab_size == 300 and tok.decode(tok.encode("alpha beta")) == "alpha beta"
    assert main(["tokenizer", "train", "--source", str(tmp_path / "missing*.txt"), "--vocab-size", "300",
                 "--out", str(out)]) == 2


def test_token_cache_matches_streaming_and_resumes(tmp_path, tokenizer):
    from data_pipeline import cache

    root = corpus_dir(tmp_path, np.random.default_rng(7))
    with open(root / "short" / "docs.jsonl", "a") as f:
        f.write("{not json\n")  # one bad line: counted at build time
    cfg = mixture_config(root, tokenizer)
    cache_dir = tmp_path / "cache"
    metas = cache.build(cfg.data, cfg.model.vocab_size, str(tmp_path / "run"), str(cache_dir), workers=2, progress=False, log=lambda *_: None)
    assert metas["short/train"]["bad_records"] + metas.get("short/validation", {}).get("bad_records", 0) == 1
    # interrupted build: remove a finished shard; only it is redone, with the same result
    split = cache_dir / "medium" / "train"
    before = np.load(split / "shard_00000.tokens.npy")
    os.remove(split / "shard_00000.offsets.npy")
    (split / "meta.json").unlink()
    cache.build_split(open_source(cfg.data.sources[1])[0], str(cache_dir / "tokenizer.model"), str(split),
                      tokenizer.vocab_size, workers=1, progress=False)
    np.testing.assert_array_equal(np.load(split / "shard_00000.tokens.npy"), before)

    # training batches read from the cache equal the ones tokenized on the fly (documents
    # whole: the cache cuts long ones by their exact token counts, streaming by estimates)
    quiet = dict(log=lambda *_: None, process_index=0, process_count=1)
    whole = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, chunk_tokens=0))
    streamed = pretraining_data(whole, str(tmp_path / "run"), **quiet)
    cached_cfg = dataclasses.replace(whole, data=dataclasses.replace(whole.data, cache_dir=str(cache_dir), tokenizer=None))
    cached = pretraining_data(cached_cfg, str(tmp_path / "run2"), **quiet)
    for _ in range(5):
        a, b = streamed.next_train(), cached.next_train()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # cut into pieces, the cached documents' ids arrive whole: every piece once, in equal slices
    from data_pipeline.sources import Pieces

    docs = cache.TokenCache(str(cache_dir / "long" / "train"))
    pieces = Pieces(docs, chunk_tokens=64)
    assert len(pieces) > len(docs) and docs.size_unit == "tokens"
    by_doc: dict = {}
    for k in range(len(pieces)):
        rec = pieces[k]
        assert 0 < len(rec.tokens) <= 64
        by_doc.setdefault(rec.doc, []).append(rec.tokens)
    for i in range(len(docs)):
        np.testing.assert_array_equal(np.concatenate(by_doc[i]), docs[i].tokens)
    assert os.path.exists(tmp_path / "run2" / "tokenizer.model")
    with pytest.raises(DataError, match="lm data cache"):
        pretraining_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_dir=str(tmp_path / "none"),
                                                                  tokenizer=None)), str(tmp_path / "r3"), **quiet)


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA),
                    reason="optional: needs the shared data folder (LM_DATA, else ../shared/data; absent on a fresh clone)")
def test_pretrain_mixture_experiment_shares_on_real_corpora(tmp_path):
    from lm import experiment

    cfg = experiment.load("pretrain_mixture", ["model.vocab_size=2048", "data.tokenizer_sample_mb=2",
                                               "data.seq_len=64", "model.max_seq_len=64"])
    data = pretraining_data(cfg, str(tmp_path), log=lambda *_: None, process_index=0, process_count=1)
    tokens = np.zeros(len(data.names))
    for _ in range(200):  # 1,600 rows
        b = data.next_train()
        np.add.at(tokens, b["source_id"], (b["segment_ids"] > 0).sum(1))
    weights = np.asarray(data.weights) / sum(data.weights)
    np.testing.assert_allclose(tokens / tokens.sum(), weights, atol=0.02)
    assert set(data.heldout) == set(data.names)


def test_split_text_cuts_at_boundaries_and_loses_nothing():
    from data_pipeline.pipeline import split_text

    text = "alpha beta\ngamma " * 1000 + "x" * 5000
    pieces = list(split_text(text, 300))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 300
    assert all(p.endswith((" ", "\n")) for p in pieces[:-20])  # cut after a space or a newline where possible


@pytest.mark.slow
def test_a_huge_single_line_document_is_tokenized_in_bounded_memory(tmp_path):
    """A 50 MB one-line document (as in the issue, which ran out of 24 GB): encoded whole,
    SentencePiece needs gigabytes, and a Python list of its 46M token ids 2.6 GB; encoded
    in pieces into int32 arrays, the whole process peaks at a fraction of that."""
    import subprocess
    import sys

    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 200 + ["0123456789 abc"], 300,
                          str(tmp_path / "sp"))
    code = (
        "import resource, sys, numpy as np\n"
        f"sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})\n"
        "from data_pipeline.pipeline import Tokenize, DataStats\n"
        "from data_pipeline.sources import Record\n"
        "text = ('the quick brown fox jumps over the lazy dog ' * 1150000)\n"
        "stats = DataStats(['s'])\n"
        f"out = Tokenize({tok.path!r}, 's', stats, False).map(Record(text, 'doc', None, None))\n"
        # the peak of this process's own memory: ru_maxrss would also count the parent's (pytest's)
        # resident memory at the fork (Linux carries it over the exec)
        "peak = [int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM')]\n"
        "print(len(text), len(out['tokens']), stats.long, peak[0] if peak else"
        " resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    chars, tokens, long, peak_kb = p.stdout.split(" ", 3)[0], p.stdout.split()[1], p.stdout, p.stdout.split()[-1]
    assert int(chars) > 50_000_000 and int(tokens) > 10_000_000 and "'s': 1" in long
    # about 0.65 GB (the interpreter and its imports take 0.25 GB); 2.6 GB as a list of ints
    assert int(peak_kb) < 1_000_000, f"peak memory {int(peak_kb) / 1e6:.2f} GB"


# -- fair batches: documents cut into pieces before the shuffle -------------------------------


def test_pieces_tile_each_document_with_bos_first_and_eos_last(tmp_path):
    from data_pipeline.sources import Pieces, piece_cut

    rng = np.random.default_rng(8)
    texts = ["\n".join(make_text(rng, int(rng.integers(3, 12))) for _ in range(n)) for n in (2, 40, 300)]
    texts.append("x" * 5000)  # no newline or space to cut at
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t)
    docs = TextFiles(sorted(str(p) for p in tmp_path.glob("*.txt")))
    pieces = Pieces(docs, chunk_tokens=50, chars_per_token=4.0)  # pieces of about 200 characters
    got: dict = {}
    for k in range(len(pieces)):
        rec = pieces[k]
        got.setdefault(rec.doc, []).append(rec)
    for i in range(len(docs)):
        recs, text = got[i], docs[i].text
        assert "".join(r.text for r in recs) == text  # nothing lost, nothing repeated
        assert [r.bos for r in recs] == [True] + [False] * (len(recs) - 1)
        assert [r.eos for r in recs] == [False] * (len(recs) - 1) + [True]
        assert len(recs) == max(1, -(-len(text) // 200)) and max(len(r.text) for r in recs) < 400
        if "\n" in text:  # cuts fall just after a line break
            assert all(r.text.endswith("\n") for r in recs[:-1])
    assert [piece_cut("aaaa\nbbbb\ncccc", j, 2) for j in range(3)] == [0, 5, 14]
    assert len(Pieces(docs, chunk_tokens=0)) == len(docs)  # 0: whole documents


def long_doc_corpus(tmp_path, rng, n_long=40, n_short=200):
    """Many documents, `n_long` of them about 12 rows of 64 tokens long each."""
    d = tmp_path / "corpus"
    d.mkdir()
    with open(d / "docs.jsonl", "w") as f:
        for i in range(n_long + n_short):
            f.write(json.dumps({"text": make_text(rng, 700 if i < n_long else 20)}) + "\n")
    return d


@pytest.mark.parametrize("packing", ["concat", "first_fit"])
def test_no_document_fills_a_batch_when_long_documents_are_cut(tmp_path, tokenizer, packing):
    """A long document shuffled whole fills consecutive batches by itself; cut into pieces
    before the shuffle, each batch samples the corpus: no document supplies more than a
    small fraction of any batch. Document masking holds across the cuts."""
    root = long_doc_corpus(tmp_path, np.random.default_rng(9))
    cfg = Config(model=ModelConfig(vocab_size=tokenizer.vocab_size, max_seq_len=64),
                 data=DataConfig(corpus="sources", seq_len=64, batch_size=16, tokenizer=tokenizer.path, prefetch=0,
                                 packing=packing, shuffle_rows=0, sources=(
                                     SourceConfig(name="c", kind="jsonl", paths=(str(root / "*.jsonl"),),
                                                  heldout_fraction=0.0),)),
                 trainer=TrainerConfig(eval_batches=1))
    quiet = dict(log=lambda *_: None, process_index=0, process_count=1)

    def top_shares(c, n=60):
        data = pretraining_data(c, str(tmp_path / "run"), **quiet)
        batches = [data.next_train() for _ in range(n)]
        m = data.metrics()
        assert m["batch_top_doc_share"] == pytest.approx(np.mean([batch_diversity(b)[1] for b in batches]))
        return batches, [batch_diversity(b) for b in batches]

    from data_pipeline.pipeline import batch_diversity

    whole = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, chunk_tokens=0))
    _, before = top_shares(whole)
    assert max(s for _, s in before) == 1.0  # the old road: one document fills whole batches
    batches, after = top_shares(cfg)
    # (means over 60 batches of 16 rows: 0.82 of a batch from its top document before, 0.13 after)
    assert np.mean([s for _, s in before]) > 0.5
    assert max(s for _, s in after) <= 1 / 3 and np.mean([s for _, s in after]) < 0.2, after
    assert np.mean([n for n, _ in after]) > 2 * np.mean([n for n, _ in before])
    # masking across the cuts: every segment is text of its own document, and only a
    # document's first piece starts with BOS (the last one ends with EOS)
    src = open_source(cfg.data.sources[0])[0]
    tok = Tokenizer(tokenizer.path)
    for b in batches[:10]:
        for r in range(len(b["inputs"])):
            seg, ids = b["segment_ids"][r], b["inputs"][r]
            for s in set(seg[seg > 0].tolist()):
                doc = int(b["doc_ids"][r][s - 1]) - 1
                part = ids[seg == s]
                assert (part[1:] != BOS_ID).all() and (part[:-1] != EOS_ID).all()
                text = tok.decode([t for t in part if t not in (BOS_ID, EOS_ID)])
                assert text.strip() in src[doc].text
                # no prediction crosses a segment boundary
                ends = np.flatnonzero(seg[:-1] != seg[1:])
                assert (b["loss_mask"][r][ends] == 0).all()


def test_tail_split_holds_out_the_last_bytes(tmp_path):
    text = "".join(f"Speaker {i}:\nline {i} of the play.\n\n" for i in range(200))
    (tmp_path / "play.txt").write_text(text)
    cut = int(len(text) * 0.9)
    for doc_per in ("file", "block"):
        train, val = open_source(SourceConfig(name="p", kind="text", paths=(str(tmp_path / "play.txt"),),
                                              doc_per=doc_per, heldout_split="tail", heldout_fraction=0.1))
        train_text = "".join(train[i].text for i in range(len(train)))
        val_text = "".join(val[i].text for i in range(len(val)))
        if doc_per == "file":
            assert (len(train), len(val)) == (1, 1)
            assert train_text == text[:cut] and val_text == text[cut:]  # nanoGPT's split, exactly
        else:  # blocks (blank lines are not text): the one that straddles the cut is cut
            assert train_text + val_text == text.replace("\n\n", "\n")
            assert val_text == text[cut:].replace("\n\n", "\n") and len(val) == text[cut:].count("\n\n")
            assert "Speaker 199" in val_text and "Speaker 199" not in train_text
    with pytest.raises(DataError, match="kind 'text'"):
        open_source(SourceConfig(name="j", kind="jsonl", paths=(str(tmp_path / "play.txt"),),
                                 heldout_split="tail"))
