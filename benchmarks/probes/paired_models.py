"""Paired per-example ROUGE-L differences between two runs' predictions of the same
condition on the same examples (e.g. a control model trained with and without a change):
mean +- standard error per split, from ``gist_jax.metrics.rouge_l_scores``. Behind the
paired control rows of docs/results.md section 8.

    python -m benchmarks.probes.paired_models --new=NEW/predictions.jsonl \\
        --old=docs/results/synthetic_v3/k2_seed0/predictions.jsonl \\
        [--conditions=gist,pos_control,neg_control] [--new_condition=pos_control] \\
        [--splits=validation_unseen]

Repeat ``--new`` / ``--old`` (one pair per seed) for a pooled row: the mean of the seeds'
paired means, with their standard errors combined (docs/results.md section 12).

Two runs on different suites share only some splits (``synthetic_v3_wide`` holds version
3's never-trained examples): ``--splits`` names the ones to pair.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from gist_jax.metrics import rouge_l_scores


def _scores(path: str, condition: str) -> dict[str, tuple[list[tuple[str, str]], np.ndarray]]:
    """split -> (the examples' (instruction, input) in file order, ROUGE-L x 100)."""
    rows: dict[str, list[dict]] = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if row["condition"] == condition:
                rows.setdefault(row["split"], []).append(row)
    out = {}
    for split, items in rows.items():
        scores = rouge_l_scores([r["prediction"] for r in items], [r["reference"] for r in items])
        out[split] = ([(r["instruction"], r["input"]) for r in items], 100 * np.asarray(scores))
    return out


def _paired(new_path: str, old_path: str, condition: str, new_condition: str, splits: str):
    """split -> (new mean, old mean, paired mean difference, its standard error)."""
    new = _scores(new_path, new_condition)
    old = _scores(old_path, condition)
    wanted = set(splits.split(",")) if splits else set(new) & set(old)
    out = {}
    for split in sorted(wanted):
        if split not in new or split not in old:
            raise SystemExit(f"{split}: not in both files")
        (new_keys, a), (old_keys, b) = new[split], old[split]
        if new_keys != old_keys:
            raise SystemExit(f"{split}: the two files hold different examples")
        d = a - b
        out[split] = (a.mean(), b.mean(), d.mean(), d.std(ddof=1) / np.sqrt(len(d)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new", required=True, action="append", help="repeat for seeds")
    parser.add_argument("--old", required=True, action="append", help="one per --new")
    parser.add_argument("--conditions", default="gist,pos_control,neg_control")
    parser.add_argument("--new_condition", default=None, help="the new file's condition, if other")
    parser.add_argument("--splits", default="", help="comma-separated; default: all in both")
    args = parser.parse_args()
    if len(args.new) != len(args.old):
        raise SystemExit(f"{len(args.new)} --new files but {len(args.old)} --old files")
    print("| condition | split | new | old | paired new - old |")
    print("|---|---|---|---|---|")
    for condition in args.conditions.split(","):
        runs = [
            _paired(n, o, condition, args.new_condition or condition, args.splits)
            for n, o in zip(args.new, args.old, strict=True)
        ]
        for split in runs[0]:
            for a, b, d, se in (run[split] for run in runs):
                print(f"| {condition} | {split} | {a:.1f} | {b:.1f} | {d:+.1f} +- {se:.1f} |")
            if len(runs) > 1:
                # Several seeds: the mean of their paired means, with their errors combined.
                diffs = np.array([run[split][2] for run in runs])
                errors = np.array([run[split][3] for run in runs])
                pooled_se = np.sqrt(np.sum(errors**2)) / len(runs)
                print(
                    f"| {condition} | {split} | pooled | | {diffs.mean():+.1f} +- {pooled_se:.1f} |"
                )


if __name__ == "__main__":
    main()
