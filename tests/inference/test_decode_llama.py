"""Jitted LLaMA decoding: greedy tokens equal ``transformers`` ``generate(do_sample=False)``
for the real SmolLM2-135M-Instruct weights (batched prompts of different lengths, EOS),
per-example EOS stopping and early loop exit, sampling (temperature / top-k / top-p),
decoding on a sharded mesh, and the number of compilations under length buckets."""

from __future__ import annotations

import dataclasses
import functools

import fixtures_llama as fx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gist_jax import sharding
from gist_jax.convert import llama as convert_llama
from gist_jax.convert import loading
from gist_jax.inference import decode, programs
from gist_jax.inference.decode import SamplingConfig

MAX_NEW = 12


# ---------------------------------------------------------------------------------------
# The real default model against transformers


@pytest.fixture(scope="module")
def smollm2():
    from gist_jax.convert.default_model import ensure_default_model

    hf_dir, ckpt_dir = ensure_default_model(progress=False)
    config, params, tokenizer = loading.load_checkpoint(ckpt_dir)
    return hf_dir, config, params, tokenizer


def test_greedy_matches_transformers_generate_smollm2(smollm2):
    import torch
    from transformers import AutoModelForCausalLM

    hf_dir, config, params, tokenizer = smollm2
    assert config.scan_layers  # the default checkpoint is stored scanned
    questions = [
        "What is the capital of France?",
        "Say hi.",
        "Write a haiku about the sea and the wind in autumn.",
    ]
    prompts = [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True
            )["input_ids"]
        )
        for q in questions
    ]
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: padding
    ours = decode.generate(config, params, prompts, max_new_tokens=MAX_NEW)

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    eos = int(model.generation_config.eos_token_id)
    assert config.eos_token_id == eos
    finished = 0
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos
            )
        want = out[0, len(prompt) :].tolist()
        ended = bool(want) and want[-1] == eos
        if ended:
            want = want[:-1]
        print(f"{tokenizer.decode(got.tokens)!r} (finished={got.finished})")
        assert got.tokens == want
        assert got.finished == ended
        finished += ended
    assert finished >= 1  # at least one prompt stopped at EOS before max_new_tokens


# ---------------------------------------------------------------------------------------
# Tiny random models


@functools.cache
def tiny(name: str = "mha_untied"):
    hf = fx.make_hf_model(name)
    config = convert_llama.config_from_hf(hf.config.to_dict())
    config = dataclasses.replace(config, gist_token_id=fx.GIST_ID)
    params = convert_llama.params_from_hf(fx.hf_state_dict(hf), config)
    return hf, config, jax.tree.map(jnp.asarray, params)


def _prompts(lengths=(5, 11, 3, 8), seed=0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, fx.GIST_ID - 1, n).tolist() for n in lengths]


def test_tiny_greedy_matches_transformers_and_stops_per_example():
    import torch

    hf, config, params = tiny()
    prompts = _prompts()
    free = decode.generate(config, params, prompts, max_new_tokens=MAX_NEW, eos_token_ids=[])
    refs = []
    for prompt in prompts:
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None
            )
        refs.append(out[0, len(prompt) :].tolist())
    assert [g.tokens for g in free] == refs
    # Pick as EOS a token that example 1 first produces at step >= 2: it stops there, the
    # others stop wherever they produce it (if at all).
    eos = next(t for step, t in enumerate(refs[1]) if step >= 2 and t not in refs[1][:step])
    stopped = decode.generate(config, params, prompts, max_new_tokens=MAX_NEW, eos_token_ids=[eos])
    for ref, got in zip(refs, stopped, strict=True):
        cut = ref.index(eos) if eos in ref else None
        assert got.tokens == ref[:cut]
        assert got.finished == (cut is not None)


def test_loop_stops_when_every_example_is_done():
    _, config, params = tiny()
    prompts = _prompts()
    ids, pos = decode.pad_rows(prompts, 16, 0)
    none = np.full(len(prompts), -1, np.int32)
    # Every token is an EOS: every row finishes with its first token; the loop never runs.
    opts = decode.make_options(config, MAX_NEW, eos_token_ids=range(fx.VOCAB))
    rows = programs.Rows(ids, pos, none, none)
    out = programs.llama_generate_arrays(
        params, rows, jax.random.key(0), None, config=config, opts=opts
    )
    assert int(out.loop.steps) == 1
    np.testing.assert_array_equal(out.loop.lengths, 1)
    assert np.asarray(out.loop.finished).all()
    # Without EOS the loop runs to max_new_tokens.
    opts = decode.make_options(config, MAX_NEW, eos_token_ids=[])
    rows = programs.Rows(ids, pos, none, none)
    out = programs.llama_generate_arrays(
        params, rows, jax.random.key(0), None, config=config, opts=opts
    )
    assert int(out.loop.steps) == MAX_NEW
    np.testing.assert_array_equal(out.loop.lengths, MAX_NEW)


def test_sampling_rules():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000, jnp.float32))
    keys = jax.random.key(0)

    def freq(sampling):
        tokens = np.asarray(programs.sample_logits(logits, keys, sampling))
        return np.bincount(tokens, minlength=4) / len(tokens)

    np.testing.assert_array_equal(freq(SamplingConfig()), [1, 0, 0, 0])  # greedy
    np.testing.assert_allclose(
        freq(SamplingConfig(temperature=1.0)), [0.5, 0.3, 0.15, 0.05], atol=0.03
    )
    np.testing.assert_allclose(
        freq(SamplingConfig(temperature=1.0, top_k=2)), [0.625, 0.375, 0, 0], atol=0.03
    )
    # top_p=0.7: the mass before token 1 (0.5) is below 0.7, before token 2 (0.8) is not.
    np.testing.assert_allclose(
        freq(SamplingConfig(temperature=1.0, top_p=0.7)), [0.625, 0.375, 0, 0], atol=0.03
    )
    np.testing.assert_array_equal(freq(SamplingConfig(temperature=1.0, top_p=0.1)), [1, 0, 0, 0])
    # Low temperature sharpens towards the argmax.
    assert freq(SamplingConfig(temperature=0.1))[0] > 0.98
    for bad in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


def test_sampled_decoding_is_seeded():
    _, config, params = tiny()
    prompts = _prompts()
    sampling = SamplingConfig(temperature=1.0, top_k=20)
    run = functools.partial(
        decode.generate,
        config,
        params,
        prompts,
        max_new_tokens=MAX_NEW,
        sampling=sampling,
        eos_token_ids=[],
    )
    a, b, c = run(seed=1), run(seed=1), run(seed=2)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.tokens for g in a] != [g.tokens for g in c]
    greedy = decode.generate(config, params, prompts, max_new_tokens=MAX_NEW, eos_token_ids=[])
    top1 = run(sampling=SamplingConfig(temperature=1.0, top_k=1))
    assert [g.tokens for g in top1] == [g.tokens for g in greedy]


def test_decoding_on_a_sharded_mesh_matches_single_device():
    _, config, params = tiny()  # 4 heads, 4 kv heads: tensor=2 splits them
    prompts = _prompts((5, 11, 3, 8, 2, 9))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    want = decode.generate(config, params, prompts, max_new_tokens=MAX_NEW, eos_token_ids=[])
    got = decode.generate(
        config, params, prompts, max_new_tokens=MAX_NEW, eos_token_ids=[], mesh=mesh
    )
    assert [g.tokens for g in got] == [w.tokens for w in want]
    placed = decode.place_params(params, config, mesh)
    kernel = placed["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_length_buckets_bound_the_compiles():
    _, config, params = tiny()
    assert [decode.bucket_length(n) for n in (1, 16, 17, 33, 100)] == [16, 16, 32, 64, 128]
    before = programs.TRACE_COUNTS["llama_generate"]
    # Lengths 3..30 with a fixed batch size fall in two buckets (16 and 32).
    lengths = [3, 30, 7, 20, 12, 25, 16, 17, 5]
    decode.generate(config, params, _prompts(lengths), max_new_tokens=4, batch_size=3)
    decode.generate(config, params, _prompts([4, 31, 9], seed=3), max_new_tokens=4, batch_size=3)
    assert programs.TRACE_COUNTS["llama_generate"] - before == 2


def test_bad_prompts_are_rejected():
    _, config, params = tiny()
    g = fx.GIST_ID
    with pytest.raises(ValueError, match=r"prompt 1: example 0: gist tokens .* contiguous"):
        decode.generate(config, params, [[5, g, 6], [5, g, 6, g]], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompt\(s\) \[0\] are empty"):
        decode.generate(config, params, [[], [5]], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        decode.generate(config, params, [[5]], max_new_tokens=0)
    with pytest.raises(ValueError, match="unknown gist condition"):
        decode.generate(config, params, [[5]], max_new_tokens=2, condition="gisty")
