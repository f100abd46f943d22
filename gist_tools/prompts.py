"""Instructions and inputs as token ids for gist caching, with the training templates.

An instruction's *prompt* is its templated example cut after the gist tokens (LLaMA: BOS
"Instruction: ..." "\\n" <GIST>*k; T5: the same without BOS); an input's tokens are what
the template puts after the gists ("\\nInput: ...\\nOutput:" for LLaMA, "\\nInput: ..." +
EOS for T5). The tokeniser encodes every template piece on its own (``gist_jax.data``), so
the tokens after the gists do not depend on the instruction: an input can be tokenised
for a stored prompt whose instruction text is not at hand.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from gist_jax.inference import gist_cache

# Stands in for the instruction when only the input's tokens are wanted.
_PLACEHOLDER = "x"


def _encode(
    config: Any, tokenizer: Any, examples: list[dict[str, str]], num_gist: int, max_length: int
) -> list[list[int]]:
    from gist_jax import data
    from gist_jax.models.family import family_of

    _, rows, report = data.encode_prompts(
        examples, tokenizer, num_gist, max_length, family_of(config).encoder_decoder
    )
    if report.dropped_indices:
        raise ValueError(
            f"example(s) {report.dropped_indices[:10]} do not fit in {max_length} tokens even "
            "after truncating their text"
        )
    return rows


def instruction_prompts(
    config: Any, tokenizer: Any, instructions: Sequence[str], num_gist: int, max_length: int
) -> list[list[int]]:
    """Token ids of each instruction's prompt, ending with its ``num_gist`` gist tokens."""
    if num_gist < 1:
        raise ValueError(f"num_gist_tokens must be >= 1 to compress, got {num_gist}")
    for i, text in enumerate(instructions):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"instruction {i} is empty or not a string: {text!r}")
    examples = [{"instruction": t, "input": "", "output": ""} for t in instructions]
    rows = _encode(config, tokenizer, examples, num_gist, max_length)
    return [gist_cache.split_prompt(row, config.gist_token_id)[0] for row in rows]


def input_tokens(
    config: Any, tokenizer: Any, inputs: Sequence[str], num_gist: int, max_length: int
) -> list[list[int]]:
    """Token ids that follow the gist tokens for each input text."""
    examples = [{"instruction": _PLACEHOLDER, "input": x, "output": ""} for x in inputs]
    rows = _encode(config, tokenizer, examples, num_gist, max_length)
    return [gist_cache.split_prompt(row, config.gist_token_id)[1] for row in rows]


def json_lines(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of a JSON lines file; a line that is
    not JSON is a ``ValueError`` naming the file and line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err})") from err
