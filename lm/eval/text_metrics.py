"""Corpus BLEU and chrF for translation evaluation, computed by sacreBLEU.

sacreBLEU is the field's reference implementation: BLEU with its "13a" tokenizer and
exponential smoothing, chrF with character n-grams n = 1..6, beta = 2, whitespace
removed, precision and recall averaged over the orders before the F-score. Both are on a
0-100 scale, one reference per hypothesis. Each result carries sacreBLEU's signature
(e.g. "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"), which says exactly
how it was computed; report it with the number.
"""

from __future__ import annotations

from typing import Sequence

from sacrebleu.metrics import BLEU, CHRF


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    _check(hypotheses, references)
    return float(BLEU().corpus_score(list(hypotheses), [list(references)]).score)


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    _check(hypotheses, references)
    return float(CHRF().corpus_score(list(hypotheses), [list(references)]).score)


def translation_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """{"bleu", "chrf", "signature": {"bleu": ..., "chrf": ...}} of a corpus."""
    _check(hypotheses, references)
    hyps, refs = list(hypotheses), [list(references)]
    bleu, chrf = BLEU(), CHRF()
    return {"bleu": float(bleu.corpus_score(hyps, refs).score), "chrf": float(chrf.corpus_score(hyps, refs).score),
            "signature": {"bleu": str(bleu.get_signature()), "chrf": str(chrf.get_signature())}}
