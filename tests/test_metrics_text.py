"""BLEU and chrF (sacreBLEU) against values computed by hand from the metrics' definitions."""

import math

import pytest

from lm.eval.text_metrics import corpus_bleu, corpus_chrf, translation_scores


def test_13a_tokenization_splits_punctuation_but_not_numbers():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    assert Tokenizer13a()('Hello, world! It costs 3.50 "now".').split() == \
        ["Hello", ",", "world", "!", "It", "costs", "3.50", '"', "now", '"', "."]


def test_bleu_hand_computed():
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert corpus_bleu(["a b c d"], ["e f g h"]) == 0.0
    # hyp "the cat sat on mat" (5 tokens) vs ref "the cat sat on the mat" (6 tokens):
    # precisions 5/5, 3/4, 2/3, 1/2; brevity exp(1 - 6/5)
    expected = 100 * math.exp(1 - 6 / 5) * (1 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert corpus_bleu(["the cat sat on mat"], ["the cat sat on the mat"]) == pytest.approx(expected)
    # corpus level: n-gram counts are summed over the segments before the precisions
    two = corpus_bleu(["the cat sat on mat", "a dog"], ["the cat sat on the mat", "a dog"])
    p = [7 / 7, 4 / 5, 2 / 3, 1 / 2]  # ("a dog" adds 2 unigrams and 1 bigram, all matching)
    assert two == pytest.approx(100 * math.exp(1 - 8 / 7) * math.prod(p) ** 0.25)


def test_chrf_hand_computed():
    assert corpus_chrf(["abc"], ["abc"]) == pytest.approx(100.0)
    assert corpus_chrf(["xyz"], ["abc"]) == 0.0
    # "ab" vs "abc": orders 1 (p=1, r=2/3) and 2 (p=1, r=1/2) exist on both sides; precision and
    # recall are averaged over them (p=1, r=7/12), then F2 = 5pr / (4p + r)
    p, r = 1.0, (2 / 3 + 1 / 2) / 2
    assert corpus_chrf(["ab"], ["abc"]) == pytest.approx(100 * 5 * p * r / (4 * p + r))
    # whitespace does not count
    assert corpus_chrf(["a b c"], ["abc"]) == pytest.approx(100.0)


def test_scores_carry_sacrebleu_signatures():
    r = translation_scores(["Ein Hund läuft."], ["Ein Hund läuft."])
    assert r["bleu"] == pytest.approx(100.0) and r["chrf"] == pytest.approx(100.0)
    assert "tok:13a" in r["signature"]["bleu"] and "nc:6" in r["signature"]["chrf"]
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        translation_scores(["a", "b"], ["a"])
