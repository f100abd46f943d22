"""``gist-generate``: generate from a compressed instruction.

    gist-generate --checkpoint=CKPT --instruction="Translate to French." --input="Good morning"
    gist-generate --checkpoint=CKPT --store=STORE --prompt_id=KEY --inputs_file=inputs.jsonl

The instruction is either given as text (compressed on the fly) or as the key of a prompt
compressed earlier with ``gist-compress`` (then only its k gist tokens' keys/values are read
from the store; the store must belong to this model). Inputs come from ``--input`` or,
many at once, from ``--inputs_file`` (JSON lines: ``{"input": "..."}`` or bare strings; an
object may also carry its own ``"instruction"`` or ``"prompt_id"``). Decoding is greedy
unless ``--temperature`` > 0 (with optional ``--top_k`` / ``--top_p``). Outputs are printed,
one per line, or written as JSON lines to ``--output``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

from gist_jax import model_loading
from gist_jax.cli.entry import run_app
from gist_jax.inference import gist_cache, programs
from gist_jax.inference import store as gist_store
from gist_tools import prompts as prompts_lib


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation: an instruction (text) or a stored prompt key, and an input."""

    input: str = ""
    instruction: str | None = None
    prompt_id: str | None = None

    def __post_init__(self) -> None:
        if (self.instruction is None) == (self.prompt_id is None):
            raise ValueError("a request needs exactly one of instruction / prompt_id")


def read_requests(
    path: str | os.PathLike, instruction: str | None, prompt_id: str | None
) -> list[Request]:
    """Requests from a JSON lines file; lines without their own instruction / prompt_id
    use the command line's."""
    out = []
    for number, value in prompts_lib.json_lines(path):
        if isinstance(value, str):
            value = {"input": value}
        if not isinstance(value, dict) or not isinstance(value.get("input", ""), str):
            raise ValueError(f"{path}:{number}: expected a string or an object with 'input'")
        own_ins, own_id = value.get("instruction"), value.get("prompt_id")
        if own_ins is None and own_id is None:
            own_ins, own_id = instruction, prompt_id
        try:
            out.append(Request(value.get("input", ""), own_ins, own_id))
        except ValueError as err:
            raise ValueError(f"{path}:{number}: {err}") from err
    if not out:
        raise ValueError(f"{path}: no inputs")
    return out


def generate_texts(
    config: Any,
    params: Any,
    tokenizer: Any,
    requests: Sequence[Request],
    store_dir: str | os.PathLike | None = None,
    num_gist: int | None = None,
    max_new_tokens: int = 128,
    sampling: programs.SamplingConfig | None = None,
    seed: int = 0,
    batch_size: int = 16,
    max_length: int = 512,
) -> list[str]:
    """Generate one text per request from the gist cache of its instruction.

    Stored prompts are read from ``store_dir`` (which fixes k); instructions given as text
    are compressed here (each distinct one once) with ``num_gist`` tokens (default: the
    store's k, else 1).
    """
    store = None
    if any(r.prompt_id is not None for r in requests):
        if store_dir is None:
            raise ValueError("requests name stored prompt ids but no store was given")
        store = gist_store.GistStore.open(
            store_dir, config, params, num_gist=num_gist, create=False
        )
        num_gist = store.info.num_gist
    num_gist = num_gist or 1
    texts = list(dict.fromkeys(r.instruction for r in requests if r.instruction is not None))
    fresh = None
    if texts:
        prompts = prompts_lib.instruction_prompts(config, tokenizer, texts, num_gist, max_length)
        fresh = gist_cache.compress(config, params, prompts, batch_size=batch_size).to_numpy()
    keys = list(dict.fromkeys(r.prompt_id for r in requests if r.prompt_id is not None))
    stored = store.get(keys) if keys else None
    # One cache: the fresh rows, then the stored ones; each request points at its row.
    caches = [c for c in (fresh, stored) if c is not None]
    cache = gist_cache.GistCache.concatenate(caches)
    rows = [
        texts.index(r.instruction)
        if r.instruction is not None
        else len(texts) + keys.index(r.prompt_id)
        for r in requests
    ]
    inputs = prompts_lib.input_tokens(
        config, tokenizer, [r.input for r in requests], num_gist, max_length
    )
    outputs = gist_cache.generate(
        config,
        params,
        cache.take(rows),
        inputs,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        seed=seed,
        batch_size=batch_size,
    )
    return [tokenizer.decode(o.tokens, skip_special_tokens=True).strip() for o in outputs]


def main(argv: Sequence[str], flag_values: Any = None) -> None:
    """Run with parsed flags (``flag_values``: absl's global ``FLAGS`` by default)."""
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flag_values if flag_values is not None else flags.FLAGS
    if f.inputs_file:
        requests = read_requests(f.inputs_file, f.instruction, f.prompt_id)
    else:
        if (f.instruction is None) == (f.prompt_id is None):
            raise app.UsageError("give exactly one of --instruction / --prompt_id")
        requests = [Request(f.input, f.instruction, f.prompt_id)]
    sampling = programs.SamplingConfig(f.temperature, f.top_k, f.top_p)
    config, params, tokenizer = model_loading.load_converted(f.checkpoint)
    outputs = generate_texts(
        config,
        params,
        tokenizer,
        requests,
        store_dir=f.store,
        num_gist=f.num_gist_tokens,
        max_new_tokens=f.max_new_tokens,
        sampling=sampling,
        seed=f.seed,
        batch_size=f.batch_size,
        max_length=f.max_length,
    )
    if f.output:
        lines = [
            json.dumps({**dataclasses.asdict(r), "output": o}, ensure_ascii=False)
            for r, o in zip(requests, outputs, strict=True)
        ]
        pathlib.Path(f.output).write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        for text in outputs:
            print(text)


def define_flags(flag_values: Any = None) -> None:
    """Define this command's flags (in ``flag_values``, default absl's global ``FLAGS``)."""
    from absl import flags

    fv = flag_values if flag_values is not None else flags.FLAGS
    flags.DEFINE_string(
        "checkpoint", "default", "Converted checkpoint dir, or 'default'.", flag_values=fv
    )
    flags.DEFINE_string(
        "instruction", None, "Instruction text (compressed on the fly).", flag_values=fv
    )
    flags.DEFINE_string(
        "prompt_id", None, "Key of a prompt in --store (from gist-compress).", flag_values=fv
    )
    flags.DEFINE_string("store", None, "Gist store directory.", flag_values=fv)
    flags.DEFINE_string("input", "", "Input text for the instruction.", flag_values=fv)
    flags.DEFINE_string("inputs_file", None, "JSON lines of inputs (many at once).", flag_values=fv)
    flags.DEFINE_string(
        "output", None, "Write JSON lines here instead of printing.", flag_values=fv
    )
    flags.DEFINE_integer(
        "num_gist_tokens", None, "k (default: the store's, else 1).", flag_values=fv
    )
    flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate per input.", flag_values=fv)
    flags.DEFINE_float("temperature", 0.0, "0 = greedy.", flag_values=fv)
    flags.DEFINE_integer(
        "top_k", 0, "Sample among the k most likely tokens (0 = all).", flag_values=fv
    )
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 16, "Inputs per compiled call.", flag_values=fv)
    flags.DEFINE_integer("max_length", 512, "Token limit of a templated prompt.", flag_values=fv)


def run() -> None:
    """Console script entry point (``gist-generate``)."""
    define_flags()
    run_app(main, "gist-generate")


if __name__ == "__main__":
    run()
