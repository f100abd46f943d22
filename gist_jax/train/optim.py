"""The optimizer: optax AdamW behind global-norm gradient clipping, with a linear warmup
followed by a cosine decay or a constant learning rate.

Choices (and why):

* Weight decay is applied to every parameter except those with a ``"norm"`` logical axis
  (RMSNorm / LayerNorm scales): decaying a scale towards 0 shrinks a layer's output rather
  than regularising it. The mask is built from the model's logical axes rather than from
  ``ndim``, because with ``scan_layers`` a norm scale is 2-D (``[layers, embed]``). The
  paper's recipes use no weight decay at all, so this only matters for other runs.
* Gradient accumulation is done by the train step (a scan over micro-batches, then one
  optimizer update), not by ``optax.MultiSteps``: the schedule, the clipping and the step
  count then refer to real optimizer updates, and the optimizer state stays the plain
  AdamW state whatever ``grad_accum`` is.
* Moments are float32 like the params; bf16 is a compute dtype only.
* Clipping is ``clip_by_global_norm`` below, one multiply of every gradient by
  ``min(1, max_norm / norm)``, rather than optax's, which selects per element between the
  gradient and its clipped copy: on XLA's CPU backend that select kept the clipped tree
  from fusing into AdamW's update: the update of SmolLM2-135M alone took 295 ms instead of
  151 ms (``python -m benchmarks.probes.bench_optimizer``, which also times the whole train step
  both ways; there the difference is within this machine's noise).
* Per-parameter learning rates (``train.lr_scales``, ``scale_by_path``) multiply the
  finished update of each matching parameter (AdamW's step and its weight decay alike), so
  a factor is exactly a learning-rate multiplier for that parameter; the transform keeps
  no state and is left out of the chain when no scale is given, so runs without it keep
  their checkpoints' layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gist_jax.train import freezing

SCHEDULES = ("cosine", "constant")


def warmup_steps(total_steps: int, warmup: float | int) -> int:
    """``warmup`` < 1 is a fraction of ``total_steps`` (the paper's 3%); >= 1 is a count."""
    if warmup < 0:
        raise ValueError(f"train.warmup must be >= 0, got {warmup}")
    if warmup < 1:
        return round(warmup * total_steps)
    return int(warmup)


def make_schedule(
    lr: float, total_steps: int, schedule: str = "cosine", warmup: float | int = 0.0
) -> optax.Schedule:
    """Learning rate per optimizer step: linear warmup from 0, then cosine decay to 0 at
    ``total_steps`` or constant."""
    if lr <= 0:
        raise ValueError(f"train.lr must be > 0, got {lr}")
    if schedule not in SCHEDULES:
        raise ValueError(f"train.schedule {schedule!r}; expected one of {SCHEDULES}")
    n_warm = min(warmup_steps(total_steps, warmup), total_steps)
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=lr,
            warmup_steps=n_warm,
            decay_steps=max(total_steps, n_warm + 1),
            end_value=0.0,
        )
    if n_warm == 0:
        return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, n_warm), optax.constant_schedule(lr)], [n_warm]
    )


def decay_mask(logical_axes: Any) -> Any:
    """``True`` for params that get weight decay: all but those with a "norm" axis."""
    return jax.tree.map(
        lambda axes: "norm" not in (axes or ()),
        logical_axes,
        is_leaf=lambda x: x is None or isinstance(x, tuple),
    )


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scale the gradients by ``min(1, max_norm / global_norm)`` (see the module docstring
    for why not ``optax.clip_by_global_norm``). Same state (``EmptyState``) as optax's, so
    checkpoints of either restore; a non-finite norm gives non-finite or zero updates, which
    the train step never applies."""

    def init(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, Any]:
        del params
        norm = optax.global_norm(updates)
        scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(init, update)


def make_optimizer(
    schedule: optax.Schedule,
    logical_axes: Any,
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Clip by global norm (``clip_norm`` None or <= 0: no clipping), then AdamW.

    The optimizer state has the same structure whatever ``clip_norm`` and
    ``weight_decay`` are, so a run can be resumed with those changed.
    """
    clip = (
        clip_by_global_norm(clip_norm)
        if clip_norm is not None and clip_norm > 0
        else optax.identity()
    )
    adamw = optax.adamw(
        schedule,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
        mask=decay_mask(logical_axes),
    )
    return optax.chain(clip, adamw)


def parse_lr_scales(spec: str, params: Mapping[str, Any]) -> tuple[tuple[str, float], ...]:
    """``train.lr_scales`` ("fragment=factor,fragment=factor") as ``(fragment, factor)``
    pairs. Raises ``ValueError`` naming the entry that is not ``fragment=factor``, has a
    factor that is not a finite number >= 0, or whose fragment is in no parameter path (a
    typo would otherwise scale nothing, silently)."""
    pairs = []
    for entry in (e.strip() for e in spec.split(",") if e.strip()):
        fragment, sep, factor_text = (part.strip() for part in entry.partition("="))
        try:
            factor = float(factor_text)
        except ValueError:
            factor = float("nan")
        if not sep or not fragment or not math.isfinite(factor) or factor < 0:
            raise ValueError(f"{entry!r}: expected fragment=factor with a factor >= 0")
        pairs.append((fragment, factor))
    freezing.check_fragments((fragment for fragment, _ in pairs), params)
    return tuple(pairs)


def scale_by_path(
    optimizer: optax.GradientTransformation,
    params: Mapping[str, Any],
    scales: tuple[tuple[str, float], ...],
) -> optax.GradientTransformation:
    """``optimizer`` followed by multiplying each parameter's update by the factor of the
    first ``(fragment, factor)`` in ``scales`` whose fragment is in its path (1 where none
    is); ``optimizer`` itself when ``scales`` is empty. ``params`` may be abstract: only its
    paths are read."""
    if not scales:
        return optimizer

    def factor_of(path: tuple, _: Any) -> float:
        text = jax.tree_util.keystr(path)
        return next((f for fragment, f in scales if fragment in text), 1.0)

    factors = jax.tree_util.tree_map_with_path(factor_of, dict(params))

    def init(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, Any]:
        del params
        scaled = jax.tree.map(
            lambda u, f: u if f == 1.0 else u * jnp.asarray(f, u.dtype), updates, factors
        )
        return scaled, state

    return optax.chain(optimizer, optax.GradientTransformation(init, update))
