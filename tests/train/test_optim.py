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


def _adamw_updates(optimizer, params, steps=3):
    """The updates ``optimizer`` gives over ``steps`` steps of fixed random gradients."""
    state, updates = optimizer.init(params), []
    for i in range(steps):
        grads = jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.key(i), p.shape), params)
        step_updates, state = optimizer.update(grads, state, params)
        updates.append(step_updates)
    return updates


def test_lr_scales_multiply_each_matching_parameters_update():
    params = {
        "layers_0": {"mlp": {"up": jnp.ones((4, 3))}, "attn": {"q": jnp.ones((3, 3))}},
        "lm_head": jnp.ones((3, 5)),
    }
    base = optax.adamw(1e-2, weight_decay=0.1)
    # The first matching entry counts: "layers_0" would give 0.5 to the MLP too.
    scales = optim.parse_lr_scales("mlp=0.25, layers_0=0.5", params)
    assert scales == (("mlp", 0.25), ("layers_0", 0.5))
    plain = _adamw_updates(base, params)
    scaled = _adamw_updates(optim.scale_by_path(base, params, scales), params)
    for step_plain, step_scaled in zip(plain, scaled, strict=True):
        np.testing.assert_array_equal(
            step_scaled["layers_0"]["mlp"]["up"], 0.25 * step_plain["layers_0"]["mlp"]["up"]
        )
        np.testing.assert_array_equal(
            step_scaled["layers_0"]["attn"]["q"], 0.5 * step_plain["layers_0"]["attn"]["q"]
        )
        np.testing.assert_array_equal(step_scaled["lm_head"], step_plain["lm_head"])
        assert np.any(np.asarray(step_plain["lm_head"]) != 0)
    # No scales: the optimizer itself, so unscaled runs keep their optimizer state layout.
    assert optim.scale_by_path(base, params, ()) is base


@pytest.mark.parametrize(
    "spec, message",
    [
        ("mlp", "'mlp': expected fragment=factor"),
        ("mlp=fast", "'mlp=fast': expected fragment=factor"),
        ("mlp=-1", "'mlp=-1': expected fragment=factor with a factor >= 0"),
        ("mlp=inf", "'mlp=inf'"),
        ("=0.5", "'=0.5'"),
        ("mpl=0.5", "'mpl' is in no parameter path"),
    ],
)
def test_bad_lr_scales_are_named(spec, message):
    params = {"layers_0": {"mlp": {"up": jnp.ones((2,))}}}
    with pytest.raises(ValueError, match=message):
        optim.parse_lr_scales(spec, params)
