"""The Flax T5 against transformers' PyTorch T5 (v1.0 and v1.1 / FLAN style), under
padding and under the gist / pos_control / neg_control masks; cached decoding against the
teacher-forced pass; gist compression against the uncompressed gist-masked pass for every
example of a ragged batch; scan_layers and remat against the unrolled stack."""

from __future__ import annotations

import dataclasses
import functools

import fixtures_t5 as fx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gist_jax import gist
from gist_jax.convert import t5 as convert_t5
from gist_jax.models import t5, t5_layers
from gist_jax.models.family import T5, config_from_dict, family_named

# (prompt_len, gist tokens, input_len) per example: different prompt lengths, gist
# positions and amounts of padding; the last example has no gist token at all.
MASK_SPECS = [(4, 2, 5), (1, 2, 2), (9, 2, 3), (6, 0, 4)]
TARGET_LENGTHS = [6, 3, 7, 5]
SRC_LEN = 16  # every source batch is padded to this, so tests share compiled functions


@functools.cache
def reference(variant: str) -> tuple[object, t5.T5Config, dict]:
    """(HF model, our config, our params) for a variant, built once per session."""
    model = fx.hf_model(variant)
    config = convert_t5.config_from_hf(model.config.to_dict())
    params = convert_t5.params_from_hf(fx.state_dict(model), config)
    return model, config, jax.tree.map(jnp.asarray, params)


jitted = fx.jitted


def _no_span(batch: int) -> np.ndarray:
    return np.full(batch, gist.NO_GIST, np.int32)


def full_logits(config, params, src, tgt, condition: str = "gist") -> np.ndarray:
    pos, first, last = src["positions"], src["first"], src["last"]
    dpos = tgt["positions"]
    none = _no_span(len(pos))
    logits, cache = jitted(config, "__call__")(
        params,
        src["ids"],
        pos,
        gist.encoder_self_mask(pos, pos, first, last, condition),
        tgt["ids"],
        dpos,
        gist.decoder_self_mask(dpos, dpos, none, none),
        gist.cross_mask(pos, first, last, condition),
    )
    assert cache is None
    return np.asarray(logits)


def test_relative_position_bucket_matches_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-700, 701)
    for buckets, max_distance in [(32, 128), (8, 12), (16, 64), (10, 100)]:
        for bidirectional in (True, False):
            want = T5Attention._relative_position_bucket(
                __import__("torch").tensor(rel),
                bidirectional=bidirectional,
                num_buckets=buckets,
                max_distance=max_distance,
            ).numpy()
            got = np.asarray(
                t5_layers.relative_position_bucket(
                    jnp.asarray(rel), bidirectional, buckets, max_distance
                )
            )
            np.testing.assert_array_equal(got, want, err_msg=f"{buckets=} {max_distance=}")


@pytest.mark.parametrize("variant", fx.VARIANTS)
def test_logits_match_transformers_on_padded_batch(variant):
    import torch

    hf, config, params = reference(variant)
    assert config.tie_word_embeddings == (variant == "v1_0")
    assert config.dense_act_fn == ("relu" if variant == "v1_0" else "gelu_new")
    # No gist tokens anywhere: plain padded encoder-decoder attention.
    src = fx.source_batch([(s[0], 0, s[2]) for s in MASK_SPECS], length=SRC_LEN)
    tgt = fx.target_batch(TARGET_LENGTHS)
    with torch.no_grad():
        want = hf(
            input_ids=torch.as_tensor(src["ids"]).long(),
            attention_mask=torch.as_tensor(src["positions"] >= 0).long(),
            decoder_input_ids=torch.as_tensor(tgt["ids"]).long(),
            decoder_attention_mask=torch.as_tensor(tgt["valid"]).long(),
        ).logits.numpy()
    got = full_logits(config, params, src, tgt)
    valid = tgt["valid"]
    diff = np.abs(got - want)[valid].max()
    assert diff < 1e-4, diff
    # The comparison is meaningful: logits are large and differ across positions.
    assert np.abs(want[valid]).max() > 1.0


@pytest.mark.parametrize("variant", fx.VARIANTS)
@pytest.mark.parametrize("condition", gist.CONDITIONS)
def test_logits_match_transformers_under_gist_masks(variant, condition):
    hf, config, params = reference(variant)
    src = fx.source_batch(MASK_SPECS, length=SRC_LEN)
    tgt = fx.target_batch(TARGET_LENGTHS)
    # The reference gets dense masks built from token ids; our model gets the span form.
    enc_mask = np.asarray(gist.make_gist_mask(src["ids"], fx.GIST_ID, fx.PAD_ID, condition))
    cross = np.asarray(
        gist.make_cross_attention_mask(src["ids"], fx.GIST_ID, fx.PAD_ID, condition)
    )[:, 0, 0]
    want = fx.hf_logits(hf, src["ids"], enc_mask, cross, tgt["ids"], tgt["valid"])
    got = full_logits(config, params, src, tgt, condition)
    valid = tgt["valid"]
    diff = np.abs(got - want)[valid].max()
    assert diff < 1e-4, diff


def test_gist_conditions_differ():
    """The masks reach the model: gist, pos_control and neg_control give different logits
    for examples with gist tokens, identical ones for the example without."""
    _, config, params = reference("v1_1")
    src = fx.source_batch(MASK_SPECS, length=SRC_LEN)
    tgt = fx.target_batch(TARGET_LENGTHS)
    out = {c: full_logits(config, params, src, tgt, c) for c in gist.CONDITIONS}
    valid = tgt["valid"]
    for b in range(3):
        v = valid[b]
        assert np.abs(out["gist"][b][v] - out["pos_control"][b][v]).max() > 1e-2
        assert np.abs(out["gist"][b][v] - out["neg_control"][b][v]).max() > 1e-2
    v = valid[3]
    np.testing.assert_allclose(out["gist"][3][v], out["pos_control"][3][v], atol=1e-5)
    np.testing.assert_allclose(out["gist"][3][v], out["neg_control"][3][v], atol=1e-5)


def test_packed_rows_match_separate_examples():
    """Two examples packed into one row (positions restart, segment ids, per-token gist
    spans, per-query cross mask) give the logits each gets on its own row."""
    _, config, params = reference("v1_0")
    src = fx.source_batch(MASK_SPECS, length=SRC_LEN)
    tgt = fx.target_batch(TARGET_LENGTHS)
    want = full_logits(config, params, src, tgt)
    parts = (0, 1)
    n_src = [int(src["lengths"][b]) for b in parts]
    n_tgt = [TARGET_LENGTHS[b] for b in parts]

    def pack(rows, lengths, total, fill):
        return np.concatenate(
            [r[:n] for r, n in zip(rows, lengths, strict=True)]
            + [np.full(total - sum(lengths), fill)]
        )[None].astype(np.int32)

    ls, lt = 20, 10
    ids = pack([src["ids"][b] for b in parts], n_src, ls, fx.PAD_ID)
    pos = pack([src["positions"][b] for b in parts], n_src, ls, -1)
    seg = pack([np.full(n, i + 1) for i, n in enumerate(n_src)], n_src, ls, 0)
    first = pack(
        [np.full(n, src["first"][b]) for b, n in zip(parts, n_src, strict=True)], n_src, ls, -1
    )
    last = pack(
        [np.full(n, src["last"][b]) for b, n in zip(parts, n_src, strict=True)], n_src, ls, -1
    )
    dids = pack([tgt["ids"][b] for b in parts], n_tgt, lt, fx.PAD_ID)
    dpos = pack([tgt["positions"][b] for b in parts], n_tgt, lt, -1)
    dseg = pack([np.full(n, i + 1) for i, n in enumerate(n_tgt)], n_tgt, lt, 0)
    # Each decoder token carries the gist span of its own example's source.
    dfirst = pack(
        [np.full(n, src["first"][b]) for b, n in zip(parts, n_tgt, strict=True)], n_tgt, lt, -1
    )
    dlast = pack(
        [np.full(n, src["last"][b]) for b, n in zip(parts, n_tgt, strict=True)], n_tgt, lt, -1
    )
    none = np.full_like(dpos, -1)
    cross = gist.cross_mask(pos, dfirst, dlast, "gist", dseg, seg)
    assert cross.shape == (1, 1, lt, ls)
    got, _ = jitted(config, "__call__")(
        params,
        ids,
        pos,
        gist.encoder_self_mask(pos, pos, first, last, "gist", seg, seg),
        dids,
        dpos,
        gist.decoder_self_mask(dpos, dpos, none, none, "gist", dseg, dseg),
        cross,
    )
    got = np.asarray(got)[0]
    offset = 0
    for b, n in zip(parts, n_tgt, strict=True):
        diff = fx.relative_diff(got[offset : offset + n], want[b, :n], np.s_[:])
        assert diff < 1e-5, (b, diff)
        offset += n


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cached_decoding_matches_teacher_forcing(scan_layers):
    _, config, params = reference("v1_1")
    if scan_layers:
        params = t5.relayout_params(params, config, True)
        config = dataclasses.replace(config, scan_layers=True)
    src = fx.source_batch(MASK_SPECS, length=SRC_LEN)
    tgt = fx.target_batch(TARGET_LENGTHS)
    want = full_logits(config, params, src, tgt)

    pos, first, last = src["positions"], src["first"], src["last"]
    enc = jitted(config, "encode")(
        params, src["ids"], pos, gist.encoder_self_mask(pos, pos, first, last)
    )
    cross = gist.cross_mask(pos, first, last)
    total = tgt["ids"].shape[1]
    cache = jitted(config, "init_cache", max_length=total + 3)(params, enc)
    assert cache.self_kv.k.shape == (config.num_decoder_layers, 4, 4, 8, total + 3)
    none = _no_span(4)
    step = jitted(config, "decode")
    got = []
    # A 3-token prefill, then one token at a time; padding tokens are written as empty slots.
    for start, stop in [(0, 3)] + [(t, t + 1) for t in range(3, total)]:
        q_pos = jnp.asarray(tgt["positions"][:, start:stop])
        k_pos = cache.self_kv.positions_after_append(q_pos)
        mask = gist.decoder_self_mask(q_pos, k_pos, none, none)
        logits, cache = step(params, tgt["ids"][:, start:stop], q_pos, mask, None, cross, cache)
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    assert int(cache.self_kv.end) == total
    valid = tgt["valid"]
    diff = fx.relative_diff(got, want, valid)
    assert diff < 1e-5, diff


def _split_source(src: dict, num_gist: int) -> tuple[dict, dict]:
    """The prompt part (everything up to the last gist token) and the post-gist part
    (left-aligned, keeping its absolute positions) of every example."""
    ids, last, lengths = src["ids"], src["last"], src["lengths"]
    b = len(ids)
    p_len = int(last.max()) + 1
    prompt_ids = np.full((b, p_len), fx.PAD_ID, np.int32)
    prompt_pos = np.full((b, p_len), -1, np.int32)
    post_len = int((lengths - last - 1).max())
    post_ids = np.full((b, post_len), fx.PAD_ID, np.int32)
    post_pos = np.full((b, post_len), -1, np.int32)
    for i in range(b):
        n = last[i] + 1
        prompt_ids[i, :n] = ids[i, :n]
        prompt_pos[i, :n] = np.arange(n)
        m = lengths[i] - n
        post_ids[i, :m] = ids[i, n : lengths[i]]
        post_pos[i, :m] = np.arange(n, lengths[i])
    return {"ids": prompt_ids, "positions": prompt_pos}, {"ids": post_ids, "positions": post_pos}


@pytest.mark.parametrize(("variant", "scan_layers"), [("v1_0", False), ("v1_1", True)])
def test_gist_compression_is_exact(variant, scan_layers):
    _, config, params = reference(variant)
    if scan_layers:
        params = t5.relayout_params(params, config, True)
        config = dataclasses.replace(config, scan_layers=True)
    # Different prompt lengths, gist positions, input lengths and padding; the last example
    # has a single gist token, so its second slot in the k=2 cache stays empty.
    specs = [(5, 2, 4), (1, 2, 7), (10, 2, 1), (3, 1, 3)]
    src = fx.source_batch(specs, length=SRC_LEN)
    tgt = fx.target_batch(TARGET_LENGTHS)
    first, last = src["first"], src["last"]
    want = full_logits(config, params, src, tgt, "gist")
    pos = src["positions"]
    full_enc = np.asarray(
        jitted(config, "encode")(
            params, src["ids"], pos, gist.encoder_self_mask(pos, pos, first, last)
        )
    )

    prompt, post = _split_source(src, fx.NUM_GIST)
    ppos = prompt["positions"]
    cache = jitted(config, "compress", num_gist=fx.NUM_GIST)(
        params, prompt["ids"], ppos, gist.encoder_self_mask(ppos, ppos, first, last), first, last
    )
    assert cache.kv.k.shape == (config.num_layers, 4, 4, 8, fx.NUM_GIST)
    np.testing.assert_array_equal(np.asarray(cache.positions), [[5, 6], [1, 2], [10, 11], [3, -1]])
    for b in range(4):
        for j, p in enumerate(np.asarray(cache.positions)[b]):
            if p >= 0:
                np.testing.assert_allclose(cache.hidden[b, j], full_enc[b, p], atol=1e-5)

    qpos = post["positions"]
    kpos = jnp.concatenate([cache.kv.pos, jnp.asarray(qpos)], axis=1)
    post_enc = jitted(config, "encode")(
        params,
        post["ids"],
        qpos,
        gist.encoder_self_mask(qpos, kpos, first, last),
        cache.kv,
    )
    for b in range(4):
        n = int((qpos[b] >= 0).sum())
        np.testing.assert_allclose(
            post_enc[b, :n], full_enc[b, last[b] + 1 : last[b] + 1 + n], atol=1e-5
        )

    enc = jnp.concatenate([cache.hidden, post_enc], axis=1)
    dpos = tgt["positions"]
    none = _no_span(4)
    got, _ = jitted(config, "decode")(
        params,
        tgt["ids"],
        dpos,
        gist.decoder_self_mask(dpos, dpos, none, none),
        enc,
        gist.cross_mask(kpos, first, last, "gist"),
    )
    got = np.asarray(got)
    valid = tgt["valid"]
    for b in range(4):
        v = valid[b]
        diff = fx.relative_diff(got[b], want[b], v)
        assert diff < 1e-5, (b, diff)
        np.testing.assert_array_equal(got[b][v].argmax(-1), want[b][v].argmax(-1))


def _loss(config, params, src, tgt, targets):
    logits, _ = t5.build_model(config).apply(
        {"params": params},
        src["ids"],
        src["positions"],
        gist.encoder_self_mask(src["positions"], src["positions"], src["first"], src["last"]),
        tgt["ids"],
        tgt["positions"],
        gist.decoder_self_mask(tgt["positions"], tgt["positions"], _no_span(4), _no_span(4)),
        gist.cross_mask(src["positions"], src["first"], src["last"]),
    )
    logp = jax.nn.log_softmax(logits)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return -(picked * tgt["valid"]).sum(), logits


# Between them: scanned and unrolled stacks, both remat policies (remat only changes the
# backward pass, hence the gradient comparison).
def _value_and_grad(config, params):
    src = fx.source_batch(MASK_SPECS, length=SRC_LEN)
    tgt = fx.target_batch(TARGET_LENGTHS)
    targets = np.roll(tgt["ids"], -1, axis=1)
    fn = jax.value_and_grad(lambda p: _loss(config, p, src, tgt, targets), has_aux=True)
    return jax.jit(fn)(params)


@functools.cache
def _unrolled_value_and_grad():
    _, base, params = reference("v1_1")
    return _value_and_grad(base, params)


@pytest.mark.parametrize(("scan_layers", "remat"), [(True, "dots"), (False, "full")])
def test_scan_and_remat_match_unrolled(scan_layers, remat):
    _, base, params = reference("v1_1")
    config = dataclasses.replace(base, scan_layers=scan_layers, remat=remat)
    (loss0, logits0), grads0 = _unrolled_value_and_grad()
    other = t5.relayout_params(params, base, scan_layers)
    (loss1, logits1), grads1 = _value_and_grad(config, other)
    np.testing.assert_allclose(logits1, logits0, atol=1e-5)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    grads1 = t5.relayout_params(grads1, config, False)
    flat0 = dict(jax.tree_util.tree_flatten_with_path(grads0)[0])
    for path, g1 in jax.tree_util.tree_flatten_with_path(grads1)[0]:
        g0 = flat0[path]
        scale = float(jnp.abs(g0).max()) + 1e-6
        assert float(jnp.abs(g1 - g0).max()) < 1e-5 * scale + 1e-6, jax.tree_util.keystr(path)


def test_param_tree_and_logical_axes():
    allowed = {"vocab", "embed", "mlp", "heads", "head_dim", "layers", "norm", "relpos_buckets"}
    for variant, scan in [("v1_0", False), ("v1_1", True)]:
        _, base, params = reference(variant)
        config = dataclasses.replace(base, scan_layers=scan)
        axes = T5.param_axes(config)
        shapes = T5.abstract_params(config)
        assert jax.tree.structure(shapes) == jax.tree.structure(
            t5.relayout_params(params, base, scan)
        )
        assert ("lm_head" in shapes) == (variant == "v1_1")
        flat_axes = dict(
            jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0]
        )
        for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
            names = flat_axes[path]
            key = jax.tree_util.keystr(path)
            assert len(names) == leaf.ndim, key
            assert set(names) <= allowed, key
            in_layers = "'layers'" in key
            assert (names[0] == "layers") == (scan and in_layers), key
        for stack in ("encoder", "decoder"):
            assert axes[stack]["relpos_bias"]["embedding"] == ("relpos_buckets", "heads")
            assert shapes[stack]["relpos_bias"]["embedding"].shape == (8, 4)


def test_family_and_config_round_trip():
    _, config, _ = reference("v1_1")
    assert family_named("t5").module is t5
    assert family_named("t5").conversion is convert_t5
    d = config.to_dict()
    assert d["model_type"] == "t5"
    assert config_from_dict(d) == config
    with pytest.raises(ValueError, match="unknown T5Config field"):
        t5.T5Config.from_dict({**d, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="feed_forward_proj"):
        dataclasses.replace(config, feed_forward_proj="gelu-gated")
    with pytest.raises(ValueError, match="activation"):
        dataclasses.replace(config, feed_forward_proj="gated-tanh", dense_act_fn=None)


def test_bfloat16_compute_is_close():
    _, config, params = reference("v1_1")
    src = fx.source_batch(MASK_SPECS, length=SRC_LEN)
    tgt = fx.target_batch(TARGET_LENGTHS)
    want = full_logits(config, params, src, tgt)
    got = full_logits(dataclasses.replace(config, dtype="bfloat16"), params, src, tgt)
    assert got.dtype == np.float32
    valid = tgt["valid"]
    err = np.abs(got - want)[valid].max() / np.abs(want[valid]).max()
    assert err < 0.1, err
