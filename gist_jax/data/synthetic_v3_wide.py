"""Suite version 3 with half again as many trained operations (``data.source =
"synthetic_v3_wide"``): version 3's 39 plus 22 more over the same nine input kinds, and the
same never-trained relations.

Why: after fine-tuning on version 3, the gist model often answers a never-trained relation
with the nearest trained one ("the official language of Italy" -> "IT", the country code;
docs/results.md section 9). With more trained operations per input kind, a gist that only
labels which trained operation it saw pays more, and one that carries the instruction pays
more too. The added operations are chosen so that none teaches a never-trained relation's
answers (no previous-anything, no abbreviations, no past participles, no continents).

``validation_unseen`` is version 3's, example for example (only its ``source`` differs), so
runs on the two suites pair on the same held-out examples.
"""

from __future__ import annotations

from typing import Any

from gist_jax.data import synthetic_v3 as v3
from gist_jax.data.suite import Invalid, Op, Slots
from gist_jax.data.synthetic_v3_facts import CITIES, COUNTRIES, MONTHS, VERBS

SOURCE = "synthetic_v3_wide"
SPLITS = v3.SPLITS
DEFAULT_SIZES = v3.DEFAULT_SIZES
KINDS = v3.KINDS
INPUTS = v3.INPUTS
_NUM, _MON, _DAY, _CIT, _ADJ, _VRB, _NOU, _LET, _ANY = (
    "number", "month", "day", "city", "adjective", "verb", "noun", "letter", "any"
)  # fmt: skip
# Three countries of version 3's cities are not among its countries.
_CAPITAL_OF = {country: row[1] for country, row in COUNTRIES.items()} | {
    "India": "New Delhi",
    "United Kingdom": "London",
    "United States": "Washington",
}
_ING = {row[0]: row[2] for row in VERBS}


def _digits(check: Any, fn: Any) -> Any:
    def apply(slots: Slots, value: str) -> str:
        n = int(value)
        if not check(n):
            raise Invalid
        return str(fn(n))

    return apply


# fmt: off
_EXTRA_OPS: tuple[Op, ...] = (
    Op("square", _NUM, ("give the square of {x}", "<multiply {x} by itself|square {x}>"),
       _digits(lambda n: True, lambda n: n * n)),
    Op("times_ten", _NUM, ("multiply {x} by ten", "<give|write> ten times {x}"),
       _digits(lambda n: True, lambda n: 10 * n)),
    Op("half", _NUM, ("halve {x}", "<give|write> half of {x}"),
       _digits(lambda n: n % 2 == 0, lambda n: n // 2)),
    Op("tens_digit", _NUM, ("give the tens digit of {x}", "which digit of {x} is in the tens place?"),
       _digits(lambda n: n >= 10, lambda n: n // 10)),
    Op("last_digit", _NUM, ("give the last digit of {x}", "<name|write> the units digit of {x}"),
       _digits(lambda n: True, lambda n: n % 10)),
    Op("digit_sum", _NUM, ("add up the digits of {x}", "give the sum of the digits of {x}"),
       _digits(lambda n: True, lambda n: sum(map(int, str(n))))),
    Op("round_ten", _NUM, ("round {x} to the nearest ten",
                           "<give|write> {x} rounded to the nearest ten"),
       _digits(lambda n: True, lambda n: (n + 5) // 10 * 10)),
    Op("reverse_digits", _NUM, ("reverse the digits of {x}",
                                "write the digits of {x} in reverse order"),
       _digits(lambda n: n >= 10 and n % 10 != 0, lambda n: str(n)[::-1])),
    Op("quarter", _MON, ("in which quarter of the year is {x}?",
                         "<give|name> the quarter of the year that {x} falls in"),
       lambda s, v: str(MONTHS.index(v) // 3 + 1)),
    Op("weekday", _DAY, ("is {x} a weekday? Answer yes or no",
                         "say yes if {x} is a working day and no otherwise"),
       lambda s, v: "no" if v in ("Saturday", "Sunday") else "yes"),
    Op("city_capital", _CIT, ("what is the capital of the country {x} is in?",
                              "<name|give> the capital of the country of {x}"),
       lambda s, v: _CAPITAL_OF[CITIES[v]]),
    Op("intensify", _ADJ, ("put 'very' in front of {x}", "<strengthen|intensify> {x} with 'very'"),
       lambda s, v: f"very {v}"),
    Op("negate", _ADJ, ("negate {x} with 'not'", "<write|put> 'not' before {x}"),
       lambda s, v: f"not {v}"),
    Op("to_infinitive", _VRB, ("give the to-infinitive of {x}",
                               "<write|put> {x} as an infinitive with 'to'"),
       lambda s, v: f"to {v}"),
    Op("future", _VRB, ("put {x} in the future tense with 'will'",
                        "<write|give> the future tense of {x}, using 'will'"),
       lambda s, v: f"will {v}"),
    Op("progressive", _VRB, ("give the present continuous of {x}, with 'is'",
                             "<write|put> {x} in the present progressive after 'is'"),
       lambda s, v: f"is {_ING[v]}"),
    Op("negative_command", _VRB, ("<write|give> the negative command of {x}, starting with don't",
                                  "<turn|make> {x} into a command with don't in front"),
       lambda s, v: f"don't {v}"),
    Op("possessive", _NOU, ("give the possessive form of {x}", "<write|add> 's to {x}"),
       lambda s, v: f"{v}'s"),
    Op("is_vowel", _LET, ("is {x} a vowel? Answer yes or no",
                          "say yes if {x} is a vowel and no otherwise"),
       lambda s, v: "yes" if v in "aeiou" else "no"),
    Op("first_half", _LET, ("is {x} in the first half of the alphabet? Answer yes or no",
                            "say yes if {x} comes before n in the alphabet and no otherwise"),
       lambda s, v: "yes" if v < "n" else "no"),
    # Two formats: they apply to any input and follow any relation in a composition.
    Op("length", _ANY, ("count the characters of {x}", "how many characters does {x} have?"),
       lambda s, v: str(len(v)), chainable=True),
    Op("last_character", _ANY, ("give the last character of {x}",
                                "<write|name> the final character of {x}"),
       lambda s, v: v[-1], chainable=True),
)
# fmt: on

OPS: dict[str, Op] = v3.OPS | {op.name: op for op in _EXTRA_OPS}
UNSEEN_OPS = v3.UNSEEN_OPS
TRAIN_OPS: tuple[str, ...] = v3.TRAIN_OPS + tuple(op.name for op in _EXTRA_OPS)
FORMATS: tuple[str, ...] = tuple(n for n in TRAIN_OPS if OPS[n].kind == _ANY)
RELATIONS: tuple[str, ...] = tuple(n for n in TRAIN_OPS if OPS[n].kind != _ANY)
SUITE = v3.make_suite(SOURCE, OPS, TRAIN_OPS, UNSEEN_OPS)
HELD_OUT_ARG_OPS = SUITE.held_out_arg_ops


def trained_pairs(held_out: bool = False) -> list[tuple[str, str]]:
    """(relation, format) compositions of trained ops, split by ``v3.held_out_pair``."""
    return SUITE.held_out_pairs if held_out else SUITE.train_pairs


def make_split(split: str, num_examples: int, seed: int = 0) -> list[dict[str, Any]]:
    """``num_examples`` examples of ``split``; ``validation_unseen`` is version 3's."""
    if split == "validation_unseen":
        examples = v3.make_split(split, num_examples, seed)
        return [ex | {"source": SOURCE} for ex in examples]
    return SUITE.make_split(split, num_examples, seed)
