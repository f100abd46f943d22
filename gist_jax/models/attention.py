"""Shared attention pieces: masked dot-product attention (with grouped-query heads) and
the explicit key/value cache that decoding and gist compression slice and store.

Masks arrive as booleans built by ``gist_jax.gist``; they are applied here with a
finite large negative logit so that fully masked rows (padding queries) produce a
uniform, finite softmax instead of NaN.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

# Finite, so a fully masked row softmaxes to a uniform distribution rather than NaN;
# large enough that exp(masked - unmasked) underflows to exactly 0 in float32.
MASK_VALUE = -1e30


def _head_groups(query: jax.Array, kv_heads: int, scale: float | None) -> tuple[int, float]:
    """Query heads per key/value head, and the logit scale (``None``: ``D ** -0.5``)."""
    heads, head_dim = query.shape[2], query.shape[3]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    return heads // kv_heads, head_dim**-0.5 if scale is None else scale


def _grouped_mask(mask: jax.Array, kv_heads: int, groups: int, q_len: int, k_len: int) -> jax.Array:
    """``bool[B, 1 or H, Q, K]`` -> ``[B, 1 or KVH, 1 or G, Q, K]``, the logits' layout."""
    batch = mask.shape[0]
    mask = jnp.broadcast_to(mask, (batch, mask.shape[1], q_len, k_len))
    if mask.shape[1] == 1:
        return mask[:, :, None]
    return mask.reshape(batch, kv_heads, groups, q_len, k_len)


def _masked_softmax(
    logits: jax.Array, mask: jax.Array | None, dtype: jnp.dtype, bias: jax.Array | None = None
) -> jax.Array:
    """Softmax over the last axis of float32 ``logits [B, KVH, G, Q, K]`` after adding
    ``bias`` (``[B or 1, H, Q, K]``) and masking with ``bool[B, 1 or H, Q, K]``; returns
    the weights in ``dtype``."""
    _, kv_heads, groups, q_len, k_len = logits.shape
    if bias is not None:
        logits = logits + bias.astype(jnp.float32).reshape(-1, kv_heads, groups, q_len, k_len)
    if mask is not None:
        logits = jnp.where(_grouped_mask(mask, kv_heads, groups, q_len, k_len), logits, MASK_VALUE)
    return jax.nn.softmax(logits, axis=-1).astype(dtype)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    bias: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Attention with grouped-query heads and a boolean mask.

    Args:
      query: ``[B, Q, H, D]``.
      key, value: ``[B, K, KVH, D]`` with ``H % KVH == 0`` (KVH < H is grouped-query).
      mask: ``bool[B, 1 or H, Q, K]`` (True = may attend) or None.
      bias: optional additive ``[B or 1, H, Q, K]`` (T5's relative position bias).
      scale: logit scale; ``None`` means ``D ** -0.5``; T5 passes 1.0.

    Returns ``[B, Q, H, D]`` in the query's dtype. Softmax runs in float32.
    """
    batch, q_len, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    groups, scale = _head_groups(query, kv_heads, scale)
    q = query.reshape(batch, q_len, kv_heads, groups, head_dim)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, key, preferred_element_type=jnp.float32)
    weights = _masked_softmax(logits * scale, mask, value.dtype, bias)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", weights, value)
    return out.reshape(batch, q_len, heads, head_dim)


def heads_major_attention(
    query: jax.Array,
    key_t: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    scale: float | None = None,
) -> jax.Array:
    """``dot_product_attention`` with keys and values laid out per key/value head:
    ``key_t [B, KVH, D, S]`` (transposed) and ``value [B, KVH, S, D]``; ``query
    [B, Q, H, D]``, ``mask bool[B, 1 or H, Q, S]``; returns ``[B, Q, H, D]``.

    Why this layout: every product is then a plain batched matrix product per batch row
    and key/value head (``[G*Q, D] x [D, S]``, ``[G*Q, S] x [S, D]``), which XLA:CPU runs
    on its operands as they are, and the softmax reduces over the contiguous last axis.
    With ``[B, S, KVH, D]`` operands it first copies them into that form, which in decoding
    (the ``KVCache.per_layer`` cache is kept in this layout) cost more than the products
    (batch 16, 127 slots, 30 layers: ~47 ms vs ~7 ms per token). The gradient is written
    out (``_attend``): the softmax backward's row sums are taken over ``D`` of the output,
    not over ``S`` of the probabilities.
    """
    batch, q_len, heads, head_dim = query.shape
    kv_heads = key_t.shape[1]
    groups, scale = _head_groups(query, kv_heads, scale)
    q = query.reshape(batch, q_len, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    if mask is not None:
        mask = _grouped_mask(mask, kv_heads, groups, q_len, key_t.shape[3])
    out = _attend(q, key_t, value, mask, float(scale))
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, head_dim)


def _merge_groups(x: jax.Array) -> jax.Array:
    """``[B, KVH, G, Q, N]`` -> ``[B, KVH, G*Q, N]`` (a free reshape)."""
    return x.reshape(*x.shape[:2], x.shape[2] * x.shape[3], x.shape[4])


def _attention_probs(
    q: jax.Array, key_t: jax.Array, mask: jax.Array | None, scale: float
) -> jax.Array:
    """Float32 softmax probabilities ``[B, KVH, G, Q, S]`` of ``q [B, KVH, G, Q, D]``
    against ``key_t [B, KVH, D, S]``."""
    b, h, g, n, _ = q.shape
    logits = jnp.einsum(
        "bhqd,bhds->bhqs", _merge_groups(q), key_t, preferred_element_type=jnp.float32
    )
    logits = logits.reshape(b, h, g, n, key_t.shape[3]) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, MASK_VALUE)
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    # One reciprocal per row and a product per entry: XLA:CPU's elementwise division was
    # among the slowest ops of the train step's profile at 1,024-token rows.
    return e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(
    q: jax.Array, key_t: jax.Array, value: jax.Array, mask: jax.Array | None, scale: float
) -> jax.Array:
    """``softmax(q k^T * scale, masked) v`` for ``q [B, KVH, G, Q, D]``, ``key_t
    [B, KVH, D, S]``, ``value [B, KVH, S, D]`` -> ``[B, KVH, G, Q, D]``."""
    return _attend_fwd(q, key_t, value, mask, scale)[0]


def _attend_fwd(
    q: jax.Array, key_t: jax.Array, value: jax.Array, mask: jax.Array | None, scale: float
) -> tuple[jax.Array, tuple]:
    probs = _attention_probs(q, key_t, mask, scale)
    out = jnp.einsum("bhqs,bhsd->bhqd", _merge_groups(probs).astype(value.dtype), value)
    out = out.reshape(q.shape)
    return out, (q, key_t, value, mask, probs, out)


def _attend_bwd(scale: float, res: tuple, d_out: jax.Array) -> tuple:
    q, key_t, value, mask, probs, out = res
    f32 = jnp.float32
    d_out_m = _merge_groups(d_out)
    d_probs = jnp.einsum("bhqd,bhsd->bhqs", d_out_m, value, preferred_element_type=f32)
    d_probs = d_probs.reshape(probs.shape)
    # Softmax backward: sum_s p * dp == sum_d dO * O, a reduction over D instead of S.
    rows = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
    d_logits = probs * (d_probs - rows)
    if mask is not None:
        d_logits = jnp.where(mask, d_logits, 0.0)  # as jnp.where's gradient in the forward
    d_logits = _merge_groups(d_logits * scale).astype(q.dtype)
    d_q = jnp.einsum("bhqs,bhds->bhqd", d_logits, key_t, preferred_element_type=f32)
    d_key_t = jnp.einsum("bhqd,bhqs->bhds", _merge_groups(q), d_logits, preferred_element_type=f32)
    d_value = jnp.einsum(
        "bhqs,bhqd->bhsd",
        _merge_groups(probs).astype(value.dtype),
        d_out_m,
        preferred_element_type=f32,
    )
    return (
        d_q.reshape(q.shape).astype(q.dtype),
        d_key_t.astype(key_t.dtype),
        d_value.astype(value.dtype),
        None,
    )


_attend.defvjp(_attend_fwd, _attend_bwd)


@flax.struct.dataclass
class KVCache:
    """Per-layer keys/values of a decoder, with the absolute position of every slot.

    Attributes:
      k, v: ``[layers, B, S, KVH, D]``, or per-layer tuples in the decode layout (see
        ``per_layer``); LLaMA stores keys already rotated (RoPE).
      pos: ``int32[B, S]`` absolute position of each slot in the uncompressed sequence;
        ``-1`` marks an empty slot (never attended to).
      end: ``int32[]`` next slot to write, shared by the batch. Examples with different
        lengths write padding tokens as empty slots (``pos == -1``), so a shared write
        index is enough while each example keeps its own positions. This is what lets
        batched decoding, and decoding from a compressed gist cache whose examples have
        gists at different positions, use one ``dynamic_update_slice`` per step.
    """

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    end: jax.Array

    @classmethod
    def empty(
        cls,
        num_layers: int,
        batch: int,
        size: int,
        kv_heads: int,
        head_dim: int,
        dtype: jnp.dtype = jnp.float32,
    ) -> KVCache:
        shape = (num_layers, batch, size, kv_heads, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            pos=jnp.full((batch, size), -1, jnp.int32),
            end=jnp.zeros((), jnp.int32),
        )

    @property
    def size(self) -> int:
        return self.pos.shape[1]

    @property
    def is_per_layer(self) -> bool:
        """Whether ``k``/``v`` are the per-layer decode form (see ``per_layer``) rather
        than ``[layers, B, S, KVH, D]`` stacks."""
        return isinstance(self.k, tuple | list)

    def per_layer(self) -> KVCache:
        """The same cache as one buffer per layer in the layout ``heads_major_attention`` reads
        without copying: ``k`` a tuple of ``[B, KVH, D, S]`` (keys transposed), ``v`` a
        tuple of ``[B, KVH, S, D]``. What the decode loop carries through an unrolled model.

        Why separate buffers: XLA:CPU also copies a layer's slice out of a stacked buffer
        before a product reads it; a buffer of its own is read in place, and the writes
        stay in-place ``dynamic_update_slice``s.
        """
        if self.is_per_layer:
            return self
        return self.replace(
            k=tuple(jnp.transpose(self.k[i], (0, 2, 3, 1)) for i in range(self.k.shape[0])),
            v=tuple(jnp.transpose(self.v[i], (0, 2, 1, 3)) for i in range(self.v.shape[0])),
        )

    def stacked(self) -> KVCache:
        """The ``[layers, B, S, KVH, D]`` form (inverse of ``per_layer``)."""
        if not self.is_per_layer:
            return self
        return self.replace(
            k=jnp.stack([jnp.transpose(k, (0, 3, 1, 2)) for k in self.k]),
            v=jnp.stack([jnp.transpose(v, (0, 2, 1, 3)) for v in self.v]),
        )

    def positions_after_append(self, positions: jax.Array) -> jax.Array:
        """Slot positions ``int32[B, S]`` once ``positions`` (``[B, Q]``, -1 = padding)
        are written at ``end``: what a caller needs to build the mask for that call."""
        return jax.lax.dynamic_update_slice(self.pos, positions.astype(jnp.int32), (0, self.end))


def write_layer_cache(
    cache_k: jax.Array,
    cache_v: jax.Array,
    end: jax.Array,
    new_k: jax.Array,
    new_v: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Write one layer's new keys/values ``[B, Q, KVH, D]`` at slot ``end`` of its
    ``[B, S, KVH, D]`` cache; returns the updated pair."""
    start = (0, end, 0, 0)
    cache_k = jax.lax.dynamic_update_slice(cache_k, new_k.astype(cache_k.dtype), start)
    cache_v = jax.lax.dynamic_update_slice(cache_v, new_v.astype(cache_v.dtype), start)
    return cache_k, cache_v


def write_per_layer_cache(
    cache_k_t: jax.Array,
    cache_v: jax.Array,
    end: jax.Array,
    new_k: jax.Array,
    new_v: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Write one layer's new keys/values ``[B, Q, KVH, D]`` at slot ``end`` of its cache in
    the ``KVCache.per_layer`` layout (``k [B, KVH, D, S]``, ``v [B, KVH, S, D]``)."""
    k_t = jnp.transpose(new_k, (0, 2, 3, 1)).astype(cache_k_t.dtype)
    v = jnp.transpose(new_v, (0, 2, 1, 3)).astype(cache_v.dtype)
    cache_k_t = jax.lax.dynamic_update_slice(cache_k_t, k_t, (0, 0, 0, end))
    cache_v = jax.lax.dynamic_update_slice(cache_v, v, (0, 0, end, 0))
    return cache_k_t, cache_v


def write_stacked_cache(
    cache_k: jax.Array,
    cache_v: jax.Array,
    layer: int,
    end: jax.Array,
    new_k: jax.Array,
    new_v: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Write layer ``layer``'s new keys/values ``[B, Q, KVH, D]`` at slot ``end`` of the
    stacked ``[layers, B, S, KVH, D]`` cache; returns the updated stacks.

    Callers then read the layer's slice from the *returned* stacks. Why: when a layer's
    slice is read first, updated, and written back with ``.at[layer].set``, XLA cannot
    prove the in-place update safe and copies the whole stack once per layer (with 30
    layers, 16 rows and a 128-slot cache that is ~3 GB of copies per decoded token); a
    ``dynamic_update_slice`` of just the new tokens into the stack is done in place.
    """
    start = (layer, 0, end, 0, 0)
    cache_k = jax.lax.dynamic_update_slice(cache_k, new_k[None].astype(cache_k.dtype), start)
    cache_v = jax.lax.dynamic_update_slice(cache_v, new_v[None].astype(cache_v.dtype), start)
    return cache_k, cache_v


class HeadProjection(nn.Module):
    """``[..., D] -> [..., heads, head_dim]`` with a ``[D, heads, head_dim]`` kernel.

    Used instead of ``nn.DenseGeneral`` because DenseGeneral creates multi-axis kernels
    flat (``[D, heads * head_dim]``) and reshapes them afterwards: under logical axis rules
    the three-name partitioning of the initialiser is then applied to a rank-2 value and
    tracing fails. Creating the kernel in its real shape keeps activation sharding
    constraints usable; the parameter tree (``kernel``, ``bias``) is the same.
    """

    heads: int
    head_dim: int
    kernel_init: Callable[..., Any]
    bias_init: Callable[..., Any] | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", self.kernel_init, (x.shape[-1], self.heads, self.head_dim), jnp.float32
        )
        y = jnp.einsum("...d,dhk->...hk", x.astype(self.dtype), kernel.astype(self.dtype))
        if self.bias_init is not None:
            bias = self.param("bias", self.bias_init, (self.heads, self.head_dim), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class HeadMerge(nn.Module):
    """``[..., heads, head_dim] -> [..., features]`` with a ``[heads, head_dim, features]``
    kernel: the output projection counterpart of ``HeadProjection`` (same reason)."""

    features: int
    kernel_init: Callable[..., Any]
    bias_init: Callable[..., Any] | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (*x.shape[-2:], self.features), jnp.float32)
        y = jnp.einsum("...hk,hkd->...d", x.astype(self.dtype), kernel.astype(self.dtype))
        if self.bias_init is not None:
            bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y
