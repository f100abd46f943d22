"""Cross-entropy that runs the output layer only where the loss needs it.

A gisting batch puts the loss on the completion tokens alone (``loss_mask``): on the
synthetic suite that is ~16% of the positions, so computing logits for every position
spends most of the output layer's FLOPs (for SmolLM2's 49k vocabulary, a sixth of a
training step) and its ``[B, L, V]`` float32 buffers on values that are multiplied by 0.

``chunked_cross_entropy`` instead moves each row's loss positions to the front (a stable
argsort of the mask, so the order within a row is kept), cuts the rows into chunks of
``chunk`` positions, and runs output layer + cross-entropy chunk by chunk under a
``lax.scan``; a ``lax.cond`` skips every chunk in which no row has a loss position, in the
forward and in the backward pass. The result is the same token-summed loss (and gradient)
as full logits, up to float summation order; peak memory for logits drops from
``[B, L, V]`` to ``[B, chunk, V]``.

Rows are never mixed: the sort and the chunks are per row, so under data or FSDP sharding
every device keeps its own rows and only the scalar "is this chunk needed" flag is
reduced across devices.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gist_jax.models.matmul import product, transposed

# Positions per row per chunk (the train config's default). Small enough that a row's
# completion of a gisting example usually fills one or two chunks, large enough that a
# chunk's [B * chunk, D] x [D, V] product still runs near the matmul peak.
DEFAULT_CHUNK = 32


def chunked_cross_entropy(
    hidden: jax.Array,
    kernel: jax.Array,
    targets: jax.Array,
    weights: jax.Array,
    chunk: int,
) -> jax.Array:
    """``sum(weights * cross_entropy(hidden @ kernel, targets))`` over positions with a
    non-zero weight only.

    Args:
      hidden: ``[B, L, D]`` final (normed) hidden states, in the compute dtype.
      kernel: ``[D, V]`` output layer (float32 params; cast to ``hidden``'s dtype).
      targets: ``int[B, L]`` next-token ids.
      weights: ``[B, L]`` loss weights (the loss mask); 0 = no logits needed there. They
        are data, not differentiated (no gradient flows to them).
      chunk: positions per row per chunk (> 0).

    Returns the float32 scalar sum. Logits are float32 (``preferred_element_type``), as
    the model's own output layer makes them. Differentiable in ``hidden`` and ``kernel``.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be > 0, got {chunk}")
    batch, length = targets.shape
    if hidden.shape[:2] != (batch, length) or weights.shape != (batch, length):
        raise ValueError(
            f"hidden {hidden.shape}, targets {targets.shape} and weights {weights.shape} "
            "must agree on [batch, length]"
        )
    chunks = _loss_first_chunks(targets, jax.lax.stop_gradient(weights), min(chunk, length))
    return _chunked_loss(hidden, kernel.astype(hidden.dtype), chunks)


def _loss_first_chunks(
    targets: jax.Array, weights: jax.Array, chunk: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per chunk ``(positions int[n, B, C], targets [n, B, C], weights [n, B, C],
    needed bool[n])``: every row's loss positions first, in their original order."""
    batch, length = targets.shape
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    weights = weights.astype(jnp.float32)
    order = jnp.argsort(weights == 0, axis=1, stable=True)
    sorted_targets = jnp.take_along_axis(targets, order, axis=1)
    sorted_weights = jnp.take_along_axis(weights, order, axis=1)
    # Padding slots point at position 0 with weight 0: they add nothing.
    order, sorted_targets, sorted_weights = (
        jnp.pad(x, ((0, 0), (0, pad))) for x in (order, sorted_targets, sorted_weights)
    )

    def by_chunk(x: jax.Array) -> jax.Array:  # [B, n * C] -> [n, B, C]
        return jnp.swapaxes(x.reshape(batch, num_chunks, chunk), 0, 1)

    positions, chunk_targets, chunk_weights = (
        by_chunk(x) for x in (order, sorted_targets, sorted_weights)
    )
    needed = jnp.any(chunk_weights != 0, axis=(1, 2))
    return positions, chunk_targets, chunk_weights, needed


def computed_positions(weights: jax.Array, chunk: int) -> int:
    """How many positions ``chunked_cross_entropy`` runs the output layer at for this
    ``[B, L]`` weight mask (every row's share of each needed chunk), e.g. for FLOP counts."""
    batch, length = weights.shape
    chunk = min(chunk, length)
    *_, needed = _loss_first_chunks(jnp.zeros((batch, length), jnp.int32), weights, chunk)
    return int(jnp.sum(needed)) * batch * chunk


def _gather(hidden: jax.Array, positions: jax.Array) -> jax.Array:
    return jnp.take_along_axis(hidden, positions[..., None], axis=1)  # [B, C, D]


def _logits(states: jax.Array, kernel: jax.Array) -> jax.Array:
    batch, chunk, dim = states.shape
    logits = product(states.reshape(batch * chunk, dim), kernel).reshape(batch, chunk, -1)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


# A custom VJP rather than autodiff through the scan: autodiff would stack every chunk's
# softmax as a residual (zeros for the skipped ones) and carry a [D, V] cotangent through
# every iteration; here the backward pass recomputes the logits of the needed chunks only
# and accumulates the kernel gradient in place (benchmarks/probes/bench_output_loss.py times it
# against full logits; figures in docs/benchmarks/README.md).
@jax.custom_vjp
def _chunked_loss(hidden: jax.Array, kernel: jax.Array, chunks: tuple[jax.Array, ...]) -> jax.Array:
    def body(total: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        positions, target, weight, need = xs

        def compute() -> jax.Array:
            logits = _logits(_gather(hidden, positions), kernel)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, target)
            return jnp.sum(ce * weight)

        part = jax.lax.cond(need, compute, lambda: jnp.zeros((), jnp.float32))
        return total + part, None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), chunks)
    return total


def _chunked_loss_fwd(
    hidden: jax.Array, kernel: jax.Array, chunks: tuple[jax.Array, ...]
) -> tuple[jax.Array, tuple[Any, ...]]:
    return _chunked_loss(hidden, kernel, chunks), (hidden, kernel, chunks)


def _chunked_loss_bwd(residuals: tuple[Any, ...], grad: jax.Array) -> tuple[Any, ...]:
    hidden, kernel, chunks = residuals
    rows = jnp.arange(hidden.shape[0])[:, None]
    kernel_t = transposed(kernel)  # once, not per chunk (gist_jax.models.matmul)

    def body(carry: tuple[jax.Array, jax.Array], xs: tuple[jax.Array, ...]) -> tuple:
        positions, target, weight, need = xs

        def compute(d_hidden: jax.Array, d_kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
            states = _gather(hidden, positions)
            logits = _logits(states, kernel)
            # d(sum w * ce)/d logits = w * (softmax - onehot(target)).
            probs = jax.nn.softmax(logits, axis=-1)
            onehot = jax.nn.one_hot(target, logits.shape[-1], dtype=probs.dtype)
            d_logits = ((probs - onehot) * (grad * weight)[..., None]).astype(hidden.dtype)
            d_logits = d_logits.reshape(-1, d_logits.shape[-1])
            d_states = product(d_logits, kernel_t).reshape(states.shape)
            d_hidden = d_hidden.at[rows, positions].add(d_states)
            flat_states = states.reshape(-1, states.shape[-1])
            d_kernel = d_kernel + product(transposed(flat_states), d_logits)
            return d_hidden, d_kernel

        carry = jax.lax.cond(need, compute, lambda *c: c, *carry)
        return carry, None

    # Accumulated in float32 whatever the compute dtype (several chunks add up).
    zeros = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(kernel.shape, jnp.float32))
    (d_hidden, d_kernel), _ = jax.lax.scan(body, zeros, chunks)
    d_hidden, d_kernel = d_hidden.astype(hidden.dtype), d_kernel.astype(kernel.dtype)
    positions, targets, weights, needed = chunks
    d_chunks = (
        np.zeros(positions.shape, jax.dtypes.float0),
        np.zeros(targets.shape, jax.dtypes.float0),
        jnp.zeros_like(weights),
        np.zeros(needed.shape, jax.dtypes.float0),
    )
    return d_hidden, d_kernel, d_chunks


_chunked_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd)


def chunked_kl(
    student_hidden: jax.Array,
    student_kernel: jax.Array,
    teacher_hidden: jax.Array,
    teacher_kernel: jax.Array,
    weights: jax.Array,
    chunk: int,
    temperature: float = 1.0,
) -> jax.Array:
    """``sum(weights * KL(teacher || student))`` of the next-token distributions at the
    positions with a non-zero weight, both softened by ``temperature`` and the sum scaled
    by ``temperature ** 2`` (so its gradient keeps the size of the unsoftened one).

    The same loss-first chunks as ``chunked_cross_entropy``: only chunks holding weighted
    positions run the two output layers. The teacher side is ``stop_gradient``-ed here,
    whatever the caller passes, so no gradient can reach a teacher. Differentiable (by
    autodiff) in ``student_hidden`` and ``student_kernel``.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be > 0, got {chunk}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch, length = weights.shape
    if student_hidden.shape[:2] != (batch, length) or teacher_hidden.shape[:2] != (batch, length):
        raise ValueError(
            f"student {student_hidden.shape} and teacher {teacher_hidden.shape} hidden "
            f"states must match weights {weights.shape} on [batch, length]"
        )
    dummy_targets = jnp.zeros((batch, length), jnp.int32)
    positions, _, chunk_weights, needed = _loss_first_chunks(
        dummy_targets, jax.lax.stop_gradient(weights), min(chunk, length)
    )
    teacher_hidden = jax.lax.stop_gradient(teacher_hidden)
    teacher_kernel = jax.lax.stop_gradient(teacher_kernel).astype(teacher_hidden.dtype)
    student_kernel = student_kernel.astype(student_hidden.dtype)

    def body(total: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        pos, weight, need = xs

        def compute() -> jax.Array:
            student = _logits(_gather(student_hidden, pos), student_kernel) / temperature
            teacher = _logits(_gather(teacher_hidden, pos), teacher_kernel) / temperature
            log_t = jax.nn.log_softmax(teacher, axis=-1)
            log_s = jax.nn.log_softmax(student, axis=-1)
            kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
            return jnp.sum(kl * weight) * temperature**2

        return total + jax.lax.cond(need, compute, lambda: jnp.zeros((), jnp.float32)), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (positions, chunk_weights, needed))
    return total
