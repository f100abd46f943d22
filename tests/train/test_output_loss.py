"""The loss-only output layer (gist_jax.train.output_loss): same loss and gradients as full
logits, for any chunk size, tied and untied output layers, rows without loss tokens; and
chunks without loss positions are really skipped."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fixtures_train import quick_config

from gist_jax import data, model_loading, tiny_tokenizer
from gist_jax.models import llama
from gist_jax.models.family import LLAMA
from gist_jax.train import output_loss
from gist_jax.train import step as tstep


def _reference(hidden, kernel, targets, weights):
    logits = jnp.einsum("bld,dv->blv", hidden, kernel)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(ce * weights)


def _random_problem(seed=0, batch=3, length=20, dim=8, vocab=11):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(batch, length, dim)).astype(np.float32)
    kernel = rng.normal(size=(dim, vocab)).astype(np.float32)
    targets = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
    weights = (rng.random((batch, length)) < 0.3).astype(np.float32)
    weights[1] = 0.0  # a row with no loss position at all
    return hidden, kernel, targets, weights


@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 20, 64])
def test_chunked_loss_and_gradients_match_full_logits(chunk):
    hidden, kernel, targets, weights = _random_problem()
    want, (want_dh, want_dk) = jax.value_and_grad(_reference, argnums=(0, 1))(
        hidden, kernel, targets, weights
    )
    got, (got_dh, got_dk) = jax.jit(
        jax.value_and_grad(output_loss.chunked_cross_entropy, argnums=(0, 1)),
        static_argnums=4,
    )(hidden, kernel, targets, weights, chunk)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got_dh, want_dh, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got_dk, want_dk, rtol=1e-5, atol=1e-7)


def test_no_loss_positions_gives_zero_and_zero_gradients():
    hidden, kernel, targets, weights = _random_problem()
    zero = np.zeros_like(weights)
    loss, grads = jax.value_and_grad(output_loss.chunked_cross_entropy, argnums=(0, 1))(
        hidden, kernel, targets, zero, 4
    )
    assert float(loss) == 0.0
    assert all(not np.any(np.asarray(g)) for g in grads)


def test_chunks_without_loss_positions_are_skipped():
    # Every row has exactly `chunk` loss positions, so after sorting they fill the first
    # chunk; every other position holds NaN. Computing any other chunk would give NaN
    # (NaN logits times weight 0 is NaN); skipped, the loss equals the reference on the
    # loss positions alone.
    batch, length, chunk = 2, 12, 4
    hidden, kernel, targets, _ = _random_problem(batch=batch, length=length)
    weights = np.zeros((batch, length), np.float32)
    weights[0, [1, 4, 5, 11]] = 1.0
    weights[1, [0, 2, 3, 9]] = 1.0
    clean = _reference(hidden, kernel, targets, weights)
    poisoned = np.where(weights[..., None] > 0, hidden, np.nan).astype(np.float32)
    got = jax.jit(output_loss.chunked_cross_entropy, static_argnums=4)(
        poisoned, kernel, targets, weights, chunk
    )
    np.testing.assert_allclose(got, clean, rtol=1e-6)
    # One chunk per row ran (what the benchmark's FLOP count uses).
    assert output_loss.computed_positions(weights, chunk) == batch * chunk
    assert output_loss.computed_positions(np.zeros_like(weights), chunk) == 0
    assert output_loss.computed_positions(np.ones_like(weights), chunk) == batch * length


def test_bad_arguments_are_named():
    hidden, kernel, targets, weights = _random_problem()
    with pytest.raises(ValueError, match="chunk must be > 0"):
        output_loss.chunked_cross_entropy(hidden, kernel, targets, weights, 0)
    with pytest.raises(ValueError, match=r"must agree on \[batch, length\]"):
        output_loss.chunked_cross_entropy(hidden[:, :-1], kernel, targets, weights, 4)


@pytest.mark.parametrize("tied", [True, False])
def test_train_loss_with_chunks_matches_full_logits(tied):
    tokenizer = tiny_tokenizer.synthetic_bpe(512)
    examples, _ = data.load_examples("synthetic", "validation_seen", num_examples=8, seed=5)
    encoded, _ = data.encode_decoder_examples(examples, tokenizer, 1, 64)
    batch = data.collate_decoder([[ex] for ex in encoded], 64, tokenizer.pad_token_id)
    loaded = model_loading.load_model(quick_config("tiny_llama"))
    config = dataclasses.replace(loaded.config, tie_word_embeddings=tied)
    model = llama.build_model(config)
    params = LLAMA.init_params(config, jax.random.key(2))
    assert ("lm_head" in params) != tied

    def loss(p, chunk):
        total, count = tstep.loss_sums(model, LLAMA, p, batch, "gist", chunk)
        return total / count

    full, full_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, 0)
    chunked, chunked_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, 16)
    np.testing.assert_allclose(chunked, full, rtol=1e-6)
    pairs = zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(full_grads), strict=True)
    for got, want in pairs:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_bfloat16_hidden_states_give_float32_loss_and_matching_gradients():
    hidden, kernel, targets, weights = _random_problem(seed=4)
    bf16 = jnp.asarray(hidden, jnp.bfloat16)
    kernel_bf16 = jnp.asarray(kernel, jnp.bfloat16).astype(jnp.float32)

    def reference(h, k):
        logits = jnp.einsum(
            "bld,dv->blv", h, k.astype(jnp.bfloat16), preferred_element_type=jnp.float32
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(ce * weights)

    want, want_grads = jax.value_and_grad(reference, argnums=(0, 1))(bf16, kernel_bf16)
    got, got_grads = jax.value_and_grad(output_loss.chunked_cross_entropy, argnums=(0, 1))(
        bf16, kernel_bf16, targets, weights, 4
    )
    assert got.dtype == jnp.float32 and got_grads[0].dtype == jnp.bfloat16
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(np.float32(g), np.float32(w), rtol=2e-2, atol=2e-2)
