"""Version 3 of the synthetic instruction suite (``data.source = "synthetic_v3"``): word,
calendar, geography and number relations that a small pretrained model already knows, so
that an instruction it was never fine-tuned on is one it can follow when it sees it.

Why a third version: on version 2 (``gist_jax.data.synthetic_v2``) the never-trained
operations are new algorithms ("count the vowels", "double every letter"), which
SmolLM2-135M cannot run even with the instruction in view: its pos_control beat
neg_control there by +3.0 +- 2.2 ROUGE-L after 30 minutes of training, so there was no gap
for a gist to recover. Here every never-trained operation is a relation the untouched model
completes from three demonstrations (``benchmarks/probes/relation_probe.py`` measured each
one: plural, past participle, superlative, continent, currency, demonym, ordinal, ...), so
the question the held-out split asks is the paper's: can the gist carry an instruction the
model could follow, but was never trained to compress?

An instruction is

* a **relation** over one of nine input kinds (a number, a month, a weekday, a country, a
  city, an adjective, a verb, a noun, a letter), some with **arguments** that change the
  answer ("add 7 to the number", "translate the month into German");
* or a **format** (capital letters, brackets, repetition), which applies to any kind;
* optionally a relation followed by a format (a **composition**: "give the plural of the
  noun, then put it in square brackets");
* drawn from ``<a|b>`` paraphrase alternatives, politeness prefixes and answer-format
  clauses (the surface machinery of version 2).

Every input kind has several trained and several never-trained relations, plus the formats,
so the input does not reveal the task.

Splits (deterministic from ``seed``), as in version 2:

* ``train``: trained relations and formats with training arguments, single or composed
  (trained pairs only); per relation, one input in ten is never trained on.
* ``validation_seen``: instructions of the first ``suite.SEEN_POOL`` training examples on their
  held-out inputs.
* ``validation_recombined``: held-out argument values of trained relations, and held-out
  (relation, format) pairs.
* ``validation_unseen``: ``UNSEEN_OPS``, relations and formats never trained on.

``gist_jax.data.sources.write_splits("synthetic_v3", DIR, sizes)`` writes the splits as
``alpaca_plus_{split}.json`` files.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Sequence
from typing import Any

from babel import Locale
from num2words import num2words

from gist_jax.data import suite
from gist_jax.data.suite import Invalid, Op, Slots, held_out_pair
from gist_jax.data.synthetic_inputs import WORDS
from gist_jax.data.synthetic_v3_facts import (
    ADJECTIVES,
    ADVERBS,
    CAPITALS,
    CITIES,
    COUNT_WORDS,
    COUNTRIES,
    DAYS,
    LANGUAGES,
    LETTERS,
    MONTH_DAYS,
    MONTHS,
    NESS,
    NOUNS,
    SEASONS,
    VERBS,
    currency,
    later_letter,
    official_language,
    ordinal,
    roman,
)

SOURCE = "synthetic_v3"
SPLITS = suite.SPLITS
DEFAULT_SIZES = suite.DEFAULT_SIZES
COMPOSED_SHARE = 0.3
HELD_OUT_INPUT_BUCKETS = 10
# Held-out argument settings and (relation, format) pairs use version 2's buckets
# (``held_out_args``, ``held_out_pair``): one in four of each.


def _lookup(rows: Sequence[Sequence[str]], column: int) -> Any:
    table = {row[0]: row[column] for row in rows}

    def apply(slots: Slots, value: str) -> str:
        if value not in table:
            raise Invalid
        return table[value]

    return apply


def _in(mapping: Any) -> Any:
    def apply(slots: Slots, value: str) -> str:
        if value not in mapping:
            raise Invalid
        return mapping[value]

    return apply


def _number_in(low: int, high: int, fn: Any) -> Any:
    def apply(slots: Slots, value: str) -> str:
        n = int(value)
        if not low <= n <= high:
            raise Invalid
        return fn(slots, n)

    return apply


def _shift(values: Sequence[str], step: int) -> Any:
    return lambda s, v: values[(values.index(v) + step) % len(values)]


def _translate(names: Any) -> Any:
    # names(locale) -> the locale's names in the order of the English ones
    def apply(slots: Slots, value: str) -> str:
        return names(LANGUAGES[slots["lang"]], value)

    return apply


def _language(rng: random.Random) -> Slots:
    return {"lang": rng.choice(sorted(LANGUAGES))}


def _offset(rng: random.Random) -> Slots:
    return {"k": rng.randint(2, 9)}


def _steps(high: int) -> Any:
    def sample(rng: random.Random) -> Slots:
        n = rng.randint(2, high)
        return {"n": n, "count": f"<{COUNT_WORDS[n]}|{n}>"}

    return sample


def _factor(rng: random.Random) -> Slots:
    k = rng.randint(3, 5)
    return {"k": k, "times": f"<{COUNT_WORDS[k]}|{k}>"}


def _extra_word(rng: random.Random) -> Slots:
    return {"w": rng.choice(WORDS)}


def _bracket(rng: random.Random) -> Slots:
    left, right, name = rng.choice(suite.BRACKETS)
    return {"left": left, "right": right, "bracket_name": name}


def _count(rng: random.Random) -> Slots:
    n = rng.randint(2, 3)
    return {"n": n, "count": f"<{COUNT_WORDS[n]}|{n}>"}


def _month_name(locale: str, month: str) -> str:
    return Locale(locale).months["format"]["wide"][MONTHS.index(month) + 1]


def _day_name(locale: str, day: str) -> str:
    return Locale(locale).days["format"]["wide"][DAYS.index(day)]


def _country_name(locale: str, country: str) -> str:
    return Locale(locale).territories[COUNTRIES[country][0]]


_NUM, _MON, _DAY, _CTY, _CIT = "number", "month", "day", "country", "city"
_ADJ, _VRB, _NOU, _LET, _ANY = "adjective", "verb", "noun", "letter", "any"
KINDS: tuple[str, ...] = (_NUM, _MON, _DAY, _CTY, _CIT, _ADJ, _VRB, _NOU, _LET)
_NOUN = {
    _NUM: "the number", _MON: "the month", _DAY: "the <day|weekday>", _CTY: "the country",
    _CIT: "the city", _ADJ: "the adjective", _VRB: "the verb", _NOU: "the <noun|word>",
    _LET: "the letter",
}  # fmt: skip
_RESULT = "<the result|the answer|it>"  # how a format refers to a relation's output

# fmt: off
_OPS: tuple[Op, ...] = (
    # --- numbers --------------------------------------------------------------------------
    Op("number_words", _NUM, ("write {x} in words", "spell out {x} in English words"),
       lambda s, v: num2words(int(v))),
    Op("roman", _NUM, ("write {x} <as a Roman numeral|in Roman numerals>",
                       "convert {x} to Roman numerals"),
       _number_in(1, 39, lambda s, n: roman(n))),
    Op("parity", _NUM, ("say whether {x} is even or odd", "is {x} <even or odd|odd or even>?"),
       lambda s, v: "even" if int(v) % 2 == 0 else "odd"),
    Op("dollars", _NUM, ("write {x} as a price in dollars", "<format|write> {x} as a dollar amount"),
       lambda s, v: f"${v}"),
    Op("negative", _NUM, ("write the negative of {x}", "put a minus sign in front of {x}"),
       lambda s, v: f"-{v}"),
    Op("add", _NUM, ("add {k} to {x}", "<increase|raise> {x} by {k}"),
       lambda s, v: str(int(v) + s["k"]), _offset),
    Op("double", _NUM, ("double {x}", "multiply {x} by two"), lambda s, v: str(2 * int(v))),
    Op("subtract", _NUM, ("subtract {k} from {x}", "<decrease|reduce> {x} by {k}"),
       lambda s, v: str(int(v) - s["k"]), _offset),
    Op("multiply", _NUM, ("multiply {x} by {times}", "<give|write> {times} times {x}"),
       lambda s, v: str(int(v) * s["k"]), _factor),
    Op("previous_number", _NUM, ("give the number <before|that comes before> {x}",
                                 "<subtract one from|take one away from> {x}"),
       lambda s, v: str(int(v) - 1)),
    # --- months and days --------------------------------------------------------------------
    Op("next_month", _MON, ("name the month <after|that comes after> {x}",
                            "which month <follows|comes after> {x}?"), _shift(MONTHS, 1)),
    Op("later_month", _MON, ("name the month {count} months after {x}",
                             "which month is {count} months after {x}?"),
       lambda s, v: MONTHS[(MONTHS.index(v) + s["n"]) % 12], _steps(5)),
    Op("month_number", _MON, ("give the number of {x} in the year",
                              "which number is {x} in the calendar?"),
       lambda s, v: str(MONTHS.index(v) + 1)),
    Op("month_days", _MON, ("how many days does {x} have?", "<say|give> the number of days in {x}"),
       lambda s, v: str(MONTH_DAYS[MONTHS.index(v)])),
    Op("translate_month", _MON, ("translate {x} into {lang}", "<give|write> {x} in {lang}"),
       _translate(_month_name), _language),
    Op("next_day", _DAY, ("name the day <after|that comes after> {x}",
                          "which day <follows|comes after> {x}?"), _shift(DAYS, 1)),
    Op("later_day", _DAY, ("name the day {count} days after {x}",
                           "which day is {count} days after {x}?"),
       lambda s, v: DAYS[(DAYS.index(v) + s["n"]) % 7], _steps(4)),
    Op("weekend", _DAY, ("is {x} <on|part of> the weekend? Answer yes or no",
                         "say yes if {x} is a weekend day and no otherwise"),
       lambda s, v: "yes" if v in DAYS[5:] else "no"),
    Op("translate_day", _DAY, ("translate {x} into {lang}", "<give|write> {x} in {lang}"),
       _translate(_day_name), _language),
    # --- countries and cities -------------------------------------------------------------
    Op("capital", _CTY, ("<name|give> the capital of {x}", "what is the capital city of {x}?"),
       _lookup([(k, *v) for k, v in COUNTRIES.items()], 2)),
    Op("country_code", _CTY, ("give the two-letter <ISO|country> code of {x}",
                              "what is the <ISO|two-letter> code of {x}?"),
       _lookup([(k, *v) for k, v in COUNTRIES.items()], 1)),
    Op("translate_country", _CTY, ("translate the name of {x} into {lang}",
                                   "<give|write> the name of {x} in {lang}"),
       _translate(_country_name), _language),
    Op("city_country", _CIT, ("in which country is {x}?", "<name|give> the country of {x}"),
       _in(CITIES)),
    Op("is_capital", _CIT, ("say yes if {x} is the capital of its country and no otherwise",
                            "is {x} a capital city? Answer yes or no"),
       lambda s, v: "yes" if v in CAPITALS else "no"),
    # --- words ------------------------------------------------------------------------------
    Op("comparative", _ADJ, ("give the comparative <form|degree> of {x}",
                             "<write|give> the comparative of {x}"), _lookup(ADJECTIVES, 2)),
    Op("opposite", _ADJ, ("give the opposite of {x}", "<write|name> an antonym of {x}"),
       _lookup(ADJECTIVES, 1)),
    Op("past_tense", _VRB, ("give the past tense of {x}", "<put|write> {x} in the past tense"),
       _lookup(VERBS, 1)),
    Op("ing_form", _VRB, ("give the -ing form of {x}", "<write|give> the present participle of {x}"),
       _lookup(VERBS, 2)),
    Op("plural", _NOU, ("give the plural of {x}", "<write|put> {x} in the plural"),
       _lookup(NOUNS, 1)),
    Op("first_letter", _NOU, ("give the first letter of {x}", "<name|write> the initial of {x}"),
       lambda s, v: v[0]),
    Op("reverse", _NOU, ("write {x} backwards", "<reverse|flip> the letters of {x}"),
       lambda s, v: v[::-1]),
    Op("next_letter", _LET, ("give the letter after {x} in the alphabet",
                             "which letter <follows|comes after> {x}?"),
       lambda s, v: chr(ord(v) + 1)),
    Op("later_letter", _LET, ("give the letter {count} places after {x} in the alphabet",
                              "which letter is {count} places after {x}?"),
       lambda s, v: later_letter(v, s["n"]), _steps(4)),
    Op("letter_position", _LET, ("give the position of {x} in the alphabet",
                                 "which number is {x} in the alphabet?"),
       lambda s, v: str(ord(v) - ord("a") + 1)),
    # --- formats (any kind, and after a relation) ---------------------------------------------
    Op("uppercase", _ANY, ("write {x} in <capital letters|upper case>",
                           "<convert|change> {x} to <uppercase|capital letters>"),
       lambda s, v: v.upper(), chainable=True),
    Op("bracket", _ANY, ("<put|place> {x} <inside|between> {bracket_name}",
                         "wrap {x} in {bracket_name}"),
       lambda s, v: s["left"] + v + s["right"], _bracket, chainable=True),
    Op("repeat", _ANY, ("write {x} {count} times, separated by spaces",
                        "repeat {x} {count} times with spaces between"),
       lambda s, v: " ".join([v] * s["n"]), _count, chainable=True),
    Op("word_before", _ANY, ("<write|put> the word '{w}' <before|in front of> {x}",
                             "<add|place> '{w}' before {x}, with a space"),
       lambda s, v: f"{s['w']} {v}", _extra_word, chainable=True),
    Op("word_after", _ANY, ("<write|put> the word '{w}' after {x}",
                            "<add|place> '{w}' after {x}, with a space"),
       lambda s, v: f"{v} {s['w']}", _extra_word, chainable=True),
    # === never trained (validation_unseen) ================================================
    Op("ordinal", _NUM, ("write {x} as an ordinal, like 1st or 2nd",
                         "<give|write> the ordinal form of {x}"),
       lambda s, v: ordinal(int(v))),
    Op("percent", _NUM, ("write {x} as a percentage", "<add|put> a percent sign after {x}"),
       lambda s, v: f"{v}%"),
    Op("two_decimals", _NUM, ("write {x} with two decimal places",
                              "<format|write> {x} as a decimal with two places"),
       lambda s, v: f"{v}.00"),
    Op("next_number", _NUM, ("give the number <after|that comes after> {x}",
                             "<add one to|increase by one> {x}"),
       lambda s, v: str(int(v) + 1)),
    Op("month_abbreviation", _MON, ("give the three-letter abbreviation of {x}",
                                    "<shorten|abbreviate> {x} to three letters"),
       lambda s, v: v[:3]),
    Op("season", _MON, ("in which season is {x} in the northern hemisphere?",
                        "<name|give> the season of {x} north of the equator"),
       lambda s, v: SEASONS[MONTHS.index(v)]),
    Op("previous_month", _MON, ("name the month <before|that comes before> {x}",
                                "which month <precedes|comes before> {x}?"), _shift(MONTHS, -1)),
    Op("day_abbreviation", _DAY, ("give the three-letter abbreviation of {x}",
                                  "<shorten|abbreviate> {x} to three letters"),
       lambda s, v: v[:3]),
    Op("previous_day", _DAY, ("name the day <before|that comes before> {x}",
                              "which day <precedes|comes before> {x}?"), _shift(DAYS, -1)),
    Op("day_number", _DAY, ("which day of the week is {x}, counting Monday as 1?",
                            "give the number of {x} in the week, starting from Monday as 1"),
       lambda s, v: str(DAYS.index(v) + 1)),
    Op("continent", _CTY, ("on which continent is {x}?", "<name|give> the continent of {x}"),
       _lookup([(k, *v) for k, v in COUNTRIES.items()], 3)),
    Op("currency", _CTY, ("what is the currency of {x}?", "<name|give> the currency used in {x}"),
       lambda s, v: currency(v)),
    Op("language", _CTY, ("what language is spoken in {x}?",
                          "<name|give> the official language of {x}"),
       lambda s, v: official_language(v)),
    Op("demonym", _CTY, ("what do you call a person from {x}?",
                         "<give|write> the nationality adjective of {x}"),
       _lookup([(k, *v) for k, v in COUNTRIES.items()], 4)),
    Op("superlative", _ADJ, ("give the superlative <form|degree> of {x}",
                             "<write|give> the superlative of {x}"), _lookup(ADJECTIVES, 3)),
    Op("adverb", _ADJ, ("turn {x} into an adverb", "<give|write> the adverb formed from {x}"),
       _in(ADVERBS)),
    Op("ness_noun", _ADJ, ("turn {x} into a noun ending in -ness",
                           "<give|write> the -ness noun formed from {x}"), _in(NESS)),
    Op("third_person", _VRB, ("give the third person singular of {x}",
                              "<write|give> the form of {x} that goes with he or she"),
       _lookup(VERBS, 4)),
    Op("past_participle", _VRB, ("give the past participle of {x}",
                                 "<write|give> the form of {x} used after 'have'"),
       _lookup(VERBS, 3)),
    Op("article", _NOU, ("put 'a' or 'an' in front of {x}",
                         "<write|give> {x} with its indefinite article"), _lookup(NOUNS, 2)),
    Op("previous_letter", _LET, ("give the letter before {x} in the alphabet",
                                 "which letter <precedes|comes before> {x}?"),
       lambda s, v: later_letter(v, -1)),
    Op("hashtag", _ANY, ("turn {x} into a hashtag", "<write|put> a hash sign in front of {x}"),
       lambda s, v: "#" + v.replace(" ", "")),
)
# fmt: on

OPS: dict[str, Op] = {op.name: op for op in _OPS}
UNSEEN_OPS: tuple[str, ...] = tuple(op.name for op in _OPS[_OPS.index(OPS["ordinal"]) :])
TRAIN_OPS: tuple[str, ...] = tuple(name for name in OPS if name not in UNSEEN_OPS)
FORMATS: tuple[str, ...] = tuple(n for n in TRAIN_OPS if OPS[n].kind == _ANY)
RELATIONS: tuple[str, ...] = tuple(n for n in TRAIN_OPS if OPS[n].kind != _ANY)


def pairs(
    relations: Sequence[str], formats: Sequence[str], held_out: bool
) -> list[tuple[str, str]]:
    """(relation, format) compositions, split by ``held_out_pair``."""
    return [
        (a, b) for a, b in itertools.product(relations, formats) if held_out_pair(a, b) == held_out
    ]


def trained_pairs(held_out: bool = False) -> list[tuple[str, str]]:
    """(relation, format) compositions of trained ops, split by ``held_out_pair``."""
    return SUITE.held_out_pairs if held_out else SUITE.train_pairs


# -- inputs ----------------------------------------------------------------------------------

INPUTS: dict[str, tuple[str, ...]] = {
    _NUM: tuple(str(n) for n in range(1, 100)),
    _MON: MONTHS,
    _DAY: DAYS,
    _CTY: tuple(COUNTRIES),
    _CIT: tuple(CITIES),
    _ADJ: tuple(sorted({r[0] for r in ADJECTIVES} | set(ADVERBS) | set(NESS))),
    _VRB: tuple(r[0] for r in VERBS),
    _NOU: tuple(r[0] for r in NOUNS),
    _LET: tuple(LETTERS),
}


def held_out_input(op_name: str, text: str) -> bool:
    """Whether ``text`` is one of the inputs never trained on with ``op_name`` (one in ten,
    chosen per relation so every input is trained on with some relation)."""
    return suite.bucket(f"{op_name}|{text}", HELD_OUT_INPUT_BUCKETS) == 0


@dataclasses.dataclass(frozen=True)
class Spec:
    """One instruction: the ops it chains (one or two), their slots and its text."""

    ops: tuple[Op, ...]
    slots: tuple[Slots, ...]
    instruction: str
    kind: str  # the input kind

    @property
    def task(self) -> str:
        return "+".join(op.name for op in self.ops)

    def answer(self, value: str) -> str:
        for op, slots in zip(self.ops, self.slots, strict=True):
            value = op.apply(slots, value)
        return value


def _phrase(op: Op, slots: Slots, noun: str, rng: random.Random, imperative: bool = False) -> str:
    # Inside a composition only imperative phrases read well ("first ..., then ...").
    phrases = [p for p in op.phrases if not (imperative and "?" in p)]
    return rng.choice(phrases).format(x=noun, **slots)


def _sentence(body: str, rng: random.Random) -> str:
    """Version 2's surface (prefix, capital, answer-format clause), and questions kept as
    questions: no "Please" in front and no full stop after the question mark."""
    body = suite.expand(body, rng)
    question = body.endswith("?")
    prefix = rng.choice(suite.PREFIXES)
    if question and prefix == "Please ":
        prefix = ""
    if not prefix or prefix.endswith(": "):
        body = body[0].upper() + body[1:]
    return f"{prefix}{body}{'' if question else '.'}{rng.choice(suite.FORMAT_CLAUSES)}"


def _kind_for(op: Op, rng: random.Random) -> str:
    return rng.choice(KINDS) if op.kind == _ANY else op.kind


def _single(op: Op, rng: random.Random, held_out_arg: bool | None) -> Spec:
    kind = _kind_for(op, rng)
    slots = suite.sample_slots(op, rng, held_out_arg)
    text = _sentence(_phrase(op, slots, _NOUN[kind], rng), rng)
    return Spec((op,), (slots,), text, kind)


def _composed(pair: tuple[Op, Op], rng: random.Random, held_out_arg: bool | None) -> Spec:
    first, second = pair
    slots = tuple(suite.sample_slots(op, rng, held_out_arg) for op in pair)
    a = _phrase(first, slots[0], _NOUN[first.kind], rng, imperative=True)
    b = _phrase(second, slots[1], _RESULT, rng, imperative=True)
    text = _sentence(rng.choice(suite.CONNECTIVES).format(a=a, b=b), rng)
    return Spec(pair, slots, text, first.kind)


def held_out_arg_ops(train_ops: Sequence[str], ops: dict[str, Op]) -> tuple[str, ...]:
    """The trained ops with both training and held-out argument settings."""
    return tuple(n for n in train_ops if all(suite.arg_partitions(ops[n])))


def _draw_input(spec: Spec, rng: random.Random) -> tuple[str, str]:
    text = rng.choice(INPUTS[spec.kind])
    return text, text


def make_suite(
    source: str, ops: dict[str, Op], train_ops: Sequence[str], unseen_ops: Sequence[str]
) -> suite.Suite:
    """The split logic over ``ops``: the suite of this module, or a wider one that trains
    more relations on the same inputs (``gist_jax.data.synthetic_v3_wide``)."""
    relations = [n for n in train_ops if ops[n].kind != _ANY]
    formats = [n for n in train_ops if ops[n].kind == _ANY]
    return suite.Suite(
        name=source,
        train_ops=tuple(train_ops),
        unseen_ops=tuple(unseen_ops),
        held_out_arg_ops=held_out_arg_ops(train_ops, ops),
        train_pairs=pairs(relations, formats, held_out=False),
        held_out_pairs=pairs(relations, formats, held_out=True),
        composed_share=COMPOSED_SHARE,
        single=lambda name, rng, held: _single(ops[name], rng, held),
        composed=lambda pair, rng, held: _composed((ops[pair[0]], ops[pair[1]]), rng, held),
        draw_input=_draw_input,
        held_out_input=lambda spec, text: held_out_input(spec.ops[0].name, text),
    )


SUITE = make_suite(SOURCE, OPS, TRAIN_OPS, UNSEEN_OPS)
HELD_OUT_ARG_OPS: tuple[str, ...] = SUITE.held_out_arg_ops
make_split = SUITE.make_split
