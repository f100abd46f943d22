"""Measurement 3: what gist caching saves, as in the paper's efficiency table.

For each prompt (batch 1) one forward pass, writing its keys/values into a KV cache as a
decoder's prefill does, under three conditions:

* ``no_caching``: the whole prompt, instruction + input (no gist tokens: the ordinary
  model), from an empty cache;
* ``instruction_caching``: only the input is run; it attends to the instruction's cached
  keys/values (taken from the ``no_caching`` pass: under a causal mask the instruction's
  keys/values do not depend on what follows);
* ``gist_caching``: only the input is run; it attends to the k gist tokens' keys/values
  made by ``gist_jax.gist_cache.compress``, at the positions the gist model gives it.

Per condition: FLOPs from XLA's cost analysis of the compiled computation (one executable
per distinct shape; compile time reported), median latency over interleaved repetitions,
cached bytes per prompt (``Family.cache_bytes``), mean tokens run; and the mean
compression ratio (instruction tokens / k). Prompts are Alpaca+ ``validation_human`` with
``alpaca_dir``, else the synthetic suite's ``validation_unseen`` (the suite has no
human-written split; its instructions are short, so savings are smaller than on human
prompts).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, inputs
from benchmarks.common import BenchModel
from gist_jax import gist
from gist_jax.inference import gist_cache
from gist_jax.models import llama
from gist_jax.models.attention import KVCache
from gist_jax.models.family import family_of

CONDITIONS = ("no_caching", "instruction_caching", "gist_caching")


def _prefill(
    params: Any,
    ids: jax.Array,
    positions: jax.Array,
    first: jax.Array,
    last: jax.Array,
    cache: KVCache,
    *,
    config: llama.LlamaConfig,
) -> tuple[jax.Array, KVCache]:
    """One forward pass of ``ids`` (no padding) appended to ``cache`` under the gist mask:
    the new cache and the next-token logits ``[B, 1, V]``, as a decoder's prefill."""
    model = llama.build_model(config)
    mask = gist.SelfMask(positions, cache.positions_after_append(positions), first, last)
    last_token = jnp.full(ids.shape[:1], ids.shape[1] - 1, jnp.int32)
    return model.apply({"params": params}, ids, positions, mask, cache, logits_at=last_token)


class _Executables:
    """Compiled ``_prefill`` per input shape, with compile time and XLA's FLOP count."""

    def __init__(self, config: llama.LlamaConfig):
        self.fn = jax.jit(functools.partial(_prefill, config=config))
        self.compiled: dict[Any, Any] = {}
        self.flops: dict[Any, float] = {}
        self.compile_s = 0.0

    def get(self, args: tuple) -> tuple[Any, float]:
        key = jax.tree.map(lambda x: (x.shape, str(x.dtype)), args[1:])
        key = str(key)
        if key not in self.compiled:
            exe, seconds = common.timed(lambda: self.fn.lower(*args).compile())
            analysis = exe.cost_analysis()
            if isinstance(analysis, list):
                analysis = analysis[0]
            self.compiled[key], self.flops[key] = exe, float(analysis["flops"])
            self.compile_s += seconds
        return self.compiled[key], self.flops[key]


def _row(values: list[int]) -> jax.Array:
    return jnp.asarray(np.asarray(values, np.int32)[None])


def _cache_with_prefix(
    config: llama.LlamaConfig, k: jax.Array, v: jax.Array, pos: list[int], extra: int
) -> KVCache:
    """A batch-1 cache holding ``n`` slots of keys and values (``KVCache``'s layout) at
    slots 0..n-1 and ``extra`` empty slots after them."""
    n = len(pos)
    empty = KVCache.empty(
        config.num_hidden_layers, 1, n + extra, config.num_key_value_heads, config.head_dim
    )
    return KVCache(
        k=empty.k.at[..., :n].set(k),
        v=empty.v.at[:, :, :, :n].set(v),
        pos=_row(pos + [-1] * extra),
        end=jnp.asarray(n, jnp.int32),
    )


def load_prompts(
    model: BenchModel, num_examples: int, num_gist: int, alpaca_dir: str | None
) -> tuple[list[inputs.SplitPrompt], str]:
    source, split = (
        (alpaca_dir, "validation_human") if alpaca_dir else ("synthetic", "validation_unseen")
    )
    prompts = inputs.split_prompts(
        model.tokenizer, model.config.gist_token_id, split, num_examples, num_gist, source
    )
    return prompts, f"{source}:{split}"


def run(
    model: BenchModel,
    num_examples: int = 24,
    num_gist: int = 1,
    reps: int = 5,
    warmup: int = 1,
    alpaca_dir: str | None = None,
) -> dict[str, Any]:
    """The caching table over ``num_examples`` prompts; returns the JSON-ready result."""
    cfg = model.config
    if cfg.gist_token_id is None:
        raise ValueError(f"{model.name} has no gist token id")
    prompts, dataset = load_prompts(model, num_examples, num_gist, alpaca_dir)
    gist_id = cfg.gist_token_id
    cache = gist_cache.compress(cfg, model.params, [p.instruction for p in prompts])
    exes = _Executables(cfg)
    no_gist = _row([gist.NO_GIST])[0]
    per_prompt: list[dict[str, Any]] = []
    for i, p in enumerate(prompts):
        instruction = [t for t in p.instruction if t != gist_id]
        n_instr, n_in, k = len(instruction), len(p.input), p.num_gist
        full = instruction + p.input
        args: dict[str, tuple] = {}
        empty = KVCache.empty(
            cfg.num_hidden_layers, 1, len(full), cfg.num_key_value_heads, cfg.head_dim
        )
        args["no_caching"] = (
            model.params,
            _row(full),
            _row(list(range(len(full)))),
            no_gist,
            no_gist,
            empty,
        )
        exe, _ = exes.get(args["no_caching"])
        _, full_cache = exe(*args["no_caching"])
        full_cache = full_cache.stacked()
        instr_cache = _cache_with_prefix(
            cfg,
            full_cache.k[..., :n_instr],
            full_cache.v[:, :, :, :n_instr],
            list(range(n_instr)),
            n_in,
        )
        args["instruction_caching"] = (
            model.params,
            _row(p.input),
            _row(list(range(n_instr, n_instr + n_in))),
            no_gist,
            no_gist,
            instr_cache,
        )
        gist_pos = [int(x) for x in np.asarray(cache.positions[i])]
        g_cache = _cache_with_prefix(
            cfg, cache.k[:, i : i + 1], cache.v[:, i : i + 1], gist_pos, n_in
        )
        last = gist_pos[-1]
        args["gist_caching"] = (
            model.params,
            _row(p.input),
            _row(list(range(last + 1, last + 1 + n_in))),
            _row([gist_pos[0]])[0],
            _row([last])[0],
            g_cache,
        )
        fns, flops = {}, {}
        for cond in CONDITIONS:
            exe, flops[cond] = exes.get(args[cond])
            fns[cond] = lambda exe=exe, a=args[cond]: common.block(exe(*a))
        timings = common.measure(fns, reps=reps, warmup=warmup)
        per_prompt.append(
            {
                "instruction_tokens": n_instr,
                "input_tokens": n_in,
                "num_gist": k,
                "tokens_run": {
                    "no_caching": len(full),
                    "instruction_caching": n_in,
                    "gist_caching": n_in,
                },
                "cached_tokens": {
                    "no_caching": 0,
                    "instruction_caching": n_instr,
                    "gist_caching": k,
                },
                "flops": flops,
                "latency_s": {c: timings[c].median for c in CONDITIONS},
                "latency_spread": {c: timings[c].spread for c in CONDITIONS},
            }
        )

    def mean(get: Any) -> float:
        return float(np.mean([get(r) for r in per_prompt]))

    table = {}
    for cond in CONDITIONS:
        table[cond] = {
            "flops": mean(lambda r, c=cond: r["flops"][c]),
            "latency_s": mean(lambda r, c=cond: r["latency_s"][c]),
            "tokens_run": mean(lambda r, c=cond: r["tokens_run"][c]),
            "cache_bytes_per_prompt": mean(
                lambda r, c=cond: family_of(cfg).cache_bytes(cfg, r["cached_tokens"][c])
            ),
        }
    base = table["no_caching"]
    for cond in CONDITIONS:
        table[cond]["flops_reduction_vs_no_caching"] = 1.0 - table[cond]["flops"] / base["flops"]
        table[cond]["latency_reduction_vs_no_caching"] = (
            1.0 - table[cond]["latency_s"] / base["latency_s"]
        )
    return {
        "model": model.name,
        "dataset": dataset,
        "num_prompts": len(prompts),
        "num_gist": num_gist,
        "reps": reps,
        "mean_compression_ratio": mean(lambda r: r["instruction_tokens"] / r["num_gist"]),
        "mean_instruction_tokens": mean(lambda r: r["instruction_tokens"]),
        "mean_input_tokens": mean(lambda r: r["input_tokens"]),
        "compile_s": exes.compile_s,
        "compiled_shapes": len(exes.compiled),
        "conditions": table,
        "per_prompt": per_prompt,
    }
