"""Measurement 4: how the train step scales, for both implementations.

* Sequence length: packed batches of ``lengths`` tokens per row at a constant number of
  tokens per step (``tokens_per_step``; batch = tokens / length, at least 1), so only the
  sequence length changes (attention grows with it, the rest does not).
* Batch size: packed rows of ``batch_length`` tokens, ``batch_sizes`` rows.
* Packing vs padding on the synthetic suite: ``num_batches`` consecutive batches of
  ``pack_batch_size`` rows, either packed into rows of ``pack_length`` tokens or one example
  per row padded to the batch's bucket (multiple of 32), as ``gist_jax.train`` would make
  them; throughput in useful (non-padding) tokens/s over all the batches.

Every configuration runs the real gist_jax step and the PyTorch step interleaved (compile
times excluded and reported).
"""

from __future__ import annotations

import gc
from typing import Any

from benchmarks import common, inputs
from benchmarks.common import BenchModel
from benchmarks.trainers import JaxTrainer, TorchTrainer

JAX, TORCH = "gist_jax", "transformers"


def _compare(
    model: BenchModel, batches: list[dict], reps: int, warmup: int, torch_ref: bool
) -> dict[str, Any]:
    """Time one pass over ``batches`` with each implementation."""
    jax_trainer = JaxTrainer(model, batches)
    fns = {JAX: jax_trainer.epoch}
    if torch_ref:
        fns[TORCH] = TorchTrainer(model, batches).epoch
    timings = common.measure(fns, reps=reps, warmup=warmup)
    tokens = sum(b["input_ids"].size for b in batches)
    useful = sum(inputs.useful_tokens(b) for b in batches)
    out: dict[str, Any] = {
        "shapes": [list(b["input_ids"].shape) for b in batches],
        "tokens": tokens,
        "useful_tokens": useful,
        "compile_s": jax_trainer.compile_s,
    }
    for name, t in timings.items():
        out[name] = {
            "time": t.to_dict(),
            "tokens_per_s": tokens / t.median,
            "useful_tokens_per_s": useful / t.median,
        }
    if torch_ref:
        out["speedup_vs_transformers"] = timings[TORCH].median / timings[JAX].median
    del jax_trainer, fns
    gc.collect()
    return out


def run(
    model: BenchModel,
    lengths: tuple[int, ...] = (128, 256, 512, 1024),
    tokens_per_step: int = 1024,
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8),
    batch_length: int = 128,
    pack_batch_size: int = 8,
    pack_length: int = 128,
    num_batches: int = 3,
    reps: int = 3,
    warmup: int = 1,
    torch_ref: bool = True,
) -> dict[str, Any]:
    """All three sweeps; returns the JSON-ready result."""
    if torch_ref:
        common.configure_torch()
    pad = int(model.config.pad_token_id or 0)
    longest = max([*lengths, batch_length, pack_length])
    need = max(tokens_per_step, max(batch_sizes) * batch_length) * num_batches // 10 + 200
    examples = inputs.encoded_examples(model.tokenizer, "train", need, max_length=longest)
    result: dict[str, Any] = {"model": model.name, "reps": reps}

    by_length = {}
    for length in lengths:
        batch = max(1, tokens_per_step // length)
        batches = inputs.train_batches(examples, batch, length, pad, pack=True)
        by_length[str(length)] = {
            "batch_size": batch,
            **_compare(model, batches, reps, warmup, torch_ref),
        }
    result["sequence_length"] = {"tokens_per_step": tokens_per_step, "results": by_length}

    by_batch = {}
    for batch in batch_sizes:
        batches = inputs.train_batches(examples, batch, batch_length, pad, pack=True)
        by_batch[str(batch)] = _compare(model, batches, reps, warmup, torch_ref)
    result["batch_size"] = {"length": batch_length, "results": by_batch}

    packing = {}
    for pack in (True, False):
        batches = inputs.train_batches(
            examples,
            pack_batch_size,
            pack_length,
            pad,
            pack=pack,
            num_batches=num_batches,
            bucket_multiple=pack_length if pack else 32,
        )
        packing["packed" if pack else "padded"] = _compare(model, batches, reps, warmup, torch_ref)
    result["packing"] = {
        "batch_size": pack_batch_size,
        "max_length": pack_length,
        "num_batches": num_batches,
        "results": packing,
    }
    for name in (JAX, TORCH) if torch_ref else (JAX,):
        p = packing["packed"][name]["useful_tokens_per_s"]
        q = packing["padded"][name]["useful_tokens_per_s"]
        result["packing"][f"{name}_packed_over_padded"] = p / q
    return result
