"""What the wrong answers on the never-trained relations are: for each condition, the share
of ``validation_unseen`` predictions that are right (exact), that are a *trained*
operation's answer on the same input ("IT", the country code, for "the official language
of Italy"), that repeat the input, and the rest. Behind docs/results.md section 10.

    python -m benchmarks.probes.wrong_answers --source=synthetic_v3 --seed=0 \\
        --predictions=docs/results/synthetic_v3/steps250_seed0/predictions.jsonl

``--source`` is the suite the models were trained on (its trained operations are the ones
a wrong answer is checked against); ``--seed`` is the run's ``train.seed``, which chose the
evaluation examples, so each prediction's relation is known.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import random

from gist_jax.data import sources

# Argument settings tried per trained operation (e.g. "add k" for k = 2..9).
_SETTINGS = 60


def trained_answers(suite: object, value: str, kind: str, rng: random.Random) -> set[str]:
    """Every answer a trained operation of ``suite`` gives for ``value`` (of ``kind``)."""
    out = set()
    for name in suite.TRAIN_OPS:
        op = suite.OPS[name]
        if op.kind not in (kind, "any"):
            continue
        settings = {repr(s): s for s in (op.args(rng) for _ in range(_SETTINGS))}
        for slots in settings.values():
            with contextlib.suppress(Exception):
                out.add(str(op.apply(slots, value)))
    return out


def classify(rows: list[dict], suite: object, tasks: dict[tuple[str, str], str]) -> dict:
    """condition -> Counter of right / trained_relation / input / other."""
    answers: dict[tuple[str, str], set[str]] = {}  # (input, kind) -> trained answers
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for row in rows:
        prediction, reference = row["prediction"].strip(), row["reference"].strip()
        task = tasks[(row["instruction"], row["input"])]
        op = suite.OPS[task]
        kind = op.kind if op.kind != "any" else _kind_of(suite, row["input"])
        if prediction == reference:
            label = "right"
        elif prediction in answers.setdefault(
            (row["input"], kind),
            trained_answers(suite, row["input"], kind, random.Random(row["input"])),
        ):
            label = "trained_relation"
        elif prediction == row["input"].strip():
            label = "input"
        else:
            label = "other"
        counts[row["condition"]][label] += 1
    return counts


def _kind_of(suite: object, text: str) -> str:
    return next(k for k in suite.KINDS if text in suite.INPUTS[k])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", required=True, action="append")
    parser.add_argument("--source", default="synthetic_v3")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    suite = sources.suite_module(args.source)
    examples = suite.make_split("validation_unseen", 400, args.seed)
    tasks = {(ex["instruction"], ex["input"]): ex["task"] for ex in examples}
    labels = ("right", "trained_relation", "input", "other")
    print("| predictions | condition | n | " + " | ".join(labels) + " |")
    print("|---|---|---|" + "---|" * len(labels))
    for path in args.predictions:
        with open(path) as f:
            rows = [json.loads(line) for line in f]
        rows = [r for r in rows if r["split"] == "validation_unseen"]
        for condition, count in sorted(classify(rows, suite, tasks).items()):
            n = sum(count.values())
            cells = " | ".join(f"{100 * count[label] / n:.0f}%" for label in labels)
            print(f"| {path} | {condition} | {n} | {cells} |")


if __name__ == "__main__":
    main()
