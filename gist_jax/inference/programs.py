"""The jitted inference programs of both model families: prefill, then one token at a time
inside one jitted function (``lax.while_loop``), greedy or sampled, stopping per example at
EOS and stopping the loop once every example is done. Traced code only; the host side
(batching, padding, placement) is ``gist_jax.inference.decode``.

Cache layout, and why. Prompts of different lengths are **right padded** into one
``[B, P]`` array; every token carries its absolute position (``-1`` at padding). The
preallocated ``attention.KVCache`` has one shared write index ``end`` and a per-slot
position ``pos`` (``-1`` = empty). Prefill writes all ``P`` slots at once (padding becomes
empty slots that no mask lets anyone see); each decode step writes the ``B`` new tokens
at slot ``end`` with one ``dynamic_update_slice``, while each example's new token gets
its *own* position (last real prompt position + 1, + 2, ...). So there is no per-example
scatter and no left padding (which would shift positions or need per-example offsets),
and the mask is simply a ``gist.SelfMask`` of query positions against slot
positions. The same layout serves the gist cache: the ``k`` gist slots of each example
sit at slots ``0..k-1`` with whatever absolute positions that example's gists had, and
the input tokens continue at ``last + 1, ...`` -- different per example, same code.
Inside the jitted call an unrolled LLaMA carries the cache as one buffer per layer, which
its attention reads in place (``KVCache.per_layer``); a prefix arrives stacked.

``max_new_tokens``, the condition and the sampling settings are static (``DecodeOptions``),
so each program compiles once per (prompt bucket, options). ``TRACE_COUNTS`` counts the
traces per jitted entry point (each is one compilation, or a load from the persistent
compilation cache); ``evaluate`` reports them.

The model's own activation sharding constraints are off by default: Flax's shape check of
``DenseGeneral`` kernels trips over logical-partitioning metadata under
``nn.logical_axis_rules``; training falls back the same way. ``DecodeOptions.rules`` turns
them on where they work.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from gist_jax import gist, sharding
from gist_jax.models.attention import KVCache
from gist_jax.models.family import family_of

if TYPE_CHECKING:
    from gist_jax.inference.gist_cache import GistCache

# Number of times each jitted entry point was traced (each trace is one compilation).
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token. ``temperature == 0`` is greedy (argmax); otherwise
    logits are divided by ``temperature``, cut to the ``top_k`` best (0 = no cut) and to
    the smallest set whose probability reaches ``top_p`` (1.0 = no cut), then sampled."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingConfig()


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """Static (compile-time) options of one decode call."""

    max_new_tokens: int
    sampling: SamplingConfig = GREEDY
    condition: str = "gist"
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    return_logits: bool = False
    rules: tuple[tuple[str, Any], ...] | None = None  # logical axis rules under a mesh

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        gist.check_condition(self.condition)


# ---------------------------------------------------------------------------------------
# Sampling and the loop (traced code)


@flax.struct.dataclass
class Rows:
    """A right-padded batch as the programs take it: ``ids``/``positions`` ``int32[B, P]``
    (positions absolute, -1 at padding) and each row's gist span ``first``/``last``
    ``int32[B]`` in the same coordinates (-1 = no gist)."""

    ids: jax.Array
    positions: jax.Array
    first: jax.Array
    last: jax.Array


@contextlib.contextmanager
def tracing(name: str, config: Any, rules: Any) -> Iterator[nn.Module]:
    """Inside a program being traced: count the trace, apply the logical axis rules (if
    any) and give the family's model."""
    TRACE_COUNTS[name] += 1
    with sharding.rules_context(rules):
        yield family_of(config).build(config)


def sample_logits(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Next tokens ``int32[B]`` from ``float32[B, V]`` logits."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        # Keep a token while the probability mass strictly before it is below top_p; the
        # best token is always kept.
        before = jnp.cumsum(probs, axis=-1) - probs
        kept = before < sampling.top_p
        threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@flax.struct.dataclass
class LoopOutput:
    tokens: jax.Array  # int32[B, T], pad after the end
    lengths: jax.Array  # int32[B] generated tokens, EOS included
    finished: jax.Array  # bool[B] an EOS was generated
    steps: jax.Array  # int32[] tokens the loop produced per row (it stops when all are done)
    logits: jax.Array | None  # float32[B, T, V] when requested


def decode_loop(
    step_fn: Any,
    state: Any,
    first_logits: jax.Array,
    next_pos: jax.Array,
    rng: jax.Array,
    opts: DecodeOptions,
) -> LoopOutput:
    """Sample ``opts.max_new_tokens`` tokens: the first from ``first_logits`` (the
    prefill's), each next one from ``step_fn(tokens[B, 1], positions[B, 1], state) ->
    (logits[B, V], state)``. Rows that produced EOS stop (their later tokens are pad and
    their positions -1, i.e. they write empty cache slots) and the loop ends when all
    rows are done. ``next_pos`` ``int32[B]`` is each row's position for its first new
    token."""
    batch, vocab = first_logits.shape
    steps = opts.max_new_tokens
    eos = jnp.asarray(opts.eos_ids or (-1,), jnp.int32)

    def emit(carry: dict, logits: jax.Array, key: jax.Array) -> dict:
        done = carry["done"]
        tok = jnp.where(done, opts.pad_id, sample_logits(logits, key, opts.sampling))
        out = dict(carry)
        out["tokens"] = jax.lax.dynamic_update_slice(carry["tokens"], tok[:, None], (0, carry["t"]))
        if opts.return_logits:
            out["logits"] = jax.lax.dynamic_update_slice(
                carry["logits"], logits[:, None].astype(jnp.float32), (0, carry["t"], 0)
            )
        out["lengths"] = carry["lengths"] + (~done).astype(jnp.int32)
        out["done"] = done | jnp.isin(tok, eos)
        out["last"] = tok
        out["t"] = carry["t"] + 1
        return out

    carry = {
        "t": jnp.zeros((), jnp.int32),
        "tokens": jnp.full((batch, steps), opts.pad_id, jnp.int32),
        "lengths": jnp.zeros((batch,), jnp.int32),
        "done": jnp.zeros((batch,), bool),
        "last": jnp.zeros((batch,), jnp.int32),
        "pos": next_pos.astype(jnp.int32),
        "state": state,
        "rng": rng,
    }
    if opts.return_logits:
        carry["logits"] = jnp.zeros((batch, steps, vocab), jnp.float32)
    rng, key = jax.random.split(rng)
    carry["rng"] = rng
    carry = emit(carry, first_logits, key)

    def cond(c: dict) -> jax.Array:
        return (c["t"] < steps) & ~jnp.all(c["done"])

    def body(c: dict) -> dict:
        # Finished rows feed position -1: an empty slot nobody attends to.
        pos = jnp.where(c["done"], -1, c["pos"])
        logits, state = step_fn(c["last"][:, None], pos[:, None], c["state"])
        c = dict(c, state=state, pos=c["pos"] + 1)
        rng, key = jax.random.split(c["rng"])
        c["rng"] = rng
        return emit(c, logits, key)

    carry = jax.lax.while_loop(cond, body, carry)
    return LoopOutput(
        tokens=carry["tokens"],
        lengths=carry["lengths"],
        finished=carry["done"],
        steps=carry["t"],
        logits=carry.get("logits"),
    )


# ---------------------------------------------------------------------------------------
# LLaMA (decoder-only)


def empty_llama_cache(config: Any, batch: int, size: int) -> KVCache:
    """An empty self-attention cache of ``size`` slots per row for a LLaMA-family config
    (every layer stacked, in the compute dtype)."""
    return KVCache.empty(
        config.num_hidden_layers,
        batch,
        size,
        config.num_key_value_heads,
        config.head_dim,
        config.compute_dtype,
    )


@flax.struct.dataclass
class LlamaDecodeOutput:
    loop: LoopOutput
    prompt_logits: jax.Array | None  # float32[B, P, V] when requested


def _llama_generate(
    params: Any,
    rows: Rows,
    rng: jax.Array,
    prefix: GistCache | None,
    *,
    config: Any,
    opts: DecodeOptions,
) -> LlamaDecodeOutput:
    with tracing("llama_generate", config, opts.rules) as model:
        input_ids, positions, first, last = rows.ids, rows.positions, rows.first, rows.last
        batch, length = input_ids.shape
        n_prefix = 0 if prefix is None else prefix.positions.shape[1]
        # Prompt slots, then one slot per generated token but the last (never fed back).
        size = n_prefix + length + opts.max_new_tokens - 1
        cache = empty_llama_cache(config, batch, size)
        if prefix is not None:
            origin = (0, 0, 0, 0, 0)
            cache = KVCache(
                k=jax.lax.dynamic_update_slice(cache.k, prefix.k.astype(cache.k.dtype), origin),
                v=jax.lax.dynamic_update_slice(cache.v, prefix.v.astype(cache.v.dtype), origin),
                pos=jax.lax.dynamic_update_slice(
                    cache.pos, prefix.positions.astype(jnp.int32), (0, 0)
                ),
                end=jnp.asarray(n_prefix, jnp.int32),
            )

        def forward(
            ids: jax.Array, pos: jax.Array, cache: KVCache, logits_at: jax.Array | None = None
        ) -> tuple[jax.Array, KVCache]:
            mask = gist.SelfMask(
                pos, cache.positions_after_append(pos), first, last, condition=opts.condition
            )
            return model.apply({"params": params}, ids, pos, mask, cache, logits_at=logits_at)

        real = jnp.sum(positions >= 0, axis=1)
        last_index = jnp.maximum(real - 1, 0)
        if opts.return_logits:
            logits, cache = forward(input_ids, positions, cache)
            first_logits = jnp.take_along_axis(logits, last_index[:, None, None], axis=1)[:, 0]
        else:
            # Only the last prompt token's logits: the output layer over every prompt
            # token would be a fifth of the prefill's FLOPs with a 49k vocabulary.
            logits, cache = forward(input_ids, positions, cache, logits_at=last_index)
            first_logits = logits[:, 0]
        next_pos = jnp.take_along_axis(positions, last_index[:, None], axis=1)[:, 0] + 1

        def step(ids: jax.Array, pos: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
            step_logits, cache = forward(ids, pos, cache)
            return step_logits[:, 0], cache

        loop = decode_loop(step, cache, first_logits, next_pos, rng, opts)
        return LlamaDecodeOutput(loop=loop, prompt_logits=logits if opts.return_logits else None)


llama_generate_arrays = jax.jit(_llama_generate, static_argnames=("config", "opts"))
llama_generate_arrays.__doc__ = """Jitted LLaMA decode of a right-padded batch.

Args: params; ``rows`` (``Rows``: the right-padded batch and its gist spans); ``rng``; ``prefix`` (a ``GistCache`` row per example: keys/values at slots 0..k-1) or None;
static ``config`` and ``opts``. Returns ``LlamaDecodeOutput``."""


# ---------------------------------------------------------------------------------------
# T5 (encoder-decoder)


@flax.struct.dataclass
class T5DecodeOutput:
    loop: LoopOutput


def _t5_generate(
    params: Any,
    rows: Rows,
    rng: jax.Array,
    prefix: GistCache | None,
    *,
    config: Any,
    opts: DecodeOptions,
    start_id: int,
) -> T5DecodeOutput:
    with tracing("t5_generate", config, opts.rules) as model:
        input_ids, positions, first, last = rows.ids, rows.positions, rows.first, rows.last
        variables = {"params": params}
        batch = input_ids.shape[0]
        if prefix is None:
            mask = gist.encoder_self_mask(positions, positions, first, last, opts.condition)
            hidden = model.apply(variables, input_ids, positions, mask, method="encode")
            cross_pos = positions
        else:
            # Only the post-gist tokens are encoded; they attend to the cached gist keys.
            cross_pos = jnp.concatenate([prefix.positions.astype(jnp.int32), positions], axis=1)
            mask = gist.encoder_self_mask(positions, cross_pos, first, last, opts.condition)
            extra = KVCache(
                k=prefix.k,
                v=prefix.v,
                pos=prefix.positions.astype(jnp.int32),
                end=jnp.asarray(prefix.positions.shape[1], jnp.int32),
            )
            hidden = model.apply(
                variables, input_ids, positions, mask, extra_kv=extra, method="encode"
            )
            hidden = jnp.concatenate([prefix.hidden.astype(hidden.dtype), hidden], axis=1)
        cross = gist.cross_mask(cross_pos, first, last, opts.condition)
        # Cross-attention keys/values of the encoder output are computed once, here.
        state = model.apply(variables, hidden, opts.max_new_tokens, method="init_cache")
        no_gist = jnp.full((batch,), gist.NO_GIST, jnp.int32)

        def step(ids: jax.Array, pos: jax.Array, state: Any) -> tuple[jax.Array, Any]:
            self_mask = gist.decoder_self_mask(
                pos, state.self_kv.positions_after_append(pos), no_gist, no_gist, "gist"
            )
            logits, state = model.apply(
                variables, ids, pos, self_mask, None, cross, state, method="decode"
            )
            return logits[:, 0], state

        start = jnp.full((batch, 1), start_id, jnp.int32)
        first_logits, state = step(start, jnp.zeros((batch, 1), jnp.int32), state)
        next_pos = jnp.ones((batch,), jnp.int32)
        loop = decode_loop(step, state, first_logits, next_pos, rng, opts)
        return T5DecodeOutput(loop=loop)


t5_generate_arrays = jax.jit(_t5_generate, static_argnames=("config", "opts", "start_id"))
