"""Batches of encoded examples: padding to length buckets, packing, per-host slicing, and a
deterministic iterator whose position can be saved and restored.

This module owns the step from encoded examples (``tokenize.DecoderExample`` /
``tokenize.EncDecExample``) to the numpy batch dicts of the shared contract:

* decoder-only, all ``[B, L]``: ``input_ids``, ``positions`` (per example, ``-1`` at
  padding), ``segment_ids`` (1, 2, ... per example in a row, 0 at padding), ``targets``
  (next token of the same example, 0 where none), ``loss_mask`` (1.0 where ``targets`` is a
  completion token, EOS included), ``gist_first`` / ``gist_last`` (the token's own example's
  gist span in per-example positions, ``-1`` without gist tokens or at padding);
* encoder-decoder: ``encoder_{input_ids,positions,segment_ids,gist_first,gist_last}``
  ``[B, Ls]`` and ``decoder_{input_ids,positions,segment_ids,gist_first,gist_last}``,
  ``targets``, ``loss_mask`` ``[B, Lt]``; ``decoder_input_ids`` is the target shifted right
  behind the decoder start id (= pad id), and the decoder spans are those of the encoder
  example the decoder token belongs to.

Rows hold one example each (padding) or several (``pack=True``: packing in the epoch's
order, next-fit or first-fit over ``pack_open_rows`` open rows (``pack_rows``); positions
restart at 0 per example and segments keep examples apart).

Global batches and hosts: a global batch is ``global_batch_size`` rows. Its padded length
is the smallest bucket (a multiple of ``bucket_multiple``, capped at the maximum length)
that holds its longest row, so a jitted step sees only a handful of shapes. Every host
computes the same plan from the examples' lengths (all hosts hold the encoded dataset, which
is cheap), so all hosts agree on the shape, then builds arrays only for its own rows:
process ``p`` of ``P`` gets rows ``[p * G / P, (p + 1) * G / P)`` (contiguous; ``G`` must be
divisible by ``P``), ready for ``jax.make_array_from_process_local_data``.

Epochs and remainder: epoch ``e`` uses the permutation ``default_rng([seed, e])`` of the
examples (or file order with ``shuffle=False``). With ``drop_remainder=True`` (training)
the last incomplete global batch of an epoch is dropped (the next epoch reshuffles, so no
example is always left out); with ``drop_remainder=False`` (evaluation) it is filled up
with empty rows (all padding, ``loss_mask`` 0), so the global batch size never changes.

Resuming: ``BatchIterator.state`` is ``{"epoch": e, "batch": b}`` (plain ints, for the
checkpoint); an iterator built with the same arguments and ``restore(state)`` yields
exactly the batches the original would have yielded next.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from gist_jax.data.tokenize import DecoderExample, EncDecExample

Example = DecoderExample | EncDecExample
Batch = dict[str, np.ndarray]
Plan = list[list[list[int]]]  # global batches -> rows -> example positions


def _lengths(example: Example) -> tuple[int, ...]:
    if isinstance(example, DecoderExample):
        return (example.length,)
    return (len(example.source), len(example.target))


def bucket_length(length: int, multiple: int, max_length: int) -> int:
    """``length`` rounded up to a multiple of ``multiple``, at most ``max_length``."""
    if length > max_length:
        raise ValueError(f"length {length} exceeds the maximum length {max_length}")
    return min(max_length, -(-max(length, 1) // multiple) * multiple)


def collate_decoder(rows: Sequence[Sequence[DecoderExample]], length: int, pad_id: int) -> Batch:
    """Decoder-only batch ``[len(rows), length]``; each row holds its examples in order
    (an empty row is all padding)."""
    shape = (len(rows), length)
    batch = {
        "input_ids": np.full(shape, pad_id, np.int32),
        "positions": np.full(shape, -1, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
        "targets": np.zeros(shape, np.int32),
        "loss_mask": np.zeros(shape, np.float32),
        "gist_first": np.full(shape, -1, np.int32),
        "gist_last": np.full(shape, -1, np.int32),
    }
    for r, row in enumerate(rows):
        start = 0
        for segment, example in enumerate(row, start=1):
            tokens = example.tokens
            n, end = len(tokens), start + len(tokens)
            if end > length:
                raise ValueError(f"row {r}: examples need {end} tokens, batch length is {length}")
            batch["input_ids"][r, start:end] = tokens
            batch["positions"][r, start:end] = np.arange(n)
            batch["segment_ids"][r, start:end] = segment
            batch["targets"][r, start : end - 1] = tokens[1:]
            # targets[i] = tokens[i + 1]; completion tokens are tokens[len(prompt):].
            batch["loss_mask"][r, start + len(example.prompt) - 1 : end - 1] = 1.0
            batch["gist_first"][r, start:end] = example.gist_first
            batch["gist_last"][r, start:end] = example.gist_last
            start = end
    return batch


def collate_encdec(
    rows: Sequence[Sequence[EncDecExample]], source_length: int, target_length: int, pad_id: int
) -> Batch:
    """Encoder-decoder batch: encoder arrays ``[B, source_length]``, decoder arrays
    ``[B, target_length]``; the decoder start id is ``pad_id`` (T5's convention)."""
    enc_shape, dec_shape = (len(rows), source_length), (len(rows), target_length)
    batch = {
        "encoder_input_ids": np.full(enc_shape, pad_id, np.int32),
        "encoder_positions": np.full(enc_shape, -1, np.int32),
        "encoder_segment_ids": np.zeros(enc_shape, np.int32),
        "encoder_gist_first": np.full(enc_shape, -1, np.int32),
        "encoder_gist_last": np.full(enc_shape, -1, np.int32),
        "decoder_input_ids": np.full(dec_shape, pad_id, np.int32),
        "decoder_positions": np.full(dec_shape, -1, np.int32),
        "decoder_segment_ids": np.zeros(dec_shape, np.int32),
        "decoder_gist_first": np.full(dec_shape, -1, np.int32),
        "decoder_gist_last": np.full(dec_shape, -1, np.int32),
        "targets": np.zeros(dec_shape, np.int32),
        "loss_mask": np.zeros(dec_shape, np.float32),
    }
    for r, row in enumerate(rows):
        s0 = t0 = 0
        for segment, example in enumerate(row, start=1):
            s1, t1 = s0 + len(example.source), t0 + len(example.target)
            if s1 > source_length or t1 > target_length:
                raise ValueError(
                    f"row {r}: examples need {s1} source / {t1} target tokens, batch lengths "
                    f"are {source_length} / {target_length}"
                )
            batch["encoder_input_ids"][r, s0:s1] = example.source
            batch["encoder_positions"][r, s0:s1] = np.arange(s1 - s0)
            batch["encoder_segment_ids"][r, s0:s1] = segment
            batch["encoder_gist_first"][r, s0:s1] = example.gist_first
            batch["encoder_gist_last"][r, s0:s1] = example.gist_last
            batch["decoder_input_ids"][r, t0] = pad_id
            batch["decoder_input_ids"][r, t0 + 1 : t1] = example.target[:-1]
            batch["decoder_positions"][r, t0:t1] = np.arange(t1 - t0)
            batch["decoder_segment_ids"][r, t0:t1] = segment
            batch["decoder_gist_first"][r, t0:t1] = example.gist_first
            batch["decoder_gist_last"][r, t0:t1] = example.gist_last
            batch["targets"][r, t0:t1] = example.target
            batch["loss_mask"][r, t0:t1] = 1.0
            s0, t0 = s1, t1
    return batch


def pack_rows(
    order: Sequence[int],
    lengths: Sequence[tuple[int, ...]],
    capacity: tuple[int, ...],
    open_rows: int = 1,
) -> list[list[int]]:
    """Pack examples into rows of at most ``capacity`` tokens (per dimension), walking
    ``order``: each example goes into the first of the ``open_rows`` most recently opened
    rows that has room, else into a new row; opening a row beyond ``open_rows`` closes the
    oldest one. Rows come out in the order they close. ``open_rows=1`` is next-fit (a new
    row whenever the next example overflows the current one); a few open rows let short
    examples fill the gaps next-fit leaves (first-fit over a window). Deterministic, and
    an example never moves more than ``open_rows`` rows from its place in ``order``."""
    if open_rows < 1:
        raise ValueError(f"open_rows must be >= 1, got {open_rows}")
    closed: list[list[int]] = []
    rows: list[list[int]] = []  # open rows, oldest first
    used: list[list[int]] = []
    for i in order:
        need = lengths[i]
        for row, filled in zip(rows, used, strict=True):
            if all(u + n <= c for u, n, c in zip(filled, need, capacity, strict=True)):
                row.append(i)
                filled[:] = [u + n for u, n in zip(filled, need, strict=True)]
                break
        else:
            if len(rows) == open_rows:
                closed.append(rows.pop(0))
                used.pop(0)
            rows.append([i])
            used.append(list(need))
    return closed + rows


def host_slice(global_size: int, process_index: int, process_count: int) -> slice:
    """The contiguous rows of a global batch that process ``process_index`` builds."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index {process_index} / process_count {process_count}")
    if global_size % process_count:
        raise ValueError(
            f"global batch size {global_size} is not divisible by the process count {process_count}"
        )
    per_host = global_size // process_count
    return slice(process_index * per_host, (process_index + 1) * per_host)


class BatchIterator(Iterator[Batch]):
    """Deterministic, resumable iterator of host-local batches (see the module docstring).

    Args:
      examples: encoded examples, all ``DecoderExample`` or all ``EncDecExample``.
      global_batch_size: rows per global batch (all hosts together).
      max_length: decoder-only total length, or ``(source, target)`` lengths for T5.
      pad_id: id at padding positions (and the T5 decoder start id).
      seed: shuffling seed; epoch ``e`` uses ``default_rng([seed, e])``.
      shuffle: False keeps the examples' order (evaluation).
      pack: pack several examples per row instead of one.
      drop_remainder: drop (True) or fill with empty rows (False) the last partial batch.
      bucket_multiple: padded lengths are multiples of this (capped at ``max_length``).
      process_index, process_count: which contiguous slice of rows this host builds.
      num_epochs: stop after this many epochs (None: never stop).
      pack_open_rows: rows kept open while packing (``pack_rows``; 1: next-fit).
    """

    def __init__(
        self,
        examples: Sequence[Example],
        global_batch_size: int,
        max_length: int | tuple[int, int],
        pad_id: int,
        seed: int = 0,
        shuffle: bool = True,
        pack: bool = False,
        drop_remainder: bool = True,
        bucket_multiple: int = 32,
        process_index: int = 0,
        process_count: int = 1,
        num_epochs: int | None = None,
        pack_open_rows: int = 1,
    ):
        if not examples:
            raise ValueError("no examples to batch")
        self.decoder_only = isinstance(examples[0], DecoderExample)
        kind = DecoderExample if self.decoder_only else EncDecExample
        if not all(isinstance(ex, kind) for ex in examples):
            raise TypeError("examples must all be DecoderExample or all EncDecExample")
        capacity = (max_length,) if isinstance(max_length, int) else tuple(max_length)
        if len(capacity) != (1 if self.decoder_only else 2):
            raise ValueError(
                "max_length must be an int for decoder-only examples and a "
                f"(source, target) pair for encoder-decoder examples, got {max_length!r}"
            )
        if global_batch_size < 1 or bucket_multiple < 1 or pack_open_rows < 1:
            raise ValueError("global_batch_size, bucket_multiple and pack_open_rows must be >= 1")
        self.examples = list(examples)
        self.lengths = [_lengths(ex) for ex in self.examples]
        for i, need in enumerate(self.lengths):
            if any(n > c for n, c in zip(need, capacity, strict=True)):
                raise ValueError(
                    f"example {i} (source index {self.examples[i].index}) has length "
                    f"{need}, more than max_length {capacity}; encode with the same limits"
                )
        self.capacity = capacity
        self.global_batch_size = global_batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.shuffle = shuffle
        self.pack = pack
        self.pack_open_rows = pack_open_rows
        self.drop_remainder = drop_remainder
        self.bucket_multiple = bucket_multiple
        self.rows = host_slice(global_batch_size, process_index, process_count)
        self.num_epochs = num_epochs
        self._epoch = 0
        self._batch = 0
        self._plan_cache: tuple[int, Plan] | None = None
        if not self.plan(0):
            raise ValueError(
                f"{len(self.examples)} examples make no full global batch of "
                f"{global_batch_size} rows; lower the batch size or use drop_remainder=False"
            )

    # -- planning ---------------------------------------------------------------------------

    def order(self, epoch: int) -> np.ndarray:
        """Example positions in the order epoch ``epoch`` visits them."""
        if not self.shuffle:
            return np.arange(len(self.examples))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def plan(self, epoch: int) -> Plan:
        """All global batches of an epoch: lists of rows of example positions (empty rows
        fill an incomplete last batch when ``drop_remainder`` is False)."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        order = self.order(epoch).tolist()
        if self.pack:
            rows = pack_rows(order, self.lengths, self.capacity, self.pack_open_rows)
        else:
            rows = [[i] for i in order]
        size = self.global_batch_size
        batches = [rows[i : i + size] for i in range(0, len(rows), size)]
        if batches and len(batches[-1]) < size:
            if self.drop_remainder:
                batches.pop()
            else:
                batches[-1] = batches[-1] + [[] for _ in range(size - len(batches[-1]))]
        self._plan_cache = (epoch, batches)
        return batches

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        return len(self.plan(self._epoch if epoch is None else epoch))

    def batch_lengths(self, global_rows: Sequence[Sequence[int]]) -> tuple[int, ...]:
        """Padded lengths of a global batch: the bucket of its longest row, per dimension."""
        out = []
        for d, cap in enumerate(self.capacity):
            longest = max(sum(self.lengths[i][d] for i in row) for row in global_rows)
            out.append(bucket_length(longest, self.bucket_multiple, cap))
        return tuple(out)

    def build(self, global_rows: Sequence[Sequence[int]]) -> Batch:
        """This host's slice of a global batch as a batch dict."""
        lengths = self.batch_lengths(global_rows)
        rows = [[self.examples[i] for i in row] for row in global_rows[self.rows]]
        if self.decoder_only:
            return collate_decoder(rows, lengths[0], self.pad_id)
        return collate_encdec(rows, lengths[0], lengths[1], self.pad_id)

    def host_example_positions(self, epoch: int, batch: int) -> list[list[int]]:
        """Positions (in ``examples``) of the examples in each of this host's rows of a
        batch, e.g. to match generated outputs with references."""
        return [list(row) for row in self.plan(epoch)[batch][self.rows]]

    # -- iteration and state ----------------------------------------------------------------

    @property
    def state(self) -> dict[str, int]:
        """Where the iterator is: the next batch to yield is ``batch`` of ``epoch``."""
        return {"epoch": self._epoch, "batch": self._batch}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved ``state`` (the iterator must be built with the same
        examples and arguments as the one that produced it)."""
        try:
            epoch, batch = int(state["epoch"]), int(state["batch"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"bad data iterator state {state!r}: {err}") from None
        if epoch < 0 or not 0 <= batch <= len(self.plan(epoch)):
            raise ValueError(
                f"data iterator state {dict(state)} is out of range (epoch {epoch} has "
                f"{len(self.plan(max(epoch, 0)))} batches)"
            )
        self._epoch, self._batch = epoch, batch

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        while True:
            if self.num_epochs is not None and self._epoch >= self.num_epochs:
                raise StopIteration
            plan = self.plan(self._epoch)
            if self._batch < len(plan):
                break
            if not plan:
                raise ValueError(f"epoch {self._epoch} has no full global batch")
            self._epoch, self._batch = self._epoch + 1, 0
        batch = self.build(plan[self._batch])
        self._batch += 1
        return batch
