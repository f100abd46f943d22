"""One entry point for example sources: the built-in synthetic suite or Alpaca+ files.

``load_examples("synthetic", split)`` generates the split; any other source is a directory
or URL prefix holding ``alpaca_plus_{split}.json`` (read and validated by ``alpaca``).
"""

from __future__ import annotations

import os
from typing import Any

from gist_jax.data import alpaca

SYNTHETIC = "synthetic"


def load_examples(
    source: str | os.PathLike,
    split: str,
    num_examples: int | None = None,
    seed: int = 0,
    on_empty: str = "skip",
    cache_dir: str | os.PathLike | None = None,
) -> tuple[list[dict[str, Any]], alpaca.LoadReport]:
    """Examples of ``split`` from ``source`` and a load report.

    For the synthetic suite, ``num_examples`` (default ``synthetic.DEFAULT_SIZES``) and
    ``seed`` choose what is generated; for files, ``num_examples`` keeps only the first
    that many examples (after validation) and ``seed`` is unused.
    """
    if str(source) == SYNTHETIC:
        # Imported here so `python -m gist_jax.data.synthetic` does not import it twice.
        from gist_jax.data import synthetic

        size = synthetic.DEFAULT_SIZES[split] if num_examples is None else num_examples
        examples = synthetic.make_split(split, size, seed)
        report = alpaca.LoadReport(source=f"{SYNTHETIC}:{split}", loaded=size, kept=size)
        return examples, report
    examples, report = alpaca.load_split(source, split, on_empty=on_empty, cache_dir=cache_dir)
    if num_examples is not None:
        examples = examples[:num_examples]
    return examples, report
