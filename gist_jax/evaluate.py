"""Generation evaluation: for each split and each condition (gist, pos_control,
neg_control) decode greedily and score ROUGE-L and exact match against the references.

This module owns the evaluation loop, its outputs and the ``python -m gist_jax.evaluate``
command. The ``gist`` condition decodes through compression (every distinct instruction is
compressed once into a ``GistCache`` and each example's input is decoded from it: the path
users deploy); ``pos_control`` and ``neg_control`` decode the full sequence under their
masks (for a model trained without gist tokens, k = 0, every condition is plain attention
and ``gist`` decodes the full sequence too). Outputs, in ``OUT`` (``WORKDIR/eval/<step>``)::

    metrics.json        split -> condition -> {"rougeL", "exact_match", "n"} (x100 scores)
    predictions.jsonl   one line per split, condition and example (prompt, reference, output)
    compression.json    per split: mean prompt tokens -> k gist tokens, cache bytes per prompt
    run.json            step, timings, compilations per jitted function, truncation reports
    results.md          the two tables above in markdown
    rouge_l.png         bar chart of ROUGE-L per split and condition
    compression.png     prompt tokens vs gist tokens, and bytes per cached prompt

Library use: ``evaluate(model_config, params, tokenizer, splits, conditions, ...)`` returns
an ``EvalReport`` (and writes the files when given ``out_dir``); ``make_train_hook`` adapts
it to the training loop (``gist-train --config.eval.generate=True``). Every process runs it
(decoding is sharded); process 0 writes the files.

    python -m gist_jax.evaluate --config=configs/tiny_llama.py --workdir=DIR [--checkpoint_step=N]
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import pathlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from gist_jax import gist, metrics
from gist_jax.cli.entry import run_app
from gist_jax.eval_report import EvalReport, write_report
from gist_jax.inference import decode, gist_cache, programs
from gist_jax.models.family import family_of

EVAL_DIR = "eval"
DEFAULT_MAX_NEW_TOKENS = 128


@dataclasses.dataclass
class EncodedSplit:
    """A split's examples as prompt token ids, with what gist decoding needs."""

    examples: list[Mapping[str, Any]]  # kept examples (dropped ones removed)
    prompts: list[list[int]]  # LLaMA: BOS ... "Output:"; T5: the encoder source
    gist_first: list[int]
    gist_last: list[int]
    report: dict[str, Any]


def encode_split(
    model_config: Any,
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    num_gist: int,
    max_prompt_length: int,
) -> EncodedSplit:
    """Tokenise examples with the family's template (prompt only), truncated to
    ``max_prompt_length`` tokens (user text is cut first; see ``gist_jax.data.tokenize``)."""
    from gist_jax import data

    encoded, prompts, trunc = data.encode_prompts(
        examples, tokenizer, num_gist, max_prompt_length, family_of(model_config).encoder_decoder
    )
    return EncodedSplit(
        examples=[examples[e.index] for e in encoded],
        prompts=prompts,
        gist_first=[e.gist_first for e in encoded],
        gist_last=[e.gist_last for e in encoded],
        report=trunc.to_dict(),
    )


@contextlib.contextmanager
def _progress_bar(show: bool, total: int, label: str) -> Iterator[Callable[[int], None] | None]:
    """A tqdm bar counting decoded examples (None when not shown)."""
    if not show or jax.process_index() != 0:
        yield None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=f"evaluating {label}", unit="example", leave=False) as bar:
        yield bar.update


def _decode_condition(
    model_config: Any,
    params: Any,
    split: EncodedSplit,
    condition: str,
    num_gist: int,
    **kwargs: Any,
) -> list[decode.Generation]:
    if condition == "gist" and num_gist > 0:
        # The deployed path: compress each distinct instruction once, decode from the cache.
        shared = gist_cache.dedupe_prompts(split.prompts, model_config.gist_token_id)
        cache = gist_cache.compress(
            model_config,
            params,
            shared.prompts,
            batch_size=kwargs["batch_size"],
            mesh=kwargs["mesh"],
        )
        return gist_cache.generate(
            model_config, params, cache.take(shared.rows), shared.inputs, **kwargs
        )
    return decode.generate(model_config, params, split.prompts, condition=condition, **kwargs)


def _compression_figures(model_config: Any, split: EncodedSplit, num_gist: int) -> dict[str, float]:
    """Mean tokens before the gists over the split's distinct prompts, vs k."""
    lengths = {}
    for prompt, first in zip(split.prompts, split.gist_first, strict=True):
        if first >= 0:
            lengths[tuple(prompt[: first + num_gist])] = first
    mean_prompt = float(np.mean(list(lengths.values()))) if lengths else 0.0
    return {
        "distinct_prompts": len(lengths),
        "mean_prompt_tokens": mean_prompt,
        "num_gist_tokens": num_gist,
        "compression_ratio": mean_prompt / num_gist if num_gist else 0.0,
        "gist_cache_bytes_per_prompt": family_of(model_config).cache_bytes(model_config, num_gist),
        "prompt_cache_bytes_per_prompt": family_of(model_config).cache_bytes(
            model_config, mean_prompt
        ),
    }


def evaluate(
    model_config: Any,
    params: Any,
    tokenizer: Any,
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    conditions: Sequence[str] = gist.CONDITIONS,
    *,
    num_gist: int = 1,
    max_prompt_length: int = 512,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = 16,
    mesh: jax.sharding.Mesh | None = None,
    out_dir: str | os.PathLike | None = None,
    step: int = 0,
    progress: bool = False,
) -> EvalReport:
    """Greedy-decode every example of every split under every condition and score it.

    Args:
      model_config, params, tokenizer: the model (any family of ``gist_jax.models.family``); the
        tokenizer must have ``<GIST>`` when ``num_gist > 0``.
      splits: split name -> examples (dicts with ``instruction``, ``input``, ``output``).
      conditions: subset of ``gist.CONDITIONS``.
      num_gist: k, the number of gist tokens the model was trained with.
      max_prompt_length: prompt tokens (LLaMA) / source tokens (T5) kept per example.
      max_new_tokens, batch_size: decoding settings (greedy; ``batch_size`` rows per
        compiled call, a multiple of the mesh's data parallelism).
      mesh: decode on this mesh (params sharded as in training, batch data-parallel).
      out_dir: write the files listed in the module docstring here (process 0).
      step: the training step the params are from (in ``run.json``).
      progress: a bar per split and condition (process 0).

    Returns the ``EvalReport``; its ``metrics`` are ``split -> condition -> {"rougeL",
    "exact_match", "n"}`` (scores x100).
    """
    for condition in conditions:
        gist.check_condition(condition)
    if num_gist > 0 and model_config.gist_token_id is None:
        raise ValueError("num_gist > 0 but the model config has no gist_token_id")
    compiles_before = collections.Counter(programs.TRACE_COUNTS)
    start = time.perf_counter()
    kwargs = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, mesh=mesh)
    params = decode.place_params(params, model_config, mesh)
    results: dict[str, dict[str, dict[str, float]]] = {}
    predictions: list[dict[str, Any]] = []
    compression: dict[str, dict[str, float]] = {}
    reports: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for name, examples in splits.items():
        split = encode_split(model_config, tokenizer, examples, num_gist, max_prompt_length)
        reports[name] = split.report
        if not split.prompts:
            raise ValueError(
                f"split {name!r}: no example fits max_prompt_length={max_prompt_length}"
            )
        compression[name] = _compression_figures(model_config, split, num_gist)
        references = [ex["output"] for ex in split.examples]
        results[name] = {}
        for condition in conditions:
            t0 = time.perf_counter()
            with _progress_bar(progress, len(split.prompts), f"{name} / {condition}") as bar:
                outputs = _decode_condition(
                    model_config, params, split, condition, num_gist, on_batch=bar, **kwargs
                )
            seconds[f"{name}/{condition}"] = time.perf_counter() - t0
            texts = [tokenizer.decode(o.tokens, skip_special_tokens=True).strip() for o in outputs]
            results[name][condition] = {
                "rougeL": metrics.rouge_l(texts, references),
                "exact_match": metrics.exact_match(texts, references),
                "n": len(texts),
            }
            for ex, prompt, text, out in zip(
                split.examples, split.prompts, texts, outputs, strict=True
            ):
                predictions.append(
                    {
                        "split": name,
                        "condition": condition,
                        "instruction": ex["instruction"],
                        "input": ex["input"],
                        "reference": ex["output"],
                        "prediction": text,
                        "finished": out.finished,
                        "prompt_tokens": len(prompt),
                    }
                )
    compiles = {
        k: v - compiles_before.get(k, 0)
        for k, v in programs.TRACE_COUNTS.items()
        if v - compiles_before.get(k, 0)
    }
    run = {
        "step": int(step),
        "seconds": time.perf_counter() - start,
        "seconds_per_condition": seconds,
        "compilations": compiles,
        "truncation": reports,
        "settings": {
            "conditions": list(conditions),
            "num_gist": num_gist,
            "max_prompt_length": max_prompt_length,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
        },
    }
    report = EvalReport(results, predictions, compression, run)
    if out_dir is not None and jax.process_index() == 0:
        write_report(report, out_dir)
    return report


# ---------------------------------------------------------------------------------------
# Settings from a training config, and the training-loop hook


def settings_from_config(config: Any) -> dict[str, Any]:
    """``evaluate`` keyword arguments from a training config (``gist_jax.train_config``).

    ``eval.max_new_tokens`` and ``eval.conditions`` are read when the config has them
    (defaults: 128 for decoder-only, ``data.max_target_length`` for T5; all conditions).
    """
    e = config.eval
    from gist_jax import model_loading

    encdec = model_loading.family_of_run(config).encoder_decoder
    max_new = e.get("max_new_tokens", None) or (
        config.data.max_target_length if encdec else DEFAULT_MAX_NEW_TOKENS
    )
    return {
        "conditions": tuple(e.get("conditions", None) or gist.CONDITIONS),
        "num_gist": int(config.data.num_gist_tokens),
        "max_prompt_length": int(
            config.data.max_source_length if encdec else config.data.max_length
        ),
        "max_new_tokens": int(max_new),
        "batch_size": int(e.batch_size),
    }


def load_splits(
    config: Any, splits: Sequence[str] | None = None, num_examples: int | None = None
) -> dict[str, list[dict[str, Any]]]:
    """The evaluation examples a training config names (``eval.splits``, ``eval.num_examples``
    from ``data.source``)."""
    from gist_jax import data

    names = list(splits or config.eval.splits)
    n = config.eval.num_examples if num_examples is None else num_examples
    out = {}
    for name in names:
        examples, _ = data.load_examples(
            config.data.source, name, num_examples=None if n < 0 else n, seed=config.train.seed
        )
        out[name] = examples
    return out


def make_train_hook(config: Any) -> Any:
    """A hook for ``gist_jax.train.loop.train_and_evaluate`` (``gist-train`` passes it when
    ``eval.generate`` is set) that evaluates the current params on the config's
    splits (loaded once, here), writes ``WORKDIR/eval/<step>``, and returns flat metrics
    ``"<split>/<condition>/rougeL"`` and ``.../exact_match`` for the training log."""
    splits = load_splits(config)
    settings = settings_from_config(config)

    def hook(context: Any) -> dict[str, float]:
        result = evaluate(
            context.model_config,
            context.params,
            context.tokenizer,
            splits,
            mesh=context.mesh,
            out_dir=pathlib.Path(context.workdir) / EVAL_DIR / str(context.step),
            step=context.step,
            **settings,
        )
        return {
            f"{split}/{condition}/{key}": float(value)
            for split, by_condition in result.metrics.items()
            for condition, values in by_condition.items()
            for key, value in values.items()
            if key != "n"
        }

    return hook


# ---------------------------------------------------------------------------------------
# Command line


def _define_flags() -> None:
    from absl import flags

    from gist_jax.cli import run_flags

    run_flags.define(
        "The training config of the run", "The run's workdir (checkpoints; eval/ is written here)."
    )
    flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step to evaluate (default: latest).")
    flags.DEFINE_list("splits", None, "Splits (default: the config's eval.splits).")
    flags.DEFINE_list("conditions", None, f"Subset of {','.join(gist.CONDITIONS)} (default: all).")
    flags.DEFINE_integer("num_examples", None, "Examples per split (default: eval.num_examples).")
    flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate (default: from the config).")


def main(argv: Sequence[str]) -> None:
    from absl import app, flags

    from gist_jax import model_loading, sharding
    from gist_jax.cli import run_flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if f.config is None or not f.workdir:
        raise app.UsageError("--config and --workdir are required")
    run_flags.initialize_distributed("gist-eval")
    config = f.config
    mesh = sharding.make_mesh(
        {"data": config.mesh.data, "fsdp": config.mesh.fsdp, "tensor": config.mesh.tensor}
    )
    loaded, params, step = model_loading.load_params(config, f.workdir, f.checkpoint_step, mesh)
    model_config, tokenizer = loaded.config, loaded.tokenizer
    settings = settings_from_config(config)
    if f.conditions:
        settings["conditions"] = tuple(f.conditions)
    if f.max_new_tokens:
        settings["max_new_tokens"] = f.max_new_tokens
    out_dir = pathlib.Path(f.workdir) / EVAL_DIR / str(step)
    evaluate(
        model_config,
        params,
        tokenizer,
        load_splits(config, f.splits, f.num_examples),
        mesh=mesh,
        out_dir=out_dir,
        step=step,
        progress=True,
        **settings,
    )
    if jax.process_index() == 0:
        print((out_dir / "results.md").read_text())
        print(f"wrote {out_dir}")


def run() -> None:
    """Console script entry point (``gist-eval``)."""
    _define_flags()
    run_app(main, "gist-eval")


if __name__ == "__main__":
    run()
