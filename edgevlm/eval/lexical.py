"""Lexical report metrics as M3D's benchmark reports them: each score per study, then the mean.

- BLEU-1 and BLEU-4: nltk `sentence_bleu` (brevity penalty, no smoothing, like the `evaluate` bleu
  metric M3D calls per sample).
- ROUGE-L: `rouge-score` F-measure (no stemming, as `evaluate`'s rouge defaults).
- METEOR: nltk `meteor_score` WITHOUT the WordNet synonym stage (exact and Porter-stem matches only),
  hence the key `meteor_nosyn`. WordNet's data is not on PyPI and this must run offline; dropping
  synonyms also keeps the score identical on every machine. It is not comparable to published
  METEOR numbers, which include synonyms (expect it slightly lower).

Text is lower-cased and split into words, numbers (with decimals) and punctuation.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

_TOKEN = re.compile(r"\d+(?:\.\d+)?|[a-z]+(?:[-'][a-z]+)*|[^\sa-z\d]")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class _NoSynonyms:
    """Stands in for nltk's WordNet reader: no synonyms, so METEOR runs offline without corpora."""

    def synsets(self, *args, **kwargs) -> list:
        return []


def lexical_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean per-study BLEU-1, BLEU-4, ROUGE-L (F) and METEOR without synonyms, each in [0, 1]."""
    from nltk.translate.bleu_score import sentence_bleu
    from nltk.translate.meteor_score import meteor_score
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(predictions)
    if n == 0:
        return {"bleu1": 0.0, "bleu4": 0.0, "rouge_l": 0.0, "meteor_nosyn": 0.0, "n": 0}
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    wordnet = _NoSynonyms()
    sums = {"bleu1": 0.0, "bleu4": 0.0, "rouge_l": 0.0, "meteor_nosyn": 0.0}
    for pred, ref in zip(predictions, references, strict=True):
        p, r = tokenize(pred), tokenize(ref)
        if p and r:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # nltk warns when a higher-order n-gram never matches
                sums["bleu1"] += sentence_bleu([r], p, weights=(1.0,))
                sums["bleu4"] += sentence_bleu([r], p, weights=(0.25, 0.25, 0.25, 0.25))
            sums["meteor_nosyn"] += meteor_score([r], p, wordnet=wordnet)
        sums["rouge_l"] += scorer.score(ref, pred)["rougeL"].fmeasure
    return {**{k: v / n for k, v in sums.items()}, "n": n}
