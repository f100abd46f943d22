"""Does the CPU-tuned attention (``model.attention="cpu"``, a hand-written gradient) still
pay for itself against the reference (einsums and ``jax.nn.softmax``, differentiated by
JAX)? Times both implementations of ``gist_jax.models.attention.attention`` in the same
process, on SmolLM2-135M's head shapes (9 query heads, 3 key/value heads, head size 64)
and on a T5-like shape with a relative position bias:

* training: forward + gradient of all inputs, per layer, at the quickstart's 4 x 96 tokens
  and at 1 x 1024 tokens, with a causal mask;
* decoding: one new token over a 127-slot cache at batch 16, 30 layers (forward only).

Random data; median of 20 calls after warm-up; milliseconds, and reference / cpu.

    python -m benchmarks.probes.bench_attention
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from gist_jax.models.attention import attention

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 30, 9, 3, 64


def _normal(rng: np.random.Generator, *shape: int) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32))


def training(
    rng: np.random.Generator, batch: int, length: int, heads: int, kv_heads: int, bias: bool
) -> dict[str, float]:
    """Forward + gradient of one layer's attention, per implementation."""
    q = _normal(rng, batch, length, heads, HEAD_DIM)
    k_t = _normal(rng, batch, kv_heads, HEAD_DIM, length)
    v = _normal(rng, batch, kv_heads, length, HEAD_DIM)
    b = _normal(rng, 1, heads, length, length) if bias else None
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    weights = _normal(rng, batch, length, heads, HEAD_DIM)
    scale = 1.0 if bias else None
    times = {}
    for impl in ("reference", "cpu"):

        def loss(q, k_t, v, b, impl=impl):
            out = attention(q, k_t, v, mask, bias=b, scale=scale, implementation=impl)
            return jnp.sum(out * weights)

        step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3) if bias else (0, 1, 2)))
        times[impl] = common.median_ms(step, q, k_t, v, b)
    return times


def decoding(rng: np.random.Generator, rows: int, slots: int) -> dict[str, float]:
    """One decode step's attention over per-layer cache buffers, 30 layers."""
    q = _normal(rng, rows, 1, HEADS, HEAD_DIM)
    ks = tuple(_normal(rng, rows, KV_HEADS, HEAD_DIM, slots) for _ in range(LAYERS))
    vs = tuple(_normal(rng, rows, KV_HEADS, slots, HEAD_DIM) for _ in range(LAYERS))
    mask = jnp.ones((rows, 1, 1, slots), bool)
    times = {}
    for impl in ("reference", "cpu"):

        @jax.jit
        def step(q, ks, vs, impl=impl):
            return [
                attention(q, k, v, mask, implementation=impl) for k, v in zip(ks, vs, strict=True)
            ]

        times[impl] = common.median_ms(step, q, ks, vs)
    return times


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
    rows = {
        "train 4 x 96, SmolLM2 heads": training(rng, 4, 96, HEADS, KV_HEADS, bias=False),
        "train 1 x 1024, SmolLM2 heads": training(rng, 1, 1024, HEADS, KV_HEADS, bias=False),
        "train 8 x 128, T5 (8 heads, bias)": training(rng, 8, 128, 8, 8, bias=True),
        "decode 16 rows, 127 slots, 30 layers": decoding(rng, 16, 127),
    }
    print("| case | reference ms | cpu ms | reference / cpu |")
    print("|---|---|---|---|")
    for name, t in rows.items():
        ratio = t["reference"] / t["cpu"]
        print(f"| {name} | {t['reference']:.2f} | {t['cpu']:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
