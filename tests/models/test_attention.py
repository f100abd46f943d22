"""The one attention function (``gist_jax.models.attention.attention``) against an explicit
numpy computation, both implementations, outputs and gradients; the KV cache's layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gist_jax.models.attention import (
    IMPLEMENTATIONS,
    MASK_VALUE,
    KVCache,
    attention,
    heads_major,
    slot_major,
)

BATCH, SLOTS, HEADS, KV_HEADS, DIM = 2, 7, 6, 2, 4


def numpy_attention(q, k, v, mask, bias, scale):
    """Dense masked softmax attention, one head at a time: ``q [B, Q, H, D]``, ``k`` and
    ``v`` ``[B, S, KVH, D]``, ``mask [B, 1 or H, Q, S]``, ``bias [1, H, Q, S]`` or None."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    out = np.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            logits = q[b, :, h] @ k[b, :, h // groups].T * scale
            if bias is not None:
                logits = logits + np.asarray(bias)[0, h]
            visible = np.asarray(mask)[b, min(h, mask.shape[1] - 1)]
            logits = np.where(visible, logits, MASK_VALUE)
            e = np.exp(logits - logits.max(axis=-1, keepdims=True))
            out[b, :, h] = (e / e.sum(axis=-1, keepdims=True)) @ v[b, :, h // groups]
    return out


def _inputs(q_len: int, with_bias: bool, kv_heads: int = KV_HEADS):
    rng = np.random.default_rng(q_len + 10 * with_bias)
    q = jnp.asarray(rng.standard_normal((BATCH, q_len, HEADS, DIM)), jnp.float32)
    k, v = (
        jnp.asarray(rng.standard_normal((BATCH, SLOTS, kv_heads, DIM)), jnp.float32)
        for _ in range(2)
    )
    # A different set of hidden slots per row and query, and one fully masked query row.
    mask = rng.random((BATCH, 1, q_len, SLOTS)) > 0.4
    mask[1, 0, 0] = False
    bias = None
    if with_bias:
        bias = jnp.asarray(rng.standard_normal((1, HEADS, q_len, SLOTS)), jnp.float32)
    return q, k, v, jnp.asarray(mask), bias


# "cudnn" (bfloat16 only) has its own test below.
@pytest.mark.parametrize("implementation", ["reference", "cpu"])
@pytest.mark.parametrize(
    ("q_len", "with_bias", "kv_heads"), [(1, False, 2), (3, False, 2), (3, True, 6)]
)
def test_attention_matches_numpy(implementation, q_len, with_bias, kv_heads):
    """Grouped-query (6 heads over 2) without a bias, as LLaMA; one key/value head per query
    head with a position bias and no scaling, as T5."""
    q, k, v, mask, bias = _inputs(q_len, with_bias, kv_heads)
    scale = 1.0 if with_bias else DIM**-0.5
    want = numpy_attention(q, k, v, mask, bias, scale)
    got = attention(
        q,
        *heads_major(k, v),
        mask,
        bias=bias,
        scale=1.0 if with_bias else None,
        implementation=implementation,
    )
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.parametrize("with_bias", [False, True])
def test_cpu_gradient_matches_autodiff_of_the_reference(with_bias):
    """The hand-written gradient of "cpu" against JAX's gradient of "reference", for the
    query, keys, values and (T5) the position bias."""
    q, k, v, mask, bias = _inputs(3, with_bias, HEADS if with_bias else KV_HEADS)
    weights = jnp.asarray(np.random.default_rng(5).standard_normal(q.shape), jnp.float32)
    k_t, v_t = heads_major(k, v)

    def loss(implementation, q, k_t, v_t, bias):
        out = attention(q, k_t, v_t, mask, bias=bias, implementation=implementation)
        return jnp.sum(out * weights)

    argnums = (1, 2, 3, 4) if with_bias else (1, 2, 3)
    want = jax.grad(loss, argnums)("reference", q, k_t, v_t, bias)
    got = jax.jit(jax.grad(loss, argnums), static_argnums=0)("cpu", q, k_t, v_t, bias)
    for a, b in zip(want, got, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)


def test_cudnn_path_passes_our_layout_and_mask_to_jax(monkeypatch):
    """The "cudnn" implementation hands keys, values, mask and bias to
    jax.nn.dot_product_attention in its layout. Its cuDNN backend needs an NVIDIA GPU, so
    here the same call runs on JAX's XLA backend, in bfloat16 as cuDNN requires."""
    from gist_jax.models import attention as attention_lib

    monkeypatch.setitem(attention_lib._JAX_BACKENDS, "cudnn", "xla")
    for q_len, with_bias, kv_heads in [(3, False, 2), (3, True, 6)]:
        q, k, v, mask, bias = _inputs(q_len, with_bias, kv_heads)
        scale = 1.0 if with_bias else DIM**-0.5
        want = numpy_attention(q, k, v, mask, bias, scale)
        q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
        got = attention(
            q16,
            *heads_major(k16, v16),
            mask,
            bias=bias,
            scale=1.0 if with_bias else None,
            implementation="cudnn",
        )
        assert got.dtype == jnp.bfloat16 and got.shape == q.shape
        # bfloat16 has 8 bits of mantissa: outputs of size ~1 agree to a few 1e-2.
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=5e-2)
    with pytest.raises(ValueError, match="needs bfloat16 or float16 compute"):
        attention(q, *heads_major(k, v), mask, implementation="cudnn")


def test_every_implementation_is_tested():
    # "flash" is tested in tests/models/test_flash_attention.py.
    assert set(IMPLEMENTATIONS) == {"reference", "cpu", "cudnn", "flash"}


def test_unknown_implementation_is_refused():
    q, k, v, mask, _ = _inputs(1, False)
    with pytest.raises(ValueError, match="attention implementation 'splash'"):
        attention(q, *heads_major(k, v), mask, implementation="splash")
    # "flash" reads the mask's fields, so a dense mask (or a bias) is refused, not guessed.
    with pytest.raises(ValueError, match=r"needs the mask as a gist\.SelfMask"):
        attention(q, *heads_major(k, v), mask, implementation="flash")


def test_cache_layouts_round_trip():
    rng = np.random.default_rng(0)
    k, v = (jnp.asarray(rng.standard_normal((3, 2, 5, 2, 4)), jnp.float32) for _ in range(2))
    k_t, v_t = heads_major(k, v)
    assert k_t.shape == (3, 2, 2, 4, 5) and v_t.shape == (3, 2, 2, 5, 4)
    np.testing.assert_array_equal(np.asarray(k_t[1, 0, 1, :, 3]), np.asarray(k[1, 0, 3, 1]))
    back_k, back_v = slot_major(k_t, v_t)
    np.testing.assert_array_equal(np.asarray(back_k), np.asarray(k))
    np.testing.assert_array_equal(np.asarray(back_v), np.asarray(v))

    cache = KVCache(k=k_t, v=v_t, pos=jnp.zeros((2, 5), jnp.int32), end=jnp.asarray(5))
    split = cache.per_layer()
    assert split.is_per_layer and len(split.k) == 3 and split.k[0].shape == (2, 2, 4, 5)
    np.testing.assert_array_equal(np.asarray(split.stacked().v), np.asarray(v_t))
    assert split.per_layer() is split and cache.stacked() is cache
