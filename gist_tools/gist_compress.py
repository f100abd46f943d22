"""``gist-compress``: compress instructions once into a gist cache store.

    gist-compress --checkpoint=CKPT_DIR --prompts=instructions.jsonl --store=STORE_DIR \\
        [--num_gist_tokens=1] [--batch_size=16] [--max_length=512]

``--prompts`` is JSON lines, one instruction per line: ``{"instruction": "..."}`` (extra
keys ignored) or a bare JSON string. Each instruction is templated as in training, run
once, and its k gist tokens' keys/values are saved in the store (``gist_jax.inference.store``),
keyed by the prompt's token ids and the model. Prompts already in the store are skipped.
Prints one line per instruction (key, prompt tokens, text) and the bytes per cached
prompt against caching the whole prompt.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence
from typing import Any

from gist_jax import model_loading
from gist_jax.cli.entry import run_app
from gist_jax.inference import store as gist_store
from gist_jax.models.family import family_of
from gist_tools import prompts as prompts_lib


@dataclasses.dataclass
class CompressedInstruction:
    key: str
    instruction: str
    prompt_tokens: int  # tokens before the gist tokens


@dataclasses.dataclass
class CompressSummary:
    store: pathlib.Path
    entries: list[CompressedInstruction]
    num_gist: int
    gist_bytes_per_prompt: float
    mean_prompt_tokens: float
    prompt_bytes_per_prompt: float  # an ordinary prompt cache of the mean prompt length


def read_instructions(path: str | os.PathLike) -> list[str]:
    """Instructions from a JSON lines file (objects with "instruction", or strings)."""
    out = []
    for number, value in prompts_lib.json_lines(path):
        if isinstance(value, dict):
            if "instruction" not in value:
                raise ValueError(f"{path}:{number}: object has no 'instruction' key")
            value = value["instruction"]
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{path}:{number}: instruction must be a non-empty string")
        out.append(value)
    if not out:
        raise ValueError(f"{path}: no instructions")
    return out


def compress_instructions(
    config: Any,
    params: Any,
    tokenizer: Any,
    instructions: Sequence[str],
    store_dir: str | os.PathLike,
    num_gist: int = 1,
    batch_size: int = 16,
    max_length: int = 512,
) -> CompressSummary:
    """Compress ``instructions`` into the store at ``store_dir`` (created if needed; must
    belong to this model otherwise)."""
    store = gist_store.GistStore.open(store_dir, config, params, num_gist=num_gist)
    prompts = prompts_lib.instruction_prompts(config, tokenizer, instructions, num_gist, max_length)
    keys = store.add(config, params, prompts, texts=list(instructions), batch_size=batch_size)
    entries = [
        CompressedInstruction(key, text, len(prompt) - num_gist)
        for key, text, prompt in zip(keys, instructions, prompts, strict=True)
    ]
    mean_prompt = sum(e.prompt_tokens for e in entries) / len(entries)
    return CompressSummary(
        store=pathlib.Path(store_dir),
        entries=entries,
        num_gist=num_gist,
        gist_bytes_per_prompt=family_of(config).cache_bytes(config, num_gist),
        mean_prompt_tokens=mean_prompt,
        prompt_bytes_per_prompt=family_of(config).cache_bytes(config, mean_prompt),
    )


def main(argv: Sequence[str], flag_values: Any = None) -> None:
    """Run with parsed flags (``flag_values``: absl's global ``FLAGS`` by default)."""
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flag_values if flag_values is not None else flags.FLAGS
    config, params, tokenizer = model_loading.load_converted(f.checkpoint)
    summary = compress_instructions(
        config,
        params,
        tokenizer,
        read_instructions(f.prompts),
        f.store,
        num_gist=f.num_gist_tokens,
        batch_size=f.batch_size,
        max_length=f.max_length,
    )
    for e in summary.entries:
        print(f"{e.key}\t{e.prompt_tokens} tokens\t{e.instruction[:70]}")
    print(
        f"{len(summary.entries)} prompts in {summary.store}: {summary.num_gist} gist token(s) = "
        f"{summary.gist_bytes_per_prompt:,.0f} bytes per prompt, vs "
        f"{summary.prompt_bytes_per_prompt:,.0f} bytes to cache a whole prompt "
        f"(mean {summary.mean_prompt_tokens:.1f} tokens)"
    )


def define_flags(flag_values: Any = None) -> None:
    """Define this command's flags (in ``flag_values``, default absl's global ``FLAGS``)."""
    from absl import flags

    fv = flag_values if flag_values is not None else flags.FLAGS
    flags.DEFINE_string(
        "checkpoint", "default", "Converted checkpoint dir, or 'default'.", flag_values=fv
    )
    flags.DEFINE_string("prompts", None, "JSON lines file of instructions.", flag_values=fv)
    flags.DEFINE_string("store", None, "Gist store directory (created if missing).", flag_values=fv)
    flags.DEFINE_integer(
        "num_gist_tokens", 1, "k: gist tokens the model was trained with.", flag_values=fv
    )
    flags.DEFINE_integer("batch_size", 16, "Prompts per compiled call.", flag_values=fv)
    flags.DEFINE_integer(
        "max_length", 512, "Prompt token limit (instruction text is cut).", flag_values=fv
    )
    flags.mark_flags_as_required(["prompts", "store"], flag_values=fv)


def run() -> None:
    """Console script entry point (``gist-compress``)."""
    define_flags()
    run_app(main, "gist-compress")


if __name__ == "__main__":
    run()
