"""Measurement 2: greedy decoding throughput, ``gist_jax.inference.decode.generate`` vs
``transformers`` ``generate``, same weights, same prompts, same run.

Each call decodes ``new_tokens`` tokens (EOS does not stop either side: gist_jax gets no
EOS ids, transformers ``min_new_tokens``) after prompts of exactly ``prompt_length`` real
tokens, at each batch size. Generated tokens/s = batch x new tokens / median call time;
the first gist_jax call (which compiles) is reported separately. At batch 1 decoding is
bound by reading every weight once per token, so the result is also compared with
``measured bandwidth / weight bytes``. The generated tokens of both sides are compared
(float32 rounding may flip a near-tie argmax, after which sequences diverge).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks import common, inputs
from benchmarks.common import BenchModel
from gist_jax.inference import decode

JAX, TORCH = "gist_jax", "transformers"


def make_prompts(model: BenchModel, count: int, length: int) -> list[list[int]]:
    """``count`` prompts of exactly ``length`` tokens cut from synthetic-suite text."""
    examples = inputs.data.load_examples("synthetic", "validation_seen", 64 + count * 4)[0]
    text = "\n\n".join(
        f"Instruction: {e['instruction']}\nInput: {e['input']}\nOutput: {e['output']}"
        for e in examples
    )
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = model.config.bos_token_id
    head = [int(bos)] if isinstance(bos, int) else []
    body = length - len(head)
    if len(ids) < count * body:
        raise ValueError(f"not enough text for {count} prompts of {length} tokens")
    return [head + ids[i * body : (i + 1) * body] for i in range(count)]


class JaxDecoder:
    """``gist_jax.inference.decode.generate`` on fixed prompts (greedy, no EOS stop)."""

    def __init__(self, model: BenchModel, prompts: list[list[int]], new_tokens: int):
        self.model, self.prompts, self.new_tokens = model, prompts, new_tokens

    def __call__(self) -> list[list[int]]:
        out = decode.generate(
            self.model.config,
            self.model.params,
            self.prompts,
            max_new_tokens=self.new_tokens,
            batch_size=len(self.prompts),
            eos_token_ids=(),
        )
        return [g.tokens for g in out]


class TorchDecoder:
    """``transformers`` greedy ``generate`` on the same prompts."""

    def __init__(self, model: BenchModel, prompts: list[list[int]], new_tokens: int):
        import torch
        from transformers import GenerationConfig

        self.torch = torch
        self.model = model.torch_model().eval()
        self.ids = torch.as_tensor(np.asarray(prompts, np.int64))
        eos = model.config.eos_token_id
        self.config = GenerationConfig(
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
            pad_token_id=model.config.pad_token_id,
        )

    def __call__(self) -> list[list[int]]:
        with self.torch.inference_mode():
            out = self.model.generate(
                input_ids=self.ids,
                attention_mask=self.torch.ones_like(self.ids),
                generation_config=self.config,
            )
        return out[:, self.ids.shape[1] :].tolist()


def _agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    same_prefix = []
    for x, y in zip(a, b, strict=True):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        same_prefix.append(n)
    return {
        "identical_rows": sum(x == y for x, y in zip(a, b, strict=True)),
        "rows": len(a),
        "mean_common_prefix_tokens": float(np.mean(same_prefix)),
    }


def run(
    model: BenchModel,
    batch_sizes: tuple[int, ...] = (1, 16),
    prompt_length: int = 64,
    new_tokens: int = 64,
    reps: int = 5,
    warmup: int = 1,
    torch_ref: bool = True,
    peak: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Decode at every batch size with both implementations, interleaved."""
    if torch_ref:
        common.configure_torch()
    weight_bytes = 4 * model.num_params
    result: dict[str, Any] = {
        "model": model.name,
        "prompt_length": prompt_length,
        "new_tokens": new_tokens,
        "weight_bytes": weight_bytes,
        "reps": reps,
        "batches": {},
    }
    all_prompts = make_prompts(model, max(batch_sizes), prompt_length)
    for batch in batch_sizes:
        prompts = all_prompts[:batch]
        fns: dict[str, Any] = {JAX: JaxDecoder(model, prompts, new_tokens)}
        first_tokens, first_s = {}, {}
        first_tokens[JAX], first_s[JAX] = common.timed(fns[JAX])
        if torch_ref:
            fns[TORCH] = TorchDecoder(model, prompts, new_tokens)
            first_tokens[TORCH], first_s[TORCH] = common.timed(fns[TORCH])
        timings = common.measure(fns, reps=reps, warmup=warmup)
        generated = batch * new_tokens
        entry: dict[str, Any] = {}
        for name, t in timings.items():
            entry[name] = {
                "call": t.to_dict(),
                "tokens_per_s": generated / t.median,
                "first_call_s": first_s[name],
                "generated_tokens": sum(len(r) for r in first_tokens[name]),
            }
        if torch_ref:
            entry["speedup_vs_transformers"] = timings[TORCH].median / timings[JAX].median
            entry["agreement"] = _agreement(first_tokens[JAX], first_tokens[TORCH])
        if batch == 1 and peak:
            bound = peak["bandwidth"]["bandwidth_bytes_per_s"] / weight_bytes
            entry["bandwidth_bound_tokens_per_s"] = bound
            for name in timings:
                entry[name]["fraction_of_bandwidth_bound"] = entry[name]["tokens_per_s"] / bound
        result["batches"][str(batch)] = entry
    return result
