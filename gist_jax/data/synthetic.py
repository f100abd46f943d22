"""The built-in synthetic instruction suite: procedurally generated instruction-following
tasks whose outputs are computed by code, in the Alpaca+ format.

Why it exists: the project's tests and CPU demos need instruction data that a 135M model
can learn in minutes, with a real ``validation_unseen`` split, and without downloading
anything. Each *task family* has one input kind (a word, a word list, a number list, a
number pair, a number, a sentence, a record, a date, or no input) and at least three
natural-language paraphrases of its instruction; the output (a few tokens) is computed
from the input text by the family's ``answer`` function. Many families share each input
kind (e.g. 13 families take a word list), so the input alone does not say what to do: the
instruction is necessary, and ``neg_control`` (which hides it) scores clearly worse.

Splits (deterministic from ``seed``):

* ``train``: the ``TRAIN_TASKS`` families.
* ``validation_seen``: the same families with inputs never used in training. Inputs are
  partitioned by a stable hash: training never samples an input whose hash falls in the
  held-out tenth, ``validation_seen`` only samples those.
* ``validation_unseen``: the ``UNSEEN_TASKS`` families, never trained on. Each is a close
  relative of trained families (last letter vs first letter, minimum vs maximum, descending
  vs ascending sort, ...), so it can be solved from its instruction alone and measures
  whether gisting generalises to new instructions.

Families are visited in balanced, reshuffled rounds; the paraphrase and input are drawn
from ``random.Random(f"gist_jax.synthetic:{seed}:{split}")``. ``make_split`` returns dicts with the Alpaca+
keys plus ``task`` (the family) and ``source`` ("synthetic"); ``write_splits`` writes
``alpaca_plus_{split}.json`` files that ``gist_jax.data.alpaca.load_split`` reads.

Command line: ``python -m gist_jax.data --source=synthetic --out_dir=DIR [--train_size=N]
[--validation_size N] [--seed S]``.
"""

from __future__ import annotations

import dataclasses
import random
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from gist_jax.data import synthetic_inputs as inputs
from gist_jax.data.synthetic_inputs import (
    MONTHS,
    VOWELS,
    Sampler,
    Slots,
    number_words,
)

SPLITS: tuple[str, ...] = ("train", "validation_seen", "validation_unseen")
DEFAULT_SIZES: dict[str, int] = {"train": 20000, "validation_seen": 400, "validation_unseen": 400}
SOURCE = "synthetic"
# One input in ten (by stable hash) is reserved for validation_seen.
_HELD_OUT_BUCKETS = 10
_MAX_TRIES = 10000


@dataclasses.dataclass(frozen=True)
class Task:
    """One task family: paraphrased instructions (``str.format`` templates over the
    sampled slots), an input sampler, and the answer computed from slots and input text."""

    name: str
    kind: str
    instructions: tuple[str, ...]
    sample: Sampler
    answer: Callable[[Slots, str], str]


# -- input parsers used by the answers -------------------------------------------------------


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(item) for item in _items(text)]


def _join(values: Sequence[Any]) -> str:
    return ", ".join(map(str, values))


def _sentence_words(text: str) -> list[str]:
    return text.rstrip(".").split()


def _record_fields(text: str) -> dict[str, str]:
    return dict(part.split(": ", 1) for part in text.split("; "))


def _date_parts(text: str) -> tuple[int, int, int]:
    year, month, day = (int(part) for part in text.split("-"))
    return year, month, day


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _task(
    name: str, kind: str, sample: Sampler, answer: Callable[[str], str], *instructions: str
) -> Task:
    return Task(name, kind, tuple(instructions), sample, lambda slots, text: answer(text))


def _slot_task(
    name: str, kind: str, sample: Sampler, answer: Callable[[Slots, str], str], *instructions: str
) -> Task:
    return Task(name, kind, tuple(instructions), sample, answer)


def _reverse_sentence(text: str) -> str:
    return " ".join(reversed(_sentence_words(text))).capitalize() + "."


def _multiply(text: str) -> str:
    a, b = _ints(text)
    return str(a * b)


def _subtract(text: str) -> str:
    a, b = _ints(text)
    return str(a - b)


def _first_greater(text: str) -> str:
    a, b = _ints(text)
    return _yes(a > b)


# fmt: off
_ALL_TASKS: tuple[Task, ...] = (
    # --- one word ----------------------------------------------------------------------------
    _task("reverse_word", "word", inputs.sample_word, lambda w: w[::-1],
          "Reverse the letters of the word.", "Write the given word backwards.",
          "Spell the word in reverse order."),
    _task("uppercase_word", "word", inputs.sample_word, str.upper,
          "Convert the word to uppercase.", "Write the word in capital letters.",
          "Rewrite the word using only uppercase letters."),
    _task("first_letter", "word", inputs.sample_word, lambda w: w[0],
          "What is the first letter of the word?", "Give the first letter of the given word.",
          "Output only the word's initial letter."),
    _task("last_letter", "word", inputs.sample_word, lambda w: w[-1],
          "What is the last letter of the word?", "Give the final letter of the given word.",
          "Output only the word's last letter."),
    _task("word_length", "word", inputs.sample_word, lambda w: str(len(w)),
          "How many letters does the word have?", "Count the letters in the word.",
          "Give the number of characters in the word."),
    _task("capitalize_word", "word", inputs.sample_word, str.capitalize,
          "Capitalize the first letter of the word.",
          "Write the word with an uppercase first letter.",
          "Make the first letter of the word a capital letter."),
    _task("count_vowels", "word", inputs.sample_word, lambda w: str(sum(c in VOWELS for c in w)),
          "How many vowels are in the word?", "Count the vowels (a, e, i, o, u) in the word.",
          "Give the number of vowels the word contains."),
    _task("repeat_word", "word", inputs.sample_word, lambda w: f"{w} {w}",
          "Repeat the word twice, separated by a space.",
          "Write the word two times with a space in between.", "Say the word twice."),
    _task("remove_vowels", "word", inputs.sample_word, lambda w: "".join(c for c in w if c not in VOWELS),
          "Remove all vowels from the word.", "Delete the vowels (a, e, i, o, u) from the word.",
          "Write the word without its vowels."),
    _task("spell_word", "word", inputs.sample_word, "-".join,
          "Spell the word with hyphens between the letters.",
          "Write the letters of the word separated by dashes.",
          "Split the word into its letters joined by hyphens."),
    _task("sort_letters", "word", inputs.sample_word, lambda w: "".join(sorted(w)),
          "Sort the letters of the word alphabetically.",
          "Arrange the letters of the word in alphabetical order.",
          "Write the letters of the word from a to z."),
    _task("is_long_word", "word", inputs.sample_word, lambda w: _yes(len(w) > 5),
          "Answer yes if the word has more than five letters, otherwise no.",
          "Does the word have more than 5 letters? Answer yes or no.",
          "Is the word longer than five letters? Reply yes or no."),
    _task("starts_with_vowel", "word", inputs.sample_word, lambda w: _yes(w[0] in VOWELS),
          "Does the word start with a vowel? Answer yes or no.",
          "Answer yes if the word begins with a, e, i, o or u, and no otherwise.",
          "Reply yes or no: is the first letter of the word a vowel?"),
    _task("bracket_word", "word", inputs.sample_word, lambda w: f"[{w}]",
          "Put the word inside square brackets.", "Wrap the word in square brackets.",
          "Enclose the word in [ and ]."),
    # --- a list of words ----------------------------------------------------------------------
    _task("sort_words", "words", inputs.sample_words_input, lambda t: _join(sorted(_items(t))),
          "Sort the words in alphabetical order.", "Arrange these words alphabetically.",
          "List the words from A to Z."),
    _task("sort_words_desc", "words", inputs.sample_words_input,
          lambda t: _join(sorted(_items(t), reverse=True)),
          "Sort the words in reverse alphabetical order.",
          "Arrange the words alphabetically from Z to A.",
          "List the words in descending alphabetical order."),
    _task("reverse_words", "words", inputs.sample_words_input, lambda t: _join(_items(t)[::-1]),
          "Reverse the order of the words.", "List the words in reverse order.",
          "Write the words from last to first."),
    _task("first_word", "words", inputs.sample_words_input, lambda t: _items(t)[0],
          "Output the first word of the list.", "Which word comes first in the list?",
          "Give the first item in the list."),
    _task("second_word", "words", inputs.sample_words_input, lambda t: _items(t)[1],
          "Output the second word of the list.", "Which word comes second in the list?",
          "Give the second item in the list."),
    _task("last_word", "words", inputs.sample_words_input, lambda t: _items(t)[-1],
          "Output the last word of the list.", "Which word comes last in the list?",
          "Give the final item in the list."),
    _task("longest_word", "words", inputs.sample_unique_extreme_words, lambda t: max(_items(t), key=len),
          "Which word in the list is the longest?", "Output the longest word.",
          "Find the word with the most letters."),
    _task("shortest_word", "words", inputs.sample_unique_extreme_words, lambda t: min(_items(t), key=len),
          "Which word in the list is the shortest?", "Output the shortest word.",
          "Find the word with the fewest letters."),
    _task("count_words", "words", inputs.sample_words_input, lambda t: str(len(_items(t))),
          "How many words are in the list?", "Count the words in the list.",
          "Give the number of items in the list."),
    _task("join_hyphen", "words", inputs.sample_words_input, lambda t: "-".join(_items(t)),
          "Join the words with hyphens.", "Connect the words using dashes instead of commas.",
          "Combine the words into one string separated by hyphens."),
    _task("uppercase_words", "words", inputs.sample_words_input, lambda t: _join(w.upper() for w in _items(t)),
          "Convert every word in the list to uppercase.",
          "Write all the words in capital letters.", "Make each word in the list uppercase."),
    _task("initials", "words", inputs.sample_words_input, lambda t: "".join(w[0] for w in _items(t)),
          "Write the first letter of each word, joined together.",
          "Form a string from the initial letters of the words.",
          "Concatenate the first letters of all the words."),
    _slot_task("contains_word", "words", inputs.sample_contains,
               lambda s, t: _yes(s["target"] in _items(t)),
               "Answer yes if the list contains the word '{target}', otherwise no.",
               "Is '{target}' one of the words in the list? Answer yes or no.",
               "Does the list include '{target}'? Reply yes or no."),
    # --- a list of numbers --------------------------------------------------------------------
    _task("sum_numbers", "numbers", inputs.sample_numbers_input, lambda t: str(sum(_ints(t))),
          "Add up the numbers.", "What is the sum of these numbers?",
          "Compute the total of the numbers."),
    _task("max_number", "numbers", inputs.sample_numbers_input, lambda t: str(max(_ints(t))),
          "What is the largest number?", "Find the maximum of the numbers.",
          "Output the biggest number in the list."),
    _task("min_number", "numbers", inputs.sample_numbers_input, lambda t: str(min(_ints(t))),
          "What is the smallest number?", "Find the minimum of the numbers.",
          "Output the lowest number in the list."),
    _task("sort_numbers", "numbers", inputs.sample_numbers_input, lambda t: _join(sorted(_ints(t))),
          "Sort the numbers in ascending order.",
          "Arrange the numbers from smallest to largest.", "List the numbers in increasing order."),
    _task("sort_numbers_desc", "numbers", inputs.sample_numbers_input,
          lambda t: _join(sorted(_ints(t), reverse=True)),
          "Sort the numbers in descending order.",
          "Arrange the numbers from largest to smallest.", "List the numbers in decreasing order."),
    _task("count_even", "numbers", inputs.sample_numbers_input,
          lambda t: str(sum(n % 2 == 0 for n in _ints(t))),
          "How many of the numbers are even?", "Count the even numbers in the list.",
          "Give the number of even values in the list."),
    _task("filter_even", "numbers", inputs.sample_numbers_with_even,
          lambda t: _join(n for n in _ints(t) if n % 2 == 0),
          "Keep only the even numbers.", "Remove the odd numbers from the list.",
          "List just the even numbers, in their original order."),
    _task("range_numbers", "numbers", inputs.sample_numbers_input,
          lambda t: str(max(_ints(t)) - min(_ints(t))),
          "What is the difference between the largest and the smallest number?",
          "Compute the range (maximum minus minimum) of the numbers.",
          "Subtract the smallest number from the largest one."),
    _task("reverse_numbers", "numbers", inputs.sample_numbers_input, lambda t: _join(_ints(t)[::-1]),
          "Reverse the order of the numbers.", "List the numbers from last to first.",
          "Write the numbers in reverse order."),
    _task("double_numbers", "numbers", inputs.sample_numbers_input, lambda t: _join(2 * n for n in _ints(t)),
          "Multiply each number by two.", "Double every number in the list.",
          "Write each number times 2."),
    # --- a pair of numbers --------------------------------------------------------------------
    _task("add_pair", "pair", inputs.sample_pair, lambda t: str(sum(_ints(t))),
          "Add the two numbers.", "What is the sum of the two numbers?",
          "Compute the first number plus the second."),
    _task("subtract_pair", "pair", inputs.sample_pair, _subtract,
          "Subtract the second number from the first.",
          "What is the first number minus the second?",
          "Compute the difference: the first number minus the second number."),
    _task("multiply_pair", "pair", inputs.sample_small_pair, _multiply,
          "Multiply the two numbers.", "What is the product of the two numbers?",
          "Compute the first number times the second."),
    _task("larger_of_pair", "pair", inputs.sample_pair, lambda t: str(max(_ints(t))),
          "Which of the two numbers is larger?", "Output the bigger of the two numbers.",
          "Give the greater of the two numbers."),
    _task("smaller_of_pair", "pair", inputs.sample_pair, lambda t: str(min(_ints(t))),
          "Which of the two numbers is smaller?", "Output the lesser of the two numbers.",
          "Give the smaller of the two numbers."),
    _task("first_greater", "pair", inputs.sample_pair, _first_greater,
          "Is the first number greater than the second? Answer yes or no.",
          "Answer yes if the first number is bigger than the second, otherwise no.",
          "Reply yes or no: does the first number exceed the second?"),
    # --- one number ---------------------------------------------------------------------------
    _task("parity", "number", inputs.sample_number, lambda t: "even" if int(t) % 2 == 0 else "odd",
          "Is the number even or odd?", "Say whether the number is even or odd.",
          "Classify the number as even or odd."),
    _task("number_to_words", "number", inputs.sample_number, lambda t: number_words(int(t)),
          "Write the number in English words.", "Spell out the number in words.",
          "Express the number using words instead of digits."),
    _task("digit_sum", "number", inputs.sample_number, lambda t: str(sum(int(c) for c in t)),
          "What is the sum of the digits of the number?", "Add up the digits of the number.",
          "Compute the digit sum of the number."),
    _task("add_ten", "number", inputs.sample_number, lambda t: str(int(t) + 10),
          "Add ten to the number.", "What is the number plus 10?", "Increase the number by 10."),
    _task("square_number", "number", inputs.sample_small_number, lambda t: str(int(t) ** 2),
          "What is the square of the number?", "Multiply the number by itself.",
          "Compute the number squared."),
    # --- a sentence ---------------------------------------------------------------------------
    _task("sentence_word_count", "sentence", inputs.sample_sentence, lambda t: str(len(_sentence_words(t))),
          "How many words are in the sentence?", "Count the words in the sentence.",
          "Give the number of words the sentence contains."),
    _task("sentence_first_word", "sentence", inputs.sample_sentence, lambda t: _sentence_words(t)[0],
          "What is the first word of the sentence?", "Output the sentence's first word.",
          "Give the word the sentence starts with."),
    _task("sentence_last_word", "sentence", inputs.sample_sentence, lambda t: _sentence_words(t)[-1],
          "What is the last word of the sentence, without the period?",
          "Output the final word of the sentence, without punctuation.",
          "Give the word the sentence ends with (no period)."),
    _task("uppercase_sentence", "sentence", inputs.sample_sentence, str.upper,
          "Convert the sentence to uppercase.", "Write the sentence in capital letters.",
          "Rewrite the whole sentence using uppercase letters."),
    _task("lowercase_sentence", "sentence", inputs.sample_sentence, str.lower,
          "Convert the sentence to lowercase.", "Write the sentence in small letters only.",
          "Rewrite the whole sentence using lowercase letters."),
    _task("title_case", "sentence", inputs.sample_sentence,
          lambda t: " ".join(w.capitalize() for w in t.split()),
          "Capitalize the first letter of every word in the sentence.",
          "Convert the sentence to title case.",
          "Make each word in the sentence start with a capital letter."),
    _task("reverse_sentence", "sentence", inputs.sample_sentence, _reverse_sentence,
          "Reverse the order of the words in the sentence.",
          "Write the sentence with its words in reverse order.",
          "Rearrange the sentence so the words go from last to first."),
    # --- a record -----------------------------------------------------------------------------
    _task("extract_name", "record", inputs.sample_record, lambda t: _record_fields(t)["name"],
          "What is the person's name?", "Extract the name from the record.",
          "Give the value of the name field."),
    _task("extract_age", "record", inputs.sample_record, lambda t: _record_fields(t)["age"],
          "How old is the person?", "Extract the age from the record.",
          "Give the value of the age field."),
    _task("extract_city", "record", inputs.sample_record, lambda t: _record_fields(t)["city"],
          "Which city does the person live in?", "Extract the city from the record.",
          "Give the value of the city field."),
    _task("describe_record", "record", inputs.sample_record,
          lambda t: "{name} is {age} years old and lives in {city}.".format(**_record_fields(t)),
          "Describe the record as: NAME is AGE years old and lives in CITY.",
          "Turn the record into a sentence of the form 'NAME is AGE years old and lives in "
          "CITY.'",
          "Write one sentence saying the person's name, age and city, like 'Ann is 30 years "
          "old and lives in Rome.'"),
    _task("is_adult", "record", inputs.sample_record, lambda t: _yes(int(_record_fields(t)["age"]) >= 18),
          "Is the person 18 or older? Answer yes or no.",
          "Answer yes if the person is an adult (age 18 or more), otherwise no.",
          "Reply yes or no: is the person at least 18 years old?"),
    # --- a date -------------------------------------------------------------------------------
    _task("date_year", "date", inputs.sample_date, lambda t: str(_date_parts(t)[0]),
          "What year is in the date?", "Extract the year from the date.",
          "Give the year of the date."),
    _task("date_day", "date", inputs.sample_date, lambda t: str(_date_parts(t)[2]),
          "What day of the month is in the date?", "Extract the day from the date.",
          "Give the day of the month of the date, as a number."),
    _task("date_us_format", "date", inputs.sample_date,
          lambda t: "{1:02d}/{2:02d}/{0:04d}".format(*_date_parts(t)),
          "Rewrite the date in MM/DD/YYYY format.", "Convert the date to month/day/year.",
          "Write the date the American way, as MM/DD/YYYY."),
    _task("month_name", "date", inputs.sample_date, lambda t: MONTHS[_date_parts(t)[1] - 1],
          "What month is the date in? Give the month's name.",
          "Name the month of the date.", "Write the name of the month in the date."),
    # --- no input: everything is in the instruction ---------------------------------------
    _slot_task("count_range", "none", inputs.sample_count_range,
               lambda s, t: " ".join(map(str, range(s["start"], s["stop"] + 1))),
               "Count from {start} to {stop}, separated by spaces.",
               "List the whole numbers from {start} to {stop} with spaces between them.",
               "Write every integer from {start} up to {stop}, space-separated."),
    _slot_task("repeat_times", "none", inputs.sample_repeat,
               lambda s, t: " ".join([s["word"]] * s["times"]),
               "Write the word '{word}' {times_word} times, separated by spaces.",
               "Repeat '{word}' {times} times with spaces in between.",
               "Say '{word}' {times_word} times in a row, separated by spaces."),
    _slot_task("reverse_inline", "none", inputs.sample_inline_word, lambda s, t: s["word"][::-1],
               "Write the word '{word}' backwards.", "Reverse the letters of '{word}'.",
               "Spell '{word}' in reverse order."),
)
# fmt: on

TASKS: dict[str, Task] = {task.name: task for task in _ALL_TASKS}
# Held out from training: each has trained relatives, so the instruction alone explains it.
UNSEEN_TASKS: tuple[str, ...] = (
    "last_letter",  # first_letter
    "count_vowels",  # word_length, remove_vowels
    "second_word",  # first_word, last_word
    "sort_words_desc",  # sort_words
    "min_number",  # max_number
    "sort_numbers_desc",  # sort_numbers, reverse_numbers
    "smaller_of_pair",  # larger_of_pair
    "title_case",  # capitalize_word, uppercase_sentence
    "extract_city",  # extract_name, extract_age
    "date_day",  # date_year
)
TRAIN_TASKS: tuple[str, ...] = tuple(name for name in TASKS if name not in UNSEEN_TASKS)


def _held_out(slots: Slots, text: str) -> bool:
    key = f"{text}|{sorted(slots.items())}".encode()
    return zlib.crc32(key) % _HELD_OUT_BUCKETS == 0


def make_example(task: Task, rng: random.Random, held_out: bool | None = None) -> dict[str, Any]:
    """One example of ``task``. ``held_out`` True/False restricts the input to the
    validation / training part of the input space; None allows any input."""
    for _ in range(_MAX_TRIES):
        slots, text = task.sample(rng)
        if held_out is None or _held_out(slots, text) == held_out:
            break
    else:  # pragma: no cover - every family's input space is far larger than needed
        raise RuntimeError(f"task {task.name}: no input found in the requested partition")
    instruction = rng.choice(task.instructions).format(**slots)
    return {
        "instruction": instruction,
        "input": text,
        "output": task.answer(slots, text),
        "task": task.name,
        "source": SOURCE,
    }


def split_tasks(split: str) -> tuple[str, ...]:
    """The task families a split draws from."""
    if split not in SPLITS:
        raise ValueError(
            f"unknown synthetic split {split!r}; expected one of {SPLITS} (the synthetic "
            "suite has no validation_human split)"
        )
    return UNSEEN_TASKS if split == "validation_unseen" else TRAIN_TASKS


def make_split(split: str, num_examples: int, seed: int = 0) -> list[dict[str, Any]]:
    """``num_examples`` examples of a split, deterministic from ``(split, seed)``.

    Families are used in balanced rounds (each round a fresh shuffle of the split's
    families), so every family appears ``num_examples / families`` times, +-1.
    """
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    names = list(split_tasks(split))
    held_out = {"train": False, "validation_seen": True, "validation_unseen": None}[split]
    rng = random.Random(f"gist_jax.synthetic:{seed}:{split}")
    examples: list[dict[str, Any]] = []
    round_order: list[str] = []
    while len(examples) < num_examples:
        if not round_order:
            round_order = names[:]
            rng.shuffle(round_order)
        examples.append(make_example(TASKS[round_order.pop()], rng, held_out))
    return examples
