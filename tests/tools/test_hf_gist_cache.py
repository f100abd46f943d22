"""Serving with PyTorch transformers (``gist_tools.hf_gist_cache``): greedy tokens decoded from
the gist tokens' ``past_key_values`` equal gist_jax's own compressed decoding token for
token, on a tiny random LLaMA and on the bundled SmolLM2 exported to a Hugging Face
directory, at batch 1 and 4, over prompts of different lengths; and plain attention over
the whole prompt (what ``generate()`` does on an export) decodes differently."""

from __future__ import annotations

import fixtures_llama as fxl
import numpy as np
import pytest
import torch
from fixtures_gist import llama_model, make_examples, with_random_adapter

from gist_jax.inference import gist_cache
from gist_tools import hf_gist_cache

MAX_NEW = 8


def _split(examples: list[list[int]], gist_id: int) -> tuple[list, list]:
    pairs = [gist_cache.split_prompt(ex, gist_id) for ex in examples]
    return [p for p, _ in pairs], [i for _, i in pairs]


def _jax_tokens(config, params, prompts, inputs, batch_size, eos=()):
    cache = gist_cache.compress(config, params, prompts, batch_size=batch_size)
    out = gist_cache.generate(
        config,
        params,
        cache,
        inputs,
        max_new_tokens=MAX_NEW,
        batch_size=batch_size,
        eos_token_ids=eos,
    )
    return [g.tokens for g in out]


def _torch_tokens(model, prompts, inputs, batch_size, gist_id, eos=()):
    out = []
    for start in range(0, len(prompts), batch_size):
        cache = hf_gist_cache.compress(model, prompts[start : start + batch_size], gist_id)
        rows = inputs[start : start + batch_size]
        out += hf_gist_cache.generate(
            model, cache, rows, gist_id, max_new_tokens=MAX_NEW, eos_token_ids=eos
        )
    return out


@pytest.mark.parametrize("batch_size", [1, 4])
def test_tiny_llama_equals_gist_jax_compressed_decoding(batch_size):
    config, params = llama_model()
    model = fxl.make_hf_model("gqa_untied_linear_headdim_bias")
    prompts, inputs = _split(make_examples(fxl.GIST_ID, []), fxl.GIST_ID)
    want = _jax_tokens(config, params, prompts, inputs, batch_size)
    got = _torch_tokens(model, prompts, inputs, batch_size, fxl.GIST_ID)
    assert got == want
    assert all(len(t) == MAX_NEW for t in got)  # EOS off: every row ran to the end


def test_cache_holds_only_the_gist_tokens():
    model = fxl.make_hf_model("gqa_untied_linear_headdim_bias")
    prompts, _ = _split(make_examples(fxl.GIST_ID, []), fxl.GIST_ID)
    cache = hf_gist_cache.compress(model, prompts, fxl.GIST_ID)
    cfg = model.config
    # k = 2 gist tokens x layers x (keys + values) x kv heads x head_dim x 4 bytes.
    per_prompt = 2 * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    assert cache.nbytes_per_prompt() == per_prompt
    np.testing.assert_array_equal(
        cache.positions.numpy(), [[len(p) - 2, len(p) - 1] for p in prompts]
    )
    with pytest.raises(gist_cache.GistCacheError, match="2 inputs for a gist cache of 6"):
        hf_gist_cache.generate(model, cache, [[5], [6]], fxl.GIST_ID)


@pytest.fixture(scope="module")
def smollm_export(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gist_jax import model_loading
    from gist_jax.convert.default_model import ensure_default_model
    from gist_jax.convert.to_hf import convert_to_hf
    from gist_tools import prompts as prompt_lib

    _, ckpt_dir = ensure_default_model()
    config, params, tokenizer = model_loading.load_converted(ckpt_dir)
    export = convert_to_hf(ckpt_dir, tmp_path_factory.mktemp("smollm") / "export_hf")
    model = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
    instructions = [
        "Reverse the words.",
        "Give the plural of the noun.",
        "Write the number in words, then put it in brackets.",
        "Name the capital city of the country.",
    ]
    texts = ["quick brown fox", "mouse", "42", "France"]
    prompts = prompt_lib.instruction_prompts(config, tokenizer, instructions, 1, 128)
    inputs = prompt_lib.input_tokens(config, tokenizer, texts, 1, 128)
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    return dict(
        config=config,
        params=params,
        model=model,
        tokenizer=tokenizer,
        prompts=prompts,
        inputs=inputs,
    )


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 4])
def test_smollm2_export_equals_gist_jax_compressed_decoding(smollm_export, batch_size):
    s = smollm_export
    gist_id = s["config"].gist_token_id
    assert s["tokenizer"].convert_tokens_to_ids("<GIST>") == gist_id  # the export's token
    eos = [s["config"].eos_token_id]
    want = _jax_tokens(s["config"], s["params"], s["prompts"], s["inputs"], batch_size, eos)
    got = _torch_tokens(s["model"], s["prompts"], s["inputs"], batch_size, gist_id, eos)
    assert got == want
    assert any(len(t) > 1 for t in got)


def test_plain_generate_on_the_whole_prompt_ignores_the_gist_mask():
    """Why the module exists: ``generate()`` on prompt + input lets the input see the
    instruction, so its tokens are not the gist model's."""
    config, params = llama_model()
    model = fxl.make_hf_model("gqa_untied_linear_headdim_bias")
    prompts, inputs = _split(make_examples(fxl.GIST_ID, []), fxl.GIST_ID)
    gist = _jax_tokens(config, params, prompts, inputs, 4)
    plain = []
    for prompt, row in zip(prompts, inputs, strict=True):
        ids = torch.as_tensor([prompt + row])
        out = model.generate(
            ids, max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None
        )
        plain.append(out[0, ids.shape[1] :].tolist())
    assert plain != gist


def test_an_export_with_a_gist_adapter_decodes_as_gist_jax(tmp_path):
    """The adapter travels in its own file beside the HF weights; ``compress`` applies it
    to the gist positions, so the tokens equal gist_jax's, and they differ from the same
    model's without the adapter."""
    from transformers import AutoModelForCausalLM

    from gist_jax.convert import common
    from gist_jax.convert.to_hf import convert_to_hf

    config, params = with_random_adapter(*llama_model())
    ckpt = common.save_converted(tmp_path / "ckpt", params, config.to_dict(), None)
    export = convert_to_hf(ckpt, tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
    prompts, inputs = _split(make_examples(fxl.GIST_ID, []), fxl.GIST_ID)
    want = _jax_tokens(config, params, prompts, inputs, 4)
    assert _torch_tokens(model, prompts, inputs, 4, fxl.GIST_ID) == want
    assert _jax_tokens(*llama_model(), prompts, inputs, 4) != want
    (export / common.GIST_ADAPTER_FILE).unlink()
    fresh = AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
    with pytest.raises(gist_cache.GistCacheError, match="gist_adapter_rank=3"):
        hf_gist_cache.compress(fresh, prompts, fxl.GIST_ID)
