"""The replication report: several quickstart workdirs (one per number of gist tokens k)
turned into the paper's results table, the share of the pos-neg gap that gist recovers,
training curves and an evaluation chart (what ``docs/results.md`` shows).

    python -m gist_jax.replication --run=k1=workdirs/alpaca/k1 --run=k2=workdirs/alpaca/k2 \\
        --run=k5=workdirs/alpaca/k5 --out=docs/results/alpaca_plus

Each run is a ``gist_jax.quickstart`` workdir: ``results/metrics.json`` (split ->
condition -> scores) and one training workdir per trained condition with its
``metrics.jsonl``. The controls are taken from the first run that has them (in the paper,
as here, the pos/neg control models do not depend on k). Writes ``table.md``,
``results.json``, ``training_curves.png`` and ``rouge_l.png`` under ``--out``.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from gist_jax import gist

CONTROLS = ("pos_control", "neg_control")


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
    return {"workdir": str(workdir), "metrics": metrics, "curves": curves}


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
    from gist_jax.quickstart import gap_recovered as share

    if not all(c in rows for c in CONTROLS):
        return math.nan
    return share({"split": {**rows, "gist": rows[row]}}, "split", key)


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
                # round() gives an int, so a share of -0.4 prints "0%", not "-0%".
                cells.append("n/a" if math.isnan(share) else f"{round(share)}%")
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    n = {split: next(iter(rows.values())).get("n") for split, rows in table.items()}
    lines += ["", "Examples per split: " + ", ".join(f"{s} {v}" for s, v in n.items())]
    return "\n".join(lines) + "\n"


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


def write_report(runs: Mapping[str, str | pathlib.Path], out: str | pathlib.Path) -> str:
    """Load ``label -> workdir`` runs and write the report files; returns the table."""
    loaded = {label: load_run(workdir) for label, workdir in runs.items()}
    table = combine(loaded)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown_table(table)
    (out / "table.md").write_text(text)
    summary = {
        "runs": {label: run["workdir"] for label, run in loaded.items()},
        "table": table,
        "gap_recovered_rougeL": {
            split: {row: gap_recovered(rows, row) for row in rows if row.startswith("gist")}
            for split, rows in table.items()
        },
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_curves(loaded, out / "training_curves.png")
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
    from absl import app, flags

    flags.DEFINE_multi_string("run", [], "LABEL=WORKDIR of a finished quickstart run.")
    flags.DEFINE_string("out", None, "Directory for table.md, results.json and the plots.")
    flags.mark_flags_as_required(["run", "out"])
    app.run(main)


if __name__ == "__main__":
    run()
