"""ROUGE-L and exact match on small cases computed by hand."""

from __future__ import annotations

import pytest

from gist_jax import metrics


def test_rouge_l_hand_computed():
    # identical
    assert metrics.rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(100.0)
    # LCS 2 of a 2-token prediction and a 6-token reference: P = 1, R = 1/3, F = 0.5
    assert metrics.rouge_l(["the cat"], ["the cat sat on the mat"]) == pytest.approx(50.0)
    # LCS "alpha gamma delta" = 3: P = 3/4, R = 3/6, F = 2PR/(P+R) = 0.6
    pred, ref = "alpha beta gamma delta", "alpha xray gamma yankee delta zulu"
    assert metrics.rouge_l([pred], [ref]) == pytest.approx(60.0)
    # order matters (subsequence, not bag of words): LCS 1 of 2, F = 0.5
    assert metrics.rouge_l(["beta alpha"], ["alpha beta"]) == pytest.approx(50.0)
    # case and punctuation are ignored, words are stemmed (cats -> cat, running -> run)
    assert metrics.rouge_l(["Hello, World!"], ["hello world"]) == pytest.approx(100.0)
    assert metrics.rouge_l(["cats running"], ["cat run"]) == pytest.approx(100.0)
    # no overlap, empty prediction, and nothing scorable on either side
    assert metrics.rouge_l(["dog"], ["cat"]) == 0.0
    assert metrics.rouge_l([""], ["cat"]) == 0.0
    assert metrics.rouge_l(["..."], ["!!"]) == 0.0


def test_rouge_l_is_the_mean_of_per_example_f():
    preds = ["the cat sat", "the cat", "dog"]
    refs = ["the cat sat", "the cat sat on the mat", "cat"]
    assert metrics.rouge_l_scores(preds, refs) == pytest.approx([1.0, 0.5, 0.0])
    assert metrics.rouge_l(preds, refs) == pytest.approx(50.0)


def test_exact_match():
    assert metrics.exact_match([" yes", "No", "a  b"], ["yes\n", "no", "a b"]) == pytest.approx(
        100 / 3
    )
    assert metrics.exact_match(["x"], ["x"]) == 100.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metrics.rouge_l(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions to score"):
        metrics.exact_match([], [])
    with pytest.raises(TypeError, match=r"references\[0\] is NoneType, expected str"):
        metrics.rouge_l(["a"], [None])
