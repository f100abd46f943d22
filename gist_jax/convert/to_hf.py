"""gist_jax converted checkpoint -> Hugging Face model directory, for any registered family.

``convert_to_hf`` loads the checkpoint through ``gist_jax.convert.loading`` (which checks the
params against ``model_config.json``), maps params to an HF state dict with the family's
conversion module, and writes ``config.json``, ``model.safetensors`` (numpy, no torch),
``generation_config.json`` and the tokenizer (with ``<GIST>``) atomically, ready for
``transformers`` ``from_pretrained`` (plus ``common.GIST_ADAPTER_FILE`` for a model with a
gist adapter, which ``gist_tools.hf_gist_cache`` applies). The CLI is a thin wrapper::

    python -m gist_jax.convert.to_hf --ckpt_dir=CKPT --out_dir=DIR [--overwrite]
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

from gist_jax import files
from gist_jax.cli.entry import run_app
from gist_jax.convert import common, loading
from gist_jax.models.family import family_of

# Shard size above which model.safetensors is split (as transformers does, with an index).
MAX_SHARD_BYTES = 5 * 2**30

# Token ids that transformers' GenerationConfig takes from the model config.
_GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def generation_config(hf_config: dict[str, Any]) -> dict[str, Any] | None:
    """A minimal ``generation_config.json`` (the special token ids), or None if none are set."""
    ids = {k: hf_config[k] for k in _GENERATION_KEYS if hf_config.get(k) is not None}
    return ids or None


def write_weights(
    tensors: dict[str, Any], directory: pathlib.Path, max_shard_bytes: int = MAX_SHARD_BYTES
) -> list[str]:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards plus
    ``model.safetensors.index.json`` when the tensors exceed ``max_shard_bytes``."""
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        common.write_safetensors(shards[0], directory / "model.safetensors")
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        common.write_safetensors(shard, directory / name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.nbytes for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def write_hf_dir(
    out_dir: str | os.PathLike,
    hf_config: dict[str, Any],
    tensors: dict[str, Any],
    tokenizer: Any | None,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    extra_weights: dict[str, dict[str, Any]] | None = None,
) -> pathlib.Path:
    """Write an HF model directory atomically (config, safetensors, generation config,
    tokenizer; ``extra_weights``: file name -> tensors that transformers does not load).
    Shared by ``convert_to_hf`` and the bundled default model."""
    import transformers

    hf_config = {**hf_config, "transformers_version": transformers.__version__}
    with files.atomic_directory(out_dir, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        write_weights(tensors, tmp, max_shard_bytes)
        for name, extra in (extra_weights or {}).items():
            common.write_safetensors(extra, tmp / name)
        generation = generation_config(hf_config)
        if generation is not None:
            generation["transformers_version"] = transformers.__version__
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return pathlib.Path(out_dir)


def convert_to_hf(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> pathlib.Path:
    """Export a gist_jax checkpoint as an HF model directory at ``out_dir`` (float32
    weights, sharded above ``max_shard_bytes``).

    Raises ``ConversionError`` when the checkpoint is not one, or when its
    ``model_config.json`` does not describe its params (naming the leaves that differ).
    """
    out = pathlib.Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    config, params, tokenizer = loading.load_checkpoint(ckpt_dir)
    convert = family_of(config).conversion
    hf_config = convert.config_to_hf(config)
    tensors = convert.params_to_hf(params, config)
    extra = {}
    if getattr(config, "gist_adapter_rank", 0):
        extra[common.GIST_ADAPTER_FILE] = convert.adapter_to_hf(params, config)
    return write_hf_dir(out_dir, hf_config, tensors, tokenizer, overwrite, max_shard_bytes, extra)


def main(argv: Sequence[str]) -> None:
    from absl import flags

    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    out = convert_to_hf(f.ckpt_dir, f.out_dir, overwrite=f.overwrite)
    print(f"wrote {out}")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("ckpt_dir", None, "gist_jax converted checkpoint directory.")
    flags.DEFINE_string("out_dir", None, "Output Hugging Face model directory.")
    flags.DEFINE_bool("overwrite", False, "Replace out_dir if it exists.")
    flags.mark_flags_as_required(["ckpt_dir", "out_dir"])


def run() -> None:
    _define_flags()
    run_app(main, "gist-convert-to-hf")


if __name__ == "__main__":
    run()
