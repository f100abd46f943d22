"""Reading llama.cpp GGUF files into Hugging Face form without torch: the metadata, an HF
``config.json`` dict, float32 tensors under HF names, and an HF fast tokenizer.

Tensors are read with ``gguf.GGUFReader`` and dequantised with ``gguf.quants.dequantize``
(numpy). llama.cpp's converter permutes the rows of ``q_proj`` / ``k_proj`` (and their
biases) from HF's rotate-half rotary layout into its interleaved layout; ``unpermute_rotary``
inverts that, which is the step a silent conversion bug would hide in. The tokenizer is
rebuilt from the file's vocabulary and merges with the ``tokenizers`` library
(transformers' own GGUF tokenizer path needs torch).

Only the LLaMA architecture with a byte-level BPE ("gpt2") tokenizer is supported, which
covers the bundled SmolLM2 model; anything else is a ``ConversionError`` naming it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from gist_jax.convert.common import ConversionError

# llama.cpp token types (gguf.TokenType): control tokens are special, user-defined ones are
# added tokens matched whole.
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# Pre-tokenizer families by ``tokenizer.ggml.pre``: llama.cpp splits these with "\p{N}"
# (every digit alone) before the GPT-2 regex, which is what HF's Digits(individual_digits)
# + ByteLevel(use_regex) do.
_PRE_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell")
_PRE_GPT2 = ("gpt2", "default", "gpt-2")

# Large arrays we never need as Python lists when reading metadata.
_BULK_FIELDS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")

_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def open_gguf(path: str | os.PathLike) -> Any:
    """A ``gguf.GGUFReader`` (memory-mapped; tensors are read on access)."""
    import gguf

    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as err:  # gguf raises ValueError/struct.error for corrupt files
        raise ConversionError(f"{path}: cannot read GGUF file ({err})") from err


def read_metadata(reader: Any, bulk: bool = False) -> dict[str, Any]:
    """Metadata key -> value (ints, floats, strings, lists). The tokenizer's large arrays
    are included only with ``bulk=True``."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or (not bulk and key in _BULK_FIELDS):
            continue
        out[key] = field.contents()
    return out


def _require(meta: dict[str, Any], key: str) -> Any:
    if key not in meta:
        raise ConversionError(f"GGUF metadata has no {key!r}")
    return meta[key]


def _f32_value(value: Any) -> float:
    """GGUF stores float32; give the shortest decimal that rounds to it (1e-05, not
    9.999999747378752e-06), which is what the original config.json said."""
    return float(str(np.float32(value)))


def llama_hf_config(meta: dict[str, Any], tensor_names: Iterable[str]) -> dict[str, Any]:
    """The HF ``config.json`` dict of a LLaMA-architecture GGUF file."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConversionError(f"GGUF architecture {arch!r} is not supported; supported: 'llama'")
    names = set(tensor_names)
    if "rope_freqs.weight" in names:
        raise ConversionError(
            "GGUF file has rope_freqs.weight (llama3-style rope scaling baked into a tensor); "
            "converting it is not supported"
        )
    hidden = int(_require(meta, "llama.embedding_length"))
    heads = int(_require(meta, "llama.attention.head_count"))
    head_dim = (
        int(meta.get("llama.attention.key_length") or meta.get("llama.rope.dimension_count") or 0)
        or hidden // heads
    )
    vocab = meta.get("llama.vocab_size")
    if vocab is None:
        vocab = len(_require(meta, "tokenizer.ggml.tokens"))
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_require(meta, "llama.feed_forward_length")),
        "num_hidden_layers": int(_require(meta, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32_value(_require(meta, "llama.attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    theta = _f32_value(meta.get("llama.rope.freq_base", 10000.0))
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling == "linear":
        rope = {"rope_type": "linear", "rope_theta": theta}
        rope["factor"] = _f32_value(_require(meta, "llama.rope.scaling.factor"))
    elif scaling not in ("none", None):
        raise ConversionError(f"GGUF rope scaling {scaling!r} is not supported; supported: linear")
    # Written in the transformers 5 spelling (rope_parameters), plus rope_theta for 4.x.
    config["rope_parameters"] = rope
    config["rope_theta"] = theta
    return config


def unpermute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its ``LlamaModel.permute``).

    llama.cpp reorders each head's rows from HF's rotate-half order (first half of the
    pairs, then the second half) to interleaved pairs: row ``2 * i + j`` of its head holds
    HF row ``j * (head_dim / 2) + i``. Works for weights ``[H * Dh, in]`` and biases.
    """
    rows = weight.shape[0]
    head_dim = rows // n_heads
    if n_heads * head_dim != rows or head_dim % 2:
        raise ConversionError(f"cannot split {rows} rows into {n_heads} rotary heads")
    return (
        weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def dequantize(tensor: Any) -> np.ndarray:
    """One GGUF tensor as float32 numpy in HF orientation (GGUF lists dims fastest-first)."""
    from gguf.quants import dequantize as gguf_dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        array = gguf_dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as err:
        raise ConversionError(
            f"GGUF tensor {tensor.name!r}: quantisation {tensor.tensor_type.name} cannot be "
            f"dequantised ({err})"
        ) from err
    return np.ascontiguousarray(np.asarray(array, np.float32).reshape(shape))


def hf_tensor_name(gguf_name: str) -> str:
    """HF state-dict name of a LLaMA GGUF tensor name; unknown names are errors."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"model.layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}"
    raise ConversionError(f"GGUF tensor {gguf_name!r} has no LLaMA counterpart")


def llama_hf_tensors(
    reader: Any,
    hf_config: dict[str, Any],
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> dict[str, np.ndarray]:
    """All tensors dequantised to float32 under HF names, q/k un-permuted.

    ``progress`` wraps the tensor iteration (e.g. ``tqdm``).
    """
    heads = hf_config["num_attention_heads"]
    kv_heads = hf_config["num_key_value_heads"]
    tensors = reader.tensors if progress is None else progress(reader.tensors)
    out: dict[str, np.ndarray] = {}
    for tensor in tensors:
        name = hf_tensor_name(tensor.name)
        array = dequantize(tensor)
        if ".self_attn.q_proj." in name:
            array = unpermute_rotary(array, heads)
        elif ".self_attn.k_proj." in name:
            array = unpermute_rotary(array, kv_heads)
        out[name] = array
    return out


def _pre_tokenizer(pre: str | None) -> Any:
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _PRE_DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _PRE_GPT2 or pre is None:
        return byte_level
    raise ConversionError(
        f"GGUF pre-tokenizer {pre!r} is not supported; supported: "
        f"{', '.join(_PRE_DIGITS_THEN_GPT2 + _PRE_GPT2)}"
    )


def build_tokenizer(meta: dict[str, Any]) -> Any:
    """An HF ``PreTrainedTokenizerFast`` from a GGUF file's byte-level BPE vocabulary.

    ``meta`` must be read with ``read_metadata(reader, bulk=True)``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConversionError(f"GGUF tokenizer model {kind!r} is not supported; supported: 'gpt2'")
    tokens: list[str] = list(_require(meta, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ")) for m in _require(meta, "tokenizer.ggml.merges")]
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ConversionError("GGUF vocabulary has duplicate tokens")

    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    backend.decoder = decoders.ByteLevel()

    def token(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}")
        return None if idx is None else tokens[int(idx)]

    bos = token("bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind_ in zip(tokens, types, strict=True)
            if kind_ == _TOKEN_TYPE_CONTROL
        ]
    )
    backend.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind_ in zip(tokens, types, strict=True)
            if kind_ == _TOKEN_TYPE_USER_DEFINED
        ]
    )
    kwargs: dict[str, Any] = {
        "bos_token": bos,
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "model_max_length": int(meta.get("llama.context_length", 2048)),
        "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.chat_template" in meta:
        kwargs["chat_template"] = meta["tokenizer.chat_template"]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
