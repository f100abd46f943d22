"""Training: model and data set-up from a config, the loop (jitted sharded step, logging,
periodic evaluation, checkpoints, SIGTERM), and the ``gist-train`` command line.

    python -m gist_jax.train --config=configs/default.py --workdir=DIR [--config.train.lr=3e-5]

The same command, started once per process (``launch/local.sh``, ``launch/slurm.sbatch``,
``launch/tpu_pod.sh``), trains multi-host: ``gist_jax.distributed`` initialises JAX's
distributed runtime first, every process builds only its rows of each global batch, and
orbax writes each process's shards of the checkpoints.

A run in an existing workdir resumes exactly from its latest checkpoint: step, params,
optimizer state, RNG and the data iterator position are restored, so the losses that
follow are the ones an uninterrupted run would have produced (``metrics.jsonl`` is cut back
to the restored step, so redone steps are logged once). SIGTERM (preemption) saves a
checkpoint at the current step and exits with status 0. A step with a non-finite loss or
gradient is skipped and logged; ``train.max_nonfinite_steps`` of them in a row stop the run
(``NonFiniteError``). In a multi-process run the processes first check that they were all
started with the same config, and any error makes the process exit at once (status 1) so
that the others fail fast instead of hanging. See docs/reliability.md.

``train_and_evaluate(config, workdir)`` is the library entry point; ``main`` only parses
flags. Outputs in the workdir: ``model_config.json``, ``metrics.jsonl``, ``tensorboard/``,
``checkpoints/`` and, at the end, ``export/`` (a converted checkpoint directory that
``gist_jax.convert.loading.load_checkpoint``, decoding and evaluation read).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import pathlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from gist_jax import checkpoint as ckpt_lib
from gist_jax import distributed, freezing, optim, teacher, tiny_tokenizer, train_config
from gist_jax import sharding as shd
from gist_jax import train_state as ts
from gist_jax import train_step as tstep
from gist_jax.cli.entry import run_app
from gist_jax.convert import common, loading
from gist_jax.models.family import Family, config_from_dict, family_named, family_of
from gist_jax.train_logging import MetricsLogger, read_metrics

# ---------------------------------------------------------------------------------------
# Model and tokenizer


@dataclasses.dataclass
class LoadedModel:
    """The model config of the run, its family, tokenizer and (for pretrained models) the
    converted checkpoint directory the params come from."""

    config: Any
    family: Family
    tokenizer: Any
    checkpoint_dir: pathlib.Path | None
    saved_scan_layers: bool | None  # layout of the params in checkpoint_dir


def _runtime_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    m = config.model
    return {"dtype": m.dtype, "scan_layers": bool(m.scan_layers), "remat": m.remat}


def _default_model_dir() -> pathlib.Path:
    from gist_jax.convert.default_model import ensure_default_model

    # Process 0 converts (once); the others wait and then find the finished directory.
    if jax.process_index() == 0:
        _, ckpt_dir = ensure_default_model()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("gist_jax:default_model")
    if jax.process_index() != 0:
        _, ckpt_dir = ensure_default_model()
    return pathlib.Path(ckpt_dir)


def _load_tokenizer(spec: str, checkpoint_dir: pathlib.Path | None) -> Any:
    if spec.startswith(tiny_tokenizer.PREFIX):
        return tiny_tokenizer.from_spec(spec)
    if spec:
        from transformers import AutoTokenizer

        path = pathlib.Path(spec)
        if not path.is_dir():
            raise train_config.ConfigError(f"model.tokenizer={spec!r}: no such directory")
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        common.add_gist_token(tokenizer)
        return tokenizer
    if checkpoint_dir is None:
        raise train_config.ConfigError(
            "model.tokenizer is empty and model.checkpoint is empty (random init): set "
            "model.tokenizer to 'synthetic_bpe' or a tokenizer directory"
        )
    return common.load_tokenizer(checkpoint_dir)


def load_model(config: ml_collections.ConfigDict) -> LoadedModel:
    """Model config (with the run's dtype/scan/remat), family and tokenizer."""
    source = config.model.checkpoint
    runtime = _runtime_fields(config)
    if source == train_config.RANDOM_INIT:
        tokenizer = _load_tokenizer(config.model.tokenizer, None)
        fields = dict(config.model.init.to_dict())
        family = family_named(fields["model_type"])
        names = {f.name for f in dataclasses.fields(family.config_class)}
        if not fields.get("vocab_size"):
            fields["vocab_size"] = len(tokenizer)
        if fields["vocab_size"] < len(tokenizer):
            raise train_config.ConfigError(
                f"model.init.vocab_size={fields['vocab_size']} is smaller than the tokenizer "
                f"({len(tokenizer)} tokens)"
            )
        token_ids = {
            "gist_token_id": common.gist_token_id_of(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "decoder_start_token_id": tokenizer.pad_token_id,
        }
        fields.update({k: v for k, v in token_ids.items() if k in names and v is not None})
        fields.update(runtime)
        model_config = config_from_dict(fields)
        return LoadedModel(model_config, family, tokenizer, None, None)

    ckpt_dir = (
        _default_model_dir() if source == train_config.DEFAULT_MODEL else pathlib.Path(source)
    )
    saved = config_from_dict(common.read_model_config(ckpt_dir))
    model_config = dataclasses.replace(saved, **runtime)
    tokenizer = _load_tokenizer(config.model.tokenizer, ckpt_dir)
    return LoadedModel(model_config, family_of(saved), tokenizer, ckpt_dir, saved.scan_layers)


def _model_dims(model_config: Any) -> dict[str, int]:
    """Sizes of the logical activation axes, so rules that would not divide are dropped."""
    names = {
        "vocab": ("vocab_size",),
        "embed": ("hidden_size", "d_model"),
        "mlp": ("intermediate_size", "d_ff"),
        "heads": ("num_attention_heads", "num_heads"),
        "kv_heads": ("num_key_value_heads", "num_heads"),
    }
    dims = {}
    for logical, fields in names.items():
        for field in fields:
            if hasattr(model_config, field):
                dims[logical] = int(getattr(model_config, field))
                break
    return dims


# ---------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class DataSetup:
    train: Any  # data.BatchIterator
    evals: dict[str, Any]  # split -> data.BatchIterator (one pass, in order)
    pad_id: int
    reports: list[str]


def _host_slice_args(mesh: Any, global_batch: int) -> tuple[int, int]:
    """``(index, count)`` for ``BatchIterator`` so this process builds exactly the rows
    its devices hold (all rows when the batch is replicated across processes)."""
    start, stop = shd.process_batch_rows(mesh, global_batch)
    per = stop - start
    if start % per or global_batch % per:
        raise shd.MeshError(f"process rows [{start}, {stop}) do not tile a batch of {global_batch}")
    return start // per, global_batch // per


def build_data(config: ml_collections.ConfigDict, loaded: LoadedModel, mesh: Any) -> DataSetup:
    """Tokenised examples and batch iterators for training and validation loss."""
    from gist_jax import data

    d = config.data
    encoder = data.PieceEncoder(loaded.tokenizer)
    decoder_only = not loaded.family.encoder_decoder
    max_len: int | tuple[int, int] = (
        d.max_length if decoder_only else (d.max_source_length, d.max_target_length)
    )

    def encode(split: str, num: int) -> tuple[list[Any], list[str]]:
        examples, load_report = data.load_examples(
            d.source, split, num_examples=None if num < 0 else num, seed=config.train.seed
        )
        if decoder_only:
            encoded, trunc = data.encode_decoder_examples(
                examples, loaded.tokenizer, d.num_gist_tokens, d.max_length, encoder=encoder
            )
        else:
            encoded, trunc = data.encode_encdec_examples(
                examples,
                loaded.tokenizer,
                d.num_gist_tokens,
                d.max_source_length,
                d.max_target_length,
                encoder=encoder,
            )
        return encoded, [load_report.summary(), f"{split}: {trunc.summary()}"]

    def iterator(examples: list[Any], batch: int, train: bool) -> Any:
        index, count = _host_slice_args(mesh, batch)
        return data.BatchIterator(
            examples,
            global_batch_size=batch,
            max_length=max_len,
            pad_id=encoder.pad_id,
            seed=config.train.seed,
            shuffle=train,
            pack=d.packing,
            drop_remainder=train,
            bucket_multiple=d.bucket_multiple,
            process_index=index,
            process_count=count,
            num_epochs=None if train else 1,
            pack_open_rows=d.pack_open_rows,
        )

    train_examples, reports = encode(d.train_split, d.num_train_examples)
    train_iter = iterator(train_examples, config.train.batch_size, train=True)
    evals = {}
    for split in config.eval.splits:
        examples, rep = encode(split, config.eval.num_examples)
        reports += rep
        evals[split] = iterator(examples, config.eval.batch_size, train=False)
    return DataSetup(train_iter, evals, encoder.pad_id, reports)


# ---------------------------------------------------------------------------------------
# Preemption


class StopSignal:
    """Turns SIGTERM into "save a checkpoint at the current step and exit 0".

    Single process: a Python handler sets a flag. Several processes: JAX's preemption sync
    manager (started by ``jax.distributed.initialize``, it owns SIGTERM) agrees on one step
    at which every process saves, whichever process got the signal.
    """

    def __init__(self, stop_at_step: int | None = None) -> None:
        self.stop_at_step = stop_at_step
        self._flag = threading.Event()
        self._multi = jax.process_count() > 1
        self._previous = None
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self._flag.set()

    def reached(self, step: int) -> bool:
        """True at the step where training should save and stop (same on all processes).

        Must be called at every step (the multi-process protocol counts on it)."""
        if self.stop_at_step is not None and step >= self.stop_at_step:
            return True
        if self._multi:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self._flag.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


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


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient; the run stopped."""


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


def load_eval_hooks(config: ml_collections.ConfigDict) -> list[EvalHook]:
    """The hooks named in ``eval.hooks`` ("module:factory"; ``factory(config)`` -> hook)."""
    hooks = []
    for spec in config.eval.hooks:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise train_config.ConfigError(f"eval.hooks: cannot load {spec!r} ({err})") from err
        hooks.append(factory(config))
    return hooks


def total_steps_of(config: ml_collections.ConfigDict, batches_per_epoch: int) -> int:
    """``train.steps``, or ``ceil(epochs * batches_per_epoch)`` when steps is 0."""
    if config.train.steps > 0:
        return int(config.train.steps)
    return max(1, math.ceil(config.train.epochs * batches_per_epoch))


def _check_batch_fits_mesh(config: ml_collections.ConfigDict, mesh: Any) -> None:
    ways = shd.batch_parallelism(mesh)
    micro = config.train.batch_size // config.train.grad_accum
    problems = []
    if micro % ways:
        problems.append(
            f"train.batch_size / train.grad_accum = {micro} rows per micro-batch is not "
            f"divisible by data x fsdp = {ways}"
        )
    if config.eval.batch_size % ways:
        problems.append(
            f"eval.batch_size={config.eval.batch_size} is not divisible by data x fsdp = {ways}"
        )
    if problems:
        raise train_config.ConfigError(
            f"batch does not fit the mesh ({shd.describe(mesh)}): " + "; ".join(problems)
        )


def _activation_rules(config: ml_collections.ConfigDict, mesh: Any, loaded: LoadedModel) -> Any:
    if not config.mesh.constrain_activations:
        return None
    return shd.activation_rules(mesh, _model_dims(loaded.config))


def _rules_context(rules: Any) -> contextlib.AbstractContextManager:
    return nn.logical_axis_rules(rules) if rules is not None else contextlib.nullcontext()


def _probe_rules(rules: Any, loss_probe: Callable[[], Any], logger: MetricsLogger) -> Any:
    """Trace the loss abstractly under the activation rules; if the model cannot be traced
    with them, train without activation constraints (correct, XLA then propagates
    shardings from params and batch alone) and say why."""
    if rules is None:
        return None
    try:
        with nn.logical_axis_rules(rules):
            loss_probe()
        return rules
    except ValueError as err:
        logger.message(
            "warning: activation sharding constraints disabled, the model cannot be traced "
            f"under logical axis rules ({str(err).splitlines()[0][:300]})"
        )
        return None


def _global_batch(
    local: Mapping[str, np.ndarray], keys: Sequence[str], mesh: Any, rows: int
) -> dict:
    missing = [k for k in keys if k not in local]
    if missing:
        raise KeyError(f"batch lacks {missing}; has {sorted(local)}")
    return shd.make_global_batch({k: local[k] for k in keys}, mesh, rows)


def _abstract_batch(keys: Sequence[str], rows: int, length: int = 8) -> dict:
    """Shapes of a batch, for tracing the loss without data."""
    return {
        k: jax.ShapeDtypeStruct((rows, length), np.float32 if k == "loss_mask" else np.int32)
        for k in keys
    }


def evaluate_loss(
    eval_step: Callable[..., Any],
    params: Any,
    iterators: Mapping[str, Any],
    keys: Sequence[str],
    mesh: Any,
    batch_size: int,
) -> dict[str, float]:
    """Mean token cross-entropy per split over one pass of each iterator."""
    out = {}
    for split, it in iterators.items():
        it.restore({"epoch": 0, "batch": 0})
        sums = []
        for local in it:
            batch = _global_batch(local, keys, mesh, batch_size)
            sums.append(eval_step(params, batch))
        sums = jax.device_get(sums)
        total = float(sum(s["loss_sum"] for s in sums))
        count = float(sum(s["loss_tokens"] for s in sums))
        out[f"{split}/loss"] = total / max(count, 1.0)
        out[f"{split}/tokens"] = count
    return out


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


class NonFiniteGuard:
    """Watches the steps' ``nonfinite`` flags (the step itself already skipped the update):
    logs each such step and raises ``NonFiniteError`` after ``limit`` in a row.

    Flags are read with a lag (``check(upto=step - 1)`` after dispatching ``step``) so the
    device always has the next step queued; checkpoints and logs check up to their step.
    """

    def __init__(self, limit: int, checkpointer: ckpt_lib.Checkpointer, logger: MetricsLogger):
        self.limit = limit
        self.consecutive = 0
        self._first = 0
        self._pending: list[tuple[int, dict[str, Any]]] = []
        self._checkpointer = checkpointer
        self._logger = logger

    def add(self, step: int, metrics: dict[str, Any]) -> None:
        self._pending.append((step, metrics))

    def check(self, upto: int) -> int:
        """Process the flags of steps ``<= upto``; returns the current run of bad steps."""
        ready = [(s, m) for s, m in self._pending if s <= upto]
        if not ready:
            return self.consecutive
        self._pending = [(s, m) for s, m in self._pending if s > upto]
        flags = jax.device_get([m["nonfinite"] for _, m in ready])
        for (step, metrics), flag in zip(ready, flags, strict=True):
            if not float(flag):
                self.consecutive = 0
                continue
            self.consecutive += 1
            self._first = step if self.consecutive == 1 else self._first
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            self._logger.log(
                step,
                {
                    "loss": values["loss"],
                    "grad_norm": values["grad_norm"],
                    "lr": values["lr"],
                    "consecutive": self.consecutive,
                },
                kind="nonfinite",
            )
            self._logger.message(
                f"step {step}: loss {values['loss']} / gradient norm {values['grad_norm']}: "
                f"not finite, update skipped ({self.consecutive} in a row; the run stops at "
                f"train.max_nonfinite_steps={self.limit})"
            )
            if self.consecutive >= self.limit:
                self._stop(step)
        return self.consecutive

    def _stop(self, step: int) -> None:
        self._checkpointer.wait()
        last = self._checkpointer.latest_step()
        kept = (
            f"the last good checkpoint: step {last} in {self._checkpointer.directory}"
            if last is not None
            else "no checkpoint was written before them"
        )
        raise NonFiniteError(
            f"steps {self._first}-{step}: loss or gradient not finite {self.consecutive} times "
            f"in a row (train.max_nonfinite_steps={self.limit}); none of these updates was "
            f"applied and {kept}. Lower train.lr, check the data around these steps, or "
            "raise train.max_nonfinite_steps to ride it out."
        )


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
      eval_hooks: called at every evaluation after the validation loss, after those named
        in ``config.eval.hooks``; their metrics are logged with it.
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
    _check_batch_fits_mesh(config, mesh)
    workdir = ckpt_lib.check_workdir_writable(workdir)
    loaded = load_model(config)
    teacher.check_objective(config, loaded.family, loaded.checkpoint_dir)
    abstract_params = loaded.family.abstract_params(loaded.config)
    try:
        frozen = freezing.frozen_modules(abstract_params.keys(), config.train.frozen_layers)
    except ValueError as e:
        raise train_config.ConfigError(f"train.frozen_layers: {e}") from None
    eval_hooks = [*load_eval_hooks(config), *eval_hooks]
    model_config_dict = loaded.config.to_dict()
    distributed.check_same(_flat_config(model_config_dict, "model_config."), "model configs")
    ckpt_lib.check_model_config(workdir, model_config_dict, write=False)
    # Data before the checkpoint directory: a bad data file leaves nothing behind.
    data_setup = build_data(config, loaded, mesh)
    checkpointer = ckpt_lib.Checkpointer(
        workdir,
        keep=config.train.keep_checkpoints,
        async_save=config.train.async_checkpoint,
        cleanup=True,
    )
    total_steps = total_steps_of(config, data_setup.train.batches_per_epoch(0))

    family, model_config = loaded.family, loaded.config
    model = family.build(model_config)
    logical_axes = family.param_axes(model_config)
    schedule = optim.make_schedule(
        config.train.lr, total_steps, config.train.schedule, config.train.warmup
    )
    optimizer = optim.make_optimizer(
        schedule,
        logical_axes,
        weight_decay=config.train.weight_decay,
        clip_norm=config.train.clip_norm,
        b1=config.train.b1,
        b2=config.train.b2,
        eps=config.train.eps,
    )
    optimizer = freezing.restrict_optimizer(optimizer, abstract_params, frozen)
    abstract = ts.abstract_state(abstract_params, optimizer)
    shardings = ts.state_shardings(abstract, logical_axes, mesh, optimizer)
    target = ts.with_shardings(abstract, shardings)

    # State: resume (from the newest checkpoint that restores), pretrained params, or
    # random init; all created directly sharded.
    warnings: list[str] = []
    restored = checkpointer.restore_latest(target, warn=warnings.append)
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
        f"{ts.param_count(abstract.params):,} params; {total_steps} steps"
    )
    if frozen:
        trained_params = freezing.split(abstract.params, frozen)[0]
        logger.message(
            f"train.frozen_layers={config.train.frozen_layers}: training "
            f"{ts.param_count(trained_params):,} params; the embedding and layers_0.."
            f"layers_{config.train.frozen_layers - 1} stay frozen"
        )
    for line in data_setup.reports:
        logger.message(f"data: {line}")

    if restored is not None:
        _, state, data_state = restored
        data_setup.train.restore(data_state)
        logger.message(f"resumed from {checkpointer.directory}/{latest}")
    elif loaded.checkpoint_dir is not None:
        same_layout = loaded.saved_scan_layers == model_config.scan_layers
        _, params, _ = loading.load_checkpoint(
            loaded.checkpoint_dir,
            target=target.params if same_layout else None,
            scan_layers=model_config.scan_layers,
        )
        state = ts.state_from_params(params, optimizer, shardings, config.train.seed)
        del params
    else:
        state = ts.init_state(
            lambda key: family.init_params(model_config, key),
            optimizer,
            shardings,
            config.train.seed,
        )

    keys = family.batch_keys
    batch_shardings = {k: shd.batch_sharding(mesh) for k in keys}
    condition = config.data.condition
    objective = teacher.objective_of(config)
    step_args: tuple[Any, ...] = ()
    in_shardings: tuple[Any, ...] = (shardings, batch_shardings)
    if objective.frozen_teacher:
        # Loaded on every start (never checkpointed), sharded like the student's params.
        step_args = (
            teacher.load_teacher(config, model_config, loaded.checkpoint_dir, target.params),
        )
        in_shardings += (shardings.params,)
        logger.message(
            f"distillation teacher: {teacher.teacher_dir(config, loaded.checkpoint_dir)}"
        )
    step_fn = jax.jit(
        tstep.make_train_step(
            model,
            family,
            optimizer,
            schedule,
            condition,
            config.train.grad_accum,
            tuple(config.train.inject_nonfinite_steps),
            config.train.loss_chunk,
            frozen,
            objective,
        ),
        in_shardings=in_shardings,
        out_shardings=(shardings, shd.replicated(mesh)),
        donate_argnums=(0,),
    )
    eval_fn = jax.jit(
        tstep.make_eval_step(model, family, condition, config.train.loss_chunk),
        in_shardings=(shardings.params, batch_shardings),
        out_shardings=shd.replicated(mesh),
    )

    def run_eval(step: int) -> dict[str, float]:
        metrics = evaluate_loss(
            eval_fn, state.params, data_setup.evals, keys, mesh, config.eval.batch_size
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
            rules = _probe_rules(
                _activation_rules(config, mesh, loaded),
                lambda: jax.eval_shape(
                    lambda p, b: tstep.loss_sums(
                        model, family, p, b, condition, config.train.loss_chunk
                    ),
                    abstract.params,
                    _abstract_batch(keys, config.train.batch_size // config.train.grad_accum),
                ),
                logger,
            )
            setup_s = time.monotonic() - started
            loop_start = time.monotonic()
            with _rules_context(rules):
                pending: list[dict[str, Any]] = []
                timer, timed = time.monotonic(), 0
                logger.start_bar(step)
                while step < total_steps:
                    if stop.reached(step):
                        preempted = True
                        break
                    local = next(data_setup.train)
                    batch = _global_batch(local, keys, mesh, config.train.batch_size)
                    state, metrics = step_fn(state, batch, *step_args)
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
                export_dir = ckpt_lib.export_model(
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


# ---------------------------------------------------------------------------------------
# Command line

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py); override keys with --config.KEY=VALUE."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the export.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-process runs)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout_s",
    distributed.INITIALIZATION_TIMEOUT_S,
    "Multi-process: seconds to wait for every process to join.",
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout_s",
    distributed.HEARTBEAT_TIMEOUT_S,
    "Multi-process: a process not heard from for this long is declared dead and the others "
    "stop (docs/reliability.md).",
)
_SHUTDOWN_TIMEOUT = flags.DEFINE_integer(
    "shutdown_timeout_s",
    distributed.SHUTDOWN_TIMEOUT_S,
    "Multi-process: seconds to wait for the others at a normal exit.",
)
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "detect",
    list(distributed.MODES),
    "detect: flags, JAX_* env or SLURM; auto: let JAX detect the cluster (TPU pods); "
    "none: single process.",
)


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message is the whole story (bad input, a stopped run)."""
    from gist_jax.data.alpaca import DataFormatError

    return (
        train_config.ConfigError,
        shd.MeshError,
        ckpt_lib.CheckpointError,
        common.ConversionError,
        DataFormatError,
        NonFiniteError,
    )


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError("--config and --workdir are required")
    if not flags.FLAGS["verbosity"].present:
        # orbax logs every save step at INFO; keep the console for the progress bar.
        absl_logging.set_verbosity(absl_logging.WARNING)
    distributed.initialize(
        _COORDINATOR.value,
        _NUM_PROCESSES.value,
        _PROCESS_ID.value,
        _DISTRIBUTED.value,
        initialization_timeout_s=_INIT_TIMEOUT.value,
        heartbeat_timeout_s=_HEARTBEAT_TIMEOUT.value,
        shutdown_timeout_s=_SHUTDOWN_TIMEOUT.value,
    )
    try:
        result = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except Exception as err:
        if jax.process_count() > 1:
            # Exit now: the other processes then fail fast too (see distributed.fail_fast).
            distributed.fail_fast(err)
        if isinstance(err, _user_errors()):
            sys.exit(f"gist-train: error: {err}")  # the message says it all; no traceback
        raise
    if jax.process_index() == 0:
        state = "preempted" if result.preempted else "done"
        print(f"{state} at step {result.step}/{result.total_steps}; workdir {result.workdir}")
    if result.preempted and result.step < result.total_steps:
        # launch/slurm.sbatch asks for a distinct status to requeue the job on; 0 otherwise,
        # so that a SIGTERM-stopped run reads as a clean stop everywhere else.
        sys.exit(int(os.environ.get(PREEMPTED_STATUS_ENV) or 0))


# Exit status of a run stopped by SIGTERM before its last step, when set (launch/slurm.sbatch
# sets 75 and requeues the job on it); unset, such a run exits 0.
PREEMPTED_STATUS_ENV = "GIST_PREEMPTED_EXIT_STATUS"


def run() -> None:
    """Console script entry point (``gist-train``)."""
    run_app(main, "gist-train")


if __name__ == "__main__":
    run()
