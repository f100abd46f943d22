"""Time the two kinds of work in one SmolLM2 decode step at batch 16, in isolation:

1. attention of one new token over a 127-slot KV cache in 30 layers, with the cache as
   one stacked array per keys and values (each layer reads its slice) and as one buffer
   per layer (``KVCache.per_layer``, how unrolled decoding carries it);
2. the SwiGLU MLP's three products in 30 layers with 16 rows (weights not in cache: 318
   MB in all), in JAX and in PyTorch (``F.linear``, transformers' layout);
3. with ``--sweep``: XLA's float32 throughput for one [576, 1536] weight per layer (30
   layers, 106 MB, read from memory) as the number of rows grows, with the weight stored
   [in, out] (the model's layout) and [out, in]: how fast a decode step's products can be
   at a given batch size on this CPU.

Random data; median of 20 calls after warm-up. Prints milliseconds per decode step.

    python -m benchmarks.probes.bench_decode_kernels [--rows 16] [--slots 127] [--sweep 1,8,16,32,64]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from gist_jax.models.attention import KVCache, attention

LAYERS, HEADS, KV_HEADS, HEAD_DIM, DIM, HIDDEN = 30, 9, 3, 64, 576, 1536


def attention_reads(rows: int, slots: int, rng: np.random.Generator) -> dict[str, float]:
    shape = (LAYERS, rows, KV_HEADS, HEAD_DIM, slots)
    k = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    v = jnp.asarray(rng.normal(size=shape).astype(np.float32)).swapaxes(3, 4)
    cache = KVCache(k=k, v=v, pos=jnp.zeros((rows, slots), jnp.int32), end=jnp.asarray(0))
    split = jax.jit(KVCache.per_layer)(cache)
    q = jnp.asarray(rng.normal(size=(rows, 1, HEADS, HEAD_DIM)).astype(np.float32))
    mask = jnp.ones((rows, 1, 1, slots), bool)

    @jax.jit
    def stacked(q: jax.Array, k: jax.Array, v: jax.Array) -> list[jax.Array]:
        return [attention(q, k[i], v[i], mask) for i in range(LAYERS)]

    @jax.jit
    def per_layer(q: jax.Array, ks: tuple, vs: tuple) -> list[jax.Array]:
        return [attention(q, kt, vv, mask) for kt, vv in zip(ks, vs, strict=True)]

    want, got = stacked(q, k, v), per_layer(q, split.k, split.v)
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(want, got, strict=True))
    return {
        "attention, stacked cache": common.median_ms(stacked, q, k, v),
        "attention, one buffer per layer (KVCache.per_layer)": common.median_ms(
            per_layer, q, split.k, split.v
        ),
        "max |difference|": diff,
    }


def mlp(rows: int, rng: np.random.Generator) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    common.configure_torch()  # the same thread count as XLA, as in the benchmark

    def weights(a: int, b: int) -> list[np.ndarray]:
        return [(rng.normal(size=(a, b)) * 0.02).astype(np.float32) for _ in range(LAYERS)]

    gate, up, down = weights(DIM, HIDDEN), weights(DIM, HIDDEN), weights(HIDDEN, DIM)
    x = rng.normal(size=(rows, DIM)).astype(np.float32)

    @jax.jit
    def jax_mlp(x: jax.Array, g: list, u: list, d: list) -> jax.Array:
        for i in range(LAYERS):
            x = x + (jax.nn.silu(x @ g[i]) * (x @ u[i])) @ d[i]
        return x

    # transformers' nn.Linear layout: [out, in].
    tg, tu, td = ([torch.from_numpy(w.T.copy()) for w in ws] for ws in (gate, up, down))

    def torch_mlp(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for i in range(LAYERS):
                x = x + F.linear(F.silu(F.linear(x, tg[i])) * F.linear(x, tu[i]), td[i])
        return x

    as_jax = [[jnp.asarray(w) for w in ws] for ws in (gate, up, down)]
    return {
        "MLP products, JAX": common.median_ms(jax_mlp, jnp.asarray(x), *as_jax),
        "MLP products, PyTorch": common.median_ms(torch_mlp, torch.from_numpy(x)),
    }


def row_sweep(rows_list: list[int], rng: np.random.Generator) -> list[tuple[int, float, float]]:
    """``(rows, GFLOP/s with W[in, out], GFLOP/s with W[out, in])`` per row count."""
    w_in = [(rng.normal(size=(DIM, HIDDEN)) * 0.02).astype(np.float32) for _ in range(LAYERS)]
    as_in = [jnp.asarray(w) for w in w_in]
    as_out = [jnp.asarray(np.ascontiguousarray(w.T)) for w in w_in]

    @jax.jit
    def in_out(x: jax.Array, ws: list) -> list[jax.Array]:
        return [x @ w for w in ws]

    @jax.jit
    def out_in(x: jax.Array, ws: list) -> list[jax.Array]:
        return [jax.lax.dot_general(x, w, (((1,), (1,)), ((), ()))) for w in ws]

    out = []
    for rows in rows_list:
        x = jnp.asarray(rng.normal(size=(rows, DIM)).astype(np.float32))
        flops = 2 * rows * DIM * HIDDEN * LAYERS
        rates = [
            flops / common.median_ms(fn, x, ws) / 1e6
            for fn, ws in ((in_out, as_in), (out_in, as_out))
        ]
        out.append((rows, *rates))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--slots", type=int, default=127)
    parser.add_argument("--sweep", default="", help="row counts, e.g. 1,8,16,32,64")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    if args.sweep:
        print(f"{LAYERS} products [rows, {DIM}] x [{DIM}, {HIDDEN}], GFLOP/s")
        print("  rows  W[in,out]  W[out,in]")
        for rows, a, b in row_sweep([int(r) for r in args.sweep.split(",")], rng):
            print(f"  {rows:4d}  {a:9.1f}  {b:9.1f}")
    results = {**attention_reads(args.rows, args.slots, rng), **mlp(args.rows, rng)}
    flops = 2 * args.rows * LAYERS * 3 * DIM * HIDDEN
    print(f"batch {args.rows}, {args.slots} cache slots, {LAYERS} layers (ms per decode step)")
    for name, value in results.items():
        print(f"  {name:42s} {value:10.3g}")
    for name in ("MLP products, JAX", "MLP products, PyTorch"):
        print(f"  {name + ' GFLOP/s':42s} {flops / results[name] / 1e6:10.1f}")


if __name__ == "__main__":
    main()
