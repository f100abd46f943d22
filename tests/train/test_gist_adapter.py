"""The gist adapter (``model.gist_adapter_rank``) in training: a run from a converted
checkpoint without one starts with a new adapter that changes nothing (same logits, a
frozen teacher without it gives zero KL), whose ``up`` matrices then train; the run stops
and resumes exactly; its export goes to Hugging Face and back unchanged (an HF directory
without the adapter's file is refused by name); a T5 run asking for one is refused by key
before anything is written."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
from fixtures_train import quick_config, step_losses

from gist_jax import model_loading, train, train_config
from gist_jax import sharding as shd
from gist_jax.convert import from_hf, loading, to_hf
from gist_jax.convert.common import GIST_ADAPTER_FILE, ConversionError
from gist_jax.train import pipeline

RANK = 4


@pytest.fixture(scope="module")
def base_export(tmp_path_factory) -> str:
    """A converted checkpoint directory without an adapter: a 2-step tiny run's export."""
    workdir = tmp_path_factory.mktemp("base")
    config = quick_config("tiny_llama", train__steps=2, train__export=True, eval__splits=())
    result = train.train_and_evaluate(
        config, workdir, devices=jax.devices()[:1], progress_bar=False
    )
    return str(result.export_dir)


def _adapted_config(base_export: str, **overrides):
    settings = {
        "model__checkpoint": base_export,
        "model__tokenizer": "",
        "model__gist_adapter_rank": RANK,
        "eval__splits": (),
    }
    return quick_config("tiny_llama", **{**settings, **overrides})


def _adapter_leaves(params) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_leaves_with_path(params)
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in flat
        if "gist_adapter" in jax.tree_util.keystr(path)
    }


def test_a_new_adapter_changes_nothing_and_then_trains(base_export):
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    config = _adapted_config(base_export, train__warmup=0)
    program = train.make_train_step(config, mesh)
    assert program.loaded.adds_gist_adapter
    state = program.init_state()
    adapter = _adapter_leaves(state.params)
    assert len(adapter) == 2 * 2  # down and up in each of the 2 layers
    assert all(leaf.shape in ((64, RANK), (RANK, 64)) for leaf in adapter.values())
    assert all(not leaf.any() for name, leaf in adapter.items() if "'up'" in name)

    # The adapted model computes exactly what the checkpoint's model does.
    batch = program.global_batch(next(pipeline.build_data(config, program.loaded, mesh).train))
    base_config, base_params, _ = loading.load_checkpoint(base_export)
    plain = program.family.logits(program.family.build(base_config), base_params, batch, "gist")
    adapted = program.family.logits(program.model, state.params, batch, "gist")
    np.testing.assert_array_equal(np.asarray(adapted), np.asarray(plain))

    state, metrics = program.step(state, batch)
    trained = _adapter_leaves(state.params)
    assert all(trained[name].any() for name in trained if "'up'" in name)
    assert np.isfinite(float(metrics["loss"]))


def test_a_frozen_teacher_without_the_adapter_gets_a_no_op_one(base_export):
    """Student = the checkpoint plus a new adapter, teacher = the checkpoint, both under
    the pos_control mask: the first step's KL is zero."""
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    config = _adapted_config(
        base_export,
        train__objective="distill",
        train__teacher=base_export,
        data__condition="pos_control",
    )
    program = train.make_train_step(config, mesh)
    state = program.init_state()
    batch = program.global_batch(next(pipeline.build_data(config, program.loaded, mesh).train))
    _, metrics = program.step(state, batch)
    assert abs(float(metrics["kl"])) < 1e-6


def test_an_adapted_run_resumes_exactly_and_round_trips_through_hf(base_export, tmp_path):
    settings = {"train__steps": 4, "train__checkpoint_every": 2, "train__keep_checkpoints": 2}

    def run(workdir, stop_at_step=None, **extra):
        config = _adapted_config(base_export, **{**settings, **extra})
        return train.train_and_evaluate(
            config,
            workdir,
            devices=jax.devices()[:1],
            stop_at_step=stop_at_step,
            progress_bar=False,
        )

    full = run(tmp_path / "full", train__export=True)
    stopped = tmp_path / "stopped"
    assert run(stopped, stop_at_step=2).preempted
    resumed = tmp_path / "resumed"
    shutil.copytree(stopped, resumed)
    assert run(resumed).resumed_from == 2
    assert step_losses(resumed) == step_losses(tmp_path / "full")

    # The export carries the adapter; the HF export writes it beside the weights and
    # converting that back gives the same params.
    config, params, _ = loading.load_checkpoint(full.export_dir)
    assert config.gist_adapter_rank == RANK and _adapter_leaves(params)
    hf_dir = to_hf.convert_to_hf(full.export_dir, tmp_path / "hf")
    assert (hf_dir / GIST_ADAPTER_FILE).is_file()
    back_config, back, _ = loading.load_checkpoint(
        from_hf.convert_from_hf(hf_dir, tmp_path / "back")
    )
    assert back_config == config
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(back), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    (hf_dir / GIST_ADAPTER_FILE).unlink()
    with pytest.raises(ConversionError, match=f"gist_adapter_rank={RANK}.*{GIST_ADAPTER_FILE}"):
        from_hf.convert_from_hf(hf_dir, tmp_path / "without")

    # Evaluation restores the trained adapter from the run's checkpoint.
    _, restored, step = model_loading.load_params(
        _adapted_config(base_export, **settings), tmp_path / "full"
    )
    assert step == 4
    for name, leaf in _adapter_leaves(restored).items():
        np.testing.assert_array_equal(leaf, _adapter_leaves(params)[name])


def test_an_adapter_for_t5_is_refused_by_key(tmp_path):
    config = quick_config("tiny_t5", model__gist_adapter_rank=RANK, eval__splits=())
    with pytest.raises(train_config.ConfigError, match=r"model\.gist_adapter_rank=4.*LLaMA"):
        train.train_and_evaluate(config, tmp_path / "run", progress_bar=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
    bad = quick_config("tiny_llama", model__gist_adapter_rank=-1)
    with pytest.raises(train_config.ConfigError, match=r"model\.gist_adapter_rank"):
        train_config.validate(bad)
