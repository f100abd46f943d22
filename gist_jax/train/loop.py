"""The training loop: ``train_and_evaluate(config, workdir)`` sets a run up from its config
(the mesh, the data, and ``program.make_train_step``'s model, optimizer and jitted steps),
runs the steps, logs, evaluates, checkpoints, and exports the trained model.

A run in an existing workdir resumes exactly from its latest checkpoint: step, params,
optimizer state, RNG and the data iterator position are restored, so the losses that
follow are the ones an uninterrupted run would have produced (``metrics.jsonl`` is cut back
to the restored step, so redone steps are logged once). SIGTERM (preemption) saves a
checkpoint at the current step and returns ``preempted``; non-finite steps are skipped
(``gist_jax.train.guards``). In a multi-process run the processes first check that they
were all started with the same config. See docs/reliability.md.

Evaluation hooks are callables passed in (``eval_hooks``): the loop gives each an
``EvalContext`` and logs the metrics it returns; it knows nothing of what they compute.
Outputs in the workdir: ``model_config.json``, ``metrics.jsonl``, ``tensorboard/``,
``checkpoints/`` and, at the end, ``export/`` (a converted checkpoint directory that
``gist_jax.convert.loading.load_checkpoint``, decoding and evaluation read).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections

from gist_jax import checkpoint as ckpt_lib
from gist_jax import distributed, model_loading, train_config
from gist_jax import sharding as shd
from gist_jax.convert import common
from gist_jax.train import freezing, pipeline
from gist_jax.train import program as program_lib
from gist_jax.train import state as ts
from gist_jax.train.guards import NonFiniteGuard, StopSignal
from gist_jax.train.metrics_log import MetricsLogger, read_metrics

# ---------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class EvalContext:
    """What an evaluation hook gets (e.g. generation metrics from gist_jax.evaluate)."""

    step: int
    params: Any
    model: Any
    model_config: Any
    tokenizer: Any
    mesh: Any
    config: ml_collections.ConfigDict
    workdir: pathlib.Path


EvalHook = Callable[[EvalContext], Mapping[str, float]]


@dataclasses.dataclass
class TrainResult:
    """How a call of ``train_and_evaluate`` ended."""

    step: int  # optimizer steps done (in total, across restarts)
    total_steps: int
    preempted: bool  # stopped early by SIGTERM / stop_at_step, after saving
    resumed_from: int | None  # checkpoint step this call started from
    last_train: dict[str, float]
    last_eval: dict[str, float]
    workdir: pathlib.Path
    export_dir: pathlib.Path | None


def total_steps_of(config: ml_collections.ConfigDict, batches_per_epoch: int) -> int:
    """``train.steps``, or ``ceil(epochs * batches_per_epoch)`` when steps is 0."""
    if config.train.steps > 0:
        return int(config.train.steps)
    return max(1, math.ceil(config.train.epochs * batches_per_epoch))


def _summarise(pending: list[dict[str, Any]], elapsed: float, steps_timed: int) -> dict[str, float]:
    values = jax.device_get(pending)
    # Skipped (non-finite) steps are counted, not averaged in.
    good = [v for v in values if not float(v.get("nonfinite", 0.0))]
    loss_tokens = sum(float(v["loss_tokens"]) for v in good)
    # The interval's loss: mean over all its loss tokens (= the step's loss for one step).
    loss = sum(float(v["loss"]) * float(v["loss_tokens"]) for v in good) / max(loss_tokens, 1.0)
    last = values[-1]
    tokens = sum(float(v["tokens"]) for v in values[-steps_timed:]) if steps_timed else 0.0
    # Distillation's parts (train.objective): plain step means over the interval.
    parts = {
        key: sum(float(v[key]) for v in good) / len(good)
        for key in ("lm_loss", "kl")
        if good and key in good[0]
    }
    return {
        "loss": loss if loss_tokens else float(last["loss"]),
        **parts,
        "lr": float(last["lr"]),
        "grad_norm": float(last["grad_norm"]),
        "tokens": sum(float(v["tokens"]) for v in values),
        "loss_tokens": loss_tokens,
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "step_time_s": elapsed / steps_timed if steps_timed else 0.0,
        "skipped": float(len(values) - len(good)),
    }


def _eval_due(config: ml_collections.ConfigDict, step: int, total_steps: int) -> bool:
    """Whether the loop evaluates at ``step`` (always before that step's checkpoint)."""
    every = config.train.eval_every
    return step == total_steps or bool(every and step % every == 0)


def _flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train.lr": "0.0001", ...}``: every leaf of a (nested) config as JSON text."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(_flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value, sort_keys=True, default=repr)
    return flat


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    devices: Sequence[Any] | None = None,
    eval_hooks: Sequence[EvalHook] = (),
    stop_at_step: int | None = None,
    progress_bar: bool = True,
) -> TrainResult:
    """Train (or resume) the run that ``config`` describes in ``workdir``.

    Args:
      devices: the devices of the mesh (default: all); tests use subsets.
      eval_hooks: called at every evaluation after the validation loss; their metrics
        are logged with it (``gist_jax.evaluate.make_train_hook``: generation metrics).
      stop_at_step: behave as if SIGTERM arrived at this step (save, return preempted).
      progress_bar: show the tqdm bar (process 0).

    Raises ``NonFiniteError`` after ``train.max_nonfinite_steps`` consecutive non-finite
    steps, and ``ConfigError``, ``MeshError``, ``CheckpointError``, ``DataFormatError``,
    ``distributed.ProcessMismatchError`` for bad input, before anything is written.
    """
    # SIGTERM from here on means "save at the current step and stop" (during set-up too).
    stop = StopSignal(stop_at_step)
    try:
        return _train_and_evaluate(
            config, workdir, devices, eval_hooks, stop, progress_bar, time.monotonic()
        )
    finally:
        stop.close()


def _train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    devices: Sequence[Any] | None,
    eval_hooks: Sequence[EvalHook],
    stop: StopSignal,
    progress_bar: bool,
    started: float,
) -> TrainResult:
    # Processes started with different configs stop here, naming the keys that differ.
    distributed.check_same(
        {**_flat_config(config.to_dict()), "workdir": json.dumps(str(workdir))}, "configs"
    )
    # Everything that can be checked without touching the workdir is checked first.
    train_config.validate(config)
    primary = jax.process_index() == 0
    mesh = shd.make_mesh(
        {"data": config.mesh.data, "fsdp": config.mesh.fsdp, "tensor": config.mesh.tensor},
        devices,
    )
    program_lib.check_batch_fits_mesh(config, mesh)
    workdir = ckpt_lib.check_workdir_writable(workdir)
    loaded = model_loading.load_model(config)
    model_config_dict = loaded.config.to_dict()
    distributed.check_same(_flat_config(model_config_dict, "model_config."), "model configs")
    ckpt_lib.check_model_config(workdir, model_config_dict, write=False)
    # Data before the checkpoint directory: a bad data file leaves nothing behind.
    data_setup = pipeline.build_data(config, loaded, mesh)
    total_steps = total_steps_of(config, data_setup.train.batches_per_epoch(0))
    program = program_lib.make_train_step(config, mesh, loaded=loaded, total_steps=total_steps)
    checkpointer = ckpt_lib.Checkpointer(
        workdir,
        keep=config.train.keep_checkpoints,
        async_save=config.train.async_checkpoint,
        cleanup=True,
    )
    model, model_config = program.model, loaded.config

    # State: resume (from the newest checkpoint that restores), pretrained params, or
    # random init; all created directly sharded.
    warnings: list[str] = []
    restored = checkpointer.restore_latest(program.target, warn=warnings.append)
    latest = None if restored is None else restored[0]
    start_step = 0 if latest is None else latest
    # The log continues from start_step: records of steps about to be redone are removed.
    logger = MetricsLogger(
        workdir, total_steps, start_step, enabled=primary, progress_bar=progress_bar
    )
    for line in warnings:
        logger.message(line)
    if logger.removed_records:
        logger.message(
            f"metrics.jsonl: removed {logger.removed_records} record(s) after step {start_step} "
            "(steps to be redone, or a line cut short by a crash)"
        )
    if primary:
        ckpt_lib.check_model_config(workdir, model_config_dict, write=True)
    logger.message(
        f"mesh: {shd.describe(mesh)}; model: {model_config.model_type}, "
        f"{ts.param_count(program.target.params):,} params; {total_steps} steps"
    )
    if program.frozen:
        trained_params = freezing.split(program.target.params, program.frozen)[0]
        logger.message(
            f"train.frozen_layers={config.train.frozen_layers}: training "
            f"{ts.param_count(trained_params):,} params; the embedding and layers_0.."
            f"layers_{config.train.frozen_layers - 1} stay frozen"
        )
    if program.frozen_paths:
        logger.message(
            f"train.frozen_params={config.train.frozen_params!r}: parameters whose path "
            f"contains {' or '.join(program.frozen_paths)} keep their starting values"
        )
    if config.train.lr_scales:
        logger.message(
            f"train.lr_scales={config.train.lr_scales!r}: the first matching fragment scales "
            "a parameter's learning rate"
        )
    for line in data_setup.reports:
        logger.message(f"data: {line}")

    if restored is not None:
        _, state, data_state = restored
        data_setup.train.restore(data_state)
        logger.message(f"resumed from {checkpointer.directory}/{latest}")
    else:
        state = program.init_state()
    if program.teacher_dir is not None:
        logger.message(f"distillation teacher: {program.teacher_dir}")

    def run_eval(step: int) -> dict[str, float]:
        metrics = pipeline.evaluate_loss(
            program.eval_step,
            state.params,
            data_setup.evals,
            loaded.family.batch_keys,
            mesh,
            config.eval.batch_size,
        )
        context = EvalContext(
            step, state.params, model, model_config, loaded.tokenizer, mesh, config, workdir
        )
        for hook in eval_hooks:
            metrics.update(hook(context))
        if metrics:
            logger.log(step, metrics, kind="eval")
        return metrics

    step = int(jax.device_get(state.step))
    last_train: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    # The evaluation due at a step runs before that step's checkpoint is written, so a run
    # resumed from a checkpoint has had it (it is in metrics.jsonl) and must not redo it.
    last_eval_step = -1
    if latest is not None and _eval_due(config, latest, total_steps):
        last_eval_step = latest
        if primary:
            logged = [r for r in read_metrics(workdir, "eval") if r["step"] == latest]
            last_eval = {k: v for k, v in (logged[-1] if logged else {}).items() if "/" in k}
    preempted = False
    export_dir = None
    guard = NonFiniteGuard(config.train.max_nonfinite_steps, checkpointer, logger)
    try:
        with jax.set_mesh(mesh):
            setup_s = time.monotonic() - started
            loop_start = time.monotonic()
            with shd.rules_context(program.rules):
                pending: list[dict[str, Any]] = []
                timer, timed = time.monotonic(), 0
                logger.start_bar(step)
                while step < total_steps:
                    if stop.reached(step):
                        preempted = True
                        break
                    local = next(data_setup.train)
                    state, metrics = program.step(state, program.global_batch(local))
                    step += 1
                    pending.append(metrics)
                    # The previous step's flag, so that the device keeps one step queued.
                    guard.check(upto=step - 1)
                    guard.add(step, metrics)
                    if step == start_step + 1:
                        # The first step includes compilation: time from its end.
                        jax.block_until_ready(metrics)
                        timer, timed = time.monotonic(), 0
                        logger.first_step_done(step)
                        logger.message(
                            f"first step done {timer - started:.1f} s after start "
                            f"(set-up {setup_s:.1f} s, compilation and step {timer - loop_start:.1f} s)"
                        )
                    else:
                        timed += 1
                    if step % config.train.log_every == 0 or step == total_steps:
                        jax.block_until_ready(metrics)
                        guard.check(upto=step)
                        last_train = _summarise(pending, time.monotonic() - timer, timed)
                        last_train["eta_s"] = last_train["step_time_s"] * (total_steps - step)
                        logger.log(step, last_train)
                        pending, timer, timed = [], time.monotonic(), 0
                    if config.train.eval_every and step % config.train.eval_every == 0:
                        last_eval, last_eval_step = run_eval(step), step
                    # Not in the middle of a run of skipped steps: if it turns into a stop,
                    # the checkpoint to resume from is the one before it.
                    every = config.train.checkpoint_every
                    if every and step % every == 0 and guard.check(upto=step) == 0:
                        checkpointer.save(step, state, data_setup.train.state)
                guard.check(upto=step)
                # The final evaluation comes before the final checkpoint (see last_eval_step).
                if not preempted and last_eval_step != step:
                    last_eval = run_eval(step)
                # Final (or preemption) checkpoint; skipped if this step is already saved.
                checkpointer.save(step, state, data_setup.train.state)
            checkpointer.wait()
            logger.close_bar()
            if preempted:
                logger.message(f"stopped at step {step} (SIGTERM); checkpoint saved")
            elif config.train.export:
                export_dir = common.export_model(
                    workdir / "export", state.params, model_config_dict, loaded.tokenizer
                )
                logger.message(f"exported the trained model to {export_dir}")
    finally:
        checkpointer.close()
        logger.close()
    return TrainResult(
        step=step,
        total_steps=total_steps,
        preempted=preempted,
        resumed_from=latest,
        last_train=last_train,
        last_eval=last_eval,
        workdir=workdir,
        export_dir=export_dir,
    )
