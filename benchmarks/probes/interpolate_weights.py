"""Weight interpolation with the starting model (WiSE-FT, Wortsman et al. 2022): write a
converted checkpoint whose params are ``alpha * fine-tuned + (1 - alpha) * start``, to be
evaluated like any model (``gist-eval ... --config.model.checkpoint=OUT`` with an empty
workdir). Behind the interpolation rows of docs/results.md section 8.

    python -m benchmarks.probes.interpolate_weights --tuned=W/gist/export \\
        --start=~/.cache/gist_jax/SmolLM2-135M-Instruct/gist_jax --out=OUT --alpha=0.5
"""

from __future__ import annotations

import argparse
import pathlib
from typing import Any

import jax
import numpy as np

from gist_jax.convert import common
from gist_jax.models.family import config_from_dict, family_of


def _scanned(directory: pathlib.Path) -> Any:
    """The params of a converted checkpoint in the scanned layout, whatever it was saved in
    (a training export is unrolled, a conversion scanned), so two line up leaf by leaf."""
    config = config_from_dict(common.read_model_config(directory))
    params = common.load_params(directory / common.PARAMS_DIR)
    return family_of(config).relayout_params(params, config, scan_layers=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tuned", required=True, help="a fine-tuned converted checkpoint")
    parser.add_argument("--start", required=True, help="the converted checkpoint it started from")
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--alpha", type=float, required=True, help="weight of the fine-tuned params"
    )
    args = parser.parse_args()
    tuned_dir, start_dir = pathlib.Path(args.tuned), pathlib.Path(args.start).expanduser()
    config = dict(common.read_model_config(tuned_dir), scan_layers=True)
    tuned, start = _scanned(tuned_dir), _scanned(start_dir)

    def mix(a: Any, b: Any) -> np.ndarray:
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            raise SystemExit(f"shapes differ: {a.shape} (tuned) vs {b.shape} (start)")
        return (args.alpha * a + (1 - args.alpha) * b).astype(a.dtype)

    params = jax.tree.map(mix, tuned, start)
    common.save_converted(
        args.out, params, config, common.load_tokenizer(tuned_dir), overwrite=True
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
