"""How full packed rows are: the share of row slots that hold tokens when the quickstart's
training examples (the synthetic suite encoded with the bundled tokenizer) are packed into
96-token rows with 1 (next-fit), 2, 4, 8 and 16 open rows (``data.pack_rows``).

    python -m benchmarks.probes.packing_fill [--examples 4000] [--length 96]
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks import common, inputs
from gist_jax.data import batching


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--length", type=int, default=96)
    args = parser.parse_args()
    model = common.load_model("default")
    examples = inputs.encoded_examples(model.tokenizer, "train", num_examples=args.examples)
    lengths = [(ex.length,) for ex in examples if ex.length <= args.length]
    tokens = sum(n for (n,) in lengths)
    order = np.random.default_rng([0, 0]).permutation(len(lengths)).tolist()
    print(f"{len(lengths)} examples, mean length {tokens / len(lengths):.1f} tokens")
    for open_rows in (1, 2, 4, 8, 16):
        rows = batching.pack_rows(order, lengths, (args.length,), open_rows)
        print(
            f"  open_rows {open_rows:2d}: {len(rows)} rows, {tokens / (args.length * len(rows)):.1%} "
            f"of slots hold tokens, {len(lengths) / len(rows):.2f} examples per row"
        )


if __name__ == "__main__":
    main()
