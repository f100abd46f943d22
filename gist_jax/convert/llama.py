"""LLaMA family: Hugging Face ``LlamaForCausalLM`` (and ``Qwen2ForCausalLM``,
``MistralForCausalLM``: the same tensor names) state dict <-> gist_jax params.

Because gist_jax keeps rotary embeddings in HF's rotate-half layout, the mapping is renames,
transposes and head reshapes only (no q/k permutation). HF ``nn.Linear`` weights are
``[out, in]``; our kernels are ``[in, ...out]``, with the head axes split out for
attention. Layers are stacked along a leading axis when the config says ``scan_layers``.
Shapes are checked tensor by tensor and errors name the tensor and both shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from gist_jax.convert import common
from gist_jax.convert.common import ConversionError, take_tensor
from gist_jax.models.layers import stack_layers
from gist_jax.models.llama import ROPE_TYPES, LlamaConfig

# HF buffers that older checkpoints saved and that carry no learned weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# gist_jax architecture name -> the Hugging Face class it is.
HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",  # q/k/v biases, no o_proj bias
    "mistral": "MistralForCausalLM",  # an optional sliding window
}


def config_from_hf(hf_config: Mapping[str, Any]) -> LlamaConfig:
    """``LlamaConfig`` from an HF config.json dict (transformers 4.x or 5.x spelling);
    unsupported features are ``ConversionError``s naming the field."""
    try:
        return _config_from_hf(hf_config)
    except (KeyError, ValueError) as err:
        raise ConversionError(f"config.json: cannot build a LLaMA config: {err}") from err


def _config_from_hf(hf: Mapping[str, Any]) -> LlamaConfig:
    """Build from an HF ``config.json`` dict (transformers 4.x or 5.x spelling).

    Raises ``ValueError`` naming the field for features this model does not implement.
    """
    model_type = hf.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise ValueError(
            f"config.json has model_type {model_type!r}, expected one of {tuple(HF_ARCHITECTURES)}"
        )
    if hf.get("use_sliding_window"):
        raise ValueError(
            "use_sliding_window=true (Qwen2's per-layer sliding window) is not supported"
        )
    window = hf.get("sliding_window") if model_type == "mistral" else None
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (LLaMA uses 'silu')")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = hf.get("head_dim") or hidden // heads
    rope = _read_hf_rope(hf)
    return LlamaConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_hidden_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=model_type == "llama" and bool(hf.get("attention_bias", False)),
        qkv_bias=model_type == "qwen2",
        mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
        sliding_window=None if window is None else int(window),
        architecture=model_type,
        initializer_range=float(hf.get("initializer_range", 0.02)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        **rope,
    )


def config_to_hf(config: LlamaConfig) -> dict[str, Any]:
    """An HF ``config.json`` dict that transformers 5 reads back into the same model (a gist
    adapter's rank included; its tensors go to ``common.GIST_ADAPTER_FILE``)."""
    rope: dict[str, Any] = {"rope_type": config.rope_type, "rope_theta": config.rope_theta}
    if config.rope_type in ("linear", "llama3"):
        rope["factor"] = config.rope_factor
    if config.rope_type == "llama3":
        rope["low_freq_factor"] = config.rope_low_freq_factor
        rope["high_freq_factor"] = config.rope_high_freq_factor
        rope["original_max_position_embeddings"] = config.rope_original_max_position_embeddings
    d = config.to_dict()
    arch = config.architecture
    # What each HF class reads beyond the LLaMA fields it shares: LLaMA's bias flags,
    # Qwen2's (off) sliding window, Mistral's window.
    extra: dict[str, Any] = {
        "llama": {"attention_bias": config.attention_bias, "mlp_bias": config.mlp_bias},
        "qwen2": {
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": config.num_hidden_layers,
        },
        "mistral": {"sliding_window": config.sliding_window},
    }[arch]
    return {
        "architectures": [HF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_parameters": rope,
        # Older readers (transformers 4.x) look for these two; 5.x folds them in.
        "rope_theta": config.rope_theta,
        "rope_scaling": None if config.rope_type == "default" else dict(rope),
        "tie_word_embeddings": config.tie_word_embeddings,
        **extra,
        "attention_dropout": 0.0,
        "initializer_range": config.initializer_range,
        "bos_token_id": d["bos_token_id"],
        "eos_token_id": d["eos_token_id"],
        "pad_token_id": d["pad_token_id"],
        "use_cache": True,
        "dtype": "float32",
        **({"gist_adapter_rank": config.gist_adapter_rank} if config.gist_adapter_rank else {}),
    }


def _read_hf_rope(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Rope fields from ``rope_parameters`` (transformers 5) or ``rope_scaling`` (4.x)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if any(isinstance(v, Mapping) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported for LLaMA")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported; supported: {ROPE_TYPES}")
    if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor") or 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported for LLaMA")
    out: dict[str, Any] = {"rope_type": rope_type, "rope_theta": float(theta)}
    if rope_type in ("linear", "llama3"):
        out["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        out["rope_low_freq_factor"] = float(params["low_freq_factor"])
        out["rope_high_freq_factor"] = float(params["high_freq_factor"])
        out["rope_original_max_position_embeddings"] = int(
            params.get("original_max_position_embeddings")
            or hf.get("max_position_embeddings", 2048)
        )
    return out


def _layer_from_hf(t: Mapping[str, np.ndarray], i: int, c: LlamaConfig) -> dict[str, Any]:
    d, f, dh = c.hidden_size, c.intermediate_size, c.head_dim
    h, kvh = c.num_attention_heads, c.num_key_value_heads
    pre = f"model.layers.{i}."

    def linear(name: str, out_dim: int, in_dim: int) -> np.ndarray:
        return take_tensor(t, pre + name + ".weight", (out_dim, in_dim)).T

    def bias(name: str, size: int) -> np.ndarray:
        return take_tensor(t, pre + name + ".bias", (size,))

    attn: dict[str, Any] = {
        "q_proj": {"kernel": linear("self_attn.q_proj", h * dh, d).reshape(d, h, dh)},
        "k_proj": {"kernel": linear("self_attn.k_proj", kvh * dh, d).reshape(d, kvh, dh)},
        "v_proj": {"kernel": linear("self_attn.v_proj", kvh * dh, d).reshape(d, kvh, dh)},
        "o_proj": {"kernel": linear("self_attn.o_proj", d, h * dh).reshape(h, dh, d)},
    }
    if c.has_qkv_bias:
        attn["q_proj"]["bias"] = bias("self_attn.q_proj", h * dh).reshape(h, dh)
        attn["k_proj"]["bias"] = bias("self_attn.k_proj", kvh * dh).reshape(kvh, dh)
        attn["v_proj"]["bias"] = bias("self_attn.v_proj", kvh * dh).reshape(kvh, dh)
    if c.attention_bias:
        attn["o_proj"]["bias"] = bias("self_attn.o_proj", d)
    mlp: dict[str, Any] = {
        "gate_proj": {"kernel": linear("mlp.gate_proj", f, d)},
        "up_proj": {"kernel": linear("mlp.up_proj", f, d)},
        "down_proj": {"kernel": linear("mlp.down_proj", d, f)},
    }
    if c.mlp_bias:
        mlp["gate_proj"]["bias"] = bias("mlp.gate_proj", f)
        mlp["up_proj"]["bias"] = bias("mlp.up_proj", f)
        mlp["down_proj"]["bias"] = bias("mlp.down_proj", d)
    return {
        "input_layernorm": {"scale": take_tensor(t, pre + "input_layernorm.weight", (d,))},
        "post_attention_layernorm": {
            "scale": take_tensor(t, pre + "post_attention_layernorm.weight", (d,))
        },
        "self_attn": attn,
        "mlp": mlp,
    }


def expected_hf_names(config: LlamaConfig) -> set[str]:
    """Every tensor name an HF checkpoint of this config holds (``lm_head`` only if untied)."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config.tie_word_embeddings:
        names.add("lm_head.weight")
    for i in range(config.num_hidden_layers):
        pre = f"model.layers.{i}."
        names |= {pre + "input_layernorm.weight", pre + "post_attention_layernorm.weight"}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.add(f"{pre}self_attn.{proj}.weight")
            if config.attention_bias or (config.qkv_bias and proj != "o_proj"):
                names.add(f"{pre}self_attn.{proj}.bias")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names.add(f"{pre}mlp.{proj}.weight")
            if config.mlp_bias:
                names.add(f"{pre}mlp.{proj}.bias")
    return names


def params_from_hf(tensors: Mapping[str, np.ndarray], config: LlamaConfig) -> dict[str, Any]:
    """Params (float32, layout per ``config.scan_layers``) from an HF state dict.

    Raises ``ConversionError`` for a missing or mis-shaped tensor, or for tensors the config
    does not account for (e.g. biases in a checkpoint whose config says there are none).
    """
    c = config
    t = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    expected = expected_hf_names(c)
    # A tied checkpoint may still carry a copy of lm_head; HF ignores it, and so do we.
    extra = sorted(
        k
        for k in t
        if k not in expected
        and not k.endswith(_IGNORED_SUFFIXES)
        and not (c.tie_word_embeddings and k == "lm_head.weight")
    )
    if extra:
        raise ConversionError(
            f"{len(extra)} tensor(s) not described by config.json: {extra[:8]}"
            + (" ..." if len(extra) > 8 else "")
        )
    params: dict[str, Any] = {
        "embed_tokens": {
            "embedding": take_tensor(t, "model.embed_tokens.weight", (c.vocab_size, c.hidden_size))
        },
        "norm": {"scale": take_tensor(t, "model.norm.weight", (c.hidden_size,))},
    }
    if not c.tie_word_embeddings:
        params["lm_head"] = {
            "kernel": take_tensor(t, "lm_head.weight", (c.vocab_size, c.hidden_size)).T
        }
    for i in range(c.num_hidden_layers):
        params[f"layers_{i}"] = _layer_from_hf(t, i, c)
    params = _contiguous(params)
    if c.scan_layers:
        params = stack_layers(params, c.num_hidden_layers)
    return params


def _contiguous(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _contiguous(v) for k, v in tree.items()}
    return np.ascontiguousarray(tree, dtype=np.float32)


def params_to_hf(params: Mapping[str, Any], config: LlamaConfig) -> dict[str, np.ndarray]:
    """HF state dict (float32 numpy) from params in either layout."""
    c = config
    d, dh = c.hidden_size, c.head_dim
    h, kvh = c.num_attention_heads, c.num_key_value_heads
    out: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": np.asarray(params["embed_tokens"]["embedding"]),
        "model.norm.weight": np.asarray(params["norm"]["scale"]),
    }
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = np.asarray(params["lm_head"]["kernel"]).T
    for i in range(c.num_hidden_layers):
        layer = _index_tree(params["layers"], i) if c.scan_layers else params[f"layers_{i}"]
        pre = f"model.layers.{i}."
        attn, mlp = layer["self_attn"], layer["mlp"]
        out[pre + "input_layernorm.weight"] = np.asarray(layer["input_layernorm"]["scale"])
        out[pre + "post_attention_layernorm.weight"] = np.asarray(
            layer["post_attention_layernorm"]["scale"]
        )
        out[pre + "self_attn.q_proj.weight"] = np.asarray(attn["q_proj"]["kernel"]).reshape(d, -1).T
        out[pre + "self_attn.k_proj.weight"] = np.asarray(attn["k_proj"]["kernel"]).reshape(d, -1).T
        out[pre + "self_attn.v_proj.weight"] = np.asarray(attn["v_proj"]["kernel"]).reshape(d, -1).T
        out[pre + "self_attn.o_proj.weight"] = (
            np.asarray(attn["o_proj"]["kernel"]).reshape(h * dh, d).T
        )
        if c.has_qkv_bias:
            out[pre + "self_attn.q_proj.bias"] = np.asarray(attn["q_proj"]["bias"]).reshape(h * dh)
            out[pre + "self_attn.k_proj.bias"] = np.asarray(attn["k_proj"]["bias"]).reshape(
                kvh * dh
            )
            out[pre + "self_attn.v_proj.bias"] = np.asarray(attn["v_proj"]["bias"]).reshape(
                kvh * dh
            )
        if c.attention_bias:
            out[pre + "self_attn.o_proj.bias"] = np.asarray(attn["o_proj"]["bias"])
        for proj in ("gate_proj", "up_proj", "down_proj"):
            out[f"{pre}mlp.{proj}.weight"] = np.asarray(mlp[proj]["kernel"]).T
            if c.mlp_bias:
                out[f"{pre}mlp.{proj}.bias"] = np.asarray(mlp[proj]["bias"])
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def adapter_to_hf(params: Mapping[str, Any], config: LlamaConfig) -> dict[str, np.ndarray]:
    """The gist adapter's tensors for ``common.GIST_ADAPTER_FILE``: ``layers.{i}.down``
    ``[D, R]`` and ``layers.{i}.up`` ``[R, D]`` (empty for a model without one)."""
    out: dict[str, np.ndarray] = {}
    for i in range(config.num_hidden_layers if config.gist_adapter_rank else 0):
        layer = _index_tree(params["layers"], i) if config.scan_layers else params[f"layers_{i}"]
        for name, value in layer["gist_adapter"].items():
            out[f"layers.{i}.{name}"] = np.ascontiguousarray(value, dtype=np.float32)
    return out


def add_adapter_from_hf(
    params: dict[str, Any], config: LlamaConfig, tensors: Mapping[str, np.ndarray], rank: int
) -> tuple[dict[str, Any], LlamaConfig]:
    """``params`` and ``config`` with the rank-``rank`` gist adapter of ``tensors``
    (``adapter_to_hf``'s names); ``ConversionError`` naming a missing or mis-shaped one."""
    d = config.hidden_size
    shapes = {"down": (d, rank), "up": (rank, d)}
    layers = [
        {n: take_tensor(tensors, f"layers.{i}.{n}", shape) for n, shape in shapes.items()}
        for i in range(config.num_hidden_layers)
    ]
    params = dict(params)
    if config.scan_layers:
        stacked = {n: np.stack([layer[n] for layer in layers]) for n in shapes}
        params["layers"] = {**params["layers"], "gist_adapter": stacked}
    else:
        for i, layer in enumerate(layers):
            params[f"layers_{i}"] = {**params[f"layers_{i}"], "gist_adapter": layer}
    return params, dataclasses.replace(config, gist_adapter_rank=rank)


def _index_tree(tree: Any, i: int) -> Any:
    if isinstance(tree, Mapping):
        return {k: _index_tree(v, i) for k, v in tree.items()}
    return np.asarray(tree)[i]


def add_gist_rows(
    params: Mapping[str, Any], config: LlamaConfig, token_id: int | None = None
) -> tuple[dict[str, Any], LlamaConfig]:
    """Give ``<GIST>`` a mean-initialised row in ``embed_tokens`` (and in ``lm_head`` when untied);
    see ``common.add_gist_rows``."""
    return common.add_gist_rows(params, config, "embed_tokens", token_id)
