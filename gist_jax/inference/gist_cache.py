"""Gist compression and decoding from a gist cache, batched, for both model families.

This module owns ``GistCache`` (the k gist tokens' keys/values of a set of prompts, with
their absolute positions), ``compress`` (prompts -> ``GistCache``) and ``generate``
(``GistCache`` + inputs -> tokens), plus the byte counts of a cached prompt.

A *prompt* is the templated text up to and including the k contiguous gist tokens (for
LLaMA: BOS "Instruction: ..." "\\n" ``<GIST>``*k; for T5 the same without BOS); an *input*
is everything after the last gist token (LLaMA: "\\nInput: ...\\nOutput:"; T5: "\\nInput:
..." + EOS). ``split_prompt`` cuts a tokenised example there. Compression runs the prompt
once and keeps, per layer, the keys (already rotated, for LLaMA) and values at the gist
positions (T5: the encoder's per-layer gist keys/values and the final encoder states there);
decoding feeds the input tokens at positions ``last + 1, ...`` with the gist cache as the
only context. Under the gist mask nothing after the gists sees the prompt, so this is the
full masked forward pass: logits agree with the uncompressed ``gist``-condition decode to
float rounding (tested at 1e-5 per example, in batches with different prompt lengths,
gist positions and paddings), and greedy outputs are identical.

Batching: every example keeps its own gist positions; decoding is ``decode.generate`` with
the cache as its *prefix*: the gist slots are the first k slots of the decode cache and
the input tokens are right padded after them, so one compiled program serves a batch
whose prompts had different lengths. All prompts of one ``GistCache`` have the same k.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gist_jax import gist
from gist_jax.inference import decode
from gist_jax.inference.decode import Generation
from gist_jax.inference.programs import Rows, SamplingConfig, empty_llama_cache, tracing
from gist_jax.models.family import family_of


class GistCacheError(ValueError):
    """Prompts, inputs or caches that cannot be compressed or decoded; the message says
    which example and why."""


@flax.struct.dataclass
class GistCache:
    """Compressed prompts: the k gist tokens of each of B prompts.

    Attributes:
      k, v: per-layer keys/values of the gist tokens in ``attention.KVCache``'s layout,
        keys ``[layers, B, KVH, D, k]`` and values ``[layers, B, KVH, k, D]`` (LLaMA:
        decoder self-attention, keys rotated at their absolute positions; T5: encoder
        self-attention, ``KVH`` = heads).
      positions: ``int32[B, k]`` absolute positions of the gist tokens in the uncompressed
        sequence (contiguous: ``first .. first + k - 1``).
      hidden: T5 only, ``[B, k, d_model]`` final encoder states at the gist positions
        (what the decoder cross-attends to); None for LLaMA.
      model_type: "llama" or "t5" (static).
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    hidden: jax.Array | None = None
    model_type: str = flax.struct.field(pytree_node=False, default="llama")

    @property
    def batch_size(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_gist(self) -> int:
        return int(self.positions.shape[1])

    @property
    def first(self) -> jax.Array:
        return self.positions[:, 0]

    @property
    def last(self) -> jax.Array:
        return self.positions[:, -1]

    def nbytes_per_prompt(self) -> int:
        """Bytes one prompt's cache holds (keys, values, T5 hidden states; positions not
        counted): ``k * layers * 2 * kv_heads * head_dim * itemsize`` (+ T5 hidden)."""
        per_row = (self.k.nbytes + self.v.nbytes) // self.batch_size
        if self.hidden is not None:
            per_row += self.hidden.nbytes // self.batch_size
        return int(per_row)

    def take(self, rows: Sequence[int] | np.ndarray) -> GistCache:
        """The cache of the given rows (repeats allowed: one prompt for many inputs)."""
        rows = np.asarray(rows, np.int32)
        if rows.size and (rows.min() < 0 or rows.max() >= self.batch_size):
            raise GistCacheError(
                f"rows {rows.tolist()[:10]} out of range for a cache of {self.batch_size}"
            )
        return GistCache(
            k=self.k[:, rows],
            v=self.v[:, rows],
            positions=self.positions[rows],
            hidden=None if self.hidden is None else self.hidden[rows],
            model_type=self.model_type,
        )

    def to_numpy(self) -> GistCache:
        """The same cache as host numpy arrays (gathered across processes if needed)."""
        return jax.tree.map(decode.to_host, self)

    @staticmethod
    def concatenate(caches: Sequence[GistCache]) -> GistCache:
        """Stack caches along the batch axis (same model type and k)."""
        if not caches:
            raise GistCacheError("no caches to concatenate")
        kinds = {(c.model_type, c.num_gist, c.k.shape[2:], c.k.dtype) for c in caches}
        if len(kinds) != 1:
            raise GistCacheError(
                f"caches differ in (model type, k, per-token shape, dtype): {sorted(map(str, kinds))}"
            )
        on_host = all(isinstance(c.k, np.ndarray) for c in caches)
        cat = np.concatenate if on_host else jnp.concatenate
        return GistCache(
            k=cat([c.k for c in caches], axis=1),
            v=cat([c.v for c in caches], axis=1),
            positions=cat([c.positions for c in caches], axis=0),
            hidden=None if caches[0].hidden is None else cat([c.hidden for c in caches], axis=0),
            model_type=caches[0].model_type,
        )


# ---------------------------------------------------------------------------------------
# Splitting and checking prompts


def split_prompt(tokens: Sequence[int], gist_token_id: int) -> tuple[list[int], list[int]]:
    """Cut a tokenised example after its last gist token: ``(prompt, input)``.

    Raises ``GistCacheError`` when there is no gist token, and ``ValueError`` (from
    ``gist.check_gist_contiguous``) when the gist tokens are not contiguous.
    """
    tokens = [int(t) for t in tokens]
    where = [i for i, t in enumerate(tokens) if t == gist_token_id]
    if not where:
        raise GistCacheError(f"example has no gist token (id {gist_token_id}): {tokens[:20]}...")
    gist.check_gist_contiguous(np.asarray(tokens), gist_token_id)
    return tokens[: where[-1] + 1], tokens[where[-1] + 1 :]


def check_prompts(prompts: Sequence[Sequence[int]], gist_token_id: int | None) -> int:
    """Validate prompts for compression; returns their common number of gist tokens k.

    Each prompt must contain gist tokens, contiguous, and end with them (whatever follows
    the last gist belongs to the input), and all prompts must have the same k.
    """
    if gist_token_id is None:
        raise GistCacheError("the model config has no gist_token_id: it cannot compress")
    if not prompts:
        raise GistCacheError("no prompts to compress")
    counts = []
    for i, prompt in enumerate(prompts):
        ids = np.asarray(prompt, np.int64).reshape(-1)
        where = np.flatnonzero(ids == gist_token_id)
        if where.size == 0:
            raise GistCacheError(
                f"prompt {i} has no gist token (id {gist_token_id}); a prompt to compress is "
                "the template up to and including its gist tokens"
            )
        try:
            gist.check_gist_contiguous(ids, gist_token_id)
        except ValueError as err:
            raise GistCacheError(f"prompt {i}: {err}") from err
        if where[-1] != ids.size - 1:
            raise GistCacheError(
                f"prompt {i} has {ids.size - 1 - where[-1]} token(s) after its last gist token "
                f"(position {where[-1]} of {ids.size}); those belong to the input -- use "
                "gist_cache.split_prompt"
            )
        counts.append(where.size)
    if len(set(counts)) != 1:
        raise GistCacheError(
            f"prompts have different numbers of gist tokens {sorted(set(counts))}; one cache "
            "holds prompts with the same k"
        )
    return counts[0]


# ---------------------------------------------------------------------------------------
# Compression (jitted)


def _compress(params: Any, rows: Rows, *, config: Any, num_gist: int, rules: Any) -> GistCache:
    """The gist tokens' keys and values of a right-padded batch of prompts (jitted below)."""
    encoder_decoder = family_of(config).encoder_decoder
    name = "t5_compress" if encoder_decoder else "llama_compress"
    with tracing(name, config, rules) as model:
        ids, positions, first, last = rows.ids, rows.positions, rows.first, rows.last
        if encoder_decoder:
            mask = gist.encoder_self_mask(positions, positions, first, last, "gist")
            out = model.apply(
                {"params": params}, ids, positions, mask, first, last, num_gist, method="compress"
            )
            return GistCache(
                k=out.kv.k,
                v=out.kv.v,
                positions=out.kv.pos,
                hidden=out.hidden,
                model_type=config.model_type,
            )
        cache = empty_llama_cache(config, *ids.shape)
        mask = gist.SelfMask(positions, cache.positions_after_append(positions), first, last)
        _, cache = model.apply({"params": params}, ids, positions, mask, cache)
        cache = cache.stacked()
        # Prompts are right padded from position 0, so slot index == position.
        slots = first[:, None] + jnp.arange(num_gist, dtype=jnp.int32)[None, :]
        return GistCache(
            k=jnp.take_along_axis(cache.k, slots[None, :, None, None, :], axis=4),
            v=jnp.take_along_axis(cache.v, slots[None, :, None, :, None], axis=3),
            positions=slots,
            hidden=None,
            model_type=config.model_type,
        )


_COMPRESS = jax.jit(_compress, static_argnames=("config", "num_gist", "rules"))


def compress(
    config: Any,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    batch_size: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    gist_token_id: int | None = None,
) -> GistCache:
    """Compress prompts (each ending with its k gist tokens) into a ``GistCache`` whose
    row ``i`` is ``prompts[i]``.

    Prompts are run ``batch_size`` at a time (default: all), grouped by length and right
    padded to power-of-two buckets. The cache stays on device (sharded over the batch axes
    under ``mesh``); ``to_numpy()`` brings it to the host.
    """
    gist_id = config.gist_token_id if gist_token_id is None else gist_token_id
    num_gist = check_prompts(prompts, gist_id)
    rules = None  # activation constraints: see gist_jax.inference.decode's module docstring
    pad_id = decode.default_pad_id(config)
    batch_size = decode.round_up(batch_size or len(prompts), decode.batch_multiple(mesh))
    params = decode.place_params(params, config, mesh)
    parts: list[GistCache] = []
    order: list[int] = []
    for chunk, padded in decode.padded_batches([len(p) for p in prompts], batch_size):
        tokens = [list(prompts[i]) for i in padded]
        ids, positions = decode.pad_rows(
            tokens, decode.bucket_length(max(map(len, tokens))), pad_id
        )
        first, last = gist.gist_spans(np.where(positions >= 0, ids, -1), gist_id)
        rows = decode.place_rows(ids, positions, first, last, mesh)
        with decode.mesh_context(mesh):
            part = _COMPRESS(params, rows, config=config, num_gist=num_gist, rules=rules)
        parts.append(part.take(np.arange(len(chunk))))
        order.extend(chunk)
    cache = GistCache.concatenate(parts)
    inverse = np.argsort(np.asarray(order))
    return cache.take(inverse)


# ---------------------------------------------------------------------------------------
# Generation from a gist cache


def _check_inputs(
    config: Any,
    cache: GistCache,
    inputs: Sequence[Sequence[int]],
    gist_id: int | None,
    max_input_length: int | None,
    max_new_tokens: int,
) -> None:
    if cache.model_type != config.model_type:
        raise GistCacheError(
            f"a {cache.model_type} gist cache cannot be decoded by a {config.model_type} model"
        )
    if cache.batch_size != len(inputs):
        raise GistCacheError(
            f"{len(inputs)} inputs for a gist cache of {cache.batch_size} prompts; pass one "
            "input per cached prompt (cache.take(rows) repeats a prompt)"
        )
    for i, row in enumerate(inputs):
        if len(row) == 0:
            raise GistCacheError(
                f"input {i} is empty; decoding from a gist cache needs at least one input "
                "token (the template's '\\nOutput:')"
            )
        if gist_id is not None and gist_id in list(row):
            raise GistCacheError(f"input {i} contains a gist token (id {gist_id})")
        if max_input_length is not None and len(row) > max_input_length:
            raise GistCacheError(
                f"input {i} has {len(row)} tokens, longer than the cache's room for input "
                f"tokens (max_input_length={max_input_length})"
            )
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None:  # rotary positions have a limit; T5's relative buckets have none
        ends = np.asarray(decode.to_host(cache.last)) + 1
        needed = ends + np.asarray([len(r) for r in inputs]) + max_new_tokens
        worst = int(np.argmax(needed))
        if needed[worst] > limit:
            raise GistCacheError(
                f"input {worst} would reach position {int(needed[worst]) - 1} (gists end at "
                f"{int(ends[worst]) - 1}, {len(inputs[worst])} input + {max_new_tokens} new "
                f"tokens), beyond max_position_embeddings={limit}"
            )


def generate(
    config: Any,
    params: Any,
    cache: GistCache,
    inputs: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 128,
    sampling: SamplingConfig | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    return_logits: bool = False,
    max_input_length: int | None = None,
    eos_token_ids: Sequence[int] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Decode ``inputs[i]`` (the tokens after the gists) from row ``i`` of ``cache``.

    Input tokens continue at absolute positions ``last_i + 1, ...``. ``max_input_length``
    fixes the padded input length (one compile for any input up to it; a longer input is a
    ``GistCacheError``); otherwise inputs are padded to power-of-two buckets. With
    ``return_logits`` each ``Generation`` also carries the input tokens' logits
    (``prompt_logits``, LLaMA) and each generated token's logits. ``on_batch(n)`` is called
    after each batch with its number of inputs (a progress bar).
    """
    _check_inputs(config, cache, inputs, config.gist_token_id, max_input_length, max_new_tokens)
    return decode.generate(
        config,
        params,
        inputs,
        prefix=cache,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        seed=seed,
        batch_size=batch_size,
        mesh=mesh,
        return_logits=return_logits,
        eos_token_ids=eos_token_ids,
        input_length=max_input_length,
        on_batch=on_batch,
    )


@dataclasses.dataclass
class CompressedPrompts:
    """Unique prompts of a list of examples and, per example, the row of its prompt."""

    prompts: list[list[int]]
    rows: list[int]
    inputs: list[list[int]]


def dedupe_prompts(examples: Sequence[Sequence[int]], gist_token_id: int) -> CompressedPrompts:
    """Split each tokenised example after its gists and share identical prompts: the
    deployed path compresses every distinct instruction once."""
    index: dict[tuple[int, ...], int] = {}
    prompts: list[list[int]] = []
    rows: list[int] = []
    inputs: list[list[int]] = []
    for tokens in examples:
        prompt, rest = split_prompt(tokens, gist_token_id)
        key = tuple(prompt)
        if key not in index:
            index[key] = len(prompts)
            prompts.append(prompt)
        rows.append(index[key])
        inputs.append(rest)
    return CompressedPrompts(prompts=prompts, rows=rows, inputs=inputs)
