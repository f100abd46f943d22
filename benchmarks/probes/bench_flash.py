"""The "flash" attention kernel on a CPU, where it runs in Pallas interpret mode (each
kernel lowered to a loop over its tiles), so that what it measures is the shape of its
cost, not GPU figures:

* ``--what=memory``: XLA's planned memory of a forward + backward at long rows, per
  attention implementation, compiled and not run (``benchmarks.device_check``'s memory
  section at the lengths the accelerator issue names, on the benchmarks' tiny LLaMA: 2
  layers, 4 heads of 16);
* ``--what=skip``: one attention layer's forward + gradient over one row, "flash" under
  masks that hide more and more tiles (plain causal, the gist mask, 8 packed examples),
  with "reference" on the same inputs: skipped tiles are time not spent.

    python -m benchmarks.probes.bench_flash --what=memory [--lengths=2048,8192,32768]
    python -m benchmarks.probes.bench_flash --what=skip [--length=1024]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, device_check
from gist_jax import gist
from gist_jax.models.attention import attention


def memory(lengths: tuple[int, ...], impls: list[str]) -> None:
    spec = dict(device_check.SMOKE, memory_lengths=lengths)
    used = device_check.memory(device_check.make_model(spec), spec, impls)
    print("| tokens | " + " | ".join(impls) + " |")
    print("|---|" + "---|" * len(impls))
    for length in lengths:
        cells = []
        for impl in impls:
            value = used[f"{impl} {length}"]
            cells.append(value if isinstance(value, str) else f"{value / 2**20:,.0f} MiB")
        print(f"| {length:,} | " + " | ".join(cells) + " |")


def _mask(length: int, examples: int, condition: str) -> gist.SelfMask:
    """One row of ``examples`` equal packed examples, gist tokens at an eighth of each."""
    size = length // examples
    positions = np.tile(np.arange(size, dtype=np.int32), examples)[None]
    segments = np.repeat(np.arange(1, examples + 1, dtype=np.int32), size)[None]
    first = np.full((1, length), size // 8, np.int32)
    last = first + 1
    return gist.SelfMask(positions, positions, first, last, condition, segments, segments)


def skip(length: int) -> None:
    heads, kv_heads, dim = 9, 3, 64  # SmolLM2's attention
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, length, heads, dim)), jnp.float32)
    keys_t = jnp.asarray(rng.standard_normal((1, kv_heads, dim, length)), jnp.float32)
    values = jnp.asarray(rng.standard_normal((1, kv_heads, length, dim)), jnp.float32)
    cases = {
        "causal (pos_control), 1 example": _mask(length, 1, "pos_control"),
        "gist mask, 1 example": _mask(length, 1, "gist"),
        "gist mask, 8 packed examples": _mask(length, 8, "gist"),
    }

    def step(impl: str):
        def loss(q, keys_t, values, mask):
            mask = mask if impl == "flash" else mask.dense()
            return jnp.sum(attention(q, keys_t, values, mask, implementation=impl))

        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        return lambda mask: jax.block_until_ready(grad(q, keys_t, values, mask))

    fns = {}
    for impl in ("reference", "flash"):
        run = step(impl)
        for name, mask in cases.items():
            fns[(impl, name)] = lambda run=run, mask=mask: run(mask)
    timings = common.measure(fns, reps=5)
    print(f"one layer's attention forward + gradient, 1 x {length:,} tokens, ms (median of 5)")
    print("| mask | reference | flash | flash / its causal time |")
    print("|---|---|---|---|")
    causal = timings[("flash", next(iter(cases)))].median
    for name in cases:
        ref, flash = timings[("reference", name)].median, timings[("flash", name)].median
        print(f"| {name} | {ref * 1e3:.0f} | {flash * 1e3:.0f} | {flash / causal:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--what", choices=("memory", "skip"), default="memory")
    parser.add_argument("--lengths", default="2048,8192,32768")
    parser.add_argument("--implementations", default="reference,cpu,flash")
    parser.add_argument("--length", type=int, default=1024)
    args = parser.parse_args()
    if args.what == "memory":
        memory(tuple(int(n) for n in args.lengths.split(",")), args.implementations.split(","))
    else:
        skip(args.length)


if __name__ == "__main__":
    main()
