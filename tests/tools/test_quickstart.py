"""The quickstart pipeline end to end on a tiny random-init LLaMA (the same code path as
``python -m gist_tools.quickstart`` with the bundled model, minus the conversion): three
short training runs (gist and the paper's two controls, each with its own mask), generation
on two synthetic splits under each model's condition (gist through compressed decoding),
the merged report, and the Hugging Face export reloaded with ``transformers``."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from benchmarks import replication
from gist_jax import evaluate, gap, gist, train_config
from gist_jax.convert import loading
from gist_jax.models import llama
from gist_jax.train.metrics_log import read_metrics
from gist_tools import quickstart

REPO = pathlib.Path(__file__).resolve().parents[2]
SPLITS = ("validation_seen", "validation_unseen")
N = 4


def _tiny_llama() -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("tiny_llama", REPO / "configs" / "tiny_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_config() -> ml_collections.ConfigDict:
    """The quickstart config with configs/tiny_llama.py's model and a few steps."""
    c = quickstart.default_config()
    c.data.source = "synthetic"  # version 1: the tiny tokenizer's test suite
    c.data.num_gist_tokens = 1
    c.eval.splits = SPLITS
    tiny = _tiny_llama()
    c.model.checkpoint = train_config.RANDOM_INIT
    c.model.tokenizer = tiny.model.tokenizer
    c.model.init = tiny.model.init
    c.model.scan_layers = False
    c.data.max_length = 64
    c.data.bucket_multiple = 64
    c.data.num_train_examples = 200
    c.train.steps = 3
    c.train.batch_size = 8  # divisible by the 8 test devices (fsdp)
    c.train.lr = 3e-3
    c.train.warmup = 1
    c.train.log_every = 1
    c.eval.num_examples = N
    c.eval.batch_size = 8  # training checks it against the 8 devices too
    c.eval.max_new_tokens = 6
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("quickstart") / "run"
    config = tiny_config()
    result = quickstart.quickstart(config, workdir, progress=False)
    return config, workdir, result


def test_three_models_each_trained_with_its_mask(trained):
    _, workdir, result = trained
    assert list(result.train_dirs) == list(gist.CONDITIONS)
    first_losses = []
    for condition, run_dir in result.train_dirs.items():
        assert run_dir == workdir / condition
        records = read_metrics(run_dir)
        assert [r["step"] for r in records] == [1, 2, 3], condition
        first_losses.append(records[0]["loss"])
        assert (run_dir / "export" / "model_config.json").is_file()
    # Same init, same first batch: only the mask differs, so the first losses must too.
    print("first-step losses (gist, pos, neg):", first_losses)
    assert len({round(x, 6) for x in first_losses}) == 3, first_losses


def test_report_has_every_split_and_condition(trained):
    _, workdir, result = trained
    assert list(result.metrics) == list(SPLITS)
    for by_condition in result.metrics.values():
        assert list(by_condition) == list(gist.CONDITIONS)
        for scores in by_condition.values():
            assert scores["n"] == N and 0 <= scores["rougeL"] <= 100
    out = result.results_dir
    assert out == workdir / quickstart.RESULTS_DIR
    assert json.loads((out / "metrics.json").read_text()) == result.metrics
    for name in ("rouge_l.png", "compression.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    predictions = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == len(SPLITS) * len(gist.CONDITIONS) * N
    assert "| neg_control |" in result.table and "gist cache bytes" in result.table
    for split in SPLITS:
        c = result.compression[split]
        assert c["num_gist_tokens"] == 1 and c["mean_prompt_tokens"] > 1
        assert c["gist_cache_bytes_per_prompt"] < c["prompt_cache_bytes_per_prompt"]
    summary = json.loads((workdir / quickstart.SUMMARY_FILE).read_text())
    assert summary["metrics"] == result.metrics
    assert set(summary["seconds"]) >= {"train_gist", "evaluate", "export_hf", "total"}


def test_each_condition_is_scored_on_its_own_model(trained):
    """The merged table's pos_control / neg_control rows are those models' own scores (and
    the gist row the gist model's, decoded through compression)."""
    config, _, result = trained
    splits = evaluate.load_splits(config)
    settings = evaluate.settings_from_config(config)
    for condition, run_dir in result.train_dirs.items():
        model_config, params, tokenizer = loading.load_checkpoint(run_dir / "export")
        settings["conditions"] = (condition,)
        report = evaluate.evaluate(model_config, params, tokenizer, splits, **settings)
        for split in SPLITS:
            assert report.metrics[split][condition] == result.metrics[split][condition]


def test_exports_honour_the_umask(trained):
    """The HF export (a temporary directory renamed into place, safetensors written 0600)
    and the run's own export get the modes the umask gives every other output."""
    import os

    _, _, result = trained
    umask = os.umask(0)
    os.umask(umask)
    assert (result.export_hf / "model.safetensors").is_file()
    for root in (result.export_hf, result.train_dirs["gist"] / "export"):
        for path in [root, *root.rglob("*")]:
            expected = (0o777 if path.is_dir() else 0o666) & ~umask
            assert path.stat().st_mode & 0o777 == expected, (path, oct(path.stat().st_mode))


def test_disk_line_names_what_can_be_deleted(trained):
    _, workdir, result = trained
    line = quickstart.disk_line(workdir, result.train_dirs)
    for condition in gist.CONDITIONS:
        assert f"{condition}/checkpoints" in line
    assert line.startswith(f"disk: {workdir} holds ") and "can be deleted" in line


def test_hf_export_reloads_with_transformers(trained):
    """The exported directory is the trained gist model: transformers loads it without
    missing keys and, with the gist adapter applied (``hf_gist_cache``), reproduces gist_jax's
    logits under the gist mask."""
    import torch
    from fixtures_llama import torch_logits
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gist_tools import hf_gist_cache

    _, _, result = trained
    config, params, tokenizer = loading.load_checkpoint(result.train_dirs["gist"] / "export")
    # The export's float32 weights against transformers', computed in float32 (the run
    # itself computed in the quickstart's bfloat16).
    assert config.dtype == "bfloat16"
    config = dataclasses.replace(config, dtype="float32")
    hf_tok = AutoTokenizer.from_pretrained(result.export_hf)
    assert hf_tok.convert_tokens_to_ids("<GIST>") == config.gist_token_id
    model, info = AutoModelForCausalLM.from_pretrained(
        result.export_hf, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model.eval()

    from gist_jax import data

    examples = data.load_examples("synthetic", "validation_unseen", num_examples=3)[0]
    encoded, _ = data.encode_decoder_examples(examples, tokenizer, 1, 64)
    rows = [np.concatenate([e.prompt, e.completion]) for e in encoded]
    length = max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), np.int32)
    positions = np.full((len(rows), length), -1, np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        positions[i, : len(r)] = np.arange(len(r))
    first, last = gist.gist_spans(np.where(positions >= 0, ids, -1), config.gist_token_id)
    assert (first >= 0).all()
    mask = np.asarray(gist.decoder_self_mask(positions, positions, first, last, "gist"))
    ours = np.asarray(llama.build_model(config).apply({"params": params}, ids, positions, mask)[0])
    assert config.gist_adapter_rank  # the quickstart's: hf_gist_cache applies it
    with hf_gist_cache.gist_adapter_at(model, torch.as_tensor(ids), config.gist_token_id):
        theirs = torch_logits(model, ids, positions, bool_mask=mask)
    valid = positions >= 0
    diff = np.abs(ours[valid] - theirs[valid]).max()
    print(f"exported model vs gist_jax, gist mask: max abs logit diff {diff:.2e}")
    assert diff < 1e-4


def test_masked_controls_reuse_the_trained_gist_model(trained):
    """controls="masked" on the same workdir: the finished gist run is reused (no new
    steps), and all three conditions are decoded from that one model; its gist scores are
    the trained run's."""
    _, workdir, first = trained
    masked = tiny_config()
    masked.quickstart.controls = "masked"
    masked.quickstart.export_hf = False
    result = quickstart.quickstart(masked, workdir, progress=False)
    assert list(result.train_dirs) == ["gist"]
    assert [r["step"] for r in read_metrics(workdir / "gist")] == [1, 2, 3]
    for split in SPLITS:
        assert list(result.metrics[split]) == list(gist.CONDITIONS)
        assert result.metrics[split]["gist"] == first.metrics[split]["gist"]


def test_gist_model_distils_from_the_runs_own_pos_control(trained, tmp_path):
    """quickstart.teacher=pos_control: the pos_control model is trained first (here: the
    finished one, reused) and the gist model distils from its export; the controls keep
    the plain LM objective."""
    _, workdir, _ = trained
    run = tmp_path / "distill"
    run.mkdir()
    shutil.copytree(workdir / "pos_control", run / "pos_control")
    config = tiny_config()
    config.train.objective = "mix"
    config.quickstart.teacher = "pos_control"
    config.quickstart.controls = "trained"
    config.quickstart.export_hf = False
    config.eval.conditions = ("gist", "pos_control")
    assert list(quickstart.training_configs(config))[:2] == ["pos_control", "gist"]
    assert quickstart.training_configs(config)["neg_control"].train.objective == "lm"
    result = quickstart.quickstart(config, run, progress=False)
    records = read_metrics(run / "gist", "train")
    assert all(r["kl"] > 0 and r["lm_loss"] > 0 for r in records)
    assert [r["step"] for r in read_metrics(run / "pos_control", "train")] == [1, 2, 3]
    summary = json.loads((run / quickstart.SUMMARY_FILE).read_text())
    assert summary["config"]["quickstart"]["teacher"] == "pos_control"
    assert set(result.metrics[SPLITS[0]]) == {"gist", "pos_control"}


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("quickstart.controls", "both", "quickstart.controls='both'"),
        ("quickstart.control_steps", -1, "quickstart.control_steps=-1"),
        ("data.num_gist_tokens", 0, "data.num_gist_tokens=0"),
        ("data.condition", "pos_control", "data.condition='pos_control'"),
        ("train.lr", 0.0, "train.lr=0.0"),
        ("quickstart.teacher", "base", "quickstart.teacher='base'"),
        ("quickstart.teacher", "pos_control", "needs train.objective"),
    ],
)
def test_bad_config_fails_before_any_work(tmp_path, key, value, message):
    config = tiny_config()
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(train_config.ConfigError, match=message.replace("(", r"\(")):
        quickstart.quickstart(config, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_gap_recovered():
    def m(pos, g, neg):
        return {
            "s": {
                "pos_control": {"rougeL": pos},
                "gist": {"rougeL": g},
                "neg_control": {"rougeL": neg},
            }
        }

    assert gap.gap_recovered(m(60.0, 50.0, 20.0), "s") == pytest.approx(75.0)
    assert gap.gap_recovered(m(60.0, 65.0, 20.0), "s") == pytest.approx(112.5)
    assert np.isnan(gap.gap_recovered(m(29.2, 25.1, 28.6), "s"))  # controls tie


def test_cli_requires_workdir():
    proc = subprocess.run(
        [sys.executable, "-m", "gist_tools.quickstart"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "--workdir is required" in proc.stderr


def test_default_config_is_the_documented_one():
    c = quickstart.default_config()
    train_config.validate(c)
    quickstart.check_config(c)
    assert c.model.checkpoint == train_config.DEFAULT_MODEL and c.data.source == "synthetic_v3"
    assert c.data.num_gist_tokens == 2 and c.quickstart.controls == "trained"
    assert c.model.gist_adapter_rank == 32 and c.train.lr_scales == "gist_adapter=10"
    assert c.model.dtype == "bfloat16"
    assert tuple(c.eval.splits) == ("validation_seen", "validation_recombined", "validation_unseen")
    assert c.eval.num_examples >= 200  # the minimum per split
    spec = importlib.util.spec_from_file_location("qs", REPO / "configs" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.get_config().to_dict() == c.to_dict()
    assert jax.device_count() == 8  # conftest's forced devices: training runs on a real mesh


def test_replication_report_over_k(trained, tmp_path):
    """The replication pipeline on the tiny config: a k=2 gist-only run beside the k=1 run
    with trained controls, combined into the paper-format table, gap shares and plots."""
    _, workdir, first = trained
    k2 = tiny_config()
    k2.data.num_gist_tokens = 2
    k2.quickstart.controls = "masked"
    k2.quickstart.export_hf = False
    k2.eval.conditions = ("gist",)
    second = quickstart.quickstart(k2, tmp_path / "k2", progress=False)
    assert list(second.train_dirs) == ["gist"]

    out = tmp_path / "report"
    text = replication.write_report(
        replication.parse_runs([f"k1={workdir}", f"k2={tmp_path / 'k2'}"]), out
    )
    saved = json.loads((out / "results.json").read_text())
    for split in SPLITS:
        rows = saved["table"][split]
        assert list(rows) == ["pos_control", "gist (k=1)", "gist (k=2)", "neg_control"]
        assert rows["gist (k=1)"] == first.metrics[split]["gist"]
        assert rows["gist (k=2)"] == second.metrics[split]["gist"]
        assert rows["neg_control"] == first.metrics[split]["neg_control"]
    assert "| gist (k=2) |" in text and (out / "table.md").read_text() == text
    for name in ("training_curves.png", "rouge_l.png", "gap_vs_minutes.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Gap shares with paired intervals for every gist row, against the first run's controls.
    for split in SPLITS:
        for row in ("gist (k=1)", "gist (k=2)"):
            assert set(saved["gap_intervals"][split][row]) == {"rougeL", "exact_match"}
    assert "| gap recovered, ROUGE-L [95% CI] / EM [95% CI] |" in text

    # Paired differences are over the same examples, so their mean is the difference of
    # the table's means; each run's own files are copied beside the report.
    paired = saved["paired_rougeL_vs_neg_control"]
    for split in SPLITS:
        rows = saved["table"][split]
        for row in ("pos_control", "gist (k=1)", "gist (k=2)"):
            d = paired[split][f"{row} - neg_control"]
            assert d["n"] == rows[row]["n"]
            want = rows[row]["rougeL"] - rows["neg_control"]["rougeL"]
            assert d["mean"] == pytest.approx(want, abs=1e-6)
    assert "| gist (k=2) - neg_control |" in text
    for label, run_dir in (("k1", workdir), ("k2", tmp_path / "k2")):
        for source, name in replication.RUN_FILES:
            assert (out / label / name).read_bytes() == (
                pathlib.Path(run_dir) / source
            ).read_bytes()
    with pytest.raises(ValueError, match="LABEL=WORKDIR"):
        replication.parse_runs(["k1"])
    with pytest.raises(FileNotFoundError, match="not a finished quickstart workdir"):
        replication.load_run(tmp_path / "missing")


def test_paired_differences():
    """Per-example ROUGE-L differences against neg_control on the same examples: exact
    answers score 100, disjoint ones 0, so the differences here are known."""

    def rows(split, condition, predictions):
        refs = ["red green", "blue sky", "tall tree"]
        return [
            {"split": split, "condition": condition, "instruction": f"i{i}", "input": "x",
             "reference": ref, "prediction": pred}
            for i, (ref, pred) in enumerate(zip(refs, predictions, strict=True))
        ]  # fmt: skip

    right, wrong = ["red green", "blue sky", "tall tree"], ["zzz", "zzz", "zzz"]
    k1 = {
        "predictions": {
            ("s", "neg_control"): rows("s", "neg_control", wrong),
            ("s", "pos_control"): rows("s", "pos_control", right),
            ("s", "gist"): rows("s", "gist", ["red green", "zzz", "zzz"]),
        }
    }
    k2 = {"predictions": {("s", "gist"): rows("s", "gist", ["zzz", "blue sky", "tall tree"])}}
    paired = replication.paired_differences({"k=1": k1, "k=2": k2})["s"]
    assert paired["pos_control - neg_control"] == {"mean": 100.0, "se": 0.0, "n": 3}
    gist1 = paired["gist (k=1) - neg_control"]
    assert gist1["mean"] == pytest.approx(100 / 3)
    assert gist1["se"] == pytest.approx(np.std([100, 0, 0], ddof=1) / np.sqrt(3))
    assert paired["gist (k=2) - neg_control"]["mean"] == pytest.approx(200 / 3)
    assert "| gist (k=2) - neg_control | 66.7 +- 33.3 |" in replication.paired_markdown(
        {"s": paired}
    )

    k2["predictions"][("s", "gist")][1]["input"] = "another input"
    with pytest.raises(ValueError, match="s: gist \\(k=2\\) and neg_control were not evaluated"):
        replication.paired_differences({"k=1": k1, "k=2": k2})


def test_gap_share_format():
    assert gap.format_share(-0.4) == "0%"
    assert gap.format_share(-25.6) == "-26%"
    assert gap.format_share(74.5) == "74%"  # round half to even
    assert gap.format_share(float("nan")) == "n/a"


def test_replication_gap_share():
    rows = {
        "pos_control": {"rougeL": 60.0},
        "gist (k=1)": {"rougeL": 50.0},
        "neg_control": {"rougeL": 20.0},
    }
    assert replication.gap_recovered(rows, "gist (k=1)") == pytest.approx(75.0)
    assert np.isnan(replication.gap_recovered({"gist (k=1)": {"rougeL": 1.0}}, "gist (k=1)"))
