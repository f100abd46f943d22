"""Flax Linen LLaMA family (LLaMA 1/2/3, SmolLM2, Qwen2, Mistral: HF ``LlamaForCausalLM``
and the architectures that are it with other flags). This module owns the decoder-only
model and ``LlamaConfig``: rotary embeddings in Hugging Face's rotate-half layout (default,
"linear" and "llama3" scaling), grouped-query attention with an explicit head dimension,
the SwiGLU MLP, a tied or untied output layer (norms, remat and layer stacks come from
``gist_jax.models.layers``, the weight products from ``gist_jax.models.matmul``).

Call contract::

    logits, new_cache = LlamaForCausalLM(config).apply(
        {"params": params}, input_ids, positions, mask, cache=None)

``positions`` are absolute positions (``-1`` = padding) used for RoPE; ``mask`` is the
boolean ``[B, 1, Q, K]`` mask from ``gist_jax.gist`` or a ``gist.SelfMask`` (which the
"flash" attention reads as is and the others turn dense once per call; the model never
builds masks from token ids); with a ``KVCache`` the call writes its ``Q`` new keys
(already rotated) and values at ``cache.end`` and attends over the whole cache. Params
are float32; ``dtype`` is the compute dtype; logits are float32. Keyword ``logits_at``
(``int32[B]``) returns only the logits of that query position per row, ``[B, 1, V]``
(a prefill needs just the last prompt token's; this skips most of the output layer).
With ``return_hidden=True`` the call returns the final-normed hidden states ``[B, L, D]``
instead of logits (and no cache), for a loss that applies ``output_kernel`` only where it
is needed (``gist_jax.train.output_loss``).

Parameter tree (names mirror the HF state dict, so conversion is renames and
transposes)::

    embed_tokens/embedding [V, D]
    layers_{i}/...  or, with scan_layers, layers/... with a leading [L] axis
        input_layernorm/scale [D], post_attention_layernorm/scale [D]
        self_attn/{q,k,v}_proj/kernel [D, H|KVH, Dh], self_attn/o_proj/kernel [H, Dh, D]
        mlp/{gate,up}_proj/kernel [D, F], mlp/down_proj/kernel [F, D]
        gist_adapter/{down [D, R], up [R, D]}   (only with gist_adapter_rank = R > 0)
    norm/scale [D]
    lm_head/kernel [D, V]            (only when the output layer is untied)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gist_jax import gist
from gist_jax.models import layers
from gist_jax.models.attention import (
    HeadMerge,
    HeadProjection,
    KVCache,
    attention,
    heads_major,
    mask_for,
    write_layer_cache,
)
from gist_jax.models.layers import ConfigMethods, RMSNorm, RuntimeFields, Unembed, remat
from gist_jax.models.matmul import dense_dot_general, matmul

ROPE_TYPES = ("default", "linear", "llama3")
Rope = tuple[jax.Array, jax.Array]  # cos and sin tables of the positions (rope_tables)
LayerKV = tuple[jax.Array, jax.Array] | None  # one layer's cache buffers (KVCache's layout)
# The Hugging Face architectures that are this model with other flags (gist_jax.convert.llama).
ARCHITECTURES = ("llama", "qwen2", "mistral")


def _as_token_ids(value: Any) -> int | tuple[int, ...] | None:
    if value is None or isinstance(value, int):
        return value
    return tuple(int(v) for v in value)


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ConfigMethods, RuntimeFields):
    """Hyper-parameters of a LLaMA-family model (hashable: Flax modules hold it).

    The rope scaling parameters are flat fields rather than a dict so the config stays
    hashable; ``gist_jax.convert.llama`` translates them to and from HF's config.json.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q, k, v and o (LLaMA's attention_bias)
    qkv_bias: bool = False  # biases on q, k and v only (Qwen2)
    mlp_bias: bool = False
    # Mistral: a key farther back than this many positions is not attended to. Not
    # implemented: a sequence longer than the window is refused (see `_check_window`).
    sliding_window: int | None = None
    architecture: str = "llama"  # the HF architecture it converts to and from (ARCHITECTURES)
    initializer_range: float = 0.02
    bos_token_id: int | tuple[int, ...] | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | tuple[int, ...] | None = None
    gist_token_id: int | None = None
    # Rank of a low-rank update of the residual stream that only the gist tokens' positions
    # get, in every layer (0: none): compression weights of their own (docs/results.md,
    # section 12). HF exports keep it in a file of its own (convert.common).
    gist_adapter_rank: int = 0
    model_type: str = "llama"

    def __post_init__(self) -> None:
        self.check_common_fields()
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture {self.architecture!r} is not supported; supported: {ARCHITECTURES}"
            )
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope type {self.rope_type!r} is not supported; supported: {ROPE_TYPES}"
            )
        if self.gist_adapter_rank < 0:
            raise ValueError(f"gist_adapter_rank={self.gist_adapter_rank} must be >= 0")
        if self.gist_adapter_rank and self.gist_token_id is None:
            raise ValueError("a gist adapter (gist_adapter_rank > 0) needs gist_token_id")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            object.__setattr__(self, name, _as_token_ids(getattr(self, name)))

    @property
    def has_qkv_bias(self) -> bool:
        return self.attention_bias or self.qkv_bias

    # ---- gist_jax's own JSON form (model_config.json) ----

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(d[name], tuple):
                d[name] = list(d[name])
        return d


# ---------------------------------------------------------------------------------------
# Rotary embeddings


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies ``float32[head_dim // 2]`` after rope scaling (host constant).

    Computed in float32 the way transformers does, so positions map to the same angles.
    """
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.power(np.float32(config.rope_theta), exponents)).astype(
        np.float32
    )
    if config.rope_type == "linear":
        inv_freq = inv_freq / np.float32(config.rope_factor)
    elif config.rope_type == "llama3":
        factor = config.rope_factor
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        old_len = config.rope_original_max_position_embeddings or config.max_position_embeddings
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths (low frequencies) are slowed by `factor`, short ones kept, and
        # the band in between interpolated smoothly.
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq.astype(np.float32)


def rope_tables(positions: jax.Array, config: LlamaConfig) -> tuple[jax.Array, jax.Array]:
    """``cos, sin`` of shape ``float32[B, Q, head_dim]`` (rotate-half layout: the half-size
    frequency table repeated twice). Padding positions (-1) use position 0."""
    inv_freq = jnp.asarray(rope_inv_freq(config))
    pos = jnp.maximum(positions, 0).astype(jnp.float32)
    freqs = pos[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, Q, heads, D]`` (HF rotate-half layout), in float32, back to x's dtype."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


# ---------------------------------------------------------------------------------------
# Layers


def _flat_tokens(x: jax.Array, keep: int = 1) -> jax.Array:
    """``[B, L, ...]`` -> ``[B * L, ...]`` (the last ``keep`` axes kept): a free reshape.

    Why: with 3-D activations, XLA:CPU lays out the weight gradient of a projection
    (a contraction over both the batch and the length axis) as a transposed copy of the
    output gradient plus a non-library dot; with the tokens flattened first it is one
    ``[tokens, in]^T @ [tokens, out]`` matrix product. Same math, and on a 2-core CPU the
    backward pass of a SwiGLU MLP gets ~30% faster (see benchmarks).
    """
    return x.reshape(-1, *x.shape[x.ndim - keep :])


def _init(config: LlamaConfig, axes: tuple[str, ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), axes)


def _zeros(axes: tuple[str, ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and optionally this layer's cache buffers
    ``kv`` (``KVCache``'s layout), which it writes at ``end`` and attends over."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, rope: Rope, mask: jax.Array, kv: LayerKV, end: jax.Array | None
    ) -> tuple[jax.Array, LayerKV]:
        cfg = self.config
        dtype = cfg.compute_dtype

        def proj(heads: int, head_axis: str, name: str) -> HeadProjection:
            return HeadProjection(
                heads=heads,
                head_dim=cfg.head_dim,
                kernel_init=_init(cfg, ("embed", head_axis, "head_dim")),
                bias_init=_zeros((head_axis, "head_dim")) if cfg.has_qkv_bias else None,
                dtype=dtype,
                name=name,
            )

        batch, length = x.shape[:2]
        # Projections see a [tokens, D] matrix (see `_flat_tokens`); heads are split after.
        tokens = _flat_tokens(x)
        q = proj(cfg.num_attention_heads, "heads", "q_proj")(tokens)
        k = proj(cfg.num_key_value_heads, "kv_heads", "k_proj")(tokens)
        v = proj(cfg.num_key_value_heads, "kv_heads", "v_proj")(tokens)
        q, k, v = (t.reshape(batch, length, *t.shape[1:]) for t in (q, k, v))
        cos, sin = rope
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", None))
        keys_t, values = heads_major(k, v)
        new_kv = None
        if kv is not None:
            new_kv = keys_t, values = write_layer_cache(kv[0], kv[1], end, keys_t, values)
        _check_window(cfg, keys_t.shape[-1])
        out = attention(
            q, keys_t.astype(dtype), values.astype(dtype), mask, implementation=cfg.attention
        )
        out = HeadMerge(
            features=cfg.hidden_size,
            kernel_init=_init(cfg, ("heads", "head_dim", "embed")),
            bias_init=_zeros(("embed",)) if cfg.attention_bias else None,
            dtype=dtype,
            name="o_proj",
        )(_flat_tokens(out, keep=2))
        return out.reshape(batch, length, cfg.hidden_size), new_kv


def _check_window(cfg: LlamaConfig, num_keys: int) -> None:
    """Refuse (at trace time) attention over more keys than a Mistral sliding window: up
    to the window, sliding-window attention is full attention; beyond it, it is not
    implemented, and silently attending to everything would not be the model."""
    if cfg.sliding_window is not None and num_keys > cfg.sliding_window:
        raise ValueError(
            f"{num_keys} keys exceed the model's sliding_window={cfg.sliding_window}; "
            "sliding-window attention is not implemented: keep prompt + generated tokens "
            f"(and data.max_length) within {cfg.sliding_window}"
        )


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config

        def dense(features: int, axes: tuple[str, str], name: str) -> nn.Dense:
            return nn.Dense(
                features,
                use_bias=cfg.mlp_bias,
                dtype=cfg.compute_dtype,
                param_dtype=jnp.float32,
                kernel_init=_init(cfg, axes),
                bias_init=_zeros(axes[1:]),
                name=name,
                dot_general=dense_dot_general,
            )

        shape = x.shape
        tokens = _flat_tokens(x)
        gate = dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(tokens)
        up = dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(tokens)
        h = (nn.silu(gate) * up).reshape(*shape[:-1], cfg.intermediate_size)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        out = dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(_flat_tokens(h))
        return out.reshape(shape)


class GistAdapter(nn.Module):
    """``x @ down @ up`` at the gist tokens' positions, zero elsewhere: parameters that only
    compression uses. ``up`` starts at zero, so a new adapter leaves the model unchanged."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, gist_rows: jax.Array) -> jax.Array:
        cfg, dtype = self.config, self.config.compute_dtype
        down = self.param("down", _init(cfg, ("embed", None)), (x.shape[-1], cfg.gist_adapter_rank))
        up = self.param("up", _zeros((None, "embed")), (cfg.gist_adapter_rank, x.shape[-1]))
        return matmul(matmul(x, down.astype(dtype)), up.astype(dtype)) * gist_rows


class DecoderLayer(nn.Module):
    """Pre-norm transformer block. Signature fits ``nn.scan``: the hidden state is the carry,
    the layer's cache buffers are the scanned input/output. ``gist_rows``: ``[B, L, 1]``, 1
    at gist tokens (None without a gist adapter)."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        hidden: jax.Array,
        rope: Rope,
        mask: jax.Array,
        kv: LayerKV,
        end: jax.Array | None,
        gist_rows: jax.Array | None,
    ) -> tuple[jax.Array, LayerKV]:
        cfg = self.config
        input_norm = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, name="input_layernorm")
        x = input_norm(hidden)
        if gist_rows is not None:
            # Before attention, so that every layer's adapter shapes the gist tokens' keys
            # and values in that layer (after the MLP, the last layer's would reach no loss).
            hidden = hidden + GistAdapter(cfg, name="gist_adapter")(x, gist_rows)
            x = input_norm(hidden)
        attn, new_kv = Attention(cfg, name="self_attn")(x, rope, mask, kv, end)
        hidden = hidden + attn
        x = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, name="post_attention_layernorm")(hidden)
        hidden = hidden + MLP(cfg, name="mlp")(x)
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "embed"))
        return hidden, new_kv


class LlamaForCausalLM(nn.Module):
    """The full causal LM; see the module docstring for the call contract."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        mask: jax.Array | gist.SelfMask,
        cache: KVCache | None = None,
        logits_at: jax.Array | None = None,
        return_hidden: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        cfg = self.config
        dtype = cfg.compute_dtype
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=jnp.float32,
            embedding_init=_init(cfg, ("vocab", "embed")),
            name="embed_tokens",
        )
        hidden = embed(input_ids.astype(jnp.int32))
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "embed"))
        rope = rope_tables(positions, cfg)
        mask = mask_for(mask, cfg.attention)
        end = None if cache is None else cache.end
        gist_rows = None
        if cfg.gist_adapter_rank:
            gist_rows = (input_ids == cfg.gist_token_id)[..., None].astype(dtype)
        layer_cls = remat(DecoderLayer, cfg.remat, cfg.scan_layers)

        if cfg.scan_layers:
            if cache is not None:
                cache = cache.stacked()  # scanned over its leading [layers] axis
            scanned = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
                length=cfg.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            kv = None if cache is None else (cache.k, cache.v)
            hidden, new_kv = scanned(cfg, name="layers")(hidden, rope, mask, kv, end, gist_rows)
        else:
            # One buffer per layer (KVCache.per_layer): each layer writes and reads its own.
            if cache is not None:
                cache = cache.per_layer()
            new_k, new_v = [], []
            for i in range(cfg.num_hidden_layers):
                kv = None if cache is None else (cache.k[i], cache.v[i])
                layer = layer_cls(cfg, name=f"layers_{i}")
                hidden, kv = layer(hidden, rope, mask, kv, end, gist_rows)
                if kv is not None:
                    new_k.append(kv[0])
                    new_v.append(kv[1])
            new_kv = (tuple(new_k), tuple(new_v))

        if logits_at is not None:
            hidden = jnp.take_along_axis(hidden, logits_at[:, None, None].astype(jnp.int32), axis=1)
        hidden = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, name="norm")(hidden)
        if return_hidden:
            # For a loss that runs the output layer on a few positions (train.output_loss).
            return hidden, None
        if cfg.tie_word_embeddings:
            # [V, D] embedding used as the output projection.
            logits = jnp.einsum(
                "bqd,vd->bqv",
                hidden,
                embed.embedding.astype(dtype),
                preferred_element_type=jnp.float32,
            )
        else:
            logits = Unembed(
                cfg.vocab_size, cfg.initializer_range, cfg.compute_dtype, name="lm_head"
            )(hidden)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))

        new_cache = None
        if cache is not None:
            new_cache = KVCache(
                k=new_kv[0],
                v=new_kv[1],
                pos=cache.positions_after_append(positions),
                end=cache.end + input_ids.shape[1],
            )
        return logits, new_cache


# ---------------------------------------------------------------------------------------
# The family interface's hooks (gist_jax.models.family)

CONFIG_CLASS = LlamaConfig


def build_model(config: LlamaConfig) -> LlamaForCausalLM:
    return LlamaForCausalLM(config)


def output_kernel(params: Mapping[str, Any], config: LlamaConfig) -> jax.Array:
    """The output layer's ``[D, V]`` matrix: the transposed embedding when tied."""
    if config.tie_word_embeddings:
        return params["embed_tokens"]["embedding"].T
    return params["lm_head"]["kernel"]


def dummy_inputs() -> tuple[jax.Array, jax.Array, gist.SelfMask]:
    """Smallest inputs ``Module.init`` traces the model with (``gist_jax.models.family``)."""
    positions = jnp.zeros((1, 1), jnp.int32)
    no_gist = jnp.full((1,), gist.NO_GIST, jnp.int32)
    return (
        jnp.zeros((1, 1), jnp.int32),
        positions,
        gist.SelfMask(positions, positions, no_gist, no_gist),
    )


def relayout_params(params: Mapping[str, Any], config: LlamaConfig, scan_layers: bool) -> Any:
    """Params laid out for ``scan_layers`` whatever layout ``config`` says they are in."""
    if scan_layers == config.scan_layers:
        return params
    if scan_layers:
        return layers.stack_layers(params, config.num_hidden_layers)
    return layers.unstack_layers(params, config.num_hidden_layers)
