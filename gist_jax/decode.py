"""Jit-compiled batched decoding for both model families: prefill, then one token at a time
inside one jitted function (``lax.while_loop``), greedy or sampled, stopping per example at
EOS and stopping the loop once every example is done.

This module owns the decode loop and its host-side batching; the gist cache (compression
and decoding from it) lives in ``gist_jax.compress`` and calls the same jitted functions
with a cache *prefix*.

Cache layout, and why. Prompts of different lengths are **right padded** into one
``[B, P]`` array; every token carries its absolute position (``-1`` at padding). The
preallocated ``attention.KVCache`` has one shared write index ``end`` and a per-slot
position ``pos`` (``-1`` = empty). Prefill writes all ``P`` slots at once (padding becomes
empty slots that no mask lets anyone see); each decode step writes the ``B`` new tokens
at slot ``end`` with one ``dynamic_update_slice``, while each example's new token gets
its *own* position (last real prompt position + 1, + 2, ...). So there is no per-example
scatter and no left padding (which would shift positions or need per-example offsets),
and the mask is simply ``gist.decoder_self_mask`` of query positions against slot
positions. The same layout serves the gist cache: the ``k`` gist slots of each example
sit at slots ``0..k-1`` with whatever absolute positions that example's gists had, and
the input tokens continue at ``last + 1, ...`` -- different per example, same code.
Inside the jitted call an unrolled LLaMA carries the cache as one buffer per layer in the
layout its attention products read in place (``KVCache.per_layer``); the stacked form is
what compression produces and what a prefix arrives in.

Shapes are bucketed so that an evaluation run compiles a handful of times: the prompt
length is padded to a power of two (at least ``MIN_LENGTH_BUCKET``), the batch to a fixed
size (a multiple of the mesh's data parallelism; short batches get filler rows), and
``max_new_tokens``, the condition and the sampling settings are static. One entry point
therefore compiles once per (prompt bucket, static options): an evaluation over any
number of examples compiles at most ``buckets x 4`` programs (gist compression, decoding
from the gist cache, pos_control and neg_control full decodes), and the buckets are shared
across splits -- e.g. 13 compilations (4 compress + 9 decode) for 48 examples each of
Alpaca+ validation_seen and validation_human x 3 conditions, batch 16. ``TRACE_COUNTS``
counts the traces per jitted entry point (each is one compilation, or a load from the
persistent compilation cache); ``evaluate`` reports them.

Decoding runs on any mesh from ``gist_jax.sharding``: pass ``mesh=`` and the params are
placed with their logical-axis shardings (as in training) and the batch and caches are
split over the data-parallel axes; XLA propagates the rest. (The model's own activation
constraints are not applied by default: Flax's shape check of ``DenseGeneral`` kernels
trips over logical-partitioning metadata under ``nn.logical_axis_rules``; training falls
back the same way. ``DecodeOptions.rules`` turns them on where they work.)
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gist_jax import gist, sharding
from gist_jax.models.attention import KVCache
from gist_jax.models.family import family_of

MIN_LENGTH_BUCKET = 16

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


@dataclasses.dataclass
class Generation:
    """One example's result: generated ``tokens`` (EOS and what follows removed),
    whether an EOS ended it (``finished``), and optionally the logits that chose each
    generated token (``float32[n, V]``, EOS step included) and the prompt's logits."""

    tokens: list[int]
    finished: bool
    logits: np.ndarray | None = None
    prompt_logits: np.ndarray | None = None


# ---------------------------------------------------------------------------------------
# Buckets and host-side batches


def bucket_length(n: int, minimum: int = MIN_LENGTH_BUCKET) -> int:
    """Smallest power of two ``>= max(n, minimum)``: padded prompt length."""
    n = max(int(n), minimum, 1)
    return 1 << (n - 1).bit_length()


def round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


def pad_rows(
    rows: Sequence[Sequence[int]],
    length: int,
    pad_id: int,
    start_positions: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token rows to ``[len(rows), length]``: ``(ids, positions)`` with
    positions ``start, start + 1, ...`` (default start 0) and ``-1`` at padding."""
    ids = np.full((len(rows), length), pad_id, np.int32)
    positions = np.full((len(rows), length), -1, np.int32)
    for i, row in enumerate(rows):
        if len(row) > length:
            raise ValueError(f"row {i} has {len(row)} tokens, more than the padded length {length}")
        start = 0 if start_positions is None else int(start_positions[i])
        ids[i, : len(row)] = np.asarray(row, np.int32)
        positions[i, : len(row)] = start + np.arange(len(row), dtype=np.int32)
    return ids, positions


def token_ids_of(value: Any) -> tuple[int, ...]:
    """A config's EOS/pad field (None, int or list) as a tuple of ints."""
    if value is None:
        return ()
    if isinstance(value, int | np.integer):
        return (int(value),)
    return tuple(int(v) for v in value)


def default_pad_id(config: Any) -> int:
    pads = token_ids_of(getattr(config, "pad_token_id", None))
    return pads[0] if pads else 0


# ---------------------------------------------------------------------------------------
# Placement on a mesh


def place_params(params: Any, config: Any, mesh: jax.sharding.Mesh | None) -> Any:
    """Params on ``mesh`` with their logical-axis shardings, or without a mesh on the
    default device (host numpy arrays are copied there once, not at every call of a
    compiled function; arrays already placed stay where they are)."""
    if mesh is None:
        return jax.device_put(params)
    axes = family_of(config).param_axes(config)
    shardings = sharding.tree_shardings(params, axes, mesh)
    return jax.device_put(params, shardings)


def place_batch(array: np.ndarray, mesh: jax.sharding.Mesh | None) -> jax.Array:
    """A host array (identical on every process) as a global array split over the batch
    axes of ``mesh`` (or on the default device without a mesh)."""
    array = np.asarray(array)
    if mesh is None:
        return jnp.asarray(array)
    target = sharding.batch_sharding(mesh, array.ndim)
    return jax.make_array_from_callback(array.shape, target, lambda index: array[index])


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process, sharded) array as one numpy array on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def batch_multiple(mesh: jax.sharding.Mesh | None) -> int:
    """Batch sizes must be a multiple of this (the mesh's data parallelism)."""
    return 1 if mesh is None else sharding.batch_parallelism(mesh)


def mesh_context(mesh: jax.sharding.Mesh | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def _rules_context(rules: tuple[tuple[str, Any], ...] | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext() if rules is None else nn.logical_axis_rules(list(rules))


# ---------------------------------------------------------------------------------------
# Sampling and the loop (traced code)


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


@flax.struct.dataclass
class CachePrefix:
    """Keys/values already computed for each example (the gist cache), placed at slots
    ``0..n-1`` of the decode cache: ``k, v [layers, B, n, KVH, D]``, ``pos int32[B, n]``."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array


@flax.struct.dataclass
class LlamaDecodeOutput:
    loop: LoopOutput
    prompt_logits: jax.Array | None  # float32[B, P, V] when requested


def _llama_generate(
    params: Any,
    input_ids: jax.Array,
    positions: jax.Array,
    first: jax.Array,
    last: jax.Array,
    rng: jax.Array,
    prefix: CachePrefix | None,
    *,
    config: Any,
    opts: DecodeOptions,
) -> LlamaDecodeOutput:
    TRACE_COUNTS["llama_generate"] += 1
    with _rules_context(opts.rules):
        model = family_of(config).build(config)
        batch, length = input_ids.shape
        n_prefix = 0 if prefix is None else prefix.pos.shape[1]
        # Prompt slots, then one slot per generated token but the last (never fed back).
        size = n_prefix + length + opts.max_new_tokens - 1
        cache = KVCache.empty(
            config.num_hidden_layers,
            batch,
            size,
            config.num_key_value_heads,
            config.head_dim,
            config.compute_dtype,
        )
        if prefix is not None:
            origin = (0, 0, 0, 0, 0)
            cache = KVCache(
                k=jax.lax.dynamic_update_slice(cache.k, prefix.k.astype(cache.k.dtype), origin),
                v=jax.lax.dynamic_update_slice(cache.v, prefix.v.astype(cache.v.dtype), origin),
                pos=jax.lax.dynamic_update_slice(cache.pos, prefix.pos.astype(jnp.int32), (0, 0)),
                end=jnp.asarray(n_prefix, jnp.int32),
            )

        if not config.scan_layers:
            cache = cache.per_layer()  # read in place by each layer (KVCache.per_layer)

        def forward(
            ids: jax.Array, pos: jax.Array, cache: KVCache, logits_at: jax.Array | None = None
        ) -> tuple[jax.Array, KVCache]:
            mask = gist.decoder_self_mask(
                pos, cache.positions_after_append(pos), first, last, opts.condition
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

Args: params; ``input_ids``/``positions`` ``int32[B, P]`` (positions absolute, -1 at
padding); gist spans ``first``/``last`` ``int32[B]`` in the same coordinates (-1 = none);
``rng``; ``prefix`` (``CachePrefix`` of already-cached keys, e.g. the gist cache) or None;
static ``config`` and ``opts``. Returns ``LlamaDecodeOutput``."""


# ---------------------------------------------------------------------------------------
# T5 (encoder-decoder)


@flax.struct.dataclass
class EncoderPrefix:
    """Encoder-side gist cache for T5: per-layer encoder self-attention keys/values of the
    gist tokens ``[layers, B, n, H, D]``, their final hidden states ``[B, n, D]`` (what the
    decoder cross-attends to) and positions ``int32[B, n]``."""

    k: jax.Array
    v: jax.Array
    hidden: jax.Array
    pos: jax.Array


@flax.struct.dataclass
class T5DecodeOutput:
    loop: LoopOutput


def _t5_generate(
    params: Any,
    input_ids: jax.Array,
    positions: jax.Array,
    first: jax.Array,
    last: jax.Array,
    rng: jax.Array,
    prefix: EncoderPrefix | None,
    *,
    config: Any,
    opts: DecodeOptions,
    start_id: int,
) -> T5DecodeOutput:
    TRACE_COUNTS["t5_generate"] += 1
    with _rules_context(opts.rules):
        model = family_of(config).build(config)
        variables = {"params": params}
        batch = input_ids.shape[0]
        if prefix is None:
            mask = gist.encoder_self_mask(positions, positions, first, last, opts.condition)
            hidden = model.apply(variables, input_ids, positions, mask, method="encode")
            cross_pos = positions
        else:
            # Only the post-gist tokens are encoded; they attend to the cached gist keys.
            cross_pos = jnp.concatenate([prefix.pos.astype(jnp.int32), positions], axis=1)
            mask = gist.encoder_self_mask(positions, cross_pos, first, last, opts.condition)
            extra = KVCache(
                k=prefix.k,
                v=prefix.v,
                pos=prefix.pos.astype(jnp.int32),
                end=jnp.asarray(prefix.pos.shape[1], jnp.int32),
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


# ---------------------------------------------------------------------------------------
# Host-level API


def _results(
    out: LoopOutput, rows: int, prompt_logits: jax.Array | None, prompt_lengths: Sequence[int]
) -> list[Generation]:
    tokens = to_host(out.tokens)
    lengths = to_host(out.lengths)
    finished = to_host(out.finished)
    logits = None if out.logits is None else to_host(out.logits)
    plogits = None if prompt_logits is None else to_host(prompt_logits)
    results = []
    for i in range(rows):
        n = int(lengths[i])
        done = bool(finished[i])
        results.append(
            Generation(
                tokens=[int(t) for t in tokens[i, : n - 1 if done else n]],
                finished=done,
                logits=None if logits is None else logits[i, :n],
                prompt_logits=None if plogits is None else plogits[i, : prompt_lengths[i]],
            )
        )
    return results


def make_options(
    config: Any,
    max_new_tokens: int,
    condition: str = "gist",
    sampling: SamplingConfig | None = None,
    eos_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    return_logits: bool = False,
    rules: Sequence[tuple[str, Any]] | None = None,
) -> DecodeOptions:
    """``DecodeOptions`` with the config's EOS / pad ids unless given. ``rules`` (logical
    axis rules, e.g. ``sharding.activation_rules``) turn on the model's activation sharding
    constraints; by default XLA propagates shardings from the params and the batch."""
    eos = token_ids_of(config.eos_token_id) if eos_token_ids is None else tuple(eos_token_ids)
    return DecodeOptions(
        max_new_tokens=int(max_new_tokens),
        sampling=sampling or GREEDY,
        condition=condition,
        eos_ids=tuple(int(e) for e in eos),
        pad_id=default_pad_id(config) if pad_token_id is None else int(pad_token_id),
        return_logits=return_logits,
        rules=None if rules is None else tuple((name, axes) for name, axes in rules),
    )


def batches(n: int, batch_size: int, lengths: Sequence[int]) -> list[list[int]]:
    """Example indices grouped into batches of similar length (sorted by length, stable),
    so that each batch pads to as small a bucket as possible."""
    order = sorted(range(n), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def generate(
    config: Any,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    condition: str = "gist",
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    return_logits: bool = False,
    eos_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    gist_token_id: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Decode every prompt of the full (uncompressed) sequence under ``condition``'s mask.

    ``prompts`` are token id lists: for LLaMA the whole prompt (BOS ... "Output:"), for T5
    the encoder source. Gist spans come from ``gist_token_id`` (default: the config's);
    gist tokens must be contiguous. Prompts are decoded ``batch_size`` at a time (default:
    all), grouped by length and padded to power-of-two buckets; results come back in the
    order of ``prompts``. ``eos_token_ids`` end a row (default: the config's EOS token);
    ``()`` turns stopping off, so every row runs ``max_new_tokens``. ``on_batch(n)`` is
    called after each batch with its number of prompts (a progress bar).
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        empty = [i for i, p in enumerate(prompts) if len(p) == 0]
        raise ValueError(f"prompt(s) {empty[:10]} are empty")
    opts = make_options(
        config,
        max_new_tokens,
        condition,
        sampling,
        eos_token_ids,
        pad_token_id,
        return_logits,
    )
    gist_id = config.gist_token_id if gist_token_id is None else gist_token_id
    if gist_id is not None:
        for i, prompt in enumerate(prompts):
            try:
                gist.check_gist_contiguous(np.asarray(prompt), gist_id)
            except ValueError as err:
                raise ValueError(f"prompt {i}: {err}") from err
    multiple = batch_multiple(mesh)
    batch_size = round_up(batch_size or len(prompts), multiple)
    params = place_params(params, config, mesh)
    rng = jax.random.key(seed)
    results: list[Generation | None] = [None] * len(prompts)
    for chunk_number, chunk in enumerate(
        batches(len(prompts), batch_size, [len(p) for p in prompts])
    ):
        rows = [list(prompts[i]) for i in chunk]
        # Filler rows keep the batch shape fixed (one compile per length bucket).
        rows += [[opts.pad_id]] * (batch_size - len(rows))
        ids, positions = pad_rows(rows, bucket_length(max(map(len, rows))), opts.pad_id)
        if gist_id is None:
            first = last = np.full((len(rows),), gist.NO_GIST, np.int32)
        else:
            first, last = gist.gist_spans(np.where(positions >= 0, ids, -1), gist_id)
        key = jax.random.fold_in(rng, chunk_number)
        args = [place_batch(a, mesh) for a in (ids, positions, first, last)]
        with mesh_context(mesh):
            if family_of(config).encoder_decoder:
                out = t5_generate_arrays(
                    params, *args, key, None, config=config, opts=opts, start_id=t5_start_id(config)
                )
                prompt_logits = None
            else:
                out = llama_generate_arrays(params, *args, key, None, config=config, opts=opts)
                prompt_logits = out.prompt_logits
        chunk_results = _results(out.loop, len(chunk), prompt_logits, [len(r) for r in rows])
        for i, result in zip(chunk, chunk_results, strict=True):
            results[i] = result
        if on_batch is not None:
            on_batch(len(chunk))
    return results  # type: ignore[return-value]


def t5_start_id(config: Any) -> int:
    """T5's decoder start token (the pad id unless the config says otherwise)."""
    start = getattr(config, "decoder_start_token_id", None)
    return int(start) if start is not None else default_pad_id(config)
