"""The benchmark's inputs, made by the project's own data pipeline: tokenised examples of
the synthetic suite (or Alpaca+ files), packed or padded train batches of the shared batch
contract, and prompts split at their gist tokens.

Everything here is deterministic (fixed seeds), so the JAX and PyTorch sides of a
comparison, and successive runs, see identical tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from gist_jax import data
from gist_jax.data.tokenize import DecoderExample

SYNTHETIC = "synthetic"


def encoded_examples(
    tokenizer: Any,
    split: str = "train",
    num_examples: int = 512,
    num_gist: int = 1,
    max_length: int = 1024,
    source: str = SYNTHETIC,
    with_completion: bool = True,
) -> list[DecoderExample]:
    """Examples of ``split`` tokenised with the decoder-only template (gist tokens in)."""
    examples, _ = data.load_examples(source, split, num_examples=num_examples, seed=0)
    if not examples:
        raise ValueError(f"{source}: split {split!r} has no examples")
    encoded, _ = data.encode_decoder_examples(
        examples, tokenizer, num_gist, max_length, with_completion=with_completion
    )
    return encoded


def train_batches(
    examples: list[DecoderExample],
    batch_size: int,
    length: int,
    pad_id: int,
    pack: bool = True,
    num_batches: int = 1,
    bucket_multiple: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """The first ``num_batches`` batches of an (unshuffled) epoch, ``[batch_size, <=length]``.

    ``pack=True`` fills rows up to ``length`` with several examples; otherwise one example
    per row. ``bucket_multiple`` (default ``length``: every batch exactly ``length`` long)
    is the padding granularity.
    """
    usable = [ex for ex in examples if ex.length <= length]
    it = data.BatchIterator(
        usable,
        global_batch_size=batch_size,
        max_length=length,
        pad_id=pad_id,
        shuffle=False,
        pack=pack,
        drop_remainder=True,
        bucket_multiple=bucket_multiple or length,
        num_epochs=None,
    )
    return [next(it) for _ in range(num_batches)]


def useful_tokens(batch: dict[str, np.ndarray]) -> int:
    """Non-padding tokens of a decoder-only batch."""
    return int(np.sum(batch["positions"] >= 0))


@dataclasses.dataclass(frozen=True)
class SplitPrompt:
    """One prompt for the caching measurements: the instruction part up to and including
    the gist tokens (``instruction``, what a cache replaces) and the rest (``input``:
    ``Input: ...`` and ``Output:``), plus the length of the instruction text alone."""

    instruction: list[int]  # BOS ... <GIST>*k
    input: list[int]
    num_gist: int

    @property
    def full(self) -> list[int]:
        return self.instruction + self.input


def split_prompts(
    tokenizer: Any,
    gist_token_id: int,
    split: str,
    num_examples: int,
    num_gist: int = 1,
    source: str = SYNTHETIC,
    max_length: int = 512,
) -> list[SplitPrompt]:
    """Prompts (no completion) of ``split`` cut after their gist tokens."""
    from gist_jax.inference.gist_cache import split_prompt

    encoded = encoded_examples(
        tokenizer, split, num_examples, num_gist, max_length, source, with_completion=False
    )
    prompts = []
    for ex in encoded:
        head, tail = split_prompt(ex.prompt.tolist(), gist_token_id)
        prompts.append(SplitPrompt(head, tail, num_gist))
    return prompts
