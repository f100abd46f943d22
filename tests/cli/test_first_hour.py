"""What a new user sees in the first hour: no advice about a missing PyTorch on the
torch-free path, and one line (no traceback) for a mistake on the command line."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter where importlib cannot find torch (as on the README's
# torch-free install), then imports transformers, optionally after gist_jax.
_WITHOUT_TORCH = """
import importlib.util, sys
real = importlib.util.find_spec
importlib.util.find_spec = (
    lambda name, *a, **k: None if name.split(".")[0] == "torch" else real(name, *a, **k)
)
if sys.argv[1] == "gist_jax":
    import gist_jax
import transformers
"""


@pytest.mark.parametrize("first", ["gist_jax", "nothing"])
def test_no_pytorch_advice_on_the_torch_free_path(first):
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH, first],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    advised = "PyTorch was not found" in proc.stderr
    # Without gist_jax the advice appears: the check can see it.
    assert advised == (first == "nothing"), proc.stderr


_MISSING = "/nonexistent/gist_jax_test"
# (module, arguments): a missing directory or an unknown --config key for each console
# script; {tmp} is a fresh temporary directory.
_MISTAKES = {
    "gist-convert-from-hf missing dir": (
        "gist_jax.convert.from_hf",
        [f"--hf_dir={_MISSING}", "--out_dir={tmp}/out"],
        "no config.json",
    ),
    "gist-convert-to-hf missing dir": (
        "gist_jax.convert.to_hf",
        [f"--ckpt_dir={_MISSING}", "--out_dir={tmp}/out"],
        _MISSING,
    ),
    "gist-train unknown key": (
        "gist_jax.train",
        ["--config=configs/tiny_llama.py", "--config.train.no_such_key=1", "--workdir={tmp}/w"],
        "unknown config key 'no_such_key'",
    ),
    "gist-eval unknown key": (
        "gist_jax.evaluate",
        ["--config=configs/tiny_llama.py", "--config.eval.no_such_key=1", "--workdir={tmp}/w"],
        "unknown config key 'no_such_key'",
    ),
    "gist-quickstart unknown key": (
        "gist_tools.quickstart",
        [
            "--config=configs/quickstart.py",
            "--config.quickstart.no_such_key=1",
            "--workdir={tmp}/w",
        ],
        "unknown config key 'no_such_key'",
    ),
    "gist-quickstart override without config": (
        "gist_tools.quickstart",
        ["--workdir={tmp}/w", "--config.train.seed=1"],
        "--config.train.seed=1 overrides a key of a config file: name the file first",
    ),
    "gist-eval missing checkpoint dir": (
        "gist_jax.evaluate",
        [
            "--config=configs/tiny_llama.py",
            f"--config.model.checkpoint={_MISSING}",
            "--workdir={tmp}/w",
        ],
        _MISSING,
    ),
    "gist-generate missing checkpoint": (
        "gist_tools.gist_generate",
        [f"--checkpoint={_MISSING}", "--instruction=Reverse the words.", "--input=a b"],
        _MISSING,
    ),
    "gist-compress missing prompts": (
        "gist_tools.gist_compress",
        ["--checkpoint=default", f"--prompts={_MISSING}/p.jsonl", "--store={tmp}/store"],
        _MISSING,
    ),
    "replication missing run": (
        "benchmarks.replication",
        [f"--run=a={_MISSING}", "--out={tmp}/report"],
        _MISSING,
    ),
}


@pytest.mark.parametrize("case", sorted(_MISTAKES))
def test_console_scripts_report_mistakes_in_one_line(case, tmp_path):
    module, args, expected = _MISTAKES[case]
    program = case.split()[0]
    proc = subprocess.run(
        [sys.executable, "-m", module, *(a.format(tmp=tmp_path) for a in args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{program}: error: ") and expected in last, proc.stderr


def test_training_bar_counts_steps_from_the_first_one(tmp_path, capsys):
    """The bar is up before the first step (marked as compiling), shows each logged step
    as its position with the steps' own rate (not one inflated by starting after the
    compile), and ends once at the last step."""
    import re
    import time

    from gist_jax.train.metrics_log import MetricsLogger

    logger = MetricsLogger(tmp_path, total_steps=8, progress_bar=True)
    logger.start_bar(0)
    assert "compiling" in capsys.readouterr().err
    time.sleep(0.5)  # "compilation"
    logger.first_step_done(1)
    positions, rates = [], []
    for step in range(2, 9):
        time.sleep(0.1)  # 10 steps/s
        logger.log(step, {"loss": 1.0, "lr": 1e-4, "tokens_per_s": 100.0})
        frames = [f for f in re.split(r"[\r\n]", capsys.readouterr().err) if "/8" in f]
        assert frames, step
        last = frames[-1]
        positions.append(int(re.search(r"(\d+)/8", last).group(1)))
        found = re.search(r"([\d.]+)step/s", last) or re.search(r"([\d.]+)s/step", last)
        rate = float(found.group(1))
        rates.append(rate if "step/s" in found.group(0) else 1 / rate)
    logger.message("exported")  # after the last step: a plain line, no bar redrawn
    logger.close()
    out = capsys.readouterr()
    assert positions == list(range(2, 9))
    assert all(4 < r < 15 for r in rates), rates  # the steps' rate, ~10 step/s
    assert "/8" not in out.err and "exported" in out.out


def test_cli_loader_decodes_unrolled_from_device_arrays():
    """gist-generate / gist-compress load the bundled model (stored stacked for nn.scan)
    with unrolled layers, evaluation's decoding layout, and params already on the device."""
    import jax

    from gist_jax import model_loading

    config, params, tokenizer = model_loading.load_converted("default")
    assert config.scan_layers is False and tokenizer is not None
    leaves = jax.tree.leaves(params)
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)
