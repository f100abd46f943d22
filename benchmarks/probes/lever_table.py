"""The lever table of docs/results.md section 6: gist models trained with different recipes,
each scored against one pair of control models (their ``predictions.jsonl``), as markdown
rows (ROUGE-L, exact match, gap share with its paired bootstrap 95% interval per split),
and optionally the plot of the held-out gap share against training minutes.

    python -m benchmarks.probes.lever_table --controls=P.jsonl \\
        --row="lm, k = 1|lm|5.0|G1.jsonl" --row="distill, k = 1|distill|6.6|G2.jsonl" \\
        [--plot=out.png] [--json=out.json]

``--splits`` names other splits than suite v3's three (Alpaca+: validation_unseen,
validation_human; the plot needs validation_unseen). A row is
``label|series|minutes|gist predictions[|controls]``; ``series`` groups the plot's
lines; a row's own controls (another seed's) replace ``--controls`` for it.
With ``--baseline=G.jsonl`` each row also gets its paired ROUGE-L difference to that gist
model on the same examples (mean +- standard error), per split: the sensitive comparison
between two recipes, which overlapping gap-share intervals cannot make.
"""

from __future__ import annotations

import argparse
import json
import math

from gist_jax import gap

SPLITS = ("validation_seen", "validation_recombined", "validation_unseen")
XLABEL = "training minutes of the gist model (2-core CPU)"


def _rows(path: str, condition: str) -> list[dict]:
    with open(path) as f:
        return [r for r in map(json.loads, f) if r["condition"] == condition]


def score_row(
    controls: str, gist_path: str, splits: tuple[str, ...] = SPLITS
) -> dict[str, dict[str, float]]:
    """Per split: the gist model's mean ROUGE-L and EM, and its gap share with the interval."""
    preds = _rows(controls, "pos_control") + _rows(controls, "neg_control")
    preds += _rows(gist_path, "gist")
    out = {}
    for split in splits:
        rouge = gap.example_scores(preds, split, "rougeL")
        exact = gap.example_scores(preds, split, "exact_match")
        interval = gap.paired_interval(rouge)
        out[split] = {
            "rougeL": float(rouge["gist"].mean()),
            "exact_match": float(exact["gist"].mean()),
            "share": interval["share"],
            "low": interval["low"],
            "high": interval["high"],
        }
    return out


def paired_difference(
    baseline: str, gist_path: str, splits: tuple[str, ...] = SPLITS
) -> dict[str, tuple[float, float]]:
    """Per split: mean and standard error of the per-example ROUGE-L difference of two gist
    models, matched by (instruction, input)."""
    from gist_jax import metrics

    def scores(path: str) -> dict[tuple[str, str, str], float]:
        rows = _rows(path, "gist")
        values = metrics.rouge_l_scores(
            [r["prediction"] for r in rows], [r["reference"] for r in rows]
        )
        return {
            (r["split"], r["instruction"], r["input"]): 100.0 * v
            for r, v in zip(rows, values, strict=True)
        }

    a, b = scores(baseline), scores(gist_path)
    out = {}
    for split in splits:
        diffs = [b[k] - a[k] for k in a if k[0] == split and k in b]
        mean = sum(diffs) / len(diffs)
        var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
        out[split] = (mean, math.sqrt(var / len(diffs)))
    return out


def _cell(s: dict[str, float]) -> str:
    share = (
        "no gap"
        if math.isnan(s["share"])
        else f"{s['share']:.0f}% [{s['low']:.0f}, {s['high']:.0f}]"
    )
    return f"{s['rougeL']:.1f} ({s['exact_match']:.1f}) {share}"


def plot(rows: list[dict], path: str, xlabel: str = XLABEL) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for series in dict.fromkeys(r["series"] for r in rows):
        points = sorted(
            (
                (r["minutes"], r["scores"]["validation_unseen"])
                for r in rows
                if r["series"] == series
            ),
            key=lambda point: point[0],  # two rows of one budget: their scores do not order
        )
        xs = [m for m, _ in points]
        ys = [s["share"] for _, s in points]
        err = [
            [s["share"] - s["low"] for _, s in points],
            [s["high"] - s["share"] for _, s in points],
        ]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=series)
    ax.axhline(70, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("unseen gap recovered (%)")
    ax.legend(
        loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False, fontsize="small"
    )
    # "tight": a legend of many series below the axes stays inside the image.
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--controls", required=True, help="predictions.jsonl with both controls")
    parser.add_argument(
        "--row", action="append", required=True, help="label|series|minutes|path[|controls]"
    )
    parser.add_argument("--baseline", help="a gist predictions.jsonl to pair every row with")
    parser.add_argument("--plot", help="write the gap-share plot here")
    parser.add_argument("--xlabel", default=XLABEL, help="the plot's x axis: what minutes are")
    parser.add_argument("--json", help="write the scores here")
    parser.add_argument("--splits", default=",".join(SPLITS), help="comma-separated splits")
    args = parser.parse_args()
    splits = tuple(args.splits.split(","))
    rows = []
    for spec in args.row:
        label, series, minutes, path, *own = spec.split("|")
        scores = score_row(own[0] if own else args.controls, path, splits)
        rows.append(dict(label=label, series=series, minutes=float(minutes), scores=scores))
        cells = " | ".join(_cell(scores[s]) for s in splits)
        if args.baseline and not own:
            diff = paired_difference(args.baseline, path, splits)
            rows[-1]["paired_vs_baseline"] = diff
            cells += " | " + " | ".join(f"{m:+.1f} +- {se:.1f}" for m, se in diff.values())
        print(f"| {label} | {float(minutes):.1f} | {cells} |")
    if args.plot:
        plot(rows, args.plot, args.xlabel)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
