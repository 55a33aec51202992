"""Fuzzing the features-file reader: every malformed file is one FeaturesError line, never a traceback, never
accepted as features (issue 15 item 3). Targeted cases first (each failed before the fix), then hypothesis."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mist_kit.errors import MistError
from mist_kit.runtime.features_file import FeaturesError, read_features, write_features

T, D, N = 3, 4, 6
MANIFEST = {"model_name": "m",
            "cloud": {"plan": {"blocks": 1, "num_blocks": 2, "tensors": [{"name": "f", "source": "gather:1",
                                                                          "shape": [T, D], "codec": {"name": "fp32"}}]},
                      "outputs": [{"name": "f", "dtype": "float32", "shape": [-1, T, D]}]}}


def _good(tmp_path, values: np.ndarray | None = None):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, T, D)).astype(np.float32) if values is None else values
    return write_features(tmp_path / "good.safetensors", MANIFEST, {"f": x}, [f"id{i}" for i in range(N)],
                          np.arange(N) % 3)


def _split(path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + hlen]), data[8 + hlen:]


def _join(path, header: dict, body: bytes, name: str = "bad.safetensors"):
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    out = path.parent / name
    out.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    return out


def _refused(path, match: str | None = None) -> str:
    with pytest.raises(FeaturesError, match=match) as err:
        ff = read_features(path, MANIFEST)
        ff.read()
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize(("offsets", "match"), [
    ({"f": [-8, None], "labels": None}, "outside the data area"),  # negative: would read header bytes
    ({"f": [0, None], "labels": [0, 48]}, "overlaps"),  # labels read from the feature bytes
    ({"f": [48, None], "labels": [0, 48]}, "data_offsets"),  # swapped order, still consistent sizes
    ({"f": [8, None], "labels": None}, "covers|cover|outside|gap"),
])
def test_bad_data_offsets(tmp_path, offsets, match):
    header, body = _split(_good(tmp_path))
    nf = header["f"]["data_offsets"][1] - header["f"]["data_offsets"][0]
    for name, off in offsets.items():
        if off is None:
            continue
        begin = off[0]
        header[name]["data_offsets"] = [begin, begin + (nf if off[1] is None else off[1])]
    msg = _refused(_join(tmp_path, header, body))
    if "swapped" not in match:
        assert "bad.safetensors" in msg


def test_swapped_ranges_tiling_exactly_are_still_valid(tmp_path):
    header, body = _split(_good(tmp_path))
    nf = header["f"]["data_offsets"][1]
    nl = header["labels"]["data_offsets"][1] - header["labels"]["data_offsets"][0]
    header["labels"]["data_offsets"] = [0, nl]
    header["f"]["data_offsets"] = [nl, nl + nf]
    ff = read_features(_join(tmp_path, header, body[nf:] + body[:nf]), MANIFEST)
    np.testing.assert_array_equal(ff.read()["f"], read_features(_good(tmp_path)).read()["f"])


def test_padding_after_the_data_is_refused(tmp_path):
    header, body = _split(_good(tmp_path))
    _refused(_join(tmp_path, header, body + b"\0" * 8), "cover")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_rows_are_named(tmp_path, bad):
    x = np.random.default_rng(1).standard_normal((N, T, D)).astype(np.float32)
    x[2, 0, 1] = bad
    x[4, 2, 3] = bad
    msg = _refused(_good(tmp_path, x), "NaN/Inf")
    assert "rows [2, 4]" in msg and "id2" in msg
    ff = read_features(tmp_path / "good.safetensors", MANIFEST, allow_non_finite=True)
    assert np.isnan(ff.read()["f"]).any() or np.isinf(ff.read()["f"]).any()


@pytest.mark.parametrize("mutate", [
    lambda h: h["f"].update(shape=[N, T, 2.5]),
    lambda h: h["f"].update(shape=[N, True, D]),
    lambda h: h["f"].update(shape=[N, T, -D]),
    lambda h: h["f"].update(data_offsets=[0, "96"]),
    lambda h: h["f"].update(data_offsets=[False, 96]),
    lambda h: h["f"].update(dtype="F128"),
    lambda h: h.update(f=7),
    lambda h: h["__metadata__"].update(ids=json.dumps({"a": 1})),
    lambda h: h["__metadata__"].update(ids=json.dumps([1, 2, 3, 4, 5, 6])),
    lambda h: h["__metadata__"].update(outputs=json.dumps([3])),
    lambda h: h["__metadata__"].update(outputs=json.dumps([{"name": "f"}])),
    lambda h: h["__metadata__"].update(outputs="[" * 200_000),
    lambda h: h.update(__metadata__=["x"]),
    lambda h: h["__metadata__"].update(format=3),
])
def test_wrong_types_in_the_header(tmp_path, mutate):
    header, body = _split(_good(tmp_path))
    mutate(header)
    _refused(_join(tmp_path, header, body))


def test_labels_below_minus_one_are_refused(tmp_path):
    write_features(tmp_path / "l.safetensors", MANIFEST, {"f": np.zeros((N, T, D), np.float32)},
                   [str(i) for i in range(N)], [0, 1, -5, 2, -1, 0])
    assert "rows [2]" in _refused(tmp_path / "l.safetensors", "labels")


def test_deep_json_header(tmp_path):
    raw = b"[" * 200_000
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    _refused(path, "not valid safetensors JSON")


def _header_but_ids(raw: bytes) -> dict:
    """The parsed header with the sample ids' text left out: ids are free-text names (hypothesis found "id4" ->
    "hd4" read back as a valid file, rightly); every other field must be intact for a read to succeed."""
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    meta = dict(header.pop("__metadata__"))
    ids = json.loads(meta.pop("ids"))
    return {**header, "__metadata__": meta, "n_ids": len(ids)}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 4000), flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(1, 255)),
                                                  max_size=4))
def test_random_truncations_and_byte_flips(tmp_path, cut, flips):
    """Any corruption either reads as a file with the same tensor layout (a flipped data byte is still data) or
    is refused with one MistError line; never another exception."""
    good = _good(tmp_path)
    data = bytearray(good.read_bytes())
    for pos, x in flips:
        if pos < len(data):
            data[pos] ^= x
    data = data[:cut] if cut < len(data) else data
    bad = tmp_path / "fuzz.safetensors"
    bad.write_bytes(bytes(data))
    try:
        ff = read_features(bad, MANIFEST)
        arr = ff.read()["f"]
    except MistError as exc:
        assert "\n" not in str(exc)
        return
    assert arr.shape == (N, T, D) and np.isfinite(arr).all()
    assert _header_but_ids(bytes(data)) == _header_but_ids(good.read_bytes())  # a flipped id byte is still an id


JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=5),
                       lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                       max_leaves=8)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["dtype", "shape", "data_offsets"]), target=st.sampled_from(["f", "labels"]),
       value=JSONISH)
def test_random_values_in_tensor_entries(tmp_path, field, target, value):
    header, body = _split(_good(tmp_path))
    original = header[target][field]
    header[target][field] = value
    try:
        read_features(_join(tmp_path, header, body), MANIFEST).read()
    except MistError as exc:
        assert "\n" not in str(exc)
        return
    assert value == original and type(value) is type(original)  # only an unchanged entry is accepted
