"""--json output is strictly standard JSON: no bare NaN/Infinity, numpy values converted (issue 15 item 5)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mist_kit.cli.common import print_json


def _strict_loads(text: str):
    def refuse(name: str):
        raise AssertionError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_print_json_is_strict(capsys):
    print_json({"top1": float("nan"), "loss": np.float32("inf"), "neg": -np.inf, "arr": np.array([1.0, np.nan]),
                "n": np.int64(3), np.int64(7): "k", "path": Path("/x"), "nested": [{"v": float("-inf")}]})
    out = capsys.readouterr().out
    assert _strict_loads(out) == {"top1": None, "loss": None, "neg": None, "arr": [1.0, None], "n": 3, "7": "k",
                                  "path": "/x", "nested": [{"v": None}]}
