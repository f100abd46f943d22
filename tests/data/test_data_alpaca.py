"""Alpaca+ file loading: good files (JSON list, JSON lines, URL, extra keys), every bad
input case with its error message, and the empty-field counting policy."""

from __future__ import annotations

import functools
import http.server
import json
import pathlib
import threading

import pytest

from gist_jax.data import alpaca
from gist_jax.data.alpaca import DataFormatError

GOOD = [
    {"instruction": "Reverse the word.", "input": "apple", "output": "elppa", "source": "a"},
    {"instruction": "Name a color.", "input": "", "output": "red", "source": "b", "id": 7},
    {"instruction": "Add the numbers.", "input": "1, 2", "output": "3", "source": "c"},
]


@pytest.fixture
def cache_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "hf_cache"


def _write(path: pathlib.Path, data: bytes | str) -> pathlib.Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def test_json_list_keeps_extra_keys_and_reports(tmp_path, cache_dir):
    path = _write(tmp_path / "d.json", json.dumps(GOOD, indent=2))
    examples, report = alpaca.read_examples(path, cache_dir=cache_dir)
    assert examples == GOOD
    assert (report.loaded, report.kept, report.dropped) == (3, 3, 0)
    assert str(path) in report.summary()


def test_json_lines_with_bom_and_blank_lines(tmp_path, cache_dir):
    text = "\ufeff" + json.dumps(GOOD[0]) + "\n\n" + json.dumps(GOOD[2]) + "\n"
    path = _write(tmp_path / "d.jsonl", text)
    examples, report = alpaca.read_examples(path, cache_dir=cache_dir)
    assert examples == [GOOD[0], GOOD[2]]
    assert report.loaded == 2


def test_load_from_http_and_file_url(tmp_path, cache_dir):
    data_dir = tmp_path / "served"
    data_dir.mkdir()
    alpaca.write_examples(data_dir / "alpaca_plus_validation_seen.json", GOOD)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(data_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        examples, report = alpaca.load_split(url, "validation_seen", cache_dir=cache_dir)
    finally:
        server.shutdown()
        thread.join()
    assert examples == GOOD
    assert report.source == url + "/alpaca_plus_validation_seen.json"
    file_url = (data_dir / "alpaca_plus_validation_seen.json").as_uri()
    assert alpaca.read_examples(file_url, cache_dir=cache_dir)[0] == GOOD


def test_load_split_names_and_jsonl_fallback(tmp_path, cache_dir):
    _write(tmp_path / "alpaca_plus_train.jsonl", "\n".join(json.dumps(e) for e in GOOD))
    examples, _ = alpaca.load_split(tmp_path, "train", cache_dir=cache_dir)
    assert examples == GOOD
    with pytest.raises(ValueError, match="unknown split 'test'"):
        alpaca.load_split(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match=r"alpaca_plus_validation_human\.json: no such"):
        alpaca.load_split(tmp_path, "validation_human")


def test_write_examples_round_trip_and_rejects_bad_records(tmp_path, cache_dir):
    records = [*GOOD, {"instruction": "Say <GIST> é", "input": "ü", "output": "✓"}]
    path = tmp_path / "out" / "x.json"
    alpaca.write_examples(path, records)
    assert alpaca.read_examples(path, cache_dir=cache_dir)[0] == records
    with pytest.raises(DataFormatError, match=r"element 0: missing key\(s\) \['output'\]"):
        alpaca.write_examples(tmp_path / "y.json", [{"instruction": "a", "input": ""}])


# ---------------------------------------------------------------- bad input, one case each

BAD_CASES = {
    "non_utf8": (
        b'[{"instruction": "a", "input": "", "output": "b"},\n'
        b'{"instruction": "\xff", "input": "", "output": "b"}]',
        r"line 2: invalid UTF-8 byte 0xff at byte offset 68",
    ),
    "list_missing_comma": (
        '[\n {"instruction": "a", "input": "", "output": "b"}\n'
        ' {"instruction": "c", "input": "", "output": "d"}\n]',
        r"line 3 column 2: malformed JSON list \(expected ',' or '\]' after element 0\)",
    ),
    "list_trailing_comma": (
        '[{"instruction": "a", "input": "", "output": "b"},\n]',
        r"line 2 column 1: malformed JSON list \(element 1: Expecting value\)",
    ),
    "list_bad_string": (
        '[{"instruction": "a", "input": "", "output": "b"},\n {"instruction": "a\n"}]',
        r"line 2 column 20: malformed JSON list \(element 1: Invalid control character",
    ),
    "list_unterminated": (
        '[{"instruction": "a", "input": "", "output": "b"}',
        r"line 1 column 50: malformed JSON list \(expected ',' or '\]' after element 0\)",
    ),
    "list_extra_data": (
        '[{"instruction": "a", "input": "", "output": "b"}] []',
        r"line 1 column 52: malformed JSON list \(extra data after the closing '\]'\)",
    ),
    "jsonl_bad_line": (
        '{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "a", "input"}\n',
        r"line 2 column 29: malformed JSON line \(Expecting ':' delimiter\)",
    ),
    "top_level_object": (
        '{\n "instruction": "a",\n "input": "",\n "output": "b"\n}',
        r"the file is one JSON object; expected a JSON list of examples or JSON lines",
    ),
    "element_not_object": (
        '[{"instruction": "a", "input": "", "output": "b"},\n "just text"]',
        r"element 1 \(line 2\): expected a JSON object, got string",
    ),
    "jsonl_not_object": (
        '{"instruction": "a", "input": "", "output": "b"}\n[1, 2]\n',
        r"line 2: expected a JSON object, got array",
    ),
    "missing_key_list": (
        '[{"instruction": "a", "input": "", "output": "b"},\n {"instruction": "a"}]',
        r"element 1 \(line 2\): missing key\(s\) \['input', 'output'\]",
    ),
    "missing_key_jsonl": (
        '{"instruction": "a", "output": "b"}\n',
        r"line 1: missing key\(s\) \['input'\]",
    ),
    "number_field": (
        '[{"instruction": "a", "input": 5, "output": "b"}]',
        r"element 0 \(line 1\): key 'input' must be a string, got number",
    ),
    "null_field": (
        '{"instruction": "a", "input": "", "output": null}\n',
        r"line 1: key 'output' must be a string, got null",
    ),
    "list_field": (
        '{"instruction": ["a"], "input": "", "output": "b"}\n',
        r"line 1: key 'instruction' must be a string, got array",
    ),
    "empty_file": ("  \n", r"the file is empty"),
    "only_empty_examples": (
        '[{"instruction": " ", "input": "", "output": "b"}]',
        r"no usable examples \(.*dropped 1 \(empty instruction 1, empty output 0\)\)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_named(tmp_path, case):
    data, message = BAD_CASES[case]
    path = _write(tmp_path / f"{case}.json", data)
    with pytest.raises(DataFormatError, match=message) as info:
        alpaca.read_examples(path, cache_dir=tmp_path / "cache")
    assert str(info.value).startswith(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.json: no such file"):
        alpaca.read_examples(tmp_path / "nope.json")


def test_empty_instruction_and_output_are_skipped_and_counted(tmp_path, cache_dir):
    records = [
        GOOD[0],
        {"instruction": "", "input": "x", "output": "y"},
        {"instruction": "Do it.", "input": "x", "output": "  \n"},
        {"instruction": "Do it.", "input": "", "output": "done"},  # empty input is normal
        {"instruction": "\t", "input": "", "output": ""},
    ]
    path = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in records))
    examples, report = alpaca.read_examples(path, cache_dir=cache_dir)
    assert examples == [records[0], records[3]]
    assert report.to_dict() | {"dropped_locations": None} == {
        "source": str(path),
        "loaded": 5,
        "kept": 2,
        "dropped_empty_instruction": 2,
        "dropped_empty_output": 1,
        "dropped": 3,
        "dropped_locations": None,
    }
    assert report.dropped_locations == [
        f"{path}: line 2: empty 'instruction'",
        f"{path}: line 3: empty 'output'",
        f"{path}: line 5: empty 'instruction'",
    ]
    with pytest.raises(DataFormatError, match=r"line 2: key 'instruction' is empty"):
        alpaca.read_examples(path, on_empty="error")
