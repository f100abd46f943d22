"""Partial fine-tuning (``train.frozen_layers``): which modules freeze, a frozen step leaves
them bit-for-bit alone while the trained modules get exactly the full step's update, no
optimizer moments for frozen params, a frozen run resumes exactly from its orbax
checkpoint, and impossible settings are refused by name before anything is written; and
per-parameter learning rates (``train.lr_scales``), the soft form of freezing."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from fixtures_train import quick_config, step_losses

from gist_jax import checkpoint as ckpt_lib
from gist_jax import data, model_loading, tiny_tokenizer, train, train_config
from gist_jax import sharding as shd
from gist_jax.models.family import LLAMA
from gist_jax.train import freezing, optim, pipeline
from gist_jax.train import state as ts
from gist_jax.train import step as tstep

LLAMA_MODULES = ("embed_tokens", "layers_0", "layers_1", "layers_2", "norm", "lm_head")


def test_frozen_modules_are_the_embedding_and_the_lowest_layers():
    assert freezing.frozen_modules(LLAMA_MODULES, 0) == frozenset()
    assert freezing.frozen_modules(LLAMA_MODULES, 2) == {"embed_tokens", "layers_0", "layers_1"}
    with pytest.raises(ValueError, match="below the model's 3 layers"):
        freezing.frozen_modules(LLAMA_MODULES, 3)
    with pytest.raises(ValueError, match="unrolled layers"):
        freezing.frozen_modules(("embed_tokens", "layers", "norm"), 1)  # nn.scan layout
    with pytest.raises(ValueError, match=">= 0"):
        freezing.frozen_modules(LLAMA_MODULES, -1)


@pytest.fixture(scope="module")
def tiny_setup():
    config = quick_config("tiny_llama", model__init__num_hidden_layers=3)
    loaded = model_loading.load_model(config)
    model = loaded.family.build(loaded.config)
    params = jax.jit(loaded.family.init_params, static_argnums=0)(loaded.config, jax.random.key(2))
    tokenizer = tiny_tokenizer.synthetic_bpe(512)
    examples, _ = data.load_examples("synthetic", "validation_seen", num_examples=8, seed=1)
    encoded, _ = data.encode_decoder_examples(examples, tokenizer, 1, 64)
    batch = data.collate_decoder([[ex] for ex in encoded], 64, tokenizer.pad_token_id)
    batch = {k: jnp.asarray(batch[k]) for k in LLAMA.batch_keys}
    axes = loaded.family.param_axes(loaded.config)
    return model, params, batch, axes


def _one_step(model, params, batch, axes, frozen):
    schedule = optim.make_schedule(1e-3, 10, "constant")
    # No clipping: Adam's update is per parameter, so trained modules must move exactly as
    # in the full step (clipping would use a global norm over different sets). A large eps
    # makes the first update ~lr * g rather than lr * sign(g), which float noise in a
    # near-zero g could flip.
    adamw = optim.make_optimizer(schedule, axes, weight_decay=0.1, clip_norm=0.0, eps=1.0)
    optimizer = freezing.restrict_optimizer(adamw, params, frozen)
    state = ts.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(0)),
    )
    step = jax.jit(tstep.step_function(model, LLAMA, optimizer, schedule, "gist", frozen=frozen))
    new_state, metrics = step(state, batch)
    return new_state, metrics


def test_frozen_step_updates_only_the_trained_modules(tiny_setup):
    model, params, batch, axes = tiny_setup
    frozen = freezing.frozen_modules(params.keys(), 2)
    full, full_metrics = _one_step(model, params, batch, axes, frozenset())
    part, part_metrics = _one_step(model, params, batch, axes, frozen)
    # Same forward pass: same loss.
    assert float(part_metrics["loss"]) == pytest.approx(float(full_metrics["loss"]), rel=1e-6)
    for name in params:
        before = jax.tree.leaves(params[name])
        after = jax.tree.leaves(part.params[name])
        if name in frozen:
            assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True)), name
        else:
            assert not all(np.array_equal(a, b) for a, b in zip(before, after, strict=True)), name
            for got, want in zip(after, jax.tree.leaves(full.params[name]), strict=True):
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8, err_msg=name)
    # Adam keeps moments (mu and nu) for the trained params only.
    trained, _ = freezing.split(params, frozen)
    moments = sum(x.size for x in jax.tree.leaves(part.opt_state) if x.ndim > 0)
    assert moments == 2 * ts.param_count(trained) < 2 * ts.param_count(params)


def _run(workdir, stop_at_step=None, **overrides):
    settings = {
        "train__steps": 6,
        "train__checkpoint_every": 3,
        "train__keep_checkpoints": 3,
        "train__frozen_layers": 1,
        "eval__splits": (),
    }
    config = quick_config("tiny_llama", **{**settings, **overrides})
    return train.train_and_evaluate(
        config, workdir, devices=jax.devices()[:1], stop_at_step=stop_at_step, progress_bar=False
    )


def _checkpoint_params(workdir, step):
    """The params saved at ``step``, read with orbax directly (as host arrays)."""
    path = workdir / ckpt_lib.CHECKPOINT_DIR / str(step) / "state"
    return ocp.StandardCheckpointer().restore(path)["params"]


def test_frozen_run_resumes_exactly(tmp_path):
    full = tmp_path / "full"
    assert _run(full).step == 6
    stopped = tmp_path / "stopped"
    result = _run(stopped, stop_at_step=3)
    assert result.preempted and result.step == 3
    resumed = tmp_path / "resumed"
    shutil.copytree(stopped, resumed)
    result = _run(resumed)
    assert result.resumed_from == 3 and result.step == 6
    assert step_losses(resumed) == step_losses(full)
    # The frozen modules are the same in the step-3 and step-6 checkpoints; layer 1 moved.
    early, late = _checkpoint_params(full, 3), _checkpoint_params(full, 6)
    for name in ("embed_tokens", "layers_0"):
        for a, b in zip(jax.tree.leaves(early[name]), jax.tree.leaves(late[name]), strict=True):
            assert np.array_equal(a, b), name
    assert not np.array_equal(
        jax.tree.leaves(early["layers_1"])[0], jax.tree.leaves(late["layers_1"])[0]
    )
    # Resuming it with every layer trainable is refused (the optimizer state differs) and
    # the checkpoints stay where they are.
    with pytest.raises(ckpt_lib.CheckpointError, match=r"train\.frozen_layers"):
        _run(stopped, train__frozen_layers=0)
    assert ckpt_lib.Checkpointer(stopped, async_save=False).all_steps() == [3]


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("tiny_llama", {"train__frozen_layers": 2}, "below the model's 2 layers"),
        ("tiny_llama", {"train__frozen_layers": -1}, "must be >= 0"),
        ("tiny_llama", {"train__frozen_layers": 1, "model__scan_layers": True}, "scan_layers"),
        ("tiny_t5", {"train__frozen_layers": 1}, "decoder-only model"),
    ],
)
def test_impossible_freezing_is_refused_before_anything_is_written(
    tmp_path, name, overrides, message
):
    workdir = tmp_path / "run"
    config = quick_config(name, **overrides)
    with pytest.raises(train_config.ConfigError, match=r"train\.frozen_layers") as error:
        train.train_and_evaluate(config, workdir, devices=jax.devices()[:1], progress_bar=False)
    assert message in str(error.value)
    assert not (workdir / "checkpoints").exists()


def test_frozen_params_keep_their_values_and_resume_exactly(tmp_path):
    """``train.frozen_params="mlp"``: every MLP parameter ends where it started, the rest
    moves, and a run stopped and resumed logs the uninterrupted run's losses."""
    overrides = {"train__frozen_layers": 0, "train__frozen_params": "mlp"}
    full = tmp_path / "full"
    assert _run(full, **overrides).step == 6
    stopped = tmp_path / "stopped"
    assert _run(stopped, stop_at_step=3, **overrides).preempted
    assert _run(stopped, **overrides).resumed_from == 3
    assert step_losses(stopped) == step_losses(full)
    early, late = _checkpoint_params(full, 3), _checkpoint_params(full, 6)
    flat_early = jax.tree_util.tree_leaves_with_path(early)
    for (path, a), b in zip(flat_early, jax.tree.leaves(late), strict=True):
        same = np.array_equal(a, b)
        assert same == ("mlp" in jax.tree_util.keystr(path)), jax.tree_util.keystr(path)
    # Resuming with another set of frozen params is refused (the optimizer state differs).
    with pytest.raises(ckpt_lib.CheckpointError, match=r"train\.frozen_params"):
        _run(full, train__steps=8, train__frozen_layers=0, train__frozen_params="")


def test_a_frozen_params_fragment_that_matches_nothing_is_refused(tmp_path):
    config = quick_config("tiny_llama", train__frozen_params="mlp,mpl")
    with pytest.raises(train_config.ConfigError, match=r"train\.frozen_params: 'mpl' is in no"):
        train.train_and_evaluate(config, tmp_path / "run", progress_bar=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_lr_scales_scale_one_train_step_of_the_matching_params():
    """``train.lr_scales="mlp=0.5"`` through the public train step: from the same state
    and batch, every MLP parameter moves exactly half as far as without the scale and
    every other parameter moves exactly as far; a fragment that matches nothing is refused
    by key."""
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    deltas = {}
    for spec in ("", "mlp=0.5"):
        config = quick_config("tiny_llama", train__lr_scales=spec, train__warmup=0)
        program = train.make_train_step(config, mesh)
        state = program.init_state()
        start = jax.tree.map(np.asarray, state.params)
        batch = next(pipeline.build_data(config, program.loaded, mesh).train)
        state, _ = program.step(state, program.global_batch(batch))
        moved = jax.tree.map(lambda a, b: np.asarray(a) - b, state.params, start)
        deltas[spec] = jax.tree_util.tree_leaves_with_path(moved)
    for (path, plain), (_, scaled) in zip(deltas[""], deltas["mlp=0.5"], strict=True):
        factor = 0.5 if "mlp" in jax.tree_util.keystr(path) else 1.0
        # (new - start) rounds at the params' magnitude, not the update's
        np.testing.assert_allclose(scaled, factor * plain, rtol=1e-5, atol=1e-8)
        assert np.any(plain != 0), jax.tree_util.keystr(path)
    with pytest.raises(train_config.ConfigError, match=r"train\.lr_scales: 'mpl' is in no"):
        train.make_train_step(quick_config("tiny_llama", train__lr_scales="mpl=0.5"), mesh)


def test_resuming_with_lr_scales_where_the_run_had_none_is_refused(tmp_path):
    full = tmp_path / "full"
    assert _run(full, train__frozen_layers=0).step == 6
    with pytest.raises(ckpt_lib.CheckpointError, match=r"train\.lr_scales"):
        _run(full, train__steps=8, train__frozen_layers=0, train__lr_scales="mlp=0.5")
