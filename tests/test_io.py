"""rayunlearn.io's JSON writers: strict JSON (non-finite numbers become null), atomic files."""

import json
import math
from dataclasses import dataclass

import numpy as np
import pytest

from rayunlearn.io import append_jsonl, dumps, read_json, read_jsonl, write_json


def _strict(text: str):
    """Parse as strict JSON: Python's reader accepts NaN/Infinity unless told otherwise."""
    def refuse(token):
        raise ValueError(f"non-JSON token {token}")

    return json.loads(text, parse_constant=refuse)


@dataclass
class _Point:
    x: float
    y: float


def test_write_json_writes_null_for_non_finite_numbers(tmp_path):
    obj = {"loss": math.inf, "neg": -math.inf, "nan": math.nan, "ok": 1.5, "n": 3,
           "nested": {"list": [1.0, math.nan, (math.inf, 2.0)]}, "np32": np.float32("nan"),
           "np64": np.float64("-inf"), "arr": np.array([0.25, np.nan]), "point": _Point(math.nan, 2.0),
           "text": "Infinity"}
    write_json(tmp_path / "m.json", obj)
    text = (tmp_path / "m.json").read_text()
    expected = {"loss": None, "neg": None, "nan": None, "ok": 1.5, "n": 3,
                "nested": {"list": [1.0, None, [None, 2.0]]}, "np32": None, "np64": None,
                "arr": [0.25, None], "point": {"x": None, "y": 2.0}, "text": "Infinity"}
    assert _strict(text) == expected and read_json(tmp_path / "m.json") == expected


def test_log_jsonl_lines_are_strict_json(tmp_path):
    path = tmp_path / "log.jsonl"
    append_jsonl(path, {"step": 1, "loss": 0.5, "grad_norm": math.inf})
    append_jsonl(path, {"step": 2, "loss": math.nan, "forget.prob": np.float32(0.125)})
    lines = path.read_text().splitlines()
    assert [_strict(line) for line in lines] == [{"step": 1, "loss": 0.5, "grad_norm": None},
                                                 {"step": 2, "loss": None, "forget.prob": 0.125}]
    assert read_jsonl(path)[1]["loss"] is None


def test_dumps_is_strict_json():
    assert dumps([math.nan, {"a": -math.inf}]) == "[null, {\"a\": null}]"
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        dumps(object())
