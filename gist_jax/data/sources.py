"""One entry point for example sources: the built-in synthetic suite or Alpaca+ files.

``load_examples("synthetic", split)`` generates the split of the built-in suite (version 1,
``gist_jax.data.synthetic``; ``"synthetic_v2"``, ``"synthetic_v3"``: versions 2 and 3;
``"synthetic_v3_wide"``: version 3 with more trained operations);
any other source is a directory
or URL prefix holding ``alpaca_plus_{split}.json`` (read and validated by ``alpaca``).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from gist_jax.data import alpaca

SYNTHETIC = "synthetic"
SYNTHETIC_V2 = "synthetic_v2"
SYNTHETIC_V3 = "synthetic_v3"
SYNTHETIC_V3_WIDE = "synthetic_v3_wide"
SUITES = (SYNTHETIC, SYNTHETIC_V2, SYNTHETIC_V3, SYNTHETIC_V3_WIDE)


def suite_module(source: str) -> Any:
    """The module of a synthetic suite (imported on first use: generating one takes a
    moment, and CLDR data is only read by version 3)."""
    import importlib

    return importlib.import_module(f"gist_jax.data.{source}")


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
    if str(source) in SUITES:
        suite = suite_module(str(source))
        if split not in suite.SPLITS:
            raise ValueError(f"unknown {source} split {split!r}; expected one of {suite.SPLITS}")
        size = suite.DEFAULT_SIZES[split] if num_examples is None else num_examples
        examples = suite.make_split(split, size, seed)
        report = alpaca.LoadReport(source=f"{source}:{split}", loaded=size, kept=size)
        return examples, report
    examples, report = alpaca.load_split(source, split, on_empty=on_empty, cache_dir=cache_dir)
    if num_examples is not None:
        examples = examples[:num_examples]
    return examples, report


def write_splits(
    source: str, out_dir: str | os.PathLike, sizes: dict[str, int], seed: int = 0
) -> dict[str, pathlib.Path]:
    """Write ``alpaca_plus_{split}.json`` under ``out_dir`` for each ``split: size`` of a
    synthetic ``source``, so the suite can be read back like Alpaca+ files; returns the
    paths."""
    paths = {}
    for split, size in sizes.items():
        path = pathlib.Path(out_dir) / f"alpaca_plus_{split}.json"
        alpaca.write_examples(path, load_examples(source, split, size, seed)[0])
        paths[split] = path
    return paths
