"""Bad input that ``docs/bad_input.md`` lists and no other test file covers: each gives a
clear error (or documented, counted handling) and leaves no half-written output behind.

Rows already tested elsewhere are referenced from the table; this file holds the rest:
training-start validation that must write nothing, data problems as a training run sees
them (counted skips and truncation; a malformed file named by line), user text spelling
``<GIST>`` against the mask, truncated or mismatched safetensors, and exports that fail
or are killed part-way (the output directory never looks complete).
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from fixtures_train import REPO, quick_config

from gist_jax import data, gist, model_loading, tiny_tokenizer, train, train_config
from gist_jax import sharding as shd
from gist_jax.convert import common
from gist_jax.convert.common import ConversionError
from gist_jax.convert.from_hf import convert_from_hf
from gist_jax.convert.to_hf import convert_to_hf
from gist_jax.data import tokenize
from gist_jax.data.alpaca import DataFormatError
from gist_jax.train import pipeline


def _siblings(path: pathlib.Path) -> list[str]:
    """Entries next to ``path`` whose name starts with ``.NAME`` (temporary directories)."""
    if not path.parent.is_dir():
        return []
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}"))


# ---------------------------------------------------------------------------------------
# Training start-up: rejected before anything is written


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (
            {"train__lr": 0.0},
            train_config.ConfigError,
            r"train.lr=0.0: the learning rate must be > 0",
        ),
        ({"train__lr": -3e-4}, train_config.ConfigError, r"train.lr=-0.0003: the learning rate"),
        ({"train__lr": float("inf")}, train_config.ConfigError, r"train.lr=inf: .*finite"),
        (
            {"mesh__data": 1, "mesh__fsdp": 3, "mesh__tensor": 1},
            shd.MeshError,
            r"\(data=1, fsdp=3, tensor=1\) has 3 devices but 8",
        ),
        ({"mesh__fsdp": -1, "mesh__tensor": 3}, shd.MeshError, "does not divide the 8 devices"),
        ({"mesh__data": 0}, train_config.ConfigError, r"mesh.data=0: must be a positive size"),
        (
            {"train__max_nonfinite_steps": 0},
            train_config.ConfigError,
            r"train.max_nonfinite_steps=0: must be >= 1",
        ),
    ],
    ids=[
        "lr_zero",
        "lr_negative",
        "lr_inf",
        "mesh_product",
        "mesh_divide",
        "mesh_zero",
        "nonfinite",
    ],
)
def test_start_up_errors_write_nothing(tmp_path, overrides, error, message):
    workdir = tmp_path / "run"
    with pytest.raises(error, match=message):
        train.train_and_evaluate(quick_config(**overrides), workdir, progress_bar=False)
    assert not workdir.exists()


def test_unknown_config_key_is_an_error():
    # The locked config refuses keys it does not have (the CLI path is tested in test_train).
    with pytest.raises(KeyError, match="max_nonfinite_stepz"):
        quick_config(train__max_nonfinite_stepz=1)


# ---------------------------------------------------------------------------------------
# Data as a training run sees it

GOOD = {"instruction": "Repeat the word.", "input": "apple", "output": "apple"}
LONG = {"instruction": "Count the words.", "input": " ".join(["pear"] * 200), "output": "200"}
# User text that spells the gist token; it must stay ordinary text.
SNEAKY = {"instruction": "Say <GIST> twice.", "input": "<GIST><GIST>", "output": "<GIST> <GIST>"}


def _write_split(root: pathlib.Path, split: str, records: list[dict]) -> pathlib.Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"alpaca_plus_{split}.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def _data_config(source: pathlib.Path, **overrides):
    return quick_config(
        data__source=str(source),
        data__num_train_examples=-1,
        data__max_length=64,
        train__batch_size=2,
        eval__batch_size=2,
        eval__num_examples=-1,
        **overrides,
    )


def test_training_start_reports_skipped_and_truncated_examples(tmp_path):
    records = [GOOD] * 6 + [
        {"instruction": " ", "input": "x", "output": "y"},
        {"instruction": "Do it.", "input": "", "output": ""},
        LONG,
        SNEAKY,
    ]
    _write_split(tmp_path / "data", "train", records)
    _write_split(tmp_path / "data", "validation_seen", [GOOD, GOOD])
    config = _data_config(tmp_path / "data")
    loaded = model_loading.load_model(config)
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    setup = pipeline.build_data(config, loaded, mesh)
    reports = "\n".join(setup.reports)
    assert "alpaca_plus_train.json: loaded 10, kept 8, dropped 2 " in reports, reports
    assert "(empty instruction 1, empty output 1)" in reports, reports
    # The long example is cut (input first), not dropped; nothing else is touched.
    assert "train: 8 examples: kept 8, truncated 1 (input 1, instruction 0, completion 0)" in (
        reports
    ), reports


def test_gist_text_in_user_fields_cannot_change_the_mask():
    tokenizer = tiny_tokenizer.synthetic_bpe(512)
    gist_id = tokenize.gist_token_id_of(tokenizer)
    for k in (1, 2):
        encoded, _ = data.encode_decoder_examples([SNEAKY, GOOD], tokenizer, k, 64)
        batch = data.collate_decoder([[ex] for ex in encoded], 64, tokenizer.pad_token_id)
        ids = batch["input_ids"]
        # Exactly k gist tokens per example, where the template put them.
        assert (ids == gist_id).sum(axis=1).tolist() == [k, k]
        # The mask the train step builds from spans equals the dense mask from token ids,
        # which would change (or fail) if user text had produced a gist token.
        pos, seg = batch["positions"], batch["segment_ids"]
        from_spans = gist.decoder_self_mask(
            pos, pos, batch["gist_first"], batch["gist_last"], "gist", seg, seg
        )
        causal = np.tril(np.ones((ids.shape[1], ids.shape[1]), bool))
        from_ids = np.asarray(gist.make_gist_mask(ids, gist_id, tokenizer.pad_token_id)) & causal
        real = pos >= 0  # padding query rows are never used
        np.testing.assert_array_equal(np.asarray(from_spans)[:, 0][real], from_ids[:, 0][real])
        # The user's "<GIST>" text survives as ordinary tokens in the completion.
        assert tokenizer.decode(encoded[0].completion.tolist()).strip() == "<GIST> <GIST></s>"
    # The comparison would catch a leak: a gist id inside the user text breaks the span.
    leaked = ids.copy()
    leaked[0, 3] = gist_id
    with pytest.raises(ValueError, match="contiguous"):
        gist.make_gist_mask(leaked, gist_id, tokenizer.pad_token_id)


def test_malformed_data_file_stops_training_start_without_checkpoints(tmp_path):
    path = _write_split(tmp_path / "data", "train", [GOOD] * 4)
    path.write_text(path.read_text().replace('"apple"', "apple", 1))  # bare word: bad JSON
    _write_split(tmp_path / "data", "validation_seen", [GOOD])
    workdir = tmp_path / "run"
    with pytest.raises(DataFormatError, match=r"alpaca_plus_train.json: line \d+ column \d+"):
        train.train_and_evaluate(
            _data_config(tmp_path / "data"), workdir, devices=jax.devices()[:1], progress_bar=False
        )
    # Nothing that looks like a run: no checkpoint, no metrics, no export.
    for name in ("checkpoints", "metrics.jsonl", "export", "model_config.json"):
        assert not (workdir / name).exists(), name


# ---------------------------------------------------------------------------------------
# HF directories and exports


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> pathlib.Path:
    import fixtures_llama as fx

    model = fx.make_hf_model("mha_untied")
    return fx.save_hf_dir(model, tmp_path_factory.mktemp("hf") / "hf")


def _copy_dir(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_safetensors_is_named_and_nothing_is_written(hf_dir, tmp_path):
    broken = _copy_dir(hf_dir, tmp_path / "hf")
    weights = broken / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"model\.safetensors: cannot read safetensors file"):
        convert_from_hf(broken, out)
    assert not out.exists() and _siblings(out) == []


def test_safetensors_that_do_not_match_the_config_write_nothing(hf_dir, tmp_path):
    broken = _copy_dir(hf_dir, tmp_path / "hf")
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"mlp.*has shape \(96, 64\), expected \(80, 64\)"):
        convert_from_hf(broken, out)
    assert not out.exists() and _siblings(out) == []


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory) -> pathlib.Path:
    return convert_from_hf(hf_dir, tmp_path_factory.mktemp("ckpt") / "ckpt")


def test_failed_export_leaves_no_directory_and_keeps_the_old_one(converted, tmp_path, monkeypatch):
    out = tmp_path / "hf_out"
    real_write = common.write_safetensors

    def disk_full(tensors, path):
        real_write(dict(list(tensors.items())[:2]), path)  # part of the weights...
        raise OSError("No space left on device")  # ...then the disk fills up

    with monkeypatch.context() as m:
        m.setattr(common, "write_safetensors", disk_full)
        with pytest.raises(OSError, match="No space left"):
            convert_to_hf(converted, out)
    assert not out.exists() and _siblings(out) == []

    # Replacing an existing export: a failure leaves the old one complete and untouched.
    convert_to_hf(converted, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with monkeypatch.context() as m:
        m.setattr(common, "write_safetensors", disk_full)
        with pytest.raises(OSError, match="No space left"):
            convert_to_hf(converted, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _siblings(out) == []


def _killed(function: str, call: str) -> subprocess.CompletedProcess:
    """Run ``call`` in a fresh process whose ``common.<function>`` does its work and then
    SIGKILLs the process: a real crash in the middle of writing an export."""
    script = "\n".join(
        [
            "import os, signal",
            "from gist_jax.convert import common",
            f"real = common.{function}",
            "def write_then_die(*args, **kwargs):",
            "    real(*args, **kwargs)",
            "    os.kill(os.getpid(), signal.SIGKILL)",
            f"common.{function} = write_then_die",
            call,
        ]
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_killed_exports_never_look_complete(converted, tmp_path):
    # to_hf: killed right after the weights were written (tokenizer and rename not done).
    out = tmp_path / "hf_out"
    result = _killed(
        "write_safetensors",
        f"from gist_jax.convert.to_hf import convert_to_hf; convert_to_hf({str(converted)!r}, {str(out)!r})",
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert not out.exists()
    # The next export succeeds and is complete.
    convert_to_hf(converted, out)
    assert {"config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}

    # The training run's final export (common.export_model) replacing an earlier
    # export, killed after the new params were saved: the old export stays complete.
    from gist_jax.convert import loading

    export = tmp_path / "export"
    config, params, tokenizer = loading.load_checkpoint(converted)
    common.export_model(export, params, config.to_dict(), tokenizer)
    (export / "written_first").write_text("the earlier export")  # tells the two apart
    before = sorted(str(p.relative_to(export)) for p in export.rglob("*"))
    call = "\n".join(
        [
            "from gist_jax.convert import common, loading",
            f"config, params, tokenizer = loading.load_checkpoint({str(converted)!r})",
            f"common.export_model({str(export)!r}, params, config.to_dict(), tokenizer)",
        ]
    )
    result = _killed("save_params", call)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert sorted(str(p.relative_to(export)) for p in export.rglob("*")) == before
    loading.load_checkpoint(export)
