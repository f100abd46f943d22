"""The optimizer's own global-norm clipping matches optax's (values and state), so the
faster formulation changes no result and restores optax-era checkpoints."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gist_jax.train import optim


@pytest.mark.parametrize("max_norm", [0.5, 1.0, 1e6])
def test_clip_matches_optax(max_norm):
    keys = jax.random.split(jax.random.key(0), 3)
    grads = {
        "a": jax.random.normal(keys[0], (7, 5)),
        "b": {"c": 3.0 * jax.random.normal(keys[1], (11,)), "d": jnp.zeros((2, 2))},
    }
    ours, theirs = optim.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    state = ours.init(grads)
    assert jax.tree.structure(state) == jax.tree.structure(theirs.init(grads))
    got, _ = jax.jit(ours.update)(grads, state)
    want, _ = theirs.update(grads, theirs.init(grads))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)
    clipped = float(optax.global_norm(got))
    assert clipped == pytest.approx(min(max_norm, float(optax.global_norm(grads))), rel=1e-5)


def test_clip_of_zero_gradients_is_zero():
    grads = {"a": jnp.zeros((3,))}
    got, _ = optim.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
    assert np.all(np.asarray(got["a"]) == 0.0)
