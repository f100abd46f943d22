"""Batched decoding on the host: the only host-side loop over examples. ``generate`` decodes
full prompts under a gist condition or, given a *prefix* (a ``gist_cache.GistCache``, one
row per prompt), the inputs after each prompt's gists from their cached keys/values; both
run the jitted programs of ``gist_jax.inference.programs``.

Shapes are bucketed so that an evaluation run compiles a handful of times: the prompt
length is padded to a power of two (at least ``MIN_LENGTH_BUCKET``) and the batch to a
fixed size (a multiple of the mesh's data parallelism; short batches get filler rows). One
program therefore compiles once per (prompt bucket, static options): an evaluation over
any number of examples compiles at most ``buckets x 4`` programs (gist compression,
decoding from the gist cache, pos_control and neg_control full decodes), and the buckets
are shared across splits -- e.g. 13 compilations (4 compress + 9 decode) for 48 examples
each of Alpaca+ validation_seen and validation_human x 3 conditions, batch 16.

Decoding runs on any mesh from ``gist_jax.sharding``: pass ``mesh=`` and the params are
placed with their logical-axis shardings (as in training) and the batch and caches are
split over the data-parallel axes; XLA propagates the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from gist_jax import gist, sharding
from gist_jax.inference.programs import (
    GREEDY,
    DecodeOptions,
    LoopOutput,
    Rows,
    SamplingConfig,
    llama_generate_arrays,
    t5_generate_arrays,
)
from gist_jax.models.family import family_of

if TYPE_CHECKING:
    from gist_jax.inference.gist_cache import GistCache

MIN_LENGTH_BUCKET = 16


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


def place_rows(
    ids: np.ndarray,
    positions: np.ndarray,
    first: np.ndarray,
    last: np.ndarray,
    mesh: jax.sharding.Mesh | None,
) -> Rows:
    """A padded host batch and its gist spans as the programs' ``Rows``, split over the
    batch axes of ``mesh``."""
    return Rows(*(place_batch(a, mesh) for a in (ids, positions, first, last)))


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


def padded_batches(lengths: Sequence[int], batch_size: int) -> list[tuple[list[int], list[int]]]:
    """Example indices in batches of similar length: ``(chunk, rows)`` per batch, ``chunk``
    the examples it decodes (sorted by length, stable, so each batch pads to as small a
    bucket as possible) and ``rows`` the same padded to ``batch_size`` by repeating its
    first example (filler rows keep the batch shape fixed: one compile per bucket)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    out = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        out.append((chunk, chunk + [chunk[0]] * (batch_size - len(chunk))))
    return out


def place_prefix(prefix: GistCache, mesh: jax.sharding.Mesh | None) -> GistCache:
    """A gist cache's arrays split over the mesh's batch axes (axis 1 of the per-layer
    keys/values, axis 0 of the rest); arrays already spread over processes stay put."""

    def place(x: Any, axis: int) -> Any:
        if x is None or mesh is None:
            return None if x is None else jnp.asarray(x)
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x
        host = np.asarray(x)
        spec = [None] * host.ndim
        spec[axis] = sharding.batch_spec(mesh, 1)[0]
        target = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
        return jax.make_array_from_callback(host.shape, target, lambda index: host[index])

    return dataclasses.replace(
        prefix,
        k=place(prefix.k, 1),
        v=place(prefix.v, 1),
        positions=place(prefix.positions, 0),
        hidden=place(prefix.hidden, 0),
    )


def generate(
    config: Any,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    prefix: GistCache | None = None,
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
    input_length: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Decode every prompt under ``condition``'s mask; results in the order of ``prompts``.

    Without ``prefix``, ``prompts`` are whole token id lists (LLaMA: BOS ... "Output:";
    T5: the encoder source), gist spans come from ``gist_token_id`` (default: the
    config's) and gist tokens must be contiguous. With ``prefix`` (a ``gist_cache.GistCache``
    whose row ``i`` belongs to ``prompts[i]``) each prompt is the input after its gists: it
    continues at positions ``last_i + 1, ...`` and sees only the cached gists
    (``gist_cache.generate`` checks such inputs first).

    Prompts are decoded ``batch_size`` at a time (default: all), grouped by length and
    padded to power-of-two buckets, or to ``input_length`` when given (one compile for any
    prompt up to it). ``eos_token_ids`` end a row (default: the config's EOS token); ``()``
    turns stopping off, so every row runs ``max_new_tokens``. With ``return_logits`` each
    ``Generation`` also carries the prompt's logits (LLaMA) and each generated token's.
    ``on_batch(n)`` is called after each batch with its number of prompts (a progress bar).
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        empty = [i for i, p in enumerate(prompts) if len(p) == 0]
        raise ValueError(f"prompt(s) {empty[:10]} are empty")
    opts = make_options(
        config, max_new_tokens, condition, sampling, eos_token_ids, pad_token_id, return_logits
    )
    gist_id = config.gist_token_id if gist_token_id is None else gist_token_id
    if gist_id is not None and prefix is None:
        for i, prompt in enumerate(prompts):
            try:
                gist.check_gist_contiguous(np.asarray(prompt), gist_id)
            except ValueError as err:
                raise ValueError(f"prompt {i}: {err}") from err
    gist_positions = None if prefix is None else np.asarray(to_host(prefix.positions))
    batch_size = round_up(batch_size or len(prompts), batch_multiple(mesh))
    params = place_params(params, config, mesh)
    encoder_decoder = family_of(config).encoder_decoder
    rng = jax.random.key(seed)
    results: list[Generation | None] = [None] * len(prompts)
    for number, (chunk, rows) in enumerate(padded_batches([len(p) for p in prompts], batch_size)):
        tokens = [list(prompts[i]) for i in rows]
        length = input_length or bucket_length(max(map(len, tokens)))
        if prefix is None:
            ids, positions = pad_rows(tokens, length, opts.pad_id)
            if gist_id is None:
                first = last = np.full((len(rows),), gist.NO_GIST, np.int32)
            else:
                first, last = gist.gist_spans(np.where(positions >= 0, ids, -1), gist_id)
            rows_prefix = None
        else:
            first = gist_positions[rows, 0].astype(np.int32)
            last = gist_positions[rows, -1].astype(np.int32)
            ids, positions = pad_rows(tokens, length, opts.pad_id, last + 1)
            rows_prefix = place_prefix(prefix.take(rows), mesh)
        key = jax.random.fold_in(rng, number)
        batch = place_rows(ids, positions, first, last, mesh)
        with mesh_context(mesh):
            if encoder_decoder:
                start_id = t5_start_id(config)
                out = t5_generate_arrays(
                    params, batch, key, rows_prefix, config=config, opts=opts, start_id=start_id
                )
                prompt_logits = None
            else:
                out = llama_generate_arrays(
                    params, batch, key, rows_prefix, config=config, opts=opts
                )
                prompt_logits = out.prompt_logits
        chunk_results = _results(out.loop, len(chunk), prompt_logits, [len(r) for r in tokens])
        for i, result in zip(chunk, chunk_results, strict=True):
            results[i] = result
        if on_batch is not None:
            on_batch(len(chunk))
    return results  # type: ignore[return-value]


def t5_start_id(config: Any) -> int:
    """T5's decoder start token (the pad id unless the config says otherwise)."""
    start = getattr(config, "decoder_start_token_id", None)
    return int(start) if start is not None else default_pad_id(config)
