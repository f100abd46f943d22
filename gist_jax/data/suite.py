"""What the synthetic suites of versions 2 and 3 share: an ``Op`` and its argument
settings, the stable hash buckets that hold argument settings and op pairs out of training,
the surface machinery of instructions ("<a|b>" choices, prefixes, format clauses,
connectives of two ops, brackets), and ``Suite``, the split logic (train,
validation_seen, validation_recombined, validation_unseen) a version plugs its ops into.
"""

from __future__ import annotations

import dataclasses
import random
import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any

INPUT_TRIES = 200  # inputs tried for one instruction before another is drawn
SPLITS: tuple[str, ...] = ("train", "validation_seen", "validation_recombined", "validation_unseen")
# Examples per split when a caller does not say (versions 2 and 3).
DEFAULT_SIZES: dict[str, int] = {"train": 20000} | {split: 400 for split in SPLITS[1:]}
SEEN_POOL = 2000  # validation_seen reuses instructions of the first this-many train examples

HELD_OUT_ARG_BUCKETS = 4  # about one argument setting in four is kept for recombined
HELD_OUT_PAIR_BUCKETS = 4  # about one pair of operations in four is kept for recombined
_MAX_TRIES = 2000

Slots = dict[str, Any]

BRACKETS = (
    ("[", "]", "square brackets"),
    ("(", ")", "<parentheses|round brackets>"),
    ("{", "}", "curly braces"),
    ("<", ">", "angle brackets"),
    ('"', '"', "double quotes"),
    ("*", "*", "asterisks"),
)
# "Instruction: " doubles the prompt template's own label for one instruction in six; kept
# because the measured runs (docs/results.md) used exactly this suite.
PREFIXES = ("", "", "", "Please ", "Task: ", "Instruction: ")
FORMAT_CLAUSES = (
    "",
    "",
    " Answer with the result only.",
    " Reply with just the answer.",
    " Output nothing else.",
    " Give only the final answer.",
)
CONNECTIVES = (
    "{a}, then {b}",
    "first {a}, then {b}",
    "{a} and then {b}",
    "{a}; after that, {b}",
    "start by taking the input and {a}; next, {b}",
)


class Invalid(Exception):
    """The sampled input does not suit the operation (e.g. too short): sample again."""


@dataclasses.dataclass(frozen=True)
class Op:
    """One operation: ``kind`` -> a value; ``phrases`` are imperative templates over the
    slots that ``args`` samples (``{x}`` stands for the noun of the input kind);
    ``chainable`` ops return a value of their own kind, so a second op can follow."""

    name: str
    kind: str
    phrases: tuple[str, ...]
    apply: Callable[[Slots, Any], Any]
    args: Callable[[random.Random], Slots] = lambda rng: {}
    chainable: bool = False
    # Ops whose phrases can read the same for two input kinds ("join the list with
    # slashes") share a family, so an argument setting is held out for both or neither.
    family: str = ""


def bucket(key: str, buckets: int) -> int:
    return zlib.crc32(key.encode()) % buckets


def _args_key(op: Op, slots: Slots) -> str:
    # The argument values that change the answer (display variants like "<3|three>" are
    # the same setting, so they are left out).
    values = {k: v for k, v in slots.items() if not (isinstance(v, str) and "<" in v)}
    return f"{op.family or op.name}|{sorted(values.items())}"


def held_out_args(op: Op, slots: Slots) -> bool:
    """Whether this argument setting of a trained op is kept for ``validation_recombined``
    (ops without arguments have none held out)."""
    return bool(slots) and bucket(_args_key(op, slots), HELD_OUT_ARG_BUCKETS) == 0


def held_out_pair(first: str, second: str) -> bool:
    """Whether the composition ``first`` then ``second`` is kept for
    ``validation_recombined``."""
    return bucket(f"{first}+{second}", HELD_OUT_PAIR_BUCKETS) == 0


_CHOICE = re.compile(r"<([^<>]*\|[^<>]*)>")


def expand(text: str, rng: random.Random) -> str:
    # "<a|b|c>" -> one of a, b, c (repeatedly: slot values may hold alternatives too).
    while (m := _CHOICE.search(text)) is not None:
        text = text[: m.start()] + rng.choice(m.group(1).split("|")) + text[m.end() :]
    return text


def sample_slots(op: Op, rng: random.Random, held_out: bool | None) -> Slots:
    # held_out: True only held-out argument settings, False only training ones, None any.
    for _ in range(_MAX_TRIES):
        slots = op.args(rng)
        if held_out is None or held_out_args(op, slots) == held_out:
            return slots
    raise RuntimeError(f"op {op.name}: no argument setting in the requested partition")


def arg_partitions(op: Op) -> tuple[bool, bool]:
    """(has training settings, has held-out settings) of an op's arguments."""
    rng = random.Random(0)
    held = {held_out_args(op, op.args(rng)) for _ in range(500)}
    return False in held, True in held


def generate(
    specs: Any,
    rng: random.Random,
    held_out_input: bool | None,
    num_examples: int,
    example_of: Callable[..., dict | None],
) -> list[tuple[Any, dict[str, Any]]]:
    """``num_examples`` (spec, example) pairs from an endless spec stream; ``example_of``
    (the suite's) turns a spec into an example or None."""
    out = []
    while len(out) < num_examples:
        spec = next(specs)
        example = example_of(spec, rng, held_out_input)
        if example is not None:
            out.append((spec, example))
    return out


@dataclasses.dataclass(frozen=True)
class Suite:
    """What a suite version plugs into the shared split logic: its ops, how it phrases one
    op or a pair, and how it draws an input for an instruction."""

    name: str  # the source name; seeds the per-split random streams
    train_ops: tuple[str, ...]
    unseen_ops: tuple[str, ...]
    held_out_arg_ops: tuple[str, ...]
    train_pairs: list[tuple[str, str]]
    held_out_pairs: list[tuple[str, str]]
    composed_share: float  # share of train / recombined examples that compose two ops
    single: Callable[[str, random.Random, bool | None], Any]
    composed: Callable[[tuple[str, str], random.Random, bool | None], Any]
    # A fresh input for a spec: (the value its answer is computed from, the input text).
    draw_input: Callable[[Any, random.Random], tuple[Any, str]]
    # Whether an input text is held out of training (for the spec's op).
    held_out_input: Callable[[Any, str], bool]

    def example(self, spec: Any, rng: random.Random, held_out_input: bool | None) -> dict | None:
        """An example of ``spec`` on a fresh input (a held-out one, a training one, or any,
        as ``held_out_input`` says), or None when no input suits it (e.g. "capitalise,
        then keep the words starting with 't'")."""
        for _ in range(INPUT_TRIES):
            value, text = self.draw_input(spec, rng)
            if held_out_input is not None and self.held_out_input(spec, text) != held_out_input:
                continue
            try:
                output = spec.answer(value)
            except Invalid:
                continue
            return {
                "instruction": spec.instruction,
                "input": text,
                "output": output,
                "task": spec.task,
                "source": self.name,
            }
        return None

    def rng(self, seed: int, split: str) -> random.Random:
        return random.Random(f"gist_jax.{self.name}:{seed}:{split}")

    def spec_stream(self, split: str, rng: random.Random) -> Any:
        """Endless instruction specs of a split (not validation_seen, which copies train's)."""
        order: list[str] = []
        while True:
            if split == "validation_unseen":
                if not order:
                    order = list(self.unseen_ops)
                    rng.shuffle(order)
                yield self.single(order.pop(), rng, None)
            elif split == "train":
                if rng.random() < self.composed_share:
                    yield self.composed(rng.choice(self.train_pairs), rng, False)
                else:
                    yield self.single(rng.choice(self.train_ops), rng, False)
            elif rng.random() < 0.5:  # validation_recombined: a held-out pair ...
                yield self.composed(rng.choice(self.held_out_pairs), rng, False)
            else:  # ... or a trained op with a held-out argument setting
                yield self.single(rng.choice(self.held_out_arg_ops), rng, True)

    def make_split(self, split: str, num_examples: int, seed: int = 0) -> list[dict[str, Any]]:
        """``num_examples`` examples of ``split``, deterministic from ``(split, seed)``."""
        if split not in SPLITS:
            raise ValueError(f"unknown {self.name} split {split!r}; expected one of {SPLITS}")
        if num_examples < 0:
            raise ValueError(f"num_examples must be >= 0, got {num_examples}")
        rng = self.rng(seed, split)
        if split == "validation_seen":
            # Instructions of the first SEEN_POOL training examples, on held-out inputs.
            train_rng = self.rng(seed, "train")
            train = self.spec_stream("train", train_rng)
            pool = [spec for spec, _ in generate(train, train_rng, False, SEEN_POOL, self.example)]
            return [
                ex for _, ex in generate(choices(pool, rng), rng, True, num_examples, self.example)
            ]
        held_out_input = False if split == "train" else None
        stream = self.spec_stream(split, rng)
        return [ex for _, ex in generate(stream, rng, held_out_input, num_examples, self.example)]


def choices(pool: Sequence[Any], rng: random.Random) -> Any:
    while True:
        yield rng.choice(pool)
