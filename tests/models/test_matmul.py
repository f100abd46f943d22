"""The layers' weight products (gist_jax.models.matmul): bfloat16 products and both of their
gradients against float32 autodiff of the same numbers, and float32 left to the plain
product. A whole bfloat16 LLaMA's gradients: tests/models/test_llama_model.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gist_jax.models import matmul


def _problem(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(3, 7, 48)).astype(np.float32)
    kernel = rng.normal(size=(48, 40)).astype(np.float32) / 7
    d_out = rng.normal(size=(3, 7, 40)).astype(np.float32)
    return x, kernel, d_out


def _value_and_grads(dtype, x, kernel, d_out, fn):
    x, kernel, d_out = (jnp.asarray(a, dtype) for a in (x, kernel, d_out))
    out, vjp = jax.vjp(fn, x, kernel)
    return out, vjp(d_out)


def test_bfloat16_product_and_its_gradients_match_float32_autodiff():
    x, kernel, d_out = _problem(0)
    # float32 autodiff of the numbers bfloat16 can hold: the reference for all three.
    exact = [np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32) for a in (x, kernel, d_out)]
    want, want_grads = _value_and_grads(jnp.float32, *exact, lambda a, b: a @ b)
    got, got_grads = jax.jit(
        lambda a, b, d: _value_and_grads(jnp.bfloat16, a, b, d, matmul.matmul)
    )(x, kernel, d_out)
    assert got.dtype == jnp.bfloat16 and got.shape == (3, 7, 40)
    assert [g.dtype for g in got_grads] == [jnp.bfloat16, jnp.bfloat16]
    for g, w in zip([got, *got_grads], [want, *want_grads], strict=True):
        w = np.asarray(w)
        # One bfloat16 rounding of each float32-accumulated result: 2^-8 relative.
        np.testing.assert_allclose(np.float32(g), w, rtol=2**-7, atol=2**-7 * np.abs(w).max())


def test_float32_is_the_plain_product_with_autodiff():
    x, kernel, d_out = _problem(1)
    want, want_grads = _value_and_grads(jnp.float32, x, kernel, d_out, jnp.dot)
    got, got_grads = _value_and_grads(jnp.float32, x, kernel, d_out, matmul.matmul)
    for g, w in zip([got, *got_grads], [want, *want_grads], strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_transposed_is_the_transpose(dtype):
    a = jnp.asarray(np.arange(35, dtype=np.float32).reshape(5, 7), dtype)
    np.testing.assert_array_equal(np.asarray(jax.jit(matmul.transposed)(a)), np.asarray(a.T))


def test_dense_dot_general_contracts_only_the_last_axis():
    x, kernel = jnp.ones((2, 4, 3)), jnp.ones((3, 5))
    assert matmul.dense_dot_general(x, kernel, (((2,), (0,)), ((), ()))).shape == (2, 4, 5)
    with pytest.raises(ValueError, match="only contracts the last axis"):
        matmul.dense_dot_general(x, jnp.ones((4, 5)), (((1,), (0,)), ((), ())))
