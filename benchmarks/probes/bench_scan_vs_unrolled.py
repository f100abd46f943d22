"""The train step with the layers under ``nn.scan`` vs unrolled, same weights, same packed
batch, timed interleaved in one process (the quickstart's shape by default: 8 x 96).

Prints each layout's compile time and median step time, and the ratio scan / unrolled.

    python -m benchmarks.probes.bench_scan_vs_unrolled [--batch 8] [--length 96] [--reps 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks import common, train_bench
from benchmarks.trainers import JaxTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--reps", type=int, default=6)
    args = parser.parse_args()
    base = common.load_model("default")
    trainers = {}
    for scan in (True, False):
        model = base.with_runtime(scan_layers=scan)
        trainers[scan] = JaxTrainer(
            model, [train_bench.train_batch(model, args.batch, args.length)]
        )
        trainers[scan].step()  # warm-up
    samples: dict[bool, list[float]] = {True: [], False: []}
    for rep in range(args.reps):
        for scan in (True, False) if rep % 2 == 0 else (False, True):
            start = time.perf_counter()
            trainers[scan].step()
            samples[scan].append(time.perf_counter() - start)
    print(f"train step {args.batch} x {args.length}, {args.reps} interleaved reps")
    for scan, name in ((True, "nn.scan"), (False, "unrolled")):
        print(
            f"  {name:9s} compile {trainers[scan].compile_s:5.1f} s   median step "
            f"{statistics.median(samples[scan]):.2f} s   samples "
            + " ".join(f"{s:.2f}" for s in samples[scan])
        )
    ratio = statistics.median(samples[True]) / statistics.median(samples[False])
    print(f"  scan / unrolled: {ratio:.3f}")


if __name__ == "__main__":
    main()
