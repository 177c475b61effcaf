"""`lm data curate` (data_pipeline/curate.py, curate_steps.py): each step on small synthetic and
real-looking inputs, the report's arithmetic, bad inputs counted not fatal, resume from
datatrove's completion markers, the output read by the training data sources, one-line errors."""

import dataclasses
import gzip
import io
import json
import os
import random
import sys

import numpy as np
import pytest

pytest.importorskip("datatrove")
pytest.importorskip("py3langid")

from data_pipeline import curate as C  # noqa: E402
from data_pipeline.config import SHARED_DATA, SourceConfig  # noqa: E402
from data_pipeline.errors import UserError  # noqa: E402
from data_pipeline.sources import open_source  # noqa: E402

WORDS = ("the of and to in that have with river mountain city people history music science water forest ancient "
         "modern village market school garden bridge winter summer harbour valley library painter farmer road "
         "train island castle festival").split()


def english(seed: int, sentences: int = 12) -> str:
    """Prose that passes every quality rule: lines of three sentences, random words."""
    r = random.Random(seed)
    sents = [" ".join(r.choice(WORDS) for _ in range(r.randint(9, 16))).capitalize() + "." for _ in range(sentences)]
    return "\n".join(" ".join(sents[i:i + 3]) for i in range(0, sentences, 3))


GERMAN = ("Der kleine Hund läuft jeden Morgen mit seiner Besitzerin durch den Park. Danach trinken sie zusammen "
          "Kaffee in der Bäckerei am Markt. Die Sonne scheint, und die Kinder spielen auf der Wiese.\n") * 4
SPAM = "\n".join(["Click here to get the best deals of the week on cheap watches and bags", "Add to cart",
                  "Free shipping on all orders over 50 dollars", "Home | Shop | Contact | Login"] * 8)
GSM_Q = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
         "How many clips did Natalia sell altogether in April and May?")
GSM_A = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
         "Natalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72")
HSWAG = ("Roof shingle removal: A man is sitting on a roof. he starts pulling up roofing on a roof and throws the "
         "old shingles into a large bin below")


def recase(text: str) -> str:
    """Every seventh word in capitals, runs of spaces: the same text after normalising."""
    return "  ".join(w.upper() if i % 7 == 0 else w for i, w in enumerate(text.split(" ")))


def near_copy(text: str) -> str:
    """A few words changed, whitespace and case changed."""
    words = text.split(" ")
    for i in (5, 40, 90):
        words[i] = "zebra"
    return recase(" ".join(words))


def _warc(path, pages, truncate=False, gz=False):
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    buf = io.BytesIO()
    w = WARCWriter(buf, gzip=gz)
    for i, html in enumerate(pages):
        h = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.0")
        w.write_record(w.create_warc_record(f"http://example.com/{i}", "response", payload=io.BytesIO(html.encode()),
                                            http_headers=h))
    data = buf.getvalue()
    path.write_bytes(data[:int(len(data) * 0.8)] if truncate else data)


def _page(body: str) -> str:
    nav = "".join(f"<li><a href='/{i}'>Menu {i}</a></li>" for i in range(8))
    paras = "".join(f"<p>{p}</p>" for p in body.split("\n"))
    return (f"<html><head><title>T</title><script>var x = 1;</script></head><body><nav><ul>{nav}</ul></nav>"
            f"<article><h1>A page</h1>{paras}</article><footer>Copyright 2024 | Privacy</footer></body></html>")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A planted corpus and its curation (run once for the module)."""
    d = tmp_path_factory.mktemp("curate")
    (d / "in").mkdir()
    uniques = [english(i) for i in range(40)]
    docs = [{"text": t, "id": f"u{i}"} for i, t in enumerate(uniques)]
    docs += [{"text": recase(uniques[1]), "id": "exact_of_u1"},  # exact after normalising
             {"text": uniques[2], "id": "exact_of_u2"},
             {"text": near_copy(uniques[3]), "id": "near_of_u3"},
             {"text": near_copy(uniques[4]), "id": "near_of_u4"},
             {"text": GERMAN, "id": "german"},
             {"text": SPAM, "id": "spam"},
             {"text": english(100) + "\n" + GSM_Q + " Then the story goes on.", "id": "has_gsm8k"},
             {"text": english(101) + "\n" + HSWAG + " quickly and carefully.", "id": "has_hellaswag"},
             {"text": english(102) + "\nWrite to jane.doe@example.net or ping 8.8.4.4 for help.", "id": "has_email"},
             {"text": "   ", "id": "empty"},
             {"text": ("All work and no play makes Jack a dull boy. " * 460_000), "id": "twenty_mb"}]
    lines = [json.dumps(x).encode() for x in docs]
    lines.insert(3, b'{"text": "bad \xff\xfe bytes", "id": "badutf8"}')
    lines.insert(5, b'{"text": "not json')
    (d / "in" / "web.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    good = gzip.compress(b"\n".join(json.dumps({"text": english(200 + i), "id": f"gz{i}"}).encode()
                                    for i in range(3)) + b"\n")
    (d / "in" / "cut.jsonl.gz").write_bytes(good[:len(good) * 2 // 3])  # a truncated gzip
    (d / "html").mkdir()
    (d / "html" / "page.html").write_text(_page(english(300)))
    _warc(d / "crawl.warc", [_page(english(400)), _page(english(401))], truncate=True)
    tasks = d / "eval.jsonl"
    tasks.write_text(json.dumps({"question": GSM_Q, "answer": GSM_A}) + "\n" + json.dumps({"ctx": HSWAG}) + "\n")
    cfg = C.CurateConfig(
        inputs=(C.CurateInput("web", "jsonl", (str(d / "in" / "*.jsonl*"),)),
                C.CurateInput("pages", "html", (str(d / "html" / "*.html"),)),
                C.CurateInput("crawl", "warc", (str(d / "crawl.warc"),))),
        output_dir=str(d / "out"), max_doc_chars=100_000, decontaminate_tasks=(),
        decontaminate_files=(str(tasks),), mask_pii=True, examples_per_reason=3)
    logs = []
    report = C.curate(cfg, log=logs.append)
    out = [json.loads(line) for f in report["written"]["shards"] for line in open(f, encoding="utf-8")]
    return {"cfg": cfg, "report": report, "out": out, "ids": {x["id"] for x in out}, "log": "\n".join(logs),
            "uniques": len(uniques)}


def _step(report, name):
    return next(s for s in report["steps"] if s["step"] == name)


def _removed(report, step, reason):
    return _step(report, step)["removed_by_reason"].get(reason, {}).get("docs", 0)


def test_planted_duplicates_language_spam_contamination(corpus):
    r, ids = corpus["report"], corpus["ids"]
    assert {"exact_of_u1", "exact_of_u2", "near_of_u3", "near_of_u4", "german", "spam", "has_gsm8k",
            "has_hellaswag", "empty", "twenty_mb"}.isdisjoint(ids)
    assert {f"u{i}" for i in range(corpus["uniques"])} <= ids  # no unique document lost
    assert _removed(r, "language", "language_de") == 1
    assert _removed(r, "exact_dedup", "exact_duplicate") == 2
    assert _removed(r, "near_dedup", "near_duplicate") == 2
    assert _removed(r, "decontaminate", "contaminated") == 2
    listed = {x["id"]: x["match"] for x in r["decontamination"]["removed"]}
    assert listed == {"has_gsm8k": "eval.jsonl:1", "has_hellaswag": "eval.jsonl:2"}
    assert r["near_dedup_jaccard_threshold"] == pytest.approx((1 / 14) ** (1 / 8), abs=1e-3)
    spam_step = [s["step"] for s in r["steps"] if any(e.get("id") == "spam" for e in _examples(corpus, s["step"]))]
    assert spam_step and spam_step[0] in ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality")


def _examples(corpus, step):
    path = os.path.join(corpus["cfg"].output_dir, "removed", f"{step}.jsonl")
    return [json.loads(x) for x in open(path, encoding="utf-8")] if os.path.exists(path) else []


def test_pii_masked_and_html_extracted(corpus):
    out = {x["id"]: x for x in corpus["out"]}
    text = out["has_email"]["text"]
    assert "jane.doe@example.net" not in text and "8.8.4.4" not in text and "@example." in text
    assert _step(corpus["report"], "pii")["docs_masked"] == 1
    page = out["pages/page.html"]["text"]
    assert "<" not in page and "Menu 3" not in page and "var x" not in page and len(page.split()) > 100
    assert out["pages/page.html"]["source"] == "pages"


def test_bad_inputs_are_counted(corpus):
    web, crawl = corpus["report"]["inputs"]["web"], corpus["report"]["inputs"]["crawl"]
    assert web["bad"] == {"invalid_utf8": 1, "malformed_json": 1, "empty_document": 1, "truncated_file": 1}
    assert web["cut_docs"] == 1 and web["cut_chars"] == len("All work and no play makes Jack a dull boy. ") * 460_000 \
        - 100_000
    assert any("web.jsonl:4: invalid_utf8" in e for e in web["bad_examples"])
    assert crawl["docs"] == 1 and crawl["bad"] == {"truncated_record": 1}
    assert corpus["report"]["read"]["bad_records"] == 5


def test_report_adds_up(corpus):
    r = corpus["report"]
    steps = r["steps"]
    assert r["read"]["docs"] == sum(i["docs"] for i in r["inputs"].values())
    ext = _step(r, "extract")
    assert ext["docs_in"] == r["inputs"]["pages"]["docs"] + r["inputs"]["crawl"]["docs"]
    assert steps[1]["docs_in"] == r["read"]["docs"] - ext["docs_removed"]
    for s in steps:
        by_reason = sum(v["docs"] for v in s["removed_by_reason"].values())
        assert s["docs_in"] - s["docs_out"] == s["docs_removed"] == by_reason
        if s["step"] not in ("c4_quality", "pii", "extract"):  # those also change the documents they keep
            assert s.get("chars_cut_from_kept", 0) == 0, s
        assert s["tokens_out_est"] == round(s["chars_out"] / 4)
    for a, b in zip(steps[1:], steps[2:]):
        assert b["docs_in"] == a["docs_out"]
    assert r["written"]["docs"] == steps[-1]["docs_out"] == len(corpus["out"])
    saved = json.load(open(os.path.join(corpus["cfg"].output_dir, "report.json")))
    assert saved["written"]["docs"] == r["written"]["docs"]
    assert "near_dedup" in corpus["log"] and "written" in corpus["log"] and "characters / 4" in corpus["log"]


def test_output_is_a_jsonl_source(corpus):
    src = SourceConfig(name="curated", kind="jsonl", paths=(os.path.join(corpus["cfg"].output_dir, "data", "*.jsonl"),),
                       heldout_fraction=0.0)
    train, _ = open_source(src)
    texts = [train[i].text for i in range(len(train))]
    assert len(texts) == corpus["report"]["written"]["docs"] and all(texts)


def test_resume_skips_finished_tasks(corpus):
    cfg = corpus["cfg"]
    again = C.curate(cfg, log=lambda _: None)
    assert all(t["skipped_done"] == t["tasks"] for t in again["stages"].values())
    assert again["written"] == corpus["report"]["written"] and again["steps"] == corpus["report"]["steps"]
    os.remove(os.path.join(cfg.output_dir, "work", "logs", "write", "completions", "00000"))
    third = C.curate(cfg, log=lambda _: None)
    assert third["stages"]["write"]["skipped_done"] == 0 and third["stages"]["filter"]["skipped_done"] == 1
    assert third["written"] == corpus["report"]["written"]
    with pytest.raises(UserError, match="another config .*changed: mask_pii"):
        C.curate(dataclasses.replace(cfg, mask_pii=False), log=lambda _: None)


# ---------------------------------------------------------------------------------------
# Quality rules on both sides of their thresholds (datatrove's filters with our word splitter)


def _keeps(step, text) -> bool:
    from datatrove.data import Document

    res = step.filter(Document(text=text, id="x"))
    return res is True or (isinstance(res, tuple) and res[0])


def test_quality_rules_both_sides():
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    from data_pipeline.curate_steps import WordTokenizer

    tok = WordTokenizer()
    good = english(7)
    g = GopherQualityFilter(language=tok)
    assert _keeps(g, good)
    assert not _keeps(g, "The cat and the dog.")  # under 50 words
    assert not _keeps(g, good.replace(".", " # #"))  # hashes per word over 0.1
    assert not _keeps(g, " ".join(["x1 y2 z3 the and"] * 20))  # average word length under 3
    assert not _keeps(g, " ".join(["river mountain city forest"] * 20))  # no stop words
    rep = GopherRepetitionFilter(language=tok)
    assert _keeps(rep, good)
    assert not _keeps(rep, "\n".join([english(1, 3)] * 4 + [english(2, 3)]))  # duplicated lines
    c4 = C4QualityFilter(language=tok)
    assert _keeps(c4, good)
    assert not _keeps(c4, english(3, 3))  # fewer than 5 sentences
    assert not _keeps(c4, good + "\nlorem ipsum dolor sit amet.")
    assert not _keeps(c4, good + "\nfunction() { return 1; }.")
    fw = FineWebQualityFilter(language=tok)
    assert _keeps(fw, good)
    assert not _keeps(fw, "\n".join(["Home", "About us", "Contact", "Shop now"] * 5))  # short lines, no punctuation


def test_language_filter_scores():
    from datatrove.data import Document

    from data_pipeline.curate_steps import LanguageFilter

    f = LanguageFilter(("en",), 0.65)
    assert f.filter(Document(text=english(9), id="a")) is True
    assert f.filter(Document(text=GERMAN, id="b")) == (False, "language_de")
    assert LanguageFilter(("en", "de"), 0.65).filter(Document(text=GERMAN, id="b")) is True


def test_decontamination_ngram_size():
    from datatrove.data import Document

    from data_pipeline.curate_steps import Decontaminate, ngram_table

    short_q = "Which gas do plants take in from the air?"  # 9 words: matched whole
    tables, labels, unchecked = ngram_table([("t:0", GSM_Q), ("t:1", "too short to check"), ("t:2", short_q),
                                             ("t:3", "yes"), ("t:3", "a choice long enough to be checked alone")],
                                            13, 8)
    assert unchecked == ["t:1"] and labels == ["t:0", "t:2", "t:3"] and sorted(tables) == [8, 9, 13]
    f = Decontaminate(tables, labels)
    words = GSM_Q.split()
    doc = Document(text="Intro. " + " ".join(words[:13]).upper() + "!! outro", id="d")
    assert f.filter(doc) == (False, "contaminated") and doc.metadata["contamination"] == "t:0"
    assert f.filter(Document(text="Intro " + " ".join(words[:12]) + " outro", id="e")) is True  # 12 words only
    doc = Document(text=english(5) + "\nQ: WHICH gas do plants take in from the air? A: carbon dioxide", id="f")
    assert f.filter(doc) == (False, "contaminated") and doc.metadata["contamination"] == "t:2"
    assert f.filter(Document(text="Which gas do plants take in from the sea", id="g")) is True
    assert f.filter(Document(text="so a choice long enough to be checked alone, said", id="h")) == (False, "contaminated")
    tables, labels, unchecked = ngram_table([("t:2", short_q)], 13, 13)  # min_ngram = ngram: as before
    assert not tables and unchecked == ["t:2"]


# ---------------------------------------------------------------------------------------
# Config and command-line errors: one line each


def _cfg_file(tmp_path, body: str):
    p = tmp_path / "cur.py"
    p.write_text(body)
    return str(p)


def test_cli_one_line_errors(tmp_path, capsys):
    from lm import cli

    def run(*argv):
        code = cli.main(["data", "curate", *argv])
        err = capsys.readouterr().err
        return code, err

    code, err = run(str(tmp_path / "missing.py"))
    assert code == 2 and err.count("\n") == 1 and "not found" in err
    code, err = run(_cfg_file(tmp_path, "X = 1\n"))
    assert code == 2 and err.count("\n") == 1 and "no config() function" in err
    code, err = run(_cfg_file(tmp_path, "from data_pipeline.curate import *\n"
                                        "def config():\n    return CurateConfig(inputs=(), output_dir='o')\n"))
    assert code == 2 and err.count("\n") == 1 and "no inputs" in err
    missing = f"{tmp_path}/no/*.jsonl"
    code, err = run(_cfg_file(tmp_path, "from data_pipeline.curate import *\ndef config():\n"
                                        f"    return CurateConfig(inputs=(CurateInput('w', 'jsonl', ('{missing}',)),),"
                                        " output_dir='o')\n"))
    assert code == 2 and err.count("\n") == 1 and "no file matches" in err and "'w'" in err


def test_missing_datatrove_is_one_line(tmp_path, monkeypatch, capsys):
    from lm import cli

    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    spec = _cfg_file(tmp_path, "from data_pipeline.curate import *\ndef config():\n"
                               f"    return CurateConfig(inputs=(CurateInput('w', 'jsonl', ('{tmp_path}/a.jsonl',)),),"
                               f" output_dir='{tmp_path}/o')\n")
    monkeypatch.setitem(sys.modules, "datatrove", None)  # import datatrove -> ImportError
    assert cli.main(["data", "curate", spec]) == 2
    assert capsys.readouterr().err.strip().endswith(C.INSTALL_HINT)


def test_bad_values_and_output_dir(tmp_path):
    inp = (C.CurateInput("w", "jsonl", ("x",)),)
    with pytest.raises(C.CurateError, match="min_language_score"):
        C.CurateConfig(inputs=inp, output_dir="o", min_language_score=2).validate()
    with pytest.raises(C.CurateError, match="decontaminate_ngram"):
        C.CurateConfig(inputs=inp, output_dir="o", decontaminate_ngram=2).validate()
    with pytest.raises(C.CurateError, match="kind 'pdf'"):
        C.CurateConfig(inputs=(C.CurateInput("w", "pdf", ("x",)),), output_dir="o").validate()
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    cfg = C.CurateConfig(inputs=(C.CurateInput("w", "jsonl", (str(tmp_path / "a.jsonl"),)),),
                         output_dir=str(tmp_path / "o"), decontaminate=False)
    with pytest.raises(C.CurateError, match="not a curation output"):
        C.curate(cfg, log=lambda _: None)


def test_slurm_executor_is_built(tmp_path):
    from data_pipeline import curate_steps

    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    cfg = C.CurateConfig(inputs=(C.CurateInput("w", "jsonl", (str(tmp_path / "a.jsonl"),)),),
                         output_dir=str(tmp_path / "o"), decontaminate=False, executor="slurm",
                         slurm_partition="cpu", tasks=4).validate()
    stages = curate_steps.stages(cfg, C.input_files(cfg), [], str(tmp_path / "o" / "work"), str(tmp_path / "o" / "d"))
    execs = curate_steps.executors(cfg, stages, str(tmp_path / "o" / "work"))
    assert [type(e).__name__ for e in execs] == ["QuietSlurmExecutor"] * len(stages)
    assert execs[1].depends is execs[0] and execs[0].tasks == 4 and execs[0].partition == "cpu"
    with pytest.raises(C.CurateError, match="slurm_partition"):
        dataclasses.replace(cfg, slurm_partition="").validate()


@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "gsm8k")), reason="no shared data (../shared/data)")
def test_eval_items_from_shared_data():
    cfg = C.CurateConfig(inputs=(), output_dir="o", decontaminate_tasks=("gsm8k", "winogrande", "arc_easy"))
    items, counts = C.eval_items(cfg)
    assert counts == {"gsm8k": 1319, "winogrande": 1267, "arc_easy": 2376}
    assert any(GSM_Q.split("?")[0] in t for _, t in items) is False  # that one is a train item


def test_a_second_curation_of_the_same_folder_stops_in_one_line(tmp_path):
    """Two copies at once would run the same tasks over each other's files: the second stops."""
    import subprocess
    import sys

    from data_pipeline import curate

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom data_pipeline import curate\n"
                               f"with curate._lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(curate.CurateError, match=f"another lm data curate \\(pid {holder.pid}\\) is writing"):
            with curate._lock(str(out)):
                pass
    finally:
        holder.kill()
        holder.wait()
    with curate._lock(str(out)):  # free again once the holder is gone (even killed)
        pass


# ---------------------------------------------------------------------------------------
# A planted corpus at scale (data_pipeline/curate_planted.py): recall, loss, contamination


def test_planted_corpus_scoring():
    from data_pipeline import curate_planted as P

    truth = {"uniques": ["u0", "u1", "u2", "u3"], "exact": {"x0": "u0"}, "near": {"n0": ["u1", 2, 0.9]},
             "contaminated": {"c0": ["t:0", "Question: is the sky blue today?\nAnswer: yes it is"],
                              "c1": ["t:1", "a long enough item line"]}}
    kept = {"u0": "", "u1": "", "n0": "", "u3": "", "c0": "prose. Answer: yes IT is!", "c1": "other words"}
    s = P.score(truth, kept)
    assert (s["exact_removed"], s["near_removed"], s["uniques_lost"]) == (1, 0, 1)  # x0 gone; n0 and u1 kept; u2
    assert s["eval_caught"] == 1 and s["eval_cut_not_removed"] == 1 and s["eval_missed"] == ["t:0"]
    assert not P.still_quoted("no\nyes", "yes")  # lines under 3 words do not count
    a = P.Prose(0).document()
    assert P.jaccard(a, a) == 1.0 and 0.5 < P.jaccard(a, P.near_copy(a, 2, random.Random(0), ["zebra"])) < 1.0
    assert P.respace(a, random.Random(0)).lower().split() == a.lower().split()


@pytest.mark.slow
def test_planted_corpus_duplicates_and_evaluation_items_at_scale(tmp_path):
    """2,000 unique documents, 200 exact and 400 near copies (1-4 words changed, case and
    whitespace changed), evaluation items quoted in prose (real ones when ../shared/data is
    present): every exact copy and >= 95% of near copies removed, <= 1% of uniques lost, every
    item caught; default thresholds, every step on, 2 workers."""
    from data_pipeline import curate_planted as P

    items, tasks, files = P.evaluation_items(str(tmp_path))
    truth = P.plant(str(tmp_path / "in"), uniques=2000, exact=200, near=400, eval_items=items, shards=4)
    cfg = C.CurateConfig(inputs=(C.CurateInput("web", "jsonl", (str(tmp_path / "in" / "*.jsonl"),)),),
                         output_dir=str(tmp_path / "out"), decontaminate_tasks=tasks, decontaminate_files=files,
                         tasks=2, workers=2)
    report = C.curate(cfg, log=lambda _: None)
    kept = {r["id"]: r["text"] for f in report["written"]["shards"] for r in map(json.loads, open(f))}
    s = P.score(truth, kept)
    assert s["exact_removed"] == s["exact"] == 200, s
    assert s["near_removed"] >= 0.95 * s["near"], s
    assert s["uniques_lost"] <= 0.01 * s["uniques"], s
    assert s["eval_caught"] == s["eval_planted"] >= 20, s
    assert s["near_jaccard_min_median"][0] > cfg.jaccard_threshold  # every planted copy is above the threshold
    names = [x["step"] for x in report["throughput"]["per_step"]]
    assert names[0] == "read" and {"language", "decontaminate", "exact_dedup", "near_dedup"} <= set(names)
    assert all(x["seconds"] > 0 and x["docs_per_s"] > 0 for x in report["throughput"]["per_step"])


@pytest.mark.slow
def test_curated_output_trains_with_lm_train_unchanged(corpus, tmp_path):
    """The curated shards as a `kind="jsonl"` source of an ordinary experiment: `lm train` trains
    on them (a tokenizer trained with the run), a few steps, finite falling loss."""
    import subprocess

    from helpers import ROOT, cpu_env, train_cmd

    shards = os.path.join(corpus["cfg"].output_dir, "data", "*.jsonl")
    exp = tmp_path / "on_curated.py"
    exp.write_text(f'''
from lm.config import Config, DataConfig, ModelConfig, OptimConfig, SourceConfig, TrainerConfig

def config():
    return Config(
        name="on_curated",
        model=ModelConfig(vocab_size=384, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                          max_seq_len=64, attention_block=32),
        optim=OptimConfig(lr=3e-3, warmup_steps=2),
        data=DataConfig(corpus="sources", seq_len=64, batch_size=8, tokenizer=None,
                        sources=(SourceConfig(name="curated", kind="jsonl", paths=({shards!r},),
                                              heldout_fraction=0.1),)),
        trainer=TrainerConfig(steps=12, log_every=1, eval_every=12, eval_batches=1, num_samples=0,
                              peak_flops_per_device=1e9))
''')
    p = subprocess.run(train_cmd(str(exp), tmp_path / "run"), cwd=ROOT, env=cpu_env(1), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 12 and all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3])
    assert any("eval_loss" in r for r in rows)


def test_set_overrides_and_their_errors():
    cfg = C.CurateConfig(inputs=(C.CurateInput("w", "jsonl", ("x.jsonl",)),), output_dir="o")
    got = C.apply_overrides(cfg, ["tasks=64", "workers=16", "executor=slurm", "slurm_partition=cpu", "languages=en,de",
                                  "gopher_quality.min_doc_words=100", "c4_quality=None", "mask_pii=true",
                                  "min_language_score=0.5"])
    assert (got.tasks, got.workers, got.executor, got.slurm_partition, got.languages) == (64, 16, "slurm", "cpu",
                                                                                         ("en", "de"))
    assert got.gopher_quality.min_doc_words == 100 and got.gopher_quality.min_stop_words == 2
    assert got.c4_quality is None and got.mask_pii is True and got.min_language_score == 0.5
    assert C.apply_overrides(got, ["c4_quality.min_num_sentences=3"]).c4_quality.min_num_sentences == 3
    for bad, msg in (("taks=3", "did you mean tasks"), ("tasks=many", "is not an integer"), ("tasks", "KEY=VALUE"),
                     ("tasks=0", "tasks = 0; it must be at least 1"), ("inputs=x", "inputs are set in the config"),
                     ("gopher_quality.min_words=3", "did you mean min_doc_words"), ("mask_pii=maybe", "not true or false"),
                     ("executor=slurm", "needs slurm_partition"), ("tasks.x=1", "no such curation setting")):
        with pytest.raises(UserError, match=msg):
            C.apply_overrides(cfg, [bad])


def test_parquet_output_is_a_parquet_source(tmp_path):
    pytest.importorskip("pyarrow")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": english(i), "id": f"d{i}"}) + "\n"
                                               for i in range(6)))
    cfg = C.CurateConfig(inputs=(C.CurateInput("w", "jsonl", (str(tmp_path / "in.jsonl"),)),),
                         output_dir=str(tmp_path / "out"), output_format="parquet", decontaminate=False,
                         languages=(), near_dedup=False)
    report = C.curate(cfg, log=lambda _: None)
    assert len(report["written"]["shards"]) == 1 and report["written"]["shards"][0].endswith(".parquet")
    train, _ = open_source(SourceConfig(name="p", kind="parquet", heldout_fraction=0.0,
                                        paths=(str(tmp_path / "out" / "data" / "*.parquet"),)))
    assert sorted(train[i].text for i in range(len(train))) == sorted(english(i) for i in range(6))
    with pytest.raises(UserError, match="output_format 'csv'"):
        dataclasses.replace(cfg, output_format="csv").validate()


def test_span_decontamination_cuts_the_lines_and_keeps_the_rest(tmp_path):
    from datatrove.data import Document

    from data_pipeline.curate_steps import Decontaminate, ngram_table

    tables, labels, _ = ngram_table([("t:0", GSM_Q), ("t:1", HSWAG)], 13, 8)
    f = Decontaminate(tables, labels, cut_lines=True, min_chars_left=200)
    f.cuts = []
    prose = english(11)
    doc = Document(text=prose + "\n" + GSM_Q.upper() + "\n" + prose + "\nAnd " + HSWAG + ".", id="d", metadata={})
    assert f.filter(doc) is True
    assert doc.text == prose + "\n" + prose and f.cuts[0]["match"] == ["t:0", "t:1"]
    assert f.cuts[0]["chars_cut"] == len(GSM_Q) + len(HSWAG) + 7
    short = Document(text="Intro line.\n" + GSM_Q, id="s", metadata={})
    assert f.filter(short) == (False, "contaminated") and short.metadata["contamination"] == "t:0"
    clean = Document(text=prose, id="c", metadata={})
    assert f.filter(clean) is True and clean.text == prose
    # through the pipeline: the report counts the cut documents and lists them
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": prose + "\n" + GSM_Q + "\n" + english(12), "id": "a"}) +
                                       "\n" + json.dumps({"text": english(13), "id": "b"}) + "\n")
    (tmp_path / "items.jsonl").write_text(json.dumps({"question": GSM_Q}) + "\n")
    cfg = C.CurateConfig(inputs=(C.CurateInput("w", "jsonl", (str(tmp_path / "in.jsonl"),)),),
                         output_dir=str(tmp_path / "out"), decontaminate_tasks=(), languages=(), near_dedup=False,
                         decontaminate_files=(str(tmp_path / "items.jsonl"),), decontaminate_spans=True)
    report = C.curate(cfg, log=lambda _: None)
    step = _step(report, "decontaminate")
    assert step["docs_cut"] == 1 and step["docs_removed"] == 0 and step["chars_cut_from_kept"] == len(GSM_Q) + 1
    out = {r["id"]: r["text"] for f in report["written"]["shards"] for r in map(json.loads, open(f))}
    assert GSM_Q not in out["a"] and prose in out["a"] and report["decontamination"]["removed"][0]["cut"] is True


# ---------------------------------------------------------------------------------------
# Every quality rule alone, on both sides of its threshold (the filters as the pipeline builds them)

NOUNS = "river mountain city people history music science water forest ancient modern village".split()


def _words(n: int, stop=("the", "of")) -> list[str]:
    """n words: the stop words given, then nouns (no other stop word)."""
    return (list(stop) + [NOUNS[i % len(NOUNS)] for i in range(n)])[:n]


def _only(conf_cls, **on):
    """The step's config with every rule off but `on`."""
    off = {f.name: (() if isinstance(f.default, tuple) else None) for f in dataclasses.fields(conf_cls)}
    return conf_cls(**{**off, **on})


def _verdict(step, conf, text):
    from datatrove.data import Document

    from data_pipeline.curate_steps import quality_filter

    doc = Document(text=text, id="x")
    res = quality_filter(step, conf).filter(doc)
    return (True, doc.text) if res is True else (False, res[1] if isinstance(res, tuple) else "")


GOPHER_CASES = [  # (rule, value, text that passes, text that fails, reason)
    ("min_doc_words", 50, " ".join(_words(50)) + ".", " ".join(_words(49)) + ".", "gopher_short_doc"),
    ("max_doc_words", 100_000, " ".join(_words(100_000)) + ".", " ".join(_words(100_001)) + ".", "gopher_long_doc"),
    ("min_avg_word_length", 3, " ".join(["to"] * 30 + ["have"] * 30), " ".join(["to"] * 31 + ["have"] * 29),
     "gopher_below_avg_threshold"),
    ("max_avg_word_length", 10, " ".join(["abcdefghij"] * 20), " ".join(["abcdefghijk"] * 20),
     "gopher_above_avg_threshold"),
    ("max_symbol_word_ratio", 0.1, " ".join(["#" + w for w in _words(10)] + _words(90)),
     " ".join(["#" + w for w in _words(11)] + _words(89)), "gopher_too_many_hashes"),
    ("max_bullet_lines_ratio", 0.9, "\n".join(["- " + " ".join(_words(6))] * 9 + [" ".join(_words(6))]),
     "\n".join(["- " + " ".join(_words(6))] * 10), "gopher_too_many_bullets"),
    ("max_ellipsis_lines_ratio", 0.3, "\n".join([" ".join(_words(6)) + "..."] * 3 + [" ".join(_words(6)) + "."] * 7),
     "\n".join([" ".join(_words(6)) + "..."] * 4 + [" ".join(_words(6)) + "."] * 6), "gopher_too_many_end_ellipsis"),
    ("max_non_alpha_words_ratio", 0.8, " ".join(["123"] * 20 + _words(80)), " ".join(["123"] * 21 + _words(79)),
     "gopher_below_alpha_threshold"),
    ("min_stop_words", 2, " ".join(_words(60, ("the", "of"))), " ".join(_words(60, ("the",))),
     "gopher_enough_stop_words"),
]


@pytest.mark.parametrize("rule,value,ok,bad,reason", GOPHER_CASES, ids=[c[0] for c in GOPHER_CASES])
def test_gopher_quality_rule_both_sides(rule, value, ok, bad, reason):
    conf = _only(C.GopherQuality, **{rule: value})
    assert _verdict("gopher_quality", conf, ok)[0] is True
    assert _verdict("gopher_quality", conf, bad) == (False, reason)
    assert getattr(C.GopherQuality(), rule) == value  # the default recipe's threshold


def _para(i: int, n: int = 12) -> str:
    r = random.Random(i)
    return " ".join(r.choice(NOUNS) + str(r.randint(0, 99)) for _ in range(n)) + "."


REPETITION_CASES = [  # a duplicate is a copy after the first; short copies keep the characters few
    ("dup_para_frac", 0.3, "\n\n".join([_para(i, 40) for i in range(7)] + ["Yes."] * 4),  # 3 of 11
     "\n\n".join([_para(i, 40) for i in range(6)] + ["Yes."] * 5), "dup_para_frac"),  # 4 of 11
    ("dup_para_char_frac", 0.2, "\n\n".join([_para(0, 40)] * 2 + [_para(i, 45) for i in range(1, 9)]),
     "\n\n".join([_para(0, 40)] * 3 + [_para(i, 10) for i in range(1, 8)]), "dup_para_char_frac"),
    ("dup_line_frac", 0.3, "\n".join([_para(i, 40) for i in range(7)] + ["Yes."] * 4),
     "\n".join([_para(i, 40) for i in range(6)] + ["Yes."] * 5), "dup_line_frac"),
    ("dup_line_char_frac", 0.2, "\n".join([_para(0, 40)] * 2 + [_para(i, 45) for i in range(1, 9)]),
     "\n".join([_para(0, 40)] * 3 + [_para(i, 10) for i in range(1, 8)]), "dup_line_char_frac"),
    ("top_n_grams", ((2, 0.2),), " ".join(["red fox"] * 8 + [_para(i) for i in range(6)]),
     " ".join(["red fox"] * 40 + [_para(i) for i in range(6)]), "top_2_gram"),
    ("dup_n_grams", ((5, 0.15),), " ".join([_para(0, 10)] * 2 + [_para(i) for i in range(1, 9)]),
     " ".join([_para(0, 10)] * 2 + [_para(1)]), "duplicated_5_n_grams"),
]


@pytest.mark.parametrize("rule,value,ok,bad,reason", REPETITION_CASES, ids=[c[0] for c in REPETITION_CASES])
def test_gopher_repetition_rule_both_sides(rule, value, ok, bad, reason):
    conf = _only(C.GopherRepetition, **{rule: value})
    default = getattr(C.GopherRepetition(), rule)
    assert default == value or set(value) <= set(default)  # the default recipe's threshold
    assert _verdict("gopher_repetition", conf, ok)[0] is True
    assert _verdict("gopher_repetition", conf, bad) == (False, reason)


C4_OFF = dict(split_paragraph=True, remove_citations=False, filter_no_terminal_punct=False, min_num_sentences=-1,
              min_words_per_line=-1, max_word_length=-1, filter_lorem_ipsum=False, filter_javascript=False,
              filter_curly_bracket=False, filter_policy=False)
S = "The river runs to the sea."


def test_c4_rules_both_sides():
    def c4(text, **on):
        return _verdict("c4_quality", C.C4Quality(**{**C4_OFF, **on}), text)

    assert c4(" ".join([S] * 5), min_num_sentences=5)[0] is True
    assert c4(" ".join([S] * 4), min_num_sentences=5) == (False, "too_few_sentences")
    assert c4(S + "\nlorem ipsum is here.", filter_lorem_ipsum=True) == (False, "lorem_ipsum")
    assert c4(S + "\nlorem is here.", filter_lorem_ipsum=True) == (True, S + "\nlorem is here.")
    assert c4(S + "\nfunction f() { return 1; }.", filter_curly_bracket=True) == (False, "curly_bracket")
    assert c4(S + "\nfunction f() ( return 1; ).", filter_curly_bracket=True)[0] is True
    # the line rules drop lines, not documents
    assert c4(S + "\nNo full stop here", filter_no_terminal_punct=True) == (True, S)
    assert c4(S + "\nA full stop here.", filter_no_terminal_punct=True) == (True, S + "\nA full stop here.")
    assert c4(S + "\nToo short.", min_words_per_line=3) == (True, S)
    assert c4(S + "\nLong enough now.", min_words_per_line=3) == (True, S + "\nLong enough now.")
    assert c4(S + "\nEnable JavaScript to see this page.", filter_javascript=True) == (True, S)
    assert c4(S + "\nWe use cookies on this site.", filter_policy=True) == (True, S)
    assert c4(S + "\nWe use biscuits on this site.", filter_policy=True)[1].endswith("biscuits on this site.")
    assert c4(S + f"\nA {'x' * 1001} word.", max_word_length=1000) == (True, S)
    assert c4(S + f"\nA {'x' * 1000} word.", max_word_length=1000)[1].endswith("word.")
    assert c4("See the river [12] now.", remove_citations=True) == (True, "See the river  now.")


LONG = "The river runs far past the old mill and the bridge to the sea"  # 63 characters, no full stop


@pytest.mark.parametrize("rule,value,ok,bad,reason", [
    ("line_punct_thr", 0.12, "\n".join([LONG + "."] * 3 + [LONG] * 22), "\n".join([LONG + "."] * 2 + [LONG] * 23),
     "line_punct_ratio"),
    ("short_line_thr", 0.67, "\n".join(["Short line one.", "Short line two.", LONG + "."]),
     "\n".join(["Short line one.", "Short line two.", "Short line six.", LONG + "."]), "short_line_ratio"),
    ("char_duplicates_ratio", 0.01, "\n".join([_para(i, 30) for i in range(40)]),
     "\n".join([_para(i, 30) for i in range(40)] + [_para(0, 30)]), "char_dup_ratio"),
    ("new_line_ratio", 0.3, "\n".join(["Three words here."] * 10), "\n".join(["Two words."] * 10), "list_ratio"),
], ids=["line_punct_thr", "short_line_thr", "char_duplicates_ratio", "new_line_ratio"])
def test_fineweb_rule_both_sides(rule, value, ok, bad, reason):
    off = dict(line_punct_thr=0.0, line_punct_exclude_zero=False, short_line_thr=1.0, short_line_length=30,
               char_duplicates_ratio=1.0, new_line_ratio=1e9)
    conf = C.FineWebQuality(**{**off, rule: value})
    assert getattr(C.FineWebQuality(), rule) == value  # the default recipe's threshold
    assert _verdict("fineweb_quality", conf, ok)[0] is True
    assert _verdict("fineweb_quality", conf, bad) == (False, reason)
