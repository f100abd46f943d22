"""``python -m benchmarks.profile``: where a compiled workload spends its time, op
by op.

Runs one workload as the benchmark builds it (the train step, or greedy decoding) under
``jax.profiler`` with XLA:CPU's per-op trace events switched on
(``--xla_cpu_enable_xprof_traceme``), dumps the optimised HLO of that computation, and
prints the traced time per op grouped by the JAX operation that produced it (the HLO's
``op_name`` metadata, layer numbers folded, so ``layers_N/mlp/up_proj/dot_general`` sums
all layers), with the output shape and the number of calls per run. Library calls (dots
run by XNNPACK/YNNPACK show as ``ynn_fusion``/``xnn_fusion``) and XLA's own loop fusions
are listed alike.

The CPU runtime runs independent ops concurrently, so the times of overlapping ops add up
to more than the wall time: compare rows with each other, not with the total.

    python -m benchmarks.profile --what=train             # SmolLM2, 8 x 128
    python -m benchmarks.profile --what=decode --batch=16
    python -m benchmarks.profile --what=train --model=tiny --top=10
    python -m benchmarks.profile --what=train --batch=4 --length=96 --dtype=bfloat16  # quickstart

For the train step it also prints the traced time summed by phase (forward, backward,
optimizer update, other; ``phase_totals``).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"
# Runtime bookkeeping events (the executor, Python frames, thread pool waits), not ops.
NOT_OPS = ("ThunkExecutor", "$", "np.asarray", "PjitFunction", "SlinkyThreadPool", "Common")


def enable_tracing(dump_dir: str, module_regex: str) -> None:
    """Turn on per-op trace events and the HLO dump; must run before JAX starts its
    backend (the first computation), which is when XLA reads ``XLA_FLAGS``."""
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (
        f"{flags} {TRACE_FLAG} --xla_dump_to={dump_dir} --xla_dump_hlo_as_text "
        f"--xla_dump_hlo_module_re={module_regex}"
    ).strip()


def op_names(dump_dir: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (output shape, op_name metadata) from the optimised dumps."""
    names: dict[str, tuple[str, str]] = {}
    pattern = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) .*?op_name=\"([^\"]*)\"")
    for path in sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt"))):
        with open(path) as f:
            for line in f:
                m = pattern.match(line)
                if m:
                    op = re.sub(r"^jit\([^)]*\)/", "", m.group(3))
                    names[m.group(1)] = (m.group(2).split("{")[0], op)
    return names


def summarize(trace_dir: str, dump_dir: str, runs: int) -> list[dict[str, Any]]:
    """Traced time per (op, shape), per run, largest first."""
    traces = sorted(glob.glob(os.path.join(trace_dir, "**", "*.json.gz"), recursive=True))
    if not traces:
        raise FileNotFoundError(f"no trace written under {trace_dir}")
    with gzip.open(traces[-1]) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = op_names(dump_dir)
    totals: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("ph") != "X" or e["name"].startswith(NOT_OPS):
            continue
        shape, op = names.get(e["name"], ("", e["name"]))
        key = (re.sub(r"layers_\d+", "layers_N", op), shape)
        totals[key][0] += e.get("dur", 0) / 1e6
        totals[key][1] += 1
    rows = [
        {"op": op, "shape": shape, "seconds": t / runs, "calls": n / runs}
        for (op, shape), (t, n) in totals.items()
    ]
    return sorted(rows, key=lambda r: -r["seconds"])


def table(rows: Sequence[dict[str, Any]], top: int) -> str:
    lines = ["| ms per run | calls | op (JAX source) | shape |", "|---:|---:|---|---|"]
    for r in rows[:top]:
        lines.append(
            f"| {r['seconds'] * 1e3:.1f} | {r['calls']:.0f} | `{r['op'][:90]}` | {r['shape']} |"
        )
    return "\n".join(lines)


# Train-step phases by the JAX transformation in an op's name: ``jvp(...)`` is the forward
# pass, ``transpose(jvp(...))`` the backward pass, and the optimizer update runs inside the
# step's ``lax.cond`` (gist_jax.train.step), so its ops start with ``cond/``.
PHASES = (("backward", "transpose("), ("forward", "jvp("), ("optimizer", "cond/"))


def phase_totals(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Traced seconds per run summed by train-step phase (``PHASES``; the rest is "other").
    Ops that overlap in time count in full, so the sum can exceed the wall time."""
    totals = {name: 0.0 for name, _ in PHASES} | {"other": 0.0}
    for r in rows:
        phase = next((name for name, prefix in PHASES if r["op"].startswith(prefix)), "other")
        totals[phase] += r["seconds"]
    return totals


def _workload(
    what: str, model_name: str, batch: int, length: int, new_tokens: int, dtype: str
) -> Callable:
    from benchmarks import common, decode_bench, train_bench
    from benchmarks.trainers import JaxTrainer

    model = common.load_model(model_name)
    if dtype:  # the quickstart's runtime: this compute dtype, layers unrolled
        model = model.with_runtime(dtype=dtype, scan_layers=False)
    if what == "train":
        trainer = JaxTrainer(model, [train_bench.train_batch(model, batch, length)])
        return trainer.step
    prompts = decode_bench.make_prompts(model, batch, length)
    return decode_bench.JaxDecoder(model, prompts, new_tokens)


def profile(
    what: str = "train",
    model: str = "default",
    batch: int = 8,
    length: int = 128,
    new_tokens: int = 64,
    runs: int = 2,
    out_dir: str | None = None,
    dtype: str = "",
) -> list[dict[str, Any]]:
    """Trace ``runs`` calls of the workload after a warm-up; returns ``summarize``'s rows."""
    if what not in ("train", "decode"):
        raise ValueError(f"what={what!r}: choose 'train' or 'decode'")
    out_dir = out_dir or tempfile.mkdtemp(prefix="gist_profile_")
    dump_dir, trace_dir = os.path.join(out_dir, "hlo"), os.path.join(out_dir, "trace")
    enable_tracing(dump_dir, "jit_step" if what == "train" else "llama_generate")
    import jax

    run = _workload(what, model, batch, length, new_tokens, dtype)
    run()  # compile and warm up outside the trace
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(runs):
        run()
    jax.profiler.stop_trace()
    return summarize(trace_dir, dump_dir, runs)


def main(argv: Sequence[str]) -> None:
    from absl import flags

    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    rows = profile(f.what, f.model, f.batch, f.length, f.new_tokens, f.runs, f.out, f.dtype)
    print(table(rows, f.top))
    if f.what == "train":
        totals = phase_totals(rows)
        print(
            "traced ms per run by phase (overlapping ops count in full): "
            + ", ".join(f"{name} {seconds * 1e3:.2f}" for name, seconds in totals.items())
        )


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_enum("what", "train", ["train", "decode"], "Workload to profile.")
    flags.DEFINE_string("model", "default", "'default' (bundled SmolLM2), 'tiny' or a dir.")
    flags.DEFINE_integer("batch", 8, "Rows (train) or prompts (decode).")
    flags.DEFINE_integer("length", 128, "Tokens per row (train) or prompt tokens (decode).")
    flags.DEFINE_integer("new_tokens", 64, "Decode: generated tokens.")
    flags.DEFINE_integer("runs", 2, "Traced calls (after one untraced warm-up).")
    flags.DEFINE_integer("top", 30, "Rows to print.")
    flags.DEFINE_string(
        "dtype",
        "",
        "'float32' or 'bfloat16': that compute dtype with unrolled layers (the "
        "quickstart's runtime); '' = the benchmark model as loaded.",
    )
    flags.DEFINE_string("out", None, "Keep the trace and HLO dump here (default: a temp dir).")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
