"""Gradient clipping + AdamW on SmolLM2-135M: ``gist_jax.train.optim.clip_by_global_norm`` (one
multiply by ``min(1, max_norm / norm)``) against ``optax.clip_by_global_norm`` (a per-element
select), first as the optimizer update alone, then inside the whole train step, each pair
timed interleaved in one process.

    python -m benchmarks.probes.bench_optimizer [--batch 8] [--length 96] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from unittest import mock

import jax
import jax.numpy as jnp
import optax

from benchmarks import common, train_bench
from benchmarks.trainers import JaxTrainer
from gist_jax.models.family import LLAMA
from gist_jax.train import optim

CLIPS = {"gist_jax": optim.clip_by_global_norm, "optax": optax.clip_by_global_norm}


def _update_fn(params, axes) -> Callable[[], None]:
    """One jitted clip + AdamW update on donated params and state, gradients of 1e-3."""
    optimizer = optim.make_optimizer(optim.make_schedule(1e-4, 1000, "constant"), axes)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 1e-3), params)

    def update(p, s, g):
        updates, s = optimizer.update(g, s, p)
        return optax.apply_updates(p, updates), s

    step = jax.jit(update, donate_argnums=(0, 1))
    state = {"p": jax.tree.map(jnp.copy, params), "s": optimizer.init(params)}

    def run() -> None:
        state["p"], state["s"] = step(state["p"], state["s"], grads)
        jax.block_until_ready(state["p"])

    run()  # compile + warm-up
    return run


def _interleave(runs: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            runs[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    model = common.load_model("default").with_runtime(scan_layers=False)
    axes = LLAMA.param_axes(model.config)
    updates, steps = {}, {}
    batch = train_bench.train_batch(model, args.batch, args.length)
    for name, clip in CLIPS.items():
        with mock.patch.object(optim, "clip_by_global_norm", clip):
            updates[name] = _update_fn(model.params, axes)
            trainer = JaxTrainer(model, [batch])
        trainer.step()  # warm-up
        steps[name] = trainer.step
    update_s = _interleave(updates, 3 * args.reps)
    step_s = _interleave(steps, args.reps)
    print(f"SmolLM2-135M, clip + AdamW; train step {args.batch} x {args.length}, unrolled")
    for name in CLIPS:
        print(
            f"  {name:8s} clipping: update alone {update_s[name] * 1000:6.0f} ms   "
            f"train step {step_s[name]:.2f} s"
        )
    print(
        f"  optax / gist_jax: update {update_s['optax'] / update_s['gist_jax']:.2f}x, "
        f"train step {step_s['optax'] / step_s['gist_jax']:.2f}x"
    )


if __name__ == "__main__":
    main()
