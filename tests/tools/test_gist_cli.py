"""``gist-compress`` and ``gist-generate`` on a tiny converted checkpoint (random LLaMA with
the synthetic BPE tokenizer): generating from a stored prompt id equals generating from the
instruction text, which equals the full gist-masked decode of the templated example; the
commands run end to end; bad input gets clear errors."""

from __future__ import annotations

import json
import pathlib

import jax
import pytest

from gist_jax import model_loading, tiny_tokenizer
from gist_jax.convert import common
from gist_jax.data import tokenize
from gist_jax.inference import decode
from gist_jax.inference import store as gist_store
from gist_jax.models import llama
from gist_jax.models.family import LLAMA
from gist_tools import gist_compress, gist_generate
from gist_tools import prompts as prompts_lib

REPO = pathlib.Path(__file__).resolve().parents[2]
INSTRUCTIONS = ["Reverse the order of the words.", "Give the number of items in the list."]
INPUTS = ["quick brown fox", "apple, pear, plum, fig", ""]
MAX_NEW = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> pathlib.Path:
    tokenizer = tiny_tokenizer.synthetic_bpe(512)
    config = llama.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        gist_token_id=tokenize.gist_token_id_of(tokenizer),
    )
    params = LLAMA.init_params(config, jax.random.key(0))
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    common.save_converted(out, params, config.to_dict(), tokenizer)
    return out


def _requests_full(model, instruction: str, inputs: list[str]) -> list[str]:
    """Reference: the full templated examples decoded under the gist mask."""
    from gist_jax import data

    config, params, tokenizer = model
    examples = [{"instruction": instruction, "input": x, "output": ""} for x in inputs]
    encoded, _ = data.encode_decoder_examples(examples, tokenizer, 1, 512, with_completion=False)
    out = decode.generate(
        config, params, [e.prompt.tolist() for e in encoded], max_new_tokens=MAX_NEW, batch_size=4
    )
    return [tokenizer.decode(g.tokens, skip_special_tokens=True).strip() for g in out]


def test_stored_prompt_equals_instruction_equals_full_decode(checkpoint, tmp_path):
    model = model_loading.load_converted(checkpoint)
    config, params, tokenizer = model
    summary = gist_compress.compress_instructions(
        config, params, tokenizer, INSTRUCTIONS, tmp_path / "store", batch_size=4
    )
    assert [e.instruction for e in summary.entries] == INSTRUCTIONS
    assert summary.gist_bytes_per_prompt == 2 * 2 * 2 * 16 * 4  # k*layers*2*kv_heads*head_dim*4
    assert summary.mean_prompt_tokens > 5
    key = summary.entries[1].key
    by_id = gist_generate.generate_texts(
        config,
        params,
        tokenizer,
        [gist_generate.Request(x, prompt_id=key) for x in INPUTS],
        store_dir=tmp_path / "store",
        max_new_tokens=MAX_NEW,
        batch_size=4,
    )
    by_text = gist_generate.generate_texts(
        config,
        params,
        tokenizer,
        [gist_generate.Request(x, instruction=INSTRUCTIONS[1]) for x in INPUTS],
        max_new_tokens=MAX_NEW,
        batch_size=4,
    )
    assert by_id == by_text == _requests_full(model, INSTRUCTIONS[1], INPUTS)
    assert any(by_id)  # a random model still produces some text


def test_bad_input(checkpoint, tmp_path):
    config, params, tokenizer = model_loading.load_converted(checkpoint)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "ok"}\n{"text": "no instruction key"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: object has no 'instruction' key"):
        gist_compress.read_instructions(bad)
    bad.write_text('{"input": "x"\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: not valid JSON"):
        gist_generate.read_requests(bad, "i", None)
    with pytest.raises(ValueError, match="exactly one of instruction / prompt_id"):
        gist_generate.Request("x")
    with pytest.raises(ValueError, match="no store was given"):
        gist_generate.generate_texts(
            config, params, tokenizer, [gist_generate.Request("x", prompt_id="ab")]
        )
    with pytest.raises(ValueError, match="instruction 0 is empty"):
        prompts_lib.instruction_prompts(config, tokenizer, ["  "], 1, 64)
    # A store written by another model is refused.
    other = jax.tree.map(lambda x: x * 1.5, params)
    gist_compress.compress_instructions(config, other, tokenizer, INSTRUCTIONS[:1], tmp_path / "s")
    with pytest.raises(gist_store.StoreMismatchError, match="different model"):
        gist_compress.compress_instructions(config, params, tokenizer, INSTRUCTIONS, tmp_path / "s")


def _main(module, *args: str) -> None:
    """Run a command's ``main`` in-process with its own flag set (as ``run()`` would,
    without touching absl's global flags)."""
    from absl import flags

    fv = flags.FlagValues()
    module.define_flags(fv)
    argv = fv(["prog", *args])
    module.main(argv, fv)


def test_commands_end_to_end(checkpoint, tmp_path, capsys):
    prompts = tmp_path / "instructions.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": t}) + "\n" for t in INSTRUCTIONS))
    store = tmp_path / "store"
    _main(
        gist_compress,
        f"--checkpoint={checkpoint}",
        f"--prompts={prompts}",
        f"--store={store}",
        "--batch_size=4",
    )
    stdout = capsys.readouterr().out
    assert "bytes per prompt" in stdout
    keys = [line.split("\t")[0] for line in stdout.splitlines() if "\t" in line]
    assert len(keys) == 2 and all(k in gist_store.GistStore.read(store) for k in keys)

    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text(
        json.dumps({"input": INPUTS[0]})
        + "\n"
        + json.dumps(INPUTS[1])
        + "\n"
        + json.dumps({"input": INPUTS[0], "instruction": INSTRUCTIONS[1]})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    common_args = [f"--checkpoint={checkpoint}", f"--max_new_tokens={MAX_NEW}", "--batch_size=4"]
    _main(
        gist_generate,
        *common_args,
        f"--store={store}",
        f"--prompt_id={keys[1]}",
        f"--inputs_file={inputs}",
        f"--output={out}",
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_id"] for r in rows] == [keys[1], keys[1], None]
    # The same instruction, by stored id and by text, gives the same output.
    assert rows[0]["output"] == rows[2]["output"]
    # One instruction and one input on the command line: the text is printed.
    _main(gist_generate, *common_args, f"--instruction={INSTRUCTIONS[1]}", f"--input={INPUTS[0]}")
    assert capsys.readouterr().out.strip() == rows[0]["output"]


def test_console_scripts_are_declared():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    scripts = cfg["options.entry_points"]["console_scripts"]
    for name, target in [
        ("gist-compress", "gist_tools.gist_compress:run"),
        ("gist-generate", "gist_tools.gist_generate:run"),
        ("gist-eval", "gist_jax.evaluate:run"),
    ]:
        assert f"{name} = {target}" in scripts
