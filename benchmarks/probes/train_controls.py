"""Train the quickstart's two controls (pos_control, neg_control) for a given number of
steps with the quickstart's recipe, without its gist model: the equal-budget rows of
docs/results.md section 4.

    python -m benchmarks.probes.train_controls --config=configs/quickstart_v2.py --steps=267 --out=W
    python -m gist_jax.evaluate --config=configs/quickstart_v2.py --workdir=W/pos_control --conditions=pos_control
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import time

from gist_jax import train
from gist_tools import quickstart


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="a quickstart config file")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True, help="workdir; the controls go in OUT/<condition>")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("quickstart_config", args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = quickstart.prepare_config(module.get_config())
    config.train.steps = args.steps
    configs = quickstart.training_configs(config)
    for condition in ("pos_control", "neg_control"):
        start = time.monotonic()
        result = train.train_and_evaluate(
            configs[condition], pathlib.Path(args.out) / condition, progress_bar=False
        )
        print(f"{condition}: step {result.step}, {time.monotonic() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
