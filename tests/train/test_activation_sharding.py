"""Both model families trace and run under the activation sharding rules on a real
fsdp x tensor mesh, with the same logits as without constraints (the constraints only
place data)."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from gist_jax import gist
from gist_jax import sharding as shd
from gist_jax.models import llama, t5
from gist_jax.models.family import LLAMA, T5
from gist_jax.train import program
from gist_jax.train import step as tstep


def _mesh() -> jax.sharding.Mesh:
    devices = np.array(jax.devices()[:4]).reshape(1, 2, 2)
    return jax.sharding.Mesh(devices, shd.MESH_AXES)


def _run_both_ways(apply, params, dims, *inputs):
    mesh = _mesh()
    plain = jax.jit(apply)(params, *inputs)
    rules = shd.activation_rules(mesh, dims)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        constrained = jax.jit(apply)(params, *inputs)
    return np.asarray(plain), np.asarray(constrained)


def _llama_config(vocab, hidden, mlp, layers, heads, kv_heads) -> llama.LlamaConfig:
    return llama.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=8,
    )


def _t5_config(vocab, d_model, d_ff, layers, heads, variant) -> t5.T5Config:
    return t5.T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=8,
        d_ff=d_ff,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=heads,
        feed_forward_proj="relu" if variant == "v1_0" else "gated-gelu",
        tie_word_embeddings=variant == "v1_0",
    )


def test_llama_runs_under_activation_rules():
    cfg = _llama_config(vocab=64, hidden=32, mlp=64, layers=2, heads=4, kv_heads=2)
    params = LLAMA.init_params(cfg, jax.random.key(0))
    ids = np.random.default_rng(0).integers(0, 64, (2, 8)).astype(np.int32)
    pos = np.tile(np.arange(8, dtype=np.int32), (2, 1))
    no_gist = np.full((2,), -1, np.int32)
    mask = gist.decoder_self_mask(pos, pos, no_gist, no_gist)
    model = llama.build_model(cfg)

    def apply(p, i, q, m):
        return model.apply({"params": p}, i, q, m)[0]

    dims = {"vocab": 64, "embed": 32, "mlp": 64, "heads": 4, "kv_heads": 2}
    plain, constrained = _run_both_ways(apply, params, dims, ids, pos, mask)
    np.testing.assert_allclose(constrained, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["v1_0", "v1_1"])
def test_t5_runs_under_activation_rules(variant):
    cfg = _t5_config(vocab=64, d_model=32, d_ff=64, layers=2, heads=4, variant=variant)
    params = T5.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    src = rng.integers(1, 64, (2, 8)).astype(np.int32)
    tgt = rng.integers(1, 64, (2, 4)).astype(np.int32)
    src_pos = np.tile(np.arange(8, dtype=np.int32), (2, 1))
    tgt_pos = np.tile(np.arange(4, dtype=np.int32), (2, 1))
    no_gist = np.full((2,), -1, np.int32)
    enc_mask = gist.encoder_self_mask(src_pos, src_pos, no_gist, no_gist)
    dec_mask = gist.decoder_self_mask(tgt_pos, tgt_pos, no_gist, no_gist)
    x_mask = gist.cross_mask(src_pos, no_gist, no_gist)
    model = t5.build_model(cfg)

    def apply(p, *args):
        return model.apply({"params": p}, *args)[0]

    dims = {"vocab": 64, "embed": 32, "mlp": 64, "heads": 4, "kv_heads": 4}
    plain, constrained = _run_both_ways(
        apply, params, dims, src, src_pos, enc_mask, tgt, tgt_pos, dec_mask, x_mask
    )
    np.testing.assert_allclose(constrained, plain, rtol=1e-5, atol=1e-5)


# Every data x fsdp x tensor shape of the eight test devices.
MESH_SHAPES = [(d, f, 8 // (d * f)) for d in (1, 2, 4, 8) for f in (1, 2, 4, 8) if 8 % (d * f) == 0]
# Sizes chosen to divide no mesh axis (heads 3, vocab 61...), so every rule that names them
# must be dropped rather than fail.
ODD_LLAMA = _llama_config(vocab=61, hidden=24, mlp=36, layers=1, heads=3, kv_heads=1)
ODD_T5 = _t5_config(vocab=61, d_model=24, d_ff=36, layers=1, heads=3, variant="v1_1")


def _trace_train_loss(family, cfg, mesh, rules, rows):
    model = family.build(cfg)
    batch = {
        k: jax.ShapeDtypeStruct((rows, 8), np.float32 if k == "loss_mask" else np.int32)
        for k in family.batch_keys
    }
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jax.eval_shape(
            lambda p, b: tstep.loss_sums(model, family, p, b, "gist", 4),
            family.abstract_params(cfg),
            batch,
        )


@pytest.mark.parametrize("family, cfg", [(LLAMA, ODD_LLAMA), (T5, ODD_T5)], ids=["llama", "t5"])
@pytest.mark.parametrize("shape", MESH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_train_loss_traces_under_activation_rules_on_every_mesh(family, cfg, shape):
    # What the loop may train with: a micro-batch that splits over data x fsdp (the config
    # check) under the rules it derives from the model's sizes. Even the unfiltered rules,
    # which shard 3 heads over the tensor axis, trace: JAX pads uneven shardings. So no
    # model makes tracing fail under activation constraints, and the loop has no fallback
    # that retries without them.
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(shape), shd.MESH_AXES)
    rows = shape[0] * shape[1]
    for rules in (shd.activation_rules(mesh, program.model_dims(cfg)), shd.mesh_rules(mesh)):
        total, count = _trace_train_loss(family, cfg, mesh, rules, rows)
        assert total.shape == count.shape == ()
