"""The model-family interface (``gist_jax.models.family``): each family's params, axes and
layouts agree with each other, lookups fail with the supported names, and no code outside
the interface and the converters dispatches on a ``model_type`` string."""

from __future__ import annotations

import dataclasses
import pathlib
import re

import fixtures_llama as fx_llama
import fixtures_t5 as fx_t5
import jax
import numpy as np
import pytest

from gist_jax.convert import llama as convert_llama
from gist_jax.convert import t5 as convert_t5
from gist_jax.models.family import (
    LLAMA,
    T5,
    UnsupportedModelError,
    config_from_dict,
    family_named,
    family_of,
)

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "gist_jax"


def _configs() -> dict[str, object]:
    llama = convert_llama.config_from_hf(fx_llama.hf_config("gqa_tied_llama3").to_dict())
    t5 = convert_t5.config_from_hf(fx_t5.hf_config("v1_1").to_dict())
    return {"llama": llama, "t5": t5}


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_params_axes_and_layouts_agree(name):
    config = _configs()[name]
    family = family_of(config)
    assert family is family_named(name) is {"llama": LLAMA, "t5": T5}[name]
    assert config_from_dict(config.to_dict()) == config
    params = family.init_params(config, jax.random.key(0))
    abstract = family.abstract_params(config)
    axes = family.param_axes(config)
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    for leaf, shape, names in zip(
        jax.tree.leaves(params),
        jax.tree.leaves(abstract),
        jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple)),
        strict=True,
    ):
        assert leaf.shape == shape.shape and leaf.dtype == shape.dtype
        assert len(names) == leaf.ndim
    # Scanned and unrolled layouts are the same numbers.
    stacked = family.relayout_params(params, config, True)
    back = family.relayout_params(stacked, dataclasses.replace(config, scan_layers=True), False)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_an_unknown_model_type_names_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match=r"unsupported model_type 'gpt2'.*llama, t5"):
        family_named("gpt2")


def test_no_model_type_string_dispatch_outside_the_interface():
    # Families differ only through gist_jax.models.family; the converters translate HF
    # config.json files, which name their model_type.
    pattern = re.compile(r"model_type\s*(==|!=)\s*['\"]|['\"]\s*(==|!=)\s*\S*model_type")
    allowed = {PACKAGE / "models" / "family.py"}
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path in allowed or (PACKAGE / "convert") in path.parents:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
