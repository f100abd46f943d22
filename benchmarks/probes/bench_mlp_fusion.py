"""The SwiGLU MLP's forward + backward at the quickstart's 768 tokens (SmolLM2 sizes:
576 -> 1536 -> 576), with the gate and up products as two dots (the model's formulation),
as one dot over the concatenated kernels, and as one batched dot over the stacked kernels;
timed interleaved in one process. Prints the median per variant.

    python -m benchmarks.probes.bench_mlp_fusion [--tokens 768] [--reps 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp


def separate(x, wg, wu, wd):
    return jnp.sum(((jax.nn.silu(x @ wg) * (x @ wu)) @ wd) ** 2)


def concatenated(x, wg, wu, wd):
    y = x @ jnp.concatenate([wg, wu], axis=1)
    h = wg.shape[1]
    return jnp.sum(((jax.nn.silu(y[:, :h]) * y[:, h:]) @ wd) ** 2)


def stacked(x, wg, wu, wd):
    y = jnp.einsum("td,sdf->stf", x, jnp.stack([wg, wu]))
    return jnp.sum(((jax.nn.silu(y[0]) * y[1]) @ wd) ** 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=768)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (args.tokens, 576))
    wg, wu = (0.03 * jax.random.normal(k, (576, 1536)) for k in keys[1:3])
    wd = 0.03 * jax.random.normal(keys[3], (1536, 576))
    variants = {
        name: jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))
        for name, fn in (
            ("separate", separate),
            ("concatenated", concatenated),
            ("stacked", stacked),
        )
    }
    for fn in variants.values():
        jax.block_until_ready(fn(x, wg, wu, wd))
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.reps):
        for name, fn in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(x, wg, wu, wd))
            samples[name].append(time.perf_counter() - start)
    print(f"SwiGLU MLP forward + backward, {args.tokens} tokens, {args.reps} interleaved reps")
    for name, times in samples.items():
        print(f"  {name:12s} {statistics.median(times) * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
