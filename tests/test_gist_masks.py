"""The gist masks against a dense, loop-by-loop reference written from the spec's table."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gist_jax import gist

GIST, PAD = 7, 0
CONDITIONS = gist.CONDITIONS


def reference_self_mask(ids: np.ndarray, condition: str) -> np.ndarray:
    """Entry by entry from the table in docs/gisting.md; non-causal, pad keys off."""
    batch, length = ids.shape
    out = np.zeros((batch, 1, length, length), dtype=bool)
    for b in range(batch):
        where = [j for j in range(length) if ids[b, j] == GIST]
        for i in range(length):
            for j in range(length):
                if ids[b, j] == PAD:
                    continue
                if not where or condition == "pos_control":
                    allowed = True
                else:
                    first, last = where[0], where[-1]
                    if i <= last:
                        allowed = j <= last
                    elif condition == "gist":
                        allowed = j >= first
                    else:
                        allowed = j > last
                out[b, 0, i, j] = allowed
    return out


def reference_cross_mask(ids: np.ndarray, condition: str) -> np.ndarray:
    batch, length = ids.shape
    out = np.zeros((batch, 1, 1, length), dtype=bool)
    for b in range(batch):
        where = [j for j in range(length) if ids[b, j] == GIST]
        for j in range(length):
            if ids[b, j] == PAD:
                continue
            if not where or condition == "pos_control":
                out[b, 0, 0, j] = True
            elif condition == "gist":
                out[b, 0, 0, j] = j >= where[0]
            else:
                out[b, 0, 0, j] = j > where[-1]
    return out


@st.composite
def gist_batches(draw):
    """Random batches: random text, 0..10 contiguous gist tokens at a random place, random
    right padding."""
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(1, 24))
    rows = []
    for _ in range(batch):
        real = draw(st.integers(1, length))
        row = draw(st.lists(st.integers(1, 6), min_size=real, max_size=real))
        num_gist = draw(st.integers(0, min(10, real)))
        start = draw(st.integers(0, real - num_gist))
        row[start : start + num_gist] = [GIST] * num_gist
        rows.append(row + [PAD] * (length - real))
    return np.array(rows, dtype=np.int32)


@settings(max_examples=200, deadline=None)
@given(ids=gist_batches(), condition=st.sampled_from(CONDITIONS))
def test_self_mask_matches_dense_reference(ids, condition):
    got = np.asarray(gist.make_gist_mask(ids, GIST, PAD, condition))
    np.testing.assert_array_equal(got, reference_self_mask(ids, condition))


@settings(max_examples=200, deadline=None)
@given(ids=gist_batches(), condition=st.sampled_from(CONDITIONS))
def test_cross_mask_matches_dense_reference(ids, condition):
    got = np.asarray(gist.make_cross_attention_mask(ids, GIST, PAD, condition))
    np.testing.assert_array_equal(got, reference_cross_mask(ids, condition))


@settings(max_examples=150, deadline=None)
@given(ids=gist_batches(), condition=st.sampled_from(CONDITIONS), data=st.data())
def test_span_form_serves_full_sequence_decode_step_and_gist_only_cache(ids, condition, data):
    """The span form with absolute positions reproduces rows of the dense mask for a
    single decode step and for a cache that keeps only the gist keys."""
    dense = reference_self_mask(ids, condition)[:, 0]
    causal = np.tril(np.ones(dense.shape[1:], dtype=bool))
    first, last = gist.gist_spans(ids, GIST)
    batch, length = ids.shape
    positions = np.where(ids != PAD, np.arange(length), -1)
    full = np.asarray(gist.decoder_self_mask(positions, positions, first, last, condition))
    expected = dense & causal & (positions >= 0)[:, None, :]
    real_rows = positions >= 0  # padding queries see nothing; their rows are never used
    np.testing.assert_array_equal(full[:, 0][real_rows], expected[real_rows])
    assert not full[:, 0][~real_rows].any()

    # one decode step at position p per example, keys are every position so far
    p = data.draw(st.integers(0, length - 1))
    step = np.asarray(
        gist.decoder_self_mask(np.full((batch, 1), p), positions, first, last, condition)
    )
    np.testing.assert_array_equal(
        step[:, 0, 0], dense[:, p] & (np.arange(length) <= p) & (positions >= 0)
    )

    # a cache holding only the gist keys (empty slots -1), queried after the gists
    if condition == "gist":
        first_np, last_np = np.asarray(first), np.asarray(last)
        for b in range(batch):
            if first_np[b] < 0 or last_np[b] + 1 >= length:
                continue
            gist_pos = np.arange(first_np[b], last_np[b] + 1)
            k_pos = np.concatenate([gist_pos, [-1, -1]])[None]
            q = np.array([[last_np[b] + 1]])
            got = np.asarray(
                gist.decoder_self_mask(q, k_pos, first[b : b + 1], last[b : b + 1], condition)
            )[0, 0, 0]
            assert got[: len(gist_pos)].all() and not got[len(gist_pos) :].any()


def test_worked_example_from_the_spec():
    a, b, c, d, e = 1, 2, 3, 4, 5
    ids = np.array([[a, b, c, GIST, GIST, d, e, PAD]])
    mask = np.asarray(gist.make_gist_mask(ids, GIST, PAD, "gist"))[0, 0].astype(int)
    expected = np.array(
        [
            [1, 1, 1, 1, 1, 0, 0, 0],  # a
            [1, 1, 1, 1, 1, 0, 0, 0],  # b
            [1, 1, 1, 1, 1, 0, 0, 0],  # c
            [1, 1, 1, 1, 1, 0, 0, 0],  # G
            [1, 1, 1, 1, 1, 0, 0, 0],  # G
            [0, 0, 0, 1, 1, 1, 1, 0],  # d
            [0, 0, 0, 1, 1, 1, 1, 0],  # e
            [0, 0, 0, 1, 1, 1, 1, 0],  # PAD (query rows of padding are never used)
        ]
    )
    np.testing.assert_array_equal(mask, expected)


def test_non_contiguous_gist_tokens_are_rejected():
    ids = np.array([[1, GIST, GIST, 2], [1, GIST, 2, GIST]])
    with pytest.raises(ValueError, match=r"example 1: gist tokens .* contiguous.*\[1, 3\]"):
        gist.make_gist_mask(ids, GIST, PAD)
    with pytest.raises(ValueError, match="contiguous"):
        gist.make_cross_attention_mask(ids, GIST, PAD)


def test_unknown_condition_is_rejected():
    with pytest.raises(ValueError, match="unknown gist condition 'gists'"):
        gist.make_gist_mask(np.array([[1, GIST]]), GIST, condition="gists")


def test_no_prompt_leak_when_the_prompt_ends_in_gist_tokens():
    """Original-code defect: generating after a prompt that ends in <GIST> reused the last
    (all-ones) mask row. Here a new token is after the gists by its position."""
    ids = np.array([[1, 2, 3, GIST]])
    first, last = gist.gist_spans(ids, GIST)
    keys = np.arange(5)[None]
    new_token = np.asarray(gist.decoder_self_mask(np.array([[4]]), keys, first, last, "gist"))
    np.testing.assert_array_equal(new_token[0, 0, 0], [False, False, False, True, True])


def test_t5_cross_mask_defects_are_absent():
    """neg_control hides padding; an example whose gists were truncated away sees every
    real token instead of nothing."""
    ids = np.array([[1, GIST, 2, 3, PAD, PAD], [1, 2, 3, 4, 5, PAD]])
    neg = np.asarray(gist.make_cross_attention_mask(ids, GIST, PAD, "neg_control"))[:, 0, 0]
    np.testing.assert_array_equal(neg[0], [False, False, True, True, False, False])
    for condition in CONDITIONS:
        m = np.asarray(gist.make_cross_attention_mask(ids, GIST, PAD, condition))[1, 0, 0]
        np.testing.assert_array_equal(m, [True, True, True, True, True, False])


def test_packed_rows_use_per_token_spans_and_segments():
    """Two examples packed in one row equal the same examples in separate rows."""
    ex1 = [1, GIST, 2, 3]
    ex2 = [4, 5, GIST, GIST, 6]
    separate = [
        np.asarray(gist.make_gist_mask(np.array([ex]), GIST, PAD, "gist"))[0, 0]
        & np.tril(np.ones((len(ex), len(ex)), bool))
        for ex in (ex1, ex2)
    ]
    positions = np.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, -1]])
    segments = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 0]])
    first = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, -1]])
    last = np.array([[1, 1, 1, 1, 3, 3, 3, 3, 3, -1]])
    packed = np.asarray(
        gist.decoder_self_mask(positions, positions, first, last, "gist", segments, segments)
    )[0, 0]
    np.testing.assert_array_equal(packed[:4, :4], separate[0])
    np.testing.assert_array_equal(packed[4:9, 4:9], separate[1])
    assert not packed[:4, 4:].any() and not packed[4:9, :4].any()


def test_spans_are_jittable():
    import jax

    ids = np.array([[1, GIST, GIST, 2], [1, 2, 3, 4]])
    first, last = jax.jit(lambda x: gist.gist_spans(x, GIST))(ids)
    np.testing.assert_array_equal(first, [1, -1])
    np.testing.assert_array_equal(last, [2, -1])


@pytest.mark.parametrize("condition", CONDITIONS)
def test_jitted_masks_equal_host_masks(condition):
    """Inside jit the same functions run on jax.numpy; they must agree with the numpy path."""
    import jax

    rng = np.random.default_rng(0)
    ids = rng.integers(1, 6, size=(3, 12)).astype(np.int32)
    ids[0, 3:5] = GIST
    ids[1, 0] = GIST
    ids[1, 9:] = PAD
    host_self = gist.make_gist_mask(ids, GIST, PAD, condition)
    host_cross = gist.make_cross_attention_mask(ids, GIST, PAD, condition)
    jit_self = jax.jit(lambda x: gist.make_gist_mask(x, GIST, PAD, condition))(ids)
    jit_cross = jax.jit(lambda x: gist.make_cross_attention_mask(x, GIST, PAD, condition))(ids)
    assert isinstance(host_self, np.ndarray) and isinstance(jit_self, jax.Array)
    np.testing.assert_array_equal(np.asarray(jit_self), host_self)
    np.testing.assert_array_equal(np.asarray(jit_cross), host_cross)
