"""Version 2 of the synthetic instruction suite (``data.source = "synthetic_v2"``):
parameterised operations, two-step compositions and randomised paraphrases, so that the
training set holds thousands of distinct instruction strings and a gist cannot act as a
label for a handful of memorised tasks.

Why a second version: version 1 (``gist_jax.data.synthetic``, still ``data.source =
"synthetic"``, which the docs cite) has 57 training families x 3 paraphrases = 171
instruction strings; a gist model learnt them (100% of the seen-family gap at 200 steps)
without learning to compress new ones. Here an instruction is built from

* an **operation** over one of three input kinds (a word, a list of words, a list of
  numbers), often with **arguments** that change the answer ("the 3rd letter", "keep the
  numbers above 25", "join them with semicolons");
* optionally a second operation applied to the first one's result (a **composition**:
  "sort the words, then give the first one");
* a surface form drawn from ``<a|b|c>`` alternatives in the phrase templates (synonyms,
  word order), a random connective, politeness prefix and answer-format clause.

Every input kind has many operations, so the input does not reveal the task.

Splits (deterministic from ``seed``):

* ``train``: trained operations with their training argument values, single or composed
  (trained pairs only); inputs outside the held-out tenth (stable hash of the input).
* ``validation_seen``: instructions copied from the first ``SEEN_POOL`` training examples
  (so from any training run of at least that many examples), on held-out inputs.
* ``validation_recombined``: trained operations with held-out argument values, and
  held-out pairs of trained operations (``HELD_OUT_PAIR_BUCKETS``).
* ``validation_unseen``: ``UNSEEN_OPS``, operations never trained on (more than 20, over
  all three input kinds), each a relative of trained ones so the instruction explains it.

Examples carry the Alpaca+ keys plus ``task`` (the operation, or ``"a+b"`` for a
composition) and ``source``. ``python -m gist_jax.data --source=synthetic_v2
--out_dir=DIR`` writes the splits as ``alpaca_plus_{split}.json`` files.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Callable, Sequence
from typing import Any

from gist_jax.data import suite
from gist_jax.data.suite import (
    BRACKETS,
    CONNECTIVES,
    FORMAT_CLAUSES,
    PREFIXES,
    Invalid,
    Op,
    Slots,
    Suite,
    arg_partitions,
    bucket,
    expand,
    held_out_pair,
    sample_slots,
)
from gist_jax.data.synthetic_inputs import WORDS

SOURCE = "synthetic_v2"
SPLITS = suite.SPLITS
DEFAULT_SIZES = suite.DEFAULT_SIZES
COMPOSED_SHARE = 0.35  # share of train / recombined examples that compose two operations
HELD_OUT_INPUT_BUCKETS = 10  # one input in ten (stable hash) is never trained on

Value = Any  # str (a word), list[str] or list[int]

_ORDINALS = ("first", "second", "third", "fourth", "fifth")
_ORDINAL_DIGITS = ("1st", "2nd", "3rd", "4th", "5th")
_COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
_LETTERS = "abcdeilmnorstu"
# (separator, name) for joining; the name is what the instruction says.
_SEPARATORS = (
    ("-", "<hyphens|dashes>"),
    ("+", "plus signs"),
    ("/", "slashes"),
    (";", "semicolons"),
    ("_", "underscores"),
    (" ", "spaces"),
    ("|", "vertical bars"),
    ("*", "asterisks"),
)
_NOUN = {"word": "the word", "words": "<the words|the list|the list of words>",
         "numbers": "<the numbers|the list|the list of numbers>"}  # fmt: skip


# -- argument samplers ---------------------------------------------------------------------


def _nth(rng: random.Random, high: int = 4) -> Slots:
    n = rng.randint(1, high)
    return {"n": n, "nth": f"<{_ORDINALS[n - 1]}|{_ORDINAL_DIGITS[n - 1]}>"}


def _count(rng: random.Random, low: int = 2, high: int = 3) -> Slots:
    n = rng.randint(low, high)
    return {"n": n, "count": f"<{_COUNT_WORDS[n]}|{n}>"}


def _letter(rng: random.Random) -> Slots:
    return {"c": rng.choice(_LETTERS)}


def _initial(rng: random.Random) -> Slots:
    return {"c": rng.choice("sbcfgmprtw")}  # common first letters of the word list


def _final(rng: random.Random) -> Slots:
    return {"c": rng.choice("erntwdl")}  # common last letters of the word list


def _separator(rng: random.Random) -> Slots:
    sep, name = rng.choice(_SEPARATORS)
    return {"sep": sep, "sep_name": name}


def _bracket(rng: random.Random) -> Slots:
    left, right, name = rng.choice(BRACKETS)
    return {"left": left, "right": right, "bracket_name": name}


def _threshold(rng: random.Random) -> Slots:
    return {"t": rng.randrange(10, 55, 5)}


def _offset(rng: random.Random) -> Slots:
    return {"k": rng.randint(2, 12)}


def _factor(rng: random.Random) -> Slots:
    k = rng.randint(2, 5)
    return {"k": k, "times": f"<{k}|{_COUNT_WORDS[k]}>"}


def _repeat(rng: random.Random) -> Slots:
    return {**_count(rng, 2, 4), **_separator(rng)}


def _target_word(rng: random.Random) -> Slots:
    return {"target": rng.choice(WORDS)}


# -- helpers for the answers -----------------------------------------------------------------


def _at(values: Sequence[Any], n: int) -> Any:
    if n > len(values):
        raise Invalid
    return values[n - 1]


def _nonempty(values: list[Any]) -> list[Any]:
    if not values:
        raise Invalid
    return values


def _without(values: list[Any], n: int) -> list[Any]:
    _at(values, n)
    return values[: n - 1] + values[n:]


def _position(values: list[Any], target: Any) -> int:
    if target not in values:
        raise Invalid
    return values.index(target) + 1


def _unique(values: Sequence[Any], key: Callable[[Any], Any], pick: Callable) -> Any:
    best = pick(values, key=key)
    if sum(key(v) == key(best) for v in values) != 1:
        raise Invalid
    return best


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _has_letter(s: Slots, w: str) -> str:
    if s["c"] not in w:
        raise Invalid
    return w


# fmt: off
_W, _L, _N = "word", "words", "numbers"
_OPS: tuple[Op, ...] = (
    # --- a word ---------------------------------------------------------------------------
    Op("nth_letter", _W, ("<give|write|output> the {nth} letter of {x}",
                          "<tell me|name> the {nth} letter of {x}"),
       lambda s, w: _at(w, s["n"]), _nth),
    Op("first_letters", _W, ("<give|write> the first {count} letters of {x}",
                             "keep only the first {count} letters of {x}"),
       lambda s, w: w[: s["n"]], _count, chainable=True),
    Op("last_letters", _W, ("<give|write> the last {count} letters of {x}",
                            "keep only the final {count} letters of {x}"),
       lambda s, w: w[-s["n"]:], _count, chainable=True),
    Op("remove_letter", _W, ("remove every '{c}' from {x}", "delete each letter '{c}' in {x}",
                             "<write|rewrite> {x} without any '{c}'"),
       lambda s, w: _has_letter(s, w).replace(s["c"], ""), _letter, chainable=True),
    Op("count_letter", _W, ("count how many times the letter '{c}' <appears|occurs> in {x}",
                            "<say|tell me> how often '{c}' <appears|occurs> in {x}"),
       lambda s, w: str(w.count(s["c"])), _letter),
    Op("repeat_word", _W, ("<repeat|write> {x} {count} times, separated by {sep_name}",
                           "<say|write out> {x} {count} times with {sep_name} between them"),
       lambda s, w: s["sep"].join([w] * s["n"]), _repeat),
    Op("uppercase_word", _W, ("<convert|change> {x} to <uppercase|capital letters>",
                              "write {x} in <capital letters|upper case>"),
       lambda s, w: w.upper(), chainable=True),
    Op("reverse_word", _W, ("<reverse|flip> the letters of {x}", "write {x} backwards",
                            "spell {x} in reverse order"),
       lambda s, w: w[::-1], chainable=True),
    Op("bracket_word", _W, ("<put|place> {x} <inside|between> {bracket_name}",
                            "wrap {x} in {bracket_name}"),
       lambda s, w: s["left"] + w + s["right"], _bracket),
    Op("spell_word", _W, ("spell {x} with {sep_name} between the letters",
                          "<write|split> the letters of {x} separated by {sep_name}"),
       lambda s, w: s["sep"].join(w), _separator),
    Op("word_length", _W, ("count the letters in {x}", "<give|say> how many letters {x} has"),
       lambda s, w: str(len(w))),
    # --- a list of words ------------------------------------------------------------------
    Op("nth_word", _L, ("<give|write|output> the {nth} word of {x}",
                        "<tell me|name> the {nth} item in {x}"),
       lambda s, v: _at(v, s["n"]), _nth, family="nth_item"),
    Op("first_words", _L, ("keep only the first {count} words of {x}",
                           "<give|list> the first {count} words of {x}"),
       lambda s, v: v[: s["n"]], _count, chainable=True),
    Op("last_words", _L, ("keep only the last {count} words of {x}",
                          "<give|list> the final {count} words of {x}"),
       lambda s, v: v[-s["n"]:], _count, chainable=True),
    Op("sort_words", _L, ("sort {x} <alphabetically|in alphabetical order>",
                          "<arrange|order> {x} from A to Z"),
       lambda s, v: sorted(v), chainable=True),
    Op("reverse_words", _L, ("reverse the order of {x}", "list {x} from last to first"),
       lambda s, v: v[::-1], chainable=True),
    Op("contains_word", _L, ("<say|answer> yes or no: is '{target}' in {x}",
                             "check whether '{target}' <appears|occurs> in {x}, yes or no"),
       lambda s, v: _yes(s["target"] in v), _target_word),
    Op("join_words", _L, ("join {x} with {sep_name}", "<connect|combine> {x} using {sep_name}"),
       lambda s, v: s["sep"].join(v), _separator, family="join"),
    Op("count_words", _L, ("count the words in {x}", "<say|give> how many words {x} has"),
       lambda s, v: str(len(v))),
    Op("words_starting", _L, ("keep only the words that <start|begin> with '{c}' in {x}",
                              "<list|give> the words of {x} that <start|begin> with '{c}'"),
       lambda s, v: _nonempty([w for w in v if w.startswith(s["c"])]), _initial, chainable=True),
    Op("uppercase_words", _L, ("<convert|change> {x} to <uppercase|capital letters>",
                               "write every word of the list in capital letters"),
       lambda s, v: [w.upper() for w in v], chainable=True),
    Op("longest_word", _L, ("<give|find> the longest word in {x}",
                            "<name|output> the word of {x} with the most letters"),
       lambda s, v: _unique(v, len, max)),
    # --- a list of numbers ----------------------------------------------------------------
    Op("above", _N, ("keep only the numbers <above|greater than|larger than> {t} in {x}",
                     "<remove|drop> the numbers of {x} that are not <above|greater than> {t}"),
       lambda s, v: _nonempty([n for n in v if n > s["t"]]), _threshold, chainable=True),
    Op("add_each", _N, ("add {k} to each number in {x}", "increase every number of {x} by {k}"),
       lambda s, v: [n + s["k"] for n in v], _offset, chainable=True),
    Op("multiply_each", _N, ("multiply each number in {x} by {times}",
                             "<scale|multiply> every number of {x} by {times}"),
       lambda s, v: [n * s["k"] for n in v], _factor, chainable=True),
    Op("sum_numbers", _N, ("add up {x}", "<give|compute> the sum of {x}"),
       lambda s, v: str(sum(v))),
    Op("max_number", _N, ("<give|find> the largest number in {x}",
                          "<name|output> the maximum of {x}"),
       lambda s, v: str(max(v))),
    Op("sort_numbers", _N, ("sort {x} from smallest to largest",
                            "<arrange|order> {x} in increasing order"),
       lambda s, v: sorted(v), chainable=True),
    Op("nth_number", _N, ("<give|write|output> the {nth} number of {x}",
                          "<tell me|name> the {nth} item in {x}"),
       lambda s, v: _at(v, s["n"]), _nth, family="nth_item"),
    Op("count_above", _N, ("count the numbers <above|greater than> {t} in {x}",
                           "<say|give> how many numbers of {x} are <above|greater than> {t}"),
       lambda s, v: str(sum(n > s["t"] for n in v)), _threshold),
    Op("reverse_numbers", _N, ("reverse the order of {x}", "list {x} from last to first"),
       lambda s, v: v[::-1], chainable=True),
    Op("first_numbers", _N, ("keep only the first {count} numbers of {x}",
                             "<give|list> the first {count} numbers of {x}"),
       lambda s, v: v[: s["n"]], _count, chainable=True),
    Op("even_numbers", _N, ("keep only the even numbers in {x}", "remove the odd numbers from {x}"),
       lambda s, v: _nonempty([n for n in v if n % 2 == 0]), chainable=True),
    Op("join_numbers", _N, ("join {x} with {sep_name}", "<connect|combine> {x} using {sep_name}"),
       lambda s, v: s["sep"].join(map(str, v)), _separator, family="join"),
    # === never trained (validation_unseen) ================================================
    Op("nth_letter_from_end", _W, ("<give|write> the {nth} letter from the end of {x}",
                                   "<tell me|name> the {nth} letter of {x}, counting from the end"),
       lambda s, w: _at(w[::-1], s["n"]), _nth),
    Op("drop_first_letters", _W, ("remove the first {count} letters of {x}",
                                  "<write|give> {x} without its first {count} letters"),
       lambda s, w: w[s["n"]:], _count),
    Op("double_letters", _W, ("write each letter of {x} twice",
                              "double every letter of {x}"),
       lambda s, w: "".join(c + c for c in w)),
    Op("replace_letter", _W, ("replace every '{c}' in {x} with '{d}'",
                              "<change|turn> each '{c}' of {x} into '{d}'"),
       lambda s, w: _has_letter(s, w).replace(s["c"], s["d"]),
       lambda rng: {"c": rng.choice(_LETTERS), "d": rng.choice("xyzqk")}),
    Op("sort_letters", _W, ("sort the letters of {x} alphabetically",
                            "<arrange|order> the letters of {x} from a to z"),
       lambda s, w: "".join(sorted(w))),
    Op("count_vowels", _W, ("count the vowels in {x}", "<say|give> how many vowels {x} has"),
       lambda s, w: str(sum(c in "aeiou" for c in w))),
    Op("capitalize_word", _W, ("capitalize the first letter of {x}",
                               "write {x} with <a capital|an uppercase> first letter"),
       lambda s, w: w.capitalize()),
    Op("sort_words_desc", _L, ("sort {x} in reverse alphabetical order",
                               "<arrange|order> {x} from Z to A"),
       lambda s, v: sorted(v, reverse=True)),
    Op("words_ending", _L, ("keep only the words that end with '{c}' in {x}",
                            "<list|give> the words of {x} that end with '{c}'"),
       lambda s, v: _nonempty([w for w in v if w.endswith(s["c"])]), _final),
    Op("shortest_word", _L, ("<give|find> the shortest word in {x}",
                             "<name|output> the word of {x} with the fewest letters"),
       lambda s, v: _unique(v, len, min)),
    Op("drop_nth_word", _L, ("remove the {nth} word from {x}",
                             "<give|list> {x} without its {nth} word"),
       lambda s, v: _without(v, s["n"]), _nth),
    Op("initial_letters", _L, ("<give|write> the first letter of every word in {x}",
                               "take the initial letter of each word of {x}"),
       lambda s, v: [w[0] for w in v]),
    Op("capitalize_words", _L, ("capitalize the first letter of every word in {x}",
                                "<write|give> {x} with each word starting with a capital"),
       lambda s, v: [w.capitalize() for w in v]),
    Op("word_position", _L, ("<give|say> the position of '{target}' in {x}, counting from 1",
                             "<tell me|say> where '{target}' is in {x}, as a number from 1"),
       lambda s, v: str(_position(v, s["target"])), _target_word),
    Op("below", _N, ("keep only the numbers <below|less than|smaller than> {t} in {x}",
                     "<remove|drop> the numbers of {x} that are not <below|less than> {t}"),
       lambda s, v: _nonempty([n for n in v if n < s["t"]]), _threshold),
    Op("subtract_each", _N, ("subtract {k} from each number in {x}",
                             "decrease every number of {x} by {k}"),
       lambda s, v: [n - s["k"] for n in v], _offset),
    Op("min_number", _N, ("<give|find> the smallest number in {x}",
                          "<name|output> the minimum of {x}"),
       lambda s, v: str(min(v))),
    Op("sort_numbers_desc", _N, ("sort {x} from largest to smallest",
                                 "<arrange|order> {x} in decreasing order"),
       lambda s, v: sorted(v, reverse=True)),
    Op("count_below", _N, ("count the numbers <below|less than> {t} in {x}",
                           "<say|give> how many numbers of {x} are <below|less than> {t}"),
       lambda s, v: str(sum(n < s["t"] for n in v)), _threshold),
    Op("odd_numbers", _N, ("keep only the odd numbers in {x}", "remove the even numbers from {x}"),
       lambda s, v: _nonempty([n for n in v if n % 2 == 1])),
    Op("range_numbers", _N, ("<give|compute> the largest number of {x} minus the smallest",
                             "subtract the smallest number of {x} from the largest"),
       lambda s, v: str(max(v) - min(v))),
    Op("last_numbers", _N, ("keep only the last {count} numbers of {x}",
                            "<give|list> the final {count} numbers of {x}"),
       lambda s, v: v[-s["n"]:], _count),
    Op("count_even", _N, ("count the even numbers in {x}", "<say|give> how many numbers of {x} "
                                                          "are even"),
       lambda s, v: str(sum(n % 2 == 0 for n in v))),
)
# fmt: on

OPS: dict[str, Op] = {op.name: op for op in _OPS}
UNSEEN_OPS: tuple[str, ...] = tuple(
    op.name for op in _OPS[_OPS.index(OPS["nth_letter_from_end"]) :]
)
TRAIN_OPS: tuple[str, ...] = tuple(name for name in OPS if name not in UNSEEN_OPS)
KINDS: tuple[str, ...] = (_W, _L, _N)


def trained_pairs(held_out: bool = False) -> list[tuple[str, str]]:
    """Compositions of two trained ops of one kind (the first chainable), split by
    ``held_out_pair``."""
    pairs = []
    for a, b in itertools.product(TRAIN_OPS, TRAIN_OPS):
        first, second = OPS[a], OPS[b]
        composable = first.chainable and first.kind == second.kind and a != b
        if composable and held_out_pair(a, b) == held_out:
            pairs.append((a, b))
    return pairs


# -- inputs --------------------------------------------------------------------------------


def _sample_input(kind: str, rng: random.Random) -> Value:
    if kind == _W:
        return rng.choice(WORDS)
    if kind == _L:
        return rng.sample(WORDS, rng.randint(4, 6))
    return [rng.randint(1, 60) for _ in range(rng.randint(4, 6))]


def _input_text(value: Value) -> str:
    return value if isinstance(value, str) else ", ".join(map(str, value))


def _output_text(value: Value) -> str:
    return _input_text(value) if isinstance(value, (str, list)) else str(value)


def _held_out_input(text: str) -> bool:
    return bucket(text, HELD_OUT_INPUT_BUCKETS) == 0


# -- instructions --------------------------------------------------------------------------


def _phrase(op: Op, slots: Slots, rng: random.Random) -> str:
    return rng.choice(op.phrases).format(x=_NOUN[op.kind], **slots)


def _sentence(body: str, rng: random.Random) -> str:
    body = expand(body, rng)
    prefix = rng.choice(PREFIXES)
    if not prefix or prefix.endswith(": "):
        body = body[0].upper() + body[1:]
    return f"{prefix}{body}.{rng.choice(FORMAT_CLAUSES)}"


@dataclasses.dataclass(frozen=True)
class Spec:
    """One instruction: the ops it chains (one or two), their slots and its text."""

    ops: tuple[str, ...]
    slots: tuple[Slots, ...]
    instruction: str

    @property
    def task(self) -> str:
        return "+".join(self.ops)

    @property
    def kind(self) -> str:
        return OPS[self.ops[0]].kind

    def answer(self, value: Value) -> str:
        """The output for an input value; raises ``Invalid`` if the input does not suit."""
        for name, slots in zip(self.ops, self.slots, strict=True):
            value = OPS[name].apply(slots, value)
        if isinstance(value, list) and not value:
            raise Invalid
        return _output_text(value)


def _single(name: str, rng: random.Random, held_out_arg: bool | None) -> Spec:
    op = OPS[name]
    slots = sample_slots(op, rng, held_out_arg)
    return Spec((name,), (slots,), _sentence(_phrase(op, slots, rng), rng))


def _composed(pair: tuple[str, str], rng: random.Random, held_out_arg: bool | None) -> Spec:
    ops = [OPS[name] for name in pair]
    slots = tuple(sample_slots(op, rng, held_out_arg) for op in ops)
    # The second phrase refers to the intermediate result with the same noun.
    a, b = (_phrase(op, s, rng) for op, s in zip(ops, slots, strict=True))
    return Spec(pair, slots, _sentence(rng.choice(CONNECTIVES).format(a=a, b=b), rng))


# Trained ops whose arguments have settings on both sides (validation_recombined uses the
# held-out ones); every trained op has training settings (tested).
HELD_OUT_ARG_OPS: tuple[str, ...] = tuple(n for n in TRAIN_OPS if all(arg_partitions(OPS[n])))


def _draw_input(spec: Spec, rng: random.Random) -> tuple[Value, str]:
    value = _sample_input(spec.kind, rng)
    return value, _input_text(value)


SUITE = Suite(
    name=SOURCE,
    train_ops=TRAIN_OPS,
    unseen_ops=UNSEEN_OPS,
    held_out_arg_ops=HELD_OUT_ARG_OPS,
    train_pairs=trained_pairs(held_out=False),
    held_out_pairs=trained_pairs(held_out=True),
    composed_share=COMPOSED_SHARE,
    single=_single,
    composed=_composed,
    draw_input=_draw_input,
    held_out_input=lambda spec, text: _held_out_input(text),
)

make_split = SUITE.make_split
