"""Shared helpers for the T5 tests: tiny random HF ``T5ForConditionalGeneration`` models in
both variants (v1.0: ReLU, tied, scaled output; v1.1 / FLAN: gated-GELU, untied lm_head)
with weights perturbed so attention patterns, the relative position bias and the norms all
matter, padded encoder-decoder batches with gist tokens at different positions, the
PyTorch reference forward pass under gist masks, and a tiny trained sentencepiece T5
tokenizer."""

from __future__ import annotations

import dataclasses
import functools
import io
import pathlib
import random
from typing import Any

import numpy as np

VOCAB = 96
PAD_ID = 0
EOS_ID = 1
GIST_ID = VOCAB - 1  # stands in for <GIST> in model-only tests
NUM_GIST = 2

VARIANTS = ("v1_0", "v1_1")


def hf_config(variant: str, **overrides: Any) -> Any:
    from transformers import T5Config

    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_heads=4,
        # Few buckets and a short max distance, so the test lengths reach the
        # logarithmic buckets and the clamp, not only the exact ones.
        relative_attention_num_buckets=8,
        relative_attention_max_distance=12,
        dropout_rate=0.0,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
        attn_implementation="eager",
    )
    if variant == "v1_0":
        kwargs.update(feed_forward_proj="relu")
    elif variant == "v1_1":
        kwargs.update(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    else:
        raise ValueError(variant)
    kwargs.update(overrides)
    return T5Config(**kwargs)


def hf_model(variant: str, seed: int = 0, **overrides: Any) -> Any:
    """A random HF T5 in eval mode. Weights are re-drawn larger than HF's init so that
    attention is far from uniform and the relative bias dominates some heads; v1.1 gets
    its own ``lm_head`` (transformers 5 ties it to ``shared`` at construction)."""
    import torch
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(hf_config(variant, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.uniform_(0.5, 1.5)
            elif "relative_attention_bias" in name:
                p.normal_(0.0, 1.5)
            elif name == "shared.weight":
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 1.25 / np.sqrt(p.shape[1]))
        if variant == "v1_1":
            vocab, d_model = model.lm_head.weight.shape
            model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab, d_model) * 0.25)
    return model


def state_dict(model: Any) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def jitted(config: Any, method: str, **static: Any) -> Any:
    """``jit(model.apply(..., method=method))``, shared by all T5 tests. Fields that do not
    change the computation are normalised away so equal architectures compile once."""
    arch = dataclasses.replace(config, gist_token_id=None, initializer_factor=1.0)
    return _jitted(arch, method, tuple(sorted(static.items())))


@functools.cache
def _jitted(config: Any, method: str, static: tuple[tuple[str, Any], ...]) -> Any:
    import jax

    from gist_jax.models import t5

    model = t5.build_model(config)

    def run(params: Any, *args: Any) -> Any:
        return model.apply({"params": params}, *args, **dict(static), method=method)

    return jax.jit(run)


# ---------------------------------------------------------------------------------------
# Batches


def source_batch(
    specs: list[tuple[int, int, int]],
    seed: int = 0,
    length: int | None = None,
    max_id: int = GIST_ID,
    gist_id: int = GIST_ID,
) -> dict[str, np.ndarray]:
    """Padded encoder sources ``prompt, <GIST>*g, input, EOS`` from ``(prompt_len, g,
    input_len)`` per example; ``g = 0`` gives an example without gist tokens. Ordinary
    tokens are drawn from ``[3, max_id)``.

    Returns ``ids``, ``positions`` (row index, -1 at padding), ``first``, ``last`` (gist
    span, -1 if none) and ``lengths``.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for prompt_len, g, input_len in specs:
        prompt = rng.integers(3, max_id, prompt_len)
        inputs = rng.integers(3, max_id, input_len)
        rows.append(np.concatenate([prompt, [gist_id] * g, inputs, [EOS_ID]]).astype(np.int32))
    length = length or max(len(r) for r in rows)
    b = len(rows)
    ids = np.full((b, length), PAD_ID, np.int32)
    positions = np.full((b, length), -1, np.int32)
    first = np.full(b, -1, np.int32)
    last = np.full(b, -1, np.int32)
    for i, (row, (prompt_len, g, _)) in enumerate(zip(rows, specs, strict=True)):
        ids[i, : len(row)] = row
        positions[i, : len(row)] = np.arange(len(row))
        if g:
            first[i], last[i] = prompt_len, prompt_len + g - 1
    lengths = np.array([len(r) for r in rows], np.int32)
    return {"ids": ids, "positions": positions, "first": first, "last": last, "lengths": lengths}


def target_batch(lengths: list[int], seed: int = 1, max_id: int = GIST_ID) -> dict[str, np.ndarray]:
    """Teacher-forced decoder inputs (start id, then targets shifted right, drawn from
    ``[3, max_id)``), positions (-1 at padding) and the valid flag."""
    rng = np.random.default_rng(seed)
    b, t = len(lengths), max(lengths)
    ids = np.full((b, t), PAD_ID, np.int32)
    positions = np.full((b, t), -1, np.int32)
    for i, n in enumerate(lengths):
        ids[i, 1:n] = rng.integers(3, max_id, n - 1)
        positions[i, :n] = np.arange(n)
    return {"ids": ids, "positions": positions, "valid": positions >= 0}


# ---------------------------------------------------------------------------------------
# PyTorch reference


def hf_logits(
    model: Any,
    ids: np.ndarray,
    enc_mask: np.ndarray,
    cross_mask: np.ndarray,
    dec_ids: np.ndarray,
    dec_valid: np.ndarray,
) -> np.ndarray:
    """HF logits with an arbitrary encoder self-attention mask ``bool[B, 1, L, L]`` and a
    cross-attention key mask ``bool[B, L]``.

    transformers 5 T5 rejects a 3D ``attention_mask`` and passes a 4D one through
    untouched to eager attention, which *adds* it to the scores, so the encoder gets an
    additive float mask. ``T5ForConditionalGeneration`` would reuse ``attention_mask`` as
    the cross mask; with ``encoder_outputs`` given, ``attention_mask`` is only the cross
    mask, which is how the two masks are kept apart.
    """
    import torch

    neg = torch.finfo(torch.float32).min
    additive = torch.where(torch.as_tensor(np.asarray(enc_mask)), 0.0, neg).to(torch.float32)
    with torch.no_grad():
        enc = model.encoder(input_ids=torch.as_tensor(ids).long(), attention_mask=additive)
        out = model(
            encoder_outputs=(enc.last_hidden_state,),
            attention_mask=torch.as_tensor(np.asarray(cross_mask)).long(),
            decoder_input_ids=torch.as_tensor(dec_ids).long(),
            decoder_attention_mask=torch.as_tensor(dec_valid).long(),
        )
    return out.logits.numpy()


# ---------------------------------------------------------------------------------------
# Tokenizer

_TEXT = (
    "Instruction: Input: Output: translate summarize answer the question about a cat dog "
    "runs jumps over under quick brown lazy fox sentence word text French English, and "
    "is of to in it that was for on are as with his they at be this have from or one"
)


def train_sentencepiece(out_dir: pathlib.Path, vocab_size: int = 80) -> pathlib.Path:
    """Train a real (tiny) unigram sentencepiece model with T5's special ids (pad 0,
    eos 1, unk 2, no bos) on a few hundred generated sentences; returns ``spiece.model``."""
    import sentencepiece as spm

    rnd = random.Random(0)
    words = _TEXT.split()
    sentences = [
        " ".join(rnd.choice(words) for _ in range(rnd.randint(3, 14))) + rnd.choice(".?!")
        for _ in range(400)
    ]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "spiece.model"
    path.write_bytes(model.getvalue())
    return path


def t5_tokenizer(work_dir: pathlib.Path, vocab_size: int = 80) -> Any:
    """A transformers ``T5Tokenizer`` over a freshly trained sentencepiece model (no
    sentinel ids, so ``len(tokenizer) == vocab_size``)."""
    from transformers import T5Tokenizer

    spm_dir = work_dir / "spm"
    train_sentencepiece(spm_dir, vocab_size)
    return T5Tokenizer.from_pretrained(str(spm_dir), extra_ids=0)


def relative_diff(got: np.ndarray, want: np.ndarray, valid: np.ndarray) -> float:
    """Largest logit difference over valid targets, relative to the logits' size: float32
    rounding grows with the values, and XLA's reduction order differs between CPU models
    (1.1e-5 and 1.5e-5 absolute seen on logits near 10 on CI's CPUs)."""
    scale = max(1.0, float(np.abs(want[valid]).max()))
    return float(np.abs(got - want)[valid].max()) / scale
