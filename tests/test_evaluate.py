"""Evaluation end to end on the tiny configs: metrics structure and files, scores that
match the written predictions, the gist condition decoded through compression (and equal
to the full gist-masked decode), T5, and the ``python -m gist_jax.evaluate`` command on a
workdir with a checkpoint."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
from unittest import mock

import jax
import pytest

from gist_jax import evaluate, gist, metrics, model_loading, train
from gist_jax.inference import decode, gist_cache

REPO = pathlib.Path(__file__).resolve().parents[1]
SPLITS = ("validation_seen", "validation_unseen")
N = 6
SETTINGS = dict(num_gist=1, max_prompt_length=64, max_new_tokens=8, batch_size=4)


def _config(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.fixture(scope="module")
def tiny_llama():
    config = _config("tiny_llama")
    loaded = model_loading.load_model(config)
    params = loaded.family.init_params(loaded.config, jax.random.key(0))
    return config, loaded, params


@pytest.fixture(scope="module")
def llama_eval(tiny_llama, tmp_path_factory):
    config, loaded, params = tiny_llama
    splits = evaluate.load_splits(config, SPLITS, N)
    out = tmp_path_factory.mktemp("eval") / "eval" / "7"
    with mock.patch.object(gist_cache, "compress", wraps=gist_cache.compress) as spy:
        result = evaluate.evaluate(
            loaded.config, params, loaded.tokenizer, splits, out_dir=out, step=7, **SETTINGS
        ).metrics
    return result, out, splits, spy.call_count


def test_metrics_structure_and_files(llama_eval):
    result, out, _, _ = llama_eval
    assert list(result) == list(SPLITS)
    for by_condition in result.values():
        assert list(by_condition) == list(gist.CONDITIONS)
        for values in by_condition.values():
            assert set(values) == {"rougeL", "exact_match", "n"}
            assert values["n"] == N and 0 <= values["rougeL"] <= 100
    for name in ("metrics.json", "predictions.jsonl", "compression.json", "run.json", "results.md"):
        assert (out / name).is_file(), name
    for name in ("rouge_l.png", "compression.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "metrics.json").read_text()) == result
    table = (out / "results.md").read_text()
    assert "| gist |" in table and "validation_unseen ROUGE-L" in table
    run = json.loads((out / "run.json").read_text())
    assert run["step"] == 7 and run["settings"]["max_new_tokens"] == 8
    print("compilations:", run["compilations"])
    assert not list(out.glob(".*.tmp"))


def test_scores_match_predictions(llama_eval):
    result, out, splits, _ = llama_eval
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == len(SPLITS) * len(gist.CONDITIONS) * N
    for split in SPLITS:
        for condition in gist.CONDITIONS:
            rows = [r for r in lines if r["split"] == split and r["condition"] == condition]
            assert [r["reference"] for r in rows] == [ex["output"] for ex in splits[split]]
            preds = [r["prediction"] for r in rows]
            refs = [r["reference"] for r in rows]
            assert result[split][condition]["rougeL"] == pytest.approx(metrics.rouge_l(preds, refs))
            assert result[split][condition]["exact_match"] == metrics.exact_match(preds, refs)


def test_gist_condition_decodes_through_compression(tiny_llama, llama_eval):
    _, loaded, params = tiny_llama
    _, out, splits, compress_calls = llama_eval
    assert compress_calls == len(SPLITS)  # once per split, only for the gist condition
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    split = evaluate.encode_split(
        loaded.config, loaded.tokenizer, splits["validation_seen"], 1, SETTINGS["max_prompt_length"]
    )
    full = decode.generate(
        loaded.config,
        params,
        split.prompts,
        max_new_tokens=SETTINGS["max_new_tokens"],
        batch_size=SETTINGS["batch_size"],
    )
    texts = [loaded.tokenizer.decode(g.tokens, skip_special_tokens=True).strip() for g in full]
    got = [
        r["prediction"]
        for r in lines
        if r["split"] == "validation_seen" and r["condition"] == "gist"
    ]
    assert got == texts
    compression = json.loads((out / "compression.json").read_text())["validation_seen"]
    assert compression["num_gist_tokens"] == 1
    assert compression["mean_prompt_tokens"] > 5
    cfg = loaded.config
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    assert compression["gist_cache_bytes_per_prompt"] == per_token
    assert compression["prompt_cache_bytes_per_prompt"] == pytest.approx(
        per_token * compression["mean_prompt_tokens"]
    )


def test_t5_evaluate(tmp_path):
    config = _config("tiny_t5")
    loaded = model_loading.load_model(config)
    params = loaded.family.init_params(loaded.config, jax.random.key(0))
    splits = evaluate.load_splits(config, ["validation_unseen"], 4)
    settings = evaluate.settings_from_config(config)
    assert settings["max_new_tokens"] == config.data.max_target_length
    assert settings["max_prompt_length"] == config.data.max_source_length
    result = evaluate.evaluate(
        loaded.config,
        params,
        loaded.tokenizer,
        splits,
        ("gist",),
        num_gist=1,
        max_prompt_length=64,
        max_new_tokens=6,
        batch_size=4,
        out_dir=tmp_path,
    ).metrics
    assert set(result["validation_unseen"]) == {"gist"}
    assert result["validation_unseen"]["gist"]["n"] == 4
    run = json.loads((tmp_path / "run.json").read_text())
    assert set(run["compilations"]) <= {"t5_compress", "t5_generate"}
    assert (tmp_path / "rouge_l.png").is_file()


@pytest.mark.slow
def test_training_hook_and_command_line(tmp_path):
    """Train the tiny LLaMA for two steps with the evaluation hook (it writes
    ``WORKDIR/eval/2``), then evaluate the checkpoint with ``python -m gist_jax.evaluate``."""
    from gist_jax import checkpoint as ckpt_lib
    from gist_jax import sharding

    config = _config("tiny_llama")
    config.train.steps = 2
    config.train.checkpoint_every = 0
    config.train.eval_every = 0  # evaluate once, at the end
    config.train.export = False
    config.train.async_checkpoint = False
    config.data.num_train_examples = 64
    config.eval.splits = ("validation_seen",)
    config.eval.num_examples = 4
    config.eval.max_new_tokens = 6
    workdir = tmp_path / "run"
    result = train.train_and_evaluate(
        config, workdir, eval_hooks=[evaluate.make_train_hook(config)], progress_bar=False
    )
    assert result.step == 2
    for condition in gist.CONDITIONS:
        assert 0 <= result.last_eval[f"validation_seen/{condition}/rougeL"] <= 100
    hook_metrics = json.loads((workdir / "eval" / "2" / "metrics.json").read_text())
    assert hook_metrics["validation_seen"]["gist"]["n"] == 4
    assert json.loads((workdir / "eval" / "2" / "run.json").read_text())["step"] == 2

    # The library half of the command: restore a step, and a clear error for a missing one.
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, jax.devices()[:1])
    _, params, step = model_loading.load_params(config, workdir, None, mesh)
    assert step == 2 and "lm_head" in params
    # Only the params are read: what the checkpoint holds besides them is never restored.
    assert set(params) == set(
        model_loading.load_model(config).family.abstract_params(
            model_loading.load_model(config).config
        )
    )
    with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint for step 9"):
        model_loading.load_params(config, workdir, 9, mesh)

    out = workdir / "eval" / "2"
    for path in out.iterdir():
        path.unlink()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    env["JAX_COMPILATION_CACHE_DIR"] = str(REPO / ".cache" / "jax")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gist_jax.evaluate",
            f"--config={REPO / 'configs' / 'tiny_llama.py'}",
            f"--workdir={workdir}",
            "--checkpoint_step=2",
            "--splits=validation_seen",
            "--num_examples=3",
            "--max_new_tokens=4",
            "--conditions=gist,neg_control",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "metrics.json").read_text())
    assert set(result["validation_seen"]) == {"gist", "neg_control"}
    assert result["validation_seen"]["gist"]["n"] == 3
    assert "| gist |" in proc.stdout
