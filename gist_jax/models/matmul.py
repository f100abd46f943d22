"""The weight products of every layer (projections, MLPs, the chunked output layer), in the
compute dtype with float32 accumulation, and differentiable fast on a CPU in bfloat16.

XLA:CPU runs a bfloat16 product through YNNPACK at about twice the float32 rate, but only
when both operands are row-major (``[M, K] @ [K, N]``): a product that contracts a
transposed operand, which is what autodiff makes of every weight gradient and every input
gradient, falls back to converting both operands and running the float32 product, slower
than float32 throughout (benchmarks/probes/bench_compute_dtype.py). XLA folds a plain
transpose into the product, so ``transposed`` writes the transpose out through a unit
axis, which it keeps as a copy, and ``matmul``'s VJP builds both gradients from
row-major products. Everywhere else (float32, or another backend, whose compilers handle
transposed operands themselves) the products are the plain ones.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def _copies_transposes(dtype: Any) -> bool:
    return jnp.dtype(dtype) == jnp.bfloat16 and jax.default_backend() == "cpu"


def transposed(a: jax.Array) -> jax.Array:
    """``a.T`` of a 2-D product operand, written out where the backend needs it."""
    if not _copies_transposes(a.dtype):
        return a.T
    rows, cols = a.shape
    return jnp.transpose(a.reshape(rows, cols, 1), (1, 0, 2)).reshape(cols, rows)


def product(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a[M, K] @ b[K, N]``, accumulated and returned in float32."""
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _row_major_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return product(x, kernel).astype(x.dtype)


def _row_major_fwd(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, tuple]:
    return _row_major_matmul(x, kernel), (x, kernel)


def _row_major_bwd(residuals: tuple, d_out: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    d_out = d_out.astype(x.dtype)
    d_x = product(d_out, transposed(kernel)).astype(x.dtype)
    d_kernel = product(transposed(x), d_out).astype(kernel.dtype)
    return d_x, d_kernel


_row_major_matmul.defvjp(_row_major_fwd, _row_major_bwd)


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x[..., K] @ kernel[K, N]`` in ``x``'s dtype (both operands already cast to it)."""
    if not _copies_transposes(x.dtype):
        return jnp.dot(x, kernel)
    leading = x.shape[:-1]
    flat = _row_major_matmul(x.reshape(-1, x.shape[-1]), kernel)
    return flat.reshape(*leading, kernel.shape[-1])


def dense_dot_general(
    lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None, **_: Any
) -> jax.Array:
    """``nn.Dense``'s ``dot_general`` (last axis of the input against the kernel's first)
    through ``matmul``."""
    if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or precision is not None:
        raise ValueError(f"dense_dot_general only contracts the last axis: {dimension_numbers}")
    return matmul(lhs, rhs)
