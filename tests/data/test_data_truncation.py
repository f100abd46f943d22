"""Truncation: input text first, then instruction text, then the completion's tail; gist
tokens and the template are never cut; an example is dropped (and counted) only when no
completion token fits (decoder-only) or the source skeleton does not fit (T5)."""

from __future__ import annotations

import fixtures_data
import numpy as np
import pytest

from gist_jax.data import templates, tokenize
from gist_jax.data.templates import GIST_TOKEN

K = 2
LONG = {
    "instruction": "Summarise the following paragraph about rivers and mountains in one line.",
    "input": "Rivers flow from the mountains to the sea, carving valleys through old stone.",
    "output": "Rivers carve valleys on their way to the sea.",
}

smollm2_tokenizer = fixtures_data.smollm2_tokenizer
t5_tokenizer = fixtures_data.t5_tokenizer


def _flat(lists):
    return [x for part in lists for x in part]


def _piece_ids(tok, example):
    """Token ids of each prompt piece and of the completion (with EOS), untruncated."""
    encoder = tokenize.PieceEncoder(tok)
    prompt = encoder.encode_many([templates.decoder_prompt_pieces(example, K)])[0]
    completion = encoder.encode_many([templates.decoder_completion_pieces(example)])[0][0]
    return prompt, [*completion, tok.eos_token_id]


def _check_intact_gist(tok, ex):
    gist_id = tok.convert_tokens_to_ids(GIST_TOKEN)
    assert ex.prompt[ex.gist_first : ex.gist_last + 1].tolist() == [gist_id] * K
    assert (ex.tokens == gist_id).sum() == K


def test_decoder_truncation_order(smollm2_tokenizer):
    tok = smollm2_tokenizer
    # pieces: 0 "Instruction:", 1 instruction, 2 "\n", 3 gist, 4 "\nInput:", 5 input,
    # 6 "\nOutput:"
    p, completion = _piece_ids(tok, LONG)
    full = 1 + sum(map(len, p)) + len(completion)
    bos = [tok.bos_token_id]

    def encode(max_length):
        kept, report = tokenize.encode_decoder_examples([LONG], tok, K, max_length)
        return (kept[0] if kept else None), report

    ex, report = encode(full)
    assert ex.length == full and report.truncated == 0

    # 1. Five tokens over: only the input's tail goes.
    ex, report = encode(full - 5)
    assert ex.length == full - 5
    assert ex.prompt.tolist() == bos + _flat(p[:5]) + p[5][:-5] + p[6]
    assert ex.completion.tolist() == completion
    assert (report.truncated, report.truncated_input, report.truncated_instruction) == (1, 1, 0)
    _check_intact_gist(tok, ex)

    # 2. The whole input plus three instruction tokens: input emptied, instruction cut.
    ex, report = encode(full - len(p[5]) - 3)
    assert ex.prompt.tolist() == bos + p[0] + p[1][:-3] + _flat(p[2:5]) + p[6]
    assert (report.truncated_input, report.truncated_instruction) == (1, 1)
    assert report.truncated_completion == 0
    _check_intact_gist(tok, ex)

    # 3. No user text left and still two over: the completion loses its tail, EOS first.
    skeleton = 1 + sum(len(p[i]) for i in (0, 2, 3, 4, 6))
    ex, report = encode(skeleton + len(completion) - 2)
    assert ex.prompt.tolist() == bos + p[0] + p[2] + p[3] + p[4] + p[6]
    assert ex.completion.tolist() == completion[:-2]
    assert tok.eos_token_id not in ex.completion.tolist()
    assert report.to_dict() | {"dropped_indices": []} == {
        "examples": 1,
        "kept": 1,
        "truncated": 1,
        "truncated_input": 1,
        "truncated_instruction": 1,
        "truncated_completion": 1,
        "dropped_too_long": 0,
        "dropped_indices": [],
    }
    _check_intact_gist(tok, ex)

    # 4. Room for exactly one completion token: kept.
    ex, report = encode(skeleton + 1)
    assert len(ex.completion) == 1 and report.kept == 1
    # 5. No room for any completion token: dropped, never a cut gist or template.
    ex, report = encode(skeleton)
    assert ex is None
    assert (report.kept, report.dropped_too_long, report.dropped_indices) == (0, 1, [0])


def test_prompt_only_encoding_for_generation(smollm2_tokenizer):
    tok = smollm2_tokenizer
    p, _ = _piece_ids(tok, LONG)
    prompt_len = 1 + sum(map(len, p))
    [ex], report = tokenize.encode_decoder_examples(
        [LONG], tok, K, prompt_len, with_completion=False
    )
    assert len(ex.completion) == 0 and len(ex.prompt) == prompt_len and report.truncated == 0
    [ex], report = tokenize.encode_decoder_examples(
        [LONG], tok, K, prompt_len - 4, with_completion=False
    )
    assert ex.prompt.tolist()[-len(p[6]) - len(p[5]) + 4 :] == p[5][:-4] + p[6]
    assert report.truncated_input == 1
    skeleton = 1 + sum(len(p[i]) for i in (0, 2, 3, 4, 6))
    kept, report = tokenize.encode_decoder_examples(
        [LONG], tok, K, skeleton - 1, with_completion=False
    )
    assert kept == [] and report.dropped_too_long == 1


def test_counts_over_a_list(smollm2_tokenizer):
    tok = smollm2_tokenizer
    short = {"instruction": "Say hi.", "input": "", "output": "hi"}
    huge_output = dict(LONG, output=" ".join(["word"] * 400))
    examples = [short, LONG, huge_output, short]
    p, completion = _piece_ids(tok, LONG)
    limit = 1 + sum(map(len, p)) + len(completion) - 3
    kept, report = tokenize.encode_decoder_examples(examples, tok, K, limit)
    assert [ex.index for ex in kept] == [0, 1, 2, 3]
    assert all(ex.length <= limit for ex in kept)
    # LONG: input cut. huge_output: input and instruction emptied, completion cut.
    assert report.summary() == (
        "4 examples: kept 4, truncated 2 (input 2, instruction 1, completion 1), "
        "dropped as too long 0"
    )
    kept, report = tokenize.encode_decoder_examples(examples, tok, K, 12)
    assert [ex.index for ex in kept] == [0, 3]
    assert (report.kept, report.dropped_too_long, report.dropped_indices) == (2, 2, [1, 2])
    # The short examples lost instruction tokens; the dropped ones would have lost input
    # tokens first, but dropped examples are not counted as truncated.
    assert (report.truncated, report.truncated_instruction, report.truncated_input) == (2, 2, 0)
    assert all(ex.length == 12 for ex in kept)


def test_encdec_truncation(t5_tokenizer):
    tok = t5_tokenizer
    encoder = tokenize.PieceEncoder(tok)
    p = encoder.encode_many([templates.encoder_source_pieces(LONG, K)])[0]
    target = encoder.encode_many([templates.encoder_target_pieces(LONG)])[0][0]
    target = [*target, tok.eos_token_id]
    eos = [tok.eos_token_id]
    source_len = sum(map(len, p)) + 1

    def encode(max_source, max_target):
        kept, report = tokenize.encode_encdec_examples([LONG], tok, K, max_source, max_target)
        return (kept[0] if kept else None), report

    ex, report = encode(source_len, len(target))
    assert ex.source.tolist() == _flat(p) + eos and ex.target.tolist() == target
    assert report.truncated == 0
    ex, report = encode(source_len - len(p[5]) - 2, len(target) - 3)
    assert ex.source.tolist() == p[0] + p[1][:-2] + _flat(p[2:5]) + eos
    assert ex.target.tolist() == target[:-3]
    assert (report.truncated_input, report.truncated_instruction) == (1, 1)
    assert report.truncated_completion == 1 and report.truncated == 1
    gist_id = tok.convert_tokens_to_ids(GIST_TOKEN)
    assert ex.source[ex.gist_first : ex.gist_last + 1].tolist() == [gist_id] * K
    skeleton = sum(len(p[i]) for i in (0, 2, 3, 4)) + 1
    ex, report = encode(skeleton, 4)
    assert ex.source.tolist() == p[0] + p[2] + p[3] + p[4] + eos
    ex, report = encode(skeleton - 1, 4)
    assert ex is None and report.dropped_indices == [0]
    with pytest.raises(ValueError, match="max_target_length must be >= 1"):
        tokenize.encode_encdec_examples([LONG], tok, K, 64, 0)


def test_arrays_are_int32(smollm2_tokenizer):
    [ex], _ = tokenize.encode_decoder_examples([LONG], smollm2_tokenizer, K, 512)
    assert ex.prompt.dtype == np.int32 and ex.completion.dtype == np.int32
