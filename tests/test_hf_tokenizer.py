"""The exported Hugging Face tokenizer gives exactly our SentencePiece ids and text back
(transformers' AutoTokenizer; skipped without transformers), for hard strings and for
held-out lines of the default corpus and of ../shared/data where present."""

import bz2
import gzip
import json
import os

import pytest
from helpers import ROOT, corpus_tokenizer

SHARED = os.path.join(ROOT, "..", "shared", "data")

HARD = [
    " is using", "\n\nclass A:", "  leading two", "\tdef f():\n\t\treturn 1", "trailing  ", "x", "", " ", "\n",
    "a  b   c    d", "line\r\nwindows", "nul\x00byte and \x0b vtab", "Café naïve — “quotes” ½ ﬁ Å Å",
    "日本語のテキスト", "😀 emoji 👩‍👩‍👧", "\u200b zero width", "▁ a literal metaspace ▁▁", "<0x41> looks like a byte",
    "    indented\n        deeper\n", "mixed \t tabs \t\t and spaces", "12345 67.89", "¿¡ Ωμέγα Привет",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return corpus_tokenizer(tmp_path_factory.mktemp("tok"))


def test_piece_types_read_from_the_model(tok):
    """The protobuf reader agrees with SentencePiece on every piece; "\\n" is user-defined."""
    from lm.interop.hf import sentencepiece_pieces

    pieces = sentencepiece_pieces(tok.path)
    sp = tok.sp
    assert [p for p, _, _ in pieces] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert [s for _, s, _ in pieces] == pytest.approx([sp.get_score(i) for i in range(sp.get_piece_size())])
    kinds = {p: k for p, _, k in pieces}
    assert kinds["\n"] == 4 and kinds["<s>"] == 3 and kinds["<unk>"] == 2 and kinds["<0x41>"] == 6
    assert all(k == 1 for p, _, k in pieces if p.startswith("\u2581") and len(p) > 2)


def _held_out_lines(n_min: int = 1000) -> list[str]:
    from data_pipeline import default_corpus

    lines = []
    for d in default_corpus.documents()[300:420]:  # the tokenizer saw the first 300 documents
        lines += d.text().splitlines(keepends=True)[:60]
    assert len(lines) >= n_min
    if os.path.isdir(SHARED):
        with bz2.open(os.path.join(SHARED, "hellaswag", "hellaswag_val_full.txt.bz2"), "rt", encoding="utf-8") as f:
            lines += f.read().splitlines()[:600]
        with gzip.open(os.path.join(SHARED, "multi30k", "val.de.gz"), "rt", encoding="utf-8") as f:
            lines += f.read().splitlines()[:300]
        with open(os.path.join(SHARED, "wmt22-general-test", "generaltest2022.de-en.src.de"), encoding="utf-8") as f:
            lines += f.read().splitlines()[:300]
        with open(os.path.join(SHARED, "lambada_openai", "lambada_openai.jsonl"), encoding="utf-8") as f:
            lines += [json.loads(line)["context"] for line in list(f)[:200]]
    return lines


@pytest.fixture(scope="module")
def hf_tok(tok, tmp_path_factory):
    transformers = pytest.importorskip("transformers", reason="transformers not installed (CI installs it)")
    from lm.interop.hf import _export_tokenizer

    out = tmp_path_factory.mktemp("hf")
    _export_tokenizer(tok.path, str(out))
    return transformers.AutoTokenizer.from_pretrained(str(out))


def _check(tok, hf_tok, texts):
    bad = []
    for text in texts:
        ours = tok.encode(text, bos=True)
        if hf_tok(text)["input_ids"] != ours or hf_tok.encode(text, add_special_tokens=False) != ours[1:]:
            bad.append(("ids", text, hf_tok.convert_ids_to_tokens(hf_tok(text)["input_ids"]),
                        [tok.piece(i) for i in ours]))
        # (SentencePiece itself gives a literal "▁" back as a space)
        elif hf_tok.decode(ours, skip_special_tokens=True) != tok.decode(ours) or (
                tok.decode(ours) != text and "\u2581" not in text):
            bad.append(("text", text, hf_tok.decode(ours, skip_special_tokens=True), tok.decode(ours)))
    assert not bad, f"{len(bad)} of {len(texts)} differ, e.g. {bad[:3]}"


def test_hard_strings_give_identical_ids_and_text(tok, hf_tok):
    _check(tok, hf_tok, HARD)
    # byte fallback really happens in these (characters outside a 1024-piece vocabulary)
    assert any(tok.sp.is_byte(i) for i in tok.encode("日本語 😀"))


def test_held_out_lines_give_identical_ids_and_text(tok, hf_tok):
    lines = [s for s in _held_out_lines() if not any(t in s for t in ("<s>", "</s>", "<unk>", "<pad>", "<|"))]
    assert len(lines) >= 1000
    _check(tok, hf_tok, lines)


def test_literal_special_token_text(tok, hf_tok):
    """HF reads "<s>" in a text as the BOS token (as for every HF tokenizer); with
    split_special_tokens=True it encodes such text as SentencePiece does."""
    text = "a <s> b </s> <|user|> c"
    assert hf_tok(text, split_special_tokens=True)["input_ids"] == tok.encode(text, bos=True)
    assert tok.bos_id in hf_tok(text)["input_ids"][1:]
