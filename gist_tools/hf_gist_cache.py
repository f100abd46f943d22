"""Serving a gist model with PyTorch ``transformers``: compress prompts into their gist
tokens' ``past_key_values`` and decode inputs from that cache, batched.

A model exported by gist_jax (``gist-convert-to-hf``, the quickstart's ``export_hf/``)
loads with ``AutoModelForCausalLM``, but a plain ``model.generate()`` on the whole prompt
lets every token see the instruction: it does not apply the gist mask, and a gist model
answers badly that way. Here the gist mask is applied the way it is deployed:

* ``compress(model, prompts)`` runs each prompt (the template up to and including its k
  ``<GIST>`` tokens) once. Up to the last gist token the gist mask is plain causal
  attention, so this is an ordinary forward pass; of its ``past_key_values`` only the k
  gist positions are kept (keys already rotated at their absolute positions).
* ``generate(model, cache, inputs)`` decodes each input (the tokens after the gists) with
  ``transformers``' own ``DynamicCache`` holding only the gist keys and values, so nothing
  after the gists can see the instruction. Inputs continue at positions ``last + 1, ...``
  of their own prompt; a batch mixes prompts of different lengths (the inputs are left
  padded after the k gist slots, and the attention mask hides the padding).

An export of a model with a gist adapter (``model.gist_adapter_rank``) carries it in
``gist_adapter.safetensors`` beside the weights, which transformers does not read:
``compress`` adds it to the gist tokens' positions (forward pre-hooks on the decoder layers,
attached on first use from the directory the model was loaded from). Only compression sees
gist tokens, so decoding needs nothing more.

Greedy tokens equal gist_jax's own compressed decoding (``gist_jax.inference.gist_cache``)
token for token; ``tests/tools/test_hf_gist_cache.py`` checks it on the SmolLM2 export and a
tiny random LLaMA at batch 1 and 4. Decoder-only models only. Needs ``torch`` (the
``torch`` extra: ``pip install 'gist_jax[torch]'``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import pathlib
import types
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from gist_jax.convert.common import GIST_ADAPTER_FILE
from gist_jax.data.templates import GIST_TOKEN
from gist_jax.inference.gist_cache import GistCacheError, check_prompts


@dataclasses.dataclass
class TorchGistCache:
    """The k gist tokens of B prompts: per layer ``keys`` / ``values`` ``[B, KV heads, k,
    head dim]`` and their absolute ``positions`` ``int64[B, k]``."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    positions: torch.Tensor

    @property
    def batch_size(self) -> int:
        return int(self.positions.shape[0])

    def take(self, rows: Sequence[int]) -> TorchGistCache:
        """The cache of the given rows (repeats allowed: one prompt for many inputs)."""
        index = torch.as_tensor(list(rows), dtype=torch.long)
        return TorchGistCache(
            keys=[k[index] for k in self.keys],
            values=[v[index] for v in self.values],
            positions=self.positions[index],
        )

    def nbytes_per_prompt(self) -> int:
        """Bytes of keys and values one prompt's cache holds (positions not counted)."""
        total = sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
        return total // self.batch_size


def encode(
    tokenizer: Any,
    instructions: Sequence[str],
    inputs: Sequence[str],
    num_gist: int = 1,
    max_length: int = 512,
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids with the training templates (``gist_tools.prompts``): each instruction's
    prompt, ending with its ``num_gist`` gist tokens, and each input's tokens after them.
    ``tokenizer`` is the export's (it holds the ``<GIST>`` token)."""
    from gist_tools import prompts

    gist_id = tokenizer.convert_tokens_to_ids(GIST_TOKEN)
    config = types.SimpleNamespace(gist_token_id=gist_id, model_type="llama")
    return (
        prompts.instruction_prompts(config, tokenizer, instructions, num_gist, max_length),
        prompts.input_tokens(config, tokenizer, inputs, num_gist, max_length),
    )


@functools.cache
def _cache_argument(model_class: type) -> str:
    """The name of the cache argument and output: ``cache`` in newer transformers releases,
    ``past_key_values`` in older ones."""
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _forward(model: Any, past: DynamicCache | None, **inputs: Any) -> tuple[Any, DynamicCache]:
    """Logits and the updated cache."""
    name = _cache_argument(type(model))
    out = model(**inputs, **({name: past} if past is not None else {}), use_cache=True)
    return out.logits, getattr(out, name)


def _gist_adapter(model: Any) -> dict[str, Any] | None:
    """The switch of ``model``'s gist adapter hooks (``{"rows": None | [B, L, 1] mask}``),
    attached on first use; None for a model without an adapter."""
    rank = getattr(model.config, "gist_adapter_rank", 0)
    if not rank:
        return None
    state = getattr(model, "_gist_adapter_state", None)
    if state is not None:
        return state
    path = pathlib.Path(model.name_or_path) / GIST_ADAPTER_FILE
    if not path.is_file():
        raise GistCacheError(
            f"{path}: not found; the model's config.json has gist_adapter_rank={rank}, so "
            "load it with from_pretrained from the export directory that holds the file"
        )
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    state = {"rows": None}
    for i, layer in enumerate(model.model.layers):
        down = tensors[f"layers.{i}.down"].to(model.device, model.dtype)
        up = tensors[f"layers.{i}.up"].to(model.device, model.dtype)

        def add_update(module: Any, args: tuple, kwargs: dict, down=down, up=up) -> Any:
            # gist_jax's DecoderLayer: hidden + rows * (input_layernorm(hidden) @ down @ up)
            # before the layer's own computation.
            rows = state["rows"]
            if rows is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden = hidden + rows * (module.input_layernorm(hidden) @ down @ up)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        layer.register_forward_pre_hook(add_update, with_kwargs=True)
    model._gist_adapter_state = state
    return state


@contextlib.contextmanager
def gist_adapter_at(model: Any, input_ids: torch.Tensor, gist_token_id: int) -> Iterator[None]:
    """Within it, a forward pass of ``model`` over ``input_ids`` adds the model's gist
    adapter (if it has one) at the gist tokens' positions, as gist_jax's model does."""
    adapter = _gist_adapter(model)
    if adapter is None:
        yield
        return
    adapter["rows"] = (input_ids == gist_token_id)[..., None].to(model.device, model.dtype)
    try:
        yield
    finally:
        adapter["rows"] = None


@torch.no_grad()
def compress(model: Any, prompts: Sequence[Sequence[int]], gist_token_id: int) -> TorchGistCache:
    """Compress prompts (each ending with its k gist tokens) into a ``TorchGistCache`` whose
    row ``i`` is ``prompts[i]``. ``gist_token_id``: the export's ``<GIST>`` token
    (``tokenizer.convert_tokens_to_ids("<GIST>")``)."""
    num_gist = check_prompts(prompts, gist_token_id)
    device = model.device
    length = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), length), dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, : len(prompt)] = torch.as_tensor(list(prompt))
        mask[i, : len(prompt)] = 1
    # Right padded: a real token only sees real tokens to its left (causal).
    positions = torch.arange(length).expand(len(prompts), length)
    with gist_adapter_at(model, ids, gist_token_id):
        _, past = _forward(
            model,
            None,
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
        )
    first = torch.as_tensor([len(p) - num_gist for p in prompts])
    slots = first[:, None] + torch.arange(num_gist)[None, :]  # [B, k], slot == position
    index = slots.to(device)[:, None, :, None]
    keys, values = [], []
    for layer in past.layers:
        gather = index.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        keys.append(torch.gather(layer.keys, 2, gather))
        values.append(torch.gather(layer.values, 2, gather))
    return TorchGistCache(keys=keys, values=values, positions=slots)


@torch.no_grad()
def generate(
    model: Any,
    cache: TorchGistCache,
    inputs: Sequence[Sequence[int]],
    gist_token_id: int,
    max_new_tokens: int = 128,
    eos_token_ids: Sequence[int] | None = None,
) -> list[list[int]]:
    """Greedy-decode ``inputs[i]`` (the tokens after the gists) from row ``i`` of ``cache``;
    returns the generated tokens of each input, EOS and what follows removed.
    ``eos_token_ids`` default to the model config's; ``()`` turns stopping off."""
    gist_id = gist_token_id
    if cache.batch_size != len(inputs):
        raise GistCacheError(
            f"{len(inputs)} inputs for a gist cache of {cache.batch_size} prompts; pass one "
            "input per cached prompt (cache.take(rows) repeats a prompt)"
        )
    for i, row in enumerate(inputs):
        if len(row) == 0 or gist_id in list(row):
            raise GistCacheError(f"input {i} is empty or contains a gist token (id {gist_id})")
    if eos_token_ids is None:
        eos = model.config.eos_token_id
        eos_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    stop = set(int(e) for e in eos_token_ids)
    device = model.device
    batch, num_gist = cache.positions.shape
    length = max(len(r) for r in inputs)
    # [gist slots | left padding | input]: each input ends at the same column, so every
    # row's next token is read at the last column and appended after it.
    ids = torch.zeros((batch, length), dtype=torch.long)
    mask = torch.ones((batch, num_gist + length), dtype=torch.long)
    positions = torch.zeros((batch, length), dtype=torch.long)
    next_pos = cache.positions[:, -1] + 1
    for i, row in enumerate(inputs):
        pad = length - len(row)
        ids[i, pad:] = torch.as_tensor(list(row))
        mask[i, num_gist : num_gist + pad] = 0
        positions[i, pad:] = next_pos[i] + torch.arange(len(row))
    next_pos = next_pos + torch.as_tensor([len(r) for r in inputs])
    past = DynamicCache(ddp_cache_data=list(zip(cache.keys, cache.values, strict=True)))
    mask = mask.to(device)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    step_ids = ids.to(device)
    step_pos = positions.to(device)
    for _ in range(max_new_tokens):
        logits, past = _forward(
            model, past, input_ids=step_ids, attention_mask=mask, position_ids=step_pos
        )
        chosen = logits[:, -1].argmax(-1)
        for i, token in enumerate(chosen.tolist()):
            if not done[i]:
                if token in stop:
                    done[i] = True
                else:
                    tokens[i].append(token)
        if all(done):
            break
        step_ids = chosen[:, None]
        step_pos = next_pos.to(device)[:, None]
        next_pos = next_pos + 1
        mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
    return tokens
