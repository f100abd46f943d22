"""Crash safety of training.

With real processes and real signals (``benchmarks/probes/soak_crash.py``, a short fixed plan): a run
killed with SIGKILL at random moments (during start-up, mid-step, while an asynchronous
checkpoint is being written, while the final export is being written) and preempted once
with SIGTERM, restarted with the same command each time, resumes every time from the newest
complete checkpoint and ends with exactly the uninterrupted run's per-step losses (each
step logged once), checkpoints and exported params, leaving no temporary directory behind.

In process: an unreadable newest checkpoint is moved aside and the run resumes from the one
before; a non-finite loss or gradient skips the update (params unchanged), is logged, and
``train.max_nonfinite_steps`` of them in a row stop the run with a clear message, keeping
the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures_train import quick_config, step_losses

from benchmarks.probes import soak_crash as soak
from gist_jax import train
from gist_jax.train import step as tstep
from gist_jax.train.metrics_log import read_metrics

# Five SIGKILLs (two of them aimed at checkpoint writes, one at the export), one SIGTERM.
PLAN = ("kill_startup", "kill_save", "kill_step", "kill_save", "sigterm", "kill_export", "finish")
STEPS = 10


@pytest.mark.slow
@pytest.mark.multiprocess
def test_killed_and_restarted_run_equals_uninterrupted_run(tmp_path):
    result = soak.soak(tmp_path, PLAN, STEPS, seed=3)
    attempts = "\n".join(json.dumps(dataclasses.asdict(a)) for a in result.attempts)
    assert not result.problems, "\n".join(result.problems) + "\n" + attempts
    assert result.kills >= 5, attempts
    summary = result.summary()
    # The kills really hit checkpoint writes: a temporary checkpoint was left behind...
    assert summary["killed_with_partial_checkpoint"] >= 1, attempts
    # ...and restarts resumed, each from the newest complete checkpoint (checked per attempt).
    assert summary["restarts_resumed_from_newest_complete"] >= 4, attempts
    sigterm = next(a for a in result.attempts if a.action == "sigterm")
    assert sigterm.outcome == "preempted" and sigterm.rc == 0, attempts
    assert result.attempts[-1].outcome == "finished", attempts


# ---------------------------------------------------------------------------------------
# In process


def _config(**overrides):
    settings = {"train__steps": 6, "eval__splits": (), "train__keep_checkpoints": 0}
    return quick_config("tiny_llama", **{**settings, **overrides})


def _run(workdir, stop_at_step=None, **overrides):
    return train.train_and_evaluate(
        _config(**overrides),
        workdir,
        devices=jax.devices()[:1],
        stop_at_step=stop_at_step,
        progress_bar=False,
    )


def test_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    _run(tmp_path, stop_at_step=4, train__checkpoint_every=2)  # preempted at step 4
    first = step_losses(tmp_path)
    # Storage corruption in a finished checkpoint: its array data is cut short.
    for path in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[:7])
    result = _run(tmp_path, train__checkpoint_every=2)
    out = capsys.readouterr().out
    assert result.resumed_from == 2 and result.step == 6, out
    assert "checkpoint 4 cannot be restored" in out and "checkpoints/2\n" in out, out
    aside = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("4.")]
    assert len(aside) == 1 and "unreadable" in aside[0], aside  # kept for inspection
    losses = [r["step"] for r in read_metrics(tmp_path)]
    assert losses == [1, 2, 3, 4, 5, 6]  # steps 3-4 redone, logged once
    redone = step_losses(tmp_path)
    assert [redone[s] for s in (1, 2, 3, 4)] == [first[s] for s in (1, 2, 3, 4)]


def _params_hook(store):
    """An eval hook that keeps a host copy of the params at every evaluation."""

    def hook(context):
        store[context.step] = jax.tree.map(np.asarray, jax.device_get(context.params))
        return {}

    return hook


def _poison_updates(monkeypatch, updates):
    """Fault injection: the train step the loop builds makes the loss of these updates
    (1 = the first) NaN, by scaling their batch's float loss mask by NaN."""
    build = tstep.step_function
    poisoned = jnp.asarray(updates, jnp.int32)

    def build_poisoned(*args, **kwargs):
        step = build(*args, **kwargs)

        def poisoned_step(state, batch, *rest):
            scale = jnp.where(jnp.isin(state.step + 1, poisoned), jnp.nan, 1.0)
            return step(state, {**batch, "loss_mask": batch["loss_mask"] * scale}, *rest)

        return poisoned_step

    monkeypatch.setattr(tstep, "step_function", build_poisoned)


def test_nonfinite_steps_are_skipped_then_a_streak_stops_the_run(tmp_path, monkeypatch):
    # Step 3 alone is poisoned (skipped, training goes on); then 5, 6, 7 in a row: stop.
    _poison_updates(monkeypatch, (3, 5, 6, 7))
    params = {}
    with pytest.raises(train.NonFiniteError) as err:
        train.train_and_evaluate(
            _config(
                train__steps=8,
                train__eval_every=1,
                train__checkpoint_every=1,
                train__max_nonfinite_steps=3,
            ),
            tmp_path,
            devices=jax.devices()[:1],
            eval_hooks=[_params_hook(params)],
            progress_bar=False,
        )

    def same(a, b):
        pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
        return all(np.array_equal(x, y) for x, y in pairs)

    assert same(params[3], params[2])  # the poisoned step changed nothing...
    assert not same(params[2], params[1]) and not same(params[4], params[3])  # ...others do
    assert same(params[6], params[4]) and same(params[5], params[4])
    events = read_metrics(tmp_path, "nonfinite")
    assert [(e["step"], e["consecutive"]) for e in events] == [(3, 1), (5, 1), (6, 2), (7, 3)]
    assert events[0]["loss"] == "nan"
    records = {r["step"]: r for r in read_metrics(tmp_path)}
    assert sorted(records) == [1, 2, 3, 4, 5, 6]  # step 7 stopped the run before its record
    assert records[3]["skipped"] == 1 and records[4]["skipped"] == 0
    message = str(err.value)
    assert "steps 5-7: loss or gradient not finite 3 times in a row" in message, message
    assert "train.max_nonfinite_steps=3" in message and "last good checkpoint: step 4" in message
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [1, 2, 4], saved  # none during a run of skipped steps


def test_overflowing_learning_rate_stops_the_run(tmp_path):
    # 1e39 is a valid float64 but inf in float32: every update would make params inf.
    with pytest.raises(train.NonFiniteError, match=r"steps 1-2: .* 2 times in a row"):
        _run(tmp_path, train__lr=1e39, train__max_nonfinite_steps=2, train__checkpoint_every=1)
    assert not any(p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir())
