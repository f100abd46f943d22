"""Batching: the contract's batch dicts (checked token by token and against the dense gist
mask reference), packing vs padding equivalence, length buckets, per-host slices that
concatenate to the one-host batch, remainder policies, and exact resumption."""

from __future__ import annotations

import json

import fixtures_data
import numpy as np
import pytest

from gist_jax.data import batching, synthetic, tokenize
from gist_jax.data.batching import BatchIterator
from gist_jax.data.templates import GIST_TOKEN

MAX_LEN = 96
SOURCE_LEN, TARGET_LEN = 80, 24

smollm2_tokenizer = fixtures_data.smollm2_tokenizer
t5_tokenizer = fixtures_data.t5_tokenizer


@pytest.fixture(scope="module")
def raw_examples():
    return [
        *synthetic.make_split("train", 40, seed=3),
        {"instruction": "Say hi.", "input": "", "output": "hi"},  # no Input: line
    ]


@pytest.fixture(scope="module")
def dec_examples(smollm2_tokenizer, raw_examples):
    kept, report = tokenize.encode_decoder_examples(raw_examples, smollm2_tokenizer, 2, MAX_LEN)
    assert report.kept == len(raw_examples)
    return kept


@pytest.fixture(scope="module")
def dec_examples_k0(smollm2_tokenizer, raw_examples):
    return tokenize.encode_decoder_examples(raw_examples, smollm2_tokenizer, 0, MAX_LEN)[0]


@pytest.fixture(scope="module")
def encdec_examples(t5_tokenizer, raw_examples):
    kept, report = tokenize.encode_encdec_examples(
        raw_examples, t5_tokenizer, 1, SOURCE_LEN, TARGET_LEN
    )
    assert report.kept == len(raw_examples)
    return kept


def _dec_segments(batch):
    """Per (row, segment): tokens, loss targets, positions and spans, read back."""
    out = []
    for r in range(batch["input_ids"].shape[0]):
        for s in range(1, batch["segment_ids"][r].max() + 1):
            sel = batch["segment_ids"][r] == s
            loss = batch["loss_mask"][r][sel] > 0
            out.append(
                (
                    tuple(batch["input_ids"][r][sel]),
                    tuple(batch["targets"][r][sel][loss]),
                    tuple(batch["positions"][r][sel]),
                    tuple(batch["gist_first"][r][sel]),
                    tuple(batch["gist_last"][r][sel]),
                )
            )
    return out


def _expected_dec_segment(ex):
    n = ex.length
    return (
        tuple(ex.tokens),
        tuple(ex.completion),
        tuple(range(n)),
        (ex.gist_first,) * n,
        (ex.gist_last,) * n,
    )


def test_collate_decoder_contract(dec_examples):
    rows = [[dec_examples[0]], [dec_examples[1], dec_examples[2]], []]
    batch = batching.collate_decoder(rows, 160, pad_id=7)
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
        "input_ids": ((3, 160), "int32"),
        "positions": ((3, 160), "int32"),
        "segment_ids": ((3, 160), "int32"),
        "targets": ((3, 160), "int32"),
        "loss_mask": ((3, 160), "float32"),
        "gist_first": ((3, 160), "int32"),
        "gist_last": ((3, 160), "int32"),
    }
    assert _dec_segments(batch) == [_expected_dec_segment(dec_examples[i]) for i in range(3)]
    a, b = dec_examples[1], dec_examples[2]
    row = {k: v[1] for k, v in batch.items()}
    end = a.length + b.length
    np.testing.assert_array_equal(row["segment_ids"][:end], [1] * a.length + [2] * b.length)
    # targets: next token of the same example, 0 at each example's last token
    np.testing.assert_array_equal(row["targets"][: a.length], [*a.tokens[1:], 0])
    # loss on completion tokens only: the prediction made at "Output:" onwards
    mask = row["loss_mask"][: a.length]
    assert mask.sum() == len(a.completion) and mask[len(a.prompt) - 2] == 0
    assert mask[len(a.prompt) - 1] == 1 and mask[-1] == 0
    # padding
    assert (row["input_ids"][end:] == 7).all() and (row["positions"][end:] == -1).all()
    assert (row["segment_ids"][end:] == 0).all() and (row["loss_mask"][end:] == 0).all()
    assert (row["gist_first"][end:] == -1).all() and (row["targets"][end:] == 0).all()
    empty = {k: v[2] for k, v in batch.items()}
    assert (empty["positions"] == -1).all() and empty["loss_mask"].sum() == 0
    with pytest.raises(ValueError, match="row 0: examples need"):
        batching.collate_decoder([[dec_examples[0]]], dec_examples[0].length - 1, 0)


@pytest.mark.parametrize("condition", ["gist", "pos_control", "neg_control"])
def test_packed_batch_mask_equals_dense_reference(smollm2_tokenizer, dec_examples, condition):
    """The train step's mask from a packed batch (positions, segments, per-token spans)
    equals, block by block, the dense gist mask of each example on its own."""
    from gist_jax import gist

    gist_id = smollm2_tokenizer.convert_tokens_to_ids(GIST_TOKEN)
    rows = [dec_examples[0:3], dec_examples[3:5]]
    length = 256
    batch = batching.collate_decoder(rows, length, pad_id=0)
    mask = np.asarray(
        gist.decoder_self_mask(
            batch["positions"],
            batch["positions"],
            batch["gist_first"],
            batch["gist_last"],
            condition,
            batch["segment_ids"],
            batch["segment_ids"],
        )
    )[:, 0]
    for r, row in enumerate(rows):
        expected = np.zeros((length, length), bool)
        start = 0
        for ex in row:
            n = ex.length
            dense = np.asarray(gist.make_gist_mask(ex.tokens[None], gist_id, None, condition))
            expected[start : start + n, start : start + n] = dense[0, 0] & np.tri(n, dtype=bool)
            start += n
        np.testing.assert_array_equal(mask[r], expected)


def test_encoder_mask_from_packed_batch(t5_tokenizer, encdec_examples):
    from gist_jax import gist

    gist_id = t5_tokenizer.convert_tokens_to_ids(GIST_TOKEN)
    rows = [encdec_examples[0:2]]
    batch = batching.collate_encdec(rows, 2 * SOURCE_LEN, 2 * TARGET_LEN, pad_id=0)
    mask = np.asarray(
        gist.encoder_self_mask(
            batch["encoder_positions"],
            batch["encoder_positions"],
            batch["encoder_gist_first"],
            batch["encoder_gist_last"],
            "gist",
            batch["encoder_segment_ids"],
            batch["encoder_segment_ids"],
        )
    )[0, 0]
    start = 0
    for ex in rows[0]:
        n = len(ex.source)
        dense = np.asarray(gist.make_gist_mask(ex.source[None], gist_id))[0, 0]
        np.testing.assert_array_equal(mask[start : start + n, start : start + n], dense)
        assert not mask[start : start + n, :start].any()
        assert not mask[start : start + n, start + n :].any()
        start += n


def test_collate_encdec_contract(encdec_examples):
    a, b = encdec_examples[0], encdec_examples[1]
    batch = batching.collate_encdec([[a, b], [b]], 2 * SOURCE_LEN, 2 * TARGET_LEN, pad_id=0)
    assert batch["encoder_input_ids"].shape == (2, 2 * SOURCE_LEN)
    assert batch["decoder_input_ids"].shape == (2, 2 * TARGET_LEN)
    sa, ta = len(a.source), len(a.target)
    tb = len(b.target)
    np.testing.assert_array_equal(batch["encoder_input_ids"][0, :sa], a.source)
    np.testing.assert_array_equal(batch["encoder_positions"][0, sa : sa + 3], [0, 1, 2])
    np.testing.assert_array_equal(batch["decoder_input_ids"][0, :ta], [0, *a.target[:-1]])
    np.testing.assert_array_equal(batch["decoder_input_ids"][0, ta : ta + tb], [0, *b.target[:-1]])
    np.testing.assert_array_equal(
        batch["targets"][0, : ta + tb], np.concatenate([a.target, b.target])
    )
    np.testing.assert_array_equal(
        batch["loss_mask"][0], [1.0] * (ta + tb) + [0.0] * (2 * TARGET_LEN - ta - tb)
    )
    np.testing.assert_array_equal(batch["decoder_segment_ids"][0, : ta + tb], [1] * ta + [2] * tb)
    np.testing.assert_array_equal(batch["decoder_positions"][0, ta : ta + tb], np.arange(tb))
    assert (batch["decoder_gist_first"][0, :ta] == a.gist_first).all()
    assert (batch["decoder_gist_last"][0, ta : ta + tb] == b.gist_last).all()
    assert (batch["encoder_gist_first"][0, sa : sa + len(b.source)] == b.gist_first).all()
    assert (batch["decoder_positions"][1, tb:] == -1).all()
    assert (batch["encoder_segment_ids"][1, len(b.source) :] == 0).all()


def test_bucket_length():
    assert batching.bucket_length(1, 32, 512) == 32
    assert batching.bucket_length(32, 32, 512) == 32
    assert batching.bucket_length(33, 32, 512) == 64
    assert batching.bucket_length(490, 32, 500) == 500
    with pytest.raises(ValueError, match="length 513 exceeds the maximum length 512"):
        batching.bucket_length(513, 32, 512)


def test_pack_rows_next_fit():
    lengths = [(5,), (4,), (3,), (6,), (1,)]
    assert batching.pack_rows([0, 1, 2, 3, 4], lengths, (10,)) == [[0, 1], [2, 3, 4]]
    lengths2 = [(5, 1), (4, 9), (3, 1)]
    assert batching.pack_rows([0, 1, 2], lengths2, (10, 10)) == [[0, 1], [2]]
    assert batching.pack_rows([2, 0, 1], lengths2, (10, 5)) == [[2, 0], [1]]


def test_pack_rows_first_fit_over_open_rows():
    lengths = [(6,), (6,), (4,), (4,)]
    # Next-fit leaves row [0] 4 slots short; with two open rows example 3 fills that gap.
    assert batching.pack_rows(range(4), lengths, (10,)) == [[0], [1, 2], [3]]
    assert batching.pack_rows(range(4), lengths, (10,), open_rows=2) == [[0, 2], [1, 3]]
    # Opening a third row closes the oldest: examples 4 and 5 cannot go back to [0, 2].
    assert batching.pack_rows(range(6), [(6,), (6,), (3,), (9,), (1,), (1,)], (10,), 2) == [
        [0, 2],
        [1, 4, 5],
        [3],
    ]
    # Every example is placed exactly once, no row overflows, and more open rows never
    # need more rows on this data.
    rng = np.random.default_rng(0)
    many = [(int(n),) for n in rng.integers(1, 60, size=500)]
    counts = []
    for open_rows in (1, 2, 4, 8):
        rows = batching.pack_rows(rng.permutation(500).tolist(), many, (96,), open_rows)
        assert sorted(i for row in rows for i in row) == list(range(500))
        assert all(sum(many[i][0] for i in row) <= 96 for row in rows)
        counts.append(len(rows))
    assert counts == sorted(counts, reverse=True) and counts[-1] < counts[0], counts
    with pytest.raises(ValueError, match="open_rows must be >= 1"):
        batching.pack_rows([0], [(1,)], (10,), open_rows=0)


def _epoch(iterator):
    out = []
    for _ in range(iterator.batches_per_epoch()):
        out.append(next(iterator))
    return out


@pytest.mark.parametrize("open_rows", [1, 4])
@pytest.mark.parametrize("family", ["decoder", "encdec"])
def test_packing_and_padding_hold_the_same_content(
    dec_examples, encdec_examples, family, open_rows
):
    if family == "decoder":
        examples, max_length = dec_examples, MAX_LEN
    else:
        examples, max_length = encdec_examples, (SOURCE_LEN, TARGET_LEN)
    kwargs = dict(max_length=max_length, pad_id=0, seed=5, drop_remainder=False, bucket_multiple=16)
    padded = BatchIterator(examples, 4, pack=False, **kwargs)
    packed = BatchIterator(examples, 4, pack=True, pack_open_rows=open_rows, **kwargs)
    padded_batches, packed_batches = _epoch(padded), _epoch(packed)
    assert len(packed_batches) < len(padded_batches)
    if family == "decoder":
        got_padded = sorted(s for b in padded_batches for s in _dec_segments(b))
        got_packed = sorted(s for b in packed_batches for s in _dec_segments(b))
        assert got_padded == got_packed == sorted(_expected_dec_segment(e) for e in examples)
        # positions restart per packed example
        assert max(b["segment_ids"].max() for b in packed_batches) > 1
    else:

        def content(batches):
            out = []
            for b in batches:
                for r in range(b["targets"].shape[0]):
                    for s in range(1, b["decoder_segment_ids"][r].max() + 1):
                        enc = b["encoder_segment_ids"][r] == s
                        dec = b["decoder_segment_ids"][r] == s
                        out.append(
                            (
                                tuple(b["encoder_input_ids"][r][enc]),
                                tuple(b["targets"][r][dec & (b["loss_mask"][r] > 0)]),
                                tuple(b["decoder_input_ids"][r][dec]),
                                tuple(b["encoder_positions"][r][enc]),
                            )
                        )
            return sorted(out)

        expected = sorted(
            (tuple(e.source), tuple(e.target), (0, *e.target[:-1]), tuple(range(len(e.source))))
            for e in examples
        )
        assert content(padded_batches) == content(packed_batches) == expected


def test_bucketed_lengths_and_global_batch_shape(dec_examples):
    it = BatchIterator(dec_examples, 4, MAX_LEN, pad_id=0, seed=1, bucket_multiple=16)
    shapes = set()
    for batch in _epoch(it):
        length = batch["input_ids"].shape[1]
        longest = (batch["positions"] >= 0).sum(axis=1).max()
        assert length % 16 == 0 and longest <= length < longest + 16
        assert batch["input_ids"].shape[0] == 4
        shapes.add(length)
    assert len(shapes) >= 2  # real bucketing, not one padded length


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("family", ["decoder", "encdec"])
@pytest.mark.parametrize("hosts", [2, 4])
def test_host_slices_concatenate_to_the_global_batch(
    dec_examples, encdec_examples, pack, family, hosts
):
    if family == "decoder":
        examples, max_length = dec_examples, MAX_LEN
    else:
        examples, max_length = encdec_examples, (SOURCE_LEN, TARGET_LEN)
    kwargs = dict(max_length=max_length, pad_id=0, seed=9, pack=pack, drop_remainder=False)
    whole = _epoch(BatchIterator(examples, 8, **kwargs))
    parts = [
        _epoch(BatchIterator(examples, 8, process_index=p, process_count=hosts, **kwargs))
        for p in range(hosts)
    ]
    for b, batch in enumerate(whole):
        for key, value in batch.items():
            joined = np.concatenate([parts[p][b][key] for p in range(hosts)])
            np.testing.assert_array_equal(joined, value, err_msg=key)
            assert parts[0][b][key].shape[0] == 8 // hosts


def test_host_slice_arguments():
    assert batching.host_slice(8, 1, 4) == slice(2, 4)
    with pytest.raises(
        ValueError, match="global batch size 6 is not divisible by the process count 4"
    ):
        batching.host_slice(6, 0, 4)
    with pytest.raises(ValueError, match="bad process_index 2 / process_count 2"):
        batching.host_slice(8, 2, 2)


@pytest.mark.parametrize("pack", [False, True])
def test_resume_yields_the_same_batches(dec_examples, pack):
    kwargs = dict(max_length=MAX_LEN, pad_id=0, seed=11, pack=pack)
    first = BatchIterator(dec_examples, 4, **kwargs)
    per_epoch = first.batches_per_epoch()
    for _ in range(per_epoch - 2):  # stop two batches before an epoch boundary
        next(first)
    state = json.loads(json.dumps(first.state))  # what a checkpoint stores
    assert state == {"epoch": 0, "batch": per_epoch - 2}
    expected = [next(first) for _ in range(5)]  # crosses into epoch 1
    assert first.state["epoch"] == 1

    resumed = BatchIterator(dec_examples, 4, **kwargs)
    resumed.restore(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert resumed.state == first.state


def test_epochs_shuffle_deterministically(dec_examples):
    def orders(seed):
        it = BatchIterator(dec_examples, 4, MAX_LEN, pad_id=0, seed=seed)
        return [it.order(e).tolist() for e in range(3)]

    assert orders(0) == orders(0)
    assert orders(0) != orders(1)
    a = orders(0)
    assert a[0] != a[1] and sorted(a[0]) == sorted(a[1]) == list(range(len(dec_examples)))


def test_remainder_policies(dec_examples):
    examples = dec_examples[:10]
    dropped = BatchIterator(examples, 4, MAX_LEN, pad_id=0, shuffle=False, num_epochs=1)
    batches = list(dropped)
    assert len(batches) == 2
    filled = BatchIterator(
        examples, 4, MAX_LEN, pad_id=0, shuffle=False, drop_remainder=False, num_epochs=1
    )
    batches = list(filled)
    assert len(batches) == 3 and all(b["input_ids"].shape[0] == 4 for b in batches)
    last = batches[-1]
    assert (last["positions"][2:] == -1).all() and last["loss_mask"][2:].sum() == 0
    # every example exactly once, in order, and findable from the plan
    seen = [s[0] for b in batches for s in _dec_segments(b)]
    assert seen == [tuple(e.tokens) for e in examples]
    assert filled.host_example_positions(0, 2) == [[8], [9], [], []]
    with pytest.raises(ValueError, match="make no full global batch of 16 rows"):
        BatchIterator(examples, 16, MAX_LEN, pad_id=0)


def test_iterator_argument_errors(dec_examples, encdec_examples, dec_examples_k0):
    with pytest.raises(ValueError, match=r"has length \(\d+,\), more than max_length \(20,\)"):
        BatchIterator(dec_examples, 4, 20, pad_id=0)
    with pytest.raises(TypeError, match="must all be DecoderExample or all EncDecExample"):
        BatchIterator([dec_examples[0], encdec_examples[0]], 2, MAX_LEN, pad_id=0)
    with pytest.raises(ValueError, match=r"a \(source, target\) pair"):
        BatchIterator(encdec_examples, 2, MAX_LEN, pad_id=0)
    it = BatchIterator(dec_examples_k0, 4, MAX_LEN, pad_id=0)
    with pytest.raises(ValueError, match="bad data iterator state"):
        it.restore({"epoch": 0})
    with pytest.raises(ValueError, match="out of range"):
        it.restore({"epoch": 0, "batch": 999})


def test_no_gist_examples_have_no_spans(dec_examples_k0):
    it = BatchIterator(dec_examples_k0, 4, MAX_LEN, pad_id=0, seed=0)
    batch = next(it)
    assert (batch["gist_first"] == -1).all() and (batch["gist_last"] == -1).all()
