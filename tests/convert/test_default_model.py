"""The bundled default model (SmolLM2-135M-Instruct, Q4_1 GGUF): our GGUF reading and
dequantisation against transformers' own GGUF loader, gist_jax logits against transformers
on the dequantised HF directory, the exported HF directory, the tokenizer, caching, a
sensible greedy answer, and the torch-free conversion path (on a tiny GGUF file written
the way llama.cpp writes them)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import fixtures_llama as fx
import jax
import numpy as np
import pytest

from gist_jax import gist
from gist_jax.convert import common, default_model, loading
from gist_jax.convert import gguf as gguf_io
from gist_jax.convert.to_hf import convert_to_hf
from gist_jax.models import llama
from gist_jax.models.attention import KVCache

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

# Runs a conversion in a fresh interpreter where torch cannot be imported.
_NO_TORCH = (
    "import sys; sys.modules['torch'] = None\n"
    "from gist_jax.convert.default_model import ensure_default_model\n"
    "kwargs = dict(gguf_path=sys.argv[2]) if len(sys.argv) > 2 else {}\n"
    "ensure_default_model(sys.argv[1], progress=True, **kwargs)\n"
    "assert sys.modules['torch'] is None\n"
)

TEXTS = [
    "The capital of France is",
    "Gisting compresses prompts into a few tokens, and it works with 26x compression!",
    "  Leading spaces,\ttabs\nand newlines; digits 2024 and 3.14159 and café naïve 日本語.",
    "<|im_start|>user\nHi there<|im_end|>\n",
]


def _convert_without_torch(cache_dir: pathlib.Path, gguf_path: pathlib.Path | None = None) -> str:
    args = [sys.executable, "-c", _NO_TORCH, str(cache_dir)]
    if gguf_path is not None:
        args.append(str(gguf_path))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def smollm(tmp_path_factory) -> dict:
    """The converted default model: the user's default cache when it is already current
    (repeat runs are fast), otherwise a fresh torch-free conversion into a temp cache."""
    if default_model.is_cached():
        cache = None
        print(f"\nusing the cached default model in {default_model.default_cache_dir()}")
    else:
        cache = tmp_path_factory.mktemp("gist_jax_cache")
        start = time.perf_counter()
        log = _convert_without_torch(cache)
        took = time.perf_counter() - start
        print(f"\nconverted the default model without torch in {took:.1f}s (incl. start-up)")
        assert "converted SmolLM2-135M-Instruct.Q4_1.gguf" in log
        assert "dequantising GGUF" in log  # the progress bar ran
    hf_dir, ckpt_dir = default_model.ensure_default_model(cache, progress=False)
    return {"cache": cache, "hf_dir": hf_dir, "ckpt_dir": ckpt_dir}


@pytest.fixture(scope="session")
def hf_model(smollm):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm["hf_dir"], attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="session")
def jax_model(smollm):
    config, params, tokenizer = loading.load_checkpoint(smollm["ckpt_dir"])
    params = jax.device_put(params)  # restored as host numpy; move once, not per call
    fn = jax.jit(
        lambda p, i, pos, m, c: llama.build_model(config).apply({"params": p}, i, pos, m, c)
    )
    return {"config": config, "params": params, "tokenizer": tokenizer, "apply": fn}


def _padded(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = [tokenizer(t).input_ids for t in texts]
    length = max(map(len, rows))
    ids = np.full((len(rows), length), tokenizer.pad_token_id, np.int32)
    positions = np.full((len(rows), length), -1, np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        positions[i, : len(row)] = np.arange(len(row))
    return ids, positions, positions >= 0


def test_config_and_cache(smollm):
    config = json.loads((smollm["hf_dir"] / "config.json").read_text())
    expected = {
        "model_type": "llama",
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-05,
        "max_position_embeddings": 8192,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    assert {k: config[k] for k in expected} == expected
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 100000.0}
    saved = common.read_model_config(smollm["ckpt_dir"])
    assert saved["vocab_size"] == 49153 and saved["gist_token_id"] == 49152
    # A second call returns at once and rewrites nothing.
    before = (smollm["ckpt_dir"] / common.MODEL_CONFIG_FILE).stat().st_mtime_ns
    start = time.perf_counter()
    assert default_model.ensure_default_model(smollm["cache"]) == (
        smollm["hf_dir"],
        smollm["ckpt_dir"],
    )
    assert time.perf_counter() - start < 1.0
    assert (smollm["ckpt_dir"] / common.MODEL_CONFIG_FILE).stat().st_mtime_ns == before


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv(default_model.CACHE_ENV, str(tmp_path))
    assert default_model.default_cache_dir() == tmp_path
    monkeypatch.delenv(default_model.CACHE_ENV)
    assert default_model.default_cache_dir() == pathlib.Path.home() / ".cache" / "gist_jax"
    assert default_model.default_gguf_path().name == default_model.GGUF_NAME


@pytest.mark.slow  # transformers' GGUF loader alone takes ~15 s of CPU
def test_dequantised_weights_match_transformers_gguf_loader(smollm, hf_model, monkeypatch):
    """transformers' own GGUF loader (its tensor-name mapping and q/k un-permutation; for
    LLaMA it dequantises with the same ``gguf`` package) must give the same weights and
    logits as our dequantised HF directory. Our config.json is handed to it (the config is
    checked against known values in test_config_and_cache), which skips its slowest step."""
    import functools

    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # transformers rebuilds the same (pure) name table once per tensor; cache it for speed.
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
    gguf_path = default_model.default_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent),
        gguf_file=gguf_path.name,
        config=AutoConfig.from_pretrained(smollm["hf_dir"]),
        dtype=torch.float32,
    ).eval()
    ours, theirs = hf_model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    weight_diff = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    q_diff = float(
        (
            ours["model.layers.7.self_attn.q_proj.weight"]
            - theirs["model.layers.7.self_attn.q_proj.weight"]
        )
        .abs()
        .max()
    )
    tokenizer = AutoTokenizer.from_pretrained(smollm["hf_dir"])
    ids = torch.as_tensor(np.asarray([tokenizer(TEXTS[1]).input_ids]))
    with torch.no_grad():
        logit_diff = float((hf_model(ids).logits - reference(ids).logits).abs().max())
    print(
        f"vs transformers GGUF loader: max |weight diff| {weight_diff:.2e}, logits {logit_diff:.2e}"
    )
    assert q_diff < 1e-6 and weight_diff < 1e-6
    assert logit_diff < 1e-4


def test_tokenizer_matches_transformers_gguf_tokenizer(smollm):
    from transformers import AutoTokenizer

    gguf_path = default_model.default_gguf_path()
    reference = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    ours = AutoTokenizer.from_pretrained(smollm["hf_dir"])
    for text in TEXTS:
        assert ours(text).input_ids == reference(text).input_ids, text
        assert ours.decode(ours(text).input_ids) == text
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    chat = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(chat, tokenize=False) == reference.apply_chat_template(
        chat, tokenize=False
    )
    # The converted checkpoint's tokenizer adds <GIST> as one special token, nothing else.
    with_gist = common.load_tokenizer(smollm["ckpt_dir"])
    assert len(with_gist) == len(ours) + 1
    assert with_gist("a <GIST> b").input_ids.count(49152) == 1
    assert with_gist(TEXTS[2]).input_ids == ours(TEXTS[2]).input_ids


def test_gist_jax_logits_match_transformers(hf_model, jax_model):
    tokenizer = jax_model["tokenizer"]
    ids, positions, valid = _padded(tokenizer, TEXTS)
    no_gist = np.full(len(TEXTS), -1, np.int32)
    mask = gist.decoder_self_mask(positions, positions, no_gist, no_gist)
    ours, _ = jax_model["apply"](jax_model["params"], ids, positions, mask, None)
    ours = np.asarray(ours)
    ref = fx.torch_logits(hf_model, ids, positions, attention_mask_2d=valid.astype(np.int64))
    diff = np.abs(ours[valid][:, :49152] - ref[valid]).max()
    print(
        f"SmolLM2 gist_jax vs transformers: max |logit diff| = {diff:.2e} (|logits| <= {np.abs(ref[valid]).max():.1f})"
    )
    assert diff < 1e-3


def test_exported_hf_dir_reloads_and_matches(smollm, hf_model, jax_model, tmp_path):
    from transformers import AutoModelForCausalLM

    out = convert_to_hf(smollm["ckpt_dir"], tmp_path / "hf")
    exported, info = AutoModelForCausalLM.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    exported.eval()
    tokenizer = jax_model["tokenizer"]
    gist_id = jax_model["config"].gist_token_id
    texts = ["Instruction: Translate to French\n<GIST>\nInput: cat\nOutput:", TEXTS[0], TEXTS[1]]
    ids, positions, valid = _padded(tokenizer, texts)
    assert (ids == gist_id).sum() == 1
    # Without the gist token, the export equals the dequantised original.
    plain = fx.torch_logits(
        exported, ids[1:], positions[1:], attention_mask_2d=valid[1:].astype(np.int64)
    )
    orig = fx.torch_logits(
        hf_model, ids[1:], positions[1:], attention_mask_2d=valid[1:].astype(np.int64)
    )
    export_diff = np.abs(plain[valid[1:]][:, :49152] - orig[valid[1:]]).max()
    # With the gist mask, the export and gist_jax agree (gist row included).
    first, last = gist.gist_spans(ids, gist_id)
    mask = np.asarray(gist.decoder_self_mask(positions, positions, first, last, "gist"))
    ours, _ = jax_model["apply"](jax_model["params"], ids, positions, mask, None)
    theirs = fx.torch_logits(exported, ids, positions, bool_mask=mask)
    gist_diff = np.abs(np.asarray(ours)[valid] - theirs[valid]).max()
    print(f"exported: vs original {export_diff:.2e}; gist mask vs gist_jax {gist_diff:.2e}")
    assert export_diff < 1e-5
    assert gist_diff < 1e-3


def _greedy(jax_model, prompt_ids: list[int], steps: int) -> list[int]:
    config, params, apply = jax_model["config"], jax_model["params"], jax_model["apply"]
    length = len(prompt_ids)
    cache = KVCache.empty(
        config.num_hidden_layers, 1, length + steps, config.num_key_value_heads, config.head_dim
    )
    no_gist = np.full(1, -1, np.int32)
    ids = np.asarray([prompt_ids], np.int32)
    positions = np.arange(length, dtype=np.int32)[None]
    out: list[int] = []
    for _ in range(steps):
        mask = gist.decoder_self_mask(
            positions, cache.positions_after_append(positions), no_gist, no_gist
        )
        logits, cache = apply(params, ids, positions, mask, cache)
        token = int(np.argmax(np.asarray(logits)[0, -1]))
        out.append(token)
        if token == config.eos_token_id:
            break
        ids = np.asarray([[token]], np.int32)
        positions = positions[:, -1:] + 1
    return out


def test_greedy_chat_answer_is_sensible_and_matches_transformers(hf_model, jax_model):
    tokenizer = jax_model["tokenizer"]
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    prompt = tokenizer(text).input_ids
    steps = 12
    ours = _greedy(jax_model, prompt, steps)
    answer = tokenizer.decode(ours, skip_special_tokens=True)
    print(f"greedy answer: {answer!r}")
    assert "Paris" in answer
    # transformers, fed prompt + our answer in one pass, picks the same token at every step
    # (the greedy sequences are identical), without a second slow decode loop.
    full = np.asarray([prompt + ours[:-1]])
    ref = fx.torch_logits(hf_model, full)[0, len(prompt) - 1 :].argmax(-1)
    assert ours == ref.tolist()


def test_tiny_gguf_converts_without_torch(tmp_path):
    """The whole default-model path (GGUF read, Q8_0 dequantisation, q/k un-permutation,
    tokenizer, HF dir, gist_jax checkpoint) on a tiny llama.cpp-style file, in a process
    without torch; then checked against the HF model it was written from and against
    transformers' GGUF loader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokens, _, _ = fx.tiny_bpe_vocab()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        initializer_range=0.25,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    source = LlamaForCausalLM(config).eval()
    gguf_path = fx.write_tiny_gguf(tmp_path / "tiny.gguf", source)
    log = _convert_without_torch(tmp_path / "cache", gguf_path)
    assert "converted tiny.gguf" in log
    hf_dir, ckpt_dir = default_model.ensure_default_model(
        tmp_path / "cache", gguf_path=gguf_path, progress=False
    )

    ours = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    reference = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ours_sd, ref_sd, src_sd = ours.state_dict(), reference.state_dict(), source.state_dict()
    for name, weight in ours_sd.items():
        assert float((weight - ref_sd[name]).abs().max()) < 1e-6, name
        # Q8_0 keeps ~8 bits per weight; a wrong q/k row order would be off by O(weight).
        tol = 0.02 * float(src_sd[name].abs().max())
        assert float((weight - src_sd[name]).abs().max()) < tol, name

    text = "the cat at the inn"
    tok_ours = AutoTokenizer.from_pretrained(hf_dir)
    tok_ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    ids = tok_ours(text).input_ids
    assert ids == tok_ref(text).input_ids
    assert tokens.index("Ġthe") in ids and tokens.index("Ġcat") in ids

    config_j, params, _ = loading.load_checkpoint(ckpt_dir)
    assert config_j.scan_layers and config_j.gist_token_id == len(tokens)
    batch = np.asarray([ids], np.int32)
    positions = np.arange(len(ids), dtype=np.int32)[None]
    mask = np.tril(np.ones((len(ids), len(ids)), bool))[None, None]
    logits, _ = llama.build_model(config_j).apply({"params": params}, batch, positions, mask)
    ref_logits = fx.torch_logits(ours, batch)
    assert np.abs(np.asarray(logits)[0, :, : len(tokens)] - ref_logits[0]).max() < 1e-4


def test_gguf_errors(tmp_path):
    with pytest.raises(common.ConversionError, match="no such GGUF file"):
        gguf_io.open_gguf(tmp_path / "missing.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(common.ConversionError, match="cannot read GGUF"):
        gguf_io.open_gguf(tmp_path / "bad.gguf")
    with pytest.raises(common.ConversionError, match="architecture 'gpt2' is not supported"):
        gguf_io.llama_hf_config({"general.architecture": "gpt2"}, [])
    with pytest.raises(common.ConversionError, match="has no LLaMA counterpart"):
        gguf_io.hf_tensor_name("blk.0.ffn_gate_exps.weight")
    with pytest.raises(common.ConversionError, match="tokenizer model 'llama' is not supported"):
        gguf_io.build_tokenizer({"tokenizer.ggml.model": "llama"})
    # unpermute_rotary inverts llama.cpp's permutation for q (H heads) and k (KVH heads).
    w = np.arange(12 * 16 * 3, dtype=np.float32).reshape(12 * 16, 3)
    for heads in (12, 4):
        np.testing.assert_array_equal(
            gguf_io.unpermute_rotary(fx.llama_cpp_permute(w, heads), heads), w
        )
