"""T5 conversion: the tensor names against a real transformers state dict, lossless
HF -> gist_jax -> HF, export that transformers reloads with the same logits, the full
from_hf / to_hf pipeline with a real (trained) sentencepiece T5 tokenizer and the
``<GIST>`` token, mean-initialised gist rows, and clear errors for bad checkpoints."""

from __future__ import annotations

import dataclasses
import functools
import json

import fixtures_t5 as fx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gist_jax import gist
from gist_jax.convert import common, from_hf, loading, to_hf
from gist_jax.convert import t5 as convert_t5
from gist_jax.convert.common import ConversionError
from gist_jax.data import tokenize
from gist_jax.models.family import T5

TOKENIZER_VOCAB = 80  # sentencepiece pieces; the tokenizer has no sentinel ids


@functools.cache
def reference(variant: str, vocab_size: int = fx.VOCAB):
    model = fx.hf_model(variant, vocab_size=vocab_size)
    config = convert_t5.config_from_hf(model.config.to_dict())
    return model, config


def gist_logits(config, params, src, tgt, condition="gist") -> np.ndarray:
    pos, first, last = src["positions"], src["first"], src["last"]
    dpos = tgt["positions"]
    none = np.full(len(pos), -1, np.int32)
    logits, _ = fx.jitted(config, "__call__")(
        jax.tree.map(jnp.asarray, params),
        src["ids"],
        pos,
        gist.encoder_self_mask(pos, pos, first, last, condition),
        tgt["ids"],
        dpos,
        gist.decoder_self_mask(dpos, dpos, none, none),
        gist.cross_mask(pos, first, last, condition),
    )
    return np.asarray(logits)


def hf_gist_logits(hf, src, tgt, gist_id, condition="gist") -> np.ndarray:
    enc_mask = np.asarray(gist.make_gist_mask(src["ids"], gist_id, fx.PAD_ID, condition))
    cross = np.asarray(gist.make_cross_attention_mask(src["ids"], gist_id, fx.PAD_ID, condition))
    return fx.hf_logits(hf, src["ids"], enc_mask, cross[:, 0, 0], tgt["ids"], tgt["valid"])


SPECS = [(4, 2, 5), (1, 2, 2), (9, 2, 3), (6, 0, 4)]
TARGETS = [6, 3, 7, 5]
SRC_LEN = 16


@pytest.mark.parametrize("variant", fx.VARIANTS)
def test_names_and_lossless_round_trip(variant):
    hf, config = reference(variant)
    sd = fx.state_dict(hf)
    # transformers' own state dict also lists the tied aliases of `shared`.
    aliases = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
    if variant == "v1_0":
        aliases.add("lm_head.weight")
    assert convert_t5.expected_hf_names(config) == set(sd) - aliases
    for scan in (False, True):
        cfg = dataclasses.replace(config, scan_layers=scan)
        params = convert_t5.params_from_hf(sd, cfg)
        common.check_params_match(params, T5.abstract_params(cfg), "test")
        back = convert_t5.params_to_hf(params, cfg)
        assert set(back) == set(sd) - aliases
        for name, value in back.items():
            np.testing.assert_array_equal(value, sd[name], err_msg=name)
    assert "lm_head.weight" in back if variant == "v1_1" else "lm_head.weight" not in back
    # The bias of block 0 is stored once per stack, outside the layers.
    params = convert_t5.params_from_hf(sd, config)
    np.testing.assert_array_equal(
        params["encoder"]["relpos_bias"]["embedding"],
        sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"],
    )


@pytest.mark.parametrize("variant", fx.VARIANTS)
def test_export_reloads_in_transformers(variant, tmp_path):
    """Params of our own (random) initialisation -> converted checkpoint -> to_hf ->
    ``T5ForConditionalGeneration.from_pretrained``: same logits under the gist mask."""
    from transformers import T5ForConditionalGeneration

    _, base = reference(variant)
    config = dataclasses.replace(
        base, initializer_factor=1.5, gist_token_id=fx.GIST_ID, scan_layers=variant == "v1_1"
    )
    params = jax.tree.map(np.asarray, T5.init_params(config, jax.random.key(3)))
    if variant == "v1_1":
        # HF's init gives the untied head std 1 per entry (here 1.5): logits near +-10
        # would turn float32 rounding into 1e-5-sized differences. Keep them O(1).
        params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 0.1
    common.save_converted(tmp_path / "ckpt", params, config.to_dict(), tokenizer=None)
    hf_dir = to_hf.convert_to_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf_config = json.loads((hf_dir / "config.json").read_text())
    assert hf_config["tie_word_embeddings"] == (variant == "v1_0")
    hf = T5ForConditionalGeneration.from_pretrained(str(hf_dir), attn_implementation="eager")
    hf.eval()
    assert hf.config.scale_decoder_outputs == (variant == "v1_0")
    if variant == "v1_1":
        assert hf.lm_head.weight.data_ptr() != hf.shared.weight.data_ptr()
    src, tgt = fx.source_batch(SPECS, length=SRC_LEN), fx.target_batch(TARGETS)
    for condition in ("gist", "neg_control"):
        want = hf_gist_logits(hf, src, tgt, fx.GIST_ID, condition)
        got = gist_logits(config, params, src, tgt, condition)
        assert fx.relative_diff(got, want, tgt["valid"]) < 1e-5, condition


def _hf_dir_with_tokenizer(variant, vocab_size, tmp_path):
    hf, _ = reference(variant, vocab_size)
    tok = fx.t5_tokenizer(tmp_path, TOKENIZER_VOCAB)
    assert len(tok) == TOKENIZER_VOCAB
    hf_dir = tmp_path / "hf_in"
    hf.save_pretrained(str(hf_dir))
    tok.save_pretrained(str(hf_dir))
    return hf, hf_dir


def _tokenized_batch(tokenizer, gist_id):
    texts = [
        "Instruction: translate the sentence to French<GIST><GIST>Input: the dog runs.",
        "Instruction: answer<GIST><GIST>Input: is it a cat?",
        "Instruction: summarize this text about a quick brown fox<GIST><GIST>",
        "Input: the lazy dog jumps over the fox.",
    ]
    rows = [tokenizer(t).input_ids for t in texts]
    length = max(map(len, rows))
    ids = np.full((len(rows), length), fx.PAD_ID, np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
    first, last = (np.asarray(x) for x in gist.gist_spans(ids, gist_id))
    assert (first[:3] >= 0).all() and first[3] == -1
    assert ((last - first)[:3] == 1).all()  # "<GIST><GIST>" is exactly two tokens
    positions = np.where(ids != fx.PAD_ID, np.arange(length), -1).astype(np.int32)
    return {"ids": ids, "positions": positions, "first": first, "last": last}


@pytest.mark.parametrize(
    ("variant", "vocab_size"),
    # v1.0 with an embedding padded beyond the tokenizer (like T5's 32128 vs 32100): the
    # gist token reuses an unused row. v1.1 with vocab == tokenizer: a row is appended.
    [("v1_0", fx.VOCAB), ("v1_1", TOKENIZER_VOCAB)],
)
def test_from_hf_to_hf_pipeline(variant, vocab_size, tmp_path):
    from transformers import T5ForConditionalGeneration

    hf, hf_dir = _hf_dir_with_tokenizer(variant, vocab_size, tmp_path)
    ckpt = from_hf.convert_from_hf(hf_dir, tmp_path / "ckpt", scan_layers=variant == "v1_1")
    config, params, tok = loading.load_checkpoint(ckpt)
    gist_id = TOKENIZER_VOCAB
    assert config.gist_token_id == gist_id == tok.convert_tokens_to_ids(common.GIST_TOKEN)
    assert config.vocab_size == (fx.VOCAB if variant == "v1_0" else TOKENIZER_VOCAB + 1)
    assert config.scan_layers == (variant == "v1_1")

    # Every original row is untouched; the gist row is the mean of the other rows.
    sd = fx.state_dict(hf)
    emb = np.asarray(params["shared"]["embedding"])
    others = np.delete(emb, gist_id, axis=0)
    np.testing.assert_allclose(emb[gist_id], others.mean(0), rtol=1e-6, atol=1e-7)
    rows = [i for i in range(vocab_size) if i != gist_id]
    np.testing.assert_array_equal(emb[rows], sd["shared.weight"][rows])
    if variant == "v1_1":
        head = np.asarray(params["lm_head"]["kernel"]).T
        np.testing.assert_allclose(head[gist_id], head[:gist_id].mean(0), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(head[:gist_id], sd["lm_head.weight"])

    # Before any training, logits on the original vocabulary match the source model for
    # inputs without the gist token.
    # Ids stay below the gist id: its row changed, and v1.1's vocab ends there.
    src = fx.source_batch([(s[0], 0, s[2]) for s in SPECS], max_id=gist_id, length=SRC_LEN)
    tgt = fx.target_batch(TARGETS, max_id=gist_id)
    want = hf_gist_logits(hf, src, tgt, gist_id)
    got = gist_logits(config, params, src, tgt)
    cols = [i for i in range(vocab_size) if i != gist_id]
    assert np.abs(got[..., cols] - want[..., cols])[tgt["valid"]].max() < 1e-4

    # Back to HF (now with the gist row): same logits under all three conditions on
    # tokenized text with real gist tokens.
    out = to_hf.convert_to_hf(ckpt, tmp_path / "hf_out")
    reloaded = T5ForConditionalGeneration.from_pretrained(str(out), attn_implementation="eager")
    reloaded.eval()
    src = _tokenized_batch(tok, gist_id)
    for condition in gist.CONDITIONS:
        want = hf_gist_logits(reloaded, src, tgt, gist_id, condition)
        got = gist_logits(config, params, src, tgt, condition)
        assert fx.relative_diff(got, want, tgt["valid"]) < 1e-5, condition


def test_t5_tokenizer_gist_token(tmp_path):
    from transformers import AutoTokenizer

    tok = fx.t5_tokenizer(tmp_path, TOKENIZER_VOCAB)
    before = tok("the quick brown fox").input_ids
    assert before[-1] == fx.EOS_ID and tok.pad_token_id == fx.PAD_ID
    gist_id = common.add_gist_token(tok)
    assert gist_id == TOKENIZER_VOCAB == len(tok) - 1
    assert common.add_gist_token(tok) == gist_id and len(tok) == TOKENIZER_VOCAB + 1
    tok.save_pretrained(str(tmp_path / "saved"))
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert tokenize.gist_token_id_of(reloaded) == gist_id
    assert reloaded.convert_tokens_to_ids(common.GIST_TOKEN) == gist_id
    assert reloaded(common.GIST_TOKEN, add_special_tokens=False).input_ids == [gist_id]
    ids = reloaded("Instruction: answer<GIST>Input: the dog").input_ids
    assert ids.count(gist_id) == 1
    # Text without the gist token tokenizes as before.
    assert reloaded("the quick brown fox").input_ids == before


def test_add_gist_rows():
    _, config = reference("v1_1")
    rng = np.random.default_rng(0)
    params = {
        "shared": {"embedding": rng.normal(size=(fx.VOCAB, 32)).astype(np.float32)},
        "lm_head": {"kernel": rng.normal(size=(32, fx.VOCAB)).astype(np.float32)},
    }
    grown, cfg = convert_t5.add_gist_rows(params, config)
    assert cfg.vocab_size == fx.VOCAB + 1 and cfg.gist_token_id == fx.VOCAB
    emb, head = grown["shared"]["embedding"], grown["lm_head"]["kernel"]
    assert emb.shape == (fx.VOCAB + 1, 32) and head.shape == (32, fx.VOCAB + 1)
    mean_emb = params["shared"]["embedding"].astype(np.float64).mean(0)
    mean_head = params["lm_head"]["kernel"].astype(np.float64).mean(1)
    np.testing.assert_allclose(emb[-1], mean_emb, rtol=0, atol=1e-7)
    np.testing.assert_allclose(head[:, -1], mean_head, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(emb[:-1], params["shared"]["embedding"])

    same, cfg = convert_t5.add_gist_rows(params, config, token_id=90)
    assert cfg.vocab_size == fx.VOCAB and cfg.gist_token_id == 90
    mean = np.delete(params["shared"]["embedding"], 90, axis=0).astype(np.float64).mean(0)
    np.testing.assert_allclose(same["shared"]["embedding"][90], mean, rtol=0, atol=1e-7)
    rows = [i for i in range(fx.VOCAB) if i != 90]
    np.testing.assert_array_equal(
        same["shared"]["embedding"][rows], params["shared"]["embedding"][rows]
    )
    assert same["lm_head"]["kernel"].shape == (32, fx.VOCAB)
    with pytest.raises(ConversionError, match="beyond the embedding"):
        convert_t5.add_gist_rows(params, config, token_id=fx.VOCAB + 1)


def test_transformers5_tied_head_without_scaling(tmp_path):
    """transformers 5 ties T5's lm_head even when ``tie_word_embeddings=False`` (it only
    turns output scaling off) and then saves no ``lm_head.weight``; such a model converts
    with the shared embedding as its (unscaled) output layer."""
    from transformers import T5ForConditionalGeneration

    hf = T5ForConditionalGeneration(fx.hf_config("v1_1")).eval()
    hf.save_pretrained(str(tmp_path))
    tensors = common.read_safetensors(tmp_path)
    assert "lm_head.weight" not in tensors
    config = convert_t5.config_from_hf(common.read_hf_config(tmp_path))
    assert not config.tie_word_embeddings
    params = convert_t5.params_from_hf(tensors, config)
    np.testing.assert_array_equal(params["lm_head"]["kernel"].T, tensors["shared.weight"])
    src, tgt = fx.source_batch(SPECS, length=SRC_LEN), fx.target_batch(TARGETS)
    want = hf_gist_logits(hf, src, tgt, fx.GIST_ID)
    got = gist_logits(config, params, src, tgt)
    assert np.abs(got - want)[tgt["valid"]].max() < 1e-4


def test_config_mapping():
    _, config = reference("v1_1")
    hf = convert_t5.config_to_hf(config)
    assert convert_t5.config_from_hf(hf) == config
    # transformers 4.x spelling (no scale_decoder_outputs) and 5.x spelling.
    assert not convert_t5.config_from_hf({**hf, "tie_word_embeddings": False}).tie_word_embeddings
    five = {**hf, "tie_word_embeddings": True, "scale_decoder_outputs": False}
    assert not convert_t5.config_from_hf(five).tie_word_embeddings
    tied = {**hf, "tie_word_embeddings": True, "scale_decoder_outputs": True}
    assert convert_t5.config_from_hf(tied).tie_word_embeddings
    flan = {k: v for k, v in hf.items() if k not in ("dense_act_fn", "num_decoder_layers")}
    flan_cfg = convert_t5.config_from_hf(flan)
    assert flan_cfg.dense_act_fn == "gelu_new" and flan_cfg.num_decoder_layers == 2
    with pytest.raises(ConversionError, match="model_type 'bart'"):
        convert_t5.config_from_hf({**hf, "model_type": "bart"})
    with pytest.raises(ConversionError, match="scale_decoder_outputs"):
        convert_t5.config_from_hf(
            {**hf, "tie_word_embeddings": False, "scale_decoder_outputs": True}
        )
    with pytest.raises(ConversionError, match="d_model"):
        convert_t5.config_from_hf({k: v for k, v in hf.items() if k != "d_model"})


def test_conversion_errors_name_the_tensor():
    hf, config = reference("v1_0")
    sd = fx.state_dict(hf)
    name = "decoder.block.1.layer.1.EncDecAttention.k.weight"
    with pytest.raises(ConversionError, match=name.replace(".", r"\.")):
        convert_t5.params_from_hf({k: v for k, v in sd.items() if k != name}, config)
    with pytest.raises(ConversionError, match=r"has shape \(32, 31\), expected \(32, 32\)"):
        convert_t5.params_from_hf({**sd, name: sd[name][:, :31]}, config)
    with pytest.raises(ConversionError, match=r"not described by config\.json"):
        convert_t5.params_from_hf(
            {
                **sd,
                "encoder.block.2.layer.0.layer_norm.weight": sd["encoder.final_layer_norm.weight"],
            },
            config,
        )
    with pytest.raises(ConversionError, match=r"lm_head\.weight differs from shared\.weight"):
        convert_t5.params_from_hf({**sd, "lm_head.weight": sd["shared.weight"] + 1}, config)
    wrong = dataclasses.replace(config, feed_forward_proj="gated-gelu", dense_act_fn=None)
    # A ReLU checkpoint read with a gated config: the ungated `wi` tensors are named.
    with pytest.raises(ConversionError, match=r"not described by .*DenseReluDense\.wi\.weight"):
        convert_t5.params_from_hf(sd, wrong)
