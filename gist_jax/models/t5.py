"""Flax Linen T5 family (T5 v1.0, T5 v1.1, FLAN-T5): encoder-decoder with explicit caches.

This module owns the encoder-decoder model and ``T5Config`` (its layers, stacks and caches
are in ``gist_jax.models.t5_layers``; the RMS layer norm and untied output layer in
``gist_jax.models.layers``): relative
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
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gist_jax.models import layers
from gist_jax.models.attention import KVCache, heads_major, slot_major
from gist_jax.models.layers import ConfigMethods, RuntimeFields, Unembed
from gist_jax.models.t5_layers import (
    ACTIVATIONS,
    Decoder,
    Encoder,
    T5DecoderCache,
    T5GistCache,
    normal_init,
)


def activation_of(feed_forward_proj: str) -> tuple[bool, str]:
    """``(is_gated, activation)`` the way ``transformers.T5Config`` derives them."""
    parts = feed_forward_proj.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise ValueError(f"feed_forward_proj {feed_forward_proj!r} is not '<act>' or 'gated-<act>'")
    # T5 v1.1 checkpoints say "gated-gelu" but were trained with the tanh approximation.
    act = "gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]
    return parts[0] == "gated", act


@dataclasses.dataclass(frozen=True)
class T5Config(ConfigMethods, RuntimeFields):
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
            embedding_init=normal_init(cfg.initializer_factor, ("vocab", "embed")),
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
        k, v = slot_major(k, v)
        gist_k = jnp.where(keep[None, ..., None], _gather_rows(k, index, 2), 0)
        gist_v = jnp.where(keep[None, ..., None], _gather_rows(v, index, 2), 0)
        gist_k, gist_v = heads_major(gist_k, gist_v)
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
