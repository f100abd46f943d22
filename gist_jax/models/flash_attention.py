"""The "flash" attention implementation: a Pallas kernel that computes masked attention
tile by tile from the mask's per-token description (``gist.SelfMask``: positions, segment
ids and gist spans), so that no ``[B, H, Q, S]`` mask or score tensor exists in memory.

Why tiles from spans: the gist mask of a tile of queries against a tile of keys is a
handful of integer comparisons of the two tiles' positions, segments and spans. The kernel
evaluates them per tile and skips every tile in which nothing is visible (future keys,
other packed examples, the prompt as seen from after the gist tokens), which is where a
gist-masked batch saves time over dense attention.

Layout. Grouped-query heads are folded into the query rows: the G query heads of one
key/value head become ``G * Q`` rows that share that head's keys and values, and each row
carries its own token's mask fields. Keys stay transposed (``[D, S]``, ``KVCache``'s
layout), so the kernel reads them without a copy. Softmax statistics are float32; the
products take the operands' dtype (bfloat16 on an accelerator) with float32 accumulation.

The gradient is the usual flash backward (``_dq_kernel`` over key tiles per query tile,
``_dkv_kernel`` over query tiles per key tile), recomputing probabilities from the saved
log-sum-exp. A query that sees no key at all (a padding row) gets an output of 0 here,
where "reference" returns the mean of the values; no real token ever attends to such a
row, so losses and gradients are the same.

On a CPU the kernels run in Pallas interpret mode (how the tests check them); on a GPU
they lower through Triton.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from gist_jax import gist
from gist_jax.models.attention import MASK_VALUE

BLOCK = 128  # query and key rows per tile (capped at the padded sequence length)
MIN_BLOCK = 16  # Triton's smallest matrix-product tile
_F32 = jnp.float32


def _tile(length: int, block: int | None) -> int:
    """Tile size for ``length`` rows: ``block`` if given (tests), else a power of two
    between ``MIN_BLOCK`` and ``BLOCK``."""
    if block is not None:
        return block
    return min(BLOCK, max(MIN_BLOCK, pl.next_power_of_2(length)))


def _pad(x: jax.Array, axis: int, multiple: int, value: Any = 0) -> jax.Array:
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _field(x: jax.Array | None, shape: tuple[int, int], fill: int) -> jax.Array:
    """A mask field as ``int32[B, N]`` (N queries or keys): per-example spans ``[B]``
    broadcast, a missing field (no segments) filled."""
    if x is None:
        return jnp.full(shape, fill, jnp.int32)
    x = jnp.asarray(x, jnp.int32)
    return jnp.broadcast_to(x[:, None] if x.ndim == 1 else x, shape)


def flash_attention(
    query: jax.Array,
    keys_t: jax.Array,
    values: jax.Array,
    mask: gist.SelfMask,
    scale: float,
    *,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """``attention.attention`` for ``implementation="flash"``: same arguments and result
    (``query [B, Q, H, D]``, ``keys_t [B, KVH, D, S]``, ``values [B, KVH, S, D]``) with the
    mask given as a ``gist.SelfMask``. ``interpret`` defaults to True on a CPU."""
    batch, q_len, heads, head_dim = query.shape
    kv_heads, s_len = keys_t.shape[1], keys_t.shape[3]
    groups = heads // kv_heads
    bq, bk = _tile(q_len, block_q), _tile(s_len, block_k)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"

    # Query rows: [B, Q, H, D] -> [B, KVH, G * Qp, D], each with (position, segment, first,
    # last). Padded rows get position -1 and so see nothing; they are cut off at the end.
    q = _pad(query, 1, bq).reshape(batch, -1, kv_heads, groups, head_dim)
    q_pad = q.shape[1]
    q = q.transpose(0, 2, 3, 1, 4).reshape(batch, kv_heads, groups * q_pad, head_dim)
    shape = (batch, q_len)
    q_fields = [
        _field(mask.q_positions, shape, -1),
        _field(mask.q_segments, shape, 0),
        _field(mask.first, shape, gist.NO_GIST),
        _field(mask.last, shape, gist.NO_GIST),
    ]
    q_meta = jnp.stack([_pad(f, 1, bq, -1) for f in q_fields], axis=1)
    q_meta = jnp.tile(q_meta, (1, 1, groups))  # [B, 4, G * Qp]
    # Key columns: padded keys get position -1 (not a real token: never visible).
    k_shape = (batch, s_len)
    k_meta = jnp.stack(
        [
            _pad(_field(mask.k_positions, k_shape, -1), 1, bk, -1),
            _pad(_field(mask.k_segments, k_shape, 0), 1, bk, -1),
        ],
        axis=1,
    )  # [B, 2, Sp]
    keys_t = _pad(keys_t, 3, bk).astype(query.dtype)
    values = _pad(values, 2, bk).astype(query.dtype)
    static = _Static(float(scale), bq, bk, mask.condition, mask.causal, bool(interpret))
    out = _flash(q, keys_t, values, q_meta, k_meta, static)
    out = out.reshape(batch, kv_heads, groups, q_pad, head_dim)[:, :, :, :q_len]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, head_dim)


class _Static(NamedTuple):
    """The kernels' compile-time settings (hashable, for ``nondiff_argnums``)."""

    scale: float
    block_q: int
    block_k: int
    condition: str
    causal: bool
    interpret: bool


def _visible(q_fields: tuple, k_fields: tuple, condition: str, causal: bool) -> jax.Array:
    """``bool[bq, bk]`` for one tile: ``gist.SelfMask.dense``'s rule, written on the
    tile's fields (queries ``[bq, 1]`` each, keys ``[1, bk]`` each)."""
    q_pos, q_seg, first, last = q_fields
    k_pos, k_seg = k_fields
    visible = (k_pos >= 0) & (q_seg == k_seg)
    if causal:
        visible &= k_pos <= q_pos
    if condition != "pos_control":
        after = (k_pos >= first) if condition == "gist" else (k_pos > last)
        visible &= jnp.where(q_pos <= last, k_pos <= last, after)
    return visible


def _query_fields(q_meta_ref: Any, rows: Any = slice(None)) -> tuple:
    return tuple(q_meta_ref[i, rows][:, None] for i in range(4))


def _key_fields(k_meta_ref: Any, cols: Any = slice(None)) -> tuple:
    return tuple(k_meta_ref[i, cols][None, :] for i in range(2))


def _over_visible_tiles(
    num_tiles: int, tile: int, visible_at: Callable, update: Callable, init: Any
) -> Any:
    """A loop over the other side's tiles that runs ``update(span, visible, carry)`` only
    for tiles in which the mask lets something through: where the savings come from."""

    def step(t: jax.Array, carry: Any) -> Any:
        span = pl.ds(t * tile, tile)
        visible = visible_at(span)
        anything = jnp.max(visible.astype(jnp.int32)) > 0
        return jax.lax.cond(anything, functools.partial(update, span, visible), lambda c: c, carry)

    return jax.lax.fori_loop(0, num_tiles, step, init)


def _forward_kernel(*refs: Any, s: _Static) -> None:
    """One query tile against every key tile: online softmax over the visible tiles."""
    q_meta_ref, k_meta_ref, q_ref, keys_t_ref, values_ref, out_ref, lse_ref = refs
    q = q_ref[...]
    q_fields = _query_fields(q_meta_ref)

    def update(cols: Any, visible: jax.Array, carry: tuple) -> tuple:
        acc, running_max, total = carry
        logits = jnp.dot(q, keys_t_ref[:, cols], preferred_element_type=_F32) * s.scale
        logits = jnp.where(visible, logits, MASK_VALUE)
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=1))
        probs = jnp.where(visible, jnp.exp(logits - new_max[:, None]), 0.0)
        correction = jnp.exp(running_max - new_max)
        values = values_ref[cols, :]
        acc = acc * correction[:, None] + jnp.dot(
            probs.astype(values.dtype), values, preferred_element_type=_F32
        )
        return acc, new_max, total * correction + jnp.sum(probs, axis=1)

    rows = q.shape[0]
    acc, running_max, total = _over_visible_tiles(
        keys_t_ref.shape[1] // s.block_k,
        s.block_k,
        lambda cols: _visible(q_fields, _key_fields(k_meta_ref, cols), s.condition, s.causal),
        update,
        (jnp.zeros(q.shape, _F32), jnp.full((rows,), MASK_VALUE, _F32), jnp.zeros((rows,), _F32)),
    )
    safe_total = jnp.where(total > 0, total, 1.0)
    out_ref[...] = (acc / safe_total[:, None]).astype(out_ref.dtype)
    lse_ref[...] = running_max + jnp.log(safe_total)


def _tile_grads(q, keys_t, values, d_out, lse, delta, visible, scale):
    """Probabilities and logit gradients of one tile (the softmax backward:
    ``dS = P * (dO V^T - rowsum(dO * O))``, times the logit scale)."""
    logits = jnp.dot(q, keys_t, preferred_element_type=_F32) * scale
    probs = jnp.where(visible, jnp.exp(logits - lse[:, None]), 0.0)
    d_probs = jnp.dot(d_out, values.T, preferred_element_type=_F32)
    return probs, probs * (d_probs - delta[:, None]) * scale


def _dq_kernel(*refs: Any, s: _Static) -> None:
    """One query tile's gradient, over every visible key tile."""
    q_meta_ref, k_meta_ref, q_ref, keys_t_ref, values_ref, d_out_ref, lse_ref, delta_ref = refs[:8]
    q, d_out = q_ref[...], d_out_ref[...]
    q_fields = _query_fields(q_meta_ref)

    def update(cols: Any, visible: jax.Array, dq: jax.Array) -> jax.Array:
        keys_t = keys_t_ref[:, cols]
        _, d_logits = _tile_grads(
            q, keys_t, values_ref[cols, :], d_out, lse_ref[...], delta_ref[...], visible, s.scale
        )
        return dq + jnp.dot(d_logits.astype(keys_t.dtype), keys_t.T, preferred_element_type=_F32)

    dq = _over_visible_tiles(
        keys_t_ref.shape[1] // s.block_k,
        s.block_k,
        lambda cols: _visible(q_fields, _key_fields(k_meta_ref, cols), s.condition, s.causal),
        update,
        jnp.zeros(q.shape, _F32),
    )
    refs[8][...] = dq.astype(refs[8].dtype)


def _dkv_kernel(*refs: Any, s: _Static) -> None:
    """One key tile's gradients, over every visible query tile (all G query heads of its
    key/value head)."""
    q_meta_ref, k_meta_ref, q_ref, keys_t_ref, values_ref, d_out_ref, lse_ref, delta_ref = refs[:8]
    dkeys_t_ref, dvalues_ref = refs[8:]
    keys_t, values = keys_t_ref[...], values_ref[...]
    k_fields = _key_fields(k_meta_ref)

    def update(rows: Any, visible: jax.Array, carry: tuple) -> tuple:
        dkeys_t, dvalues = carry
        q, d_out = q_ref[rows, :], d_out_ref[rows, :]
        probs, d_logits = _tile_grads(
            q, keys_t, values, d_out, lse_ref[rows], delta_ref[rows], visible, s.scale
        )
        dvalues += jnp.dot(probs.astype(d_out.dtype).T, d_out, preferred_element_type=_F32)
        dkeys_t += jnp.dot(q.T, d_logits.astype(q.dtype), preferred_element_type=_F32)
        return dkeys_t, dvalues

    dkeys_t, dvalues = _over_visible_tiles(
        q_ref.shape[0] // s.block_q,
        s.block_q,
        lambda rows: _visible(_query_fields(q_meta_ref, rows), k_fields, s.condition, s.causal),
        update,
        (jnp.zeros(keys_t.shape, _F32), jnp.zeros(values.shape, _F32)),
    )
    dkeys_t_ref[...] = dkeys_t.astype(dkeys_t_ref.dtype)
    dvalues_ref[...] = dvalues.astype(dvalues_ref.dtype)


def _specs(q, keys_t, s: _Static, by_key_tile: bool) -> dict[str, pl.BlockSpec]:
    """Block specs over the grid ``(B, KVH, tile)``: the tiled operand is the query rows
    (forward, dq) or the key columns (dkv); the other side is read whole."""
    rows, dim = q.shape[2], q.shape[3]
    cols = keys_t.shape[3]

    def whole(*shape: int) -> pl.BlockSpec:  # the whole operand of one (batch, head)
        return pl.BlockSpec((None, None, *shape), lambda b, h, t: (b, h) + (0,) * len(shape))

    if by_key_tile:
        return {
            "q_meta": pl.BlockSpec((None, 4, rows), lambda b, h, t: (b, 0, 0)),
            "k_meta": pl.BlockSpec((None, 2, s.block_k), lambda b, h, t: (b, 0, t)),
            "rows": whole(rows, dim),
            "row_stats": whole(rows),
            "keys_t": pl.BlockSpec((None, None, dim, s.block_k), lambda b, h, t: (b, h, 0, t)),
            "values": pl.BlockSpec((None, None, s.block_k, dim), lambda b, h, t: (b, h, t, 0)),
        }
    return {
        "q_meta": pl.BlockSpec((None, 4, s.block_q), lambda b, h, t: (b, 0, t)),
        "k_meta": pl.BlockSpec((None, 2, cols), lambda b, h, t: (b, 0, 0)),
        "rows": pl.BlockSpec((None, None, s.block_q, dim), lambda b, h, t: (b, h, t, 0)),
        "row_stats": pl.BlockSpec((None, None, s.block_q), lambda b, h, t: (b, h, t)),
        "keys_t": whole(dim, cols),
        "values": whole(cols, dim),
    }


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, keys_t, values, q_meta, k_meta, s: _Static) -> jax.Array:
    return _flash_forward(q, keys_t, values, q_meta, k_meta, s)[0]


def _flash_forward(q, keys_t, values, q_meta, k_meta, s: _Static) -> tuple[jax.Array, tuple]:
    b, h, rows, _ = q.shape
    spec = _specs(q, keys_t, s, by_key_tile=False)
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, s=s),
        grid=(b, h, rows // s.block_q),
        in_specs=[spec["q_meta"], spec["k_meta"], spec["rows"], spec["keys_t"], spec["values"]],
        out_specs=[spec["rows"], spec["row_stats"]],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, h, rows), _F32),
        ],
        interpret=s.interpret,
        name="gist_flash_forward",
    )(q_meta, k_meta, q, keys_t, values)
    return out, (q, keys_t, values, q_meta, k_meta, out, lse)


def _flash_backward(s: _Static, res: tuple, d_out: jax.Array) -> tuple:
    q, keys_t, values, q_meta, k_meta, out, lse = res
    b, h, rows, _ = q.shape
    d_out = d_out.astype(q.dtype)
    delta = jnp.sum(d_out.astype(_F32) * out.astype(_F32), axis=-1)  # rowsum(dO * O)
    operands = (q_meta, k_meta, q, keys_t, values, d_out, lse, delta)

    spec = _specs(q, keys_t, s, by_key_tile=False)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, s=s),
        grid=(b, h, rows // s.block_q),
        in_specs=_in_specs(spec),
        out_specs=spec["rows"],
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=s.interpret,
        name="gist_flash_dq",
    )(*operands)

    spec = _specs(q, keys_t, s, by_key_tile=True)
    dkeys_t, dvalues = pl.pallas_call(
        functools.partial(_dkv_kernel, s=s),
        grid=(b, h, keys_t.shape[3] // s.block_k),
        in_specs=_in_specs(spec),
        out_specs=[spec["keys_t"], spec["values"]],
        out_shape=[
            jax.ShapeDtypeStruct(keys_t.shape, keys_t.dtype),
            jax.ShapeDtypeStruct(values.shape, values.dtype),
        ],
        interpret=s.interpret,
        name="gist_flash_dkv",
    )(*operands)
    return dq, dkeys_t, dvalues, None, None


def _in_specs(spec: dict[str, pl.BlockSpec]) -> list[pl.BlockSpec]:
    """Specs of the backward kernels' operands, in ``operands``' order."""
    names = ("q_meta", "k_meta", "rows", "keys_t", "values", "rows", "row_stats", "row_stats")
    return [spec[n] for n in names]


_flash.defvjp(_flash_forward, _flash_backward)
