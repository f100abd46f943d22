"""End-to-end training on the synthetic suite with the tiny configs (loss must fall),
packing vs padding (same examples, same loss), the exported model, and start-up
validation: every bad input gives a clear error before any training."""

from __future__ import annotations

import os
import pathlib

import jax
import numpy as np
import pytest
from absl import flags
from fixtures_train import REPO, quick_config, step_hook, step_losses
from ml_collections import config_flags

from gist_jax import checkpoint as ckpt_lib
from gist_jax import data, gist, model_loading, tiny_tokenizer, train, train_config
from gist_jax import sharding as shd
from gist_jax.convert import loading
from gist_jax.models.family import LLAMA
from gist_jax.train import pipeline
from gist_jax.train import step as tstep


def _first_last(losses: dict[int, float], n: int = 5) -> tuple[float, float]:
    steps = sorted(losses)
    return float(np.mean([losses[s] for s in steps[:n]])), float(
        np.mean([losses[s] for s in steps[-n:]])
    )


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny_llama")
    config = quick_config(
        "tiny_llama",
        train__steps=60,
        train__export=True,
        data__num_train_examples=1000,
    )
    result = train.train_and_evaluate(
        config,
        workdir,
        devices=jax.devices()[:1],
        eval_hooks=[step_hook()],
        progress_bar=False,
    )
    return config, workdir, result


def test_own_loop_over_make_train_step_matches_the_loop(llama_run):
    # The public way to drive training yourself: the same config gives the same per-step
    # losses as train_and_evaluate (same init, data order, schedule and jitted step).
    config, workdir, _ = llama_run
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    program = train.make_train_step(config, mesh)
    assert isinstance(program, train.TrainProgram) and program.total_steps == 60
    state = program.init_state()
    batches = pipeline.build_data(config, program.loaded, mesh).train
    losses = []
    for _ in range(8):
        state, metrics = program.step(state, program.global_batch(next(batches)))
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 8
    logged = step_losses(workdir)
    np.testing.assert_allclose(losses, [logged[s] for s in range(1, 9)], rtol=1e-12)


def test_tiny_llama_loss_falls(llama_run):
    _, workdir, result = llama_run
    assert result.step == 60 and not result.preempted
    losses = step_losses(workdir)
    assert sorted(losses) == list(range(1, 61))
    first, last = _first_last(losses)
    # Uniform guessing over 512 tokens is ln(512) = 6.24; the synthetic suite is learnable.
    assert first > 5.5
    assert last < first - 1.0, (first, last)
    assert result.last_eval["validation_seen/loss"] < first - 1.0
    assert (workdir / "tensorboard").is_dir() and any((workdir / "tensorboard").iterdir())


def test_logged_fields_and_export(llama_run):
    from gist_jax.train.metrics_log import read_metrics

    config, workdir, result = llama_run
    rec = read_metrics(workdir, "train")[-1]
    for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time_s", "eta_s"):
        assert key in rec, key
    assert rec["tokens"] > 0 and rec["tokens_per_s"] > 0
    # The evaluation hook ran at the final evaluation, with the trained params.
    evals = read_metrics(workdir, "eval")
    assert evals[-1]["hook/step"] == 60 and evals[-1]["hook/params"] == 139_584
    assert "validation_seen/loss" in evals[-1]
    # The export is a converted checkpoint directory that convert.loading reads.
    model_config, params, tokenizer = loading.load_checkpoint(result.export_dir)
    assert model_config.gist_token_id == tokenizer.convert_tokens_to_ids("<GIST>")
    assert model_config.hidden_size == config.model.init.hidden_size
    assert params["embed_tokens"]["embedding"].shape == (512, 64)


def test_tiny_t5_loss_falls(tmp_path):
    config = quick_config(
        "tiny_t5", train__steps=50, data__bucket_multiple=64, data__num_train_examples=1000
    )
    result = train.train_and_evaluate(
        config, tmp_path, devices=jax.devices()[:1], progress_bar=False
    )
    losses = step_losses(tmp_path)
    first, last = _first_last(losses)
    assert first > 5.5
    assert last < first - 1.0, (first, last)
    assert result.last_eval["validation_seen/loss"] < first - 1.0


# ---------------------------------------------------------------------------------------
# Packing vs padding


def test_packing_gives_the_same_loss_as_padding():
    tokenizer = tiny_tokenizer.synthetic_bpe(512)
    examples, _ = data.load_examples("synthetic", "validation_unseen", num_examples=24, seed=3)
    encoded, _ = data.encode_decoder_examples(examples, tokenizer, 1, 64)
    pad_id = tokenizer.pad_token_id
    padded = data.collate_decoder([[ex] for ex in encoded], 64, pad_id)
    lengths = [(ex.length,) for ex in encoded]
    rows = data.pack_rows(range(len(encoded)), lengths, (128,))
    assert len(rows) < len(encoded)  # several examples per packed row
    packed = data.collate_decoder([[encoded[i] for i in row] for row in rows], 128, pad_id)

    config = quick_config("tiny_llama")
    loaded = model_loading.load_model(config)
    model = loaded.family.build(loaded.config)
    params = jax.jit(loaded.family.init_params, static_argnums=0)(loaded.config, jax.random.key(1))
    fn = jax.jit(lambda p, b: tstep.loss_sums(model, LLAMA, p, b, "gist"))
    pad_sum, pad_count = fn(params, padded)
    pack_sum, pack_count = fn(params, packed)
    assert float(pad_count) == float(pack_count) > 0
    np.testing.assert_allclose(float(pack_sum), float(pad_sum), rtol=2e-6)
    # The segment mask matters: without it, packed examples would see each other.
    leaky = dict(packed, segment_ids=(packed["segment_ids"] > 0).astype(np.int32))
    assert abs(float(fn(params, leaky)[0]) - float(pad_sum)) > 1e-3


# ---------------------------------------------------------------------------------------
# Bad input


def _parse_cli(argv: list[str]):
    values = flags.FlagValues()
    argv = ["gist-train", *argv]
    holder = config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
    values(argv)
    return holder.value


def test_visible_fraction_shows_a_seeded_share_of_prompts():
    """``data.visible_fraction``: that share of training examples loses its gist span (so
    every mask shows it the whole prompt), the same examples for the same seed; the gist
    tokens stay in the sequence and validation examples keep their spans."""
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])

    def setup(fraction: float, seed: int = 0):
        config = quick_config("tiny_llama", data__visible_fraction=fraction, train__seed=seed)
        return pipeline.build_data(config, model_loading.load_model(config), mesh)

    plain, mixed, again = setup(0.0), setup(0.3), setup(0.3)
    train_plain, train_mixed = plain.train.examples, mixed.train.examples
    visible = [e.gist_first == gist.NO_GIST for e in train_mixed]
    assert not any(e.gist_first == gist.NO_GIST for e in train_plain)
    assert 0.25 < np.mean(visible) < 0.35, np.mean(visible)
    assert visible == [e.gist_first == gist.NO_GIST for e in again.train.examples]
    for before, after in zip(train_plain, train_mixed, strict=True):
        np.testing.assert_array_equal(before.prompt, after.prompt)  # gist tokens stay
    for split, iterator in mixed.evals.items():
        assert all(e.gist_first != gist.NO_GIST for e in iterator.examples), split


def test_mix_source_adds_examples_without_the_excluded_tasks(tmp_path):
    """``data.mix_*``: that many training examples of another suite join the training set
    (validation is untouched), none of an excluded task; half a setting is refused."""
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    mix = {"data__mix_source": "synthetic_v2", "data__mix_exclude_tasks": "add_each,sum_numbers"}

    def setup(**overrides):
        config = quick_config("tiny_llama", **overrides)
        return pipeline.build_data(config, model_loading.load_model(config), mesh)

    plain, mixed = setup(), setup(data__mix_examples=60, **mix)
    assert len(mixed.train.examples) == len(plain.train.examples) + 60
    assert [len(it.examples) for it in mixed.evals.values()] == [
        len(it.examples) for it in plain.evals.values()
    ]
    reports = "\n".join(mixed.reports)
    assert "synthetic_v2:train: mixed in 60 examples (left out tasks: add_each, sum_numbers)" in (
        reports
    )
    config = quick_config("tiny_llama", data__mix_examples=60, **mix)
    extra, _ = pipeline._mix_examples(config.data, "train", seed=0)
    tasks = {t for e in extra for t in e["task"].split("+")}
    assert len(extra) == 60 and not tasks & {"add_each", "sum_numbers"} and len(tasks) > 10
    typo = quick_config(
        "tiny_llama", data__mix_examples=60, **{**mix, "data__mix_exclude_tasks": "add_eahc"}
    )
    with pytest.raises(
        train_config.ConfigError, match=r"no synthetic_v2 example has task\(s\) \['add_eahc'\]"
    ):
        pipeline._mix_examples(typo.data, "train", seed=0)
    with pytest.raises(train_config.ConfigError, match=r"data\.mix_examples"):
        train.train_and_evaluate(
            quick_config("tiny_llama", data__mix_source="synthetic_v2"), tmp_path / "run"
        )


def test_cli_overrides_and_unknown_keys():
    path = str(REPO / "configs" / "tiny_llama.py")
    config = _parse_cli([f"--config={path}", "--config.train.lr=3e-5"])
    assert config.train.lr == 3e-5
    # The config is locked: a misspelt key fails at parse time, with a suggestion.
    with pytest.raises(AttributeError, match='Did you mean "lr" instead of "lrr"'):
        _parse_cli([f"--config={path}", "--config.train.lrr=3e-5"])
    # The same for programmatic overrides of the locked config.
    with pytest.raises(KeyError, match="lrr"):
        quick_config("tiny_llama", train__lrr=1.0)


def test_validation_lists_every_problem(tmp_path):
    config = quick_config("tiny_llama", train__lr=0.0, train__batch_size=10, train__grad_accum=4)
    with pytest.raises(train_config.ConfigError) as err:
        train.train_and_evaluate(config, tmp_path, progress_bar=False)
    message = str(err.value)
    assert "train.lr=0.0: the learning rate must be > 0" in message
    assert "train.batch_size=10: must be divisible by train.grad_accum=4" in message
    assert not any(tmp_path.iterdir())  # nothing was written
    with pytest.raises(train_config.ConfigError, match=r"train.lr=-1e-05"):
        train.train_and_evaluate(quick_config(train__lr=-1e-5), tmp_path, progress_bar=False)


def test_cudnn_attention_is_refused_where_it_cannot_run(tmp_path):
    """On this CPU: float32 compute and the CPU backend are both named, nothing is written."""
    config = quick_config("tiny_llama", model__attention="cudnn")
    with pytest.raises(train_config.ConfigError) as err:
        train.train_and_evaluate(config, tmp_path, progress_bar=False)
    assert "cuDNN attention needs model.dtype='bfloat16'" in str(err.value)
    assert "cuDNN attention needs an NVIDIA GPU; this run's backend is cpu" in str(err.value)
    assert not any(tmp_path.iterdir())


def test_flash_attention_trains_like_cpu_attention(tmp_path):
    """Three packed steps (with gradient accumulation) under ``model.attention="flash"``
    (the Pallas kernel, interpreted on the CPU) log the losses of the "cpu" run."""
    losses = {}
    for implementation in ("cpu", "flash"):
        config = quick_config(
            "tiny_llama",
            model__attention=implementation,
            data__packing=True,
            train__steps=3,
            train__grad_accum=2,
        )
        workdir = tmp_path / implementation
        train.train_and_evaluate(config, workdir, devices=jax.devices()[:1], progress_bar=False)
        losses[implementation] = step_losses(workdir)
    assert sorted(losses["flash"]) == [1, 2, 3]
    for step, loss in losses["cpu"].items():
        assert abs(losses["flash"][step] - loss) < 1e-4 * abs(loss), (step, losses)


def test_flash_attention_is_refused_for_t5(tmp_path):
    config = quick_config("tiny_t5", model__attention="flash")
    with pytest.raises(train_config.ConfigError, match=r"model.attention='flash' serves LLaMA"):
        train.train_and_evaluate(config, tmp_path, progress_bar=False)
    assert not any(tmp_path.iterdir())


def test_invalid_mesh(tmp_path):
    config = quick_config(mesh__fsdp=3, mesh__data=1, mesh__tensor=1)
    with pytest.raises(shd.MeshError, match=r"data=1, fsdp=3, tensor=1\) has 3 devices but 8"):
        train.train_and_evaluate(config, tmp_path, progress_bar=False)
    config = quick_config(mesh__fsdp=-1, mesh__tensor=3)
    with pytest.raises(shd.MeshError, match="does not divide the 8 devices"):
        train.train_and_evaluate(config, tmp_path, progress_bar=False)
    # A batch that does not split over data x fsdp is caught before training too.
    config = quick_config(mesh__fsdp=8, train__batch_size=12, train__grad_accum=1)
    with pytest.raises(train_config.ConfigError, match="12 rows per micro-batch is not divisible"):
        train.train_and_evaluate(config, tmp_path, progress_bar=False)


def test_make_train_step_rejects_bad_configs_by_key():
    mesh = shd.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    with pytest.raises(train_config.ConfigError, match="12 rows per micro-batch is not divisible"):
        train.make_train_step(quick_config(train__batch_size=12), mesh)
    with pytest.raises(train_config.ConfigError, match=r"train.steps=0 \(count epochs\)"):
        train.make_train_step(quick_config(train__steps=0, train__epochs=1.0), mesh)
    with pytest.raises(train_config.ConfigError, match=r"train\.frozen_params"):
        train.make_train_step(quick_config(train__frozen_params="no_such_param"), mesh)


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ckpt_lib.CheckpointError, match="cannot be created"):
        train.train_and_evaluate(quick_config(), blocker / "run", progress_bar=False)
    with pytest.raises(ckpt_lib.CheckpointError, match="exists and is not a directory"):
        train.train_and_evaluate(quick_config(), blocker, progress_bar=False)
    # An existing directory without write permission (root ignores modes: use sysfs).
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o500)
    target = read_only if os.geteuid() != 0 else pathlib.Path("/sys/kernel")
    with pytest.raises(ckpt_lib.CheckpointError, match="is not writable"):
        train.train_and_evaluate(quick_config(), target, progress_bar=False)


def test_incompatible_model_in_workdir(llama_run):
    _, workdir, _ = llama_run
    config = quick_config(model__init__hidden_size=32)
    with pytest.raises(
        ckpt_lib.CheckpointError, match=r"hidden_size: workdir has 64, this run has 32"
    ):
        train.train_and_evaluate(config, workdir, devices=jax.devices()[:1], progress_bar=False)
    assert isinstance(workdir, pathlib.Path)
