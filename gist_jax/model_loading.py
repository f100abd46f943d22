"""The model a run config names, and the params a run's workdir holds.

``load_model(config)`` reads ``model.*``: random init (the config's ``model.init`` fields and
a tokenizer), a converted checkpoint directory, or the bundled default model (converted
once, by process 0). It returns the model config with the run's runtime fields (dtype,
scanned layers, remat), its family and tokenizer. ``load_params`` gives the params to
evaluate or serve: a training checkpoint's params only (never the optimizer state), or the
config's own model when the workdir has no checkpoint.

Training, evaluation and the quickstart load models here; ``load_converted`` serves
``gist-compress`` and ``gist-generate``, which take a converted directory (or "default")
rather than a run config. All of them read directories through ``gist_jax.convert.loading``,
the one reader of a converted checkpoint directory.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils

from gist_jax import checkpoint as ckpt_lib
from gist_jax import tiny_tokenizer, train_config
from gist_jax.convert import common, loading
from gist_jax.data import tokenize
from gist_jax.models.family import Family, config_from_dict, family_named, family_of


@dataclasses.dataclass
class LoadedModel:
    """The model config of the run, its family, tokenizer and (for pretrained models) the
    converted checkpoint directory the params come from."""

    config: Any
    family: Family
    tokenizer: Any
    checkpoint_dir: pathlib.Path | None
    saved_scan_layers: bool | None  # layout of the params in checkpoint_dir
    # The run adds a gist adapter that checkpoint_dir's params do not have (a no-op at init).
    adds_gist_adapter: bool = False


def _runtime_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    m = config.model
    return {
        "dtype": m.dtype,
        "scan_layers": bool(m.scan_layers),
        "remat": m.remat,
        "attention": m.attention,
    }


def _with_gist_adapter(config: ml_collections.ConfigDict, model_config: Any, family: Family) -> Any:
    """``model_config`` with the run's ``model.gist_adapter_rank`` (0 keeps its own)."""
    rank = int(config.model.gist_adapter_rank)
    if not rank:
        return model_config
    saved = getattr(model_config, "gist_adapter_rank", None)
    if saved is None:
        raise train_config.ConfigError(
            f"model.gist_adapter_rank={rank}: gist adapters are implemented for the LLaMA "
            f"family only, and this model is {family.name}"
        )
    if saved and saved != rank:
        raise train_config.ConfigError(
            f"model.gist_adapter_rank={rank}, but the checkpoint's model has a rank-{saved} "
            "gist adapter (set 0 to keep it)"
        )
    if model_config.gist_token_id is None:
        raise train_config.ConfigError(
            f"model.gist_adapter_rank={rank}: the model has no gist token id"
        )
    return dataclasses.replace(model_config, gist_adapter_rank=rank)


def _default_model_dir() -> pathlib.Path:
    from gist_jax.convert.default_model import ensure_default_model

    # Process 0 converts (once); the others wait and then find the finished directory.
    if jax.process_index() == 0:
        _, ckpt_dir = ensure_default_model()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("gist_jax:default_model")
    if jax.process_index() != 0:
        _, ckpt_dir = ensure_default_model()
    return pathlib.Path(ckpt_dir)


def _load_tokenizer(spec: str, checkpoint_dir: pathlib.Path | None) -> Any:
    if spec.startswith(tiny_tokenizer.PREFIX):
        return tiny_tokenizer.from_spec(spec)
    if spec:
        from transformers import AutoTokenizer

        path = pathlib.Path(spec)
        if not path.is_dir():
            raise train_config.ConfigError(f"model.tokenizer={spec!r}: no such directory")
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        common.add_gist_token(tokenizer)
        return tokenizer
    if checkpoint_dir is None:
        raise train_config.ConfigError(
            "model.tokenizer is empty and model.checkpoint is empty (random init): set "
            "model.tokenizer to 'synthetic_bpe' or a tokenizer directory"
        )
    return common.load_tokenizer(checkpoint_dir)


def family_of_run(config: ml_collections.ConfigDict) -> Family:
    """The model family a run config trains, without loading the model or its tokenizer:
    ``model.init.model_type`` when set, else the checkpoint's, else the bundled default
    model's (LLaMA-family)."""
    init = config.model.get("init", None)
    if init is not None and init.get("model_type", None):
        return family_named(init.model_type)
    if config.model.checkpoint and config.model.checkpoint != train_config.DEFAULT_MODEL:
        return family_named(common.read_model_config(config.model.checkpoint)["model_type"])
    return family_named("llama")


def load_model(config: ml_collections.ConfigDict) -> LoadedModel:
    """Model config (with the run's dtype/scan/remat), family and tokenizer."""
    source = config.model.checkpoint
    if config.model.attention == "flash" and family_of_run(config).name != "llama":
        raise train_config.ConfigError(
            "model.attention='flash' serves LLaMA-family models only: T5's relative position "
            "bias is an additive bias the kernel does not read (use 'cpu' or 'reference')"
        )
    runtime = _runtime_fields(config)
    if source == train_config.RANDOM_INIT:
        tokenizer = _load_tokenizer(config.model.tokenizer, None)
        fields = dict(config.model.init.to_dict())
        family = family_named(fields["model_type"])
        names = {f.name for f in dataclasses.fields(family.config_class)}
        if not fields.get("vocab_size"):
            fields["vocab_size"] = len(tokenizer)
        if fields["vocab_size"] < len(tokenizer):
            raise train_config.ConfigError(
                f"model.init.vocab_size={fields['vocab_size']} is smaller than the tokenizer "
                f"({len(tokenizer)} tokens)"
            )
        token_ids = {
            "gist_token_id": tokenize.gist_token_id_of(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "decoder_start_token_id": tokenizer.pad_token_id,
        }
        fields.update({k: v for k, v in token_ids.items() if k in names and v is not None})
        fields.update(runtime)
        model_config = _with_gist_adapter(config, config_from_dict(fields), family)
        return LoadedModel(model_config, family, tokenizer, None, None)

    ckpt_dir = (
        _default_model_dir() if source == train_config.DEFAULT_MODEL else pathlib.Path(source)
    )
    saved = config_from_dict(common.read_model_config(ckpt_dir))
    family = family_of(saved)
    model_config = _with_gist_adapter(config, dataclasses.replace(saved, **runtime), family)
    tokenizer = _load_tokenizer(config.model.tokenizer, ckpt_dir)
    adds_adapter = model_config != dataclasses.replace(saved, **runtime)
    return LoadedModel(model_config, family, tokenizer, ckpt_dir, saved.scan_layers, adds_adapter)


def add_gist_adapter(params: Any, model_config: Any, family: Family, seed: int = 0) -> Any:
    """``params`` (a checkpoint's, without a gist adapter) plus the adapter ``model_config``
    asks for, freshly initialised; its ``up`` matrices are zero, so the model still computes
    exactly what the checkpoint did."""

    def missing(new: Any, old: Any) -> Any:  # the parts of ``new`` that ``old`` lacks
        out = {}
        for k, v in new.items():
            if k not in old:
                out[k] = v
            elif isinstance(v, dict) and (part := missing(v, old[k])):
                out[k] = part
        return out

    # Only the adapter leaves the jitted init, so XLA drops the random init of the rest of
    # the model (135M values for SmolLM2, ~20 s on 2 CPU cores) instead of computing and
    # discarding it; the adapter's values are the same either way.
    init = jax.jit(lambda key: missing(family.init_params(model_config, key), params))
    adapter = init(jax.random.key(seed))

    def merge(old: Any, new: Any) -> Any:
        return {**old, **{k: merge(old[k], v) if k in old else v for k, v in new.items()}}

    return merge(params, adapter)


def starting_params(loaded: LoadedModel, target: Any = None, seed: int = 0) -> Any:
    """The params a run starts from: ``loaded.checkpoint_dir``'s in the run's layer layout
    (restored straight into ``target``, abstract arrays with shardings, when the saved
    layout and tree match it), with a new gist adapter when the run adds one."""
    config = loaded.config
    direct = loaded.saved_scan_layers == config.scan_layers and not loaded.adds_gist_adapter
    _, params, _ = loading.load_checkpoint(
        loaded.checkpoint_dir,
        target=target if direct else None,
        scan_layers=config.scan_layers,
    )
    if loaded.adds_gist_adapter:
        params = add_gist_adapter(params, config, loaded.family, seed)
    return params


def load_params(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    checkpoint_step: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[LoadedModel, Any, int]:
    """``(loaded, params, step)`` for evaluating or serving a run.

    With checkpoints in ``WORKDIR/checkpoints``: the params of ``checkpoint_step`` (default
    the latest), restored onto ``mesh`` with their logical-axis shardings (replicated on one
    device without a mesh). Without: the config's pretrained model, step 0.
    """
    loaded = load_model(config)
    family, model_config = loaded.family, loaded.config
    checkpointer = ckpt_lib.Checkpointer(workdir, async_save=False)
    try:
        steps = checkpointer.all_steps()
        if checkpoint_step is not None and checkpoint_step not in steps:
            raise ckpt_lib.CheckpointError(
                f"no checkpoint for step {checkpoint_step} in {checkpointer.directory} "
                f"(steps: {sorted(steps)})"
            )
        if steps:
            step = checkpoint_step if checkpoint_step is not None else max(steps)
            params = checkpointer.restore_params(
                family.abstract_params(model_config), family.param_axes(model_config), mesh, step
            )
            return loaded, params, int(step)
    finally:
        checkpointer.close()
    if loaded.checkpoint_dir is None:
        raise ckpt_lib.CheckpointError(
            f"no checkpoint in {pathlib.Path(workdir) / ckpt_lib.CHECKPOINT_DIR} and the config's "
            "model is random init: nothing to evaluate"
        )
    return loaded, starting_params(loaded, seed=int(config.train.seed)), 0


def load_converted(checkpoint: str | os.PathLike) -> tuple[Any, Any, Any]:
    """``(config, params, tokenizer)`` of a converted checkpoint directory, or of the
    bundled default model when ``checkpoint == "default"``: with unrolled layers (the
    decoding layout evaluation uses, whatever layout the checkpoint stores) and the params
    placed on the device once."""
    from gist_jax.inference import decode

    if str(checkpoint) == "default":
        from gist_jax.convert.default_model import ensure_default_model

        _, checkpoint = ensure_default_model()
    config, params, tokenizer = loading.load_checkpoint(pathlib.Path(checkpoint), scan_layers=False)
    if tokenizer is None:
        raise ValueError(f"{checkpoint}: the checkpoint has no tokenizer/ directory")
    return config, decode.place_params(params, config, None), tokenizer
