"""Fuzzing checkpoint config.json: every wrong type or out-of-range value is one CheckpointError line naming the
field; nothing is truncated or coerced (issue 15 item 7). Targeted cases, then hypothesis over every field."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mist_kit.config import CheckpointConfig
from mist_kit.errors import CheckpointError, MistError

GOOD = {"schema": "mist-kit/checkpoint/1",
        "backbone": {"name": "vit_tiny_patch16_224", "weights_sha256": "ab" * 32, "img_size": 224,
                     "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "num_blocks": 12, "num_tokens": 197,
                     "embed_dim": 192, "num_prefix_tokens": 1, "weights": "/w.safetensors", "source": "file",
                     "resize": "bicubic"},
        "method": {"name": "mist", "k": 4, "params": {"rank": 16, "depth": 4, "pool": "cls", "dropout": 0.0}},
        "classes": ["a", "b", "c"], "codecs": {}, "training": {}, "metrics": {}, "version": "x"}


def _with(path: str, value) -> dict:
    d = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    obj = d
    for p in parents:
        obj = obj[p]
    obj[last] = value
    return d


def test_good_config_round_trips():
    cfg = CheckpointConfig.from_dict(copy.deepcopy(GOOD))
    assert CheckpointConfig.from_dict(cfg.to_dict()) == cfg and cfg.method.k == 4


@pytest.mark.parametrize(("path", "value", "needle"), [
    ("method.k", -1, "method.k: -1 is outside 0..12"),
    ("method.k", 1000, "method.k: 1000 is outside 0..12"),
    ("method.k", 2.5, "method.k: expected an integer, got 2.5"),
    ("method.k", True, "method.k: expected an integer, got true"),
    ("method.k", "2", "method.k: expected an integer"),
    ("method.params.rank", 0, "method.params.rank: 0 is outside 1..inf"),
    ("method.params.rank", 16.0, "method.params.rank: expected an integer"),
    ("method.params.depth", False, "method.params.depth: expected an integer"),
    ("method.params.dropout", 1.5, "method.params.dropout"),
    ("backbone.img_size", 63, "not a multiple of vit_tiny_patch16_224's patch size 16"),
    ("backbone.img_size", 0, "backbone.img_size: 0 is outside"),
    ("backbone.img_size", 100000, "backbone.img_size: 100000 is outside 16..4096"),
    ("backbone.img_size", True, "backbone.img_size: expected an integer"),
    ("backbone.num_blocks", 12.0, "backbone.num_blocks: expected an integer"),
    ("backbone.num_prefix_tokens", 197, "num_prefix_tokens"),
    ("backbone.mean", [0.5, 0.5], "backbone.mean: expected 3 finite numbers"),
    ("backbone.std", [0.5, float("nan"), 0.5], "backbone.std: expected 3 finite numbers"),
    ("backbone.std", [0.5, 0.0, 0.5], "backbone.std: expected positive"),
    ("backbone.name", 5, "backbone.name"),
    ("backbone.weights", 5, "backbone.weights"),
    ("classes", ["a", "a"], "repeats"),
    ("classes", ["a", 3], "classes"),
    ("codec", [], "codec"),
    ("codecs", {"gather": {"name": "pool2-int4", "num_tokens": 0}}, "codecs.gather.num_tokens"),
    ("codecs", {"gather": []}, "codecs"),
    ("method", "mist", "must be JSON objects"),
])
def test_targeted_bad_fields(path, value, needle):
    with pytest.raises(CheckpointError) as err:
        CheckpointConfig.from_dict(_with(path, value), source="cfg.json")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("cfg.json: ") and needle in msg, msg


def test_img_size_against_the_token_grid_when_the_name_does_not_say():
    d = _with("backbone.name", "test_vit")
    d["backbone"].update(img_size=33, num_tokens=5, num_prefix_tokens=1)  # 2x2 grid: 33 does not split
    with pytest.raises(CheckpointError, match="2x2 patch grid"):
        CheckpointConfig.from_dict(d)
    d["backbone"]["img_size"] = 32
    assert CheckpointConfig.from_dict(d).backbone.img_size == 32


FIELDS = [f"backbone.{k}" for k in GOOD["backbone"]] + ["method.name", "method.k", "method.params",
                                                       "method.params.rank", "classes", "codecs", "schema"]
VALUES = st.none() | st.booleans() | st.integers(-2**65, 2**65) | st.floats() | st.text(max_size=6) | \
    st.lists(st.integers(-3, 300) | st.floats(), max_size=4) | st.dictionaries(st.text(max_size=3), st.integers(),
                                                                                max_size=2)


@settings(max_examples=400, deadline=None)
@given(path=st.sampled_from(FIELDS), value=VALUES)
def test_random_values_never_traceback_and_are_never_coerced(path, value):
    try:
        cfg = CheckpointConfig.from_dict(_with(path, value), source="cfg.json")
    except MistError as exc:
        assert isinstance(exc, CheckpointError) and "\n" not in str(exc) and str(exc).startswith("cfg.json")
        return
    parsed = cfg.to_dict()  # accepted: the value must survive as given (ints stay ints, lists stay lists)
    obj = parsed
    for p in path.split("."):
        obj = obj[p]
    assert (obj == value and type(obj) is type(value)) or isinstance(value, (list, dict))


def test_nan_weights_refused_at_load(tiny_checkpoint, tmp_path):
    pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    from mist_kit.checkpoint import load_checkpoint

    ckpt = Path(shutil.copytree(tiny_checkpoint["checkpoint"], tmp_path / "ckpt"))
    state = load_file(str(ckpt / "edge.safetensors"))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(ckpt / "edge.safetensors"))
    with pytest.raises(CheckpointError, match="hold NaN/Inf") as err:
        load_checkpoint(ckpt)
    assert name in str(err.value) and "\n" not in str(err.value)
    json.loads((ckpt / "config.json").read_text())  # config untouched
