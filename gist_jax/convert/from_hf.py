"""Hugging Face model directory -> gist_jax converted checkpoint, for any registered family.

``convert_from_hf`` reads ``config.json`` and the safetensors weights (sharded or not, no
torch), maps them to params through the family's conversion module (chosen by
``model_type`` via ``gist_jax.models.family``), adds the ``<GIST>`` token (tokenizer entry
plus mean-initialised embedding row, and output row when untied), records its id in the
config, and writes the checkpoint atomically. The CLI is a thin wrapper::

    python -m gist_jax.convert.from_hf --hf_dir=DIR --out_dir=OUT [--scan_layers] [--overwrite]
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import pathlib
from collections.abc import Sequence
from typing import Any

from gist_jax.cli.entry import run_app
from gist_jax.convert import common
from gist_jax.convert.common import ConversionError
from gist_jax.models.family import Family, UnsupportedModelError, family_named, family_of


def hf_family(hf_config: dict[str, Any], source: str) -> Family:
    """The family of an HF ``config.json`` dict; ``ConversionError`` naming ``source`` when
    no family implements its ``model_type``."""
    try:
        return family_named(hf_config.get("model_type"))
    except UnsupportedModelError as err:
        raise ConversionError(f"{source}: {err}") from err


def load_hf_tokenizer(hf_dir: str | os.PathLike) -> Any:
    """The tokenizer saved alongside an HF model (torch not needed)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(hf_dir))
    except Exception as err:  # transformers raises many types for a missing/broken tokenizer
        raise ConversionError(
            f"{hf_dir}: cannot load a tokenizer ({type(err).__name__}: {err}); the gist token "
            "must be added to the model's tokenizer, so the directory needs its tokenizer files"
        ) from err


def add_gist(params: Any, config: Any, tokenizer: Any) -> tuple[Any, Any]:
    """Add ``<GIST>`` to ``tokenizer`` (in place) and give it a mean-initialised row.

    Its id is the tokenizer's next id. Usually that is the embedding's size (a row is
    appended); for a padded embedding (more rows than tokenizer entries, as in T5) the
    unused row at that id is re-initialised instead, if the family supports it. A tokenizer
    that already has ``<GIST>`` (a re-imported gist_jax export) keeps its id and rows.
    """
    convert = family_of(config).conversion
    had_gist = common.GIST_TOKEN in tokenizer.get_vocab()
    gist_id = common.add_gist_token(tokenizer)
    vocab = config.vocab_size
    if had_gist and gist_id < vocab:
        # A model exported by gist_jax (or otherwise already gisted): its gist rows may be
        # trained, so they are kept as they are.
        pass
    elif gist_id == vocab:
        params, config = convert.add_gist_rows(params, config)
    elif gist_id < vocab:
        if "token_id" not in inspect.signature(convert.add_gist_rows).parameters:
            raise ConversionError(
                f"{config.model_type}: tokenizer gives <GIST> id {gist_id} inside the "
                f"{vocab}-row embedding, and this family cannot reuse a padding row"
            )
        params, config = convert.add_gist_rows(params, config, token_id=gist_id)
    else:
        raise ConversionError(
            f"tokenizer has {gist_id} entries but the embedding only {vocab} rows; "
            "the tokenizer does not belong to this model"
        )
    return params, dataclasses.replace(config, gist_token_id=gist_id)


def convert_from_hf(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    scan_layers: bool = False,
    overwrite: bool = False,
    tokenizer: Any = None,
) -> pathlib.Path:
    """Convert an HF model directory into a gist_jax checkpoint at ``out_dir``.

    Args:
      hf_dir: directory with ``config.json``, ``*.safetensors`` and tokenizer files.
      out_dir: where the converted checkpoint goes (written atomically).
      scan_layers: store layers stacked for ``nn.scan`` (the saved config says so).
      overwrite: replace an existing ``out_dir``.
      tokenizer: use this tokenizer instead of the one in ``hf_dir`` (it is modified).

    Raises ``ConversionError`` naming the problem: no config.json, an unsupported
    ``model_type`` (with the supported ones), or a missing or mis-shaped tensor.
    """
    out = pathlib.Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    hf_config = common.read_hf_config(hf_dir)
    hf_family(hf_config, str(hf_dir))  # an unsupported model_type fails before any reading
    if tokenizer is None:
        tokenizer = load_hf_tokenizer(hf_dir)
    adapter_file = pathlib.Path(hf_dir) / common.GIST_ADAPTER_FILE
    adapter = None
    if adapter_file.is_file():
        from safetensors.numpy import load_file

        adapter = load_file(str(adapter_file))
    return convert_tensors(
        hf_config,
        common.read_safetensors(hf_dir),
        tokenizer,
        out_dir,
        scan_layers=scan_layers,
        overwrite=overwrite,
        source=str(hf_dir),
        adapter_tensors=adapter,
    )


def convert_tensors(
    hf_config: dict[str, Any],
    tensors: dict[str, Any],
    tokenizer: Any,
    out_dir: str | os.PathLike,
    scan_layers: bool = False,
    overwrite: bool = False,
    source: str = "HF tensors",
    adapter_tensors: dict[str, Any] | None = None,
) -> pathlib.Path:
    """``convert_from_hf`` on an in-memory HF config dict and state dict (numpy), plus the
    gist adapter's tensors when ``config.json`` names a ``gist_adapter_rank``."""
    family = hf_family(hf_config, source)
    convert = family.conversion
    rank = int(hf_config.get("gist_adapter_rank") or 0)
    if rank and (adapter_tensors is None or not hasattr(convert, "add_adapter_from_hf")):
        raise ConversionError(
            f"{source}: config.json has gist_adapter_rank={rank} but there is no "
            f"{common.GIST_ADAPTER_FILE} for a {family.name} model"
        )
    config = convert.config_from_hf(hf_config)
    config = dataclasses.replace(config, scan_layers=scan_layers)
    params = convert.params_from_hf(tensors, config)
    params, config = add_gist(params, config, tokenizer)
    if rank:
        params, config = convert.add_adapter_from_hf(params, config, adapter_tensors, rank)
    common.check_params_match(params, family.abstract_params(config), f"converting {source}")
    return common.save_converted(out_dir, params, config.to_dict(), tokenizer, overwrite=overwrite)


def main(argv: Sequence[str]) -> None:
    from absl import flags

    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    out = convert_from_hf(f.hf_dir, f.out_dir, scan_layers=f.scan_layers, overwrite=f.overwrite)
    config = common.read_model_config(out)
    print(
        f"wrote {out} (model_type={config['model_type']}, gist_token_id={config['gist_token_id']})"
    )


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("hf_dir", None, "Hugging Face model directory (config.json, safetensors).")
    flags.DEFINE_string("out_dir", None, "Output gist_jax checkpoint directory.")
    flags.DEFINE_bool("scan_layers", False, "Store layer params stacked for nn.scan.")
    flags.DEFINE_bool("overwrite", False, "Replace out_dir if it exists.")
    flags.mark_flags_as_required(["hf_dir", "out_dir"])


def run() -> None:
    _define_flags()
    run_app(main, "gist-convert-from-hf")


if __name__ == "__main__":
    run()
