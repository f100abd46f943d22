"""The train state (step, params, optimizer state, RNG) and how it comes into existence
directly sharded on the mesh.

Nothing is ever materialised on one device and then split: ``jax.eval_shape`` gives the
state's shapes, the logical axis rules give a ``NamedSharding`` per leaf, and then either
a jitted init with those ``out_shardings`` creates it (random init), or the converted
checkpoint is restored straight onto them and only the optimizer state is created by a
jitted init. Optimizer-state shardings mirror the params they belong to
(``optax.tree_map_params``); scalars such as Adam's step count are replicated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from gist_jax import sharding as shd


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data position.

    ``rng`` is raw ``uint32`` key data (not a typed key) so that orbax stores it as an
    ordinary array; ``step_rng`` derives the per-step key from it.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array

    def step_rng(self) -> jax.Array:
        """A fresh key for this step, identical across restarts."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def abstract_state(abstract_params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """``ShapeDtypeStruct`` tree of the full state for given abstract params."""

    def build(params: Any) -> TrainState:
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=jax.random.key_data(jax.random.key(0)),
        )

    return jax.eval_shape(build, abstract_params)


def state_shardings(
    abstract: TrainState,
    logical_axes: Any,
    mesh: Mesh,
    optimizer: optax.GradientTransformation,
) -> TrainState:
    """A ``NamedSharding`` for every leaf of the state."""
    param_sh = shd.tree_shardings(abstract.params, logical_axes, mesh)
    replicated = shd.replicated(mesh)
    # Frozen params (gist_jax.train.freezing) have no optimizer state: an ``optax.MaskedNode``
    # stands where their moments would be, and stays.
    opt_sh = optax.tree_map_params(
        optimizer,
        lambda leaf, sh: leaf if isinstance(leaf, optax.MaskedNode) else sh,
        abstract.opt_state,
        param_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, (jax.ShapeDtypeStruct, optax.MaskedNode)),
    )
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh, rng=replicated)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """Abstract arrays carrying shardings: the restore target for orbax."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def init_state(
    init_params: Callable[[jax.Array], Any],
    optimizer: optax.GradientTransformation,
    shardings: TrainState,
    seed: int,
) -> TrainState:
    """Random-init params and a fresh optimizer state, created sharded by one jitted call."""

    def build(key: jax.Array) -> TrainState:
        params_key, state_key = jax.random.split(key)
        params = init_params(params_key)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=jax.random.key_data(state_key),
        )

    return jax.jit(build, out_shardings=shardings)(jax.random.key(seed))


def state_from_params(
    params: Any,
    optimizer: optax.GradientTransformation,
    shardings: TrainState,
    seed: int,
) -> TrainState:
    """Wrap pretrained params (already placed on ``shardings.params``) in a fresh state."""

    def build(params: Any, key: jax.Array) -> TrainState:
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=jax.random.key_data(jax.random.split(key)[1]),
        )

    params = jax.tree.map(place, params, shardings.params)
    build_jit = jax.jit(build, in_shardings=(shardings.params, None), out_shardings=shardings)
    return build_jit(params, jax.random.key(seed))


def place(x: Any, sharding: NamedSharding) -> jax.Array:
    """``x`` on ``sharding``; host arrays (identical on every process) are sliced per
    device, which also works when the sharding spans several processes."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if isinstance(x, jax.Array) and x.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def param_count(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
