"""Corpus BLEU and chrF for translation evaluation (no external dependency).

BLEU follows Papineni et al. with the usual corpus-level statistics: clipped n-gram
matches for n = 1..4 summed over the corpus, geometric mean of the precisions, brevity
penalty; text is tokenized like sacreBLEU's "13a" tokenizer (punctuation split off).
chrF follows Popovic (2015) as sacreBLEU computes it: character n-grams n = 1..6 with
whitespace removed, corpus-level precision and recall per order, F-beta (beta = 2) per
order averaged over the orders both sides have. Both are reported on a 0-100 scale.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

_PUNCT = re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])")


def tokenize_13a(text: str) -> list[str]:
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    text = text.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    text = _PUNCT.sub(r" \1 ", f" {text} ")
    text = re.sub(r"([^0-9])([\.,])", r"\1 \2 ", text)
    text = re.sub(r"([\.,])([^0-9])", r" \1 \2", text)
    text = re.sub(r"([0-9])(-)", r"\1 \2 ", text)
    return text.split()


def _ngrams(tokens: Sequence, n: int) -> Counter:
    return Counter(tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], max_n: int = 4) -> float:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references):
        h, r = tokenize_13a(hyp), tokenize_13a(ref)
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, max_n + 1):
            hn, rn = _ngrams(h, n), _ngrams(r, n)
            matches[n - 1] += sum(min(c, rn[g]) for g, c in hn.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    if hyp_len == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / max_n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100.0 * brevity * math.exp(log_precision)


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str], max_n: int = 6, beta: float = 2.0) -> float:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    match, hyp_total, ref_total = [0] * max_n, [0] * max_n, [0] * max_n
    for hyp, ref in zip(hypotheses, references):
        h, r = "".join(hyp.split()), "".join(ref.split())
        for n in range(1, max_n + 1):
            hn, rn = _ngrams(h, n), _ngrams(r, n)
            match[n - 1] += sum(min(c, rn[g]) for g, c in hn.items())
            hyp_total[n - 1] += sum(hn.values())
            ref_total[n - 1] += sum(rn.values())
    scores = []
    for m, ht, rt in zip(match, hyp_total, ref_total):
        if ht == 0 or rt == 0:  # orders longer than the texts do not count
            continue
        p, r = m / ht, m / rt
        scores.append((1 + beta**2) * p * r / (beta**2 * p + r) if p + r else 0.0)
    return 100.0 * sum(scores) / len(scores) if scores else 0.0
