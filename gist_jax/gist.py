"""Gist attention masks as pure functions of token ids or of per-example gist spans.

This module owns the masking semantics of gisting (Mu, Li & Goodman, 2023) and nothing
else: it knows no models, configs or data files. Rows are queries, columns are keys.

For an example whose contiguous gist tokens occupy positions ``first..last``:

=============  =====================  =====================
condition      query i <= last        query i > last
=============  =====================  =====================
gist           keys j <= last         keys j >= first
pos_control    all keys               all keys
neg_control    keys j <= last         keys j > last
=============  =====================  =====================

An example without gist tokens is encoded as the span ``first = last = -1``; every rule
above then allows all keys, so such an example gets plain attention without a special
case. Positions are whatever coordinate system the spans are expressed in: row indices
for a full or packed sequence, absolute positions in the uncompressed sequence for a
decode step or for a cache that holds only the gist tokens. That is what lets one
function serve training, full-sequence evaluation and compressed decoding.

Two layers of API:

* ``make_gist_mask`` / ``make_cross_attention_mask``: dense masks from token ids, for
  users and tests (``bool[B, 1, L, L]`` / ``bool[B, 1, 1, L]``).
* ``gist_spans`` + ``span_mask`` / ``span_cross_mask``: the jit-friendly form used by
  the models, train step and decoder; ``causal_mask`` and ``key_padding_mask`` are the
  other factors they AND in. ``SelfMask`` holds a self-attention mask's fields as one
  value (what the "flash" attention reads) and builds the dense mask (``dense()``);
  ``decoder_self_mask`` / ``encoder_self_mask`` / ``cross_mask`` return dense masks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

Condition = Literal["gist", "pos_control", "neg_control"]
CONDITIONS: tuple[str, ...] = ("gist", "pos_control", "neg_control")

# Span value of an example that has no gist token; every condition then allows all keys.
NO_GIST = -1

ArrayLike = jax.Array | np.ndarray


def check_condition(condition: str) -> None:
    """Raise ``ValueError`` unless ``condition`` is one of ``CONDITIONS``."""
    if condition not in CONDITIONS:
        raise ValueError(f"unknown gist condition {condition!r}; expected one of {CONDITIONS}")


def _is_concrete(x: ArrayLike) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _xp(*arrays: ArrayLike | None):
    """numpy for host inputs (data pipeline, tests: no per-shape compiles), jax.numpy as
    soon as one input is a JAX array or tracer (inside jitted code)."""
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def check_gist_contiguous(input_ids: ArrayLike, gist_token_id: int) -> None:
    """Raise ``ValueError`` naming the first example whose gist tokens are not contiguous.

    Caching keeps the key/values of positions ``first..last``; a stray gist token elsewhere
    would be cached as a gist or would make tokens in between invisible, so such inputs are
    rejected rather than silently mis-masked. Works on concrete (host) arrays only.
    """
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    is_gist = ids == gist_token_id
    for row, flags in enumerate(is_gist):
        where = np.flatnonzero(flags)
        if where.size and where[-1] - where[0] + 1 != where.size:
            raise ValueError(
                f"example {row}: gist tokens (id {gist_token_id}) must be contiguous, found "
                f"them at positions {where.tolist()}"
            )


def gist_spans(input_ids: ArrayLike, gist_token_id: int) -> tuple[jax.Array, jax.Array]:
    """Per-example positions of the first and last gist token, ``int32[B]`` each.

    Examples without a gist token get ``NO_GIST`` for both. Jittable; when called on
    concrete arrays it also checks that gist tokens are contiguous.
    """
    xp = _xp(input_ids)
    if _is_concrete(input_ids):
        check_gist_contiguous(input_ids, gist_token_id)
    ids = xp.asarray(input_ids)
    is_gist = ids == gist_token_id
    length = ids.shape[-1]
    any_gist = xp.any(is_gist, axis=-1)
    first = xp.argmax(is_gist, axis=-1)
    last = length - 1 - xp.argmax(is_gist[..., ::-1], axis=-1)
    first = xp.where(any_gist, first, NO_GIST).astype(xp.int32)
    last = xp.where(any_gist, last, NO_GIST).astype(xp.int32)
    return first, last


def _expand_span(span: ArrayLike, q_ndim: int) -> jax.Array:
    """Give a ``[B]`` or ``[B, Q]`` span a trailing key axis: ``[B, 1, 1]`` or ``[B, Q, 1]``."""
    xp = _xp(span)
    span = xp.asarray(span)
    if span.ndim == 1:
        span = span[:, None]
    if span.ndim != q_ndim:
        raise ValueError(f"span has shape {span.shape}; expected [B] or [B, Q]")
    return span[..., None]


def span_mask(
    q_positions: ArrayLike,
    k_positions: ArrayLike,
    first: ArrayLike,
    last: ArrayLike,
    condition: Condition = "gist",
) -> jax.Array:
    """The gist rule alone (no causal or padding factor): ``bool[B, Q, K]``.

    Args:
      q_positions: ``int[B, Q]`` positions of the queries, in the spans' coordinates.
      k_positions: ``int[B, K]`` positions of the keys, same coordinates.
      first, last: gist span per example ``int[B]``, or per query ``int[B, Q]`` for
        packed rows where each segment has its own span.
      condition: "gist", "pos_control" or "neg_control".
    """
    xp = _xp(q_positions, k_positions, first, last)
    check_condition(condition)
    q = xp.asarray(q_positions)[:, :, None]
    k = xp.asarray(k_positions)[:, None, :]
    if condition == "pos_control":
        return xp.ones(xp.broadcast_shapes(q.shape, k.shape), dtype=bool)
    first = _expand_span(first, 2)
    last = _expand_span(last, 2)
    before_or_gist = q <= last
    prompt_rule = k <= last
    after_rule = (k >= first) if condition == "gist" else (k > last)
    return xp.where(before_or_gist, prompt_rule, after_rule)


def span_cross_mask(
    k_positions: ArrayLike,
    first: ArrayLike,
    last: ArrayLike,
    condition: Condition = "gist",
) -> jax.Array:
    """Decoder cross-attention rule over encoder positions.

    gist: keys ``j >= first``; neg_control: ``j > last``; pos_control: all keys. With
    per-example spans ``int[B]`` the result is ``bool[B, 1, K]``; with per-query spans
    ``int[B, Q]`` (packed rows: each decoder token carries its own example's span) it is
    ``bool[B, Q, K]``.
    """
    xp = _xp(k_positions, first, last)
    check_condition(condition)
    first = xp.asarray(first)
    last = xp.asarray(last)
    if first.ndim not in (1, 2) or first.shape != last.shape:
        raise ValueError(f"spans have shapes {first.shape}, {last.shape}; expected [B] or [B, Q]")
    if first.ndim == 1:
        first, last = first[:, None], last[:, None]
    k = xp.asarray(k_positions)[:, None, :]
    if condition == "pos_control":
        return xp.ones(xp.broadcast_shapes(k.shape, first[..., None].shape), dtype=bool)
    first, last = first[..., None], last[..., None]
    return (k >= first) if condition == "gist" else (k > last)


def causal_mask(q_positions: ArrayLike, k_positions: ArrayLike) -> jax.Array:
    """``bool[B, Q, K]``: key position <= query position."""
    xp = _xp(q_positions, k_positions)
    return xp.asarray(k_positions)[:, None, :] <= xp.asarray(q_positions)[:, :, None]


def key_padding_mask(k_valid: ArrayLike) -> jax.Array:
    """``bool[B, 1, K]`` from a ``bool[B, K]`` flag of keys that are real tokens."""
    xp = _xp(k_valid)
    return xp.asarray(k_valid, dtype=bool)[:, None, :]


def segment_mask(q_segments: ArrayLike, k_segments: ArrayLike) -> jax.Array:
    """``bool[B, Q, K]``: query and key belong to the same packed example."""
    xp = _xp(q_segments, k_segments)
    return xp.asarray(q_segments)[:, :, None] == xp.asarray(k_segments)[:, None, :]


def _valid_keys(input_ids: jax.Array, pad_token_id: int | None) -> jax.Array:
    xp = _xp(input_ids)
    if pad_token_id is None:
        return xp.ones(input_ids.shape, dtype=bool)
    return input_ids != pad_token_id


def make_gist_mask(
    input_ids: ArrayLike,
    gist_token_id: int,
    pad_token_id: int | None = None,
    condition: Condition = "gist",
    *,
    cross: bool = False,
) -> jax.Array:
    """Dense, non-causal gist self-attention mask ``bool[B, 1, L, L]`` from token ids, or
    with ``cross=True`` the decoder's cross-attention mask over encoder positions
    (``bool[B, 1, 1, L]``, ``make_cross_attention_mask``).

    Keys that are padding (``input_ids == pad_token_id``) are masked out; decoder-only
    models AND a causal mask on top. Examples without a gist token are unmasked (so a
    cross mask is never all-zero). Raises ``ValueError`` for non-contiguous gist tokens
    (concrete inputs).
    """
    xp = _xp(input_ids)
    ids = xp.asarray(input_ids)
    first, last = gist_spans(input_ids, gist_token_id)
    positions = xp.broadcast_to(xp.arange(ids.shape[-1]), ids.shape)
    if cross:
        mask = span_cross_mask(positions, first, last, condition)
    else:
        mask = span_mask(positions, positions, first, last, condition)
    mask = mask & key_padding_mask(_valid_keys(ids, pad_token_id))
    return mask[:, None]


def make_cross_attention_mask(*args: Any, **kwargs: Any) -> jax.Array:
    """The T5 decoder's cross-attention mask from encoder token ids: ``make_gist_mask``'s
    arguments, ``bool[B, 1, 1, L]``."""
    return make_gist_mask(*args, **kwargs, cross=True)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["q_positions", "k_positions", "first", "last", "q_segments", "k_segments"],
    meta_fields=["condition", "causal"],
)
@dataclasses.dataclass(frozen=True)
class SelfMask:
    """A self-attention mask kept as the per-token fields it is computed from: query and
    key positions (``-1`` marks padding or an empty cache slot), the gist span per example
    ``[B]`` or per query ``[B, Q]``, optional segment ids of packed rows, the condition,
    and whether it is causal (a decoder) or not (an encoder).

    ``dense()`` is the ``bool[B, 1, Q, K]`` mask: gist rule AND key is real AND, for packed
    rows, same segment, AND causal for a decoder. It serves training, prefill, decode steps
    and decoding from a gist cache alike, since positions are absolute in every case. The
    "flash" attention reads the fields tile by tile instead and never builds it.
    """

    q_positions: ArrayLike
    k_positions: ArrayLike
    first: ArrayLike
    last: ArrayLike
    condition: Condition = "gist"
    q_segments: ArrayLike | None = None
    k_segments: ArrayLike | None = None
    causal: bool = True

    def dense(self) -> jax.Array:
        xp = _xp(self.q_positions, self.k_positions, self.first, self.last)
        q_pos, k_pos = self.q_positions, self.k_positions
        k_real = key_padding_mask(xp.asarray(k_pos) >= 0)
        mask = span_mask(q_pos, k_pos, self.first, self.last, self.condition) & k_real
        if self.causal:
            mask = mask & causal_mask(q_pos, k_pos)
        if self.q_segments is not None:
            mask = mask & segment_mask(self.q_segments, self.k_segments)
        return mask[:, None]


def decoder_self_mask(*args: Any, **kwargs: Any) -> jax.Array:
    """The decoder-only (LLaMA) self-attention mask: ``SelfMask(...).dense()``, causal."""
    return SelfMask(*args, **kwargs, causal=True).dense()


def encoder_self_mask(*args: Any, **kwargs: Any) -> jax.Array:
    """The bidirectional (T5 encoder) self-attention mask: ``SelfMask(...).dense()``, not
    causal."""
    return SelfMask(*args, **kwargs, causal=False).dense()


def cross_mask(
    k_positions: ArrayLike,
    first: ArrayLike,
    last: ArrayLike,
    condition: Condition = "gist",
    q_segments: ArrayLike | None = None,
    k_segments: ArrayLike | None = None,
) -> jax.Array:
    """T5 decoder cross-attention mask over encoder positions (``-1`` = padding): the cross
    rule AND key is real AND, for packed rows, same segment. ``bool[B, 1, 1, K]`` for
    per-example spans, ``bool[B, 1, Q, K]`` for per-query spans or segments."""
    xp = _xp(k_positions, first, last)
    k_real = xp.asarray(k_positions) >= 0
    mask = span_cross_mask(k_positions, first, last, condition) & key_padding_mask(k_real)
    if q_segments is not None:
        mask = mask & segment_mask(q_segments, k_segments)
    return mask[:, None]
