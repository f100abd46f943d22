"""What any training loop needs, built from a run config and a mesh.

``make_train_step(config, mesh)`` returns a ``TrainProgram``: the loaded model, the
optimizer and its schedule, the train state's shapes and shardings, and the jitted sharded
train and eval steps, which carry their own mesh and activation sharding rules (so a
caller needs no context around them). ``gist_jax.train.loop.train_and_evaluate`` is one
loop over it (checkpoints, logging, evaluation hooks, preemption); your own is another::

    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    program = make_train_step(config, mesh)
    state = program.init_state()
    batches = pipeline.build_data(config, program.loaded, mesh).train
    for _ in range(program.total_steps):
        state, metrics = program.step(state, program.global_batch(next(batches)))

Everything a bad config can get wrong (the mesh, frozen layers, the teacher) raises
``ConfigError`` here, before a loop touches its workdir.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from gist_jax import model_loading, train_config
from gist_jax import sharding as shd
from gist_jax.models.family import Family
from gist_jax.train import freezing, optim, pipeline, teacher
from gist_jax.train import state as ts
from gist_jax.train import step as tstep

Batch = Mapping[str, jax.Array]


@dataclasses.dataclass
class TrainProgram:
    """A run's model, optimizer, state layout and jitted steps (``make_train_step``)."""

    config: ml_collections.ConfigDict
    mesh: Any
    loaded: model_loading.LoadedModel
    model: nn.Module
    total_steps: int
    schedule: optax.Schedule
    optimizer: optax.GradientTransformation
    frozen: frozenset[str]  # top-level param modules that do not train
    frozen_paths: tuple[str, ...]  # train.frozen_params: path parts that do not train
    shardings: ts.TrainState  # the state's shardings
    target: ts.TrainState  # abstract state with shardings: what a checkpoint restores into
    rules: Any  # activation sharding rules, None without constraints
    teacher_dir: pathlib.Path | None  # a frozen distillation teacher's directory
    _step: Callable[..., Any]
    _eval_step: Callable[..., Any]
    _step_args: tuple[Any, ...]

    @property
    def family(self) -> Family:
        return self.loaded.family

    def init_state(self) -> ts.TrainState:
        """A fresh state, created sharded: the config's pretrained params (or a random
        init without a checkpoint) and a new optimizer state."""
        seed = self.config.train.seed
        if self.loaded.checkpoint_dir is None:
            init = functools.partial(self.family.init_params, self.loaded.config)
            return ts.init_state(init, self.optimizer, self.shardings, seed)
        params = model_loading.starting_params(self.loaded, self.target.params, seed)
        return ts.state_from_params(params, self.optimizer, self.shardings, seed)

    def global_batch(self, local: Mapping[str, np.ndarray]) -> Batch:
        """This process's rows of a batch (``pipeline.build_data``'s iterators) as the
        global batch the step takes."""
        keys = self.family.batch_keys
        return pipeline.global_batch(local, keys, self.mesh, self.config.train.batch_size)

    def step(self, state: ts.TrainState, batch: Batch) -> tuple[ts.TrainState, dict[str, Any]]:
        """One optimizer update; ``state`` is donated. Metrics: see ``step.step_function``."""
        with jax.set_mesh(self.mesh), shd.rules_context(self.rules):
            return self._step(state, batch, *self._step_args)

    def eval_step(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
        """``{"loss_sum", "loss_tokens"}`` of one validation batch."""
        with jax.set_mesh(self.mesh), shd.rules_context(self.rules):
            return self._eval_step(params, batch)


def check_batch_fits_mesh(config: ml_collections.ConfigDict, mesh: Any) -> None:
    """``ConfigError`` unless every (micro-)batch splits over the mesh's data x fsdp."""
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


def model_dims(model_config: Any) -> dict[str, int]:
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


def make_train_step(
    config: ml_collections.ConfigDict,
    mesh: Any,
    *,
    loaded: model_loading.LoadedModel | None = None,
    total_steps: int | None = None,
) -> TrainProgram:
    """The ``TrainProgram`` of ``config`` on ``mesh``.

    ``loaded``: the run's model if already loaded (``model_loading.load_model(config)``);
    ``total_steps``: the schedule's length, default ``train.steps`` (a run that counts
    epochs, ``train.steps=0``, passes the number its data gives, see
    ``loop.total_steps_of``).
    """
    train_config.validate(config)
    check_batch_fits_mesh(config, mesh)
    if total_steps is None:
        if config.train.steps <= 0:
            raise train_config.ConfigError(
                "train.steps=0 (count epochs): pass total_steps, the number of steps the "
                "data gives (loop.total_steps_of)"
            )
        total_steps = int(config.train.steps)
    loaded = loaded or model_loading.load_model(config)
    family, model_config = loaded.family, loaded.config
    teacher.check_objective(config, family, loaded.checkpoint_dir)
    abstract_params = family.abstract_params(model_config)
    try:
        frozen = freezing.frozen_modules(abstract_params.keys(), config.train.frozen_layers)
    except ValueError as e:
        raise train_config.ConfigError(f"train.frozen_layers: {e}") from None
    try:
        frozen_paths = freezing.parse_frozen_params(config.train.frozen_params, abstract_params)
    except ValueError as e:
        raise train_config.ConfigError(f"train.frozen_params: {e}") from None

    t = config.train
    logical_axes = family.param_axes(model_config)
    schedule = optim.make_schedule(t.lr, total_steps, t.schedule, t.warmup)
    optimizer = optim.make_optimizer(
        schedule,
        logical_axes,
        weight_decay=t.weight_decay,
        clip_norm=t.clip_norm,
        b1=t.b1,
        b2=t.b2,
        eps=t.eps,
    )
    optimizer = freezing.restrict_optimizer(optimizer, abstract_params, frozen, frozen_paths)
    try:
        lr_scales = optim.parse_lr_scales(config.train.lr_scales, abstract_params)
    except ValueError as e:
        raise train_config.ConfigError(f"train.lr_scales: {e}") from None
    optimizer = optim.scale_by_path(optimizer, abstract_params, lr_scales)
    abstract = ts.abstract_state(abstract_params, optimizer)
    shardings = ts.state_shardings(abstract, logical_axes, mesh, optimizer)
    target = ts.with_shardings(abstract, shardings)

    model = family.build(model_config)
    batch_shardings = {k: shd.batch_sharding(mesh) for k in family.batch_keys}
    objective = teacher.objective_of(config)
    step_args: tuple[Any, ...] = ()
    in_shardings: tuple[Any, ...] = (shardings, batch_shardings)
    teacher_dir = None
    if objective.frozen_teacher:
        # Loaded on every start (never checkpointed), sharded like the student's params.
        step_args = (
            teacher.load_teacher(config, model_config, loaded.checkpoint_dir, target.params),
        )
        in_shardings += (shardings.params,)
        teacher_dir = teacher.teacher_dir(config, loaded.checkpoint_dir)
    condition = config.data.condition
    train_fn = jax.jit(
        tstep.step_function(
            model,
            family,
            optimizer,
            schedule,
            condition,
            t.grad_accum,
            t.loss_chunk,
            frozen,
            objective,
        ),
        in_shardings=in_shardings,
        out_shardings=(shardings, shd.replicated(mesh)),
        donate_argnums=(0,),
    )
    eval_fn = jax.jit(
        tstep.make_eval_step(model, family, condition, t.loss_chunk),
        in_shardings=(shardings.params, batch_shardings),
        out_shardings=shd.replicated(mesh),
    )
    rules = None
    if config.mesh.constrain_activations:
        rules = shd.activation_rules(mesh, model_dims(model_config))
    return TrainProgram(
        config=config,
        mesh=mesh,
        loaded=loaded,
        model=model,
        total_steps=total_steps,
        schedule=schedule,
        optimizer=optimizer,
        frozen=frozen,
        frozen_paths=frozen_paths,
        shardings=shardings,
        target=target,
        rules=rules,
        teacher_dir=teacher_dir,
        _step=train_fn,
        _eval_step=eval_fn,
        _step_args=step_args,
    )
