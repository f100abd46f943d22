"""The loss and the jitted, sharded train and eval steps.

The loss is the mean cross-entropy over completion tokens (``loss_mask``) of the whole
global batch. Masks are never shipped: the model family (``gist_jax.models.family``)
builds them inside the step from the batch's per-token positions, segments and gist spans
with ``gist_jax.gist``, so one code path covers padded and packed batches.

A step whose loss, gradient norm or learning rate is not finite (a learning rate that
overflows float32 would make every parameter non-finite) is not applied: the update is
behind a ``lax.cond`` on one is-finite flag inside the jitted step (nothing leaves the
device), only the step counter advances, and ``metrics["nonfinite"]`` is 1 so the loop can
log it and stop after too many in a row.

Gradient accumulation scans over ``grad_accum`` micro-batches and sums their losses and
gradients, each already divided by the token count of the *whole* batch (counted before
the scan), so the update is the same as with one big batch (up to float summation order).
Micro-batch ``j`` takes rows ``j, j + A, j + 2A, ...`` so every device contributes equally
to every micro-batch and no rows move between devices.

With frozen modules (``train.frozen_layers``, see ``gist_jax.train.freezing``) the loss is
differentiated with respect to the trained modules only, so the backward pass below the
lowest trained layer is never built; the gradient norm and clipping cover the trained
parameters, and the optimizer (restricted by ``freezing.restrict_optimizer``) leaves the
frozen ones as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gist_jax import gist
from gist_jax.models.family import Family
from gist_jax.train import freezing, output_loss
from gist_jax.train.state import TrainState

Batch = Mapping[str, jax.Array]


def loss_sums(
    model: nn.Module,
    family: Family,
    params: Any,
    batch: Batch,
    condition: str,
    loss_chunk: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """``(sum of token cross-entropies over loss_mask, number of loss tokens)``.

    ``loss_chunk`` > 0 (families with ``chunked_output``): the output layer runs only on
    chunks of that many positions per row that hold loss tokens, see
    ``gist_jax.train.output_loss``; 0: all logits at once."""
    weights = batch["loss_mask"].astype(jnp.float32)
    if loss_chunk > 0 and family.chunked_output:
        hidden = family.hidden(model, params, batch, condition)
        kernel = family.output_kernel(params, model.config)
        total = output_loss.chunked_cross_entropy(
            hidden, kernel, batch["targets"], batch["loss_mask"], loss_chunk
        )
        return total, jnp.sum(weights)
    logits = family.logits(model, params, batch, condition)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return jnp.sum(ce * weights), jnp.sum(weights)


def _split_micro(batch: Batch, grad_accum: int) -> Batch:
    # [B, ...] -> [A, B / A, ...] with micro-batch j = rows j, j + A, ... (see module doc).
    def split(x: jax.Array) -> jax.Array:
        b = x.shape[0]
        return jnp.swapaxes(x.reshape(b // grad_accum, grad_accum, *x.shape[1:]), 0, 1)

    return {k: split(v) for k, v in batch.items()}


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the step minimises (``train.objective``, see ``gist_jax.train_config``).

    ``distill_weight`` w: the loss is ``(1 - w) * LM + w * KL(teacher || student)``; 0 is
    the plain LM loss (no teacher pass is built). ``teacher``: "self" (the student's own
    params behind ``stop_gradient``) or "frozen" (params passed to the step as its third
    argument: the starting weights or a trained checkpoint). The teacher sees the same
    tokens under ``teacher_condition`` (the whole prompt visible); the KL is taken at the
    completion positions, or at every real position after the gist tokens
    (``positions="after_gist"``), at ``temperature``."""

    distill_weight: float = 0.0
    teacher: str = "self"
    temperature: float = 1.0
    positions: str = "completion"
    teacher_condition: str = "pos_control"

    @property
    def distills(self) -> bool:
        return self.distill_weight > 0

    @property
    def frozen_teacher(self) -> bool:
        return self.distills and self.teacher == "frozen"


LM = Objective()


def distill_weights(batch: Batch, positions: str) -> jax.Array:
    """``float32[B, L]`` positions whose next-token distribution is distilled."""
    loss = batch["loss_mask"].astype(jnp.float32)
    if positions == "completion":
        return loss
    if positions != "after_gist":
        raise ValueError(f"unknown distillation positions {positions!r}")
    last = batch["gist_last"]
    after = (batch["positions"] > last) & (last != gist.NO_GIST) & (batch["targets"] >= 0)
    return jnp.maximum(loss, after.astype(jnp.float32))


def distill_sums(
    model: nn.Module,
    family: Family,
    params: Any,
    teacher_params: Any,
    batch: Batch,
    condition: str,
    objective: Objective,
    loss_chunk: int,
) -> tuple[jax.Array, jax.Array]:
    """``(summed LM cross-entropy over loss_mask, summed KL over the distilled positions)``
    of a family with ``chunked_output``: one student pass under ``condition``, one teacher
    pass (no gradient) under ``objective.teacher_condition``."""
    length = batch["input_ids"].shape[1]
    chunk = loss_chunk if loss_chunk > 0 else length
    student = family.hidden(model, params, batch, condition)
    kernel = family.output_kernel(params, model.config)
    teacher_params = jax.lax.stop_gradient(teacher_params)
    teacher = family.hidden(model, teacher_params, batch, objective.teacher_condition)
    teacher = jax.lax.stop_gradient(teacher)
    teacher_kernel = family.output_kernel(teacher_params, model.config)
    lm = jnp.zeros((), jnp.float32)
    if objective.distill_weight < 1:
        lm = output_loss.chunked_cross_entropy(
            student, kernel, batch["targets"], batch["loss_mask"], chunk
        )
    kl = output_loss.chunked_kl(
        student,
        kernel,
        teacher,
        teacher_kernel,
        distill_weights(batch, objective.positions),
        chunk,
        objective.temperature,
    )
    return lm, kl


def step_function(
    model: nn.Module,
    family: Family,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    condition: str,
    grad_accum: int = 1,
    loss_chunk: int = 0,
    frozen: frozenset[str] = frozenset(),
    objective: Objective = LM,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """The (unjitted) step ``(state, batch) -> (new_state, metrics)``; ``metrics`` holds
    ``loss`` (mean over loss tokens), ``grad_norm`` (before clipping), ``lr`` (the rate this
    update used), ``tokens`` (non-padding), ``loss_tokens`` and ``nonfinite`` (1 when the
    update was skipped, see the module docstring).

    ``loss_chunk``: see ``loss_sums``. ``frozen``: top-level param modules not trained (``gist_jax.train.freezing``;
    ``optimizer`` must be restricted to match).

    ``objective`` (decoder-only models): with distillation, ``loss`` is the weighted
    objective and ``metrics`` adds ``lm_loss`` (mean over loss tokens) and ``kl`` (mean
    over the distilled positions); a "frozen" teacher makes the step
    ``(state, batch, teacher_params)``, the teacher's params sharded like the student's and
    never part of the state (so never in a checkpoint)."""
    if objective.distills and not family.chunked_output:
        raise ValueError("distillation is implemented for decoder-only models")
    w = objective.distill_weight

    def grads_of(
        params: Any, teacher: Any, micro: Batch, denoms: tuple[jax.Array, ...]
    ) -> tuple[tuple[jax.Array, tuple[jax.Array, jax.Array]], Any]:
        # Gradients of the trained modules only (all of them when nothing is frozen).
        trained, fixed = freezing.split(params, frozen)
        denom, kl_denom = denoms

        # The loss is divided by the whole batch's token count *inside* the differentiated
        # function, so the gradients come out already averaged: no extra pass over a
        # params-sized tree to divide them afterwards.
        def f(p: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
            full = freezing.merge(p, fixed)
            if objective.distills:
                # A "self" teacher is the student's own params (stop_gradient inside).
                teacher_params = full if teacher is None else teacher
                lm, kl = distill_sums(
                    model, family, full, teacher_params, micro, condition, objective, loss_chunk
                )
                lm, kl = lm / denom, kl / kl_denom
                total = (1 - w) * lm + w * kl
            else:
                total, _ = loss_sums(model, family, full, micro, condition, loss_chunk)
                total = lm = total / denom
                kl = jnp.zeros((), jnp.float32)
            return total, (lm, kl)

        return jax.value_and_grad(f, has_aux=True)(trained)

    def step(
        state: TrainState, batch: Batch, teacher: Any = None
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        if objective.frozen_teacher and teacher is None:
            raise ValueError("a frozen-teacher objective needs the teacher's params")
        count = jnp.sum(batch["loss_mask"].astype(jnp.float32))
        denom = jnp.maximum(count, 1.0)
        kl_count = jnp.sum(distill_weights(batch, objective.positions)) if w > 0 else count
        denoms = (denom, jnp.maximum(kl_count, 1.0))
        if grad_accum == 1:
            (loss, parts), grads = grads_of(state.params, teacher, batch, denoms)
        else:
            micro = _split_micro(batch, grad_accum)
            zeros = jax.tree.map(jnp.zeros_like, freezing.split(state.params, frozen)[0])

            def body(carry: Any, mb: Batch) -> tuple[Any, None]:
                acc_loss, acc_parts, acc_grads = carry
                (part, sub), g = grads_of(state.params, teacher, mb, denoms)
                acc_parts = jax.tree.map(jnp.add, acc_parts, sub)
                return (acc_loss + part, acc_parts, jax.tree.map(jnp.add, acc_grads, g)), None

            scalar = jnp.zeros((), jnp.float32)
            (loss, parts, grads), _ = jax.lax.scan(body, (scalar, (scalar, scalar), zeros), micro)
        grad_norm = optax.global_norm(grads)
        lr = schedule(state.step)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(lr)

        def update(operands: tuple[Any, Any, Any]) -> tuple[Any, Any]:
            params, opt_state, grads = operands
            grads = freezing.full_grads(grads, params, frozen)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        def keep(operands: tuple[Any, Any, Any]) -> tuple[Any, Any]:
            return operands[0], operands[1]

        # A conditional rather than a select between new and old trees: the update runs
        # only when it is applied, in place on the donated buffers. (Selecting after the
        # fact, on a finiteness reduction over the *new* params, kept two copies of params
        # and moments alive and cost ~0.6 s per SmolLM2 step and ~40 s of compile time.)
        params, opt_state = jax.lax.cond(
            finite, update, keep, (state.params, state.opt_state, grads)
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens": family.count_tokens(batch),
            "loss_tokens": count,
            "nonfinite": 1.0 - finite.astype(jnp.float32),
        }
        if objective.distills:
            metrics["lm_loss"], metrics["kl"] = parts
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return step


def make_eval_step(
    model: nn.Module, family: Family, condition: str, loss_chunk: int = 0
) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """``(params, batch) -> {"loss_sum", "loss_tokens"}`` for validation loss."""

    def step(params: Any, batch: Batch) -> dict[str, jax.Array]:
        total, count = loss_sums(model, family, params, batch, condition, loss_chunk)
        return {"loss_sum": total, "loss_tokens": count}

    return step
