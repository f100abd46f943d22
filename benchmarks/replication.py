"""The replication report (a tool beside the package, run from the checkout root): several quickstart workdirs (one per number of gist tokens k)
turned into the paper's results table, the share of the pos-neg gap that gist recovers,
training curves and an evaluation chart (what ``docs/results.md`` shows).

    python -m benchmarks.replication --run=k1=workdirs/alpaca/k1 --run=k2=workdirs/alpaca/k2 \\
        --run=k5=workdirs/alpaca/k5 --out=docs/results/alpaca_plus

Each run is a ``gist_tools.quickstart`` workdir: ``results/metrics.json`` (split ->
condition -> scores) and one training workdir per trained condition with its
``metrics.jsonl``. The controls are taken from the first run that has them (in the paper,
as here, the pos/neg control models do not depend on k). Writes ``table.md`` (scores, gap
shares, and paired per-example ROUGE-L differences against neg_control with their standard
errors), ``results.json``, ``training_curves.png`` and ``rouge_l.png`` under ``--out``,
and copies each run's own result files into ``--out/LABEL/`` so the report is
self-contained.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from gist_jax import gap, gist, metrics
from gist_jax.cli.entry import run_app
from gist_tools import quickstart

CONTROLS = ("pos_control", "neg_control")
# A run's own files copied beside the report: (path under the workdir, name in the copy).
RUN_FILES = (
    ("results/metrics.json", "metrics.json"),
    ("results/compression.json", "compression.json"),
    ("results/predictions.jsonl", "predictions.jsonl"),
    ("quickstart.json", "quickstart.json"),
)


def load_run(workdir: str | pathlib.Path) -> dict[str, Any]:
    """A quickstart workdir's metrics and the training losses of each trained condition."""
    workdir = pathlib.Path(workdir)
    metrics_file = workdir / "results" / "metrics.json"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file}: not a finished quickstart workdir")
    metrics = json.loads(metrics_file.read_text())
    curves = {}
    for condition in gist.CONDITIONS:
        log = workdir / condition / "metrics.jsonl"
        if log.is_file():
            rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            curves[condition] = [
                (int(r["step"]), float(r["loss"]))
                for r in rows
                if r.get("kind") == "train" and "loss" in r
            ]
    predictions: dict[tuple[str, str], list[dict[str, Any]]] = {}
    predictions_file = workdir / "results" / "predictions.jsonl"
    if predictions_file.is_file():
        for line in predictions_file.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                predictions.setdefault((row["split"], row["condition"]), []).append(row)
    summary_file = workdir / quickstart.SUMMARY_FILE
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    # The gist model's stepping time, from its own log: a run reused by a later quickstart
    # invocation keeps its training time (the invocation's own seconds would be ~0).
    step_seconds = math.nan
    log = workdir / "gist" / "metrics.jsonl"
    if log.is_file():
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        train = [r for r in records if r.get("kind") == "train" and "step_time_s" in r]
        previous, total = 0, 0.0
        for r in train:
            total += float(r["step_time_s"]) * (int(r["step"]) - previous)
            previous = int(r["step"])
        step_seconds = total if train else math.nan
    return {
        "workdir": str(workdir),
        "metrics": metrics,
        "curves": curves,
        "predictions": predictions,
        "train_gist_s": step_seconds,
        "objective": summary.get("config", {}).get("train", {}).get("objective", "lm"),
    }


def combine(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``split -> row -> scores`` with rows ``pos_control``, ``gist (k=...)`` per run,
    ``neg_control`` (controls from the first run that has them)."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for label, run in runs.items():
        for split, by_condition in run["metrics"].items():
            rows = table.setdefault(split, {})
            if "gist" in by_condition:
                rows[f"gist ({label})"] = by_condition["gist"]
            for control in CONTROLS:
                if control in by_condition and control not in rows:
                    rows[control] = by_condition[control]
    ordered = {}
    for split, rows in table.items():
        names = ["pos_control"] + [n for n in rows if n.startswith("gist")] + ["neg_control"]
        ordered[split] = {n: rows[n] for n in names if n in rows}
    return ordered


def gap_recovered(rows: Mapping[str, Mapping[str, float]], row: str, key: str = "rougeL") -> float:
    """The share (%) of the pos-neg gap in ``key`` that ``row`` recovers
    (``quickstart.gap_recovered``); NaN without both controls or a gap of a point."""
    if not all(c in rows for c in CONTROLS):
        return math.nan
    return gap.gap_recovered({"split": {**rows, "gist": rows[row]}}, "split", key)


def markdown_table(table: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """ROUGE-L (exact match) per split and row, then the gap each gist row recovers."""
    splits = list(table)
    rows = list(dict.fromkeys(r for split in splits for r in table[split]))
    lines = [
        "| model | " + " | ".join(f"{s} ROUGE-L (EM)" for s in splits) + " |",
        "|---|" + "---|" * len(splits),
    ]
    for row in rows:
        cells = []
        for split in splits:
            s = table[split].get(row)
            cells.append(f"{s['rougeL']:.1f} ({s['exact_match']:.0f})" if s else "-")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| gist recovers of the pos-neg ROUGE-L gap | " + " | ".join(splits) + " |",
        "|---|" + "---|" * len(splits),
    ]
    for row in rows:
        if row.startswith("gist"):
            cells = []
            for split in splits:
                share = gap_recovered(table[split], row) if row in table[split] else math.nan
                cells.append(gap.format_share(share))
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    n = {split: next(iter(rows.values())).get("n") for split, rows in table.items()}
    lines += ["", "Examples per split: " + ", ".join(f"{s} {v}" for s, v in n.items())]
    return "\n".join(lines) + "\n"


def _per_example_rouge(rows: Sequence[Mapping[str, Any]]) -> list[float]:
    scores = metrics.rouge_l_scores([r["prediction"] for r in rows], [r["reference"] for r in rows])
    return [100.0 * x for x in scores]


def paired_differences(
    runs: Mapping[str, Mapping[str, Any]],
) -> dict[str, dict[str, dict[str, float]]]:
    """``split -> "ROW - neg_control" -> {mean, se, n}``: per-example ROUGE-L differences
    of pos_control and of each run's gist model against neg_control on the same examples.

    With 50-100 examples per split a few points of ROUGE-L is within noise, and pairing
    removes the examples' own difficulty from the spread. Rows without predictions (or
    without a neg_control run) are left out; examples that do not line up raise.
    """
    controls: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs.values():
        for (split, condition), rows in run.get("predictions", {}).items():
            if condition in CONTROLS:
                controls.setdefault((split, condition), rows)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (split, condition), neg_rows in controls.items():
        if condition != "neg_control":
            continue
        others = {}
        if (split, "pos_control") in controls:
            others["pos_control"] = controls[(split, "pos_control")]
        for label, run in runs.items():
            rows = run.get("predictions", {}).get((split, "gist"))
            if rows:
                others[f"gist ({label})"] = rows
        neg = _per_example_rouge(neg_rows)
        for name, rows in others.items():
            mismatch = [
                i
                for i, (a, b) in enumerate(zip(rows, neg_rows, strict=False))
                if (a["instruction"], a["input"], a["reference"])
                != (b["instruction"], b["input"], b["reference"])
            ]
            if len(rows) != len(neg_rows) or mismatch:
                raise ValueError(
                    f"{split}: {name} and neg_control were not evaluated on the same examples "
                    f"({len(rows)} vs {len(neg_rows)} predictions; first difference at "
                    f"{mismatch[0] if mismatch else min(len(rows), len(neg_rows))})"
                )
            diffs = [a - b for a, b in zip(_per_example_rouge(rows), neg, strict=True)]
            n = len(diffs)
            sd = statistics.stdev(diffs) if n > 1 else math.nan
            out.setdefault(split, {})[f"{name} - neg_control"] = {
                "mean": statistics.fmean(diffs),
                "se": sd / math.sqrt(n),
                "n": n,
            }
    return out


def _split_table(title: str, by_split: Mapping[str, Mapping[str, Any]], cell: Any) -> str:
    """A markdown table with one row per key of the splits' entries and one column per
    split; ``cell(value)`` formats an entry, "-" where a split lacks the row."""
    splits = list(by_split)
    rows = list(dict.fromkeys(r for split in splits for r in by_split[split]))
    lines = [f"| {title} | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for row in rows:
        cells = [cell(by_split[s][row]) if row in by_split[s] else "-" for s in splits]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_markdown(paired: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """The paired differences as a table: mean +- standard error per split."""
    # round() first, then + 0.0: a mean of -0.04 prints "0.0", not "-0.0".
    return _split_table(
        "paired ROUGE-L difference, mean +- SE",
        paired,
        lambda d: f"{round(d['mean'], 1) + 0.0:.1f} +- {d['se']:.1f}",
    )


def gap_intervals(
    runs: Mapping[str, Mapping[str, Any]],
) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """``split -> "gist (LABEL)" -> metric -> gap.paired_interval``: each run's gist model
    against the controls of the first run that has them, resampling the same examples."""

    controls: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs.values():
        for (split, condition), rows in run.get("predictions", {}).items():
            if condition in CONTROLS:
                controls.setdefault((split, condition), rows)
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for label, run in runs.items():
        for (split, condition), rows in run.get("predictions", {}).items():
            pos, neg = controls.get((split, "pos_control")), controls.get((split, "neg_control"))
            if condition != "gist" or pos is None or neg is None or len(rows) != len(neg):
                continue
            merged = [
                *({**r, "condition": "gist"} for r in rows),
                *({**r, "condition": "pos_control"} for r in pos),
                *({**r, "condition": "neg_control"} for r in neg),
            ]
            for key in gap.METRICS:
                scores = gap.example_scores(merged, split, key)
                if scores is not None:
                    out.setdefault(split, {}).setdefault(f"gist ({label})", {})[key] = (
                        gap.paired_interval(scores)
                    )
    return out


def gap_markdown(intervals: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]]) -> str:
    """Gap shares with their paired 95% bootstrap intervals, ROUGE-L and exact match."""

    def interval(g: Mapping[str, float]) -> str:
        f = gap.format_share
        return f"{f(g['share'])} [{f(g['low'])}, {f(g['high'])}]"

    return _split_table(
        "gap recovered, ROUGE-L [95% CI] / EM [95% CI]",
        intervals,
        lambda m: f"{interval(m['rougeL'])} / {interval(m['exact_match'])}",
    )


def copy_run_files(runs: Mapping[str, str | pathlib.Path], out: pathlib.Path) -> None:
    """Each run's own result files (RUN_FILES) into ``out/LABEL/`` (``k=1`` -> ``k1``)."""
    for label, workdir in runs.items():
        target = out / label.replace("=", "")
        target.mkdir(parents=True, exist_ok=True)
        for source, name in RUN_FILES:
            path = pathlib.Path(workdir) / source
            if path.is_file():
                shutil.copyfile(path, target / name)


def plot_curves(runs: Mapping[str, Mapping[str, Any]], path: pathlib.Path) -> None:
    """Training loss by step of every trained model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    seen_controls: set[str] = set()
    for label, run in runs.items():
        for condition, points in run["curves"].items():
            if not points:
                continue
            if condition in CONTROLS:
                if condition in seen_controls:
                    continue
                seen_controls.add(condition)
                name = condition
            else:
                name = f"gist ({label})"
            steps, losses = zip(*points, strict=True)
            ax.plot(steps, losses, label=name, linestyle="--" if condition in CONTROLS else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (completion tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rouge(table: Mapping[str, Mapping[str, Mapping[str, float]]], path: pathlib.Path) -> None:
    """Grouped bars: ROUGE-L per split, one bar per row of the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(table)
    rows = list(dict.fromkeys(r for split in splits for r in table[split]))
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(6, 2.5 * len(splits)), 4))
    for i, row in enumerate(rows):
        values = [table[s][row]["rougeL"] if row in table[s] else 0.0 for s in splits]
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(splits))]
        ax.bar(xs, values, width, label=row)
    ax.set_xticks(range(len(splits)), splits)
    ax.set_ylabel("ROUGE-L")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gap_vs_minutes(
    runs: Mapping[str, Mapping[str, Any]],
    intervals: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]],
    path: pathlib.Path,
) -> None:
    """The ROUGE-L gap share (with its 95% interval) of each run's gist model against its
    training minutes, one panel per split, marked by ``train.objective``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(intervals)
    fig, axes = plt.subplots(1, len(splits), figsize=(4.5 * len(splits), 3.8), squeeze=False)
    markers = {"lm": "o", "distill": "s", "mix": "^"}
    for ax, split in zip(axes[0], splits, strict=True):
        plotted = 0
        for label, run in runs.items():
            g = intervals[split].get(f"gist ({label})", {}).get("rougeL")
            minutes = run.get("train_gist_s", math.nan) / 60
            if g is None or math.isnan(minutes) or math.isnan(g["share"]):
                continue
            objective = run.get("objective", "lm")
            err = [[g["share"] - g["low"]], [g["high"] - g["share"]]]
            ax.errorbar(minutes, g["share"], yerr=err, fmt=markers.get(objective, "o"),
                        color=f"C{list(markers).index(objective) if objective in markers else 3}",
                        capsize=3)  # fmt: skip
            ax.annotate(label, (minutes, g["share"]), fontsize=7, xytext=(4, 2),
                        textcoords="offset points")  # fmt: skip
            plotted += 1
        if not plotted:
            ax.text(0.5, 0.5, "no pos-neg gap to recover", ha="center", transform=ax.transAxes)
        ax.set_title(split, fontsize=9)
        ax.set_xlabel("gist model training steps (minutes)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("ROUGE-L gap recovered (%)")
    handles = [
        plt.Line2D([], [], marker=m, linestyle="", color=f"C{i}", label=o)
        for i, (o, m) in enumerate(markers.items())
    ]
    axes[0][-1].legend(handles=handles, fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(runs: Mapping[str, str | pathlib.Path], out: str | pathlib.Path) -> str:
    """Load ``label -> workdir`` runs and write the report files; returns the table."""
    loaded = {label: load_run(workdir) for label, workdir in runs.items()}
    table = combine(loaded)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paired = paired_differences(loaded)
    intervals = gap_intervals(loaded)
    text = markdown_table(table)
    if intervals:
        text += "\n" + gap_markdown(intervals)
    if paired:
        text += "\n" + paired_markdown(paired)
    (out / "table.md").write_text(text)
    summary = {
        "runs": {label: run["workdir"] for label, run in loaded.items()},
        "table": table,
        "gap_recovered_rougeL": {
            split: {row: gap_recovered(rows, row) for row in rows if row.startswith("gist")}
            for split, rows in table.items()
        },
        "paired_rougeL_vs_neg_control": paired,
        "gap_intervals": intervals,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    copy_run_files(runs, out)
    plot_curves(loaded, out / "training_curves.png")
    if intervals:
        plot_gap_vs_minutes(loaded, intervals, out / "gap_vs_minutes.png")
    plot_rouge(table, out / "rouge_l.png")
    return text


def parse_runs(values: Sequence[str]) -> dict[str, str]:
    """``["k1=DIR", ...]`` -> ``{"k=1": DIR, ...}`` (labels as given; ``kN`` spelt ``k=N``)."""
    runs = {}
    for value in values:
        label, sep, path = value.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"--run={value!r}: expected LABEL=WORKDIR, e.g. k1=workdirs/k1")
        if label[0] == "k" and label[1:].isdigit():
            label = f"k={label[1:]}"
        runs[label] = path
    return runs


def main(argv: Sequence[str]) -> None:
    from absl import flags

    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    print(write_report(parse_runs(f.run), f.out))


def run() -> None:
    from absl import flags

    flags.DEFINE_multi_string("run", [], "LABEL=WORKDIR of a finished quickstart run.")
    flags.DEFINE_string("out", None, "Directory for table.md, results.json and the plots.")
    flags.mark_flags_as_required(["run", "out"])
    run_app(main, "replication")


if __name__ == "__main__":
    run()
