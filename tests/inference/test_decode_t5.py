"""Jitted T5 decoding (encoder once, decoder loop with a self-attention cache and
precomputed cross-attention keys/values): greedy tokens equal ``transformers``
``generate(do_sample=False)`` for tiny random v1.0 and v1.1 models, batched sources of
different lengths, with per-example EOS."""

from __future__ import annotations

import functools

import fixtures_t5 as fx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gist_jax.convert import t5 as convert_t5
from gist_jax.inference import decode

MAX_NEW = 10


@functools.cache
def tiny(variant: str):
    hf = fx.hf_model(variant)
    config = convert_t5.config_from_hf(hf.config.to_dict())
    params = convert_t5.params_from_hf(fx.state_dict(hf), config)
    return hf, config, jax.tree.map(jnp.asarray, params)


def _sources(lengths, seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[*rng.integers(3, fx.GIST_ID, n).tolist(), fx.EOS_ID] for n in lengths]


def _hf_greedy(hf, source: list[int], eos: int | None) -> list[int]:
    import torch

    with torch.no_grad():
        out = hf.generate(
            torch.tensor([source]),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            eos_token_id=eos,
            decoder_start_token_id=fx.PAD_ID,
        )
    return out[0, 1:].tolist()  # drop the decoder start token


@pytest.mark.parametrize("variant", fx.VARIANTS)
def test_greedy_matches_transformers_generate(variant):
    hf, config, params = tiny(variant)
    sources = _sources([5, 12, 3, 8])
    # A token id that HF never emits as EOS here, so every example runs MAX_NEW steps.
    refs = [_hf_greedy(hf, s, eos=fx.VOCAB + 7) for s in sources]
    got = decode.generate(config, params, sources, max_new_tokens=MAX_NEW, eos_token_ids=[])
    assert [g.tokens for g in got] == refs
    assert len({tuple(r) for r in refs}) > 1  # the outputs depend on the source
    # Per-example EOS: a token example 1 first emits at step >= 2 ends it there.
    eos = next(t for step, t in enumerate(refs[1]) if step >= 2 and t not in refs[1][:step])
    stopped = decode.generate(config, params, sources, max_new_tokens=MAX_NEW, eos_token_ids=[eos])
    for source, result in zip(sources, stopped, strict=True):
        want = _hf_greedy(hf, source, eos=eos)
        ended = want[-1] == eos
        assert result.tokens == (want[:-1] if ended else want)
        assert result.finished == ended
    assert stopped[1].finished and len(stopped[1].tokens) < MAX_NEW
