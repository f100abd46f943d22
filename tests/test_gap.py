"""The gap share and its paired bootstrap interval (``gist_jax.gap``): the point value is
the share of the mean scores, the interval brackets it and shrinks with more examples,
pairing makes it narrower than unpaired resampling would, and degenerate controls give
NaN; per-example scores are read back from prediction records."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gist_jax import gap


def _scores(n, seed=0):
    rng = np.random.default_rng(seed)
    difficulty = rng.uniform(0, 100, n)  # shared by the conditions: what pairing removes
    pos = np.clip(difficulty + 30 + rng.normal(0, 5, n), 0, 100)
    neg = np.clip(difficulty - 30 + rng.normal(0, 5, n), 0, 100)
    gist = np.clip(0.5 * pos + 0.5 * neg + rng.normal(0, 15, n), 0, 100)
    return {"gist": gist, "pos_control": pos, "neg_control": neg}


def test_point_share_and_interval():
    scores = _scores(200)
    out = gap.paired_interval(scores)
    want = (
        100
        * (scores["gist"].mean() - scores["neg_control"].mean())
        / (scores["pos_control"].mean() - scores["neg_control"].mean())
    )
    assert out["share"] == pytest.approx(want)
    assert out["low"] < out["share"] < out["high"]
    assert 0 < out["se"] < 5  # paired: the shared difficulty cancels
    wide = gap.paired_interval(_scores(20, seed=1))
    assert (wide["high"] - wide["low"]) > (out["high"] - out["low"])
    # Unpaired resampling (each condition on its own indices) is far wider.
    rng = np.random.default_rng(0)
    n = 200
    shares = []
    for _ in range(500):
        g, p, q = (scores[c][rng.integers(0, n, n)].mean() for c in gap.CONDITIONS)
        shares.append(100 * (g - q) / (p - q))
    assert np.std(shares) > 2 * out["se"]


def test_perfect_and_degenerate():
    scores = _scores(50)
    perfect = {**scores, "gist": scores["pos_control"]}
    out = gap.paired_interval(perfect)
    assert out["share"] == pytest.approx(100.0) and out["low"] == pytest.approx(100.0)
    tie = {c: np.full(10, 40.0) for c in gap.CONDITIONS}
    assert math.isnan(gap.paired_interval(tie)["share"])
    assert math.isnan(gap.share(tie["gist"], tie["pos_control"], tie["neg_control"]))


def test_scores_from_predictions():
    def rows(condition, predictions):
        refs = ["red green", "blue sky"]
        return [
            {"split": "s", "condition": condition, "reference": r, "prediction": p}
            for r, p in zip(refs, predictions, strict=True)
        ]

    preds = [
        *rows("pos_control", ["red green", "blue sky"]),
        *rows("neg_control", ["zzz", "blue"]),
        *rows("gist", ["red green", "zzz"]),
    ]
    em = gap.example_scores(preds, "s", "exact_match")
    assert em["pos_control"].tolist() == [100.0, 100.0]
    assert em["neg_control"].tolist() == [0.0, 0.0] and em["gist"].tolist() == [100.0, 0.0]
    rouge = gap.example_scores(preds, "s", "rougeL")
    assert rouge["neg_control"][1] == pytest.approx(100 * 2 / 3)  # "blue" vs "blue sky"
    assert gap.example_scores(preds[:4], "s", "rougeL") is None  # gist missing
    intervals = gap.split_intervals(preds, ["s", "other"])
    assert set(intervals) == {"s"} and set(intervals["s"]) == set(gap.METRICS)
    with pytest.raises(ValueError, match="unknown metric"):
        gap.example_scores(preds, "s", "bleu")
