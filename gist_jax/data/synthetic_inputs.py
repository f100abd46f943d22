"""Suite version 1's vocabulary and input samplers (``gist_jax.data.synthetic``): the word,
name, city and month tables that every suite version draws inputs from, English number
words, and one sampler per input kind. A sampler returns the slots its instruction
templates fill and the input text; the task table that pairs samplers with instructions
and answers is ``synthetic._ALL_TASKS``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

Slots = dict[str, Any]
Sampler = Callable[[random.Random], tuple[Slots, str]]


def _split(text: str) -> tuple[str, ...]:
    return tuple(text.split())


WORDS: tuple[str, ...] = _split(
    """
    apple river stone cloud garden window silver forest candle bridge orange planet
    tiger pencil summer winter market island rocket button castle dragon engine feather
    guitar hammer jacket kettle ladder magnet needle ocean pepper rabbit saddle tunnel
    violin wallet yellow zebra anchor basket circle desert eagle falcon ginger harbor
    insect jungle kitten lemon meadow nickel oyster parrot quartz ribbon shadow timber
    umbrella valley walnut almond breeze cactus dolphin empire fabric glacier horizon
    iceberg jasmine lantern marble napkin orchid pillow quiver rainbow sunset thunder
    uniform velvet whistle bamboo cobalt diamond ember fossil goblet hollow ivory jigsaw
    kernel lizard mosaic nectar olive pebble puzzle raven sparrow tomato unicorn vessel
    willow acorn beacon cherry donkey elbow fiddle gravel honey igloo juniper koala
    lobster mango noodle otter panda quill radish salmon turnip vanilla waffle bread
    chair table house mouse horse sheep goat lamp book door road tree bird fish frog
    ship star moon sun rain snow wind fire water earth metal glass paper cotton wool
    """
)
NAMES: tuple[str, ...] = _split(
    "Alice Bruno Chloe Daniel Elena Felix Grace Hugo Irene James Karen Leo Maria Nadia "
    "Oscar Paula Quinn Rosa Samuel Tara Umar Vera Walter Xenia Yusuf Zoe"
)
CITIES: tuple[str, ...] = _split(
    "Paris Lima Oslo Cairo Tokyo Dublin Madrid Nairobi Quito Berlin Lisbon Sydney Toronto "
    "Vienna Athens Prague Seoul Delhi Havana Warsaw"
)
MONTHS: tuple[str, ...] = _split(
    "January February March April May June July August September October November December"
)
VOWELS = "aeiou"
_ONES = _split(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
)
_TENS = _split("twenty thirty forty fifty sixty seventy eighty ninety")


# -- input samplers (each returns slots for the instruction and the input text) -------------


def number_words(n: int) -> str:
    """English words for 0 <= n < 100, hyphenated like "forty-seven"."""
    if not 0 <= n < 100:
        raise ValueError(n)
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens - 2] + (f"-{_ONES[ones]}" if ones else "")


def sample_word(rng: random.Random) -> tuple[Slots, str]:
    return {}, rng.choice(WORDS)


def word_list(rng: random.Random, low: int = 3, high: int = 6) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def sample_words_input(rng: random.Random) -> tuple[Slots, str]:
    return {}, ", ".join(word_list(rng))


def sample_unique_extreme_words(rng: random.Random) -> tuple[Slots, str]:
    # Longest / shortest questions need one clear answer.
    while True:
        words = word_list(rng)
        lengths = sorted(len(w) for w in words)
        if lengths[0] < lengths[1] and lengths[-2] < lengths[-1]:
            return {}, ", ".join(words)


def sample_contains(rng: random.Random) -> tuple[Slots, str]:
    words = word_list(rng)
    target = rng.choice(words) if rng.random() < 0.5 else rng.choice(WORDS)
    return {"target": target}, ", ".join(words)


def number_list(rng: random.Random) -> list[int]:
    return [rng.randint(1, 99) for _ in range(rng.randint(3, 6))]


def sample_numbers_input(rng: random.Random) -> tuple[Slots, str]:
    return {}, ", ".join(map(str, number_list(rng)))


def sample_numbers_with_even(rng: random.Random) -> tuple[Slots, str]:
    while True:
        numbers = number_list(rng)
        if any(n % 2 == 0 for n in numbers):
            return {}, ", ".join(map(str, numbers))


def sample_pair(rng: random.Random, low: int = 1, high: int = 50) -> tuple[Slots, str]:
    a, b = rng.sample(range(low, high + 1), 2)
    return {}, f"{a}, {b}"


def sample_small_pair(rng: random.Random) -> tuple[Slots, str]:
    return sample_pair(rng, 2, 12)


def sample_number(rng: random.Random) -> tuple[Slots, str]:
    return {}, str(rng.randint(1, 99))


def sample_small_number(rng: random.Random) -> tuple[Slots, str]:
    return {}, str(rng.randint(1, 20))


def sample_sentence(rng: random.Random) -> tuple[Slots, str]:
    words = word_list(rng, 4, 7)
    return {}, " ".join(words).capitalize() + "."


def sample_record(rng: random.Random) -> tuple[Slots, str]:
    name, age, city = rng.choice(NAMES), rng.randint(5, 80), rng.choice(CITIES)
    return {}, f"name: {name}; age: {age}; city: {city}"


def sample_date(rng: random.Random) -> tuple[Slots, str]:
    year, month, day = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return {}, f"{year:04d}-{month:02d}-{day:02d}"


def sample_count_range(rng: random.Random) -> tuple[Slots, str]:
    start = rng.randint(1, 15)
    return {"start": start, "stop": start + rng.randint(2, 6)}, ""


def sample_repeat(rng: random.Random) -> tuple[Slots, str]:
    times = rng.randint(2, 4)
    return {"word": rng.choice(WORDS), "times": times, "times_word": _ONES[times]}, ""


def sample_inline_word(rng: random.Random) -> tuple[Slots, str]:
    return {"word": rng.choice(WORDS)}, ""
