"""Context distillation (``train.objective``): the KL equals an explicit numpy KL over full
logits, no gradient reaches the teacher, a student equal to its teacher under the same mask
has zero loss and zero gradient, the mix weighs LM and KL as configured, a frozen teacher
is loaded from a checkpoint directory (and refused by name when it cannot serve), and a
resumed distillation run matches an uninterrupted one step for step."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures_train import quick_config, step_losses

from gist_jax import data, model_loading, tiny_tokenizer, train, train_config
from gist_jax.models.family import LLAMA
from gist_jax.train import optim, output_loss, teacher
from gist_jax.train import state as ts
from gist_jax.train import step as tstep


@pytest.fixture(scope="module")
def tiny():
    config = quick_config("tiny_llama")
    loaded = model_loading.load_model(config)
    model = loaded.family.build(loaded.config)
    init = jax.jit(loaded.family.init_params, static_argnums=0)
    student = init(loaded.config, jax.random.key(1))
    other = init(loaded.config, jax.random.key(2))
    tokenizer = tiny_tokenizer.synthetic_bpe(512)
    examples, _ = data.load_examples("synthetic_v2", "validation_seen", num_examples=12, seed=1)
    encoded, _ = data.encode_decoder_examples(examples, tokenizer, 1, 64)
    # Packed: several examples per row, so the KL must stay inside each example.
    rows = [encoded[i : i + 2] for i in range(0, 12, 2)]
    batch = data.collate_decoder(rows, 128, tokenizer.pad_token_id)
    batch = {k: jnp.asarray(batch[k]) for k in LLAMA.batch_keys}
    return model, loaded, student, other, batch


def _numpy_kl(model, student, teacher_params, batch, weights, temperature):
    """sum over weighted positions of KL(teacher || student), from full logits in numpy."""
    s = np.asarray(LLAMA.logits(model, student, batch, "gist"), np.float64) / temperature
    t = (
        np.asarray(LLAMA.logits(model, teacher_params, batch, "pos_control"), np.float64)
        / temperature
    )
    log_s = (
        s
        - np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - s.max(-1, keepdims=True)
    )
    log_t = (
        t
        - np.log(np.exp(t - t.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - t.max(-1, keepdims=True)
    )
    kl = (np.exp(log_t) * (log_t - log_s)).sum(-1)
    return float((kl * np.asarray(weights)).sum() * temperature**2)


@pytest.mark.parametrize("positions", ["completion", "after_gist"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [8, 0])
def test_kl_equals_numpy_kl(tiny, positions, temperature, chunk):
    model, _, student, other, batch = tiny
    objective = tstep.Objective(
        distill_weight=0.5, teacher="frozen", temperature=temperature, positions=positions
    )
    lm, kl = tstep.distill_sums(model, LLAMA, student, other, batch, "gist", objective, chunk)
    weights = tstep.distill_weights(batch, positions)
    want = _numpy_kl(model, student, other, batch, weights, temperature)
    assert float(kl) == pytest.approx(want, rel=1e-4)
    assert want > 1.0  # two different random models: the test can fail
    # LM part: the plain summed cross-entropy of the student (not computed for w = 1).
    want_lm, _ = tstep.loss_sums(model, LLAMA, student, batch, "gist", 0)
    assert float(lm) == pytest.approx(float(want_lm), rel=1e-5)
    only_kl = tstep.Objective(distill_weight=1.0, temperature=temperature, positions=positions)
    assert (
        float(tstep.distill_sums(model, LLAMA, student, other, batch, "gist", only_kl, chunk)[0])
        == 0
    )


def test_after_gist_weights_cover_the_input_and_completion_only(tiny):
    *_, batch = tiny
    completion = np.asarray(tstep.distill_weights(batch, "completion"))
    after = np.asarray(tstep.distill_weights(batch, "after_gist"))
    pos, last = np.asarray(batch["positions"]), np.asarray(batch["gist_last"])
    assert np.all(after >= completion) and after.sum() > completion.sum()
    # Nothing at or before the gist token, nothing on padding.
    assert not np.any(after[(pos <= last) | (pos < 0)])


def test_no_gradient_reaches_the_teacher(tiny):
    model, _, student, other, batch = tiny
    objective = tstep.Objective(distill_weight=1.0, teacher="frozen")

    def kl_of(s, t):
        return tstep.distill_sums(model, LLAMA, s, t, batch, "gist", objective, 8)[1]

    g_student, g_teacher = jax.grad(kl_of, argnums=(0, 1))(student, other)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g_teacher))
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g_student)) > 0


def test_student_equal_to_teacher_under_the_same_mask_has_zero_loss_and_gradient(tiny):
    model, _, student, _, batch = tiny
    objective = tstep.Objective(distill_weight=1.0, teacher="self", teacher_condition="gist")

    def kl_of(s):
        return tstep.distill_sums(model, LLAMA, s, s, batch, "gist", objective, 8)[1]

    value, grads = jax.value_and_grad(kl_of)(student)
    assert abs(float(value)) < 1e-4
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(grads)) < 1e-6
    # Under the gist mask against the full-prompt teacher it is not zero.
    full = tstep.Objective(distill_weight=1.0, teacher="self")
    assert (
        float(tstep.distill_sums(model, LLAMA, student, student, batch, "gist", full, 8)[1]) > 1e-3
    )


def _state(params, optimizer):
    return ts.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(jax.random.key(0)),
    )


def test_train_step_mixes_lm_and_kl_and_accumulates(tiny):
    model, loaded, student, other, batch = tiny
    axes = loaded.family.param_axes(loaded.config)
    schedule = optim.make_schedule(1e-3, 10, "constant")
    # A large eps makes Adam's first update ~lr * g rather than lr * sign(g), which float
    # noise in a near-zero g could flip between the two summation orders.
    optimizer = optim.make_optimizer(schedule, axes, clip_norm=1.0, eps=1.0)
    objective = tstep.Objective(distill_weight=0.25, teacher="frozen", positions="after_gist")
    results = []
    for accum in (1, 2):
        step = jax.jit(
            tstep.step_function(
                model,
                LLAMA,
                optimizer,
                schedule,
                "gist",
                accum,
                loss_chunk=8,
                objective=objective,
            )
        )
        new_state, metrics = step(_state(student, optimizer), batch, other)
        results.append((new_state, metrics))
    (one, m1), (two, m2) = results
    lm_sum, kl_sum = tstep.distill_sums(model, LLAMA, student, other, batch, "gist", objective, 8)
    lm = float(lm_sum) / float(jnp.sum(batch["loss_mask"]))
    kl = float(kl_sum) / float(jnp.sum(tstep.distill_weights(batch, "after_gist")))
    assert float(m1["lm_loss"]) == pytest.approx(lm, rel=1e-5)
    assert float(m1["kl"]) == pytest.approx(kl, rel=1e-5)
    assert float(m1["loss"]) == pytest.approx(0.75 * lm + 0.25 * kl, rel=1e-5)
    # Gradient accumulation: the same objective and update from two micro-batches.
    for key in ("loss", "lm_loss", "kl", "grad_norm"):
        assert float(m2[key]) == pytest.approx(float(m1[key]), rel=1e-4), key
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # A frozen-teacher step without the teacher is an error, not a silent self-teacher.
    plain = tstep.step_function(model, LLAMA, optimizer, schedule, "gist", objective=objective)
    with pytest.raises(ValueError, match="teacher's params"):
        plain(_state(student, optimizer), batch)


def test_objective_from_config():
    c = quick_config("tiny_llama")
    assert teacher.objective_of(c) == tstep.LM and not teacher.objective_of(c).distills
    c = quick_config("tiny_llama", train__objective="mix", train__distill_weight=0.3)
    objective = teacher.objective_of(c)
    assert objective.distill_weight == 0.3 and objective.teacher == "self"
    c = quick_config("tiny_llama", train__objective="distill", train__teacher="/some/dir")
    assert teacher.objective_of(c).frozen_teacher


def _run(workdir, stop_at_step=None, **overrides):
    settings = {
        "train__steps": 6,
        "train__checkpoint_every": 3,
        "train__keep_checkpoints": 3,
        "eval__splits": (),
        "data__source": "synthetic_v2",
    }
    config = quick_config("tiny_llama", **{**settings, **overrides})
    return train.train_and_evaluate(
        config, workdir, devices=jax.devices()[:1], stop_at_step=stop_at_step, progress_bar=False
    )


def test_distillation_from_a_checkpoint_resumes_exactly(tmp_path):
    # A teacher: a short LM run's export (a converted checkpoint directory).
    teacher_run = _run(tmp_path / "teacher", train__export=True, train__seed=7)
    settings = {
        "train__objective": "mix",
        "train__distill_weight": 0.5,
        "train__teacher": str(teacher_run.export_dir),
        "data__packing": True,
    }
    full = tmp_path / "full"
    assert _run(full, **settings).step == 6
    stopped = tmp_path / "stopped"
    assert _run(stopped, stop_at_step=3, **settings).preempted
    resumed = tmp_path / "resumed"
    shutil.copytree(stopped, resumed)
    result = _run(resumed, **settings)
    assert result.resumed_from == 3 and result.step == 6
    assert step_losses(resumed) == step_losses(full)
    # The KL is logged with the LM part, and the teacher is not in the checkpoint.
    from gist_jax.train.metrics_log import read_metrics

    record = read_metrics(full, "train")[-1]
    assert record["kl"] > 0 and record["lm_loss"] > 0
    # Distilling from another teacher gives other losses (the teacher is really used).
    other = _run(tmp_path / "self", **{**settings, "train__teacher": "self"})
    assert other.step == 6 and step_losses(tmp_path / "self") != step_losses(full)


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("tiny_llama", {"train__objective": "kd"}, "train.objective"),
        ("tiny_llama", {"train__objective": "mix", "train__distill_weight": 0.0}, "weight"),
        ("tiny_llama", {"train__objective": "distill", "train__distill_temperature": 0.0}, "> 0"),
        ("tiny_llama", {"train__objective": "distill", "train__teacher": "base"}, "random init"),
        ("tiny_llama", {"train__objective": "distill", "train__teacher": "/nonexistent"}, "not a converted"),
        ("tiny_t5", {"train__objective": "distill"}, "decoder-only"),
    ],
)  # fmt: skip
def test_impossible_distillation_is_refused_before_anything_is_written(
    tmp_path, name, overrides, message
):
    workdir = tmp_path / "run"
    config = quick_config(name, **overrides)
    with pytest.raises(train_config.ConfigError, match=r"train\.") as error:
        train.train_and_evaluate(config, workdir, devices=jax.devices()[:1], progress_bar=False)
    assert message in str(error.value)
    assert not (workdir / "checkpoints").exists()


def test_kl_rejects_bad_arguments():
    hidden = jnp.zeros((1, 4, 8))
    kernel = jnp.zeros((8, 16))
    weights = jnp.ones((1, 4))
    with pytest.raises(ValueError, match="temperature"):
        output_loss.chunked_kl(hidden, kernel, hidden, kernel, weights, 2, 0.0)
    with pytest.raises(ValueError, match="match weights"):
        output_loss.chunked_kl(hidden, kernel, jnp.zeros((1, 3, 8)), kernel, weights, 2)
