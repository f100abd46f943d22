"""Templates and tokenisation: the paper's strings literally, the pieces matching them,
gist tokens inserted by id (never produced from user text), and tokenizer coverage
(SmolLM2 byte-level BPE, T5 unigram, LLaMA-style sentencepiece BPE)."""

from __future__ import annotations

import itertools

import fixtures_data
import pytest

from gist_jax.data import templates, tokenize

smollm2_tokenizer = fixtures_data.smollm2_tokenizer
t5_tokenizer = fixtures_data.t5_tokenizer
llama_spm_tokenizer = fixtures_data.llama_spm_tokenizer
make_t5_tokenizer = fixtures_data.make_t5_tokenizer

TRANSLATE = {"instruction": "Translate to French.", "input": "Hello", "output": "Bonjour"}
COLOR = {"instruction": "Name a color.", "input": "", "output": "Red"}
# User text that spells the gist token in every field.
SNEAKY = {
    "instruction": "Repeat <GIST> exactly.",
    "input": "<GIST><GIST>",
    "output": "<GIST> done",
}
TOKENIZERS = ["smollm2_tokenizer", "t5_tokenizer", "llama_spm_tokenizer"]


def test_decoder_template_strings():
    assert templates.decoder_prompt_text("Translate to French.", "Hello", 2) == (
        "Instruction: Translate to French.\n<GIST> <GIST>\nInput: Hello\nOutput:"
    )
    assert templates.decoder_prompt_text("Name a color.", "", 1) == (
        "Instruction: Name a color.\n<GIST>\nOutput:"
    )
    # k = 0: the same f-string with an empty gist line.
    assert templates.decoder_prompt_text("Name a color.", "", 0) == (
        "Instruction: Name a color.\n\nOutput:"
    )


def test_encoder_template_strings():
    assert templates.encoder_source_text("Translate to French.", "Hello", 2) == (
        "Instruction: Translate to French.\n<GIST><GIST>\nInput: Hello"
    )
    assert templates.encoder_source_text("Name a color.", "", 1) == (
        "Instruction: Name a color.\n<GIST>"
    )
    assert templates.encoder_source_text("Name a color.", "x", 0) == (
        "Instruction: Name a color.\n\nInput: x"
    )


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("example", [TRANSLATE, COLOR, SNEAKY])
def test_pieces_render_to_the_paper_templates(example, k):
    instruction, input_ = example["instruction"], example["input"]
    prompt = templates.decoder_prompt_pieces(example, k)
    completion = templates.decoder_completion_pieces(example)
    assert templates.render(prompt, " ") == templates.decoder_prompt_text(instruction, input_, k)
    assert templates.render(completion, " ") == " " + example["output"]
    source = templates.encoder_source_pieces(example, k)
    assert templates.render(source, "") == templates.encoder_source_text(instruction, input_, k)
    assert templates.render(templates.encoder_target_pieces(example), "") == example["output"]
    assert [p.num_gist for p in prompt if p.role == "gist"] == ([k] if k else [])


def test_smollm2_worked_example(smollm2_tokenizer):
    tok = smollm2_tokenizer
    [ex], report = tokenize.encode_decoder_examples([TRANSLATE], tok, 2, 512)
    assert report.kept == 1 and report.truncated == 0
    text = tok.decode(ex.tokens.tolist())
    assert text == (
        "<|im_start|>Instruction: Translate to French.\n<GIST><GIST>\nInput: Hello\n"
        "Output: Bonjour<|im_end|>"
    )
    assert tok.decode(ex.completion.tolist()) == " Bonjour<|im_end|>"
    gist_id = tok.convert_tokens_to_ids(templates.GIST_TOKEN)
    assert ex.prompt[ex.gist_first : ex.gist_last + 1].tolist() == [gist_id, gist_id]
    assert ex.prompt[0] == tok.bos_token_id and ex.completion[-1] == tok.eos_token_id


@pytest.mark.parametrize("k", [0, 1, 4])
@pytest.mark.parametrize("example", [TRANSLATE, COLOR])
def test_smollm2_pieces_equal_joint_tokenisation(smollm2_tokenizer, example, k):
    """For a byte-level BPE tokenizer the piecewise ids are exactly those of the paper's
    string (gist tokens written contiguously, "<GIST>" parsed as the special token)."""
    tok = smollm2_tokenizer
    [ex], _ = tokenize.encode_decoder_examples([example], tok, k, 512)
    text = templates.decoder_prompt_text(example["instruction"], example["input"], k)
    text = (
        text.replace(" ".join([templates.GIST_TOKEN] * k), templates.GIST_TOKEN * k) if k else text
    )
    joint = tok(text + " " + example["output"], add_special_tokens=False)["input_ids"]
    assert ex.tokens[1:-1].tolist() == joint


@pytest.mark.parametrize("tokenizer_name", TOKENIZERS)
@pytest.mark.parametrize("k", [0, 1, 3])
def test_literal_gist_text_never_becomes_the_gist_token(request, tokenizer_name, k):
    tok = request.getfixturevalue(tokenizer_name)
    gist_id = tok.convert_tokens_to_ids(templates.GIST_TOKEN)
    [dec], _ = tokenize.encode_decoder_examples([SNEAKY], tok, k, 512)
    [encdec], _ = tokenize.encode_encdec_examples([SNEAKY], tok, k, 512, 512)
    for ids, first, last in [
        (dec.tokens, dec.gist_first, dec.gist_last),
        (encdec.source, encdec.gist_first, encdec.gist_last),
    ]:
        where = [i for i, t in enumerate(ids.tolist()) if t == gist_id]
        assert where == list(range(first, last + 1)) if k else where == []
        assert len(where) == k
        if not k:
            assert (first, last) == (-1, -1)
    assert gist_id not in encdec.target.tolist()
    # The user text survives as ordinary tokens.
    assert "<GIST> done" in tok.decode(dec.completion.tolist())


@pytest.mark.parametrize("tokenizer_name", TOKENIZERS)
def test_gist_span_positions(request, tokenizer_name):
    tok = request.getfixturevalue(tokenizer_name)
    encoder = tokenize.PieceEncoder(tok)
    ids = encoder.encode_many([templates.decoder_prompt_pieces(TRANSLATE, 3)])[0]
    [ex], _ = tokenize.encode_decoder_examples([TRANSLATE], tok, 3, 512)
    bos = 1 if tok.bos_token_id is not None else 0
    # Pieces: "Instruction:", instruction, "\n", gist, "\nInput:", input, "\nOutput:".
    assert ex.gist_first == bos + len(ids[0]) + len(ids[1]) + len(ids[2])
    assert ex.gist_last == ex.gist_first + 2
    assert ex.prompt.tolist() == [tok.bos_token_id] * bos + [t for part in ids for t in part]
    [s], _ = tokenize.encode_encdec_examples([TRANSLATE], tok, 3, 512, 512)
    assert s.gist_first == len(ids[0]) + len(ids[1]) + len(ids[2])
    assert s.source[-1] == tok.eos_token_id and s.target[-1] == tok.eos_token_id


def test_sentencepiece_continuation_has_no_stray_space(llama_spm_tokenizer):
    """A dummy-prefix tokenizer would put "▁" before "\\nInput:"; the encoder removes it,
    so the newline follows the gist token directly, as in the joined text."""
    tok = llama_spm_tokenizer
    [ex], _ = tokenize.encode_decoder_examples([TRANSLATE], tok, 1, 512)
    pieces = tok.convert_ids_to_tokens(ex.tokens.tolist())
    gist = pieces.index(templates.GIST_TOKEN)
    assert pieces[gist + 1 : gist + 4] == ["\n", "Input", ":"]
    assert all(not (a == "\u2581" and b == "\n") for a, b in itertools.pairwise(pieces))
    # The completion carries the space after "Output:" as the dummy prefix.
    assert tok.convert_ids_to_tokens(ex.completion.tolist())[0].startswith("\u2581")


def test_dummy_prefix_detection(smollm2_tokenizer, t5_tokenizer, llama_spm_tokenizer):
    assert not tokenize.PieceEncoder(smollm2_tokenizer).dummy_prefix
    assert tokenize.PieceEncoder(t5_tokenizer).dummy_prefix
    assert tokenize.PieceEncoder(llama_spm_tokenizer).dummy_prefix


def test_tokenizer_without_gist_token_is_rejected():
    with pytest.raises(tokenize.GistTokenError, match="tokenizer has no <GIST> token"):
        tokenize.encode_encdec_examples([TRANSLATE], make_t5_tokenizer(with_gist=False), 1, 64, 64)


class _ParsingTokenizer:
    """A tokenizer that ignores ``split_special_tokens`` (parses "<GIST>" in text), to
    prove the leak check fires."""

    def __init__(self, inner):
        self._inner = inner

    def __call__(self, texts, **kwargs):
        kwargs["split_special_tokens"] = False
        return self._inner(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def test_leak_check_fires_when_user_text_becomes_gist(smollm2_tokenizer):
    leaky = _ParsingTokenizer(smollm2_tokenizer)
    tokenize.encode_decoder_examples([TRANSLATE], leaky, 1, 512)  # no literal: fine
    with pytest.raises(RuntimeError, match=r"turned instruction text 'Repeat <GIST> exactly\.'"):
        tokenize.encode_decoder_examples([SNEAKY], leaky, 1, 512)


def test_negative_gist_count_is_rejected(smollm2_tokenizer):
    with pytest.raises(ValueError, match="num_gist must be >= 0"):
        tokenize.encode_decoder_examples([TRANSLATE], smollm2_tokenizer, -1, 512)
