"""The train step under each objective (``train.objective``): plain LM, distillation from
the student itself ("self"), and from a frozen teacher passed to the step: compiled memory
(XLA's temporary buffers and arguments) and median step time, interleaved in one process,
on the bundled SmolLM2-135M at the quickstart's shape (8 x 96 packed synthetic_v2 rows).

    python -m benchmarks.probes.bench_distill [--reps 4] [--batch 8] [--length 96]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from gist_jax import data
from gist_jax.models import llama
from gist_jax.models.family import LLAMA
from gist_jax.train import optim, output_loss
from gist_jax.train import step as tstep
from gist_jax.train.state import TrainState

OBJECTIVES = {
    "lm": tstep.LM,
    "mix, self teacher": tstep.Objective(distill_weight=0.5, teacher="self"),
    "distill, frozen teacher": tstep.Objective(distill_weight=1.0, teacher="frozen"),
    "mix, frozen teacher, after_gist": tstep.Objective(
        distill_weight=0.5, teacher="frozen", positions="after_gist"
    ),
}


def _batch(model: common.BenchModel, rows: int, length: int) -> dict[str, jax.Array]:
    examples, _ = data.load_examples("synthetic_v2", "train", 400)
    encoded, _ = data.encode_decoder_examples(examples, model.tokenizer, 1, length)
    pad_id = data.PieceEncoder(model.tokenizer).pad_id
    it = data.BatchIterator(encoded, rows, length, pad_id, pack=True, bucket_multiple=length)
    batch = next(it)
    return {k: jnp.asarray(batch[k]) for k in LLAMA.batch_keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--reps", type=int, default=4)
    args = parser.parse_args()
    model = common.load_model("default").with_runtime(scan_layers=False)
    cfg = model.config
    module = llama.build_model(cfg)
    schedule = optim.make_schedule(1e-5, 1_000_000, "constant")
    optimizer = optim.make_optimizer(schedule, LLAMA.param_axes(cfg), clip_norm=1.0)
    batch = _batch(model, args.batch, args.length)
    teacher = jax.tree.map(jnp.copy, model.params)
    runs = {}
    for name, objective in OBJECTIVES.items():
        params = jax.tree.map(jnp.copy, model.params)
        state = TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=jax.random.key_data(jax.random.key(0)),
        )
        step = jax.jit(
            tstep.step_function(
                module,
                LLAMA,
                optimizer,
                schedule,
                "gist",
                loss_chunk=output_loss.DEFAULT_CHUNK,
                objective=objective,
            ),
            donate_argnums=(0,),
        )
        extra = (teacher,) if objective.frozen_teacher else ()
        t0 = time.perf_counter()
        compiled = step.lower(state, batch, *extra).compile()
        compile_s = time.perf_counter() - t0
        memory = compiled.memory_analysis()
        state, metrics = compiled(state, batch, *extra)  # warm-up
        jax.block_until_ready(metrics)
        runs[name] = {"compiled": compiled, "state": state, "extra": extra, "times": []}
        runs[name].update(
            compile_s=compile_s,
            temp_mib=memory.temp_size_in_bytes / 2**20,
            args_mib=memory.argument_size_in_bytes / 2**20,
        )
    names = list(runs)
    for rep in range(args.reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            run = runs[name]
            start = time.perf_counter()
            run["state"], metrics = run["compiled"](run["state"], batch, *run["extra"])
            jax.block_until_ready(metrics)
            run["times"].append(time.perf_counter() - start)
    base = statistics.median(runs["lm"]["times"])
    print(f"train step {args.batch} x {args.length}, {args.reps} interleaved reps")
    for name, run in runs.items():
        median = statistics.median(run["times"])
        print(
            f"  {name:32s} compile {run['compile_s']:5.1f} s  temp {run['temp_mib']:7.1f} MiB  "
            f"args {run['args_mib']:7.1f} MiB  median step {median:.2f} s  ({median / base:.2f}x)"
        )


if __name__ == "__main__":
    main()
