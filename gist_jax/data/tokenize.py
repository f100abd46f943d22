"""Tokenisation of templated examples: gist ids inserted by id, truncation with counts.

This module owns turning example dicts into token id arrays for either model family. The
rules it guarantees:

* **User text never becomes a gist token.** Each piece of user text is tokenised on its
  own with ``split_special_tokens=True`` (a literal "<GIST>" in an instruction is ordinary
  text), the k gist ids are inserted by id, and every piece is checked not to contain the
  gist id. Works with any Hugging Face tokenizer (byte-level BPE or sentencepiece) that has
  a ``<GIST>`` token; one without it gets ``GistTokenError`` from ``gist_token_id_of``.
* **Pieces tokenise like the joined text.** A user text that follows a template space is
  encoded as ``" " + text`` for tokenizers without a sentencepiece dummy prefix, and as
  ``text`` for those with one (which add the "▁" themselves); a template piece that
  continues a line (e.g. "\\nInput:") loses the lone "▁" a dummy-prefix tokenizer puts in
  front of it. So the tokens equal those of the paper's template string with ``<GIST>``
  as one token (tested for the SmolLM2 tokenizer), except that no token is ever merged
  across a boundary between user text and template text (which truncation relies on).
* **Truncation never removes gist tokens or the template.** When an example is longer than
  the limit, tokens are cut from the end of the ``input`` text first, then from the end of
  the ``instruction`` text; if it still does not fit, the completion (decoder-only) or the
  target (T5, separately limited) loses tokens from its end, EOS first. An example is
  dropped only when not even one completion token fits, or (T5) when the source's
  template, gist tokens and EOS alone exceed the source limit. Every case is counted in a
  ``TruncationReport``.

Spans ``gist_first``/``gist_last`` are positions within the example (``-1`` without gist
tokens); the batching code turns them into per-token arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gist_jax.data import templates
from gist_jax.data.templates import Piece


class GistTokenError(ValueError):
    """A tokenizer without the ``<GIST>`` token (a model not converted by gist_jax)."""


def gist_token_id_of(tokenizer: Any) -> int:
    """The id of ``<GIST>`` in a tokenizer; a clear error if the tokenizer lacks it."""
    vocab = tokenizer.get_vocab()
    if templates.GIST_TOKEN not in vocab:
        raise GistTokenError(
            f"tokenizer has no {templates.GIST_TOKEN} token; convert the model with "
            "`python -m gist_jax.convert.from_hf` first"
        )
    return int(vocab[templates.GIST_TOKEN])


NO_GIST = -1
_SPM_SPACE = "\u2581"  # sentencepiece's word-boundary marker "▁"
_ENCODE_CHUNK = 2048


@dataclasses.dataclass(frozen=True)
class DecoderExample:
    """One decoder-only example: ``prompt`` (BOS ... "Output:") then ``completion``
    (output tokens + EOS; empty for prompt-only encodings used in generation)."""

    prompt: np.ndarray  # int32[P]
    completion: np.ndarray  # int32[C]
    gist_first: int
    gist_last: int
    index: int  # position in the list of examples that was encoded

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.completion)

    @property
    def tokens(self) -> np.ndarray:
        return np.concatenate([self.prompt, self.completion])


@dataclasses.dataclass(frozen=True)
class EncDecExample:
    """One encoder-decoder example: ``source`` (... + EOS) and ``target`` (output + EOS)."""

    source: np.ndarray  # int32[S]
    target: np.ndarray  # int32[T]
    gist_first: int  # positions in ``source``
    gist_last: int
    index: int


@dataclasses.dataclass
class TruncationReport:
    """Counts of what truncation did to a list of examples (truncation counts are over the
    kept examples; an example counts once per kind of cut)."""

    examples: int = 0
    kept: int = 0
    truncated: int = 0  # kept examples with at least one part shortened
    truncated_input: int = 0  # ... whose input text lost tokens
    truncated_instruction: int = 0  # ... whose instruction text lost tokens
    truncated_completion: int = 0  # ... whose completion / target lost tokens
    dropped_too_long: int = 0
    dropped_indices: list[int] = dataclasses.field(default_factory=list)

    def count(self, cuts: set[str]) -> None:
        """Record one kept example whose parts in ``cuts`` were shortened."""
        self.kept += 1
        self.truncated += bool(cuts)
        self.truncated_input += "input" in cuts
        self.truncated_instruction += "instruction" in cuts
        self.truncated_completion += "output" in cuts

    def drop(self, index: int) -> None:
        self.dropped_too_long += 1
        self.dropped_indices.append(index)

    def summary(self) -> str:
        return (
            f"{self.examples} examples: kept {self.kept}, truncated {self.truncated} "
            f"(input {self.truncated_input}, instruction {self.truncated_instruction}, "
            f"completion {self.truncated_completion}), dropped as too long "
            f"{self.dropped_too_long}"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class PieceEncoder:
    """Encodes template pieces with a Hugging Face tokenizer that has ``<GIST>``."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.gist_id = gist_token_id_of(tokenizer)
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; the templates end with EOS")
        self.eos_id = int(tokenizer.eos_token_id)
        self.bos_id = None if tokenizer.bos_token_id is None else int(tokenizer.bos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        first = self._raw(["a"])[0]
        first_token = tokenizer.convert_ids_to_tokens(first[:1])
        # Sentencepiece tokenizers put "▁" (a space) in front of every text they encode.
        self.dummy_prefix = bool(first_token) and first_token[0].startswith(_SPM_SPACE)
        self._skeleton_cache: dict[tuple[str, bool], list[int]] = {}

    def _raw(self, texts: list[str]) -> list[list[int]]:
        out: list[list[int]] = []
        for start in range(0, len(texts), _ENCODE_CHUNK):
            chunk = texts[start : start + _ENCODE_CHUNK]
            encoded = self.tokenizer(chunk, add_special_tokens=False, split_special_tokens=True)
            out.extend(list(ids) for ids in encoded["input_ids"])
        return out

    def _text_for(self, piece: Piece) -> str:
        if piece.space_before and not self.dummy_prefix:
            return " " + piece.text
        return piece.text

    def _fix(self, ids: list[int], piece: Piece, continuation: bool) -> list[int]:
        # A lone "▁" at the start of a continuation is the dummy prefix, not user text.
        if (
            continuation
            and self.dummy_prefix
            and not piece.space_before
            and not piece.text.startswith(" ")
            and self.tokenizer.convert_ids_to_tokens(ids[:1]) == [_SPM_SPACE]
        ):
            ids = ids[1:]
        if self.gist_id in ids:
            raise RuntimeError(
                f"the tokenizer turned {piece.role} text {piece.text[:60]!r} into the gist "
                f"token (id {self.gist_id}) although special tokens were not parsed"
            )
        return ids

    def encode_many(self, piece_lists: Sequence[Sequence[Piece]]) -> list[list[list[int]]]:
        """Token ids for each piece of each list (gist pieces become their k ids). User
        texts are encoded in large batches; template texts once each."""
        user_texts: list[str] = []
        for pieces in piece_lists:
            for piece in pieces:
                if piece.role in templates.USER_ROLES:
                    user_texts.append(self._text_for(piece))
        user_ids = iter(self._raw(user_texts))
        out: list[list[list[int]]] = []
        for pieces in piece_lists:
            encoded: list[list[int]] = []
            for position, piece in enumerate(pieces):
                continuation = position > 0
                if piece.role == "gist":
                    encoded.append([self.gist_id] * piece.num_gist)
                elif piece.role == "skeleton":
                    key = (piece.text, continuation)
                    if key not in self._skeleton_cache:
                        raw = self._raw([piece.text])[0]
                        self._skeleton_cache[key] = self._fix(raw, piece, continuation)
                    encoded.append(list(self._skeleton_cache[key]))
                else:
                    encoded.append(self._fix(next(user_ids), piece, continuation))
            out.append(encoded)
        return out


def _cut_user_text(pieces: list[Piece], ids: list[list[int]], over: int) -> tuple[int, set[str]]:
    """Shorten (in place) input text, then instruction text, by up to ``over`` tokens from
    their ends; returns the tokens still over the limit and the roles that were cut."""
    cuts: set[str] = set()
    for role in ("input", "instruction"):
        for i, piece in enumerate(pieces):
            if over <= 0 or piece.role != role or not ids[i]:
                continue
            cut = min(over, len(ids[i]))
            ids[i] = ids[i][: len(ids[i]) - cut]
            over -= cut
            cuts.add(role)
    return over, cuts


def _gist_span(pieces: list[Piece], ids: list[list[int]], offset: int) -> tuple[int, int]:
    start = offset
    for piece, piece_ids in zip(pieces, ids, strict=True):
        if piece.role == "gist" and piece.num_gist:
            return start, start + piece.num_gist - 1
        start += len(piece_ids)
    return NO_GIST, NO_GIST


def _as_array(parts: Sequence[Sequence[int]]) -> np.ndarray:
    flat = [token for part in parts for token in part]
    return np.asarray(flat, dtype=np.int32)


def encode_decoder_examples(
    examples: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    num_gist: int,
    max_length: int,
    with_completion: bool = True,
    add_bos: bool = True,
    encoder: PieceEncoder | None = None,
) -> tuple[list[DecoderExample], TruncationReport]:
    """Encode examples with the decoder-only template, truncated to ``max_length`` tokens
    in total (prompt only when ``with_completion`` is False, for generation).

    ``add_bos`` prepends the tokenizer's BOS when it has one (the paper's LLaMA template).
    Returns the kept examples (``index`` = position in ``examples``) and the report.
    """
    encoder = encoder or PieceEncoder(tokenizer)
    bos = [encoder.bos_id] if add_bos and encoder.bos_id is not None else []
    prompts = [templates.decoder_prompt_pieces(ex, num_gist) for ex in examples]
    prompt_ids = encoder.encode_many(prompts)
    if with_completion:
        completions = [templates.decoder_completion_pieces(ex) for ex in examples]
        completion_ids = [p[0] + [encoder.eos_id] for p in encoder.encode_many(completions)]
    else:
        completion_ids = [[] for _ in examples]

    report = TruncationReport(examples=len(examples))
    kept: list[DecoderExample] = []
    for index, (pieces, ids, completion) in enumerate(
        zip(prompts, prompt_ids, completion_ids, strict=True)
    ):
        over = len(bos) + sum(map(len, ids)) + len(completion) - max_length
        over, cuts = _cut_user_text(pieces, ids, over) if over > 0 else (over, set())
        if over > 0:
            # Template and gist tokens are kept whole; only the completion can give way.
            if not with_completion or len(completion) - over < 1:
                report.drop(index)
                continue
            completion = completion[: len(completion) - over]
            cuts.add("output")
        report.count(cuts)
        first, last = _gist_span(pieces, ids, offset=len(bos))
        kept.append(
            DecoderExample(
                prompt=_as_array([bos, *ids]),
                completion=np.asarray(completion, dtype=np.int32),
                gist_first=first,
                gist_last=last,
                index=index,
            )
        )
    return kept, report


def encode_encdec_examples(
    examples: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    num_gist: int,
    max_source_length: int,
    max_target_length: int,
    encoder: PieceEncoder | None = None,
) -> tuple[list[EncDecExample], TruncationReport]:
    """Encode examples with the encoder-decoder template: source truncated to
    ``max_source_length`` (input text, then instruction text), target (output + EOS)
    cut from its end to ``max_target_length``."""
    if max_target_length < 1:
        raise ValueError(f"max_target_length must be >= 1, got {max_target_length}")
    encoder = encoder or PieceEncoder(tokenizer)
    sources = [templates.encoder_source_pieces(ex, num_gist) for ex in examples]
    source_ids = encoder.encode_many(sources)
    targets = [templates.encoder_target_pieces(ex) for ex in examples]
    target_ids = [p[0] + [encoder.eos_id] for p in encoder.encode_many(targets)]

    report = TruncationReport(examples=len(examples))
    kept: list[EncDecExample] = []
    for index, (pieces, ids, target) in enumerate(
        zip(sources, source_ids, target_ids, strict=True)
    ):
        over = sum(map(len, ids)) + 1 - max_source_length  # + 1 for EOS
        over, cuts = _cut_user_text(pieces, ids, over) if over > 0 else (over, set())
        if over > 0:
            report.drop(index)
            continue
        if len(target) > max_target_length:
            target = target[:max_target_length]
            cuts.add("output")
        report.count(cuts)
        first, last = _gist_span(pieces, ids, offset=0)
        kept.append(
            EncDecExample(
                source=_as_array([*ids, [encoder.eos_id]]),
                target=np.asarray(target, dtype=np.int32),
                gist_first=first,
                gist_last=last,
                index=index,
            )
        )
    return kept, report


def encode_prompts(
    examples: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    num_gist: int,
    max_length: int,
    encoder_decoder: bool,
) -> tuple[list[DecoderExample] | list[EncDecExample], list[list[int]], TruncationReport]:
    """The prompts alone (what is compressed or decoded from), with the family's template:
    ``(encoded examples, prompt token ids, report)``. Decoder-only prompts end after
    ``Output:``; encoder-decoder prompts are the whole source. User text is cut first to
    fit ``max_length``."""
    if encoder_decoder:
        encoded, report = encode_encdec_examples(
            examples, tokenizer, num_gist, max_length, max_target_length=1
        )
        return encoded, [e.source.tolist() for e in encoded], report
    encoded, report = encode_decoder_examples(
        examples, tokenizer, num_gist, max_length, with_completion=False
    )
    return encoded, [e.prompt.tolist() for e in encoded], report
