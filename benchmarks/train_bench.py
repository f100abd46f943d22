"""Measurement 1: the train step (forward + backward + AdamW under the gist mask, float32),
gist_jax vs PyTorch ``transformers``, same weights, same packed batch, same thread count.

Reports per implementation the median step time and spread, tokens/s (all and non-padding
tokens), achieved FLOP/s (analytic matmul FLOPs, ``flops``; XLA's own cost analysis of the
compiled step alongside), MFU against the matmul peak measured in the same run and against
the nominal spec-sheet peak, and against the same peak product timed again between the steps
(``mfu_same_minutes``: each repetition's step against the peak measured next to it, median
over repetitions; on a shared machine whose speed drifts by +-15% within minutes this is
the steadier figure); the speed ratio gist_jax / transformers; the compile time of
the jitted step (separately); the first-step losses of both sides (a check that they
compute the same function); and optionally the split of a step into forward, backward and
optimizer time for both.
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks import common, flops, inputs
from benchmarks import peak as peak_mod
from benchmarks.common import BenchModel
from benchmarks.trainers import JaxTrainer, TorchTrainer
from gist_jax.train import output_loss

JAX, TORCH = "gist_jax", "transformers"
PEAK = "peak_matmul"


def train_batch(model: BenchModel, batch_size: int, length: int, pack: bool = True) -> dict:
    """A ``[batch_size, length]`` batch of the synthetic suite's train split."""
    examples = inputs.encoded_examples(
        model.tokenizer, "train", num_examples=max(64, 2 * batch_size * length // 20)
    )
    pad = model.config.pad_token_id or 0
    return inputs.train_batches(examples, batch_size, length, int(pad), pack=pack)[0]


def _rates(seconds: float, step_flops: float, peak: dict[str, Any] | None) -> dict[str, Any]:
    achieved = step_flops / seconds
    out: dict[str, Any] = {"flops_per_s": achieved}
    if peak:
        out["mfu_measured_peak"] = achieved / peak["matmul"]["peak_flops_per_s"]
        if peak.get("nominal"):
            out["mfu_nominal_peak"] = achieved / peak["nominal"]["flops"]
    return out


def _same_minutes_mfu(
    step_s: list[float], peak_s: list[float], step_flops: float, peak_flops: float
) -> float:
    """Median over repetitions of (step FLOP/s) / (peak FLOP/s of the same repetition)."""
    ratios = [(step_flops / s) / (peak_flops / p) for s, p in zip(step_s, peak_s, strict=True)]
    return float(statistics.median(ratios))


def run(
    model: BenchModel,
    batch_size: int = 8,
    length: int = 128,
    reps: int = 5,
    warmup: int = 1,
    breakdown: bool = True,
    torch_ref: bool = True,
    peak: dict[str, Any] | None = None,
    loss_chunk: int = output_loss.DEFAULT_CHUNK,
) -> dict[str, Any]:
    """Time both train steps, interleaved; returns the JSON-ready result."""
    batch = train_batch(model, batch_size, length)
    tokens = batch_size * length
    useful = inputs.useful_tokens(batch)
    step_flops = flops.train_step_flops(model.config, batch_size, length)

    jax_trainer = JaxTrainer(model, [batch], parts=breakdown, loss_chunk=loss_chunk)
    first_losses, first_step_s = {}, {}
    first_losses[JAX], first_step_s[JAX] = common.timed(jax_trainer.step)
    fns = {JAX: jax_trainer.step}
    if breakdown:
        fns[JAX + ":forward"] = jax_trainer.forward
        fns[JAX + ":forward_backward"] = jax_trainer.forward_backward
    if torch_ref:
        common.configure_torch()
        torch_trainer = TorchTrainer(model, [batch])
        first_losses[TORCH], first_step_s[TORCH] = common.timed(torch_trainer.step)
        fns[TORCH] = torch_trainer.step
        if breakdown:
            fns[TORCH + ":forward"] = torch_trainer.forward
            fns[TORCH + ":forward_backward"] = torch_trainer.forward_backward
    if peak:
        fns[PEAK], peak_flops = peak_mod.peak_call(peak)
    timings = common.measure(fns, reps=reps, warmup=warmup)

    impls: dict[str, Any] = {}
    for name in (JAX, TORCH) if torch_ref else (JAX,):
        t = timings[name]
        entry = {
            "step": t.to_dict(),
            "tokens_per_s": tokens / t.median,
            "useful_tokens_per_s": useful / t.median,
            "first_step_s": first_step_s[name],
            "first_step_loss": first_losses[name],
            **_rates(t.median, step_flops, peak),
        }
        if peak:
            entry["mfu_same_minutes"] = _same_minutes_mfu(
                t.samples, timings[PEAK].samples, step_flops, peak_flops
            )
        if breakdown:
            fwd = timings[name + ":forward"].median
            fwd_bwd = timings[name + ":forward_backward"].median
            entry["breakdown_s"] = {
                "forward": fwd,
                "backward": fwd_bwd - fwd,
                "optimizer_and_rest": t.median - fwd_bwd,
            }
            entry["forward"] = timings[name + ":forward"].to_dict()
            entry["forward_backward"] = timings[name + ":forward_backward"].to_dict()
        impls[name] = entry
    impls[JAX]["compile_s"] = jax_trainer.compile_s
    impls[JAX]["parts_compile_s"] = jax_trainer.parts_compile_s
    impls[JAX]["xla_cost_analysis"] = jax_trainer.cost
    # What gist_jax really computes (logits only where the loss needs them).
    if loss_chunk:
        positions = output_loss.computed_positions(batch["loss_mask"], loss_chunk)
        executed = flops.executed_train_step_flops(model.config, batch_size, length, positions)
    else:
        positions, executed = tokens, step_flops
    impls[JAX]["loss_chunk"] = loss_chunk
    impls[JAX]["output_positions_computed"] = positions
    impls[JAX]["executed_step_flops"] = executed
    impls[JAX]["executed"] = _rates(timings[JAX].median, executed, peak)
    if peak:
        impls[JAX]["executed"]["mfu_same_minutes"] = _same_minutes_mfu(
            timings[JAX].samples, timings[PEAK].samples, executed, peak_flops
        )

    result: dict[str, Any] = {
        "model": model.name,
        "num_params": model.num_params,
        "batch_size": batch_size,
        "length": length,
        "tokens_per_step": tokens,
        "useful_tokens_per_step": useful,
        "analytic_step_flops": step_flops,
        "runtime": {"scan_layers": model.config.scan_layers, "remat": model.config.remat},
        "reps": reps,
        "implementations": impls,
    }
    if peak:
        result["peak_same_minutes"] = {
            "flops_per_call": peak_flops,
            "timing": timings[PEAK].to_dict(),
            "flops_per_s": peak_flops / timings[PEAK].median,
        }
    if torch_ref:
        result["speedup_vs_transformers"] = timings[TORCH].median / timings[JAX].median
        result["loss_abs_diff"] = abs(first_losses[JAX] - first_losses[TORCH])
        if breakdown:
            jb, tb = impls[JAX]["breakdown_s"], impls[TORCH]["breakdown_s"]
            result["breakdown_speedup"] = {
                part: (tb[part] / jb[part] if jb[part] > 0 else None) for part in jb
            }
    return result
