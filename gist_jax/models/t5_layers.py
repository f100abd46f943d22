"""The pieces of the T5 model (``gist_jax.models.t5``): its two caches, the bucketed relative
position bias, unscaled multi-head attention, the ReLU or gated feed-forward, the encoder
and decoder layers, and the two layer stacks (unrolled or ``nn.scan``, with optional
rematerialisation). ``gist_jax.models.t5`` puts them together and owns ``T5Config``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from gist_jax.models import attention as attention_lib
from gist_jax.models.attention import KVCache
from gist_jax.models.layers import RMSNorm, remat
from gist_jax.models.matmul import dense_dot_general

if TYPE_CHECKING:
    from gist_jax.models.t5 import T5Config

# HF ``ACT2FN`` names T5 checkpoints use, as JAX functions (same formulas as PyTorch's).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


# ---------------------------------------------------------------------------------------
# Caches


@flax.struct.dataclass
class T5GistCache:
    """A compressed prompt: what the encoder needs of the k gist tokens.

    Attributes:
      kv: encoder self-attention keys/values of the gist tokens (``KVCache``'s layout),
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
      self_kv: decoder self-attention ``KVCache``.
      cross_k, cross_v: cross-attention keys/values of the encoder output in ``KVCache``'s
        layout (``[layers, B, H, Dk, Ls]``, ``[layers, B, H, Ls, Dk]``), computed once by
        ``init_cache``.
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


def normal_init(std: float, axes: tuple[str, ...]) -> Any:
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


class Attention(nn.Module):
    """Multi-head attention without logit scaling (T5 folds it into the init); keys and
    values come from ``kv`` so self-, cached and cross-attention share one module."""

    config: T5Config

    def setup(self) -> None:
        cfg = self.config
        f, d, h, dk = cfg.initializer_factor, cfg.d_model, cfg.num_heads, cfg.d_kv

        def proj(std: float, name: str) -> attention_lib.HeadProjection:
            return attention_lib.HeadProjection(
                heads=h,
                head_dim=dk,
                kernel_init=normal_init(std, ("embed", "heads", "head_dim")),
                dtype=cfg.compute_dtype,
                name=name,
            )

        # HF's T5 initialisation: the query carries the 1/sqrt(d_kv) that T5 never applies.
        self.q = proj(f * (d * dk) ** -0.5, "q")
        self.k = proj(f * d**-0.5, "k")
        self.v = proj(f * d**-0.5, "v")
        self.o = attention_lib.HeadMerge(
            features=d,
            kernel_init=normal_init(f * (h * dk) ** -0.5, ("heads", "head_dim", "embed")),
            dtype=cfg.compute_dtype,
            name="o",
        )

    def kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Keys and values of ``x [B, K, D]`` in ``attention``'s layout: ``[B, H, Dk, K]``
        and ``[B, H, K, Dk]``."""
        return attention_lib.heads_major(self.k(x), self.v(x))

    def __call__(
        self,
        x: jax.Array,
        keys_t: jax.Array,
        values: jax.Array,
        mask: jax.Array | None,
        bias: jax.Array | None,
    ) -> jax.Array:
        cfg = self.config
        dtype = cfg.compute_dtype
        q = nn.with_logical_constraint(self.q(x), ("batch", "length", "heads", None))
        out = attention_lib.attention(
            q,
            keys_t.astype(dtype),
            values.astype(dtype),
            mask,
            bias=bias,
            scale=1.0,
            implementation=cfg.attention,
        )
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
                kernel_init=normal_init(std, axes),
                name=name,
                dot_general=dense_dot_general,
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
        if extra is not None:  # the gist tokens' slots first
            k = jnp.concatenate([extra[0].astype(k.dtype), k], axis=3)
            v = jnp.concatenate([extra[1].astype(v.dtype), v], axis=2)
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
            new_kv = k, v = attention_lib.write_layer_cache(self_k, self_v, end, k, v)
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
