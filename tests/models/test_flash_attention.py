"""The "flash" Pallas kernel (``gist_jax.models.flash_attention``, interpret mode on the CPU)
against "reference" attention with the dense mask of the same ``gist.SelfMask``: every
condition, packed rows, grouped-query heads, padding, k = 0..4 gist tokens, outputs and
gradients, float32 and bfloat16; that masked-out tiles are skipped; and a LLaMA model's
loss and gradients under ``model.attention="flash"``."""

from __future__ import annotations

import dataclasses

import fixtures_gist
import fixtures_llama as fx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gist_jax import gist
from gist_jax.convert import llama as convert_llama
from gist_jax.inference import decode, gist_cache
from gist_jax.models import llama
from gist_jax.models.attention import attention, heads_major
from gist_jax.models.flash_attention import flash_attention

LENGTH, HEADS, DIM, BLOCK = 32, 4, 16, 8


def _packed_mask(num_gist: int, condition: str, packed: bool, seed: int = 0) -> gist.SelfMask:
    """Two rows of ``LENGTH`` tokens: row 0 holds two examples (or one, unpacked) and 5
    padding tokens, row 1 one example and 9 padding tokens. Each example has ``num_gist``
    gist tokens after a prompt of a few tokens; spans are per token (as packing gives)."""
    rng = np.random.default_rng(seed)
    lengths = [[14, 13] if packed else [27], [23]]
    positions = np.full((2, LENGTH), -1, np.int32)
    segments = np.zeros((2, LENGTH), np.int32)
    first = np.full((2, LENGTH), gist.NO_GIST, np.int32)
    last = np.full((2, LENGTH), gist.NO_GIST, np.int32)
    for row, examples in enumerate(lengths):
        start = 0
        for segment, length in enumerate(examples, start=1):
            end = start + length
            positions[row, start:end] = np.arange(length)
            segments[row, start:end] = segment
            if num_gist:
                at = int(rng.integers(2, 6))
                first[row, start:end], last[row, start:end] = at, at + num_gist - 1
            start = end
    return gist.SelfMask(
        positions, positions, first, last, condition, q_segments=segments, k_segments=segments
    )


def _qkv(kv_heads: int, dtype, seed: int = 1):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, LENGTH, HEADS, DIM))
    k, v = (rng.standard_normal((2, LENGTH, kv_heads, DIM)) for _ in range(2))
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    keys_t, values = heads_major(k, v)
    return q, keys_t, values


def _both(mask: gist.SelfMask, q, keys_t, values, weights):
    """Outputs and gradients of the weighted sum over real query rows, flash and reference."""
    real = jnp.asarray(mask.q_positions >= 0)[:, :, None, None]

    def loss(impl, q, keys_t, values):
        if impl == "flash":
            out = flash_attention(q, keys_t, values, mask, DIM**-0.5, block_q=BLOCK, block_k=BLOCK)
        else:
            out = attention(q, keys_t, values, mask.dense(), implementation="reference")
        out = jnp.where(real, out.astype(jnp.float32), 0.0)
        return jnp.sum(out * weights), out

    results = {}
    for impl in ("flash", "reference"):
        grad_fn = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)
        (_, out), grads = jax.jit(grad_fn, static_argnums=0)(impl, q, keys_t, values)
        results[impl] = (out, *grads)
    return results


@pytest.mark.parametrize("condition", gist.CONDITIONS)
@pytest.mark.parametrize(
    ("num_gist", "packed", "kv_heads"),
    [(0, True, 2), (1, False, 4), (2, True, 1), (3, True, 2), (4, False, 2)],
)
def test_flash_matches_reference_float32(condition, num_gist, packed, kv_heads):
    mask = _packed_mask(num_gist, condition, packed)
    q, keys_t, values = _qkv(kv_heads, jnp.float32)
    weights = jnp.asarray(np.random.default_rng(2).standard_normal((2, LENGTH, HEADS, DIM)))
    results = _both(mask, q, keys_t, values, weights)
    for name, got, want in zip(
        ("out", "dq", "dk", "dv"), results["flash"], results["reference"], strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5, err_msg=name
        )


def test_flash_matches_reference_bfloat16():
    """bfloat16 operands, float32 softmax and accumulation: within 2e-2 of "reference" run on
    the same bfloat16 inputs (both round products to bfloat16 at different points)."""
    mask = _packed_mask(2, "gist", packed=True)
    q, keys_t, values = _qkv(2, jnp.bfloat16)
    weights = jnp.asarray(np.random.default_rng(2).standard_normal((2, LENGTH, HEADS, DIM)))
    results = _both(mask, q, keys_t, values, weights)
    for name, got, want in zip(
        ("out", "dq", "dk", "dv"), results["flash"], results["reference"], strict=True
    ):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2, err_msg=name)


def test_flash_unblocked_lengths_and_default_tiles():
    """Lengths that are not a multiple of the tile (padded inside) and the default tiles."""
    mask = _packed_mask(2, "gist", packed=True)
    cut = 27
    mask = gist.SelfMask(
        *(
            np.asarray(f)[:, :cut]
            for f in (mask.q_positions, mask.k_positions, mask.first, mask.last)
        ),
        condition="gist",
        q_segments=mask.q_segments[:, :cut],
        k_segments=mask.k_segments[:, :cut],
    )
    q, keys_t, values = _qkv(2, jnp.float32)
    q, keys_t, values = q[:, :cut], keys_t[..., :cut], values[:, :, :cut]
    got = flash_attention(q, keys_t, values, mask, DIM**-0.5)
    want = attention(q, keys_t, values, mask.dense(), implementation="reference")
    real = np.asarray(mask.q_positions >= 0)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)


def test_flash_skips_hidden_tiles():
    """Tiles where nothing is visible are never read: keys of the prompt tile hidden from the
    queries after the gist, and of future tiles, are NaN, and those queries' outputs and
    gradients stay finite and equal to "reference" with zeros there. (A tile that is read
    multiplies NaN by a zero probability and gives NaN.)"""
    length, block = 32, 8
    positions = np.arange(length, dtype=np.int32)[None]
    # Gist tokens at 8..9: queries 16.. see keys >= 8; the prompt tile (keys 0..7) is hidden
    # from the tiles of queries 16..23 and 24..31, and keys 24..31 from queries 0..23.
    first, last = np.array([8], np.int32), np.array([9], np.int32)
    mask = gist.SelfMask(positions, positions, first, last, condition="gist", causal=True)
    q, keys_t, values = _qkv(2, jnp.float32)
    q, keys_t, values = q[:1], keys_t[:1], values[:1]
    poisoned_keys = keys_t.at[..., :block].set(jnp.nan)
    poisoned_values = values.at[:, :, :block].set(jnp.nan)
    zero_keys = keys_t.at[..., :block].set(0.0)
    zero_values = values.at[:, :, :block].set(0.0)
    rows = slice(16, length)  # queries whose tiles must skip the prompt tile

    def out_and_dq(fn, k, v):
        def loss(q):
            out = fn(q, k, v)
            return jnp.sum(out[:, rows]), out

        (_, out), dq = jax.value_and_grad(loss, has_aux=True)(q)
        return out[:, rows], dq[:, rows]

    def flash(q, k, v):
        return flash_attention(q, k, v, mask, DIM**-0.5, block_q=block, block_k=block)

    def reference(q, k, v):
        return attention(q, k, v, mask.dense(), implementation="reference")

    got_out, got_dq = out_and_dq(flash, poisoned_keys, poisoned_values)
    want_out, want_dq = out_and_dq(reference, zero_keys, zero_values)
    assert np.isfinite(np.asarray(got_out)).all() and np.isfinite(np.asarray(got_dq)).all()
    np.testing.assert_allclose(np.asarray(got_out), np.asarray(want_out), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_dq), np.asarray(want_dq), atol=1e-5)
    # The same poison under pos_control (the prompt is visible) does reach those rows.
    visible = gist.SelfMask(positions, positions, first, last, condition="pos_control")
    out = flash_attention(
        q, poisoned_keys, poisoned_values, visible, DIM**-0.5, block_q=block, block_k=block
    )
    assert np.isnan(np.asarray(out)[:, rows]).all()


@pytest.fixture(scope="module")
def gqa_model():
    """A tiny grouped-query LLaMA from transformers, converted, and its padded gist batch."""
    model = fx.make_hf_model("gqa_tied_llama3")
    config = convert_llama.config_from_hf(model.config.to_dict())
    params = convert_llama.params_from_hf(fx.hf_state_dict(model), config)
    return model, config, params, fx.padded_batch()


@pytest.mark.parametrize("condition", gist.CONDITIONS)
def test_flash_llama_logits_match_pytorch(gqa_model, condition):
    """A whole model under ``attention="flash"`` (scanned layers), given the mask as a
    ``gist.SelfMask``: logits equal transformers' with the same dense 4D gist mask."""
    model, config, params, batch = gqa_model
    ids, positions, valid = batch["input_ids"], batch["positions"], batch["valid"]
    first, last = gist.gist_spans(ids, fx.GIST_ID)
    flash = dataclasses.replace(config, attention="flash", scan_layers=True)
    mask = gist.SelfMask(positions, positions, first, last, condition=condition)
    apply = jax.jit(lambda p: llama.build_model(flash).apply({"params": p}, ids, positions, mask))
    ours, _ = apply(llama.relayout_params(params, config, True))
    ref = fx.torch_logits(model, ids, positions, bool_mask=fx.gist_causal_mask(ids, condition))
    assert np.abs(np.asarray(ours)[valid] - ref[valid]).max() < 1e-4


def test_flash_llama_loss_gradients_match_reference(gqa_model):
    """Parameter gradients of a loss over real tokens: "flash" against "reference"."""
    _, config, params, batch = gqa_model
    ids, positions, valid = batch["input_ids"], batch["positions"], batch["valid"]
    first, last = gist.gist_spans(ids, fx.GIST_ID)
    mask = gist.SelfMask(positions, positions, first, last, condition="gist")

    def grads(implementation: str):
        variant = dataclasses.replace(config, attention=implementation)

        def loss(p):
            logits = llama.build_model(variant).apply({"params": p}, ids, positions, mask)[0]
            return jnp.sum(jnp.where(valid[..., None], jax.nn.log_softmax(logits), 0.0)[..., 5])

        return jax.jit(jax.grad(loss))(params)

    got, want = grads("flash"), grads("reference")
    for (path, g), w in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(w), atol=2e-5, rtol=1e-4, err_msg=str(path)
        )


def test_flash_serves_decoding_and_the_gist_cache():
    """Greedy decoding (prefill and cached steps) and decoding from a compressed gist cache
    under "flash" give the logits of "cpu" full decoding (within 1e-5 of their size) and
    the same tokens."""
    config, params = fixtures_gist.llama_model()
    flash = dataclasses.replace(config, attention="flash")
    examples = fixtures_gist.make_examples(fx.GIST_ID, [])
    kwargs = dict(
        max_new_tokens=fixtures_gist.MAX_NEW,
        return_logits=True,
        batch_size=fixtures_gist.BATCH,
        eos_token_ids=[],
    )
    want = decode.generate(config, params, examples, **kwargs)
    full = decode.generate(flash, params, examples, **kwargs)
    split = gist_cache.dedupe_prompts(examples, fx.GIST_ID)
    cache = gist_cache.compress(flash, params, split.prompts, batch_size=fixtures_gist.BATCH)
    cached = gist_cache.generate(flash, params, cache.take(split.rows), split.inputs, **kwargs)
    for w, f, c in zip(want, full, cached, strict=True):
        assert f.tokens == w.tokens and c.tokens == w.tokens
        # Relative to the logits' size, as tests/inference/test_compress.py (float32 rounding).
        scale = float(np.abs(w.logits).max())
        assert np.abs(f.logits - w.logits).max() / scale < fixtures_gist.TOL
        assert np.abs(c.logits - w.logits).max() / scale < fixtures_gist.TOL
