"""Pieces every model family's conversion shares: reading an HF directory (config.json and
safetensors, sharded or not, without torch), writing safetensors, adding the ``<GIST>``
token (tokenizer entry plus mean-initialised embedding rows), and the gist_jax converted
checkpoint directory itself.

A converted checkpoint directory (what ``from_hf`` writes, ``to_hf`` and training read)::

    OUT/
      model_config.json   {"model_type": "llama" | "t5", ..., "gist_token_id": int}
      params/             orbax checkpoint of the params pytree (plain nested dict)
      tokenizer/          HF tokenizer files, ``<GIST>`` added as one special token

Directories are written under a temporary name and renamed into place, so a crash never
leaves an ``OUT`` that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np

from gist_jax import files
from gist_jax.data.templates import GIST_TOKEN

MODEL_CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"


# Beside an HF export's model.safetensors: the gist adapter's tensors (LLaMA family), which
# transformers' classes have no place for; gist_tools.hf_gist_cache applies them.
GIST_ADAPTER_FILE = "gist_adapter.safetensors"


class ConversionError(ValueError):
    """A checkpoint or HF directory that cannot be converted; the message names the cause."""


def read_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of an HF model directory."""
    path = pathlib.Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir}: no config.json (is this a Hugging Face model directory?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: not valid JSON ({err})") from err


def _safetensors_files(hf_dir: pathlib.Path) -> list[pathlib.Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (hf_dir / n).is_file()]
        if missing:
            raise ConversionError(f"{index}: lists shard(s) that do not exist: {missing}")
        return [hf_dir / n for n in names]
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(p for p in hf_dir.glob("*.safetensors") if p.name != GIST_ADAPTER_FILE)
    if found:
        return found
    raise ConversionError(f"{hf_dir}: no *.safetensors weights (pytorch_model.bin is not read)")


def read_safetensors(hf_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of an HF directory as numpy arrays (bfloat16/float16 become float32)."""
    from safetensors.numpy import load_file

    tensors: dict[str, np.ndarray] = {}
    for path in _safetensors_files(pathlib.Path(hf_dir)):
        try:
            loaded = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for bad files
            raise ConversionError(f"{path}: cannot read safetensors file ({err})") from err
        for name, array in loaded.items():
            if array.dtype != np.float32 and np.issubdtype(array.dtype, np.floating):
                array = array.astype(np.float32)
            tensors[name] = array
    return tensors


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write numpy tensors to one safetensors file (contiguous copies, torch not needed)."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))


def take_tensor(tensors: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    """``tensors[name]``, checked against the expected shape; errors name both."""
    if name not in tensors:
        raise ConversionError(f"missing tensor {name!r} (expected shape {shape})")
    array = tensors[name]
    if tuple(array.shape) != tuple(shape):
        raise ConversionError(
            f"tensor {name!r} has shape {tuple(array.shape)}, expected {tuple(shape)}"
        )
    return array


def append_mean_row(matrix: np.ndarray) -> np.ndarray:
    """``[V, D] -> [V + 1, D]``: the new (gist) row is the mean of the existing rows."""
    mean = matrix.astype(np.float64).mean(axis=0, keepdims=True).astype(matrix.dtype)
    return np.concatenate([matrix, mean], axis=0)


def add_gist_rows(
    params: Mapping[str, Any], config: Any, embedding: str, token_id: int | None = None
) -> tuple[dict[str, Any], Any]:
    """Give ``<GIST>`` a mean-initialised row in the embedding ``params[embedding]`` and,
    when the output layer is untied, in ``lm_head``; returns the params and the config with
    the new ``vocab_size`` and ``gist_token_id``.

    By default the row is appended (vocab + 1; the token's id is the old vocab size). A
    ``token_id`` below ``vocab_size`` means the tokenizer is smaller than the embedding (a
    padded vocabulary, as in T5's 32128 rows for 32100 tokens): that unused row is
    overwritten with the mean of the other rows and the vocab size stays.
    """
    v = config.vocab_size
    token_id = v if token_id is None else token_id
    if not 0 <= token_id <= v:
        raise ConversionError(f"gist token id {token_id} is beyond the embedding ({v} rows)")

    def with_mean_row(matrix: Any) -> np.ndarray:
        matrix = np.asarray(matrix, np.float32)
        if token_id == v:
            return append_mean_row(matrix)
        out = matrix.copy()
        out[token_id] = append_mean_row(np.delete(matrix, token_id, axis=0))[-1]
        return out

    params = dict(params)
    params[embedding] = {"embedding": with_mean_row(params[embedding]["embedding"])}
    if not config.tie_word_embeddings:
        kernel = np.asarray(params["lm_head"]["kernel"])
        params["lm_head"] = {"kernel": np.ascontiguousarray(with_mean_row(kernel.T).T)}
    new_vocab = v + 1 if token_id == v else v
    return params, dataclasses.replace(config, vocab_size=new_vocab, gist_token_id=token_id)


def add_gist_token(tokenizer: Any) -> int:
    """Add ``<GIST>`` as one special token to an HF tokenizer (in place); return its id.

    A tokenizer that already has it keeps it (conversion is idempotent).
    """
    if GIST_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [GIST_TOKEN]})
    return int(tokenizer.convert_tokens_to_ids(GIST_TOKEN))


def export_model(
    out_dir: str | os.PathLike,
    params: Any,
    model_config: Mapping[str, Any],
    tokenizer: Any | None,
) -> pathlib.Path:
    """Write a trained model as a converted checkpoint directory (``model_config.json``,
    ``params/``, ``tokenizer/``), replacing ``out_dir``.

    Called by every process: orbax writes each process's shards of the params; process 0
    writes the config and tokenizer and renames the finished directory into place.
    """
    import jax
    from jax.experimental import multihost_utils

    out = pathlib.Path(out_dir).absolute()
    # A fixed name (every process must write to the same directory); a stale one from a
    # killed export is removed first.
    tmp = out.with_name(f".{out.name}.tmp")
    primary = jax.process_index() == 0
    multi = jax.process_count() > 1
    if primary and tmp.exists():
        shutil.rmtree(tmp)
    if multi:
        multihost_utils.sync_global_devices("gist_jax:export:start")
    save_params(tmp / PARAMS_DIR, params)
    if primary:
        (tmp / MODEL_CONFIG_FILE).write_text(json.dumps(dict(model_config), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        files.replace_directory(tmp, out)
    if multi:
        multihost_utils.sync_global_devices("gist_jax:export:done")
    return out


def save_params(path: str | os.PathLike, params: Any) -> None:
    """Write a params pytree as an orbax checkpoint at ``path`` (which must not exist)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(pathlib.Path(path).absolute(), params)


def load_params(path: str | os.PathLike, target: Any = None) -> Any:
    """Read a params pytree written by ``save_params``; ``target`` (abstract arrays with
    shardings) restores directly onto a mesh. Without it, a checkpoint saved from other
    devices than this process has is placed on the first local device."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    if not path.is_dir():
        raise ConversionError(f"{path}: no params checkpoint")
    with ocp.StandardCheckpointer() as checkpointer:
        if target is not None:
            return checkpointer.restore(path, target)
        try:
            return checkpointer.restore(path)
        except ValueError:
            # Saved from other devices (e.g. a training run's export on a 4-device mesh):
            # orbax will not guess a placement, so put every array on our first device.
            return checkpointer.restore(path, _local_target(checkpointer.metadata(path)))


def _local_target(metadata: Any) -> Any:
    """Restore target for ``metadata``: arrays saved from devices go to this process's first
    device, arrays saved from numpy stay numpy."""
    import jax

    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    device = jax.local_devices()[0]

    def leaf(m: Any) -> Any:
        if getattr(m, "sharding", None) is None:
            return np.empty(m.shape, m.dtype)
        sharding = jax.sharding.SingleDeviceSharding(device)
        return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding)

    return jax.tree.map(leaf, tree)


def save_converted(
    out_dir: str | os.PathLike,
    params: Any,
    model_config: Mapping[str, Any],
    tokenizer: Any | None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write a converted checkpoint directory atomically (layout in the module docstring)."""
    if "model_type" not in model_config or "gist_token_id" not in model_config:
        raise ValueError("model_config needs 'model_type' and 'gist_token_id'")
    with files.atomic_directory(out_dir, overwrite=overwrite) as tmp:
        (tmp / MODEL_CONFIG_FILE).write_text(json.dumps(dict(model_config), indent=2) + "\n")
        save_params(tmp / PARAMS_DIR, params)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
    return pathlib.Path(out_dir)


def read_model_config(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``model_config.json`` of a converted checkpoint directory."""
    path = pathlib.Path(ckpt_dir) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise ConversionError(f"{ckpt_dir}: no {MODEL_CONFIG_FILE} (not a gist_jax checkpoint)")
    return json.loads(path.read_text())


def load_tokenizer(ckpt_dir: str | os.PathLike) -> Any:
    """The HF tokenizer saved in a converted checkpoint directory (torch not needed)."""
    from transformers import AutoTokenizer

    path = pathlib.Path(ckpt_dir) / TOKENIZER_DIR
    if not path.is_dir():
        raise ConversionError(f"{ckpt_dir}: no {TOKENIZER_DIR}/ directory")
    return AutoTokenizer.from_pretrained(str(path))


def check_params_match(params: Any, expected: Any, where: str) -> None:
    """Raise ``ConversionError`` naming every leaf whose shape differs from ``expected``
    (a pytree of arrays or ``ShapeDtypeStruct``s), or that is missing or extra."""
    import jax

    got = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in _leaves(params)}
    want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in _leaves(expected)}
    problems = [f"missing {k} {s}" for k, s in want.items() if k not in got]
    problems += [f"unexpected {k} {s}" for k, s in got.items() if k not in want]
    problems += [
        f"{k} has shape {got[k]}, config implies {s}"
        for k, s in want.items()
        if k in got and got[k] != s
    ]
    if problems:
        raise ConversionError(
            f"{where}: params do not match the model config: " + "; ".join(problems[:10])
        )


def _leaves(tree: Any) -> list[tuple[Any, Any]]:
    import jax

    return jax.tree_util.tree_flatten_with_path(tree)[0]
