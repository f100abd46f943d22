"""gist_jax's Flax LLaMA against transformers' PyTorch ``LlamaForCausalLM``: logits on a
padded batch (MHA/GQA, tied/untied, default/linear/llama3 rope), gist / pos_control /
neg_control masks, scan and remat equivalence, KV-cache decoding, and the config/axes API."""

from __future__ import annotations

import dataclasses
import functools

import fixtures_llama as fx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gist_jax import gist
from gist_jax.convert import llama as convert_llama
from gist_jax.models import llama, matmul
from gist_jax.models.attention import KVCache
from gist_jax.models.family import LLAMA, config_from_dict

CONFIG_NAMES = list(fx.TINY_CONFIGS)


@pytest.fixture(scope="module")
def models() -> dict:
    """name -> (torch model, gist_jax config, params) for every tiny config."""
    out = {}
    for name in CONFIG_NAMES:
        model = fx.make_hf_model(name)
        config = convert_llama.config_from_hf(model.config.to_dict())
        params = convert_llama.params_from_hf(fx.hf_state_dict(model), config)
        out[name] = (model, config, params)
    return out


@pytest.fixture(scope="module")
def batch() -> dict:
    return fx.padded_batch()


@functools.cache
def _jitted_apply(config: llama.LlamaConfig):
    return jax.jit(
        lambda p, i, pos, m, c: llama.build_model(config).apply({"params": p}, i, pos, m, c)
    )


def _apply(config, params, ids, positions, mask, cache=None):
    return _jitted_apply(config)(params, ids, positions, mask, cache)


@functools.cache
def _jitted_grad(config: llama.LlamaConfig):
    def loss(p, ids, positions, mask):
        logits = llama.build_model(config).apply({"params": p}, ids, positions, mask)[0]
        return jnp.mean(logits**2)

    return jax.jit(jax.grad(loss))


def _plain_mask(positions: np.ndarray) -> jax.Array:
    no_gist = np.full(positions.shape[0], gist.NO_GIST, np.int32)
    return gist.decoder_self_mask(positions, positions, no_gist, no_gist)


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_logits_match_pytorch_on_padded_batch(models, batch, name):
    model, config, params = models[name]
    ids, positions, valid = batch["input_ids"], batch["positions"], batch["valid"]
    ours, _ = _apply(config, params, ids, positions, _plain_mask(positions))
    # The reference builds its own causal + padding mask from a 2D attention mask.
    ref = fx.torch_logits(model, ids, positions, attention_mask_2d=valid.astype(np.int64))
    ours = np.asarray(ours)
    assert ours.dtype == np.float32 and ours.shape == (3, ids.shape[1], fx.VOCAB)
    assert ref[valid].std() > 0.5, "reference logits are too flat to test anything"
    diff = np.abs(ours[valid] - ref[valid]).max()
    print(f"{name}: max |logits - torch| = {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_gist_conditions_match_pytorch(models, batch, name):
    model, config, params = models[name]
    ids, positions, valid = batch["input_ids"], batch["positions"], batch["valid"]
    first, last = gist.gist_spans(ids, fx.GIST_ID)
    results = {}
    for condition in gist.CONDITIONS:
        mask = fx.gist_causal_mask(ids, condition)
        # The span form the train step uses must be the same mask on real query rows.
        span_form = np.asarray(gist.decoder_self_mask(positions, positions, first, last, condition))
        np.testing.assert_array_equal(span_form[:, 0][valid], mask[:, 0][valid])
        ours, _ = _apply(config, params, ids, positions, mask)
        ref = fx.torch_logits(model, ids, positions, bool_mask=mask)
        diff = np.abs(np.asarray(ours)[valid] - ref[valid]).max()
        print(f"{name} {condition}: max |logits - torch| = {diff:.2e}")
        assert diff < 1e-4
        results[condition] = np.asarray(ours)
    # The conditions really differ after the gist tokens of example 0 (positions > 4).
    assert np.abs(results["gist"][0, 5:] - results["pos_control"][0, 5:]).max() > 1e-2
    assert np.abs(results["gist"][0, 5:] - results["neg_control"][0, 5:]).max() > 1e-2


def test_qk_permutation_bug_would_be_caught(models, batch):
    """Negative control: the llama.cpp-style q/k row permutation left in place changes the
    logits far beyond the tolerance, so the comparisons above can fail."""
    model, config, _ = models["mha_untied"]
    sd = fx.hf_state_dict(model)
    for key in [k for k in sd if k.endswith(("q_proj.weight", "k_proj.weight"))]:
        w = sd[key]
        heads = w.shape[0] // config.head_dim
        sd[key] = w.reshape(heads, 2, config.head_dim // 2, -1).swapaxes(1, 2).reshape(w.shape)
    bad = convert_llama.params_from_hf(sd, config)
    ids, positions, valid = batch["input_ids"], batch["positions"], batch["valid"]
    ours, _ = _apply(config, bad, ids, positions, _plain_mask(positions))
    ref = fx.torch_logits(model, ids, positions, attention_mask_2d=valid.astype(np.int64))
    assert np.abs(np.asarray(ours)[valid] - ref[valid]).max() > 1e-2


@pytest.mark.parametrize(
    ("scan", "remat"),
    [(True, "none"), (False, "full"), (False, "dots"), (True, "full"), (True, "dots")],
)
def test_scan_and_remat_match_unrolled(models, batch, scan, remat):
    _, config, params = models["gqa_tied_llama3"]
    ids, positions = batch["input_ids"], batch["positions"]
    mask = fx.gist_causal_mask(ids, "gist")
    ref, _ = _apply(config, params, ids, positions, mask)
    variant = dataclasses.replace(config, scan_layers=scan, remat=remat)
    vparams = llama.relayout_params(params, config, scan)
    out, _ = _apply(variant, vparams, ids, positions, mask)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=0)

    # Gradients agree too (remat only changes what is recomputed in the backward pass).
    g_ref = _jitted_grad(config)(params, ids, positions, mask)
    g_var = llama.relayout_params(
        _jitted_grad(variant)(vparams, ids, positions, mask), variant, False
    )
    for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_var), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * (np.abs(a).max() + 1.0)


@pytest.mark.parametrize("form", ["stacked", "scan", "per_layer"])
def test_kv_cache_prefill_and_decode_match_full_forward(models, batch, form):
    """Prefill + one token at a time equals the full forward with each cache form: a
    stacked cache passed to unrolled layers (which carry it on per layer), its slices under
    nn.scan, and one buffer per layer from the start (``KVCache.per_layer``)."""
    scan = form == "scan"
    _, config, params = models["gqa_untied_linear_headdim_bias"]
    config = dataclasses.replace(config, scan_layers=scan)
    params = llama.relayout_params(params, dataclasses.replace(config, scan_layers=False), scan)
    ids, positions, valid = batch["input_ids"], batch["positions"], batch["valid"]
    first, last = gist.gist_spans(ids, fx.GIST_ID)
    full_mask = gist.decoder_self_mask(positions, positions, first, last, "gist")
    full, none_cache = _apply(config, params, ids, positions, full_mask)
    assert none_cache is None

    batch_size, length = ids.shape
    cache = KVCache.empty(
        config.num_hidden_layers, batch_size, length, config.num_key_value_heads, config.head_dim
    )
    if form == "per_layer":
        cache = cache.per_layer()
    step_logits = []
    prefill = 4  # then one token at a time; examples end (become padding) at 6, 9, 12
    chunks = [(0, prefill)] + [(t, t + 1) for t in range(prefill, length)]
    for start, stop in chunks:
        q_pos = positions[:, start:stop]
        k_pos = cache.positions_after_append(jnp.asarray(q_pos))
        mask = gist.decoder_self_mask(q_pos, k_pos, first, last, "gist")
        logits, cache = _apply(config, params, ids[:, start:stop], q_pos, mask, cache)
        step_logits.append(np.asarray(logits))
    stepped = np.concatenate(step_logits, axis=1)
    diff = np.abs(stepped[valid] - np.asarray(full)[valid]).max()
    print(f"{form}: max |cached - full| = {diff:.2e}")
    assert diff < 1e-5
    assert cache.is_per_layer == (not scan)
    cache = cache.stacked()
    assert int(cache.end) == length
    np.testing.assert_array_equal(np.asarray(cache.pos), positions)
    layers, kv_heads, dim = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    assert cache.k.shape == (layers, batch_size, kv_heads, dim, length)
    assert cache.v.shape == (layers, batch_size, kv_heads, length, dim)


def test_bfloat16_compute_keeps_float32_params_and_logits(models, batch):
    _, config, params = models["gqa_tied_llama3"]
    ids, positions = batch["input_ids"], batch["positions"]
    mask = _plain_mask(positions)
    ref, _ = _apply(config, params, ids, positions, mask)
    bf16 = dataclasses.replace(config, dtype="bfloat16")
    out, _ = _apply(bf16, params, ids, positions, mask)
    assert out.dtype == jnp.float32
    valid = batch["valid"]
    err = np.abs(np.asarray(out)[valid] - np.asarray(ref)[valid]).max()
    scale = np.abs(np.asarray(ref)[valid]).max()
    assert err < 0.1 * scale, (err, scale)
    init = LLAMA.abstract_params(bf16)
    assert {x.dtype for x in jax.tree.leaves(init)} == {jnp.dtype(jnp.float32)}


def test_bfloat16_llama_gradients_follow_float32(models, batch, monkeypatch):
    """The bfloat16 model's gradients, whose products go through gist_jax.models.matmul's
    VJP on a CPU, point where float32's do, as closely as JAX's own autodiff of the plain
    bfloat16 products (the path without the written-out transposes) does."""
    _, config, params = models["gqa_tied_llama3"]
    ids, positions = batch["input_ids"], batch["positions"]
    mask = _plain_mask(positions)
    bf16 = dataclasses.replace(config, dtype="bfloat16")
    want = jax.tree.leaves(_jitted_grad(config)(params, ids, positions, mask))
    got = jax.tree.leaves(_jitted_grad(bf16)(params, ids, positions, mask))
    monkeypatch.setattr(matmul, "_copies_transposes", lambda dtype: False)
    _jitted_grad.cache_clear()
    plain = jax.tree.leaves(_jitted_grad(bf16)(params, ids, positions, mask))
    _jitted_grad.cache_clear()

    def cosine(a: jax.Array, b: jax.Array) -> float:
        a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    for g, w, p in zip(got, want, plain, strict=True):
        assert g.dtype == jnp.float32
        assert cosine(g, w) > 0.98 and cosine(g, w) > cosine(p, w) - 1e-3
        assert cosine(g, p) > 0.999


def test_config_round_trips_and_hf_rope_spellings(models):
    for _, config, _ in models.values():
        assert llama.LlamaConfig.from_dict(config.to_dict()) == config
        assert config_from_dict(config.to_dict()) == config
        assert convert_llama.config_from_hf(convert_llama.config_to_hf(config)) == config
    _, config, _ = models["gqa_tied_llama3"]
    assert config.rope_type == "llama3" and config.rope_theta == 500000.0
    assert config.rope_original_max_position_embeddings == 16
    # transformers 4.x spelling: top-level rope_theta + rope_scaling with "type".
    old = {k: v for k, v in convert_llama.config_to_hf(config).items() if k != "rope_parameters"}
    old["rope_scaling"] = {"type": "linear", "factor": 4.0}
    old["rope_theta"] = 1234.0
    parsed = convert_llama.config_from_hf(old)
    assert (parsed.rope_type, parsed.rope_factor, parsed.rope_theta) == ("linear", 4.0, 1234.0)
    # What we write is what transformers 5 reads.
    from transformers import LlamaConfig as HFLlamaConfig

    hf = HFLlamaConfig(**convert_llama.config_to_hf(config))
    assert hf.rope_parameters["rope_type"] == "llama3"
    assert hf.rope_parameters["rope_theta"] == 500000.0
    assert hf.rope_parameters["factor"] == 8.0
    with pytest.raises(ValueError, match="yarn"):
        convert_llama.config_from_hf({**old, "rope_scaling": {"rope_type": "yarn", "factor": 2}})


def test_rope_frequencies_match_transformers(models):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    for model, config, _ in models.values():
        ref = LlamaRotaryEmbedding(model.config).inv_freq.numpy()
        np.testing.assert_allclose(llama.rope_inv_freq(config), ref, rtol=1e-6)


def test_param_logical_axes_cover_every_param(models):
    allowed = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers", "norm"}
    for _, config, _ in models.values():
        for scan in (False, True):
            cfg = dataclasses.replace(config, scan_layers=scan)
            shapes = LLAMA.abstract_params(cfg)
            axes = LLAMA.param_axes(cfg)
            flat_axes = jax.tree_util.tree_flatten_with_path(
                axes, is_leaf=lambda x: isinstance(x, tuple)
            )[0]
            flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
            assert [p for p, _ in flat_axes] == [p for p, _ in flat_shapes]
            for (path, names), (_, shape) in zip(flat_axes, flat_shapes, strict=True):
                assert len(names) == len(shape.shape), path
                assert set(names) <= allowed, (path, names)
                assert ("layers" in names) == (scan and "layers" in jax.tree_util.keystr(path))


def test_a_gist_adapter_changes_only_the_gist_rows_and_what_follows(models, batch):
    """Positions before a row's gist tokens, and rows without any, are untouched by the
    adapter, a new
    adapter (``up`` = 0) changes nothing, a trained one changes everything after the gists,
    in either layer layout; bad ranks are refused; the HF form round-trips."""
    from gist_jax import model_loading
    from gist_jax.convert.common import ConversionError

    _, base, params = models["gqa_tied_llama3"]
    base = dataclasses.replace(base, gist_token_id=fx.GIST_ID)
    config = dataclasses.replace(base, gist_adapter_rank=2)
    fresh = model_loading.add_gist_adapter(params, config, LLAMA)
    # The adapter is the one a full init with the same key makes (only it is computed).
    full = LLAMA.init_params(config, jax.random.key(0))
    adapters = [(fresh[f"layers_{i}"], full[f"layers_{i}"]) for i in range(base.num_hidden_layers)]
    for got, want in adapters:
        for name in ("down", "up"):
            want_value = np.asarray(want["gist_adapter"][name])
            np.testing.assert_array_equal(np.asarray(got["gist_adapter"][name]), want_value)
    ids, positions, valid = batch["input_ids"], batch["positions"], batch["valid"]
    mask = fx.gist_causal_mask(ids, "gist")
    ref, _ = _apply(base, params, ids, positions, mask)
    same, _ = _apply(config, fresh, ids, positions, mask)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(ref))

    for i in range(config.num_hidden_layers):
        up = fresh[f"layers_{i}"]["gist_adapter"]["up"]
        fresh[f"layers_{i}"]["gist_adapter"]["up"] = jnp.full(up.shape, 0.5)
    out, _ = _apply(config, fresh, ids, positions, mask)
    first, _ = gist.gist_spans(ids, fx.GIST_ID)
    first = np.asarray(first)[:, None]
    # Before the gists, or anywhere in a row without gist tokens (first = NO_GIST).
    before = (np.arange(ids.shape[1])[None, :] < first) | (first == gist.NO_GIST)
    changed = np.abs(np.asarray(out) - np.asarray(ref)).max(axis=-1) > 1e-4
    assert before.any() and not changed[before].any()
    assert changed[valid & ~before].all()
    scanned = dataclasses.replace(config, scan_layers=True)
    out_scan, _ = _apply(scanned, llama.relayout_params(fresh, config, True), ids, positions, mask)
    np.testing.assert_allclose(np.asarray(out_scan), np.asarray(out), atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match="gist_adapter_rank=-1"):
        dataclasses.replace(config, gist_adapter_rank=-1)
    with pytest.raises(ValueError, match="needs gist_token_id"):
        dataclasses.replace(config, gist_token_id=None)
    assert convert_llama.config_to_hf(config)["gist_adapter_rank"] == 2
    assert "gist_adapter_rank" not in convert_llama.config_to_hf(base)
    # Its tensors go to HF and come back unchanged, and a missing one is named.
    tensors = convert_llama.adapter_to_hf(fresh, config)
    back, back_config = convert_llama.add_adapter_from_hf(dict(params), base, tensors, 2)
    assert back_config == config
    for i in range(config.num_hidden_layers):
        for name in ("down", "up"):
            got = back[f"layers_{i}"]["gist_adapter"][name]
            np.testing.assert_array_equal(got, fresh[f"layers_{i}"]["gist_adapter"][name])
    del tensors["layers.1.up"]
    with pytest.raises(ConversionError, match=r"layers\.1\.up"):
        convert_llama.add_adapter_from_hf(dict(params), base, tensors, 2)
