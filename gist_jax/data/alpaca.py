"""Alpaca+ example files: validation, loading (local path or URL) and writing.

An Alpaca+ file is a JSON list, or JSON lines, of objects with string fields
``instruction``, ``input`` and ``output`` (extra keys such as ``source`` or ``task`` are
kept). This module owns reading such files and nothing downstream of that: every record is
checked in Python *before* Hugging Face ``datasets`` sees the file, so a bad file fails
with a message naming the file, the line (JSON lines) or element index and line (JSON
list), and the key, instead of an Arrow error. The file is then loaded with
``datasets.load_dataset("json", data_files=...)``.

Bad input and what happens (also in the README):

===============================  ==========================================================
input                            handling
===============================  ==========================================================
bytes that are not UTF-8         ``DataFormatError`` naming file, line and byte offset
malformed JSON / JSON line       ``DataFormatError`` naming file, line and column
top-level value not a list       ``DataFormatError`` (a JSON object, number, ...)
element that is not an object    ``DataFormatError`` naming the element index / line
missing required key             ``DataFormatError`` naming the key(s)
required key not a string        ``DataFormatError`` naming the key and the JSON type
empty (or whitespace) instr.     skipped and counted (``on_empty="error"``: error)
empty (or whitespace) output     skipped and counted (``on_empty="error"``: error)
empty ``input``                  normal: the template omits the ``Input:`` line
no examples left                 ``DataFormatError``
===============================  ==========================================================

A UTF-8 byte-order mark is accepted and ignored; blank lines in JSON lines are skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from typing import Any

REQUIRED_KEYS: tuple[str, ...] = ("instruction", "input", "output")
# Fields that must not be empty; an empty ``input`` is ordinary (no Input: line).
NON_EMPTY_KEYS: tuple[str, ...] = ("instruction", "output")
SPLITS: tuple[str, ...] = ("train", "validation_seen", "validation_unseen", "validation_human")
_JSON_WHITESPACE = " \t\n\r"
_MAX_LOCATIONS = 20


class DataFormatError(ValueError):
    """An example file that cannot be used; the message names the file, place and key."""


@dataclasses.dataclass
class LoadReport:
    """What happened to the records of one file."""

    source: str
    loaded: int = 0  # records read from the file
    kept: int = 0  # records returned
    dropped_empty_instruction: int = 0
    dropped_empty_output: int = 0
    # "where: why" for the first few dropped records, to find them in the file.
    dropped_locations: list[str] = dataclasses.field(default_factory=list)

    @property
    def dropped(self) -> int:
        return self.dropped_empty_instruction + self.dropped_empty_output

    def summary(self) -> str:
        return (
            f"{self.source}: loaded {self.loaded}, kept {self.kept}, dropped {self.dropped} "
            f"(empty instruction {self.dropped_empty_instruction}, "
            f"empty output {self.dropped_empty_output})"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"dropped": self.dropped}


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _decode_utf8(raw: bytes, name: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        bad = raw[err.start : err.start + 1].hex()
        raise DataFormatError(
            f"{name}: line {line}: invalid UTF-8 byte 0x{bad} at byte offset {err.start} "
            "(the file must be UTF-8 encoded)"
        ) from None
    return text.removeprefix("\ufeff")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array"}.get(
        type(value), "object"
    )


def _check_record(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {_json_type(record)}")
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise DataFormatError(
            f"{where}: missing key(s) {missing}; every example needs {list(REQUIRED_KEYS)}"
        )
    for key in REQUIRED_KEYS:
        if not isinstance(record[key], str):
            raise DataFormatError(
                f"{where}: key {key!r} must be a string, got {_json_type(record[key])}"
            )
    return record


def _parse_json_list(text: str, name: str) -> list[tuple[str, Any]]:
    """Parse a top-level JSON list element by element so errors can name the element and
    its line; returns ``(where, value)`` pairs."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    items: list[tuple[str, Any]] = []

    def skip_ws(p: int) -> int:
        while p < len(text) and text[p] in _JSON_WHITESPACE:
            p += 1
        return p

    def fail(p: int, msg: str) -> DataFormatError:
        col = p - text.rfind("\n", 0, p)
        return DataFormatError(
            f"{name}: line {_line_of(text, p)} column {col}: malformed JSON list ({msg})"
        )

    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        pos += 1
    else:
        while True:
            pos = skip_ws(pos)
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as err:
                raise fail(err.pos, f"element {len(items)}: {err.msg}") from None
            items.append((f"{name}: element {len(items)} (line {_line_of(text, pos)})", value))
            pos = skip_ws(end)
            if pos < len(text) and text[pos] == ",":
                pos += 1
                continue
            if pos < len(text) and text[pos] == "]":
                pos += 1
                break
            raise fail(pos, f"expected ',' or ']' after element {len(items) - 1}")
    pos = skip_ws(pos)
    if pos != len(text):
        raise fail(pos, "extra data after the closing ']'")
    return items


def _parse_json_lines(text: str, name: str) -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            if number == 1 and _is_single_json_value(text):
                raise DataFormatError(
                    f"{name}: the file is one JSON {_json_type(json.loads(text))}; expected a "
                    "JSON list of examples or JSON lines (one object per line)"
                ) from None
            raise DataFormatError(
                f"{name}: line {number} column {err.colno}: malformed JSON line ({err.msg})"
            ) from None
        items.append((f"{name}: line {number}", value))
    return items


def _is_single_json_value(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def parse_examples(
    raw: bytes | str, name: str = "<string>", on_empty: str = "skip"
) -> tuple[list[dict[str, Any]], list[int], LoadReport]:
    """Validate the contents of an Alpaca+ file.

    Returns ``(kept_records, kept_indices, report)``; ``kept_indices`` are the record
    numbers (0-based, in file order) of the kept records. Raises ``DataFormatError``.
    """
    if on_empty not in ("skip", "error"):
        raise ValueError(f"on_empty must be 'skip' or 'error', got {on_empty!r}")
    text = _decode_utf8(raw, name) if isinstance(raw, bytes) else raw.removeprefix("\ufeff")
    stripped = text.lstrip(_JSON_WHITESPACE)
    if not stripped:
        raise DataFormatError(f"{name}: the file is empty")
    items = _parse_json_list(text, name) if stripped[0] == "[" else _parse_json_lines(text, name)

    report = LoadReport(source=name, loaded=len(items))
    kept: list[dict[str, Any]] = []
    kept_indices: list[int] = []
    for index, (where, value) in enumerate(items):
        record = _check_record(value, where)
        empty = [key for key in NON_EMPTY_KEYS if not record[key].strip()]
        if empty:
            if on_empty == "error":
                raise DataFormatError(f"{where}: key {empty[0]!r} is empty")
            if empty[0] == "instruction":
                report.dropped_empty_instruction += 1
            else:
                report.dropped_empty_output += 1
            if len(report.dropped_locations) < _MAX_LOCATIONS:
                report.dropped_locations.append(f"{where}: empty {empty[0]!r}")
            continue
        kept.append(record)
        kept_indices.append(index)
    report.kept = len(kept)
    if not kept:
        raise DataFormatError(f"{name}: no usable examples ({report.summary()})")
    return kept, kept_indices, report


def _is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https", "file")


def fetch(source: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """A local path for ``source``: the path itself, or a URL (http, https, file)
    downloaded into ``cache_dir`` (default: a ``gist_jax_data`` temp directory)."""
    source = str(source)
    if not _is_url(source):
        path = pathlib.Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{source}: no such file")
        return path
    root = pathlib.Path(cache_dir or pathlib.Path(tempfile.gettempdir()) / "gist_jax_data")
    root.mkdir(parents=True, exist_ok=True)
    base = pathlib.PurePosixPath(urllib.parse.urlparse(source).path).name or "data.json"
    target = root / f"{hashlib.sha256(source.encode()).hexdigest()[:16]}-{base}"
    try:
        with urllib.request.urlopen(source, timeout=60) as response:
            data = response.read()
    except OSError as err:
        raise OSError(f"{source}: download failed ({err})") from err
    # Write then rename, so a concurrent reader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{base}.")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, target)
    return target


def read_examples(
    source: str | os.PathLike,
    on_empty: str = "skip",
    cache_dir: str | os.PathLike | None = None,
) -> tuple[list[dict[str, Any]], LoadReport]:
    """Validate and load one Alpaca+ file (local path or URL) with ``datasets``.

    Returns the kept examples (dicts with every key of the file) and a ``LoadReport``.
    Raises ``DataFormatError`` for a bad file (see the module docstring).
    """
    name = str(source)
    path = fetch(source, cache_dir=cache_dir)
    validated, kept_indices, report = parse_examples(path.read_bytes(), name, on_empty)

    import datasets

    try:
        dataset = datasets.load_dataset(
            "json", data_files=str(path), split="train", cache_dir=cache_dir
        )
    except Exception as err:  # Arrow/datasets raise many types; the file is what matters.
        raise DataFormatError(f"{name}: datasets could not load the file ({err})") from err
    if len(dataset) != report.loaded:
        raise DataFormatError(
            f"{name}: datasets read {len(dataset)} records but the file has {report.loaded}"
        )
    rows = dataset.to_list()
    examples = []
    for index, expected in zip(kept_indices, validated, strict=True):
        # Arrow gives every row the union of all keys (None where absent): keep only the
        # record's own keys.
        example = {key: rows[index][key] for key in expected}
        for key in REQUIRED_KEYS:
            if example[key] != expected[key]:  # would be a datasets parsing surprise
                raise DataFormatError(f"{name}: datasets changed key {key!r} while loading")
        examples.append(example)
    return examples, report


def split_file(data_root: str | os.PathLike, split: str) -> str:
    """The path or URL of a split's file under ``data_root``: ``alpaca_plus_{split}.json``,
    or ``.jsonl`` if only that exists locally."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    root = str(data_root)
    if _is_url(root):
        return root.rstrip("/") + f"/alpaca_plus_{split}.json"
    path = pathlib.Path(root) / f"alpaca_plus_{split}.json"
    lines = path.with_suffix(".jsonl")
    return str(lines if not path.exists() and lines.exists() else path)


def load_split(
    data_root: str | os.PathLike,
    split: str,
    on_empty: str = "skip",
    cache_dir: str | os.PathLike | None = None,
) -> tuple[list[dict[str, Any]], LoadReport]:
    """Load ``alpaca_plus_{split}.json`` from a directory or URL prefix."""
    return read_examples(split_file(data_root, split), on_empty=on_empty, cache_dir=cache_dir)


def write_examples(path: str | os.PathLike, examples: Iterable[Mapping[str, Any]]) -> None:
    """Write examples as a UTF-8 JSON list (the Alpaca+ file format), atomically."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [dict(example) for example in examples]
    for index, record in enumerate(records):
        _check_record(record, f"{path}: element {index}")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(records, handle, ensure_ascii=False, indent=1)
        handle.write("\n")
    os.replace(tmp, path)
