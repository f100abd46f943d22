"""The suite v2 figures quoted in docs/results.md section 4 and the README: distinct
training instruction strings, and the best input-only exact match per held-out split (one
fixed operation per input kind, any of 60 sampled argument settings, chosen with hindsight
on the split itself).

    python -m benchmarks.probes.suite_v2_stats
"""

from __future__ import annotations

import collections
import contextlib
import random

from gist_jax.data import synthetic_v2 as v2


def _value(kind: str, text: str) -> object:
    if kind == "word":
        return text
    items = text.split(", ")
    return [int(x) for x in items] if kind == "numbers" else items


def best_input_only(examples: list[dict]) -> float:
    """Exact match (%) of the best fixed operation per input kind, summed over kinds."""
    by_kind = collections.defaultdict(list)
    for ex in examples:
        by_kind[v2.OPS[ex["task"].split("+")[0]].kind].append(ex)
    hits = 0
    for kind, group in by_kind.items():
        rng, best = random.Random(0), 0
        for name, op in v2.OPS.items():
            if op.kind != kind:
                continue
            for slots in {repr(s): s for s in (op.args(rng) for _ in range(60))}.values():
                spec, n = v2.Spec((name,), (slots,), ""), 0
                for ex in group:
                    with contextlib.suppress(Exception):  # an op that cannot take the input
                        n += spec.answer(_value(kind, ex["input"])) == ex["output"]
                best = max(best, n)
        hits += best
    return 100.0 * hits / len(examples)


def main() -> None:
    for size in (4000, 20000):
        counts = collections.Counter(ex["instruction"] for ex in v2.make_split("train", size))
        print(
            f"train {size}: {len(counts)} distinct instructions, most repeated {max(counts.values())}x"
        )
    for split in ("validation_seen", "validation_recombined", "validation_unseen"):
        examples = v2.make_split(split, 200)
        print(f"{split}: best input-only exact match {best_input_only(examples):.1f}%")


if __name__ == "__main__":
    main()
