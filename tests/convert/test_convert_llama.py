"""HF <-> gist_jax conversion for LLaMA: HF dir -> converted checkpoint -> logits match
PyTorch; -> HF dir again -> transformers reloads it with no missing/unexpected keys and the
same logits; the <GIST> token and its mean rows; sharded weights; the CLIs; and every
error case naming its cause."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import fixtures_llama as fx
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gist_jax import gist
from gist_jax.convert import common, loading
from gist_jax.convert.common import ConversionError
from gist_jax.convert.from_hf import convert_from_hf
from gist_jax.convert.to_hf import convert_to_hf
from gist_jax.models import layers, llama

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _logits(config, params, ids, positions, mask):
    fn = jax.jit(lambda p, i, pos, m: llama.build_model(config).apply({"params": p}, i, pos, m)[0])
    return np.asarray(fn(params, ids, positions, mask))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    """name -> dict(model, hf_dir, ckpt, hf_out) with every tiny config converted both ways;
    the GQA/llama3 model is stored with scan_layers to cover the stacked layout."""
    root = tmp_path_factory.mktemp("convert_llama")
    out = {}
    for name in fx.TINY_CONFIGS:
        model = fx.make_hf_model(name)
        hf_dir = fx.save_hf_dir(model, root / name / "hf")
        ckpt = convert_from_hf(hf_dir, root / name / "ckpt", scan_layers=name == "gqa_tied_llama3")
        hf_out = convert_to_hf(ckpt, root / name / "hf_out")
        out[name] = dict(model=model, hf_dir=hf_dir, ckpt=ckpt, hf_out=hf_out)
    return out


@pytest.mark.parametrize("name", list(fx.TINY_CONFIGS))
def test_round_trip_logits(converted, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = converted[name]
    model = entry["model"]
    config, params, tokenizer = loading.load_checkpoint(entry["ckpt"])
    assert config.scan_layers == (name == "gqa_tied_llama3")
    assert config.vocab_size == fx.VOCAB + 1 and config.gist_token_id == fx.VOCAB
    assert tokenizer.convert_tokens_to_ids(common.GIST_TOKEN) == fx.VOCAB

    # The new rows are the mean of the old ones; the old ones are untouched.
    sd = fx.hf_state_dict(model)
    emb = np.asarray(params["embed_tokens"]["embedding"])
    np.testing.assert_allclose(emb[-1], sd["model.embed_tokens.weight"].mean(0), atol=1e-6)
    np.testing.assert_array_equal(emb[:-1], sd["model.embed_tokens.weight"])
    if not config.tie_word_embeddings:
        head = np.asarray(params["lm_head"]["kernel"])
        np.testing.assert_allclose(head[:, -1], sd["lm_head.weight"].mean(0), atol=1e-6)

    # HF -> gist_jax: logits on the original vocabulary match PyTorch (padded batch).
    batch = fx.padded_batch()
    ids, positions, valid = batch["input_ids"], batch["positions"], batch["valid"]
    no_gist = np.full(3, -1, np.int32)
    mask = gist.decoder_self_mask(positions, positions, no_gist, no_gist)
    ours = _logits(config, params, ids, positions, mask)
    ref = fx.torch_logits(model, ids, positions, attention_mask_2d=valid.astype(np.int64))
    diff_in = np.abs(ours[valid][:, : fx.VOCAB] - ref[valid]).max()

    # gist_jax -> HF: transformers loads it cleanly, and reproduces the original logits.
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        entry["hf_out"], output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    reloaded.eval()
    assert reloaded.config.vocab_size == fx.VOCAB + 1
    back = fx.torch_logits(reloaded, ids, positions, attention_mask_2d=valid.astype(np.int64))
    diff_back = np.abs(back[valid][:, : fx.VOCAB] - ref[valid]).max()

    # With the gist token in the input and the gist mask, the exported model and gist_jax
    # still agree (the gist row and the reloaded rope scaling are used).
    gist_ids = np.where(ids == fx.GIST_ID, config.gist_token_id, ids).astype(np.int32)
    first, last = gist.gist_spans(gist_ids, config.gist_token_id)
    gmask = np.asarray(gist.decoder_self_mask(positions, positions, first, last, "gist"))
    ours_gist = _logits(config, params, gist_ids, positions, gmask)
    back_gist = fx.torch_logits(reloaded, gist_ids, positions, bool_mask=gmask)
    diff_gist = np.abs(ours_gist[valid] - back_gist[valid]).max()
    print(f"{name}: HF->jax {diff_in:.2e}, jax->HF {diff_back:.2e}, gist mask {diff_gist:.2e}")
    assert diff_in < 1e-4
    assert diff_back < 1e-5
    assert diff_gist < 1e-4

    # The exported tokenizer maps "<GIST>" to the gist id.
    tok = AutoTokenizer.from_pretrained(entry["hf_out"])
    assert tok.convert_tokens_to_ids(common.GIST_TOKEN) == config.gist_token_id
    assert json.loads((entry["hf_out"] / "generation_config.json").read_text())["eos_token_id"] == 2


def test_reimporting_an_export_keeps_trained_gist_rows(converted, tmp_path):
    """HF -> jax -> HF -> jax is lossless: a tokenizer that already has <GIST> keeps its id,
    and the (possibly trained) gist rows are not re-initialised or duplicated."""
    entry = converted["mha_untied"]
    hf_dir = _copy_hf_dir(entry["hf_out"], tmp_path / "hf")
    tensors = load_file(str(hf_dir / "model.safetensors"))
    rng = np.random.default_rng(0)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name][fx.VOCAB] = rng.normal(size=tensors[name].shape[1])  # "trained" row
    save_file(tensors, str(hf_dir / "model.safetensors"))
    config, params, tokenizer = loading.load_checkpoint(convert_from_hf(hf_dir, tmp_path / "ck"))
    assert config.vocab_size == fx.VOCAB + 1 and config.gist_token_id == fx.VOCAB
    assert len(tokenizer) == fx.VOCAB + 1
    np.testing.assert_array_equal(
        params["embed_tokens"]["embedding"], tensors["model.embed_tokens.weight"]
    )
    np.testing.assert_array_equal(params["lm_head"]["kernel"], tensors["lm_head.weight"].T)
    _, original, _ = loading.load_checkpoint(entry["ckpt"])
    for path, x in jax.tree_util.tree_flatten_with_path(original)[0]:
        if "embed_tokens" not in str(path) and "lm_head" not in str(path):
            y = params
            for key in path:
                y = y[key.key]
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sharded_safetensors_and_stacking(converted, tmp_path):
    entry = converted["gqa_untied_linear_headdim_bias"]
    sharded = tmp_path / "sharded"
    entry["model"].save_pretrained(str(sharded), safe_serialization=True, max_shard_size="40KB")
    fx.make_tokenizer().save_pretrained(str(sharded))
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    ckpt = convert_from_hf(sharded, tmp_path / "ckpt", scan_layers=True)
    config, params, _ = loading.load_checkpoint(ckpt)
    assert config.scan_layers and params["layers"]["mlp"]["up_proj"]["kernel"].shape[0] == 2
    _, reference, _ = loading.load_checkpoint(entry["ckpt"])
    restacked = layers.stack_layers(reference, config.num_hidden_layers)
    for x, y in zip(jax.tree.leaves(restacked), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # load_checkpoint can hand back the other layout on request.
    config_u, params_u, _ = loading.load_checkpoint(ckpt, scan_layers=False)
    assert not config_u.scan_layers and "layers_1" in params_u
    # Export sharded too; transformers reads the index and gets the same weights.
    from transformers import AutoModelForCausalLM

    out = convert_to_hf(ckpt, tmp_path / "hf_sharded", max_shard_bytes=40_000)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    single = common.read_safetensors(entry["hf_out"])
    for name, weight in model.state_dict().items():
        np.testing.assert_array_equal(weight.numpy(), single[name])


def test_padded_embedding_reuses_a_row(tmp_path):
    """A tokenizer smaller than the embedding (padded vocab): <GIST> takes the first unused
    row, which is re-initialised to the mean; the vocab size stays."""
    model = fx.make_hf_model("mha_untied")
    hf_dir = tmp_path / "hf"
    model.save_pretrained(str(hf_dir), safe_serialization=True)
    tokenizer = fx.make_tokenizer(vocab_size=90)
    tokenizer.save_pretrained(str(hf_dir))
    config, params, tok = loading.load_checkpoint(convert_from_hf(hf_dir, tmp_path / "ckpt"))
    assert config.vocab_size == fx.VOCAB and config.gist_token_id == 90
    assert tok.convert_tokens_to_ids(common.GIST_TOKEN) == 90
    emb = np.asarray(params["embed_tokens"]["embedding"])
    orig = fx.hf_state_dict(model)["model.embed_tokens.weight"]
    np.testing.assert_allclose(emb[90], np.delete(orig, 90, axis=0).mean(0), atol=1e-6)
    np.testing.assert_array_equal(np.delete(emb, 90, 0), np.delete(orig, 90, 0))


def test_cli_round_trip(converted, tmp_path):
    entry = converted["gqa_tied_llama3"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    ckpt, hf_out = tmp_path / "ckpt", tmp_path / "hf"
    cmds = [
        ["gist_jax.convert.from_hf", f"--hf_dir={entry['hf_dir']}", f"--out_dir={ckpt}"],
        ["gist_jax.convert.to_hf", f"--ckpt_dir={ckpt}", f"--out_dir={hf_out}"],
    ]
    stdout = []
    for cmd in cmds:
        proc = subprocess.run(
            [sys.executable, "-m", *cmd], cwd=REPO_ROOT, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        stdout.append(proc.stdout)
    assert f"gist_token_id={fx.VOCAB}" in stdout[0]
    assert common.read_model_config(ckpt)["gist_token_id"] == fx.VOCAB
    a, b = (
        load_file(str(hf_out / "model.safetensors")),
        load_file(str(entry["hf_out"] / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # An existing output directory is refused without --overwrite, and nothing is touched.
    proc = subprocess.run(
        [sys.executable, "-m", *cmds[1]], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "already exists" in proc.stderr


# ---- error cases -------------------------------------------------------------------------


def _copy_hf_dir(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_error_no_config_json(tmp_path):
    with pytest.raises(ConversionError, match=r"no config\.json"):
        convert_from_hf(tmp_path, tmp_path / "out")


def test_error_unsupported_model_type(converted, tmp_path):
    hf_dir = _copy_hf_dir(converted["mha_untied"]["hf_dir"], tmp_path / "hf")
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"unsupported model_type 'gpt2'.*llama"):
        convert_from_hf(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_error_missing_tensor(converted, tmp_path):
    hf_dir = _copy_hf_dir(converted["mha_untied"]["hf_dir"], tmp_path / "hf")
    tensors = load_file(str(hf_dir / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(hf_dir / "model.safetensors"))
    with pytest.raises(
        ConversionError, match=r"missing tensor 'model.layers.1.mlp.down_proj.weight'"
    ):
        convert_from_hf(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_error_misshaped_tensor(converted, tmp_path):
    hf_dir = _copy_hf_dir(converted["mha_untied"]["hf_dir"], tmp_path / "hf")
    tensors = load_file(str(hf_dir / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 64), np.float32)
    save_file(tensors, str(hf_dir / "model.safetensors"))
    with pytest.raises(
        ConversionError,
        match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(32, 64\), expected \(64, 64\)",
    ):
        convert_from_hf(hf_dir, tmp_path / "out")


def test_error_tensors_the_config_does_not_describe(converted, tmp_path):
    hf_dir = _copy_hf_dir(converted["mha_untied"]["hf_dir"], tmp_path / "hf")
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"not described by config.json.*model.layers.1"):
        convert_from_hf(hf_dir, tmp_path / "out")


def test_error_unsupported_rope_and_activation(converted, tmp_path):
    hf_dir = _copy_hf_dir(converted["mha_untied"]["hf_dir"], tmp_path / "hf")
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(
        json.dumps({**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
    )
    with pytest.raises(ConversionError, match=r"rope type 'yarn' is not supported.*llama3"):
        convert_from_hf(hf_dir, tmp_path / "out")
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    with pytest.raises(ConversionError, match="hidden_act 'gelu'"):
        convert_from_hf(hf_dir, tmp_path / "out")


def test_error_model_config_does_not_match_params(converted, tmp_path):
    ckpt = _copy_tree(converted["mha_untied"]["ckpt"], tmp_path / "ckpt")
    cfg = common.read_model_config(ckpt)
    cfg["intermediate_size"] = 80
    (ckpt / common.MODEL_CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(
        ConversionError, match=r"params do not match.*mlp.*down_proj.*\(96, 64\).*\(80, 64\)"
    ):
        convert_to_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    cfg["intermediate_size"] = 96
    cfg["num_hidden_layers"] = 3
    (ckpt / common.MODEL_CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"missing .*layers_2"):
        convert_to_hf(ckpt, tmp_path / "hf")


def test_error_not_a_checkpoint(tmp_path):
    with pytest.raises(ConversionError, match=r"no model_config\.json"):
        convert_to_hf(tmp_path, tmp_path / "hf")


def _copy_tree(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_directory_without_model_safetensors_does_not_read_the_gist_adapter_file(tmp_path):
    """The glob fallback (no ``model.safetensors``, no index) reads the weight files only,
    never the gist adapter's file beside them."""
    from gist_jax.convert import common

    common.write_safetensors({"w": np.ones((2,), np.float32)}, tmp_path / "weights.safetensors")
    common.write_safetensors(
        {"layers.0.up": np.ones((2,), np.float32)}, tmp_path / common.GIST_ADAPTER_FILE
    )
    assert set(common.read_safetensors(tmp_path)) == {"w"}
