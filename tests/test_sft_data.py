"""SFT data: conversation layouts, bad records, packing with a loss mask, truncation, resume."""

import dataclasses
import gzip
import json
import os
import threading
import time

import numpy as np
import pytest
import sentencepiece as spm

from data_pipeline import chat, default_corpus
from data_pipeline.chat_data import ChatStats, RenderChat, chat_data, chat_rows, fit_conversation
from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.conversations import ConversationSource, open_chat_source, to_messages
from data_pipeline.sources import DataError, Record
from data_pipeline.tokenizer import Tokenizer, train_tokenizer

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data")
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data is absent")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A real SentencePiece tokenizer (with the chat control tokens) on default-corpus prose."""
    return train_tokenizer(prose(), 512, str(tmp_path_factory.mktemp("tok") / "sp"))


def prose():
    """The default corpus's documentation topics (~0.5 MB of English, read in a blink)."""
    train, _ = default_corpus.split(0.02)
    return [d.text() for d in train if d.key.startswith("doc:topic:")]


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


def S(c):
    return {"role": "system", "content": c}


def conversation(i, turns=2, words=6):
    """A distinct multi-turn conversation in the messages layout."""
    msgs = []
    for t in range(turns):
        msgs += [U(f"question {i}.{t} about " + "the cat " * words), A(f"answer {i}.{t}: " + "a dog " * words)]
    return {"messages": msgs}


def chat_config(path, **kw):
    src = dict(name="chat", kind="chat", paths=(str(path),), heldout_fraction=0.1)
    src.update(kw.pop("source", {}))
    return DataConfig(corpus="sources", sources=(SourceConfig(**src),),
                      **{**dict(seq_len=128, batch_size=4, shuffle_rows=8, prefetch=2, seed=0), **kw})


def open_chat(cfg, tok, tmp_path, **kw):
    kw = {"process_index": 0, "process_count": 1, **kw}
    return chat_data(cfg, str(tmp_path / "run"), tokenizer=tok, eval_batches=2, log=lambda *a: None, **kw)


# ---------------------------------------------------------------------------------------
# Layouts


def test_each_layout_and_auto_detection():
    alpaca = {"instruction": "Add.", "input": "2 + 2", "output": "4", "system": "Be brief.",
              "history": [["Hi", "Hello!"]]}
    want = [S("Be brief."), U("Hi"), A("Hello!"), U("Add.\n\n2 + 2"), A("4")]
    assert to_messages(alpaca, "alpaca") == want
    assert to_messages({"instruction": "Say hi.", "input": "", "output": "hi"}, "alpaca") == [U("Say hi."), A("hi")]
    seed = {"instruction": "Antonym?",
            "instances": [{"input": "hot", "output": "cold"}, {"input": "x", "output": "y"}]}
    assert to_messages(seed) == [U("Antonym?\n\nhot"), A("cold")]  # the first instance

    msgs = {"messages": [S("sys"), U("q"), A("a"), U("q2"), A("a2")]}
    assert to_messages(msgs, "messages") == msgs["messages"]
    share = {"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "q"},
                               {"from": "gpt", "value": "a"}, {"from": "user", "value": "q2"},
                               {"from": "chatgpt", "value": "a2"}]}
    assert to_messages(share, "sharegpt") == msgs["messages"]
    lima = {"conversations": ["q", "a", "q2", "a2"]}
    assert to_messages(lima, "lima") == [U("q"), A("a"), U("q2"), A("a2")]
    for record, fmt in [(alpaca, "alpaca"), (msgs, "messages"), (share, "sharegpt"), (lima, "lima")]:
        assert to_messages(record) == to_messages(record, fmt)
    # a system prompt for conversations without one; a trailing unanswered user turn is left out
    assert to_messages(lima, system_prompt="You help.")[0] == S("You help.")
    assert to_messages(msgs, system_prompt="You help.")[0] == S("sys")
    assert to_messages({"messages": [U("q"), A("a"), U("unanswered")]}) == [U("q"), A("a")]


@pytest.mark.parametrize("record, reason", [
    ({"instruction": "no output"}, "missing field 'output'"),
    ({"instruction": "x", "output": 42}, "field 'output' is int, not a string"),
    ({"instruction": "x", "output": "  "}, "empty assistant reply"),
    ({"messages": [A("a"), U("q"), A("b")]}, "has role 'assistant' where 'user' was expected"),
    ({"messages": [U("q")]}, "no assistant turn"),
    ({"messages": [{"role": "bot", "content": "a"}]}, "unknown role 'bot'"),
    ({"conversations": [{"from": "alien", "value": "q"}]}, "unknown speaker 'alien'"),
    ({"messages": "hello"}, "field 'messages' is str, not a list"),
    ({"text": "plain"}, "unknown conversation layout"),
    (["not", "an", "object"], "record is list"),
])
def test_invalid_records_raise_with_a_reason(record, reason):
    with pytest.raises(ValueError, match=reason):
        to_messages(record)


def test_source_counts_bad_records_with_reasons(tmp_path, tok):
    good = [conversation(i) for i in range(6)]
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        good[0], {"instruction": "no output"}, good[1], {"instruction": "x", "output": 42}, good[2],
        '{"messages": [unterminated', good[3], {"messages": [A("a"), U("q"), A("b")]}, good[4], "", good[5]])
    src = ConversationSource([path])
    recs = [src[i] for i in range(len(src))]
    assert len(recs) == 10  # the blank line is no record
    assert [json.loads(r.text) for r in recs if r.text] == [g["messages"] for g in good]
    bad = {r.where.rsplit(":", 1)[1]: r.error for r in recs if r.text is None}
    assert bad.keys() == {"2", "4", "6", "8"}
    assert bad["2"] == "missing field 'output'" and "not a string" in bad["4"]
    assert bad["6"].startswith("malformed JSON") and "where 'user' was expected" in bad["8"]

    # through the pipeline: counted per reason, the good ones arrive
    stats = ChatStats(["s"])
    render = RenderChat(tok.path, 1000, "truncate", "s", stats, strict=False)
    out = [render.map(r) for r in recs]
    assert sum(len(o["tokens"]) > 0 for o in out) == 6 and stats.bad["s"] == 4
    assert set(stats.reasons["s"]) == {"missing field 'output'", "field 'output' is int, not a string",
                                       "malformed JSON", "message 0 has role 'assistant' where 'user' was expected"}
    with pytest.raises(DataError, match="strict"):
        RenderChat(tok.path, 1000, "truncate", "s", None, strict=True).map(recs[1])


def test_json_arrays_compressed_files_and_hash_split(tmp_path):
    convs = [conversation(i) for i in range(40)]
    with open(tmp_path / "a.json", "w") as f:
        json.dump(convs[:20], f)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(c) for c in convs[20:]))
    cfg = SourceConfig(name="x", kind="chat", paths=(str(tmp_path / "*.json*"),), heldout_fraction=0.2)
    train, held = open_chat_source(cfg)
    assert len(train) + len(held) == 40 and 0 < len(held) < 20
    got = sorted(r.text for s in (train, held) for r in (s[i] for i in range(len(s))))
    assert got == sorted(json.dumps(c["messages"]) for c in convs)
    with pytest.raises(DataError, match="kind to 'chat'"):
        open_chat_source(dataclasses.replace(cfg, kind="jsonl"))


@needs_shared
@pytest.mark.parametrize("rel, n", [("alpaca-demo/alpaca_en_demo.json", 999), ("lima/lima.json", 1029),
                                    ("alpaca-seed-tasks/seed_tasks.jsonl", 175)])
def test_real_instruction_files_parse(rel, n, tok):
    src = ConversationSource([os.path.join(SHARED, rel)])
    recs = [src[i] for i in range(len(src))]
    assert len(recs) == n
    assert sum(r.text is None for r in recs) <= n // 100, [r.error for r in recs if r.text is None][:3]
    multi = [m for m in (json.loads(r.text) for r in recs if r.text) if len(m) > 2]
    if rel.startswith("lima"):
        assert len(multi) == 29  # the records with a history
    ids, mask = chat.render(tok, json.loads(recs[0].text))
    assert ids[0] == tok.bos_id and 0 < sum(mask) < len(ids)


# ---------------------------------------------------------------------------------------
# Packing and the loss mask


def check_rows(batch, rendered, seq_len):
    """Each row's segments are whole conversations; the loss is exactly on their replies.

    rendered: (ids, mask, reply tokens) per conversation, the reply tokens being each
    assistant content encoded on its own, followed by <|end|>.
    """
    by_ids = {tuple(ids): (mask, replies) for ids, mask, replies in rendered}
    # a conversation ending the row has its last token only among the targets
    by_prefix = {tuple(ids[:-1]): (ids, mask, replies) for ids, mask, replies in rendered}
    segs_per_row = []
    for r in range(len(batch["inputs"])):
        keys = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
        inp, tgt, seg, pos, loss = (batch[k][r] for k in keys)
        assert inp.shape == (seq_len,) and loss.dtype == np.float32
        assert np.array_equal(tgt[:-1], inp[1:])
        assert not loss[seg == 0].any()  # padding
        ids_seen = [s for s in np.unique(seg) if s]
        segs_per_row.append(len(ids_seen))
        for s in ids_seen:
            where = np.flatnonzero(seg == s)
            assert np.array_equal(where, np.arange(where[0], where[0] + len(where)))  # contiguous
            assert np.array_equal(pos[where], np.arange(len(where)))  # positions restart per conversation
            key = tuple(inp[where].tolist())
            if key in by_ids:  # the whole conversation is in the inputs
                ids, (mask, replies) = list(key), by_ids[key]
            else:  # it ends the row: its last token is the last target
                assert key in by_prefix, "a segment is not a whole conversation (split across rows?)"
                ids, mask, replies = by_prefix[key]
                assert where[-1] == seq_len - 1 and tgt[-1] == ids[-1]
            # loss on target j+1 iff it is a reply token or a reply's <|end|>; never on the
            # target after the conversation (the next one's BOS or padding)
            want = np.append(np.asarray(mask[1:], np.float32), 0.0)[: len(where)]
            assert np.array_equal(loss[where], want)
            assert tgt[where][loss[where] > 0].tolist() == replies
    return segs_per_row


def test_packing_keeps_conversations_whole_with_loss_on_replies(tmp_path, tok):
    rng = np.random.default_rng(0)
    convs = [conversation(i, turns=int(rng.integers(1, 4)), words=int(rng.integers(1, 6))) for i in range(60)]
    path = write_jsonl(tmp_path / "c.jsonl", convs)
    end = chat.chat_token_ids(tok)["end"]
    rendered = [(*chat.render(tok, c["messages"]),
                 [t for m in c["messages"] if m["role"] == "assistant" for t in tok.encode(m["content"]) + [end]])
                for c in convs]
    assert max(len(ids) for ids, _, _ in rendered) <= 257 < sum(len(ids) for ids, _, _ in rendered[:8])
    data = open_chat(chat_config(path, seq_len=256), tok, tmp_path)
    assert data.names == ["chat"] and data.weights == [1.0] and data.local_batch == 4 and data.num_shards == 1
    segs = []
    for _ in range(8):
        b = data.next_train()
        assert set(b) == {"inputs", "targets", "segment_ids", "positions", "loss_mask", "source_id"}
        assert b["inputs"].dtype == np.int32 and b["source_id"].dtype == np.int32
        segs += check_rows(b, rendered, 256)
    assert max(segs) >= 3 and min(segs) >= 1  # several conversations per row
    assert data.stats.total() == 0 and not any(data.stats.truncated.values())
    assert data.heldout["chat"] and all(b["inputs"].shape == (4, 256) for b in data.heldout["chat"])
    for b in data.heldout["chat"]:
        check_rows(b, rendered, 256)
    assert data.heldout_bytes["chat"] > 0


def test_truncation_on_a_turn_boundary_and_drop_are_counted(tmp_path, tok):
    long3 = conversation(0, turns=3, words=12)["messages"]
    lens = [len(chat.render(tok, long3[: 2 * k])[0]) for k in (1, 2, 3)]
    max_len = (lens[1] + lens[2]) // 2  # two of the three exchanges fit
    ids, mask, kept = fit_conversation(tok, long3, max_len)
    assert kept == 2 and (ids, mask) == chat.render(tok, long3[:4])
    assert ids[-1] == chat.chat_token_ids(tok)["end"] and mask[-1] == 1  # ends with a whole reply
    assert fit_conversation(tok, long3, lens[2]) == (*chat.render(tok, long3), None)
    with pytest.raises(ValueError, match="longer than the row"):
        fit_conversation(tok, long3, max_len, long="drop")
    with pytest.raises(ValueError, match="longer than the row"):
        fit_conversation(tok, long3, lens[0] - 1)  # not even the first exchange fits

    # in the pipeline: short conversations, long ones cut, one whose first reply is too long
    convs = [conversation(i, turns=1, words=2) for i in range(1, 30)]
    convs += [{"messages": long3}, {"messages": [U("q"), A("long " * 400)]}]
    path = write_jsonl(tmp_path / "c.jsonl", convs)
    seq_len = max_len - 1
    for long, truncated, dropped in [("truncate", True, 1), ("drop", False, 2)]:
        cfg = chat_config(path, seq_len=seq_len, long_conversations=long, source={"heldout_fraction": 0.0})
        data = open_chat(cfg, tok, tmp_path)
        for _ in range(10):  # a few epochs
            b = data.next_train()
            assert b["inputs"].shape == (4, seq_len)
        assert (data.stats.truncated["chat"] > 0) == truncated
        assert data.stats.reasons["chat"].get("longer than the row", 0) >= dropped
        assert data.stats.reasons["chat"].keys() == {"longer than the row"}
        assert "longer than a row cut" in data.stats.report() or not truncated


def test_resume_from_state_is_bit_identical(tmp_path, tok):
    convs = [conversation(i, turns=1 + i % 3, words=1 + i % 5) for i in range(50)]
    p1 = write_jsonl(tmp_path / "a.jsonl", convs[:30])
    lima = [{"conversations": [m["content"] for m in c["messages"]]} for c in convs[30:]]
    p2 = write_jsonl(tmp_path / "b.jsonl", lima)
    cfg = DataConfig(corpus="sources", seq_len=96, batch_size=4, num_shards=2, shuffle_rows=4, prefetch=2, sources=(
        SourceConfig(name="a", kind="chat", paths=(p1,), weight=2.0),
        SourceConfig(name="b", kind="chat", paths=(p2,), chat_format="lima", weight=1.0)))
    data = open_chat(cfg, tok, tmp_path)
    for _ in range(5):
        data.next_train()
    state = json.loads(json.dumps(data.get_state()))  # as a checkpoint stores it
    want = [data.next_train() for _ in range(4)]
    again = open_chat(cfg, tok, tmp_path)
    again.set_state(state)
    for w in want:
        got = again.next_train()
        assert all(np.array_equal(got[k], w[k]) for k in w)
    assert set(np.concatenate([w["source_id"] for w in want]).tolist()) == {0, 1}


def test_two_processes_give_the_global_batches_of_one(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [conversation(i, turns=1 + i % 2, words=1 + i % 4) for i in range(40)])
    cfg = chat_config(path, seq_len=96, num_shards=2, prefetch=0)
    one = open_chat(cfg, tok, tmp_path)
    procs = [open_chat(cfg, tok, tmp_path, process_index=p, process_count=2) for p in (0, 1)]
    assert procs[0].local_batch == 2
    for _ in range(3):
        whole, parts = one.next_train(), [p.next_train() for p in procs]
        for k in whole:
            assert np.array_equal(whole[k], np.concatenate([q[k] for q in parts]))
    for k in one.heldout["chat"][0]:
        assert np.array_equal(one.heldout["chat"][0][k], np.concatenate([p.heldout["chat"][0][k] for p in procs]))


# ---------------------------------------------------------------------------------------
# Failing fast and clearly


def run_with_timeout(fn, seconds=30):
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 -- handed to the test
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    start = time.time()
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds}s (hangs?)"
    return out, time.time() - start


def test_source_with_no_usable_record_fails_fast(tmp_path, tok):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": f"q{i}"} for i in range(200)] + ["{oops"])
    good = write_jsonl(tmp_path / "good.jsonl", [conversation(i) for i in range(20)])
    cfg = DataConfig(corpus="sources", seq_len=128, batch_size=4, sources=(
        SourceConfig(name="good", kind="chat", paths=(good,)),
        SourceConfig(name="broken", kind="chat", paths=(bad,))))
    out, took = run_with_timeout(lambda: open_chat(cfg, tok, tmp_path))
    assert isinstance(out.get("error"), DataError) and took < 30
    msg = str(out["error"])
    assert "'broken'" in msg and "missing field 'output'" in msg and "chat_format" in msg

    # the guard inside the stream (records that go bad after the up-front check): an error, not a hang
    recs = [Record(None, f"f:{i}", "missing field 'output'") for i in range(10)]
    out, _ = run_with_timeout(lambda: next(iter(chat_rows(recs, tok.path, 64, source="s", stats=ChatStats(["s"])))))
    assert isinstance(out.get("error"), DataError) and "in a row were unusable" in str(out["error"])


def test_wrong_kind_and_old_tokenizer_fail_in_one_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [conversation(i) for i in range(10)])
    with pytest.raises(DataError, match="kind to 'chat'"):
        open_chat(chat_config(path, source={"kind": "jsonl"}), tok, tmp_path)
    # a tokenizer trained before the chat role tokens existed
    with open(tmp_path / "corpus.txt", "w") as f:
        f.write("\n".join(prose())[:60_000])
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "old"),
                                   vocab_size=400, byte_fallback=True, minloglevel=2)
    old = Tokenizer(str(tmp_path / "old.model"))
    with pytest.raises(DataError) as e:
        open_chat(chat_config(path), old, tmp_path)
    assert "\n" not in str(e.value) and "chat role tokens" in str(e.value)
