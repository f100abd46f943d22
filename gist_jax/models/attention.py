"""Shared attention pieces: masked dot-product attention (with grouped-query heads) and
the explicit key/value cache that decoding and gist compression slice and store.

Masks arrive as booleans built by ``gist_jax.gist``; they are applied here with a
finite large negative logit so that fully masked rows (padding queries) produce a
uniform, finite softmax instead of NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

# Finite, so a fully masked row softmaxes to a uniform distribution rather than NaN;
# large enough that exp(masked - unmasked) underflows to exactly 0 in float32.
MASK_VALUE = -1e30


def _masked_softmax(
    logits: jax.Array, mask: jax.Array | None, dtype: jnp.dtype, bias: jax.Array | None = None
) -> jax.Array:
    """Softmax over the last axis of float32 ``logits [B, KVH, G, Q, K]`` after adding
    ``bias`` (``[B or 1, H, Q, K]``) and masking with ``bool[B, 1 or H, Q, K]``; returns
    the weights in ``dtype``."""
    batch, kv_heads, groups, q_len, k_len = logits.shape
    if bias is not None:
        logits = logits + bias.astype(jnp.float32).reshape(-1, kv_heads, groups, q_len, k_len)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (batch, mask.shape[1], q_len, k_len))
        if mask.shape[1] == 1:
            mask = mask[:, :, None]
        else:
            mask = mask.reshape(batch, kv_heads, groups, q_len, k_len)
        logits = jnp.where(mask, logits, MASK_VALUE)
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
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    groups = heads // kv_heads
    if scale is None:
        scale = head_dim**-0.5
    q = query.reshape(batch, q_len, kv_heads, groups, head_dim)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, key, preferred_element_type=jnp.float32)
    weights = _masked_softmax(logits * scale, mask, value.dtype, bias)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", weights, value)
    return out.reshape(batch, q_len, heads, head_dim)


def cached_attention(
    query: jax.Array,
    key_t: jax.Array,
    value: jax.Array,
    mask: jax.Array | None,
    scale: float | None = None,
) -> jax.Array:
    """``dot_product_attention`` over a cache in the decode layout of
    ``KVCache.per_layer``: ``key_t [B, KVH, D, S]`` and ``value [B, KVH, S, D]``.

    In these layouts both products are plain batched matrix products (``[G*Q, D] x [D, S]``
    and ``[G*Q, S] x [S, D]`` per batch row and key/value head), which XLA:CPU runs on
    the cache buffers as they are; with keys and values as ``[B, S, KVH, D]`` it first
    copies both into that form, per layer and per decoded token, which cost more than the
    products themselves (batch 16, 127 slots: ~50 ms vs ~6 ms per token over 30 layers).
    """
    batch, q_len, heads, head_dim = query.shape
    kv_heads, slots = key_t.shape[1], key_t.shape[3]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    groups = heads // kv_heads
    if scale is None:
        scale = head_dim**-0.5
    q = query.reshape(batch, q_len, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    q = q.reshape(batch, kv_heads, groups * q_len, head_dim)
    logits = jnp.einsum("bhqd,bhdk->bhqk", q, key_t, preferred_element_type=jnp.float32)
    logits = logits.reshape(batch, kv_heads, groups, q_len, slots)
    weights = _masked_softmax(logits * scale, mask, value.dtype)
    weights = weights.reshape(batch, kv_heads, groups * q_len, slots)
    out = jnp.einsum("bhqk,bhkd->bhqd", weights, value)
    out = out.reshape(batch, kv_heads, groups, q_len, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, q_len, heads, head_dim)


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
        """The same cache as one buffer per layer in the layout ``cached_attention`` reads
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
