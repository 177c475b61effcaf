"""Task files (data_pipeline/tasks.py) are user input: bad lines are counted and skipped
with one warning naming file:line and why; a file with nothing usable is one UserError
line naming the file and what a record must look like; blank lines are skipped."""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import json
import os

import pytest

from data_pipeline import tasks
from data_pipeline.config import SHARED_DATA
from data_pipeline.errors import NotFound, UserError

GOOD = {"question": "Tom has 3 apples and buys 4. How many now?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"}


def _line(obj) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def _gsm8k_dir(tmp_path, train: bytes, test: bytes | None = None):
    d = tmp_path / "gsm8k"
    d.mkdir(exist_ok=True)
    (d / "train.jsonl").write_bytes(train)
    (d / "test.jsonl").write_bytes(_line(GOOD) * 2 if test is None else test)
    return str(tmp_path)


def _one_line_user_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, UserError)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


# ---------------------------------------------------------------------------------------
# GSM8K (RL training and `lm eval --tasks gsm8k`)


def test_gsm8k_good_file_with_blank_lines_loads_silently(tmp_path, capsys):
    d = _gsm8k_dir(tmp_path, b"\n" + _line(GOOD) + b"   \n\n" + _line({**GOOD, "answer": "x\n#### 1,234"}) + b"\n")
    warnings = []
    train, test = tasks.gsm8k(d, log=warnings.append)
    assert [p["answer"] for p in train] == ["7", "1234"] and len(test) == 2
    assert train[0]["messages"] == [{"role": "user", "content": GOOD["question"]}]
    assert train[0]["solution"] == GOOD["answer"]
    assert train[1]["where"].endswith(os.path.join("gsm8k", "train.jsonl") + ":5")
    assert warnings == [] and capsys.readouterr().err == ""


@pytest.mark.parametrize("name", ["train.jsonl", "test.jsonl"])
def test_gsm8k_empty_file_is_one_line_error(tmp_path, name):
    d = _gsm8k_dir(tmp_path, b"" if name == "train.jsonl" else _line(GOOD), b"" if name == "test.jsonl" else None)
    with pytest.raises(UserError) as e:
        tasks.gsm8k(d)
    _one_line_user_error(e, os.path.join("gsm8k", name), "no usable record", "the file is empty", '"question"',
                         '"answer"', "####")


def test_gsm8k_blank_lines_only_is_one_line_error(tmp_path):
    with pytest.raises(UserError) as e:
        tasks.gsm8k(_gsm8k_dir(tmp_path, b"\n  \n\n"))
    _one_line_user_error(e, "train.jsonl", "all 3 lines are blank", '"question"')


BAD_LINES = [  # (line bytes, the reason named)
    (b"{not json\n", "malformed JSON"),
    (_line({"q": "a", "a": "b"}), "missing field 'question'"),
    (_line({"question": 3, "answer": "#### 3"}), "field 'question' is int, not a string"),
    (_line({"question": "q", "answer": 7}), "field 'answer' is int, not a string"),
    (b'{"question": "caf\xe9?", "answer": "#### 1"}\n', "invalid UTF-8"),
    (_line(["question", "answer"]), "record is list, not an object"),
    (_line({"question": "q", "answer": "no final answer"}), "no final '#### <number>'"),
    (_line({"question": " ", "answer": "#### 1"}), "field 'question' is empty"),
]


@pytest.mark.parametrize("bad,why", BAD_LINES)
def test_gsm8k_bad_line_is_counted_skipped_and_named(tmp_path, bad, why):
    d = _gsm8k_dir(tmp_path, _line(GOOD) + b"\n" + bad + _line(GOOD))
    warnings = []
    train, test = tasks.gsm8k(d, log=warnings.append)
    assert len(train) == 2 and len(test) == 2  # nothing else lost
    assert len(warnings) == 1 and "\n" not in warnings[0]
    w = warnings[0]
    assert "1 bad record(s) skipped" in w and f"{os.path.join(d, 'gsm8k', 'train.jsonl')}:3: " in w and why in w, w


@pytest.mark.parametrize("bad,why", BAD_LINES)
def test_gsm8k_file_of_only_bad_lines_is_one_line_error(tmp_path, bad, why):
    with pytest.raises(UserError) as e:
        tasks.gsm8k(_gsm8k_dir(tmp_path, bad + b"\n" + bad))
    _one_line_user_error(e, os.path.join(tmp_path, "gsm8k", "train.jsonl") + ": no usable record",
                         "2 bad record(s)", why, '"question"')


def test_gsm8k_warning_counts_all_names_first_few_and_goes_to_stderr(tmp_path, capsys):
    lines = [_line(GOOD)] + [b"{oops\n"] * 8 + [_line({"question": 1, "answer": "#### 1"})] * 2 + [_line(GOOD)]
    train, _ = tasks.gsm8k(_gsm8k_dir(tmp_path, b"".join(lines)))
    assert len(train) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ")
    assert "10 bad record(s) skipped" in err and "malformed JSON: 8" in err and "is int, not a string: 2" in err
    assert "train.jsonl:2:" in err and "train.jsonl:6:" in err and "train.jsonl:7:" not in err  # the first 5


def test_gsm8k_missing_file_is_not_found(tmp_path):
    with pytest.raises(NotFound) as e:
        tasks.gsm8k(str(tmp_path))
    assert isinstance(e.value, FileNotFoundError)
    _one_line_user_error(e, os.path.join(str(tmp_path), "gsm8k", "train.jsonl"), "not found", "rl.task='arith'")


def test_rl_problems_with_a_bad_gsm8k_file_is_a_user_error(tmp_path, monkeypatch):
    """The RL stages (GRPO, PPO) read gsm8k through lm.stages.grpo.problems()."""
    from lm.config import Config
    from lm.stages.common import problems

    d = _gsm8k_dir(tmp_path, _line(GOOD), b"")
    monkeypatch.setattr(tasks.gsm8k, "__defaults__", (d, None))
    cfg = Config()
    cfg = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, task="gsm8k"))
    with pytest.raises(UserError) as e:
        problems(cfg)
    _one_line_user_error(e, "test.jsonl", "no usable record")


def test_gsm8k_eval_items_skip_bad_lines(tmp_path):
    d = _gsm8k_dir(tmp_path, b"{bad\n" + _line(GOOD), b"\n" + _line(GOOD) + _line({"question": "x"}))
    warnings = []
    items = tasks.load_generation_task("gsm8k", d, log=warnings.append)
    assert len(items) == 1 and items[0]["reference"] == GOOD["answer"]
    assert items[0]["prompt"].startswith(f"Question: {GOOD['question']}\nAnswer: {GOOD['answer']}\n\nQuestion:")
    assert len(warnings) == 2 and "train.jsonl:1: malformed JSON" in warnings[0]
    assert "test.jsonl:3: missing field 'answer'" in warnings[1]
    with pytest.raises(UserError) as e:
        tasks.load_generation_task("gsm8k", _gsm8k_dir(tmp_path, _line(GOOD), b""))
    _one_line_user_error(e, "test.jsonl", "no usable record", "the file is empty")


# ---------------------------------------------------------------------------------------
# Multiple-choice and other `lm eval` task files


def _write(tmp_path, rel: str, data: bytes) -> str:
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(tmp_path)


ARC = {"query": "Question: Which is a gas?", "choices": ["rock", "steam", "ice"], "gold": 1}


@pytest.mark.parametrize("task,rel", [("piqa", "piqa/piqa.jsonl"), ("arc_easy", "arc/arc_easy.jsonl")])
def test_multiple_choice_bad_lines_are_skipped(tmp_path, task, rel):
    bad = [b"{nope\n", _line({**ARC, "gold": 3}), _line({**ARC, "choices": "rock"}), _line({**ARC, "gold": "x"}),
           _line({"question": "q", "choices": ["a", "b"], "gold": 0}),
           b'{"query": "\xff", "choices": [], "gold": 0}\n',
           _line({**ARC, "choices": ["a", 2]}), _line({**ARC, "gold": True})]
    d = _write(tmp_path, rel, _line(ARC) + b"\n" + b"".join(bad) + _line({**ARC, "gold": "2"}))
    warnings = []
    items = tasks.load_task(task, d, log=warnings.append)
    assert [it["gold"] for it in items] == [1, 2]
    assert items[0] == {"contexts": ["Question: Which is a gas?\nAnswer:"],
                        "continuations": [" rock", " steam", " ice"], "choices": ["rock", "steam", "ice"], "gold": 1}
    assert len(warnings) == 1 and "\n" not in warnings[0]
    w = warnings[0]
    assert "8 bad record(s) skipped" in w and f"{os.path.join(d, rel)}:3: malformed JSON" in w
    assert ":4: field 'gold' is 3, not a choice index 0..2" in w and ":5: field 'choices' is str, not a list" in w
    assert ":6: field 'gold' is str, not an integer" in w and ":7: missing field 'query'" in w


def test_multiple_choice_file_with_nothing_usable(tmp_path):
    d = _write(tmp_path, "piqa/piqa.jsonl", b"")
    with pytest.raises(UserError) as e:
        tasks.load_task("piqa", d)
    _one_line_user_error(e, os.path.join(d, "piqa", "piqa.jsonl"), "the file is empty", '"query"', '"choices"',
                         '"gold"')
    d = _write(tmp_path, "winogrande/winogrande.jsonl", _line({"context_options": ["a", "b"], "continuation": "c",
                                                                "gold": 2}) + b"\n")
    with pytest.raises(UserError) as e:
        tasks.load_task("winogrande", d)
    _one_line_user_error(e, "winogrande.jsonl: no usable record", "winogrande.jsonl:1: field 'gold' is 2",
                         '"context_options"')
    with pytest.raises(NotFound) as e:
        tasks.load_task("arc_challenge", d)
    _one_line_user_error(e, "arc_challenge.jsonl not found", "--data-dir")


def test_lambada_bad_lines(tmp_path):
    d = _write(tmp_path, "lambada_openai/lambada_openai.jsonl",
               _line({"context": "The cat sat on the", "continuation": "mat"})
               + _line({"context": "x", "continuation": ""})
               + _line({"text": "no fields"}))
    warnings = []
    items = tasks.load_task("lambada", d, log=warnings.append)
    assert items == [{"contexts": ["The cat sat on the"], "continuations": [" mat"], "choices": ["mat"], "gold": 0}]
    assert "2 bad record(s)" in warnings[0] and ":2: field 'continuation' is empty" in warnings[0]


def _hellaswag(tmp_path, lines: list[bytes]) -> str:
    return _write(tmp_path, "hellaswag/hellaswag_val_full.txt.bz2", bz2.compress(b"\n".join(lines) + b"\n"))


def test_hellaswag_bad_items_are_skipped_and_misalignment_is_an_error(tmp_path):
    good = [b"A man is cooking.", b"2", b"he sings", b"he flies", b"he stirs the pot", b"he sleeps"]
    bad_gold = [good[0], b"7"] + good[2:]
    bad_utf8 = good[:3] + [b"caf\xe9"] + good[4:]
    warnings = []
    items = tasks.load_task("hellaswag", _hellaswag(tmp_path, good + bad_gold + bad_utf8 + good), log=warnings.append)
    assert len(items) == 2 and items[0]["gold"] == 2 and items[0]["continuations"][2] == " he stirs the pot"
    path = os.path.join(tmp_path, "hellaswag", "hellaswag_val_full.txt.bz2")
    assert len(warnings) == 1 and f"{path}:8: the gold label '7' is not an index 0-3" in warnings[0]
    assert f"{path}:16: invalid UTF-8" in warnings[0]
    with pytest.raises(UserError) as e:
        tasks.load_task("hellaswag", _hellaswag(tmp_path, good + good[:5]))
    _one_line_user_error(e, path, "11 lines, not a multiple of 6", "the index 0-3 of the right ending")
    with pytest.raises(UserError) as e:
        tasks.load_task("hellaswag", _write(tmp_path, "hellaswag/hellaswag_val_full.txt.bz2", b"not bzip2"))
    _one_line_user_error(e, path, "unreadable")


def test_translation_pairs_must_align(tmp_path):
    base = "multi30k/test_2016_flickr"
    _write(tmp_path, f"{base}.en.gz", gzip.compress(b"A dog runs.\n\nA cat.\n\xffbad\nTwo men.\n"))
    d = _write(tmp_path, f"{base}.de.gz", gzip.compress(b"Ein Hund rennt.\n\n\nschlecht\nZwei Maenner.\n"))
    warnings = []
    items = tasks.load_generation_task("multi30k_en_de", d, log=warnings.append)
    assert [it["reference"] for it in items] == ["Ein Hund rennt.", "Zwei Maenner."]
    assert items[0]["prompt"] == "English: A dog runs.\nGerman:"
    assert "2 bad record(s)" in warnings[0] and "de.gz:3: empty reference line" in warnings[0]
    assert "en.gz:4: invalid UTF-8" in warnings[0]
    _write(tmp_path, f"{base}.de.gz", gzip.compress(b"Ein Hund rennt.\n"))
    with pytest.raises(UserError) as e:
        tasks.load_generation_task("multi30k_en_de", d)
    _one_line_user_error(e, "has 5 lines but", "has 1", "aligned line by line")


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="optional: needs ../shared/data")
def test_shared_task_files_give_lm_evaluates_items():
    from lm.eval import evaluate

    for task in ("arc_easy", "piqa", "winogrande"):
        assert tasks.load_task(task, SHARED_DATA, log=pytest.fail) == evaluate.load_task(task, SHARED_DATA)
    assert (tasks.load_generation_task("gsm8k", SHARED_DATA, log=pytest.fail)
            == evaluate.load_generation_task("gsm8k", SHARED_DATA))


def test_lm_eval_loaders_report_bad_task_files(tmp_path):
    from lm.eval import evaluate

    d = _gsm8k_dir(tmp_path, _line(GOOD), b"")
    with pytest.raises(UserError):
        evaluate.load_generation_task("gsm8k", d)
    with pytest.raises(UserError):
        evaluate.load_task("piqa", _write(tmp_path, "piqa/piqa.jsonl", b"{bad\n"))


# ---------------------------------------------------------------------------------------
# RL prompts longer than the context


def test_drop_long_prompts_counts_and_names_them():
    probs = [{"messages": [], "where": f"f.jsonl:{i + 1}", "n": n} for i, n in enumerate([10, 300, 20, 2000])]
    warnings = []
    kept = tasks.drop_long_prompts(probs, lambda p: p["n"], 128, "rl.task=gsm8k training", warnings.append)
    assert [p["n"] for p in kept] == [10, 20]
    assert warnings == ["rl.task=gsm8k training: 2 of 4 prompt(s) longer than 128 tokens (model.max_seq_len - "
                        "rl.max_new) dropped; first: f.jsonl:2 (300 tokens); f.jsonl:4 (2000 tokens)"]
    assert tasks.drop_long_prompts(probs[:1], lambda p: p["n"], 128, "x", pytest.fail) == probs[:1]
    with pytest.raises(UserError) as e:
        tasks.drop_long_prompts(probs[1:2], lambda p: p["n"], 128, "rl.task=gsm8k held-out")
    _one_line_user_error(e, "all 1 prompts are longer than 128 tokens", "f.jsonl:2 (300 tokens)", "max_seq_len")


def test_rl_problems_drop_prompts_the_context_cannot_hold(tmp_path, monkeypatch):
    """A GSM8K question longer than model.max_seq_len - rl.max_new is dropped with a warning
    naming it, not truncated or decoded past the context; none fitting is a one-line error."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from helpers import corpus_tokenizer

    from lm.config import Config
    from lm.stages.common import problems

    long_q = dict(GOOD, question="How many apples? " * 200)
    d = _gsm8k_dir(tmp_path, _line(GOOD) + _line(long_q), _line(GOOD) + _line(long_q))
    monkeypatch.setattr(tasks.gsm8k, "__defaults__", (d, None))
    tok = corpus_tokenizer(tmp_path, 512)
    cfg = Config()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_seq_len=256),
                              rl=dataclasses.replace(cfg.rl, task="gsm8k", max_new=64))
    warnings = []
    train, test = problems(cfg, tok, warnings.append)
    assert len(train) == 1 and len(test) == 1 and train[0]["messages"][-1]["content"].startswith("Tom")
    assert len(warnings) == 2 and all("longer than 192 tokens" in w and "train.jsonl:2" in w or "test.jsonl:2" in w
                                      for w in warnings)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_seq_len=72))
    with pytest.raises(UserError) as e:
        problems(cfg, tok, warnings.append)
    assert "\n" not in str(e.value) and "longer than" in str(e.value)
