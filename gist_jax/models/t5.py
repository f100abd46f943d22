"""Flax Linen T5 family (T5 v1.0, T5 v1.1, FLAN-T5): encoder-decoder with explicit caches.

This module owns the encoder-decoder model and ``T5Config`` (its RMS layer norm and untied
output layer come from ``gist_jax.models.layers``): relative
position bias (bucketed; bidirectional in the encoder, causal in the decoder; one table per
stack), unscaled attention logits, the ReLU (v1.0) or gated-GELU (v1.1 / FLAN) feed-forward,
the tied output layer with ``d_model ** -0.5`` scaling (v1.0) or an untied ``lm_head``
(v1.1), optional ``nn.scan`` over layers and rematerialisation, and the two caches that
gisting and decoding need:

* ``T5GistCache``: per-layer encoder keys/values of the k gist tokens plus the final encoder
  states there (``compress``). Encoding only the tokens after the gists with that cache as
  extra keys (``encode(..., extra_kv=cache.kv)``) and decoding over ``[gist states; input
  states]`` reproduces the uncompressed gist-masked pass exactly, because under the gist
  mask the prompt rows never see anything after the last gist token, and the relative
  position bias is computed from explicit positions (``k_pos - q_pos``), so the true
  distances survive compression.
* ``T5DecoderCache``: decoder self-attention ``KVCache`` plus cross-attention keys/values
  computed once from the encoder output (``init_cache``).

Masks are inputs (built by ``gist_jax.gist``); the model never builds them from token ids.
Positions are ``int32[B, L]`` with ``-1`` at padding. Method contract (``model.apply(
{"params": p}, ..., method=...)``)::

    hidden = encode(input_ids, positions, mask, extra_kv=None)        # mask [B,1,Q,E+Q]
    cache = compress(input_ids, positions, mask, gist_first, gist_last, num_gist)
    dcache = init_cache(encoder_hidden, max_length)
    logits, dcache = decode(decoder_input_ids, decoder_positions, self_mask,
                            encoder_hidden, cross_mask, cache=None)
    logits, None = __call__(input_ids, positions, mask, decoder_input_ids,
                            decoder_positions, decoder_mask, cross_mask)

Parameter tree (float32)::

    shared/embedding [V, D]
    encoder/relpos_bias/embedding [buckets, H]      HF: encoder.block.0...relative_attention_bias
    encoder/layers_{i}/... or, with scan_layers, encoder/layers/... with a leading [L] axis
        self_attn_norm/scale [D], self_attn/{q,k,v}/kernel [D, H, Dk], self_attn/o/kernel [H, Dk, D]
        ff_norm/scale [D], ff/wi/kernel [D, F] (or ff/wi_0, ff/wi_1), ff/wo/kernel [F, D]
    encoder/final_norm/scale [D]
    decoder/relpos_bias/embedding [buckets, H]
    decoder/layers_{i}/...: as the encoder plus cross_attn_norm/scale, cross_attn/{q,k,v,o}
    decoder/final_norm/scale [D]
    lm_head/kernel [D, V]                           (only when untied: v1.1 / FLAN-T5)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from gist_jax.models import layers
from gist_jax.models.attention import (
    HeadMerge,
    HeadProjection,
    KVCache,
    dot_product_attention,
    write_layer_cache,
)
from gist_jax.models.layers import ConfigMethods, RMSNorm, Unembed, remat

# Fields that describe how the model runs here, not the network: stored in
# model_config.json (the params layout follows scan_layers) but never written to HF.
RUNTIME_FIELDS = ("dtype", "scan_layers", "remat")

# HF ``ACT2FN`` names T5 checkpoints use, as JAX functions (same formulas as PyTorch's).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation_of(feed_forward_proj: str) -> tuple[bool, str]:
    """``(is_gated, activation)`` the way ``transformers.T5Config`` derives them."""
    parts = feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"feed_forward_proj {feed_forward_proj!r} is not '<act>' or 'gated-<act>'")
    # T5 v1.1 checkpoints say "gated-gelu" but were trained with the tanh approximation.
    act = "gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]
    return parts[0] == "gated", act


@dataclasses.dataclass(frozen=True)
class T5Config(ConfigMethods):
    """Hyper-parameters of a T5-family model (hashable: Flax modules hold it).

    ``tie_word_embeddings`` selects the v1.0 output layer: logits are the decoder output
    scaled by ``d_model ** -0.5`` times the shared embedding. ``False`` (v1.1, FLAN-T5) means
    a separate, unscaled ``lm_head``. ``dense_act_fn`` defaults to what ``feed_forward_proj``
    implies (``gated-gelu`` -> ``gelu_new``).
    """

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_decoder_layers: int | None = None
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    dense_act_fn: str | None = None
    tie_word_embeddings: bool = True
    initializer_factor: float = 1.0
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    gist_token_id: int | None = None
    model_type: str = "t5"
    # Runtime-only fields (see RUNTIME_FIELDS).
    dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"

    def __post_init__(self) -> None:
        self.check_common_fields()
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        _, derived_act = activation_of(self.feed_forward_proj)
        if self.dense_act_fn is None:
            object.__setattr__(self, "dense_act_fn", derived_act)
        if self.dense_act_fn not in ACTIVATIONS:
            raise ValueError(
                f"activation {self.dense_act_fn!r} is not supported; supported: {tuple(ACTIVATIONS)}"
            )
        if self.relative_attention_num_buckets < 4:
            raise ValueError("relative_attention_num_buckets must be at least 4")

    @property
    def is_gated_act(self) -> bool:
        return activation_of(self.feed_forward_proj)[0]


# ---------------------------------------------------------------------------------------
# Caches


@flax.struct.dataclass
class T5GistCache:
    """A compressed prompt: what the encoder needs of the k gist tokens.

    Attributes:
      kv: encoder self-attention keys/values ``[layers, B, k, H, Dk]`` of the gist tokens,
        with their positions in the uncompressed source (``kv.pos``, ``-1`` = empty slot,
        for an example with fewer than k gist tokens) and ``kv.end == k``.
      hidden: ``[B, k, D]`` final encoder states at the gist positions (zero at empty slots),
        which the decoder cross-attends to in place of the prompt.
    """

    kv: KVCache
    hidden: jax.Array

    @property
    def positions(self) -> jax.Array:
        return self.kv.pos


@flax.struct.dataclass
class T5DecoderCache:
    """Decoder state for step-by-step decoding.

    Attributes:
      self_kv: decoder self-attention ``KVCache`` ``[layers, B, S, H, Dk]``.
      cross_k, cross_v: ``[layers, B, Ls, H, Dk]`` cross-attention keys/values of the
        encoder output, computed once by ``init_cache``.
    """

    self_kv: KVCache
    cross_k: jax.Array
    cross_v: jax.Array


# ---------------------------------------------------------------------------------------
# Relative position bias


def relative_position_bucket(
    relative_position: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """T5's bucket of ``relative_position = key_pos - query_pos`` (int32, same shape).

    Half of the buckets (per direction when bidirectional) are exact small distances, the
    rest logarithmically wider bins up to ``max_distance``; the causal (decoder) variant
    puts every key after the query into bucket 0. Float32 arithmetic in the same order as
    transformers, so buckets agree bit for bit.
    """
    rel = jnp.asarray(relative_position, jnp.int32)
    buckets = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = (rel > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(rel)
    else:
        distance = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # max(., 1) keeps log finite where the small branch is selected anyway.
    scaled = (
        jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    )
    large = jnp.minimum(max_exact + scaled.astype(jnp.int32), num_buckets - 1)
    return buckets + jnp.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """One learned bias per (bucket, head) for a whole stack; the bias of each query/key
    pair is looked up from their explicit positions, so cached and compressed keys get
    their true distance."""

    config: T5Config
    bidirectional: bool

    @nn.compact
    def __call__(self, q_positions: jax.Array, k_positions: jax.Array) -> jax.Array:
        """``int[B, Q]``, ``int[B, K]`` -> float32 bias ``[B, H, Q, K]``."""
        cfg = self.config
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(
                nn.initializers.normal(cfg.initializer_factor * cfg.d_model**-0.5),
                ("relpos_buckets", "heads"),
            ),
            (cfg.relative_attention_num_buckets, cfg.num_heads),
            jnp.float32,
        )
        rel = k_positions[:, None, :] - q_positions[:, :, None]
        bucket = relative_position_bucket(
            rel,
            self.bidirectional,
            cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance,
        )
        return jnp.transpose(table[bucket], (0, 3, 1, 2))


# ---------------------------------------------------------------------------------------
# Layers


def _normal(std: float, axes: tuple[str, ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


class Attention(nn.Module):
    """Multi-head attention without logit scaling (T5 folds it into the init); keys and
    values come from ``kv`` so self-, cached and cross-attention share one module."""

    config: T5Config

    def setup(self) -> None:
        cfg = self.config
        f, d, h, dk = cfg.initializer_factor, cfg.d_model, cfg.num_heads, cfg.d_kv

        def proj(std: float, name: str) -> HeadProjection:
            return HeadProjection(
                heads=h,
                head_dim=dk,
                kernel_init=_normal(std, ("embed", "heads", "head_dim")),
                dtype=cfg.compute_dtype,
                name=name,
            )

        # HF's T5 initialisation: the query carries the 1/sqrt(d_kv) that T5 never applies.
        self.q = proj(f * (d * dk) ** -0.5, "q")
        self.k = proj(f * d**-0.5, "k")
        self.v = proj(f * d**-0.5, "v")
        self.o = HeadMerge(
            features=d,
            kernel_init=_normal(f * (h * dk) ** -0.5, ("heads", "head_dim", "embed")),
            dtype=cfg.compute_dtype,
            name="o",
        )

    def kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values ``[B, K, H, Dk]`` of ``x [B, K, D]``."""
        return self.k(x), self.v(x)

    def __call__(
        self,
        x: jax.Array,
        k: jax.Array,
        v: jax.Array,
        mask: jax.Array | None,
        bias: jax.Array | None,
    ) -> jax.Array:
        dtype = self.config.compute_dtype
        q = nn.with_logical_constraint(self.q(x), ("batch", "length", "heads", None))
        out = dot_product_attention(q, k.astype(dtype), v.astype(dtype), mask, bias, scale=1.0)
        return self.o(out)


class FeedForward(nn.Module):
    """``wo(act(wi(x)))`` (v1.0) or ``wo(act(wi_0(x)) * wi_1(x))`` (gated, v1.1 / FLAN)."""

    config: T5Config

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        f = cfg.initializer_factor

        def dense(features: int, std: float, axes: tuple[str, str], name: str) -> nn.Dense:
            return nn.Dense(
                features,
                use_bias=False,
                dtype=cfg.compute_dtype,
                param_dtype=jnp.float32,
                kernel_init=_normal(std, axes),
                name=name,
            )

        act = ACTIVATIONS[cfg.dense_act_fn]
        std_in = f * cfg.d_model**-0.5
        if cfg.is_gated_act:
            h = act(dense(cfg.d_ff, std_in, ("embed", "mlp"), "wi_0")(x))
            h = h * dense(cfg.d_ff, std_in, ("embed", "mlp"), "wi_1")(x)
        else:
            h = act(dense(cfg.d_ff, std_in, ("embed", "mlp"), "wi")(x))
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return dense(cfg.d_model, f * cfg.d_ff**-0.5, ("mlp", "embed"), "wo")(h)


_Pair = tuple[jax.Array, jax.Array]


class EncoderLayer(nn.Module):
    """Pre-norm encoder block. ``nn.scan`` signature: the hidden state is the carry; the
    per-layer extra (gist) keys/values are the scanned input; the new tokens' keys/values
    are the scanned output when ``collect_kv`` (gist compression), else None."""

    config: T5Config
    collect_kv: bool = False

    @nn.compact
    def __call__(
        self,
        hidden: jax.Array,
        extra: _Pair | None,
        mask: jax.Array,
        bias: jax.Array,
    ) -> tuple[jax.Array, _Pair | None]:
        cfg = self.config
        x = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="self_attn_norm")(hidden)
        attn = Attention(cfg, name="self_attn")
        k, v = attn.kv(x)
        new_kv = (k, v) if self.collect_kv else None
        if extra is not None:
            k = jnp.concatenate([extra[0].astype(k.dtype), k], axis=1)
            v = jnp.concatenate([extra[1].astype(v.dtype), v], axis=1)
        hidden = hidden + attn(x, k, v, mask, bias)
        x = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="ff_norm")(hidden)
        hidden = hidden + FeedForward(cfg, name="ff")(x)
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "embed"))
        return hidden, new_kv


class DecoderLayer(nn.Module):
    """Pre-norm decoder block: causal self-attention (optionally over a cache slice),
    cross-attention, feed-forward. ``nn.scan`` signature: the hidden state is the carry;
    ``state = (self_k, self_v, cross_k, cross_v)`` (entries may be None) is the scanned
    input; the updated ``(self_k, self_v)`` is the scanned output. With ``cross_kv_only``
    the layer only projects ``encoder_hidden`` to its cross-attention keys/values."""

    config: T5Config
    cross_kv_only: bool = False

    @nn.compact
    def __call__(
        self,
        hidden: jax.Array,
        state: tuple[jax.Array | None, ...] | None,
        end: jax.Array | None,
        self_mask: jax.Array | None,
        self_bias: jax.Array | None,
        encoder_hidden: jax.Array | None,
        cross_mask: jax.Array | None,
    ) -> tuple[jax.Array, _Pair | None]:
        cfg = self.config
        cross = Attention(cfg, name="cross_attn")
        if self.cross_kv_only:
            return hidden, cross.kv(encoder_hidden)
        self_k, self_v, cross_k, cross_v = state if state is not None else (None,) * 4

        x = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="self_attn_norm")(hidden)
        attn = Attention(cfg, name="self_attn")
        k, v = attn.kv(x)
        new_kv = None
        if self_k is not None:
            self_k, self_v = write_layer_cache(self_k, self_v, end, k, v)
            new_kv = (self_k, self_v)
            k, v = self_k, self_v
        hidden = hidden + attn(x, k, v, self_mask, self_bias)

        x = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="cross_attn_norm")(hidden)
        if cross_k is None:
            cross_k, cross_v = cross.kv(encoder_hidden)
        # T5 cross-attention has no position bias.
        hidden = hidden + cross(x, cross_k, cross_v, cross_mask, None)

        x = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="ff_norm")(hidden)
        hidden = hidden + FeedForward(cfg, name="ff")(x)
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "embed"))
        return hidden, new_kv


def _run_layers(
    layer_cls: type[nn.Module],
    config: T5Config,
    num_layers: int,
    hidden: jax.Array,
    per_layer: Any,
    broadcast: tuple[Any, ...],
    **attributes: Any,
) -> tuple[jax.Array, Any]:
    """Apply ``num_layers`` blocks (scanned or unrolled; must be called from a compact
    method). ``per_layer`` leaves have a leading layer axis; the blocks' second outputs
    come back stacked the same way (None if the blocks return None)."""
    layer_cls = remat(layer_cls, config.remat, config.scan_layers)
    if config.scan_layers:
        scanned = nn.scan(
            layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0,) + (nn.broadcast,) * len(broadcast),
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        return scanned(config, name="layers", **attributes)(hidden, per_layer, *broadcast)
    outputs = []
    for i in range(num_layers):
        layer_in = jax.tree.map(lambda x, i=i: x[i], per_layer)
        layer = layer_cls(config, name=f"layers_{i}", **attributes)
        hidden, out = layer(hidden, layer_in, *broadcast)
        outputs.append(out)
    if outputs[0] is None:
        return hidden, None
    return hidden, jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)


class Encoder(nn.Module):
    """Encoder stack: relative bias (bidirectional, once per stack), blocks, final norm."""

    config: T5Config

    @nn.compact
    def __call__(
        self,
        hidden: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        extra_kv: KVCache | None = None,
        collect_kv: bool = False,
    ) -> tuple[jax.Array, _Pair | None]:
        cfg = self.config
        k_positions = positions
        extra = None
        if extra_kv is not None:
            k_positions = jnp.concatenate([extra_kv.pos, positions], axis=1)
            extra = (extra_kv.k, extra_kv.v)
        bias = RelativePositionBias(cfg, bidirectional=True, name="relpos_bias")(
            positions, k_positions
        )
        hidden, kv = _run_layers(
            EncoderLayer,
            cfg,
            cfg.num_layers,
            hidden,
            extra,
            (mask, bias),
            collect_kv=collect_kv,
        )
        return RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="final_norm")(hidden), kv


class Decoder(nn.Module):
    """Decoder stack: causal relative bias (once per stack), blocks, final norm."""

    config: T5Config

    @nn.compact
    def __call__(
        self,
        hidden: jax.Array,
        positions: jax.Array | None,
        self_mask: jax.Array | None,
        encoder_hidden: jax.Array | None,
        cross_mask: jax.Array | None,
        cache: T5DecoderCache | None = None,
        cross_kv_only: bool = False,
    ) -> tuple[jax.Array, Any]:
        cfg = self.config
        n = cfg.num_decoder_layers
        if cross_kv_only:
            # hidden is the encoder output here; returns stacked (cross_k, cross_v).
            return _run_layers(
                DecoderLayer,
                cfg,
                n,
                hidden,
                None,
                (None, None, None, encoder_hidden, None),
                cross_kv_only=True,
            )
        if cache is None:
            k_positions, state, end = positions, None, None
        else:
            k_positions = cache.self_kv.positions_after_append(positions)
            state = (cache.self_kv.k, cache.self_kv.v, cache.cross_k, cache.cross_v)
            end = cache.self_kv.end
        bias = RelativePositionBias(cfg, bidirectional=False, name="relpos_bias")(
            positions, k_positions
        )
        hidden, new_kv = _run_layers(
            DecoderLayer,
            cfg,
            n,
            hidden,
            state,
            (end, self_mask, bias, encoder_hidden, cross_mask),
        )
        hidden = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="final_norm")(hidden)
        new_cache = None
        if cache is not None:
            new_cache = T5DecoderCache(
                self_kv=KVCache(
                    k=new_kv[0],
                    v=new_kv[1],
                    pos=k_positions,
                    end=cache.self_kv.end + positions.shape[1],
                ),
                cross_k=cache.cross_k,
                cross_v=cache.cross_v,
            )
        return hidden, new_cache


def _gather_rows(x: jax.Array, index: jax.Array, axis: int) -> jax.Array:
    """``x`` indexed along ``axis`` (the example's sequence axis) by ``index [B, k]``;
    ``axis`` is 1 for ``[B, L, ...]`` and 2 for ``[layers, B, L, ...]``."""
    if axis == 1:
        idx = index.reshape(index.shape + (1,) * (x.ndim - 2))
    else:
        idx = index.reshape((1,) + index.shape + (1,) * (x.ndim - 3))
    return jnp.take_along_axis(x, idx, axis=axis)


class T5ForConditionalGeneration(nn.Module):
    """The encoder-decoder LM; see the module docstring for the method contract."""

    config: T5Config

    def setup(self) -> None:
        cfg = self.config
        self.shared = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=cfg.compute_dtype,
            param_dtype=jnp.float32,
            embedding_init=_normal(cfg.initializer_factor, ("vocab", "embed")),
        )
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = Unembed(cfg.vocab_size, cfg.initializer_factor, cfg.compute_dtype)

    def _embed(self, ids: jax.Array) -> jax.Array:
        hidden = self.shared(ids.astype(jnp.int32))
        return nn.with_logical_constraint(hidden, ("batch", "length", "embed"))

    def encode(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        extra_kv: KVCache | None = None,
    ) -> jax.Array:
        """Final encoder states ``[B, Q, D]``.

        Args:
          input_ids: ``int[B, Q]``.
          positions: ``int[B, Q]`` positions in the (uncompressed) source, ``-1`` = padding.
          mask: ``bool[B, 1, Q, E + Q]`` from ``gist.encoder_self_mask`` over the key
            positions ``[extra_kv.pos; positions]`` (``E = 0`` without ``extra_kv``).
          extra_kv: a ``T5GistCache.kv``: every layer also attends to these keys/values
            (placed before the new tokens), e.g. the gist tokens of a compressed prompt.
        """
        hidden, _ = self.encoder(self._embed(input_ids), positions, mask, extra_kv)
        return hidden

    def compress(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        gist_first: jax.Array,
        gist_last: jax.Array,
        num_gist: int,
    ) -> T5GistCache:
        """Encode prompts (everything up to and including the last gist token, padded) and
        keep the ``num_gist`` gist tokens' per-layer keys/values and final states.

        Under the gist mask the prompt rows only see keys ``<= last``, so this equals the
        full source's encoding at those positions. Slot ``j`` of example ``b`` holds
        position ``gist_first[b] + j``; slots beyond ``gist_last[b]`` (or of an example
        without gist tokens) are empty (position ``-1``). ``num_gist`` must be static.
        """
        hidden, (k, v) = self.encoder(
            self._embed(input_ids), positions, mask, None, collect_kv=True
        )
        first = jnp.asarray(gist_first, jnp.int32)[:, None]
        last = jnp.asarray(gist_last, jnp.int32)[:, None]
        wanted = first + jnp.arange(num_gist, dtype=jnp.int32)[None, :]
        # Locate each wanted position by value, so any row layout of the prompt works.
        match = positions[:, None, :] == wanted[:, :, None]
        valid = (first >= 0) & (wanted <= last) & jnp.any(match, axis=-1)
        index = jnp.argmax(match, axis=-1)
        keep = valid[..., None]
        gist_hidden = jnp.where(keep, _gather_rows(hidden, index, 1), 0)
        gist_k = jnp.where(keep[None, ..., None], _gather_rows(k, index, 2), 0)
        gist_v = jnp.where(keep[None, ..., None], _gather_rows(v, index, 2), 0)
        kv = KVCache(
            k=gist_k,
            v=gist_v,
            pos=jnp.where(valid, wanted, -1),
            end=jnp.asarray(num_gist, jnp.int32),
        )
        return T5GistCache(kv=kv, hidden=gist_hidden)

    def init_cache(self, encoder_hidden: jax.Array, max_length: int) -> T5DecoderCache:
        """An empty decoder self-attention cache of ``max_length`` slots plus the
        cross-attention keys/values of ``encoder_hidden [B, Ls, D]`` for every layer."""
        cfg = self.config
        _, (cross_k, cross_v) = self.decoder(
            encoder_hidden, None, None, encoder_hidden, None, cross_kv_only=True
        )
        self_kv = KVCache.empty(
            cfg.num_decoder_layers,
            encoder_hidden.shape[0],
            max_length,
            cfg.num_heads,
            cfg.d_kv,
            cfg.compute_dtype,
        )
        return T5DecoderCache(self_kv=self_kv, cross_k=cross_k, cross_v=cross_v)

    def decode(
        self,
        decoder_input_ids: jax.Array,
        decoder_positions: jax.Array,
        self_mask: jax.Array,
        encoder_hidden: jax.Array | None,
        cross_mask: jax.Array,
        cache: T5DecoderCache | None = None,
    ) -> tuple[jax.Array, T5DecoderCache | None]:
        """Float32 logits ``[B, Q, V]`` and the updated cache.

        Args:
          decoder_input_ids, decoder_positions: ``int[B, Q]`` (``-1`` = padding).
          self_mask: ``bool[B, 1, Q, K]`` from ``gist.decoder_self_mask`` with no gist span
            (causal + padding); ``K == Q`` without a cache, else ``K`` = cache size and the
            key positions are ``cache.self_kv.positions_after_append(decoder_positions)``.
          encoder_hidden: ``[B, Ls, D]``; unused (may be None) with a cache, which holds
            the cross-attention keys/values already.
          cross_mask: ``bool[B, 1, 1 or Q, Ls]`` from ``gist.cross_mask``.
          cache: from ``init_cache``; the call writes its Q tokens at ``self_kv.end``.
        """
        cfg = self.config
        hidden, new_cache = self.decoder(
            self._embed(decoder_input_ids),
            decoder_positions,
            self_mask,
            encoder_hidden,
            cross_mask,
            cache,
        )
        if cfg.tie_word_embeddings:
            # T5 v1.0 rescales before the tied output projection.
            hidden = hidden * jnp.asarray(cfg.d_model**-0.5, hidden.dtype)
            logits = jnp.einsum(
                "bqd,vd->bqv",
                hidden,
                self.shared.embedding.astype(cfg.compute_dtype),
                preferred_element_type=jnp.float32,
            )
        else:
            logits = self.lm_head(hidden)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return logits, new_cache

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        decoder_input_ids: jax.Array,
        decoder_positions: jax.Array,
        decoder_mask: jax.Array,
        cross_mask: jax.Array,
    ) -> tuple[jax.Array, None]:
        """Teacher-forced pass: ``encode`` then ``decode``; returns ``(logits, None)`` so
        training code can unpack it like the decoder-only model's output."""
        encoder_hidden = self.encode(input_ids, positions, mask)
        logits, _ = self.decode(
            decoder_input_ids, decoder_positions, decoder_mask, encoder_hidden, cross_mask
        )
        return logits, None


# ---------------------------------------------------------------------------------------
# The family interface's hooks (gist_jax.models.family)

CONFIG_CLASS = T5Config


def build_model(config: T5Config) -> T5ForConditionalGeneration:
    return T5ForConditionalGeneration(config)


def dummy_inputs() -> tuple[jax.Array, ...]:
    """Smallest inputs ``Module.init`` traces the model with (``gist_jax.models.family``)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    mask = jnp.ones((1, 1, 1, 1), bool)
    return ids, ids, mask, ids, ids, mask, mask


def _stack_num_layers(config: T5Config) -> dict[str, int]:
    return {"encoder": config.num_layers, "decoder": config.num_decoder_layers}


def stack_layers(params: Mapping[str, Any], config: T5Config) -> dict[str, Any]:
    """Unrolled params (``encoder/layers_{i}``, ``decoder/layers_{i}``) -> scanned layout
    (``encoder/layers``, ``decoder/layers`` with a leading [L] axis). The relative bias
    lives at stack level, outside the layers, in both layouts."""
    out = dict(params)
    for stack, n in _stack_num_layers(config).items():
        out[stack] = layers.stack_layers(params[stack], n)
    return out


def unstack_layers(params: Mapping[str, Any], config: T5Config) -> dict[str, Any]:
    """Scanned params -> unrolled layout (inverse of ``stack_layers``)."""
    out = dict(params)
    for stack, n in _stack_num_layers(config).items():
        out[stack] = layers.unstack_layers(params[stack], n)
    return out


def relayout_params(params: Mapping[str, Any], config: T5Config, scan_layers: bool) -> Any:
    """Params laid out for ``scan_layers`` whatever layout ``config`` says they are in."""
    if scan_layers == config.scan_layers:
        return params
    return stack_layers(params, config) if scan_layers else unstack_layers(params, config)
