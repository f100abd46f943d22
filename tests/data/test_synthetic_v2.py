"""Synthetic suite v2: sizes and determinism, thousands of distinct training instructions,
the three held-out distances kept out of training (instruction strings, argument settings,
compositions, operations), answers recomputed independently from the instruction's words,
and that the input alone does not reveal the task."""

from __future__ import annotations

import collections
import contextlib
import random
import re

import pytest

from gist_jax.data import alpaca, sources, suite
from gist_jax.data import synthetic_v2 as v2

TRAIN_SIZE = 20000  # the suite's default: every training string the quickstart could see


@pytest.fixture(scope="module")
def train():
    return v2.make_split("train", TRAIN_SIZE)


@pytest.fixture(scope="module")
def held_out():
    return {s: v2.make_split(s, 400) for s in v2.SPLITS if s != "train"}


def test_sizes_keys_and_determinism():
    for split in v2.SPLITS:
        examples = v2.make_split(split, 50, seed=3)
        assert len(examples) == 50
        assert examples == v2.make_split(split, 50, seed=3)
        assert examples != v2.make_split(split, 50, seed=4)
        for ex in examples:
            assert set(ex) == {"instruction", "input", "output", "task", "source"}
            assert ex["instruction"] and ex["input"] and ex["output"]
            assert ex["source"] == v2.SOURCE
    # The training stream is a prefix stream: more examples extend, never reshuffle.
    assert v2.make_split("train", 30) == v2.make_split("train", 60)[:30]
    with pytest.raises(ValueError, match="unknown synthetic_v2 split"):
        v2.make_split("validation_human", 1)


def test_loaded_through_sources_and_written_as_alpaca_files(tmp_path):
    examples, report = sources.load_examples("synthetic_v2", "validation_recombined", 10)
    assert examples == v2.make_split("validation_recombined", 10) and report.kept == 10
    with pytest.raises(ValueError, match="expected one of"):
        sources.load_examples("synthetic_v2", "validation_human", 10)
    sources.write_splits("synthetic_v2", tmp_path, {"validation_unseen": 12})
    loaded, _ = alpaca.load_split(tmp_path, "validation_unseen")
    assert [ex["output"] for ex in loaded] == [
        ex["output"] for ex in v2.make_split("validation_unseen", 12)
    ]


def test_many_operations_over_every_input_kind():
    assert len(v2.UNSEEN_OPS) >= 20
    assert not set(v2.UNSEEN_OPS) & set(v2.TRAIN_OPS)
    for kind in v2.KINDS:
        trained = [n for n in v2.TRAIN_OPS if v2.OPS[n].kind == kind]
        unseen = [n for n in v2.UNSEEN_OPS if v2.OPS[n].kind == kind]
        assert len(trained) >= 8 and len(unseen) >= 6, kind
    assert len(v2.trained_pairs()) >= 100 and len(v2.trained_pairs(held_out=True)) >= 30
    # Every parameterised trained op can be trained (it has training settings).
    for name in v2.TRAIN_OPS:
        op, rng = v2.OPS[name], random.Random(0)
        settings = [op.args(rng) for _ in range(200)]
        assert not settings[0] or any(not suite.held_out_args(op, s) for s in settings), name


def test_thousands_of_distinct_training_instructions(train):
    counts = collections.Counter(ex["instruction"] for ex in train[:4000])
    assert len(counts) >= 3000
    # None frequent enough to memorise: at most a few repeats in the quickstart's 4,000.
    assert counts.most_common(1)[0][1] <= 12
    all_counts = collections.Counter(ex["instruction"] for ex in train)
    assert len(all_counts) >= 10000
    composed = sum("+" in ex["task"] for ex in train) / len(train)
    assert 0.25 < composed < 0.45


def test_held_out_distances_never_occur_in_training(train, held_out):
    train_strings = {ex["instruction"] for ex in train}
    train_tasks = {ex["task"] for ex in train}
    assert not {t.split("+")[i] for t in train_tasks for i in range(t.count("+") + 1)} & set(
        v2.UNSEEN_OPS
    )
    for pair in v2.trained_pairs(held_out=True):
        assert "+".join(pair) not in train_tasks
    for split in ("validation_recombined", "validation_unseen"):
        examples = held_out[split]
        assert not {ex["instruction"] for ex in examples} & train_strings, split
        assert len({ex["instruction"] for ex in examples}) >= 60, split
    unseen_tasks = collections.Counter(ex["task"] for ex in held_out["validation_unseen"])
    assert set(unseen_tasks) == set(v2.UNSEEN_OPS)
    assert max(unseen_tasks.values()) - min(unseen_tasks.values()) <= 1  # balanced rounds
    recombined = held_out["validation_recombined"]
    pairs = {ex["task"] for ex in recombined if "+" in ex["task"]}
    singles = [ex for ex in recombined if "+" not in ex["task"]]
    assert pairs and pairs <= {"+".join(p) for p in v2.trained_pairs(held_out=True)}
    assert singles and {ex["task"] for ex in singles} <= set(v2.TRAIN_OPS)


def test_seen_split_reuses_training_instructions_on_held_out_inputs(train, held_out):
    pool = {ex["instruction"] for ex in train[: suite.SEEN_POOL]}
    seen = held_out["validation_seen"]
    assert {ex["instruction"] for ex in seen} <= pool
    assert len({ex["instruction"] for ex in seen}) >= 60
    train_inputs = {ex["input"] for ex in train}
    assert not {ex["input"] for ex in seen} & train_inputs


_ORD = {"first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5}
_ORD.update({f"{n}{s}": n for n, s in ((1, "st"), (2, "nd"), (3, "rd"), (4, "th"), (5, "th"))})
_NUM = {"two": 2, "three": 3, "four": 4, "five": 5}


def _number_after(text, words):
    for w in words:
        m = re.search(rf"\b{w} (\w+)", text, re.IGNORECASE)
        if m and (m.group(1).isdigit() or m.group(1) in _NUM):
            return int(m.group(1)) if m.group(1).isdigit() else _NUM[m.group(1)]
    raise AssertionError(text)


def _ordinal(text):
    return next(n for w, n in _ORD.items() if re.search(rf"\b{w}\b", text))


def _quoted(text):
    return re.findall(r"'(\w+)'", text)


def _nums(text):
    return [int(x) for x in text.split(", ")]


def _words(text):
    return text.split(", ")


# Recomputed from the instruction's words (not the module's slots), for the unseen ops and
# a few trained ones.
RECOMPUTE = {
    "nth_letter_from_end": lambda i, x: x[::-1][_ordinal(i) - 1],
    "drop_first_letters": lambda i, x: x[_number_after(i, ["first"]) :],
    "double_letters": lambda i, x: "".join(c * 2 for c in x),
    "replace_letter": lambda i, x: x.replace(*_quoted(i)),
    "sort_letters": lambda i, x: "".join(sorted(x)),
    "count_vowels": lambda i, x: str(len(re.findall("[aeiou]", x))),
    "capitalize_word": lambda i, x: x[0].upper() + x[1:],
    "sort_words_desc": lambda i, x: ", ".join(sorted(_words(x))[::-1]),
    "words_ending": lambda i, x: ", ".join(w for w in _words(x) if w[-1] == _quoted(i)[0]),
    "shortest_word": lambda i, x: min(_words(x), key=len),
    "drop_nth_word": lambda i, x: ", ".join(
        w for j, w in enumerate(_words(x), 1) if j != _ordinal(i)
    ),
    "initial_letters": lambda i, x: ", ".join(w[0] for w in _words(x)),
    "capitalize_words": lambda i, x: ", ".join(w.title() for w in _words(x)),
    "word_position": lambda i, x: str(_words(x).index(_quoted(i)[0]) + 1),
    "below": lambda i, x: ", ".join(
        str(n) for n in _nums(x) if n < _number_after(i, ["below", "than"])
    ),
    "subtract_each": lambda i, x: ", ".join(
        str(n - _number_after(i, ["subtract", "by"])) for n in _nums(x)
    ),
    "min_number": lambda i, x: str(min(_nums(x))),
    "sort_numbers_desc": lambda i, x: ", ".join(map(str, sorted(_nums(x))[::-1])),
    "count_below": lambda i, x: str(
        len([n for n in _nums(x) if n < _number_after(i, ["below", "than"])])
    ),
    "odd_numbers": lambda i, x: ", ".join(str(n) for n in _nums(x) if n % 2),
    "range_numbers": lambda i, x: str(max(_nums(x)) - min(_nums(x))),
    "last_numbers": lambda i, x: ", ".join(
        map(str, _nums(x)[-_number_after(i, ["last", "final"]) :])
    ),
    "count_even": lambda i, x: str(len([n for n in _nums(x) if n % 2 == 0])),
    "above": lambda i, x: ", ".join(
        str(n) for n in _nums(x) if n > _number_after(i, ["above", "than"])
    ),
    "sum_numbers": lambda i, x: str(sum(_nums(x))),
    "nth_word": lambda i, x: _words(x)[_ordinal(i) - 1],
    "reverse_word": lambda i, x: x[::-1],
}


def test_answers_recomputed_from_the_instruction(train, held_out):
    checked = collections.Counter()
    for ex in [*held_out["validation_unseen"], *held_out["validation_recombined"], *train[:3000]]:
        recompute = RECOMPUTE.get(ex["task"])
        if recompute is not None:
            assert recompute(ex["instruction"], ex["input"]) == ex["output"], ex
            checked[ex["task"]] += 1
    assert set(checked) == set(RECOMPUTE)


def _input_only_predictors(kind):
    """Every op of a kind, at many argument settings, as a function of the input alone."""
    rng = random.Random(0)
    for name, op in v2.OPS.items():
        if op.kind != kind:
            continue
        settings = {repr(s): s for s in (op.args(rng) for _ in range(60))}
        for slots in settings.values():
            spec = v2.Spec((name,), (slots,), "")
            yield f"{name}{slots}", spec


def _parse(kind, text):
    if kind == "word":
        return text
    items = _words(text)
    return [int(x) for x in items] if kind == "numbers" else items


def test_the_input_does_not_reveal_the_task(held_out):
    # The best input-only answer (one fixed operation per input kind, any argument setting,
    # chosen with hindsight on the split itself) stays far below solving the split.
    for split, examples in held_out.items():
        by_kind = collections.defaultdict(list)
        for ex in examples:
            by_kind[v2.OPS[ex["task"].split("+")[0]].kind].append(ex)
        for kind, group in by_kind.items():
            best = 0.0
            for _, spec in _input_only_predictors(kind):
                hits = 0
                for ex in group:
                    # An op that cannot take this input (too short, no such letter) misses.
                    with contextlib.suppress(Exception):
                        hits += spec.answer(_parse(kind, ex["input"])) == ex["output"]
                best = max(best, hits / len(group))
            assert best < 0.3, (split, kind, best)
