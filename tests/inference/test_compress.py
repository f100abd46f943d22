"""Gist compression exactness and bad input, for LLaMA and T5 (tiny random models).

For every example of ragged batches (different prompt lengths, gist positions, input
lengths and paddings; several batches with filler rows; examples at different batch
positions), decoding from the gist cache must give the logits of the *full* sequence under
the gist mask within 1e-5 (float32) and the same greedy tokens. The LLaMA reference for
the input tokens is an independent dense-mask forward pass (``gist.make_gist_mask`` AND
causal), not the decode code.
"""

from __future__ import annotations

import dataclasses
import functools

import fixtures_llama as fxl
import fixtures_t5 as fxt
import jax
import numpy as np
import pytest
from fixtures_gist import (
    BATCH,
    MAX_NEW,
    SPECS,
    TOL,
    K,
    llama_model,
    make_examples,
    t5_model,
    with_random_adapter,
)

from gist_jax.inference import decode, gist_cache
from gist_jax.inference.gist_cache import GistCacheError
from gist_jax.models import llama
from gist_jax.models.family import family_of

REF_LENGTH = 32  # the dense reference pads every example to one length: one compile


@functools.cache
def _dense_forward(config):
    model = llama.build_model(config)
    return jax.jit(lambda p, ids, pos, mask: model.apply({"params": p}, ids, pos, mask)[0])


def _llama_reference_logits(config, params, tokens: list[int]) -> np.ndarray:
    """Full-sequence logits ``[L, V]`` under the dense gist mask (AND causal), computed
    by a plain forward pass, independent of the decode code."""
    ids, pos = decode.pad_rows([tokens], REF_LENGTH, fxl.PAD_ID)
    mask = fxl.gist_causal_mask(ids, "gist")
    return np.asarray(_dense_forward(config)(params, ids, pos, mask))[0, : len(tokens)]


def _report(name: str, diffs: list[float]) -> None:
    print(f"{name}: max |compressed - full| = {max(diffs):.2e} over {len(diffs)} examples")


ORDERS = (list(range(len(SPECS))), list(reversed(range(len(SPECS)))))


def _run(config, params, examples: list[list[int]], gist_id: int) -> dict:
    """Full decode of every example, and compressed decode in two example orders (so
    every example sits at different batch positions, next to different neighbours)."""
    split = gist_cache.dedupe_prompts(examples, gist_id)
    cache = gist_cache.compress(config, params, split.prompts, batch_size=BATCH)
    kwargs = dict(max_new_tokens=MAX_NEW, return_logits=True, batch_size=BATCH, eos_token_ids=[])
    full = decode.generate(config, params, examples, **kwargs)
    compressed = []
    for order in ORDERS:
        out = gist_cache.generate(
            config,
            params,
            cache.take([split.rows[i] for i in order]),
            [split.inputs[i] for i in order],
            **kwargs,
        )
        # Back in example order.
        compressed.append([out[order.index(i)] for i in range(len(examples))])
    return {"split": split, "cache": cache, "full": full, "compressed": compressed}


@pytest.fixture(scope="module")
def llama_run() -> dict:
    config, params = llama_model()
    return _run(config, params, make_examples(fxl.GIST_ID, []), fxl.GIST_ID)


@pytest.fixture(scope="module")
def t5_run() -> dict:
    config, params = t5_model()
    return _run(config, params, make_examples(fxt.GIST_ID, [fxt.EOS_ID]), fxt.GIST_ID)


def test_llama_gist_cache_contents(llama_run):
    cache = llama_run["cache"]
    assert cache.k.shape == (2, len(SPECS), 1, 16, K)  # [layers, B, KVH, head_dim, k]
    assert cache.v.shape == (2, len(SPECS), 1, K, 16)
    np.testing.assert_array_equal(np.asarray(cache.positions), [[p, p + 1] for p, _ in SPECS])
    # Row i of the cache is the i-th distinct prompt, whatever batch it was computed in.
    alone = gist_cache.compress(*llama_model(), [llama_run["split"].prompts[3]], batch_size=BATCH)
    np.testing.assert_allclose(np.asarray(alone.k[:, 0]), np.asarray(cache.k[:, 3]), atol=TOL)


def test_llama_input_logits_equal_full_sequence(llama_run):
    config, params = llama_model()
    examples, split = make_examples(fxl.GIST_ID, []), llama_run["split"]
    for compressed in llama_run["compressed"]:
        diffs = []
        for i, tokens in enumerate(examples):
            n_input = len(split.inputs[i])
            ref = _llama_reference_logits(config, params, tokens)[-n_input:]
            assert np.abs(ref).max() > 1.0  # not a trivially flat model
            # Relative to the logits' size: float32 rounding grows with the values, and
            # XLA's reduction order differs between CPUs and versions (1.07e-5 absolute on
            # logits up to ~8 under jax 0.10.2 on this project's CI machine).
            scale = float(np.abs(ref).max())
            diffs.append(float(np.abs(compressed[i].prompt_logits - ref).max()) / scale)
            # The full decode's prefill agrees with the dense reference too.
            full = llama_run["full"][i].prompt_logits[-n_input:]
            assert np.abs(full - ref).max() / scale < TOL
        _report("llama input-token logits", diffs)
        assert max(diffs) < TOL


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_generated_tokens_and_logits_equal_full_sequence(family, request):
    run = request.getfixturevalue(f"{family}_run")
    for compressed in run["compressed"]:
        diffs = []
        for i, (comp, full) in enumerate(zip(compressed, run["full"], strict=True)):
            assert comp.tokens == full.tokens, f"example {i}"
            assert len(comp.tokens) == MAX_NEW and comp.logits.shape[0] == MAX_NEW
            scale = float(np.abs(full.logits).max())
            assert scale > 1.0
            # Relative to the logits' size: float32 rounding grows with it, and the order
            # of XLA's reductions differs between CPU models (2e-5 on logits near 10 seen).
            diffs.append(float(np.abs(comp.logits - full.logits).max()) / scale)
        _report(f"{family} generated-token logits (relative)", diffs)
        assert max(diffs) < TOL


def test_t5_gist_cache_contents(t5_run):
    cache = t5_run["cache"]
    assert cache.k.shape == (2, len(SPECS), 4, 8, K) and cache.hidden.shape == (len(SPECS), K, 32)
    np.testing.assert_array_equal(np.asarray(cache.positions), [[p, p + 1] for p, _ in SPECS])


def test_t5_full_decode_sees_the_mask(t5_run):
    """The T5 comparison can fail: neg_control decoding of the same examples differs from
    gist decoding (so the masks reach the encoder and the cross-attention)."""
    config, params = t5_model()
    examples = make_examples(fxt.GIST_ID, [fxt.EOS_ID])
    neg = decode.generate(
        config,
        params,
        examples,
        max_new_tokens=MAX_NEW,
        return_logits=True,
        batch_size=BATCH,
        eos_token_ids=[],
        condition="neg_control",
    )
    gist_out = t5_run["full"]
    assert (
        max(np.abs(g.logits[0] - n.logits[0]).max() for g, n in zip(gist_out, neg, strict=True))
        > 1e-2
    )


def test_llama_shared_prompt_serves_many_inputs():
    """One compressed prompt serves many inputs (``take`` repeats a row), and examples with
    the same instruction share one cache row."""
    config, params = llama_model()
    base = make_examples(fxl.GIST_ID, [])[1]
    prompt, inputs = gist_cache.split_prompt(base, fxl.GIST_ID)
    others = [inputs, inputs[:3], [*inputs[2:], 7, 8, 9]]
    split = gist_cache.dedupe_prompts([prompt + x for x in others], fxl.GIST_ID)
    assert split.prompts == [prompt] and split.rows == [0, 0, 0]
    cache = gist_cache.compress(config, params, split.prompts, batch_size=BATCH)
    kwargs = dict(max_new_tokens=MAX_NEW, batch_size=BATCH, eos_token_ids=[])
    got = gist_cache.generate(config, params, cache.take(split.rows), split.inputs, **kwargs)
    want = decode.generate(config, params, [prompt + x for x in others], **kwargs)
    assert [g.tokens for g in got] == [w.tokens for w in want]


# ---------------------------------------------------------------------------------------
# Bad input


def test_bad_prompts_are_rejected():
    config, params = llama_model()
    g = fxl.GIST_ID
    with pytest.raises(GistCacheError, match="prompt 1 has no gist token"):
        gist_cache.compress(config, params, [[5, 6, g, g], [5, 6, 7]])
    with pytest.raises(GistCacheError, match=r"prompt 0: .*contiguous"):
        gist_cache.compress(config, params, [[5, g, 6, g]])
    with pytest.raises(GistCacheError, match="after its last gist token"):
        gist_cache.compress(config, params, [[5, g, g, 9]])
    with pytest.raises(GistCacheError, match="different numbers of gist tokens"):
        gist_cache.compress(config, params, [[5, g, g], [5, 6, g]])
    with pytest.raises(GistCacheError, match="no gist_token_id"):
        gist_cache.compress(dataclasses.replace(config, gist_token_id=None), params, [[5, g]])
    with pytest.raises(GistCacheError, match="has no gist token"):
        gist_cache.split_prompt([4, 5, 6], g)
    with pytest.raises(ValueError, match="contiguous"):
        gist_cache.split_prompt([4, g, 5, g, 6], g)


def test_bad_inputs_are_rejected():
    config, params = llama_model()
    g = fxl.GIST_ID
    cache = gist_cache.compress(config, params, [[5, 6, g, g], [7, g, g]], batch_size=BATCH)
    kwargs = dict(max_new_tokens=MAX_NEW, batch_size=BATCH)
    with pytest.raises(GistCacheError, match="max_input_length=16"):
        gist_cache.generate(
            config, params, cache, [[9, 9], [9] * 17], max_input_length=16, **kwargs
        )
    with pytest.raises(GistCacheError, match="1 inputs for a gist cache of 2"):
        gist_cache.generate(config, params, cache, [[9]], max_new_tokens=2)
    with pytest.raises(GistCacheError, match="input 1 is empty"):
        gist_cache.generate(config, params, cache, [[9], []], max_new_tokens=2)
    with pytest.raises(GistCacheError, match="input 0 contains a gist token"):
        gist_cache.generate(config, params, cache, [[9, g], [9]], max_new_tokens=2)
    with pytest.raises(GistCacheError, match="beyond max_position_embeddings=64"):
        gist_cache.generate(config, params, cache, [[9] * 50, [9]], max_new_tokens=20)
    t5_config, t5_params = t5_model()
    with pytest.raises(GistCacheError, match="llama gist cache cannot be decoded by a t5"):
        gist_cache.generate(t5_config, t5_params, cache, [[9], [9]], max_new_tokens=2)
    # With a fixed input length, any input up to it decodes (one compile for all).
    out = gist_cache.generate(
        config, params, cache, [[9, 9], [9] * 16], max_input_length=16, eos_token_ids=[], **kwargs
    )
    assert [len(o.tokens) for o in out] == [MAX_NEW, MAX_NEW]


def test_cache_bytes_formula():
    config, params = llama_model()
    g = fxl.GIST_ID
    cache = gist_cache.compress(config, params, [[5, 6, g, g]], batch_size=BATCH)
    # k * layers * 2 * kv_heads * head_dim * 4 bytes
    assert cache.nbytes_per_prompt() == 2 * 2 * 2 * 1 * 16 * 4
    assert family_of(config).cache_bytes(config, 2) == cache.nbytes_per_prompt()
    t5_config, t5_params = t5_model()
    t5_cache = gist_cache.compress(
        t5_config, t5_params, [[5, 6, fxt.GIST_ID, fxt.GIST_ID]], batch_size=BATCH
    )
    assert family_of(t5_config).cache_bytes(t5_config, 2) == t5_cache.nbytes_per_prompt()


@pytest.mark.parametrize("name", ["qwen2_tied", "qwen2_untied", "mistral", "gist_adapter"])
def test_other_architectures_compress_exactly(name):
    """The converted architectures, and a LLaMA whose gist tokens get their own low-rank
    update (``gist_adapter_rank``), decode from the gist cache exactly as the full sequence
    under the gist mask: input-token logits against the dense reference, generated tokens
    and their logits against the full decode."""
    if name == "gist_adapter":
        config, params = with_random_adapter(*llama_model())
    else:
        config, params = llama_model(name)
        assert config.architecture == name.split("_")[0]
    examples = make_examples(fxl.GIST_ID, [])
    run = _run(config, params, examples, fxl.GIST_ID)
    diffs = []
    for compressed in run["compressed"]:
        for i, tokens in enumerate(examples):
            n_input = len(run["split"].inputs[i])
            ref = _llama_reference_logits(config, params, tokens)[-n_input:]
            scale = float(np.abs(ref).max())
            diffs.append(float(np.abs(compressed[i].prompt_logits - ref).max()) / scale)
            full = run["full"][i]
            assert compressed[i].tokens == full.tokens, f"example {i}"
            scale = float(np.abs(full.logits).max())
            diffs.append(float(np.abs(compressed[i].logits - full.logits).max()) / scale)
    _report(f"{name} compressed logits (relative)", diffs)
    assert max(diffs) < TOL
    if name == "gist_adapter":  # the adapter really changes what the model computes
        plain = _llama_reference_logits(*llama_model(), examples[0])
        assert np.abs(plain - _llama_reference_logits(config, params, examples[0])).max() > 1e-2


def test_a_sequence_longer_than_the_sliding_window_is_refused():
    config, params = llama_model("mistral")
    narrow = dataclasses.replace(config, sliding_window=8)
    examples = make_examples(fxl.GIST_ID, [])
    with pytest.raises(ValueError, match="exceed the model's sliding_window=8"):
        decode.generate(narrow, params, examples, max_new_tokens=4)
