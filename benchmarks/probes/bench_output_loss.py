"""Time SmolLM2's output layer + cross-entropy (8 x 128 tokens, D 576, V 49152) with full
logits against ``gist_jax.train.output_loss.chunked_cross_entropy``, forward and forward +
backward, with a gisting-like loss mask (the benchmark batch's per-row completion lengths,
16% of the positions). Random data; median of 5 calls after warm-up.

    python -m benchmarks.probes.bench_output_loss
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gist_jax.train import output_loss

BATCH, LENGTH, DIM, VOCAB = 8, 128, 576, 49152
COMPLETION_LENGTHS = (7, 25, 29, 16, 27, 17, 19, 21)  # the benchmark batch's loss tokens/row


def main() -> None:
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(BATCH, LENGTH, DIM)).astype(np.float32))
    kernel = jnp.asarray((rng.normal(size=(DIM, VOCAB)) * 0.02).astype(np.float32))
    targets = jnp.asarray(rng.integers(0, VOCAB, (BATCH, LENGTH)).astype(np.int32))
    weights = np.zeros((BATCH, LENGTH), np.float32)
    for row, n in enumerate(COMPLETION_LENGTHS):
        weights[row, LENGTH - n - 3 : LENGTH - 3] = 1.0
    weights = jnp.asarray(weights)

    def full(h: jax.Array, k: jax.Array) -> jax.Array:
        logits = jnp.einsum("bld,dv->blv", h, k)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(ce * weights)

    def chunked(chunk: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
        return lambda h, k: output_loss.chunked_cross_entropy(h, k, targets, weights, chunk)

    def median_s(fn: Callable[..., Any]) -> float:
        f = jax.jit(fn)
        for _ in range(2):
            jax.block_until_ready(f(hidden, kernel))
        times = []
        for _ in range(5):
            start = time.perf_counter()
            jax.block_until_ready(f(hidden, kernel))
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    variants = {"full logits": full, **{f"chunk {c}": chunked(c) for c in (32, 64, 128)}}
    print("| variant | forward s | forward + backward s |\n|---|---|---|")
    for name, fn in variants.items():
        fwd = median_s(fn)
        both = median_s(jax.value_and_grad(fn, argnums=(0, 1)))
        print(f"| {name} | {fwd:.3f} | {both:.3f} |")


if __name__ == "__main__":
    main()
