"""Context distillation's set-up: the step's ``Objective`` from the config, and the frozen
teacher's params (``train.teacher`` = "base" or a checkpoint directory), placed on the mesh
like the student's.

Why the teacher lives outside the train state: a frozen teacher never changes, so writing
it into every checkpoint would double the checkpoints for nothing. It is loaded again from
its source whenever a run starts or resumes; the step takes it as a separate argument.
A "self" teacher needs no params at all (the step uses the student's, behind
``stop_gradient``).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import ml_collections

from gist_jax import model_loading, train_config
from gist_jax.convert import common, loading
from gist_jax.models.family import Family, config_from_dict, family_of
from gist_jax.models.layers import RUNTIME_FIELDS
from gist_jax.train import state as ts
from gist_jax.train import step as tstep


def objective_of(config: ml_collections.ConfigDict) -> tstep.Objective:
    """The step's objective for ``train.objective`` and the ``train.distill_*`` keys."""
    t = config.train
    weight = {"lm": 0.0, "distill": 1.0, "mix": float(t.distill_weight)}[t.objective]
    self_teacher = t.teacher == train_config.SELF_TEACHER
    return tstep.Objective(
        distill_weight=weight,
        teacher="self" if self_teacher else "frozen",
        temperature=float(t.distill_temperature),
        positions=t.distill_positions,
    )


def check_objective(
    config: ml_collections.ConfigDict, family: Family, base_dir: pathlib.Path | None
) -> None:
    """Raise ``ConfigError`` (naming the key) for an objective this run cannot train:
    distillation of T5, or a frozen teacher that is not there; before anything is written."""
    t = config.train
    if t.objective == "lm":
        return
    if not family.chunked_output:
        raise train_config.ConfigError(
            f"train.objective={t.objective!r}: distillation is implemented for decoder-only "
            "models (LLaMA family); T5 trains with 'lm'"
        )
    if t.teacher != train_config.SELF_TEACHER:
        teacher_dir(config, base_dir)


def teacher_dir(config: ml_collections.ConfigDict, base_dir: pathlib.Path | None) -> pathlib.Path:
    """The converted checkpoint directory of a frozen teacher ("base": ``base_dir``, the
    run's starting checkpoint)."""
    if config.train.teacher == train_config.BASE_TEACHER:
        if base_dir is None:
            raise train_config.ConfigError(
                "train.teacher='base': the run starts from random init, there are no "
                "starting weights to distil from"
            )
        return base_dir
    path = pathlib.Path(config.train.teacher)
    if not (path / common.MODEL_CONFIG_FILE).is_file():
        raise train_config.ConfigError(
            f"train.teacher={config.train.teacher!r}: not a converted checkpoint directory "
            f"(no {common.MODEL_CONFIG_FILE}); give 'self', 'base' or e.g. a trained "
            "pos_control run's WORKDIR/export"
        )
    return path


def load_teacher(
    config: ml_collections.ConfigDict,
    model_config: Any,
    base_dir: pathlib.Path | None,
    target: Any,
) -> Any:
    """The frozen teacher's params, restored straight into ``target`` (the student's
    abstract params with their shardings). Raises ``ConfigError`` naming
    ``train.teacher`` when it is a different architecture than the student."""
    path = teacher_dir(config, base_dir)
    saved = config_from_dict(common.read_model_config(path))
    same = {f: getattr(model_config, f) for f in RUNTIME_FIELDS}  # a teacher may run differently
    # A teacher without the student's gist adapter gets a no-op one (it runs the student's
    # model code), so a pos_control run's export can teach an adapted student.
    adds_adapter = getattr(model_config, "gist_adapter_rank", 0) and not getattr(
        saved, "gist_adapter_rank", 0
    )
    if adds_adapter:
        same["gist_adapter_rank"] = model_config.gist_adapter_rank
    if dataclasses.replace(saved, **same) != model_config:
        raise train_config.ConfigError(
            f"train.teacher={str(path)!r}: its model config differs from the student's "
            "(distillation needs the same architecture and vocabulary)"
        )
    direct = saved.scan_layers == model_config.scan_layers and not adds_adapter
    _, params, _ = loading.load_checkpoint(
        path, target=target if direct else None, scan_layers=model_config.scan_layers
    )
    if adds_adapter:
        params = model_loading.add_gist_adapter(params, model_config, family_of(model_config))
        params = jax.tree.map(lambda x, t: ts.place(x, t.sharding), params, target)
    return params
