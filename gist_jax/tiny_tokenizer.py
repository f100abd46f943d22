"""A small byte-level BPE tokenizer trained on the synthetic suite, for random-init tiny
models (tests, quick CPU demos) that have no tokenizer of their own.

Why: a tiny model with a real 32k-49k vocabulary spends nearly all its time in the output
softmax. This tokenizer has a few hundred entries, is trained in well under a second with
Hugging Face ``tokenizers``, and is deterministic (the same corpus and settings always give
the same vocabulary, so every process of a multi-host run builds the identical tokenizer;
``fingerprint`` lets callers check). Any text can be encoded (byte-level fallback); the
synthetic suite's texts come out at about 25-40 tokens per example.

Special tokens: ``<pad>`` 0, ``<s>`` 1 (BOS), ``</s>`` 2 (EOS), ``<GIST>`` 3.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

from gist_jax.data.templates import GIST_TOKEN

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", GIST_TOKEN)
PREFIX = "synthetic_bpe"


def _corpus(seed: int = 0) -> list[str]:
    from gist_jax.data import synthetic

    sizes = {"train": 2000, "validation_seen": 200, "validation_unseen": 200}
    lines = []
    for split, size in sizes.items():
        for ex in synthetic.make_split(split, size, seed=seed):
            lines.append(
                f"Instruction: {ex['instruction']}\nInput: {ex['input']}\nOutput: {ex['output']}"
            )
    return lines


@functools.cache
def synthetic_bpe(vocab_size: int = 512) -> Any:
    """A ``PreTrainedTokenizerFast`` with ``vocab_size`` entries (special tokens included).

    Cached per process; callers must not modify it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(
            f"synthetic_bpe vocab_size must be >= 300 (bytes + merges), got {vocab_size}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=[GIST_TOKEN],
    )


def fingerprint(tokenizer: Any) -> str:
    """A short hash of a tokenizer's vocabulary (to check processes agree)."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(repr(vocab).encode()).hexdigest()[:16]


def from_spec(spec: str) -> Any:
    """``"synthetic_bpe"`` or ``"synthetic_bpe:<vocab_size>"`` -> tokenizer."""
    name, _, size = spec.partition(":")
    if name != PREFIX:
        raise ValueError(f"unknown tokenizer spec {spec!r}; expected '{PREFIX}[:<vocab_size>]'")
    return synthetic_bpe(int(size) if size else 512)
