"""Reading a converted checkpoint directory (``model_config.json``, ``params/``,
``tokenizer/``) into ``(config, params, tokenizer)``, onto devices when given a target.

This is the one loader every entry point uses (training, evaluation, the command-line
tools, conversion back to Hugging Face): it checks the params against the shapes the
saved config implies and can change the layer layout (scanned or unrolled) on the way in.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

from gist_jax.convert import common
from gist_jax.convert.common import ConversionError
from gist_jax.models.family import UnsupportedModelError, config_from_dict, family_of


def read_config(ckpt_dir: str | os.PathLike) -> Any:
    """The model config of a converted checkpoint directory."""
    try:
        return config_from_dict(common.read_model_config(pathlib.Path(ckpt_dir)))
    except UnsupportedModelError as err:
        raise ConversionError(
            f"{pathlib.Path(ckpt_dir) / common.MODEL_CONFIG_FILE}: {err}"
        ) from err


def load_checkpoint(
    ckpt_dir: str | os.PathLike,
    target: Any = None,
    scan_layers: bool | None = None,
) -> tuple[Any, Any, Any]:
    """Read a converted checkpoint directory: ``(config, params, tokenizer)``.

    ``target`` (abstract arrays with shardings, in the saved layout) restores the params
    directly onto devices. Params are checked against the shapes the saved config implies,
    so a ``model_config.json`` that does not describe its params is a ``ConversionError``
    naming the offending leaves. ``scan_layers`` (when given and different from the saved
    layout) restacks layers and returns the config to match. The tokenizer is None when the
    checkpoint has none.
    """
    ckpt_dir = pathlib.Path(ckpt_dir)
    config = read_config(ckpt_dir)
    family = family_of(config)
    expected = family.abstract_params(config)
    where = str(ckpt_dir / common.MODEL_CONFIG_FILE)
    if target is not None:
        common.check_params_match(target, expected, where)
    try:
        params = common.load_params(ckpt_dir / common.PARAMS_DIR, target)
    except ConversionError:
        raise
    except Exception as err:  # orbax reports structure mismatches with its own types
        raise ConversionError(f"{ckpt_dir}: cannot restore params ({err})") from err
    common.check_params_match(params, expected, where)
    if scan_layers is not None and scan_layers != config.scan_layers:
        params = family.relayout_params(params, config, scan_layers)
        config = dataclasses.replace(config, scan_layers=scan_layers)
    tokenizer = None
    if (ckpt_dir / common.TOKENIZER_DIR).is_dir():
        tokenizer = common.load_tokenizer(ckpt_dir)
    return config, params, tokenizer
