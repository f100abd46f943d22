"""The quickstart: one command that shows gisting working end to end on one CPU.

    python -m gist_tools.quickstart --workdir=workdirs/quickstart [--config=configs/quickstart.py]

It (1) converts the bundled SmolLM2-135M-Instruct once (cached, see
``gist_jax.convert.default_model``); (2) fine-tunes it with two gist tokens on the built-in
synthetic instruction suite, and -- as in the paper, where the two controls are models of
their own -- fine-tunes a ``pos_control`` model (no masking: the upper bound) and a
``neg_control`` model (the instruction is hidden from everything after the gist: the lower
bound) with the same recipe; (3) evaluates each model under its own condition on
``validation_seen`` and ``validation_unseen`` (the gist model through compressed decoding:
every instruction is compressed once into its gist token's key/value cache, and the input
is decoded from that cache alone); (4) prints the ROUGE-L / exact-match table and the
compression figures, writes plots, and exports the gist model as a Hugging Face directory.

``quickstart.controls = "masked"`` (``--config.quickstart.controls=masked``) trains only
the gist model and evaluates the controls by decoding that same model under the control
masks: about three times faster, but not the paper's protocol (a model never trained
without its instruction is a pessimistic lower bound; see docs/results.md).

Workdir layout::

    gist/, pos_control/, neg_control/   one training run each (gist_jax.train workdirs:
                                        checkpoints, metrics.jsonl, export/)
    results/                            metrics.json, results.md, predictions.jsonl,
                                        compression.json, run.json, rouge_l.png,
                                        compression.png (gist_jax.evaluate's files, merged),
                                        families.{json,md} (per task family, synthetic data)
    export_hf/                          the gist model as an HF directory (with <GIST>)
    quickstart.json                     timings, settings and paths of this run

Running the command again reuses finished training runs (their checkpoints) and redoes
the evaluation and export. ``quickstart(config, workdir)`` is the entry point from Python.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from gist_jax import gap, gist, train_config
from gist_jax.cli.entry import run_app

RESULTS_DIR = "results"
EXPORT_HF_DIR = "export_hf"
SUMMARY_FILE = "quickstart.json"
FAMILIES_JSON = "families.json"  # per task family scores (synthetic suite)
FAMILIES_MD = "families.md"
CONTROL_MODES = ("trained", "masked")
QUICKSTART_DEFAULTS: dict[str, Any] = dict(
    controls="trained", control_steps=0, export_hf=True, teacher=""
)
# quickstart.teacher: "" (train.teacher as configured) or "pos_control": the gist model
# distils from this run's own pos_control model, which is then trained first.
TEACHERS = ("", "pos_control")


def default_config() -> ml_collections.ConfigDict:
    """The quickstart's training + evaluation config (what ``configs/quickstart.py`` returns).

    Training (also ``configs/default.py``, the same run on its own) is sized for about 27
    minutes on a 2-core CPU, install included: the budget at which the gist model recovers
    most of the gap on relations it never saw (docs/results.md sections 9 and 13 have the
    20- and 60-minute runs beside it);
    ``quickstart`` holds the settings that are not training's:

    * ``controls``: "trained" (paper: separate pos/neg control models) or "masked"
      (the gist model decoded under the control masks);
    * ``control_steps``: training steps of each control model (0: ``train.steps``);
    * ``eval_num_examples``: examples per evaluation split for generation;
    * ``export_hf``: write ``WORKDIR/export_hf``.
    """
    c = train_config.base_config()
    c.model.checkpoint = train_config.DEFAULT_MODEL
    # bfloat16 compute (params, optimizer and logits stay float32): a step takes 0.74x
    # float32's time on the AVX512-BF16 CPU this is measured on, with the gist's gap shares
    # within seed noise (docs/results.md section 13). On a CPU without native bfloat16
    # products float32 is the faster one: --config.model.dtype=float32.
    c.model.dtype = "bfloat16"
    # Unrolled layers: the step is ~12% faster than nn.scan's on a CPU (which re-slices the
    # stacked weights and stacks the gradients every step), for a few more seconds of
    # compilation; decoding reads its per-layer KV cache in place.
    c.model.scan_layers = False
    # Suite version 3: relations SmolLM2-135M already knows, so its never-trained ones are
    # instructions the model can follow when it sees them and a gist can be measured on
    # them (docs/results.md section 5). Versions 1 and 2 with the recipes the docs cite:
    # configs/quickstart_v1.py, configs/quickstart_v2.py.
    c.data.source = "synthetic_v3"
    # Two gist tokens: in the same minutes as one, the never-trained split's gap share rose in
    # both seeds (paired +6.0 +- 2.0 and +3.1 +- 1.5 ROUGE-L; docs/results.md section 6).
    c.data.num_gist_tokens = 2
    c.data.condition = "gist"
    c.data.max_length = 96
    c.data.packing = True
    c.data.bucket_multiple = 96
    c.data.pack_open_rows = 8  # first-fit over 8 rows: 92% of the slots hold tokens, not 81%
    # (benchmarks/probes/packing_fill.py; the scan comparison: benchmarks/probes/bench_scan_vs_unrolled.py)
    c.data.num_train_examples = 4000
    # Updates more than examples: 150 steps of 4 rows take the minutes 70 steps of 8 rows
    # took and recover more of the seen and recombined gaps (docs/results.md section 5).
    # 250 steps (about 30 minutes), not the 150 that fit 20: the seen split's gap share rose
    # from 52% / 66% to 76% / 77% / 81% and the never-trained split's from 65% / 55% to
    # 95% / 70% / 41% (seeds 0 / 1 / 2; docs/results.md section 9).
    c.train.steps = 250
    c.train.batch_size = 4
    c.train.lr = 1e-4
    # A gist adapter: rank-32 weights that only the gist tokens' positions use, trained at
    # 10 x train.lr. Over three seeds it added +3.9 +- 1.2 ROUGE-L on the never-trained
    # relations and +2.9 +- 1.1 on seen (docs/results.md section 12). Section 9's recipe
    # without it: --config.model.gist_adapter_rank=0 --config.train.lr_scales=
    c.model.gist_adapter_rank = 32
    c.train.lr_scales = "gist_adapter=10"
    c.train.schedule = "cosine"
    c.train.warmup = 0.05
    c.train.weight_decay = 0.0
    c.train.clip_norm = 1.0
    c.train.log_every = 5
    c.train.eval_every = 0
    c.train.checkpoint_every = 0
    c.train.keep_checkpoints = 1
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    # One CPU device: activation sharding constraints have nothing to place.
    c.mesh.constrain_activations = False
    c.eval.splits = ("validation_seen", "validation_recombined", "validation_unseen")
    c.eval.num_examples = 200
    c.eval.batch_size = 16
    c.eval.max_new_tokens = 24  # the longest answers ("TWENTY-TWO TWENTY-TWO") are ~12 tokens
    c.eval.conditions = gist.CONDITIONS
    c.quickstart = ml_collections.ConfigDict(QUICKSTART_DEFAULTS)
    return c


@dataclasses.dataclass
class QuickstartResult:
    """What one quickstart run produced."""

    metrics: dict[str, dict[str, dict[str, float]]]  # split -> condition -> scores
    compression: dict[str, dict[str, float]]  # split -> compression figures
    seconds: dict[str, float]  # phase -> wall seconds (and "total")
    train_dirs: dict[str, pathlib.Path]  # trained condition -> its training workdir
    results_dir: pathlib.Path
    export_hf: pathlib.Path | None
    table: str  # the markdown tables that were printed


def prepare_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` with the quickstart's extra keys added where missing, so any
    training config (``configs/tiny_t5.py``, an Alpaca+ config) can be run through
    ``quickstart``: ``quickstart.*`` from ``QUICKSTART_DEFAULTS``, ``eval.conditions`` all
    three, ``eval.max_new_tokens`` 0 (= gist_jax.evaluate's default for the family)."""
    c = copy.deepcopy(config)
    with c.unlocked():
        if "quickstart" not in c:
            c.quickstart = ml_collections.ConfigDict(QUICKSTART_DEFAULTS)
        for key, value in QUICKSTART_DEFAULTS.items():
            if key not in c.quickstart:
                c.quickstart[key] = value
        if "conditions" not in c.eval:
            c.eval.conditions = gist.CONDITIONS
        if "max_new_tokens" not in c.eval:
            c.eval.max_new_tokens = 0
    return c


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raise ``ConfigError`` for settings that cannot work, before any work is done."""
    train_config.validate(config)
    q = config.quickstart
    problems = []
    if not str(config.data.source):
        problems.append(
            "data.source='': set it to 'synthetic' or to a directory (or URL prefix) holding "
            "alpaca_plus_{split}.json files, e.g. --config.data.source=/data/alpaca_plus"
        )
    unknown = [c for c in config.eval.conditions if c not in gist.CONDITIONS]
    if unknown:
        problems.append(
            f"eval.conditions: unknown {unknown}; expected a subset of {gist.CONDITIONS}"
        )
    if q.controls not in CONTROL_MODES:
        problems.append(f"quickstart.controls={q.controls!r}: expected one of {CONTROL_MODES}")
    if q.teacher not in TEACHERS:
        problems.append(f"quickstart.teacher={q.teacher!r}: expected one of {TEACHERS}")
    elif q.teacher == "pos_control":
        if q.controls != "trained":
            problems.append(
                "quickstart.teacher='pos_control' needs quickstart.controls='trained' (the "
                "teacher is the trained pos_control model)"
            )
        if config.train.objective == "lm":
            problems.append(
                "quickstart.teacher='pos_control' needs train.objective 'distill' or 'mix' "
                "(with 'lm' there is no teacher)"
            )
    if q.control_steps < 0:
        problems.append(f"quickstart.control_steps={q.control_steps}: must be >= 0")
    if config.data.num_gist_tokens < 1:
        problems.append(
            f"data.num_gist_tokens={config.data.num_gist_tokens}: the quickstart compares "
            "gist tokens with the controls, k must be >= 1"
        )
    if config.data.condition != "gist":
        problems.append(
            f"data.condition={config.data.condition!r}: the quickstart trains the gist model "
            "itself (and the controls, see quickstart.controls); leave it at 'gist'"
        )
    if not config.eval.splits:
        problems.append("eval.splits is empty: nothing to evaluate")
    if problems:
        raise train_config.ConfigError("invalid quickstart config:\n  " + "\n  ".join(problems))


def training_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """Condition -> the training config of its model (the gist model first)."""
    q = config.quickstart
    trained = gist.CONDITIONS if q.controls == "trained" else ("gist",)
    if q.teacher == "pos_control":  # the teacher first
        trained = ("pos_control", "gist", "neg_control")
    out = {}
    for condition in trained:
        c = copy.deepcopy(config)
        with c.unlocked():
            del c["quickstart"]
            c.data.condition = condition
            # Generation (below) is the evaluation; no validation-loss passes while training.
            c.eval.splits = ()
            if condition != "gist":
                # The controls are the paper's: plain LM training under their own mask.
                c.train.objective = "lm"
                if q.control_steps:
                    c.train.steps = q.control_steps
        out[condition] = c
    return out


def evaluated_conditions(config: ml_collections.ConfigDict) -> dict[str, tuple[str, ...]]:
    """Trained condition -> the conditions its model is evaluated under."""
    wanted = tuple(config.eval.conditions)
    if config.quickstart.controls == "trained":
        return {c: (c,) for c in gist.CONDITIONS if c in wanted}
    return {"gist": wanted}


def summary_lines(report: Any, seconds: Mapping[str, float]) -> list[str]:
    """Plain-text lines printed after the tables: compression, and the gap recovered with
    its paired 95% bootstrap interval (``gist_jax.gap``)."""

    lines = []
    for split, c in report.compression.items():
        lines.append(
            f"{split}: {c['distinct_prompts']} distinct instructions, "
            f"{c['mean_prompt_tokens']:.1f} prompt tokens -> {c['num_gist_tokens']} gist "
            f"token(s) ({c['compression_ratio']:.1f}x); cache per prompt "
            f"{c['prompt_cache_bytes_per_prompt'] / 1024:.0f} KiB -> "
            f"{c['gist_cache_bytes_per_prompt'] / 1024:.0f} KiB"
        )
    intervals = gap.split_intervals(report.predictions, list(report.metrics))
    for split, by_metric in intervals.items():
        parts = []
        for key, name in (("rougeL", "ROUGE-L"), ("exact_match", "exact match")):
            g = by_metric[key]
            if math.isnan(g["share"]):
                parts.append(f"no {name} gap (pos_control is not above neg_control)")
            else:
                bounds = (
                    f" (95% CI {gap.format_share(g['low'])} to {gap.format_share(g['high'])})"
                    if not math.isnan(g["low"])
                    else ""
                )
                parts.append(f"{gap.format_share(g['share'])}{bounds} of the {name} gap")
        lines.append(
            f"{split}: gist recovers {' and '.join(parts)} between neg_control and pos_control"
        )
    lines.append("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    return lines


def _bytes_under(path: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def disk_line(workdir: pathlib.Path, train_dirs: Mapping[str, pathlib.Path]) -> str:
    """What the workdir holds on disk and what of it can go: the training checkpoints
    (params and optimizer state) only let training resume, and let a rerun of the quickstart
    skip training; the results and the exports do not need them."""
    checkpoints = [d / "checkpoints" for d in train_dirs.values() if (d / "checkpoints").is_dir()]
    held = sum(_bytes_under(c) for c in checkpoints)
    return (
        f"disk: {workdir} holds {_bytes_under(workdir) / 1e9:.1f} GB; the training checkpoints "
        f"({held / 1e9:.1f} GB: {', '.join(str(c.relative_to(workdir)) for c in checkpoints)}) "
        "can be deleted: the exports and results do not need them (a rerun would train again)"
    )


def _length(config: ml_collections.ConfigDict) -> str:
    t = config.train
    return f"{t.steps} steps" if t.steps > 0 else f"{t.epochs:g} epochs"


def _say(text: str, progress: bool) -> None:
    if progress:
        print(text, flush=True)


def quickstart(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    progress: bool = True,
    devices: Sequence[Any] | None = None,
) -> QuickstartResult:
    """Convert (if needed), train, evaluate, report and export; see the module docstring.

    Args:
      config: ``default_config()`` or any training config with the same extra keys
        (``eval.max_new_tokens``, ``eval.conditions``, ``quickstart.*``); tests pass a tiny
        random-init model.
      workdir: where everything goes (created; finished training runs are reused).
      progress: progress bars and messages on the console.
      devices: the devices to train on (default all).
    """
    from gist_jax import eval_report, evaluate, train
    from gist_jax.convert import loading
    from gist_jax.convert.to_hf import convert_to_hf

    config = prepare_config(config)
    check_config(config)
    started = time.monotonic()
    workdir = pathlib.Path(workdir).absolute()  # every path it prints is absolute
    workdir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    if config.model.checkpoint == train_config.DEFAULT_MODEL:
        from gist_jax.convert.default_model import ensure_default_model

        t0 = time.monotonic()
        _say("[1/4] the bundled SmolLM2-135M-Instruct (converted once, then cached)", progress)
        _, ckpt_dir = ensure_default_model(progress=progress)
        _say(f"      converted model: {ckpt_dir}", progress)
        seconds["convert"] = time.monotonic() - t0

    train_dirs: dict[str, pathlib.Path] = {}
    exports: dict[str, pathlib.Path] = {}
    steps: dict[str, int] = {}
    configs = training_configs(config)
    for i, (condition, c) in enumerate(configs.items()):
        t0 = time.monotonic()
        if condition == "gist" and config.quickstart.teacher == "pos_control":
            with c.unlocked():
                c.train.teacher = str(exports["pos_control"])
        _say(
            f"[2/4] training the {condition} model ({i + 1}/{len(configs)}): "
            f"{_length(c)} of {c.train.batch_size} rows, k={c.data.num_gist_tokens}"
            + (f", objective {c.train.objective}" if c.train.objective != "lm" else ""),
            progress,
        )
        result = train.train_and_evaluate(
            c, workdir / condition, devices=devices, progress_bar=progress
        )
        if result.export_dir is None:
            raise RuntimeError(f"training the {condition} model stopped early at {result.step}")
        train_dirs[condition] = result.workdir
        exports[condition] = result.export_dir
        steps[condition] = result.step
        seconds[f"train_{condition}"] = time.monotonic() - t0

    t0 = time.monotonic()
    splits = evaluate.load_splits(config)
    settings = evaluate.settings_from_config(config)
    reports = []
    for trained, conditions in evaluated_conditions(config).items():
        _say(
            f"[3/4] evaluating the {trained} model under {', '.join(conditions)} on "
            f"{', '.join(f'{s} ({len(e)})' for s, e in splits.items())}",
            progress,
        )
        model_config, params, tokenizer = loading.load_checkpoint(exports[trained])
        settings["conditions"] = conditions
        reports.append(
            evaluate.evaluate(
                model_config,
                params,
                tokenizer,
                splits,
                step=steps[trained],
                progress=progress,
                **settings,
            )
        )
        del params
    report = eval_report.merge_reports(reports)
    results_dir = eval_report.write_report(report, workdir / RESULTS_DIR)
    families = eval_report.family_scores(report.predictions, splits)
    if families:
        (results_dir / FAMILIES_JSON).write_text(json.dumps(families, indent=2) + "\n")
        (results_dir / FAMILIES_MD).write_text(eval_report.family_markdown(families))
    seconds["evaluate"] = time.monotonic() - t0

    export_hf = None
    if config.quickstart.export_hf:
        t0 = time.monotonic()
        _say("[4/4] exporting the gist model to a Hugging Face directory", progress)
        export_hf = convert_to_hf(exports["gist"], workdir / EXPORT_HF_DIR, overwrite=True)
        seconds["export_hf"] = time.monotonic() - t0
    seconds["total"] = time.monotonic() - started

    table = eval_report.markdown_tables(report)
    lines = summary_lines(report, seconds)
    _say("\n" + table + "\n" + "\n".join(lines), progress)
    _say(f"\nresults: {results_dir}  (rouge_l.png, compression.png, results.md)", progress)
    if export_hf is not None:
        _say(f"HF export: {export_hf}", progress)
    _say(disk_line(workdir, train_dirs), progress)
    summary = {
        "seconds": seconds,
        "metrics": report.metrics,
        "compression": report.compression,
        "gap": gap.split_intervals(report.predictions, list(report.metrics)),
        "train_dirs": {k: str(v) for k, v in train_dirs.items()},
        "results_dir": str(results_dir),
        "export_hf": str(export_hf) if export_hf else None,
        "config": json.loads(config.to_json_best_effort()),
    }
    (workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return QuickstartResult(
        metrics=report.metrics,
        compression=report.compression,
        seconds=seconds,
        train_dirs=train_dirs,
        results_dir=results_dir,
        export_hf=export_hf,
        table=table,
    )


# ---------------------------------------------------------------------------------------
# Command line (the shared run flags: gist_jax.cli.run_flags)


def main(argv: Sequence[str]) -> None:
    from absl import app, flags
    from absl import logging as absl_logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if not f.workdir:
        raise app.UsageError("--workdir is required")
    if not f["verbosity"].present:
        # orbax logs every save at INFO; keep the console for the progress bars.
        absl_logging.set_verbosity(absl_logging.WARNING)
    config = f.config if f.config is not None else default_config()
    quickstart(config, f.workdir)


def run() -> None:
    """Console script entry point (``gist-quickstart``)."""
    from gist_jax.cli import run_flags

    run_flags.define(
        "Config file (default: configs/quickstart.py's)",
        "Directory for the three runs, the evaluation and the export.",
    )

    run_app(main, "gist-quickstart")


if __name__ == "__main__":
    run()
