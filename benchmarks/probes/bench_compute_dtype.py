"""The train step in bfloat16 compute against float32 (``model.dtype``; params stay float32
either way): same weights, same packed batch, unrolled layers, timed interleaved in one
process (the quickstart's shape by default: 4 x 96).

Whether bfloat16 pays on a CPU depends on the CPU: without native bfloat16 dot products XLA
converts and runs them in float32, and the casts cost time; with AVX512-BF16 (or AMX) the
products run at up to twice the float32 rate. Prints each dtype's compile time, first-step
loss (a check that both compute the same function, up to rounding), median step time and
its ratio to float32.

    python -m benchmarks.probes.bench_compute_dtype [--batch 4] [--length 96] [--reps 7]
    python -m benchmarks.probes.bench_compute_dtype --products   # one MLP-shaped product

``--products`` times one ``[384, 576] @ [576, 1536]`` product per dtype in the forms a
train step needs: forward, and the weight and input gradients as autodiff writes them
(a transposed operand) and with the transpose written out (``models.matmul.transposed``).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks import common, train_bench
from benchmarks.trainers import JaxTrainer
from gist_jax.models.matmul import product, transposed

DTYPES = ("float32", "bfloat16")


def products() -> None:
    """The product forms of one MLP-shaped layer, per dtype (median ms)."""
    forms = {
        "x @ w": lambda x, w, dy: product(x, w),
        "x.T @ dy (autodiff)": lambda x, w, dy: product(x.T, dy),
        "dy @ w.T (autodiff)": lambda x, w, dy: product(dy, w.T),
        "x.T @ dy (written out)": lambda x, w, dy: product(transposed(x), dy),
        "dy @ w.T (written out)": lambda x, w, dy: product(dy, transposed(w)),
    }
    for dtype in DTYPES:
        x, w, dy = (jnp.ones(shape, dtype) for shape in ((384, 576), (576, 1536), (384, 1536)))
        times = {name: common.median_ms(jax.jit(fn), x, w, dy) for name, fn in forms.items()}
        print(f"  {dtype:9s} " + "  ".join(f"{k} {v:.2f} ms" for k, v in times.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--products", action="store_true")
    args = parser.parse_args()
    if args.products:
        products()
        return
    model = common.load_model("default").with_runtime(scan_layers=False)
    batch = train_bench.train_batch(model, args.batch, args.length)
    trainers, first_loss = {}, {}
    for dtype in DTYPES:
        trainers[dtype] = JaxTrainer(model.with_runtime(dtype=dtype), [batch])
        first_loss[dtype] = trainers[dtype].step()  # also the warm-up
    timings = common.measure({d: trainers[d].step for d in DTYPES}, args.reps, warmup=0)
    base = timings[DTYPES[0]].median
    print(f"train step {args.batch} x {args.length}, {args.reps} interleaved reps")
    for dtype in DTYPES:
        median = timings[dtype].median
        print(
            f"  {dtype:9s} compile {trainers[dtype].compile_s:5.1f} s  first loss "
            f"{first_loss[dtype]:.4f}  median step {median:.2f} s  x{median / base:.2f} of "
            f"{DTYPES[0]}  samples " + " ".join(f"{t:.2f}" for t in timings[dtype].samples)
        )


if __name__ == "__main__":
    main()
