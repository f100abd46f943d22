"""Training data on the mesh: the tokenised train and validation iterators a config names
(``build_data``), each process building only the rows its devices hold, the global batch
the jitted step takes (``global_batch``), and the validation loss over one pass of each
split (``evaluate_loss``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from gist_jax import gist, model_loading, train_config
from gist_jax import sharding as shd


@dataclasses.dataclass
class DataSetup:
    train: Any  # data.BatchIterator
    evals: dict[str, Any]  # split -> data.BatchIterator (one pass, in order)
    pad_id: int
    reports: list[str]


def _host_slice_args(mesh: Any, global_batch: int) -> tuple[int, int]:
    """``(index, count)`` for ``BatchIterator`` so this process builds exactly the rows
    its devices hold (all rows when the batch is replicated across processes)."""
    start, stop = shd.process_batch_rows(mesh, global_batch)
    per = stop - start
    if start % per or global_batch % per:
        raise shd.MeshError(f"process rows [{start}, {stop}) do not tile a batch of {global_batch}")
    return start // per, global_batch // per


def build_data(
    config: ml_collections.ConfigDict, loaded: model_loading.LoadedModel, mesh: Any
) -> DataSetup:
    """Tokenised examples and batch iterators for training and validation loss."""
    from gist_jax import data

    d = config.data
    encoder = data.PieceEncoder(loaded.tokenizer)
    decoder_only = not loaded.family.encoder_decoder
    max_len: int | tuple[int, int] = (
        d.max_length if decoder_only else (d.max_source_length, d.max_target_length)
    )

    def encode(split: str, num: int, mix: bool = False) -> tuple[list[Any], list[str]]:
        examples, load_report = data.load_examples(
            d.source, split, num_examples=None if num < 0 else num, seed=config.train.seed
        )
        notes = [load_report.summary()]
        if mix and d.mix_source:
            extra, note = _mix_examples(d, split, config.train.seed)
            examples, notes = examples + extra, [*notes, note]
        if decoder_only:
            encoded, trunc = data.encode_decoder_examples(
                examples, loaded.tokenizer, d.num_gist_tokens, d.max_length, encoder=encoder
            )
        else:
            encoded, trunc = data.encode_encdec_examples(
                examples,
                loaded.tokenizer,
                d.num_gist_tokens,
                d.max_source_length,
                d.max_target_length,
                encoder=encoder,
            )
        return encoded, [*notes, f"{split}: {trunc.summary()}"]

    def iterator(examples: list[Any], batch: int, train: bool) -> Any:
        index, count = _host_slice_args(mesh, batch)
        return data.BatchIterator(
            examples,
            global_batch_size=batch,
            max_length=max_len,
            pad_id=encoder.pad_id,
            seed=config.train.seed,
            shuffle=train,
            pack=d.packing,
            drop_remainder=train,
            bucket_multiple=d.bucket_multiple,
            process_index=index,
            process_count=count,
            num_epochs=None if train else 1,
            pack_open_rows=d.pack_open_rows,
        )

    train_examples, reports = encode(d.train_split, d.num_train_examples, mix=True)
    if d.visible_fraction:
        train_examples = _with_visible_prompts(
            train_examples, d.visible_fraction, config.train.seed
        )
    train_iter = iterator(train_examples, config.train.batch_size, train=True)
    evals = {}
    for split in config.eval.splits:
        examples, rep = encode(split, config.eval.num_examples)
        reports += rep
        evals[split] = iterator(examples, config.eval.batch_size, train=False)
    return DataSetup(train_iter, evals, encoder.pad_id, reports)


def _mix_examples(d: ml_collections.ConfigDict, split: str, seed: int) -> tuple[list[Any], str]:
    """``data.mix_*``: ``mix_examples`` training examples of ``mix_source`` without the
    excluded tasks (an example's ``task`` is its op names joined by "+"), and a report line."""
    from gist_jax import data

    excluded = {t.strip() for t in d.mix_exclude_tasks.split(",") if t.strip()}
    # Draw extra examples so that the excluded ones can be dropped and mix_examples remain.
    pool, _ = data.load_examples(d.mix_source, split, num_examples=4 * d.mix_examples, seed=seed)
    tasks = [set(str(e.get("task", "")).split("+")) for e in pool]
    unknown = excluded - set().union(*tasks)
    if unknown:  # a misspelt task would leave out nothing, silently
        raise train_config.ConfigError(
            f"data.mix_exclude_tasks: no {d.mix_source} example has task(s) {sorted(unknown)}"
        )
    kept = [e for e, t in zip(pool, tasks, strict=True) if not excluded & t]
    if len(kept) < d.mix_examples:
        raise train_config.ConfigError(
            f"data.mix_source={d.mix_source!r}: only {len(kept)} {split} examples left after "
            f"data.mix_exclude_tasks; data.mix_examples={d.mix_examples}"
        )
    note = (
        f"{d.mix_source}:{split}: mixed in {d.mix_examples} examples "
        f"(left out tasks: {', '.join(sorted(excluded)) or 'none'})"
    )
    return kept[: d.mix_examples], note


def _with_visible_prompts(examples: list[Any], fraction: float, seed: int) -> list[Any]:
    """``data.visible_fraction``: a seeded share of examples loses its gist span (the span
    of an example without gist tokens), so every mask lets it see its whole prompt."""
    chosen = np.random.default_rng(seed).random(len(examples)) < fraction
    return [
        dataclasses.replace(e, gist_first=gist.NO_GIST, gist_last=gist.NO_GIST) if pick else e
        for e, pick in zip(examples, chosen, strict=True)
    ]


def global_batch(
    local: Mapping[str, np.ndarray], keys: Sequence[str], mesh: Any, rows: int
) -> dict:
    missing = [k for k in keys if k not in local]
    if missing:
        raise KeyError(f"batch lacks {missing}; has {sorted(local)}")
    return shd.make_global_batch({k: local[k] for k in keys}, mesh, rows)


def evaluate_loss(
    eval_step: Callable[..., Any],
    params: Any,
    iterators: Mapping[str, Any],
    keys: Sequence[str],
    mesh: Any,
    batch_size: int,
) -> dict[str, float]:
    """Mean token cross-entropy per split over one pass of each iterator."""
    out = {}
    for split, it in iterators.items():
        it.restore({"epoch": 0, "batch": 0})
        sums = []
        for local in it:
            batch = global_batch(local, keys, mesh, batch_size)
            sums.append(eval_step(params, batch))
        sums = jax.device_get(sums)
        total = float(sum(s["loss_sum"] for s in sums))
        count = float(sum(s["loss_tokens"] for s in sums))
        out[f"{split}/loss"] = total / max(count, 1.0)
        out[f"{split}/tokens"] = count
    return out
