"""Model families behind one interface: what the rest of gist_jax may know about a model.

A ``Family`` owns a model family's place in the system: its config class, how to build,
initialise and lay out its params (logical axes, scanned or unrolled layers), the arrays a
training batch carries, the logits (and, for decoder-only models, the hidden states and
output layer) of a batch under a gist condition, the token count of a batch, and the bytes
a gist cache of it takes. ``LLAMA`` and ``T5`` are the two families;
``family_named(model_type)`` and ``family_of(config)`` find one. Code outside this module
and ``gist_jax.convert`` asks a family for what differs (``family_of(config).logits(...)``,
``.encoder_decoder``) and never
compares ``model_type`` strings, so a new family is a new ``Family`` subclass here plus its
model and conversion modules.

The model and conversion modules are imported on first use, so importing this module does
not import the model code.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gist_jax import gist

Batch = Mapping[str, jax.Array]


class UnsupportedModelError(ValueError):
    """A ``model_type`` no family implements."""


class Family:
    """One model family. Subclasses set the class attributes and the batch-level methods."""

    name: str
    encoder_decoder: bool
    # Whether the output layer can run on loss chunks only (``gist_jax.train.output_loss``):
    # needs the final hidden states of every position, which the decoder-only step has.
    chunked_output: bool
    batch_keys: tuple[str, ...]
    cache_fields: tuple[str, ...]  # the arrays a GistCache of this family holds
    model_path: str
    convert_path: str

    @property
    def module(self) -> ModuleType:
        """The Flax model module (``gist_jax.models.<family>``)."""
        return importlib.import_module(self.model_path)

    @property
    def conversion(self) -> ModuleType:
        """The Hugging Face conversion module (``gist_jax.convert.<family>``)."""
        return importlib.import_module(self.convert_path)

    @property
    def config_class(self) -> type:
        return self.module.CONFIG_CLASS

    def __repr__(self) -> str:
        return f"Family({self.name!r})"

    # ---- params ----

    def build(self, config: Any) -> nn.Module:
        return self.module.build_model(config)

    def _boxed_init(self, config: Any, rng: jax.Array) -> Any:
        return self.build(config).init(rng, *self.module.dummy_inputs())["params"]

    def init_params(self, config: Any, rng: jax.Array) -> dict[str, Any]:
        """Randomly initialised float32 params (plain nested dict, no partitioning boxes)."""
        return nn.unbox(self._boxed_init(config, rng))

    def abstract_params(self, config: Any) -> dict[str, Any]:
        """``ShapeDtypeStruct`` tree of the params (no computation, no memory)."""
        return jax.eval_shape(lambda: self.init_params(config, jax.random.key(0)))

    def param_axes(self, config: Any) -> dict[str, Any]:
        """Tuple of logical axis names for every param, same tree as ``init_params``
        (``"layers"`` first on stacked params). The tuples are pytree nodes to ``jax.tree``:
        map over the params first, e.g. ``jax.tree.map(f, params, axes)``."""
        boxed = jax.eval_shape(lambda: self._boxed_init(config, jax.random.key(0)))
        specs = nn.get_partition_spec(boxed)
        return jax.tree.map(
            tuple, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
        )

    def relayout_params(self, params: Any, config: Any, scan_layers: bool) -> Any:
        """Params laid out for ``scan_layers`` whatever layout ``config`` says they are in."""
        return self.module.relayout_params(params, config, scan_layers)

    # ---- batches ----

    def logits(self, model: nn.Module, params: Any, batch: Batch, condition: str) -> jax.Array:
        """Logits ``float32[B, L, V]`` at the positions the loss reads, under ``condition``."""
        raise NotImplementedError

    def count_tokens(self, batch: Batch) -> jax.Array:
        """Non-padding tokens in a batch, for tokens/s."""
        raise NotImplementedError

    def cache_bytes(self, config: Any, num_tokens: int | float) -> float:
        """Bytes of cached state for ``num_tokens`` tokens of one prompt: with ``k`` a gist
        cache, with the prompt length an ordinary prompt (prefix) cache."""
        raise NotImplementedError


class LlamaFamily(Family):
    """Decoder-only LLaMA-family models (``gist_jax.models.llama``)."""

    name = "llama"
    encoder_decoder = False
    chunked_output = True
    batch_keys = (
        "input_ids",
        "positions",
        "segment_ids",
        "targets",
        "loss_mask",
        "gist_first",
        "gist_last",
    )
    cache_fields = ("k", "v")
    model_path = "gist_jax.models.llama"
    convert_path = "gist_jax.convert.llama"

    def self_mask(self, batch: Batch, condition: str) -> jax.Array:
        pos, seg = batch["positions"], batch["segment_ids"]
        return gist.SelfMask(pos, pos, batch["gist_first"], batch["gist_last"], condition, seg, seg)

    def logits(self, model: nn.Module, params: Any, batch: Batch, condition: str) -> jax.Array:
        mask = self.self_mask(batch, condition)
        logits, _ = model.apply({"params": params}, batch["input_ids"], batch["positions"], mask)
        return logits

    def hidden(self, model: nn.Module, params: Any, batch: Batch, condition: str) -> jax.Array:
        """Final hidden states ``[B, L, D]`` (before the output layer) under ``condition``."""
        mask = self.self_mask(batch, condition)
        hidden, _ = model.apply(
            {"params": params}, batch["input_ids"], batch["positions"], mask, return_hidden=True
        )
        return hidden

    def output_kernel(self, params: Mapping[str, Any], config: Any) -> jax.Array:
        """The output layer's ``[D, V]`` matrix (the transposed embedding when tied)."""
        return self.module.output_kernel(params, config)

    def count_tokens(self, batch: Batch) -> jax.Array:
        return jnp.sum(batch["positions"] >= 0)

    def cache_bytes(self, config: Any, num_tokens: int | float) -> float:
        # Keys and values of every layer: tokens * layers * 2 * kv_heads * head_dim.
        per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim
        return float(num_tokens) * per_token * jnp.dtype(config.compute_dtype).itemsize


class T5Family(Family):
    """Encoder-decoder T5 / FLAN-T5 models (``gist_jax.models.t5``)."""

    name = "t5"
    encoder_decoder = True
    chunked_output = False
    batch_keys = (
        "encoder_input_ids",
        "encoder_positions",
        "encoder_segment_ids",
        "encoder_gist_first",
        "encoder_gist_last",
        "decoder_input_ids",
        "decoder_positions",
        "decoder_segment_ids",
        "decoder_gist_first",
        "decoder_gist_last",
        "targets",
        "loss_mask",
    )
    # The encoder-side cache: every decoder layer's cross-attention keys and values of the
    # gist tokens, plus their final encoder hidden states.
    cache_fields = ("k", "v", "hidden")
    model_path = "gist_jax.models.t5"
    convert_path = "gist_jax.convert.t5"

    def logits(self, model: nn.Module, params: Any, batch: Batch, condition: str) -> jax.Array:
        enc_pos, enc_seg = batch["encoder_positions"], batch["encoder_segment_ids"]
        dec_pos, dec_seg = batch["decoder_positions"], batch["decoder_segment_ids"]
        enc_mask = gist.encoder_self_mask(
            enc_pos,
            enc_pos,
            batch["encoder_gist_first"],
            batch["encoder_gist_last"],
            condition,
            enc_seg,
            enc_seg,
        )
        # The decoder sees no gist tokens of its own: causal + padding + same segment.
        no_gist = jnp.full(dec_pos.shape[:1], gist.NO_GIST, jnp.int32)
        self_mask = gist.decoder_self_mask(
            dec_pos, dec_pos, no_gist, no_gist, "gist", dec_seg, dec_seg
        )
        cross = gist.cross_mask(
            enc_pos,
            batch["decoder_gist_first"],
            batch["decoder_gist_last"],
            condition,
            dec_seg,
            enc_seg,
        )
        logits, _ = model.apply(
            {"params": params},
            batch["encoder_input_ids"],
            enc_pos,
            enc_mask,
            batch["decoder_input_ids"],
            dec_pos,
            self_mask,
            cross,
        )
        return logits

    def count_tokens(self, batch: Batch) -> jax.Array:
        return jnp.sum(batch["encoder_positions"] >= 0) + jnp.sum(batch["decoder_positions"] >= 0)

    def cache_bytes(self, config: Any, num_tokens: int | float) -> float:
        per_token = config.num_layers * 2 * config.num_heads * config.d_kv + config.d_model
        return float(num_tokens) * per_token * jnp.dtype(config.compute_dtype).itemsize


LLAMA = LlamaFamily()
T5 = T5Family()
FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, T5)}


# Hugging Face model types that a family reads and writes besides its own name.
HF_MODEL_TYPES: dict[str, str] = {"qwen2": "llama", "mistral": "llama"}


def family_named(model_type: Any) -> Family:
    """The family of a ``model_type`` string: a family's name ("llama", "t5") or a Hugging
    Face model type it converts ("qwen2", "mistral": LLaMA with other flags)."""
    name = HF_MODEL_TYPES.get(model_type, model_type)
    if name not in FAMILIES:
        supported = ", ".join([*FAMILIES, *HF_MODEL_TYPES])
        raise UnsupportedModelError(
            f"unsupported model_type {model_type!r}; supported: {supported}"
        )
    return FAMILIES[name]


def family_of(config: Any) -> Family:
    """The family of a model config object."""
    return family_named(config.model_type)


def config_from_dict(d: Mapping[str, Any]) -> Any:
    """The family's config object from its ``to_dict()`` form (``model_config.json``)."""
    return family_named(d.get("model_type")).config_class.from_dict(d)
