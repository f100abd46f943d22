"""Shared pieces of the gist compression, store and decoding tests: tiny random LLaMA and
T5 models with a gist token id (built once per session) and ragged examples
``prompt, <GIST>*K, input[, EOS]`` with different prompt and input lengths."""

from __future__ import annotations

import dataclasses
import functools

import fixtures_llama as fxl
import fixtures_t5 as fxt
import jax
import jax.numpy as jnp
import numpy as np

from gist_jax import model_loading
from gist_jax.convert import llama as convert_llama
from gist_jax.convert import t5 as convert_t5
from gist_jax.models.family import LLAMA

TOL = 1e-5
K = 2
# (prompt tokens before the gists, input tokens after them) per example.
SPECS = [(3, 4), (9, 7), (1, 2), (6, 11), (12, 1), (4, 4)]
MAX_NEW = 6


def make_examples(gist_id: int, eos: list[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    out = []
    for prompt_len, input_len in SPECS:
        prompt = rng.integers(4, gist_id - 1, prompt_len).tolist()
        inputs = rng.integers(4, gist_id - 1, input_len).tolist()
        out.append(prompt + [gist_id] * K + inputs + eos)
    return out


@functools.cache
def llama_model(name: str = "gqa_untied_linear_headdim_bias"):
    """A tiny random model of ``fixtures_llama.TINY_CONFIGS[name]`` (LLaMA, Qwen2, Mistral)
    as gist_jax config and params, with ``GIST_ID`` as its gist token."""
    hf = fxl.make_hf_model(name)
    config = convert_llama.config_from_hf(hf.config.to_dict())
    config = dataclasses.replace(config, gist_token_id=fxl.GIST_ID)
    params = convert_llama.params_from_hf(fxl.hf_state_dict(hf), config)
    return config, jax.tree.map(jnp.asarray, params)


@functools.cache
def t5_model():
    hf = fxt.hf_model("v1_1")
    config = convert_t5.config_from_hf(hf.config.to_dict())
    config = dataclasses.replace(config, gist_token_id=fxt.GIST_ID)
    params = convert_t5.params_from_hf(fxt.state_dict(hf), config)
    return config, jax.tree.map(jnp.asarray, params)


BATCH = 4  # several batches per call, with filler rows; every call shares the shapes


def with_random_adapter(config, params, rank: int = 3):
    """``config`` with a gist adapter whose ``up`` is random too (a new one is a no-op)."""
    adapted = dataclasses.replace(config, gist_adapter_rank=rank)
    fresh = model_loading.add_gist_adapter(params, adapted, LLAMA)
    keys = iter(jax.random.split(jax.random.key(3), 8))
    for i in range(config.num_hidden_layers):
        up = fresh[f"layers_{i}"]["gist_adapter"]["up"]
        fresh[f"layers_{i}"]["gist_adapter"]["up"] = jax.random.normal(next(keys), up.shape)
    return adapted, fresh
