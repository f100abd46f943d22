"""The synthetic instruction suite: size, paraphrases, determinism, split membership, held-
out inputs and families, outputs recomputed independently, and that instructions matter."""

from __future__ import annotations

import collections
import json
import re

import pytest

from gist_jax.data import alpaca, sources, synthetic

VOWELS = set("aeiou")
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
]  # fmt: skip


def _nums(text):
    return [int(x) for x in text.split(", ")]


def _words(text):
    return text.split(", ")


def _record(text):
    name, age, city = (part.split(": ")[1] for part in text.split("; "))
    return name, int(age), city


def _yn(flag):
    return "yes" if flag else "no"


# Independent re-implementations (from the instruction's meaning, not the module's code).
RECOMPUTE = {
    "reverse_word": lambda i, x: x[::-1],
    "uppercase_word": lambda i, x: x.upper(),
    "first_letter": lambda i, x: x[:1],
    "last_letter": lambda i, x: x[-1:],
    "word_length": lambda i, x: str(len(x)),
    "count_vowels": lambda i, x: str(len([c for c in x if c in VOWELS])),
    "remove_vowels": lambda i, x: "".join(c for c in x if c not in VOWELS),
    "spell_word": lambda i, x: "-".join(list(x)),
    "sort_letters": lambda i, x: "".join(sorted(list(x))),
    "is_long_word": lambda i, x: _yn(len(x) >= 6),
    "starts_with_vowel": lambda i, x: _yn(x[0] in VOWELS),
    "bracket_word": lambda i, x: "[" + x + "]",
    "sort_words": lambda i, x: ", ".join(sorted(_words(x))),
    "sort_words_desc": lambda i, x: ", ".join(sorted(_words(x))[::-1]),
    "second_word": lambda i, x: _words(x)[1],
    "longest_word": lambda i, x: sorted(_words(x), key=len)[-1],
    "shortest_word": lambda i, x: sorted(_words(x), key=len)[0],
    "count_words": lambda i, x: str(x.count(",") + 1),
    "initials": lambda i, x: "".join(w[0] for w in _words(x)),
    "contains_word": lambda i, x: _yn(i.split("'")[1] in _words(x)),
    "sum_numbers": lambda i, x: str(sum(_nums(x))),
    "min_number": lambda i, x: str(sorted(_nums(x))[0]),
    "sort_numbers_desc": lambda i, x: ", ".join(str(n) for n in sorted(_nums(x))[::-1]),
    "count_even": lambda i, x: str(len([n for n in _nums(x) if n % 2 == 0])),
    "filter_even": lambda i, x: ", ".join(str(n) for n in _nums(x) if not n % 2),
    "range_numbers": lambda i, x: str(sorted(_nums(x))[-1] - sorted(_nums(x))[0]),
    "double_numbers": lambda i, x: ", ".join(str(n + n) for n in _nums(x)),
    "subtract_pair": lambda i, x: str(_nums(x)[0] - _nums(x)[1]),
    "multiply_pair": lambda i, x: str(_nums(x)[0] * _nums(x)[1]),
    "smaller_of_pair": lambda i, x: str(sorted(_nums(x))[0]),
    "first_greater": lambda i, x: _yn(_nums(x)[0] > _nums(x)[1]),
    "parity": lambda i, x: ["even", "odd"][int(x) % 2],
    "digit_sum": lambda i, x: str(sum(map(int, list(x)))),
    "square_number": lambda i, x: str(int(x) * int(x)),
    "sentence_word_count": lambda i, x: str(len(x.split(" "))),
    "sentence_last_word": lambda i, x: x.split(" ")[-1][:-1],
    "title_case": lambda i, x: x.title(),
    "reverse_sentence": lambda i, x: " ".join(x[:-1].lower().split(" ")[::-1]).capitalize() + ".",
    "extract_city": lambda i, x: _record(x)[2],
    "describe_record": lambda i, x: "{} is {} years old and lives in {}.".format(*_record(x)),
    "is_adult": lambda i, x: _yn(_record(x)[1] > 17),
    "date_day": lambda i, x: str(int(x[-2:])),
    "date_us_format": lambda i, x: f"{x[5:7]}/{x[8:10]}/{x[:4]}",
    "month_name": lambda i, x: MONTHS[int(x[5:7]) - 1],
    "count_range": lambda i, x: " ".join(
        str(n) for n in range(int(re.findall(r"\d+", i)[0]), int(re.findall(r"\d+", i)[1]) + 1)
    ),
    "repeat_times": lambda i, x: " ".join(
        [i.split("'")[1]] * (int(re.findall(r"\d+", i)[0]) if re.findall(r"\d+", i)
                             else ["two", "three", "four"].index(i.split("' ")[1].split()[0]) + 2)
    ),
    "reverse_inline": lambda i, x: i.split("'")[1][::-1],
}  # fmt: skip


def test_suite_size_paraphrases_and_held_out_families():
    assert len(synthetic.TASKS) >= 40
    for task in synthetic.TASKS.values():
        assert len(set(task.instructions)) >= 3, task.name
    unseen, train = set(synthetic.UNSEEN_TASKS), set(synthetic.TRAIN_TASKS)
    assert 8 <= len(unseen) <= 10
    assert not unseen & train and unseen | train == set(synthetic.TASKS)
    # each input kind is shared by several trained families, so the input alone is ambiguous
    kinds = collections.Counter(synthetic.TASKS[name].kind for name in train)
    assert all(count >= 3 for count in kinds.values()), kinds
    # every held-out family has trained families of the same input kind
    for name in unseen:
        assert kinds[synthetic.TASKS[name].kind] >= 3


def test_determinism():
    a = synthetic.make_split("train", 300, seed=4)
    assert a == synthetic.make_split("train", 300, seed=4)
    assert a != synthetic.make_split("train", 300, seed=5)
    assert synthetic.make_split("train", 100, seed=4) == a[:100]


def test_split_membership_and_balance():
    train = synthetic.make_split("train", 57 * 20 + 7, seed=0)
    counts = collections.Counter(ex["task"] for ex in train)
    assert set(counts) == set(synthetic.TRAIN_TASKS)
    assert max(counts.values()) - min(counts.values()) <= 1
    seen = synthetic.make_split("validation_seen", 300, seed=0)
    unseen = synthetic.make_split("validation_unseen", 300, seed=0)
    assert {ex["task"] for ex in seen} == set(synthetic.TRAIN_TASKS)
    assert {ex["task"] for ex in unseen} == set(synthetic.UNSEEN_TASKS)
    for ex in train + seen + unseen:
        assert ex["source"] == "synthetic"
        assert set(ex) == {"instruction", "input", "output", "task", "source"}
    # all paraphrases are used
    used = collections.defaultdict(set)
    for ex in train:
        used[ex["task"]].add(ex["instruction"])
    for name in ("reverse_word", "sort_numbers", "extract_age"):
        assert used[name] == set(synthetic.TASKS[name].instructions)
    with pytest.raises(ValueError, match="no validation_human split"):
        synthetic.make_split("validation_human", 5)


def test_validation_seen_inputs_are_new():
    train = synthetic.make_split("train", 5000, seed=0)
    seen = synthetic.make_split("validation_seen", 500, seed=0)
    train_inputs = {(ex["task"], ex["input"]) for ex in train if ex["input"]}
    train_pairs = {(ex["instruction"], ex["input"]) for ex in train}
    overlap = [ex for ex in seen if (ex["task"], ex["input"]) in train_inputs and ex["input"]]
    assert overlap == []
    assert not [ex for ex in seen if (ex["instruction"], ex["input"]) in train_pairs]


def test_outputs_recomputed_independently():
    examples = (
        synthetic.make_split("train", 3000, seed=7)
        + synthetic.make_split("validation_seen", 600, seed=7)
        + synthetic.make_split("validation_unseen", 600, seed=7)
    )
    checked = collections.Counter()
    for ex in examples:
        recompute = RECOMPUTE.get(ex["task"])
        if recompute is None:
            continue
        expected = recompute(ex["instruction"], ex["input"])
        assert ex["output"] == expected, ex
        checked[ex["task"]] += 1
    assert len(checked) == len(RECOMPUTE)
    assert min(checked.values()) >= 10


def test_outputs_are_short_and_non_empty():
    for split in synthetic.SPLITS:
        for ex in synthetic.make_split(split, 1000, seed=1):
            assert ex["output"].strip() and ex["instruction"].strip()
            assert len(ex["output"]) <= 60 and len(ex["output"].split()) <= 10, ex


def test_the_instruction_is_necessary():
    """Without the instruction, the best any predictor can do on an input is the answer
    that the most families of its input kind share. That bound is far below 100%."""

    def takes_slots(task):
        return any("{" in text for text in task.instructions)

    train_by_kind = collections.defaultdict(list)
    for name in synthetic.TRAIN_TASKS:
        task = synthetic.TASKS[name]
        if not takes_slots(task) or task.kind == "none":
            train_by_kind[task.kind].append(task)
    examples = [
        ex
        for ex in synthetic.make_split("train", 3000, seed=2)
        if synthetic.TASKS[ex["task"]] in train_by_kind[synthetic.TASKS[ex["task"]].kind]
    ]
    none_outputs = collections.Counter()
    best = 0.0
    for ex in examples:
        kind = synthetic.TASKS[ex["task"]].kind
        if kind == "none":  # the input is empty; everything is in the instruction
            none_outputs[ex["output"]] += 1
            continue
        answers = collections.Counter(t.answer({}, ex["input"]) for t in train_by_kind[kind])
        best += answers.most_common(1)[0][1] / len(train_by_kind[kind])
    best += none_outputs.most_common(1)[0][1]
    assert best / len(examples) < 0.35
    # e.g. one word, fourteen different trained answers
    outputs = {t.answer({}, "stone") for t in train_by_kind["word"]}
    assert len(outputs) == len(train_by_kind["word"]) - 1  # "yes"/"no" tasks may agree


def test_write_splits_round_trip_through_the_loader(tmp_path):
    sizes = {"train": 30, "validation_seen": 10, "validation_unseen": 10}
    paths = sources.write_splits("synthetic", tmp_path, sizes, seed=3)
    assert sorted(paths) == sorted(sizes)
    for split, size in sizes.items():
        examples, report = alpaca.load_split(tmp_path, split, cache_dir=tmp_path / "cache")
        assert examples == synthetic.make_split(split, size, seed=3)
        assert report.kept == size
    assert json.loads(paths["train"].read_text())[0]["task"] in synthetic.TRAIN_TASKS


def test_load_examples_entry_point():
    examples, report = sources.load_examples("synthetic", "validation_unseen", 12, seed=1)
    assert examples == synthetic.make_split("validation_unseen", 12, seed=1)
    assert (report.loaded, report.kept, report.dropped) == (12, 12, 0)


def test_number_words():
    assert [synthetic.number_words(n) for n in (0, 7, 13, 20, 47, 99)] == [
        "zero", "seven", "thirteen", "twenty", "forty-seven", "ninety-nine",
    ]  # fmt: skip
