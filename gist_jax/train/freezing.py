"""Partial fine-tuning: which parameters a run trains, and how the step and the optimizer
leave the others alone.

``train.frozen_layers = N`` (N > 0, decoder-only models with unrolled layers) keeps the
token embedding -- for tied models that is also the output layer -- and the first N
decoder layers at their pretrained values. The step asks for gradients of the trained
parameters only, so XLA never builds the backward pass below layer N, nor the weight
gradients of the frozen layers; the optimizer (``optax.multi_transform`` with
``set_to_zero`` for the frozen group) keeps no Adam moments for them, so checkpoints
shrink as well. ``benchmarks/probes/bench_frozen_layers.py`` measures the step time by N (on
SmolLM2-135M at 8 x 96 tokens: 4.90 s for N = 0, 2.80 s for N = 15 of 30).

Why the embedding is frozen with the layers: the gradient of any embedding row, the
``<GIST>`` row included, has to travel back through every layer, which is exactly the cost
being saved. The gist token keeps its mean-initialised embedding; in the frozen layers its
keys and values come from the pretrained weights attending to the instruction, and the
trained upper layers learn to compress.

Parameters are grouped by their top-level module name (``embed_tokens``, ``layers_3``,
``norm``, ``lm_head``): the unrolled layout that ``model.scan_layers = False`` gives.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

TRAINED = "trained"
FROZEN = "frozen"
EMBEDDING = "embed_tokens"
LAYER_PREFIX = "layers_"


def frozen_modules(module_names: Iterable[str], frozen_layers: int) -> frozenset[str]:
    """The top-level modules that ``frozen_layers`` freezes: the embedding and
    ``layers_0 .. layers_{N-1}`` (empty for N = 0).

    Raises ``ValueError`` naming the problem when the layout is not unrolled decoder layers
    or N is not below the number of layers (something must stay trainable).
    """
    if frozen_layers < 0:
        raise ValueError(f"frozen_layers must be >= 0, got {frozen_layers}")
    if frozen_layers == 0:
        return frozenset()
    names = set(module_names)
    layers = {n for n in names if n.startswith(LAYER_PREFIX) and n[len(LAYER_PREFIX) :].isdigit()}
    if EMBEDDING not in names or not layers:
        raise ValueError(
            "frozen_layers needs a decoder-only model with unrolled layers (top-level "
            f"'{EMBEDDING}' and '{LAYER_PREFIX}<i>' params); this model has "
            f"{sorted(names)[:6]}"
        )
    if frozen_layers >= len(layers):
        raise ValueError(
            f"frozen_layers={frozen_layers} must be below the model's {len(layers)} layers "
            "(the top layers are what is trained)"
        )
    return frozenset({EMBEDDING, *(f"{LAYER_PREFIX}{i}" for i in range(frozen_layers))})


def split(params: Mapping[str, Any], frozen: frozenset[str]) -> tuple[Any, dict]:
    """``(trained, frozen)`` top-level sub-dicts of ``params``; ``(params, {})`` itself,
    untouched, when nothing is frozen."""
    if not frozen:
        return params, {}
    trained = {k: v for k, v in params.items() if k not in frozen}
    fixed = {k: v for k, v in params.items() if k in frozen}
    return trained, fixed


def check_fragments(fragments: Iterable[str], params: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first of ``fragments`` that is in no parameter path of
    ``params`` (a typo in ``train.frozen_params`` or ``train.lr_scales`` would otherwise
    select nothing, silently)."""
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    for fragment in fragments:
        if not any(fragment in path for path in paths):
            raise ValueError(
                f"{fragment!r} is in no parameter path (paths look like {paths[len(paths) // 2]})"
            )


def parse_frozen_params(spec: str, params: Mapping[str, Any]) -> tuple[str, ...]:
    """``train.frozen_params`` as path fragments; raises ``ValueError`` naming a fragment
    that matches no parameter path."""
    fragments = tuple(f.strip() for f in spec.split(",") if f.strip())
    check_fragments(fragments, params)
    return fragments


def restrict_optimizer(
    optimizer: optax.GradientTransformation,
    params: Mapping[str, Any],
    frozen: frozenset[str],
    frozen_paths: tuple[str, ...] = (),
) -> optax.GradientTransformation:
    """``optimizer`` for the trained parameters and zero updates (no state) for the frozen
    ones: the top-level modules in ``frozen`` and every parameter whose path contains one of
    ``frozen_paths``; ``optimizer`` itself when nothing is frozen. ``params`` may be
    abstract: only its structure is used (the labels must be a static tree for
    ``optax.tree_map_params``)."""
    if not frozen and not frozen_paths:
        return optimizer

    def label(path: tuple, _: Any) -> str:
        text = jax.tree_util.keystr(path)
        held = path[0].key in frozen or any(f in text for f in frozen_paths)
        return FROZEN if held else TRAINED

    labels = jax.tree_util.tree_map_with_path(label, dict(params))
    return optax.multi_transform({TRAINED: optimizer, FROZEN: optax.set_to_zero()}, labels)


def merge(trained: Any, fixed: Mapping[str, Any]) -> Any:
    """Inverse of ``split``."""
    return {**trained, **fixed} if fixed else trained


def full_grads(trained_grads: Any, params: Mapping[str, Any], frozen: frozenset[str]) -> Any:
    """The gradient tree over all of ``params`` that ``optax.multi_transform`` expects:
    ``trained_grads`` plus zeros for the frozen modules, which ``restrict_optimizer``'s
    ``set_to_zero`` never reads (broadcast constants inside the jitted step)."""
    if not frozen:
        return trained_grads
    zeros = {k: jax.tree.map(jnp.zeros_like, v) for k, v in params.items() if k in frozen}
    return {**trained_grads, **zeros}
