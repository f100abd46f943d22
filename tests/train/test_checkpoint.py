"""Checkpoints: a run stopped after a checkpoint and restarted reproduces the uninterrupted
run's per-step losses exactly; a checkpoint written on 4 devices (fsdp x tensor) restores
on 2 and on 8 devices and training continues with the same losses; SIGTERM saves and
stops; keep-last-K; and a checkpoint of a different model is refused by name."""

from __future__ import annotations

import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest
from fixtures_train import quick_config, step_losses

from gist_jax import checkpoint as ckpt_lib
from gist_jax import model_loading, train

STEPS = 10
STOP = 5
MESH_4 = {"mesh__data": 1, "mesh__fsdp": 2, "mesh__tensor": 2}


def _config(**overrides):
    settings = {
        "train__steps": STEPS,
        "train__checkpoint_every": STOP,
        "train__keep_checkpoints": 3,
        "eval__splits": (),  # validation loss is not what these tests are about
        **MESH_4,
    }
    return quick_config("tiny_llama", **{**settings, **overrides})


def _run(workdir, devices, stop_at_step=None, **overrides):
    return train.train_and_evaluate(
        _config(**overrides),
        workdir,
        devices=devices,
        stop_at_step=stop_at_step,
        progress_bar=False,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 4-device run, and a 4-device run stopped at step STOP."""
    full = tmp_path_factory.mktemp("full")
    result = _run(full, jax.devices()[:4])
    assert result.step == STEPS and not result.preempted
    stopped = tmp_path_factory.mktemp("stopped")
    result = _run(stopped, jax.devices()[:4], stop_at_step=STOP)
    assert result.preempted and result.step == STOP
    return full, stopped


def test_resume_is_exact(runs, tmp_path):
    full, stopped = runs
    workdir = tmp_path / "resumed"
    shutil.copytree(stopped, workdir)
    before = step_losses(workdir)
    assert sorted(before) == list(range(1, STOP + 1))
    result = _run(workdir, jax.devices()[:4])
    assert result.resumed_from == STOP and result.step == STEPS
    expected, got = step_losses(full), step_losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    # Same mesh, same program: bit-for-bit the same losses, before and after the restart.
    for step in range(1, STEPS + 1):
        assert got[step] == expected[step], (step, got[step], expected[step])
    data_state = json.loads((workdir / "checkpoints" / str(STOP) / "data" / "metadata").read_text())
    assert data_state == {"epoch": 0, "batch": STOP}


@pytest.mark.parametrize(
    "num_devices, mesh",
    [
        (2, {"mesh__data": 1, "mesh__fsdp": 2, "mesh__tensor": 1}),
        (8, {"mesh__data": 2, "mesh__fsdp": 2, "mesh__tensor": 2}),
    ],
)
def test_restore_on_another_mesh(runs, tmp_path, num_devices, mesh):
    full, stopped = runs
    workdir = tmp_path / "moved"
    shutil.copytree(stopped, workdir)
    result = _run(workdir, jax.devices()[:num_devices], **mesh)
    assert result.resumed_from == STOP and result.step == STEPS
    expected, got = step_losses(full), step_losses(workdir)
    # A different mesh sums in a different order: equal to float tolerance.
    np.testing.assert_allclose(
        [got[s] for s in range(STOP + 1, STEPS + 1)],
        [expected[s] for s in range(STOP + 1, STEPS + 1)],
        atol=1e-5,
    )


def test_restored_arrays_equal_saved_and_use_the_new_shardings(runs):
    from gist_jax import sharding as shd
    from gist_jax.train import optim
    from gist_jax.train import state as ts

    _, stopped = runs
    config = _config()
    loaded = model_loading.load_model(config)
    family, model_config = loaded.family, loaded.config
    axes = family.param_axes(model_config)
    optimizer = optim.make_optimizer(optim.make_schedule(1e-3, STEPS), axes)
    abstract = ts.abstract_state(family.abstract_params(model_config), optimizer)

    def restore(spec, n):
        mesh = shd.make_mesh(spec, jax.devices()[:n])
        target = ts.with_shardings(abstract, ts.state_shardings(abstract, axes, mesh, optimizer))
        checkpointer = ckpt_lib.Checkpointer(stopped, async_save=False)
        try:
            return checkpointer.restore(target)
        finally:
            checkpointer.close()

    state4, data4 = restore({"data": 1, "fsdp": 2, "tensor": 2}, 4)
    state8, data8 = restore({"data": 2, "fsdp": 2, "tensor": 2}, 8)
    assert data4 == data8 == {"epoch": 0, "batch": STOP}
    assert int(state4.step) == int(state8.step) == STOP
    kernel8 = state8.params["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert kernel8.sharding.mesh.devices.size == 8
    assert kernel8.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        (state4.params, state4.opt_state, state4.rng),
        (state8.params, state8.opt_state, state8.rng),
    )


def test_sigterm_saves_and_stops(tmp_path):
    sent = []

    def send_sigterm(context):
        # Like a scheduler's preemption notice arriving during step 3's evaluation.
        if not sent:
            sent.append(context.step)
            os.kill(os.getpid(), signal.SIGTERM)
        return {}

    previous = signal.getsignal(signal.SIGTERM)
    result = train.train_and_evaluate(
        _config(train__eval_every=3),
        tmp_path,
        devices=jax.devices()[:4],
        eval_hooks=[send_sigterm],
        progress_bar=False,
    )
    assert sent == [3]
    assert result.preempted and result.step == 3
    assert (tmp_path / "checkpoints" / "3").is_dir()
    assert signal.getsignal(signal.SIGTERM) is previous  # handler uninstalled


def test_keep_limits_checkpoints(tmp_path):
    result = train.train_and_evaluate(
        _config(train__steps=6, train__checkpoint_every=2, train__keep_checkpoints=2),
        tmp_path,
        devices=jax.devices()[:4],
        progress_bar=False,
    )
    assert result.step == 6
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 6]


def test_checkpoint_of_another_model_is_refused(runs, tmp_path):
    _, stopped = runs
    # The workdir's model_config.json names the difference...
    with pytest.raises(
        ckpt_lib.CheckpointError, match="num_hidden_layers: workdir has 2, this run has 3"
    ):
        _run(stopped, jax.devices()[:4], model__init__num_hidden_layers=3)
    # ...and without it, the checkpoint's array shapes do.
    workdir = tmp_path / "no_config"
    shutil.copytree(stopped, workdir)
    (workdir / "model_config.json").unlink()
    with pytest.raises(
        ckpt_lib.CheckpointError,
        match=r"written for a different model: .*mlp.*\(64, 128\), this run \(64, 96\)",
    ):
        _run(workdir, jax.devices()[:4], model__init__intermediate_size=96)
