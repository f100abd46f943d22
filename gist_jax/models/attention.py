"""Attention for every model: the one masked dot-product attention function (grouped-query
heads, implementations chosen by ``model.attention``), the one key/value layout it reads,
and the KV cache that decoding and gist compression write, slice and store.

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

from gist_jax import gist
from gist_jax.models.matmul import matmul

# Finite, so a fully masked row softmaxes to a uniform distribution rather than NaN;
# large enough that exp(masked - unmasked) underflows to exactly 0 in float32.
MASK_VALUE = -1e30

# ``model.attention``: how ``attention`` computes the same function.
#   "reference": einsums and jax.nn.softmax, differentiated by JAX; the oracle.
#   "cpu": the same products with a hand-written gradient (``_attend``), tuned for XLA:CPU.
#   "cudnn": jax.nn.dot_product_attention's cuDNN fused kernel (NVIDIA GPUs, bfloat16 or
#     float16 compute). It takes the gist mask as a boolean mask, which JAX turns into a
#     dense additive bias: fused, but not O(L) in memory.
#   "flash": our Pallas kernel (``flash_attention``): tiles computed from the mask's
#     per-token fields (a ``gist.SelfMask``), masked-out tiles skipped, O(L) memory. No
#     additive bias (LLaMA-family models only).
IMPLEMENTATIONS = ("reference", "cpu", "cudnn", "flash")
# The jax.nn.dot_product_attention backend of each implementation that delegates to it.
_JAX_BACKENDS = {"cudnn": "cudnn"}


def mask_for(mask: jax.Array | gist.SelfMask | None, implementation: str) -> Any:
    """The form of ``mask`` that ``implementation`` reads: a ``gist.SelfMask`` stays one for
    "flash" and becomes its dense mask for the others. Models call this once per forward
    pass, so the dense mask is built once rather than in every layer."""
    if isinstance(mask, gist.SelfMask) and implementation != "flash":
        return mask.dense()
    return mask


def attention(
    query: jax.Array,
    keys_t: jax.Array,
    values: jax.Array,
    mask: jax.Array | gist.SelfMask | None,
    *,
    bias: jax.Array | None = None,
    scale: float | None = None,
    implementation: str = "cpu",
) -> jax.Array:
    """Masked dot-product attention with grouped-query heads; every model calls this.

    Args:
      query: ``[B, Q, H, D]``.
      keys_t: ``[B, KVH, D, S]`` (keys transposed) and values ``[B, KVH, S, D]``, the
        layout of ``KVCache``; ``H % KVH == 0`` (KVH < H is grouped-query).
      mask: ``bool[B, 1 or H, Q, S]`` (True = may attend), a ``gist.SelfMask`` (what
        "flash" needs; the others use its dense form), or None.
      bias: optional additive ``[B or 1, H, Q, S]`` (T5's relative position bias).
      scale: logit scale; ``None`` means ``D ** -0.5``; T5 passes 1.0.
      implementation: one of ``IMPLEMENTATIONS``.

    Returns ``[B, Q, H, D]`` in the query's dtype; the softmax runs in float32.

    Why keys and values are laid out per key/value head: every product is then a plain
    batched matrix product per batch row and key/value head (``[G*Q, D] x [D, S]``,
    ``[G*Q, S] x [S, D]``) that XLA:CPU runs on its operands as they are, and the softmax
    reduces over the contiguous last axis. With ``[B, S, KVH, D]`` operands XLA first copies
    them into that form, which in decoding cost more than the products (batch 16, 127
    slots, 30 layers: ~47 ms against ~7 ms per token).
    """
    batch, q_len, heads, head_dim = query.shape
    kv_heads = keys_t.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} key/value heads")
    groups = heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    if implementation == "flash":
        if bias is not None or not isinstance(mask, gist.SelfMask):
            raise ValueError(
                "model.attention='flash' needs the mask as a gist.SelfMask and no additive "
                "bias (LLaMA-family self-attention)"
            )
        # Imported here: the kernel module reads this module's MASK_VALUE.
        from gist_jax.models.flash_attention import flash_attention

        return flash_attention(query, keys_t, values, mask, scale)
    mask = mask_for(mask, implementation)
    if implementation in _JAX_BACKENDS:
        return _jax_attention(query, keys_t, values, mask, bias, scale, implementation)
    q = query.reshape(batch, q_len, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    shape = (batch, kv_heads, groups, q_len, keys_t.shape[3])
    if mask is not None:
        mask = _grouped(jnp.broadcast_to(mask, (batch, mask.shape[1], *shape[3:])), shape)
    if bias is not None:
        bias = _grouped(bias.astype(jnp.float32), shape)
    if implementation == "reference":
        probs = jax.nn.softmax(_logits(q, keys_t, mask, bias, float(scale)), axis=-1)
        out = _weighted_values(probs, values)
    elif implementation == "cpu":
        out = _attend(q, keys_t, values, mask, bias, float(scale))
    else:
        raise ValueError(f"attention implementation {implementation!r}: expected {IMPLEMENTATIONS}")
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, head_dim)


def _jax_attention(
    query: jax.Array,
    keys_t: jax.Array,
    values: jax.Array,
    mask: jax.Array | None,
    bias: jax.Array | None,
    scale: float,
    implementation: str,
) -> jax.Array:
    """``jax.nn.dot_product_attention`` on our layout (it wants keys and values
    ``[B, S, KVH, D]``); half-precision only, as cuDNN's fused kernel is."""
    if query.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"model.attention={implementation!r} needs bfloat16 or float16 compute "
            f"(model.dtype='bfloat16'); got {query.dtype}"
        )
    keys, values = slot_major(keys_t, values)
    if bias is not None:
        bias = bias.astype(query.dtype)
    return jax.nn.dot_product_attention(
        query,
        keys.astype(query.dtype),
        values.astype(query.dtype),
        bias=bias,
        mask=mask,
        scale=float(scale),
        implementation=_JAX_BACKENDS[implementation],
    )


def _grouped(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``[B or 1, 1 or H, Q, S]`` -> ``[B or 1, 1 or KVH, 1 or G, Q, S]``, the logits' layout."""
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], shape[1], shape[2], *x.shape[2:])


def _merge_groups(x: jax.Array) -> jax.Array:
    """``[B, KVH, G, Q, N]`` -> ``[B, KVH, G*Q, N]`` (a free reshape)."""
    return x.reshape(*x.shape[:2], x.shape[2] * x.shape[3], x.shape[4])


def _logits(
    q: jax.Array, keys_t: jax.Array, mask: jax.Array | None, bias: jax.Array | None, scale: float
) -> jax.Array:
    """Float32 masked logits ``[B, KVH, G, Q, S]`` of ``q [B, KVH, G, Q, D]``."""
    b, h, g, n, _ = q.shape
    logits = jnp.einsum(
        "bhqd,bhds->bhqs", _merge_groups(q), keys_t, preferred_element_type=jnp.float32
    )
    logits = logits.reshape(b, h, g, n, keys_t.shape[3]) * scale
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = jnp.where(mask, logits, MASK_VALUE)
    return logits


def _weighted_values(probs: jax.Array, values: jax.Array) -> jax.Array:
    out = jnp.einsum("bhqs,bhsd->bhqd", _merge_groups(probs).astype(values.dtype), values)
    return out.reshape(*probs.shape[:4], values.shape[3])


def _probs(
    q: jax.Array, keys_t: jax.Array, mask: jax.Array | None, bias: jax.Array | None, scale: float
) -> jax.Array:
    logits = _logits(q, keys_t, mask, bias, scale)
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    # One reciprocal per row and a product per entry: XLA:CPU's elementwise division was
    # among the slowest ops of the train step's profile at 1,024-token rows.
    return e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))


# The operands of _attend, _attend_fwd: q [B, KVH, G, Q, D], keys_t [B, KVH, D, S],
# values [B, KVH, S, D], mask and bias broadcastable to [B, KVH, G, Q, S] (or None).


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attend(q, keys_t, values, mask, bias, scale: float) -> jax.Array:
    """The "reference" computation with the gradient written out (``_attend_bwd``)."""
    return _attend_fwd(q, keys_t, values, mask, bias, scale)[0]


def _attend_fwd(q, keys_t, values, mask, bias, scale: float) -> tuple[jax.Array, tuple]:
    probs = _probs(q, keys_t, mask, bias, scale)
    out = _weighted_values(probs, values)
    return out, (q, keys_t, values, mask, bias, probs, out)


def _attend_bwd(scale: float, res: tuple, d_out: jax.Array) -> tuple:
    q, keys_t, values, mask, bias, probs, out = res
    f32 = jnp.float32
    d_out_m = _merge_groups(d_out)
    d_probs = jnp.einsum("bhqd,bhsd->bhqs", d_out_m, values, preferred_element_type=f32)
    d_probs = d_probs.reshape(probs.shape)
    # Softmax backward: sum_s p * dp == sum_d dO * O, a reduction over D instead of S.
    rows = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
    d_logits = probs * (d_probs - rows)
    if mask is not None:
        d_logits = jnp.where(mask, d_logits, 0.0)  # as jnp.where's gradient in the forward
    d_bias = None
    if bias is not None:  # summed over the axes the bias was broadcast along
        axes = tuple(i for i in range(5) if bias.shape[i] == 1 and d_logits.shape[i] > 1)
        d_bias = jnp.sum(d_logits, axis=axes, keepdims=True).astype(bias.dtype)
    d_scaled = _merge_groups(d_logits * scale).astype(q.dtype)
    d_q = jnp.einsum("bhqs,bhds->bhqd", d_scaled, keys_t, preferred_element_type=f32)
    d_keys_t = jnp.einsum("bhqd,bhqs->bhds", _merge_groups(q), d_scaled, preferred_element_type=f32)
    d_values = jnp.einsum(
        "bhqs,bhqd->bhsd",
        _merge_groups(probs).astype(values.dtype),
        d_out_m,
        preferred_element_type=f32,
    )
    return (
        d_q.reshape(q.shape).astype(q.dtype),
        d_keys_t.astype(keys_t.dtype),
        d_values.astype(values.dtype),
        None,
        d_bias,
    )


_attend.defvjp(_attend_fwd, _attend_bwd)


def heads_major(keys: jax.Array, values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys/values ``[..., B, S, KVH, D]`` (as projected) in ``attention``'s layout:
    ``[..., B, KVH, D, S]`` and ``[..., B, KVH, S, D]``."""
    lead = tuple(range(keys.ndim - 4))
    b, s, h, d = (len(lead) + i for i in range(4))
    return keys.transpose(*lead, b, h, d, s), values.transpose(*lead, b, h, s, d)


def slot_major(keys_t: jax.Array, values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The inverse of ``heads_major``: keys and values ``[..., B, S, KVH, D]``."""
    lead = tuple(range(keys_t.ndim - 4))
    b, h, x, y = (len(lead) + i for i in range(4))  # keys: x = D, y = S; values: x = S, y = D
    return keys_t.transpose(*lead, b, y, h, x), values.transpose(*lead, b, x, h, y)


@flax.struct.dataclass
class KVCache:
    """Per-layer keys/values of a decoder, with the absolute position of every slot.

    Attributes:
      k, v: keys ``[layers, B, KVH, D, S]`` (transposed) and values ``[layers, B, KVH, S,
        D]``: ``attention``'s layout, so a layer reads its cache without a copy. Either one
        stacked array each (what ``nn.scan`` slices) or a tuple of one buffer per layer
        (``per_layer``: what unrolled layers read and write in place). LLaMA stores keys
        already rotated (RoPE).
      pos: ``int32[B, S]`` absolute position of each slot in the uncompressed sequence;
        ``-1`` marks an empty slot (never attended to).
      end: ``int32[]`` next slot to write, shared by the batch. Examples with different
        lengths write padding tokens as empty slots (``pos == -1``), so a shared write
        index is enough while each example keeps its own positions. This is what lets
        batched decoding, and decoding from a compressed gist cache whose examples have
        gists at different positions, use one ``dynamic_update_slice`` per step.
    """

    k: Any
    v: Any
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
        return cls(
            k=jnp.zeros((num_layers, batch, kv_heads, head_dim, size), dtype),
            v=jnp.zeros((num_layers, batch, kv_heads, size, head_dim), dtype),
            pos=jnp.full((batch, size), -1, jnp.int32),
            end=jnp.zeros((), jnp.int32),
        )

    @property
    def size(self) -> int:
        return self.pos.shape[1]

    @property
    def is_per_layer(self) -> bool:
        """Whether ``k``/``v`` are tuples of per-layer buffers rather than stacks."""
        return isinstance(self.k, tuple | list)

    def per_layer(self) -> KVCache:
        """The same cache as one buffer per layer. Why separate buffers: XLA:CPU copies a
        layer's slice out of a stacked buffer before a product reads it; a buffer of its
        own is read in place, and the writes stay in-place ``dynamic_update_slice``s."""
        if self.is_per_layer:
            return self
        return self.replace(k=tuple(self.k), v=tuple(self.v))

    def stacked(self) -> KVCache:
        """The stacked form (inverse of ``per_layer``)."""
        if not self.is_per_layer:
            return self
        return self.replace(k=jnp.stack(self.k), v=jnp.stack(self.v))

    def positions_after_append(self, positions: jax.Array) -> jax.Array:
        """Slot positions ``int32[B, S]`` once ``positions`` (``[B, Q]``, -1 = padding)
        are written at ``end``: what a caller needs to build the mask for that call."""
        return jax.lax.dynamic_update_slice(self.pos, positions.astype(jnp.int32), (0, self.end))


def write_layer_cache(
    cache_k_t: jax.Array,
    cache_v: jax.Array,
    end: jax.Array,
    new_k_t: jax.Array,
    new_v: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Write one layer's new keys/values (``[B, KVH, D, Q]``, ``[B, KVH, Q, D]``) at slot
    ``end`` of its cache (``[B, KVH, D, S]``, ``[B, KVH, S, D]``); returns the new pair."""
    k_t = new_k_t.astype(cache_k_t.dtype)
    cache_k_t = jax.lax.dynamic_update_slice(cache_k_t, k_t, (0, 0, 0, end))
    cache_v = jax.lax.dynamic_update_slice(cache_v, new_v.astype(cache_v.dtype), (0, 0, end, 0))
    return cache_k_t, cache_v


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
        flat = kernel.astype(self.dtype).reshape(kernel.shape[0], -1)
        y = matmul(x.astype(self.dtype), flat).reshape(*x.shape[:-1], *kernel.shape[1:])
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
        flat = kernel.astype(self.dtype).reshape(-1, self.features)
        y = matmul(x.astype(self.dtype).reshape(*x.shape[:-2], -1), flat)
        if self.bias_init is not None:
            bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y
