"""The train step with the embedding and the lowest N layers frozen (``train.frozen_layers``,
``gist_jax.train.freezing``) against the full step: same weights, same packed batch, unrolled
layers, timed interleaved in one process (the quickstart's shape by default: 8 x 96).

Prints each setting's trained parameter count, compile time and median step time, and the
step time relative to training everything.

    python -m benchmarks.probes.bench_frozen_layers [--frozen 0,10,15,20] [--batch 8] [--length 96]
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks import common, train_bench
from benchmarks.trainers import JaxTrainer
from gist_jax.train import freezing
from gist_jax.train.state import param_count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frozen", default="0,10,15,20")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    settings = [int(n) for n in args.frozen.split(",")]
    model = common.load_model("default").with_runtime(scan_layers=False)
    batch = train_bench.train_batch(model, args.batch, args.length)
    trainers = {}
    for n in settings:
        trainers[n] = JaxTrainer(model, [batch], frozen_layers=n)
        trainers[n].step()  # warm-up
    samples: dict[int, list[float]] = {n: [] for n in settings}
    for rep in range(args.reps):
        for n in settings if rep % 2 == 0 else settings[::-1]:
            start = time.perf_counter()
            trainers[n].step()
            samples[n].append(time.perf_counter() - start)
    base = statistics.median(samples[settings[0]])
    print(f"train step {args.batch} x {args.length}, {args.reps} interleaved reps")
    for n in settings:
        trained = freezing.split(model.params, freezing.frozen_modules(model.params.keys(), n))
        median = statistics.median(samples[n])
        print(
            f"  frozen_layers={n:2d}  trained params {param_count(trained[0]):>11,}  compile "
            f"{trainers[n].compile_s:5.1f} s  median step {median:.2f} s  "
            f"x{median / base:.2f} of frozen_layers={settings[0]}  samples "
            + " ".join(f"{s:.2f}" for s in samples[n])
        )


if __name__ == "__main__":
    main()
