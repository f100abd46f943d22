"""The paper's Alpaca+ prompt templates, per model family, as text and as typed pieces.

Decoder-only (LLaMA family), k gist tokens::

    BOS + "Instruction: {instruction}\\n{' '.join(['<GIST>'] * k)}\\nInput: {input}\\nOutput:"
    completion: "{output}" + EOS            (loss only on the completion)

Encoder-decoder (T5 family)::

    source: "Instruction: {instruction}\\n{'<GIST>' * k}\\nInput: {input}" + EOS
    target: "{output}" + EOS

The ``\\nInput: {input}`` part is omitted when ``input`` is empty. With k = 0 (the no-gist
baseline) the strings are the same f-strings evaluated at k = 0, i.e. the gist line is
left empty; the token sequence then simply has no gist ids and every condition is plain
attention.

Tokenisation works on *pieces* rather than on these strings, so that user text can never
become a gist token and so truncation knows which tokens are user text. A piece is one of:

* ``skeleton``: fixed template text ("Instruction:", "\\n", "\\nInput:", "\\nOutput:");
* ``instruction`` / ``input`` / ``output``: user text, tokenised with special tokens not
  parsed, preceded by the template's space (``space_before``);
* ``gist``: k gist token ids, inserted by id. They are always contiguous (the mask and
  the gist cache need a contiguous span), so the decoder template's spaces between gist
  tokens are not tokens.

``render`` turns pieces back into the template strings above (tests check this), which
keeps the pieces and the paper's templates from drifting apart. The completion renders
with the space that follows "Output:" ("Output: {output}"), which is how the paper's
separately tokenised LLaMA completion reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

GIST_TOKEN = "<GIST>"  # the token every template inserts k times after the instruction
Role = Literal["skeleton", "instruction", "input", "gist", "output"]
USER_ROLES: tuple[str, ...] = ("instruction", "input", "output")


@dataclasses.dataclass(frozen=True)
class Piece:
    """One part of a templated example; ``text`` is empty for ``gist`` pieces."""

    role: Role
    text: str = ""
    space_before: bool = False  # the template puts a space before this user text
    num_gist: int = 0  # for role "gist"


def _skeleton(pieces: list[Piece], text: str) -> None:
    # Adjacent fixed texts become one piece (e.g. "\n" + "\nInput:" when k = 0), so they are
    # tokenised the way the joined string would be.
    if pieces and pieces[-1].role == "skeleton":
        pieces[-1] = Piece("skeleton", pieces[-1].text + text)
    else:
        pieces.append(Piece("skeleton", text))


def _prompt_pieces(example: Mapping[str, Any], num_gist: int) -> list[Piece]:
    if num_gist < 0:
        raise ValueError(f"num_gist must be >= 0, got {num_gist}")
    pieces: list[Piece] = [
        Piece("skeleton", "Instruction:"),
        Piece("instruction", example["instruction"], space_before=True),
    ]
    _skeleton(pieces, "\n")
    if num_gist:
        pieces.append(Piece("gist", num_gist=num_gist))
    if example["input"]:
        _skeleton(pieces, "\nInput:")
        pieces.append(Piece("input", example["input"], space_before=True))
    return pieces


def decoder_prompt_pieces(example: Mapping[str, Any], num_gist: int) -> list[Piece]:
    """Pieces of the decoder-only prompt (after BOS), ending with "\\nOutput:"."""
    pieces = _prompt_pieces(example, num_gist)
    _skeleton(pieces, "\nOutput:")
    return pieces


def decoder_completion_pieces(example: Mapping[str, Any]) -> list[Piece]:
    """Pieces of the decoder-only completion (EOS is appended by id)."""
    return [Piece("output", example["output"], space_before=True)]


def encoder_source_pieces(example: Mapping[str, Any], num_gist: int) -> list[Piece]:
    """Pieces of the encoder source (EOS is appended by id)."""
    return _prompt_pieces(example, num_gist)


def encoder_target_pieces(example: Mapping[str, Any]) -> list[Piece]:
    """Pieces of the decoder target (EOS is appended by id)."""
    return [Piece("output", example["output"])]


def render(pieces: Sequence[Piece], gist_separator: str) -> str:
    """The text a list of pieces stands for; gist tokens written as ``<GIST>`` joined by
    ``gist_separator`` (" " for the decoder-only template, "" for encoder-decoder)."""
    parts = []
    for piece in pieces:
        if piece.role == "gist":
            parts.append(gist_separator.join([GIST_TOKEN] * piece.num_gist))
        else:
            parts.append((" " if piece.space_before else "") + piece.text)
    return "".join(parts)


def decoder_prompt_text(instruction: str, input: str, num_gist: int) -> str:
    """The paper's decoder-only prompt string (without BOS), for display and tests."""
    gists = " ".join([GIST_TOKEN] * num_gist)
    if input:
        return f"Instruction: {instruction}\n{gists}\nInput: {input}\nOutput:"
    return f"Instruction: {instruction}\n{gists}\nOutput:"


def encoder_source_text(instruction: str, input: str, num_gist: int) -> str:
    """The paper's encoder-decoder source string (without EOS), for display and tests."""
    gists = GIST_TOKEN * num_gist
    if input:
        return f"Instruction: {instruction}\n{gists}\nInput: {input}"
    return f"Instruction: {instruction}\n{gists}"
