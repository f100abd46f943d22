"""Smoke test of ``benchmarks``: every measurement runs end to end on a tiny random
model with one repetition, writes its JSON (and the scaling plot), and the numbers are
sane: the two train steps start from the same loss, both decoders emit the requested
tokens, gist caching runs fewer tokens than no caching, and packing beats padding; the
op-level profiler attributes traced time to the model's operations."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from benchmarks.__main__ import MEASUREMENTS, BenchOptions, run_benchmarks


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, pathlib.Path]:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    opts = BenchOptions(
        model="tiny", quick=True, out=str(out), markdown=str(out.with_suffix(".md"))
    )
    return run_benchmarks(opts, echo=lambda _: None), out


def test_writes_json_with_every_measurement(results: tuple[dict, pathlib.Path]) -> None:
    res, out = results
    saved = json.loads(out.read_text())
    for name in MEASUREMENTS:
        assert name in saved, name
    assert saved["machine"]["usable_cores"] >= 1
    assert saved["machine"]["device_kind"]
    assert saved["machine"]["torch_threads"] == saved["machine"]["usable_cores"]
    assert pathlib.Path(res["scaling"]["plot"]).stat().st_size > 1000
    assert "Train step" in out.with_suffix(".md").read_text()


def test_peak_is_positive(results: tuple[dict, pathlib.Path]) -> None:
    peak = results[0]["peak"]
    assert peak["matmul"]["peak_flops_per_s"] > 1e8
    assert peak["bandwidth"]["bandwidth_bytes_per_s"] > 1e8


def test_train_step_compares_the_same_function(results: tuple[dict, pathlib.Path]) -> None:
    train = results[0]["train"]
    impls = train["implementations"]
    # Same weights, same batch, same mask: the first losses agree to float32 rounding.
    assert train["loss_abs_diff"] < 1e-4 * abs(impls["gist_jax"]["first_step_loss"])
    assert train["speedup_vs_transformers"] > 0
    assert impls["gist_jax"]["compile_s"] > 0
    assert impls["gist_jax"]["xla_cost_analysis"]["flops"] > 0
    assert 0 < impls["gist_jax"]["output_positions_computed"] <= train["tokens_per_step"]
    for e in impls.values():
        assert e["tokens_per_s"] > 0
        assert set(e["breakdown_s"]) == {"forward", "backward", "optimizer_and_rest"}
        # The peak product was timed again between the steps, once per repetition.
        assert e["mfu_same_minutes"] > 0
    same = train["peak_same_minutes"]
    assert len(same["timing"]["samples_s"]) == train["reps"]
    assert same["flops_per_call"] == results[0]["peak"]["matmul"]["flops_per_call"]


def test_decoding_generates_the_requested_tokens(results: tuple[dict, pathlib.Path]) -> None:
    dec = results[0]["decode"]
    for batch, e in dec["batches"].items():
        for name in ("gist_jax", "transformers"):
            assert e[name]["generated_tokens"] == int(batch) * dec["new_tokens"]
        # Same weights and greedy: the first tokens agree.
        assert e["agreement"]["mean_common_prefix_tokens"] >= 1
    assert dec["batches"]["1"]["bandwidth_bound_tokens_per_s"] > 0


def test_gist_caching_runs_fewer_tokens_and_flops(results: tuple[dict, pathlib.Path]) -> None:
    gist = results[0]["gist"]
    cond = gist["conditions"]
    assert cond["gist_caching"]["tokens_run"] < cond["no_caching"]["tokens_run"]
    assert cond["gist_caching"]["flops"] < cond["no_caching"]["flops"]
    assert cond["gist_caching"]["flops_reduction_vs_no_caching"] > 0
    assert (
        cond["gist_caching"]["cache_bytes_per_prompt"]
        < cond["instruction_caching"]["cache_bytes_per_prompt"]
    )
    assert gist["mean_compression_ratio"] > 1


def test_scaling_sweeps_and_packing(results: tuple[dict, pathlib.Path]) -> None:
    sc = results[0]["scaling"]
    assert set(sc["sequence_length"]["results"]) == {"32", "64"}
    packing = sc["packing"]["results"]
    assert packing["packed"]["useful_tokens"] > packing["padded"]["useful_tokens"]
    useful_fraction = {k: v["useful_tokens"] / v["tokens"] for k, v in packing.items()}
    assert useful_fraction["packed"] > useful_fraction["padded"]
    for name in ("gist_jax", "transformers"):
        assert sc["packing"][f"{name}_packed_over_padded"] > 0


def test_unknown_measurement_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown measurement"):
        BenchOptions(only=("train", "nope"))


def test_profile_attributes_time_to_model_ops(tmp_path: pathlib.Path) -> None:
    # A fresh process: the per-op trace flag is read when XLA's CPU backend starts.
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "benchmarks.profile",
        "--what=train",
        "--model=tiny",
        "--batch=2",
        "--length=32",
        "--runs=1",
        "--top=200",
        f"--out={tmp_path}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| ms per")]
    ops = " ".join(rows)
    # Forward and backward (transposed) products of the MLP, attributed by layer-folded name.
    assert "layers_N/mlp/up_proj" in ops and "transpose(jvp(" in ops, done.stdout[-3000:]
    assert any(float(r.split("|")[1]) > 0 for r in rows)
    # The phase summary: forward, backward and the optimizer's cond all took traced time.
    summary = next(line for line in lines if line.startswith("traced ms per run by phase"))
    phases = dict(part.strip().rsplit(" ", 1) for part in summary.split(": ", 1)[1].split(", "))
    assert set(phases) == {"forward", "backward", "optimizer", "other"}
    assert all(float(phases[name]) > 0 for name in ("forward", "backward", "optimizer")), summary
