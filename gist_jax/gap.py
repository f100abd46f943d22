"""The gap share -- how much of the pos_control - neg_control score gap the gist condition
recovers -- with a paired bootstrap interval over examples.

Why paired: the three conditions decode the same examples, and most of the variance is in
the examples (some are easy for every condition). Resampling example indices once for all
three conditions keeps that pairing, so the interval is much narrower than one built from
three independent standard errors, and honest about the ratio's skew (a plain delta-method
standard error is symmetric, the ratio is not).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

CONDITIONS = ("gist", "pos_control", "neg_control")
METRICS = ("rougeL", "exact_match")


def example_scores(
    predictions: Sequence[Mapping[str, Any]], split: str, key: str
) -> dict[str, np.ndarray] | None:
    """``condition -> float64[n]`` per-example scores (0-100) of one split, in the order
    the examples were decoded; None unless all three conditions are there with equal n."""
    from gist_jax import metrics

    by_condition: dict[str, list[Mapping[str, Any]]] = {}
    for p in predictions:
        if p["split"] == split:
            by_condition.setdefault(p["condition"], []).append(p)
    if any(c not in by_condition for c in CONDITIONS):
        return None
    if len({len(by_condition[c]) for c in CONDITIONS}) != 1:
        return None
    out = {}
    for condition in CONDITIONS:
        rows = by_condition[condition]
        preds = [r["prediction"] for r in rows]
        refs = [r["reference"] for r in rows]
        if key == "rougeL":
            scores = metrics.rouge_l_scores(preds, refs)
        elif key == "exact_match":
            scores = [float(p.strip() == r.strip()) for p, r in zip(preds, refs, strict=True)]
        else:
            raise ValueError(f"unknown metric {key!r}; expected one of {METRICS}")
        out[condition] = 100.0 * np.asarray(scores, np.float64)
    return out


def share(gist: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
    """``100 * (mean gist - mean neg) / (mean pos - mean neg)``; NaN unless pos_control
    beats neg_control by at least one point (otherwise nothing is bracketed)."""
    gap = float(np.mean(pos) - np.mean(neg))
    return 100.0 * float(np.mean(gist) - np.mean(neg)) / gap if gap >= 1.0 else math.nan


def paired_interval(
    scores: Mapping[str, np.ndarray], resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """``{"share", "low", "high", "se"}``: the gap share and the percentile interval and
    standard deviation of its paired bootstrap (resamples whose gap is under one point are
    dropped; NaN bounds when more than half are)."""
    gist, pos, neg = (np.asarray(scores[c]) for c in CONDITIONS)
    n = len(gist)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    gaps = pos[idx].mean(1) - neg[idx].mean(1)
    gains = gist[idx].mean(1) - neg[idx].mean(1)
    ok = gaps >= 1.0
    point = share(gist, pos, neg)
    if ok.sum() < resamples / 2:
        return {"share": point, "low": math.nan, "high": math.nan, "se": math.nan}
    shares = 100.0 * gains[ok] / gaps[ok]
    tail = 100.0 * (1 - level) / 2
    low, high = np.percentile(shares, [tail, 100.0 - tail])
    return {"share": point, "low": float(low), "high": float(high), "se": float(np.std(shares))}


def split_intervals(
    predictions: Sequence[Mapping[str, Any]], splits: Sequence[str]
) -> dict[str, dict[str, dict[str, float]]]:
    """``split -> metric -> paired_interval`` for every split that has all three
    conditions (others are left out)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for split in splits:
        for key in METRICS:
            scores = example_scores(predictions, split, key)
            if scores is not None:
                out.setdefault(split, {})[key] = paired_interval(scores)
    return out


def gap_recovered(
    metrics: Mapping[str, Mapping[str, Mapping[str, float]]], split: str, key: str = "rougeL"
) -> float:
    """The share of the pos_control - neg_control gap in ``key`` that gist recovers, in %:
    ``100 * (gist - neg) / (pos - neg)``; NaN unless pos_control beats neg_control by at
    least one point (otherwise the controls do not bracket anything)."""
    m = metrics[split]
    return share(*(np.asarray([m[c][key]]) for c in CONDITIONS))


def format_share(share: float) -> str:
    """A gap share for tables and logs: a whole percentage, "-0.4" printed as "0%" (round()
    returns an int, which has no negative zero), "n/a" for NaN."""
    return "n/a" if math.isnan(share) else f"{round(share)}%"
