"""The report of an evaluation: one ``EvalReport`` from several (``merge_reports``), scores
per task family (``family_scores``), and its files (``WORKDIR/eval/<step>/``, the
quickstart's ``results/``):
``metrics.json``, ``compression.json``, ``run.json``, ``predictions.jsonl``, the markdown
tables (``results.md``) and two plots (``rouge_l.png``, ``compression.png``). Written
atomically, by one process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gist_jax import gist
from gist_jax import metrics as text_metrics
from gist_jax.files import atomic_write_text


@dataclasses.dataclass
class EvalReport:
    """What an evaluation produced: metrics per split and condition, every prediction,
    the compression figures per split and the run's settings."""

    metrics: dict[str, dict[str, dict[str, float]]]
    predictions: list[dict[str, Any]]
    compression: dict[str, dict[str, float]]
    run: dict[str, Any]


def markdown_tables(report: EvalReport) -> str:
    """ROUGE-L / exact match per condition (rows) and split (columns), and compression."""
    splits = list(report.metrics)
    conditions = list(next(iter(report.metrics.values()))) if splits else []
    lines = [f"## Evaluation at step {report.run['step']}", ""]
    lines.append("| condition | " + " | ".join(f"{s} ROUGE-L | {s} EM" for s in splits) + " |")
    lines.append("|---" * (1 + 2 * len(splits)) + "|")
    for condition in conditions:
        cells = []
        for s in splits:
            m = report.metrics[s][condition]
            cells += [f"{m['rougeL']:.1f}", f"{m['exact_match']:.1f}"]
        lines.append(f"| {condition} | " + " | ".join(cells) + " |")
    n = {s: next(iter(report.metrics[s].values()))["n"] for s in splits}
    lines += ["", "Examples per split: " + ", ".join(f"{s} {n[s]}" for s in splits), ""]
    lines.append(
        "| split | distinct prompts | mean prompt tokens | gist tokens | ratio | "
        "prompt cache bytes | gist cache bytes |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for s, c in report.compression.items():
        lines.append(
            f"| {s} | {c['distinct_prompts']} | {c['mean_prompt_tokens']:.1f} | "
            f"{c['num_gist_tokens']} | {c['compression_ratio']:.1f}x | "
            f"{c['prompt_cache_bytes_per_prompt']:,.0f} | {c['gist_cache_bytes_per_prompt']:,.0f} |"
        )
    compiles = ", ".join(f"{k} {v}" for k, v in sorted(report.run["compilations"].items()))
    lines += [
        "",
        f"Evaluation took {report.run['seconds']:.1f} s; programs compiled: "
        f"{compiles or 'none (all cached)'}",
        "",
    ]
    return "\n".join(lines)


def plot_rouge(report: EvalReport, path: pathlib.Path) -> None:
    """Grouped bars: ROUGE-L per split (groups) and condition (bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(report.metrics)
    conditions = list(next(iter(report.metrics.values())))
    width = 0.8 / len(conditions)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(splits), 3.6))
    x = np.arange(len(splits))
    for i, condition in enumerate(conditions):
        values = [report.metrics[s][condition]["rougeL"] for s in splits]
        bars = ax.bar(x + (i - (len(conditions) - 1) / 2) * width, values, width, label=condition)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, [name.removeprefix("validation_") for name in splits])
    ax.set_ylabel("ROUGE-L")
    ax.set_ylim(0, 100)
    ax.set_title(f"ROUGE-L per split and condition (step {report.run['step']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_compression(report: EvalReport, path: pathlib.Path) -> None:
    """Left: mean prompt tokens vs gist tokens; right: KiB per cached prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(report.compression)
    c = [report.compression[s] for s in splits]
    x = np.arange(len(splits))
    fig, axes = plt.subplots(1, 2, figsize=(2.5 + 2.4 * len(splits), 3.4))
    for ax, keys, labels, unit in (
        (axes[0], ("mean_prompt_tokens", "num_gist_tokens"), ("prompt", "gist"), "tokens"),
        (
            axes[1],
            ("prompt_cache_bytes_per_prompt", "gist_cache_bytes_per_prompt"),
            ("prompt cache", "gist cache"),
            "KiB per prompt",
        ),
    ):
        scale = 1024.0 if unit.startswith("KiB") else 1.0
        for i, (key, label) in enumerate(zip(keys, labels, strict=True)):
            bars = ax.bar(x + (i - 0.5) * 0.4, [v[key] / scale for v in c], 0.4, label=label)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(x, [name.removeprefix("validation_") for name in splits])
        ax.set_ylabel(unit)
        # Room above the tallest bar for its value label; the legend below the axes, where
        # it covers no bar.
        ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    fig.suptitle("Prompt compression")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: EvalReport, out_dir: str | os.PathLike) -> pathlib.Path:
    """Write the files listed in the module docstring into ``out_dir``."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(report.metrics, indent=2) + "\n")
    atomic_write_text(out / "compression.json", json.dumps(report.compression, indent=2) + "\n")
    atomic_write_text(out / "run.json", json.dumps(report.run, indent=2) + "\n")
    atomic_write_text(
        out / "predictions.jsonl",
        "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in report.predictions),
    )
    atomic_write_text(out / "results.md", markdown_tables(report))
    plot_rouge(report, out / "rouge_l.png")
    plot_compression(report, out / "compression.png")
    return out


def merge_reports(reports: Sequence[Any], order: Sequence[str] = gist.CONDITIONS) -> Any:
    """One ``eval_report.EvalReport`` from several (one per trained model): metrics per split
    in condition order, predictions concatenated, compression from the first (the
    figures depend only on the model config and the prompts), runs kept per model."""
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    for report in reports:
        for split, by_condition in report.metrics.items():
            metrics.setdefault(split, {}).update(by_condition)
    for split, by_condition in metrics.items():
        metrics[split] = {c: by_condition[c] for c in order if c in by_condition}
    compilations: dict[str, int] = {}
    for report in reports:
        for name, count in report.run["compilations"].items():
            compilations[name] = compilations.get(name, 0) + count
    run = {
        "step": reports[0].run["step"],
        "seconds": sum(r.run["seconds"] for r in reports),
        "compilations": compilations,
        "models": [r.run for r in reports],
    }
    predictions = [p for r in reports for p in r.predictions]
    return EvalReport(metrics, predictions, reports[0].compression, run)


def family_scores(
    predictions: Sequence[Mapping[str, Any]],
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """``split -> task family -> condition -> {"rougeL", "exact_match", "n"}`` for splits
    whose examples name their family (the synthetic suite's ``task``); other splits are
    left out. Shows which families each condition solves, which the split means hide."""
    task_of = {
        (name, ex["instruction"], ex["input"]): ex["task"]
        for name, examples in splits.items()
        for ex in examples
        if "task" in ex
    }
    grouped: dict[str, dict[str, dict[str, list[Mapping[str, Any]]]]] = {}
    for p in predictions:
        task = task_of.get((p["split"], p["instruction"], p["input"]))
        if task is not None:
            grouped.setdefault(p["split"], {}).setdefault(task, {}).setdefault(
                p["condition"], []
            ).append(p)
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for split, by_task in grouped.items():
        out[split] = {}
        for task in sorted(by_task):
            out[split][task] = {}
            for condition in gist.CONDITIONS:
                rows = by_task[task].get(condition)
                if not rows:
                    continue
                preds = [r["prediction"] for r in rows]
                refs = [r["reference"] for r in rows]
                out[split][task][condition] = {
                    "rougeL": text_metrics.rouge_l(preds, refs),
                    "exact_match": text_metrics.exact_match(preds, refs),
                    "n": len(rows),
                }
    return out


def family_markdown(families: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]]) -> str:
    """Exact match (ROUGE-L) per task family and condition, one table per split."""
    lines = []
    for split, by_task in families.items():
        conditions = [c for c in gist.CONDITIONS if any(c in v for v in by_task.values())]
        lines += [
            f"### {split}: exact match (ROUGE-L) per task family",
            "",
            "| family | n | " + " | ".join(conditions) + " |",
            "|---|---|" + "---|" * len(conditions),
        ]
        for task, by_condition in by_task.items():
            n = next(iter(by_condition.values()))["n"]
            cells = [
                f"{by_condition[c]['exact_match']:.0f} ({by_condition[c]['rougeL']:.0f})"
                if c in by_condition
                else "-"
                for c in conditions
            ]
            lines.append(f"| {task} | {n} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
