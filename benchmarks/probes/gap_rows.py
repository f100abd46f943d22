"""Gap shares of a gist model against controls evaluated in other runs: the checkpoint and
equal-budget rows of docs/results.md section 4, whose three models were not decoded in one
quickstart (``benchmarks.replication`` covers rows that were).

    python -m benchmarks.probes.gap_rows --pos=P.jsonl --neg=N.jsonl --gist=G.jsonl

Each file is a ``predictions.jsonl`` (``gist_jax.evaluate`` or a quickstart's results/);
only its own condition's rows are read. Prints, per split, the mean ROUGE-L (EM) of each
condition, the paired differences with their standard errors, and the gap share with its
paired bootstrap 95% interval (``gist_jax.gap``).
"""

from __future__ import annotations

import argparse
import json
import math

from gist_jax import gap


def _rows(path: str, condition: str) -> list[dict]:
    with open(path) as f:
        return [r for r in map(json.loads, f) if r["condition"] == condition]


def _share(interval: dict[str, float]) -> str:
    if math.isnan(interval["share"]):
        return "no gap"
    return f"{interval['share']:.0f}% [{interval['low']:.0f}%, {interval['high']:.0f}%]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for condition in ("pos", "neg", "gist"):
        parser.add_argument(f"--{condition}", required=True, help="a predictions.jsonl")
    args = parser.parse_args()
    preds = (
        _rows(args.pos, "pos_control") + _rows(args.neg, "neg_control") + _rows(args.gist, "gist")
    )
    for split in dict.fromkeys(r["split"] for r in preds):
        rouge = gap.example_scores(preds, split, "rougeL")
        exact = gap.example_scores(preds, split, "exact_match")
        if rouge is None:
            print(f"{split}: not every condition has the same examples")
            continue
        scores = ", ".join(
            f"{c} {rouge[c].mean():.1f} ({exact[c].mean():.1f})" for c in gap.CONDITIONS
        )
        diffs = []
        for c in ("pos_control", "gist"):
            d = rouge[c] - rouge["neg_control"]
            diffs.append(f"{c} - neg {d.mean():+.1f} +- {d.std(ddof=1) / math.sqrt(len(d)):.1f}")
        print(
            f"{split}: {scores}; {'; '.join(diffs)}; gap ROUGE-L "
            f"{_share(gap.paired_interval(rouge))}, EM {_share(gap.paired_interval(exact))}"
        )


if __name__ == "__main__":
    main()
