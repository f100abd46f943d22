"""Which relations of synthetic suite v3 the untouched model can already do: the check
behind the suite's choice of never-trained relations (docs/results.md section 5).

    python -m benchmarks.probes.relation_probe [--per_op=8] [--shots=3] [--ops=a,b]

For every op of ``gist_jax.data.synthetic_v3`` (or those named), it builds ``per_op``
prompts from the op's first phrase, each with ``shots`` solved demonstrations of the same
op in the prompt's input field, decodes them greedily with the bundled
SmolLM2-135M-Instruct (all prompt tokens visible) and prints the share whose first output
line equals the answer (case-insensitive), per op, best first. Demonstrations, not a bare
instruction, because the untouched model does not follow this prompt template: the probe
asks whether it *knows* the relation, which is what a fine-tuned model can draw on.
"""

from __future__ import annotations

import argparse
import collections
import random

from gist_jax import evaluate, model_loading
from gist_jax.convert import loading
from gist_jax.data import suite
from gist_jax.data import synthetic_v3 as v3
from gist_tools.quickstart import default_config


def probe_examples(ops: list[str], per_op: int, shots: int, seed: int = 0) -> list[dict]:
    """``per_op`` few-shot prompts per op, as evaluation examples (``task`` = the op)."""
    rng = random.Random(seed)
    examples = []
    for name in ops:
        op = v3.OPS[name]
        kind = v3.KINDS[0] if op.kind == "any" else op.kind
        slots = op.args(rng)
        instruction = op.phrases[0].format(x=v3._NOUN[kind], **slots)
        instruction = suite.expand(instruction[0].upper() + instruction[1:], rng) + "."
        solved = []
        for x in rng.sample(v3.INPUTS[kind], len(v3.INPUTS[kind])):
            try:
                solved.append((x, op.apply(slots, x)))
            except suite.Invalid:
                continue
        for i in range(min(per_op, len(solved) - shots)):
            demos = solved[i + 1 : i + 1 + shots]
            context = "".join(f"{x}\nOutput: {y}\n\nInput: " for x, y in demos)
            x, y = solved[i]
            examples.append(
                {"instruction": instruction, "input": context + x, "output": y, "task": name}
            )
    return examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per_op", type=int, default=8)
    parser.add_argument("--shots", type=int, default=3)
    parser.add_argument("--ops", default="", help="comma-separated op names (default: all)")
    args = parser.parse_args()
    ops = args.ops.split(",") if args.ops else list(v3.OPS)
    examples = probe_examples(ops, args.per_op, args.shots)
    config = default_config()
    loaded = model_loading.load_model(config)
    _, params, _ = loading.load_checkpoint(loaded.checkpoint_dir, scan_layers=False)
    report = evaluate.evaluate(
        loaded.config,
        params,
        loaded.tokenizer,
        {"probe": examples},
        ("pos_control",),
        num_gist=1,
        max_new_tokens=12,
    )
    hits = collections.defaultdict(list)
    for ex, row in zip(examples, report.predictions, strict=True):
        first_line = row["prediction"].split("\n")[0].strip().lower()
        hits[ex["task"]].append(first_line == ex["output"].lower())
    for name, h in sorted(hits.items(), key=lambda kv: -sum(kv[1]) / len(kv[1])):
        side = "unseen" if name in v3.UNSEEN_OPS else "trained"
        print(f"{name:20s} {side:8s} {sum(h)}/{len(h)}")


if __name__ == "__main__":
    main()
