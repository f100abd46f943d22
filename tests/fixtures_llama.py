"""Shared helpers for the LLaMA tests: tiny random HF ``LlamaForCausalLM`` models (weights
scaled up so attention patterns and logits are far from trivial), a word-level tokenizer to
go with them, a padded batch with gist tokens, and the PyTorch reference forward pass."""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

VOCAB = 96
PAD_ID = 0
GIST_ID = VOCAB - 1  # stands in for <GIST> in model-only tests

# name -> HF LlamaConfig kwargs. Covers MHA and GQA, tied and untied, an explicit head_dim
# unlike hidden/heads, attention biases, and all three supported rope types.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "mha_untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa_tied_llama3": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "gqa_untied_linear_headdim_bias": dict(
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=False,
        attention_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    # Qwen2: q/k/v biases, no o_proj bias; tied and untied.
    "qwen2_tied": dict(
        architecture="qwen2", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
    ),
    "qwen2_untied": dict(
        architecture="qwen2",
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    ),
    # Mistral: a sliding window as long as the longest test sequence (max_position_embeddings).
    "mistral": dict(
        architecture="mistral",
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=64,
        tie_word_embeddings=False,
    ),
}


def hf_config(name: str) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        initializer_range=0.25,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD_ID,
        attn_implementation="eager",
    )
    kwargs.update(TINY_CONFIGS[name])
    architecture = kwargs.pop("architecture", "llama")
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[architecture]
    return cls(**kwargs)


def make_hf_model(name: str, seed: int = 0) -> Any:
    """A random tiny HF model in eval mode; norm weights are randomised too (HF inits them
    to one, which would hide a norm that is skipped or applied twice)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(name)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    return model


def make_tokenizer(vocab_size: int = VOCAB) -> Any:
    """Word-level fast tokenizer: ``<pad> <s> </s> <unk> w4 w5 ...`` (ids = vocab indices)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def save_hf_dir(model: Any, path: pathlib.Path, tokenizer: bool = True) -> pathlib.Path:
    model.save_pretrained(str(path), safe_serialization=True)
    if tokenizer:
        make_tokenizer(model.config.vocab_size).save_pretrained(str(path))
    return path


def padded_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Right-padded batch of 3 examples with lengths 12, 9, 6; gist tokens at 3..4 in the
    first, at 5 in the second, none in the third (plain attention)."""
    rng = np.random.default_rng(seed)
    lengths = np.array([12, 9, 6])
    length = int(lengths.max())
    ids = rng.integers(4, GIST_ID, size=(3, length)).astype(np.int32)
    ids[0, 3:5] = GIST_ID
    ids[1, 5] = GIST_ID
    positions = np.tile(np.arange(length, dtype=np.int32), (3, 1))
    valid = positions < lengths[:, None]
    ids[~valid] = PAD_ID
    positions[~valid] = -1
    return {"input_ids": ids, "positions": positions, "valid": valid, "lengths": lengths}


def gist_causal_mask(ids: np.ndarray, condition: str) -> np.ndarray:
    """``bool[B, 1, L, L]``: ``gist.make_gist_mask`` AND causal."""
    from gist_jax import gist

    dense = np.asarray(gist.make_gist_mask(ids, GIST_ID, PAD_ID, condition))
    causal = np.tril(np.ones((ids.shape[1], ids.shape[1]), bool))
    return dense & causal[None, None]


def torch_logits(
    model: Any,
    ids: np.ndarray,
    positions: np.ndarray | None = None,
    bool_mask: np.ndarray | None = None,
    attention_mask_2d: np.ndarray | None = None,
) -> np.ndarray:
    """Reference logits. A 4D boolean mask (True = attend) is passed to HF's eager attention
    as the additive float mask it expects (0 or the dtype's minimum)."""
    import torch

    kwargs: dict[str, Any] = {}
    if positions is not None:
        kwargs["position_ids"] = torch.as_tensor(np.maximum(positions, 0), dtype=torch.long)
    if bool_mask is not None:
        additive = np.where(bool_mask, 0.0, np.finfo(np.float32).min).astype(np.float32)
        kwargs["attention_mask"] = torch.as_tensor(additive)
    elif attention_mask_2d is not None:
        kwargs["attention_mask"] = torch.as_tensor(attention_mask_2d, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, dtype=torch.long), **kwargs)
    return out.logits.float().numpy()


def hf_state_dict(model: Any) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert script's q/k row permutation (HF rotate-half -> interleaved),
    written here from its description so tests can build GGUF files the way it does."""
    head_dim = weight.shape[0] // n_heads
    return (
        weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


TINY_BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_BPE_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġ c", "a t", "Ġc at"]


def tiny_bpe_vocab() -> tuple[list[str], list[str], list[int]]:
    """``(tokens, merges, token_types)`` of a small byte-level BPE: 3 control tokens, the
    256 byte symbols, then one token per merge."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = list(TINY_BPE_SPECIALS) + list(bytes_to_unicode().values())
    tokens += [m.replace(" ", "") for m in TINY_BPE_MERGES]
    types = [3] * len(TINY_BPE_SPECIALS) + [1] * (len(tokens) - len(TINY_BPE_SPECIALS))
    return tokens, list(TINY_BPE_MERGES), types


def write_tiny_gguf(path: pathlib.Path, model: Any) -> pathlib.Path:
    """Write an HF LLaMA model as a llama.cpp-style GGUF file: Q8_0 matrices, float32 norms,
    q/k rows permuted, byte-level BPE tokenizer metadata (``tiny_bpe_vocab``)."""
    import gguf

    cfg = model.config
    tokens, merges, types = tiny_bpe_vocab()
    assert cfg.vocab_size == len(tokens)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer_names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, array in hf_state_dict(model).items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name in names:
            gname = names[name]
        else:
            _, _, layer, rest = name.split(".", 3)
            module, _, suffix = rest.rpartition(".")
            gname = f"blk.{layer}.{layer_names[module]}.{suffix}"
        if name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, cfg.num_key_value_heads)
        if array.ndim == 2:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gname, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gname, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
