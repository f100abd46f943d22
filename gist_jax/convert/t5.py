"""T5 family: Hugging Face ``T5ForConditionalGeneration`` state dict <-> gist_jax params.

Renames, transposes and head reshapes only. HF ``nn.Linear`` weights are ``[out, in]``;
our kernels are ``[in, ...out]`` with the head axes split out for attention. HF stores the
relative position bias in block 0 of each stack
(``{encoder,decoder}.block.0.layer.0.SelfAttention.relative_attention_bias.weight``); we
keep it once per stack at ``{encoder,decoder}/relpos_bias`` so layers can be scanned.
Layers are stacked along a leading axis when the config says ``scan_layers``.

Output layer: v1.0 checkpoints tie ``lm_head`` to ``shared`` (and scale the decoder output);
v1.1 / FLAN-T5 checkpoints have their own ``lm_head.weight``. transformers 5 always ties
T5's ``lm_head`` when it is built, so a checkpoint it saved from an unscaled model may lack
``lm_head.weight``; the output layer is then the shared embedding, which is what we copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gist_jax.convert import common
from gist_jax.convert.common import ConversionError, take_tensor
from gist_jax.models.t5 import T5Config, activation_of, stack_layers

# Tensors some HF T5 checkpoints carry that hold nothing we need: tied copies of the
# shared embedding (checked equal below) and a cross-attention bias HF itself ignores.
_EMBED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def config_from_hf(hf_config: Mapping[str, Any]) -> T5Config:
    """``T5Config`` from an HF config.json dict; unsupported features are errors."""
    try:
        return _config_from_hf(hf_config)
    except (KeyError, ValueError, TypeError) as err:
        raise ConversionError(f"config.json: cannot build a T5 config: {err}") from err


def _config_from_hf(hf: Mapping[str, Any]) -> T5Config:
    """Build from an HF ``config.json`` dict (transformers 4.x or 5.x).

    transformers 5 always reports ``tie_word_embeddings: true`` for T5 and keeps the
    v1.0/v1.1 distinction in ``scale_decoder_outputs``; 4.x only has
    ``tie_word_embeddings``. Either way, output scaling goes with the tied embedding.
    """
    model_type = hf.get("model_type")
    if model_type != T5Config.model_type:
        raise ValueError(
            f"config.json has model_type {model_type!r}, expected {T5Config.model_type!r}"
        )
    tie = hf.get("tie_word_embeddings", True) is not False
    scale = bool(hf.get("scale_decoder_outputs", tie))
    if scale and not tie:
        raise ValueError(
            "scale_decoder_outputs=true with tie_word_embeddings=false (a separate "
            "lm_head with v1.0 output scaling) is not a T5 variant this model implements"
        )
    num_layers = int(hf["num_layers"])
    start = hf.get("decoder_start_token_id")
    pad = hf.get("pad_token_id")
    return T5Config(
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["d_model"]),
        d_kv=int(hf["d_kv"]),
        d_ff=int(hf["d_ff"]),
        num_layers=num_layers,
        num_decoder_layers=int(hf.get("num_decoder_layers") or num_layers),
        num_heads=int(hf["num_heads"]),
        relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
        feed_forward_proj=str(hf.get("feed_forward_proj", "relu")),
        dense_act_fn=hf.get("dense_act_fn"),
        tie_word_embeddings=scale,
        initializer_factor=float(hf.get("initializer_factor", 1.0)),
        pad_token_id=0 if pad is None else int(pad),
        eos_token_id=int(hf.get("eos_token_id", 1)),
        decoder_start_token_id=int(start if start is not None else (pad or 0)),
    )


def config_to_hf(config: T5Config) -> dict[str, Any]:
    """An HF ``config.json`` dict that transformers (4.x and 5.x) reads back into the
    same model (``tie_word_embeddings: false`` makes 5.x turn output scaling off)."""
    is_gated, _ = activation_of(config.feed_forward_proj)
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "d_kv": config.d_kv,
        "d_ff": config.d_ff,
        "num_layers": config.num_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "num_heads": config.num_heads,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "dropout_rate": 0.1,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_factor": config.initializer_factor,
        "feed_forward_proj": config.feed_forward_proj,
        "dense_act_fn": config.dense_act_fn,
        "is_gated_act": is_gated,
        "tie_word_embeddings": config.tie_word_embeddings,
        "is_encoder_decoder": True,
        "use_cache": True,
        "pad_token_id": config.pad_token_id,
        "eos_token_id": config.eos_token_id,
        "decoder_start_token_id": config.decoder_start_token_id,
        "torch_dtype": "float32",
    }


def _ff_names(config: T5Config) -> tuple[str, ...]:
    return ("wi_0", "wi_1", "wo") if config.is_gated_act else ("wi", "wo")


def _hf_layer_parts(is_decoder: bool) -> dict[str, int]:
    """Our sub-layer names -> HF ``layer.{n}`` index inside a block."""
    if is_decoder:
        return {"self_attn": 0, "cross_attn": 1, "ff": 2}
    return {"self_attn": 0, "ff": 1}


_HF_ATTN = {"self_attn": "SelfAttention", "cross_attn": "EncDecAttention"}


def expected_hf_names(config: T5Config) -> set[str]:
    """Every tensor an HF checkpoint of this config holds (``lm_head`` only if untied)."""
    names = {"shared.weight", "encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"}
    if not config.tie_word_embeddings:
        names.add("lm_head.weight")
    for stack, n, is_decoder in (
        ("encoder", config.num_layers, False),
        ("decoder", config.num_decoder_layers, True),
    ):
        names.add(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        for i in range(n):
            for part, j in _hf_layer_parts(is_decoder).items():
                pre = f"{stack}.block.{i}.layer.{j}."
                names.add(pre + "layer_norm.weight")
                if part == "ff":
                    names |= {f"{pre}DenseReluDense.{w}.weight" for w in _ff_names(config)}
                else:
                    names |= {f"{pre}{_HF_ATTN[part]}.{p}.weight" for p in "qkvo"}
    return names


def _layer_from_hf(
    t: Mapping[str, np.ndarray], stack: str, i: int, c: T5Config, is_decoder: bool
) -> dict[str, Any]:
    d, h, dk, f = c.d_model, c.num_heads, c.d_kv, c.d_ff
    layer: dict[str, Any] = {}
    for part, j in _hf_layer_parts(is_decoder).items():
        pre = f"{stack}.block.{i}.layer.{j}."
        layer[f"{part}_norm"] = {"scale": take_tensor(t, pre + "layer_norm.weight", (d,))}
        if part == "ff":
            ff = {}
            for w in _ff_names(c):
                shape = (d, f) if w == "wo" else (f, d)
                ff[w] = {"kernel": take_tensor(t, f"{pre}DenseReluDense.{w}.weight", shape).T}
            layer["ff"] = ff
        else:
            a = f"{pre}{_HF_ATTN[part]}."
            layer[part] = {
                p: {"kernel": take_tensor(t, f"{a}{p}.weight", (h * dk, d)).T.reshape(d, h, dk)}
                for p in "qkv"
            }
            layer[part]["o"] = {
                "kernel": take_tensor(t, f"{a}o.weight", (d, h * dk)).T.reshape(h, dk, d)
            }
    return layer


def _check_extras(t: Mapping[str, np.ndarray], c: T5Config) -> None:
    expected = expected_hf_names(c)
    extra = sorted(
        k for k in t if k not in expected and k not in _IGNORED and k not in _EMBED_COPIES
    )
    if c.tie_word_embeddings and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")
    if extra:
        raise ConversionError(
            f"{len(extra)} tensor(s) not described by config.json: {extra[:8]}"
            + (" ..." if len(extra) > 8 else "")
        )
    shared = t.get("shared.weight")
    copies = _EMBED_COPIES + (("lm_head.weight",) if c.tie_word_embeddings else ())
    for name in copies:
        if name in t and shared is not None and not np.array_equal(t[name], shared):
            raise ConversionError(
                f"{name} differs from shared.weight, but config.json describes a tied "
                "T5 (v1.0: lm_head = shared embedding with output scaling)"
            )


def params_from_hf(tensors: Mapping[str, np.ndarray], config: T5Config) -> dict[str, Any]:
    """Params (float32, layout per ``config.scan_layers``) from an HF T5 state dict.

    Raises ``ConversionError`` naming the tensor for a missing or mis-shaped tensor, a
    tensor the config does not account for, or a "tied" copy that differs from ``shared``.
    """
    c = config
    t = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    _check_extras(t, c)
    v, d, nb, h = c.vocab_size, c.d_model, c.relative_attention_num_buckets, c.num_heads
    params: dict[str, Any] = {"shared": {"embedding": take_tensor(t, "shared.weight", (v, d))}}
    for stack, n, is_decoder in (
        ("encoder", c.num_layers, False),
        ("decoder", c.num_decoder_layers, True),
    ):
        bias_name = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        sub: dict[str, Any] = {
            "relpos_bias": {"embedding": take_tensor(t, bias_name, (nb, h))},
            "final_norm": {"scale": take_tensor(t, f"{stack}.final_layer_norm.weight", (d,))},
        }
        for i in range(n):
            sub[f"layers_{i}"] = _layer_from_hf(t, stack, i, c, is_decoder)
        params[stack] = sub
    if not c.tie_word_embeddings:
        # See the module docstring: transformers 5 may have saved the output layer as shared.
        name = "lm_head.weight" if "lm_head.weight" in t else "shared.weight"
        params["lm_head"] = {"kernel": take_tensor(t, name, (v, d)).T}
    params = _contiguous(params)
    if c.scan_layers:
        params = stack_layers(params, c)
    return params


def _contiguous(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _contiguous(v) for k, v in tree.items()}
    return np.ascontiguousarray(tree, dtype=np.float32)


def _index_tree(tree: Any, i: int) -> Any:
    if isinstance(tree, Mapping):
        return {k: _index_tree(v, i) for k, v in tree.items()}
    return np.asarray(tree)[i]


def params_to_hf(params: Mapping[str, Any], config: T5Config) -> dict[str, np.ndarray]:
    """HF state dict (float32 numpy) from params in either layout."""
    c = config
    d, h, dk = c.d_model, c.num_heads, c.d_kv
    out: dict[str, np.ndarray] = {"shared.weight": np.asarray(params["shared"]["embedding"])}
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = np.asarray(params["lm_head"]["kernel"]).T
    for stack, n, is_decoder in (
        ("encoder", c.num_layers, False),
        ("decoder", c.num_decoder_layers, True),
    ):
        sub = params[stack]
        out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = np.asarray(
            sub["relpos_bias"]["embedding"]
        )
        out[f"{stack}.final_layer_norm.weight"] = np.asarray(sub["final_norm"]["scale"])
        for i in range(n):
            layer = _index_tree(sub["layers"], i) if c.scan_layers else sub[f"layers_{i}"]
            for part, j in _hf_layer_parts(is_decoder).items():
                pre = f"{stack}.block.{i}.layer.{j}."
                out[pre + "layer_norm.weight"] = np.asarray(layer[f"{part}_norm"]["scale"])
                if part == "ff":
                    for w in _ff_names(c):
                        kernel = np.asarray(layer["ff"][w]["kernel"])
                        out[f"{pre}DenseReluDense.{w}.weight"] = kernel.T
                else:
                    a = f"{pre}{_HF_ATTN[part]}."
                    attn = layer[part]
                    for p in "qkv":
                        out[f"{a}{p}.weight"] = np.asarray(attn[p]["kernel"]).reshape(d, h * dk).T
                    out[f"{a}o.weight"] = np.asarray(attn["o"]["kernel"]).reshape(h * dk, d).T
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def add_gist_rows(
    params: Mapping[str, Any], config: T5Config, token_id: int | None = None
) -> tuple[dict[str, Any], T5Config]:
    """Give ``<GIST>`` a mean-initialised row in ``shared`` (and in ``lm_head`` when untied);
    see ``common.add_gist_rows``."""
    return common.add_gist_rows(params, config, "shared", token_id)
