"""Helpers shared by the training tests: load a ``configs/*.py`` file with overrides (as
``--config.KEY=VALUE`` would), read per-step losses back from a workdir, and make the
quick tiny-run settings the tests use (one padded length, so one compilation per mesh)."""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Mapping
from typing import Any

import ml_collections

from gist_jax.train.metrics_log import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]

# Short runs: one bucket (max_length) so each mesh compiles the step once, a small eval.
QUICK = {
    "data.bucket_multiple": 64,
    "data.num_train_examples": 400,
    "train.log_every": 1,
    "train.eval_every": 0,
    "train.export": False,
    "eval.splits": ("validation_seen",),
    "eval.num_examples": 16,
}


def load_config(name: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """``configs/<name>.py``'s config with dotted-key overrides, locked like the CLI's."""
    path = REPO / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.lock()
    for key, value in (overrides or {}).items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def quick_config(name: str = "tiny_llama", **overrides: Any) -> ml_collections.ConfigDict:
    """A tiny config with ``QUICK`` settings; ``overrides`` use ``__`` for dots."""
    merged = dict(QUICK)
    merged.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(name, merged)


def step_losses(workdir: str | pathlib.Path) -> dict[int, float]:
    """Per-step training loss from ``metrics.jsonl`` (the last record wins for a step)."""
    return {r["step"]: r["loss"] for r in read_metrics(workdir, "train")}


def step_hook():
    """An evaluation hook for ``train_and_evaluate(eval_hooks=...)``: reports what it was given."""
    import jax

    def hook(context) -> dict[str, float]:
        params = sum(int(x.size) for x in jax.tree.leaves(context.params))
        return {"hook/step": float(context.step), "hook/params": float(params)}

    return hook
