"""``python -m benchmarks`` (from the checkout root): run the measurements, print a table
for each, and write everything (plus the machine description) as JSON.

    python -m benchmarks --out=docs/benchmarks/results.json            # everything (~30 min, 2 cores)
    python -m benchmarks --only=train --reps=3                         # one measurement
    python -m benchmarks --quick --model=tiny --out=/tmp/b.json        # seconds: tiny model, 1 rep

``run_benchmarks(BenchOptions(...))`` is the library entry point (tests call it).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

MEASUREMENTS = ("peak", "train", "decode", "gist", "scaling")


@dataclasses.dataclass
class BenchOptions:
    """What to run and how big. ``quick`` shrinks every workload to a few seconds."""

    only: tuple[str, ...] = MEASUREMENTS
    model: str = "default"
    reps: int = 5
    warmup: int = 1
    out: str | None = None
    markdown: str | None = None
    plot: str | None = None
    torch_ref: bool = True
    scan_layers: bool = False
    remat: str = "none"
    train_batch: int = 8
    train_length: int = 128
    train_breakdown: bool = True
    loss_chunk: int = 32  # = gist_jax.train.output_loss.DEFAULT_CHUNK (this module imports no jax)
    decode_batches: tuple[int, ...] = (1, 16)
    prompt_length: int = 64
    new_tokens: int = 64
    gist_examples: int = 24
    num_gist: int = 1
    alpaca_dir: str | None = None
    scaling_lengths: tuple[int, ...] = (128, 256, 512, 1024)
    scaling_tokens: int = 1024
    scaling_batches: tuple[int, ...] = (1, 2, 4, 8)
    scaling_reps: int = 3
    wait_quiet: float | None = None
    quick: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.only) - set(MEASUREMENTS))
        if unknown:
            raise ValueError(f"unknown measurement(s) {unknown}; choose from {MEASUREMENTS}")
        if self.quick:
            self.reps = self.scaling_reps = 1
            self.warmup = min(self.warmup, 1)
            self.train_batch, self.train_length = 2, 64
            self.decode_batches = (1, 2)
            self.prompt_length, self.new_tokens = 16, 8
            self.gist_examples = 2
            self.scaling_lengths, self.scaling_tokens = (32, 64), 64
            self.scaling_batches = (1, 2)


def run_benchmarks(opts: BenchOptions, echo: Any = print) -> dict[str, Any]:
    """Run the selected measurements; returns (and writes, with ``opts.out``) the results."""
    from benchmarks import common, report

    started = time.time()
    if opts.torch_ref:
        common.configure_torch()
    results: dict[str, Any] = {
        "machine": common.machine_info(),
        "options": dataclasses.asdict(opts),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
    }
    tables: list[str] = []

    def start(name: str) -> None:
        if name in opts.only or name == "peak":
            state = common.wait_for_quiet(opts.wait_quiet)
            if not state["quiet"]:
                echo(f"[{name}] load average still {state['loadavg_1min']:.2f}; measuring anyway")
            loads[name] = state

    loads: dict[str, dict[str, Any]] = {}

    def done(name: str, value: dict[str, Any]) -> None:
        value["load"] = {**loads.get(name, {}), "loadavg_1min_after": os.getloadavg()[0]}
        results[name] = value
        text = report.TABLES[name](value)
        tables.append(text)
        echo(text + "\n")
        if opts.out:  # partial results survive an interrupted run
            report.write_json(opts.out, results)

    peak = None
    if "peak" in opts.only or "train" in opts.only or "decode" in opts.only:
        from benchmarks import peak as peak_mod

        start("peak")
        sizes, mib = ((256,), 16) if opts.quick else ((1024, 2048), 256)
        peak = peak_mod.run(matmul_sizes=sizes, bandwidth_mib=mib, reps=opts.reps)
        done("peak", peak)
    model = common.load_model(opts.model, opts.scan_layers, opts.remat)
    results["model"] = {
        "name": model.name,
        "num_params": model.num_params,
        "config": model.config.to_dict(),
    }
    if "train" in opts.only:
        start("train")
        from benchmarks import train_bench

        done(
            "train",
            train_bench.run(
                model,
                opts.train_batch,
                opts.train_length,
                opts.reps,
                opts.warmup,
                opts.train_breakdown,
                opts.torch_ref,
                peak,
                opts.loss_chunk,
            ),
        )
    if "decode" in opts.only:
        start("decode")
        from benchmarks import decode_bench

        done(
            "decode",
            decode_bench.run(
                model,
                opts.decode_batches,
                opts.prompt_length,
                opts.new_tokens,
                opts.reps,
                opts.warmup,
                opts.torch_ref,
                peak,
            ),
        )
    if "gist" in opts.only:
        start("gist")
        from benchmarks import gist_efficiency

        done(
            "gist",
            gist_efficiency.run(
                model, opts.gist_examples, opts.num_gist, opts.reps, opts.warmup, opts.alpaca_dir
            ),
        )
    if "scaling" in opts.only:
        start("scaling")
        from benchmarks import scaling

        quick = opts.quick
        done(
            "scaling",
            scaling.run(
                model,
                lengths=opts.scaling_lengths,
                tokens_per_step=opts.scaling_tokens,
                batch_sizes=opts.scaling_batches,
                batch_length=32 if quick else 128,
                pack_batch_size=2 if quick else 8,
                pack_length=128,  # tiny-tokenizer examples are long: 64 fits one
                num_batches=1 if quick else 3,
                reps=opts.scaling_reps,
                warmup=opts.warmup,
                torch_ref=opts.torch_ref,
            ),
        )
        plot = opts.plot or (
            os.path.join(os.path.dirname(opts.out), "train_scaling.png") if opts.out else None
        )
        if plot:
            report.plot_scaling(results["scaling"], plot)
            results["scaling"]["plot"] = plot
    results["machine"]["loadavg_end"] = list(os.getloadavg())
    results["elapsed_s"] = time.time() - started
    if opts.out:
        report.write_json(opts.out, results)
    if opts.markdown:
        header = (
            f"Machine: {results['machine']['cpu_model']}, {results['machine']['usable_cores']} "
            f"cores ({results['machine']['device_kind']}), load average "
            f"{results['machine']['loadavg_start'][0]:.2f} at start, "
            f"{results['machine']['loadavg_end'][0]:.2f} at end\n"
        )
        with open(opts.markdown, "w") as f:
            f.write(header + "\n" + "\n\n".join(tables) + "\n")
    return results


def _ints(values: Sequence[str]) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


def main(argv: Sequence[str]) -> None:
    from absl import flags, logging

    logging.set_verbosity(logging.WARNING)  # checkpoint-restore chatter would bury the tables
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    opts = BenchOptions(
        only=tuple(f.only),
        model=f.model,
        reps=f.reps,
        warmup=f.warmup,
        out=f.out,
        markdown=f.markdown,
        plot=f.plot,
        torch_ref=f.torch_ref,
        scan_layers=f.scan_layers,
        remat=f.remat,
        train_batch=f.train_batch,
        train_length=f.train_length,
        train_breakdown=f.train_breakdown,
        loss_chunk=f.loss_chunk,
        decode_batches=_ints(f.decode_batches),
        prompt_length=f.prompt_length,
        new_tokens=f.new_tokens,
        gist_examples=f.gist_examples,
        num_gist=f.num_gist,
        alpaca_dir=f.alpaca_dir,
        scaling_lengths=_ints(f.scaling_lengths),
        scaling_tokens=f.scaling_tokens,
        scaling_batches=_ints(f.scaling_batches),
        scaling_reps=f.scaling_reps,
        wait_quiet=f.wait_quiet,
        quick=f.quick,
    )
    run_benchmarks(opts)


def _define_flags() -> None:
    from absl import flags

    d = BenchOptions()
    flags.DEFINE_list("only", list(MEASUREMENTS), f"Measurements to run, from {MEASUREMENTS}.")
    flags.DEFINE_string(
        "model", d.model, "'default' (bundled SmolLM2-135M-Instruct), 'tiny' or a checkpoint dir."
    )
    flags.DEFINE_integer("reps", d.reps, "Timed repetitions (warm-up excluded).")
    flags.DEFINE_integer("warmup", d.warmup, "Untimed warm-up calls per contender.")
    flags.DEFINE_string("out", None, "Write all results as JSON here.")
    flags.DEFINE_string("markdown", None, "Write the tables here.")
    flags.DEFINE_string("plot", None, "Scaling plot (PNG); default next to --out.")
    flags.DEFINE_bool("torch_ref", True, "Also run the PyTorch transformers reference.")
    flags.DEFINE_bool("scan_layers", d.scan_layers, "Run gist_jax with nn.scan over layers.")
    flags.DEFINE_enum("remat", d.remat, ["none", "full", "dots"], "gist_jax remat policy.")
    flags.DEFINE_integer("train_batch", d.train_batch, "Train step: rows per batch.")
    flags.DEFINE_integer("train_length", d.train_length, "Train step: tokens per row.")
    flags.DEFINE_bool("train_breakdown", d.train_breakdown, "Also time forward and backward.")
    flags.DEFINE_integer(
        "loss_chunk", d.loss_chunk, "gist_jax train step: train.loss_chunk (0 = all logits)."
    )
    flags.DEFINE_list("decode_batches", list(map(str, d.decode_batches)), "Decode batch sizes.")
    flags.DEFINE_integer("prompt_length", d.prompt_length, "Decode: prompt tokens.")
    flags.DEFINE_integer("new_tokens", d.new_tokens, "Decode: generated tokens.")
    flags.DEFINE_integer("gist_examples", d.gist_examples, "Caching table: number of prompts.")
    flags.DEFINE_integer("num_gist", d.num_gist, "Caching table: gist tokens k.")
    flags.DEFINE_string(
        "alpaca_dir", None, "Alpaca+ files (validation_human) for the caching table."
    )
    flags.DEFINE_list("scaling_lengths", list(map(str, d.scaling_lengths)), "Scaling lengths.")
    flags.DEFINE_integer("scaling_tokens", d.scaling_tokens, "Scaling: tokens per step.")
    flags.DEFINE_list("scaling_batches", list(map(str, d.scaling_batches)), "Scaling batch sizes.")
    flags.DEFINE_integer("scaling_reps", d.scaling_reps, "Scaling: timed repetitions.")
    flags.DEFINE_float(
        "wait_quiet", None, "Before each measurement wait (up to 1 h) for this load average."
    )
    flags.DEFINE_bool("quick", False, "Tiny workloads, one repetition (smoke test).")


def run() -> None:
    from absl import app

    _define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
