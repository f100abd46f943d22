"""Model-family registry: maps a ``model_type`` ("llama", "t5") to its model module and its
conversion module, imported lazily, and loads converted checkpoints generically.

Every model module exposes ``CONFIG_CLASS``, ``build_model(config)``,
``init_params(config, rng)`` and ``param_logical_axes(config)`` (and optionally
``relayout_params(params, config, scan_layers)``); every conversion module exposes
``config_from_hf``, ``config_to_hf``, ``params_from_hf``, ``params_to_hf`` and
``add_gist_rows``. Code outside the families dispatches through here only, so adding a
family is one line in ``FAMILIES``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pathlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from gist_jax.convert import common
from gist_jax.convert.common import ConversionError

FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("gist_jax.models.llama", "gist_jax.convert.llama"),
    "t5": ("gist_jax.models.t5", "gist_jax.convert.t5"),
}


def supported_model_types() -> tuple[str, ...]:
    return tuple(FAMILIES)


def _family(model_type: Any) -> tuple[str, str]:
    if model_type not in FAMILIES:
        raise ConversionError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type]


def model_module(model_type: str) -> ModuleType:
    """The model module of a family (``gist_jax.models.<family>``)."""
    return importlib.import_module(_family(model_type)[0])


def convert_module(model_type: str) -> ModuleType:
    """The HF conversion module of a family (``gist_jax.convert.<family>``)."""
    return importlib.import_module(_family(model_type)[1])


def config_from_dict(d: Mapping[str, Any]) -> Any:
    """The family's config object from its ``to_dict()`` form (``model_config.json``)."""
    return model_module(d.get("model_type")).CONFIG_CLASS.from_dict(d)


def abstract_params(config: Any) -> Any:
    """``ShapeDtypeStruct`` tree of a config's params (no memory, no computation)."""
    import jax

    module = model_module(config.model_type)
    return jax.eval_shape(lambda: module.init_params(config, jax.random.key(0)))


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
    layout, and the family supports it) restacks layers and returns the config to match.
    The tokenizer is None when the checkpoint has none.
    """
    ckpt_dir = pathlib.Path(ckpt_dir)
    config = config_from_dict(common.read_model_config(ckpt_dir))
    expected = abstract_params(config)
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
    if scan_layers is not None and scan_layers != getattr(config, "scan_layers", scan_layers):
        module = model_module(config.model_type)
        if not hasattr(module, "relayout_params"):
            raise ValueError(f"{config.model_type} models cannot change scan_layers on load")
        params = module.relayout_params(params, config, scan_layers)
        config = dataclasses.replace(config, scan_layers=scan_layers)
    tokenizer = None
    if (ckpt_dir / common.TOKENIZER_DIR).is_dir():
        tokenizer = common.load_tokenizer(ckpt_dir)
    return config, params, tokenizer
