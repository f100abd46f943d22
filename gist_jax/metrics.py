"""Text metrics for evaluation: ROUGE-L (as in the gisting paper) and exact match.

``rouge_l`` is the mean ROUGE-L F-measure x 100 from ``rouge_score`` with Porter stemming
(``RougeScorer(["rougeL"], use_stemmer=True)``), scored per example and averaged. The
paper's numbers were produced with Hugging Face ``evaluate``'s "rouge", which wraps the
same scorer but reports the median of 1000 bootstrap resamples of the mean; that median is
random and within about +-0.15 of the plain mean on these split sizes. We report the plain
mean: it is deterministic and reproduces the paper's released LLaMA outputs within 0.2 for
every condition and split (see the README).

rouge_score lowercases and keeps only ``[a-z0-9]`` tokens, so an empty prediction (or one
with no letters or digits) scores 0 against any reference, and two such texts score 0 as
well.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence


@functools.cache
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references; they must pair up"
        )
    if not predictions:
        raise ValueError("no predictions to score")
    for name, texts in (("predictions", predictions), ("references", references)):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{name}[{i}] is {type(text).__name__}, expected str")


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Per-example ROUGE-L F-measures in [0, 1]."""
    _check(predictions, references)
    scorer = _scorer()
    return [
        scorer.score(reference, prediction)["rougeL"].fmeasure
        for prediction, reference in zip(predictions, references, strict=True)
    ]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure x 100 (0-100)."""
    scores = rouge_l_scores(predictions, references)
    return 100.0 * sum(scores) / len(scores)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Percentage (0-100) of predictions equal to their reference after stripping
    surrounding whitespace (case and inner whitespace count)."""
    _check(predictions, references)
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    return 100.0 * hits / len(predictions)
