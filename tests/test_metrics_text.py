import math

import pytest

from lm.metrics_text import corpus_bleu, corpus_chrf, tokenize_13a


def test_13a_tokenization_splits_punctuation_but_not_numbers():
    assert tokenize_13a('Hello, world! It costs 3.50 "now".') == \
        ["Hello", ",", "world", "!", "It", "costs", "3.50", '"', "now", '"', "."]


def test_bleu_hand_computed():
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert corpus_bleu(["a b c d"], ["e f g h"]) == 0.0
    # hyp "the cat sat on mat" (5 tokens) vs ref "the cat sat on the mat" (6 tokens):
    # precisions 5/5, 3/4, 2/3, 1/2; brevity exp(1 - 6/5)
    expected = 100 * math.exp(1 - 6 / 5) * (1 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert corpus_bleu(["the cat sat on mat"], ["the cat sat on the mat"]) == pytest.approx(expected)


def test_chrf_hand_computed():
    assert corpus_chrf(["abc"], ["abc"]) == pytest.approx(100.0)
    assert corpus_chrf(["xyz"], ["abc"]) == 0.0
    # "ab" vs "abc": orders 1 (p=1, r=2/3) and 2 (p=1, r=1/2) count; F2 = 5pr / (4p + r)
    f = [5 * 1 * (2 / 3) / (4 + 2 / 3), 5 * 1 * 0.5 / (4 + 0.5)]
    assert corpus_chrf(["ab"], ["abc"]) == pytest.approx(100 * sum(f) / 2)
