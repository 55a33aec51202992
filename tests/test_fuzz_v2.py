"""Fuzzing KServe v2 request bodies at the decoder (issue 15 item 8): whatever the bytes, decode_request returns
a request whose tensors match their declared shapes, or raises ProtocolError (HTTP 400) in one line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mist_kit.runtime.v2_protocol import ProtocolError, Tensor, bytes_tensor, decode_request, encode_request


def _decode(body: bytes, hl):
    try:
        req = decode_request(body, hl)
    except ProtocolError as exc:
        assert "\n" not in str(exc)
        return None
    for t in req.inputs:
        assert t.data.shape == t.shape
    return req


@pytest.mark.parametrize("shape", [[0, 18446744073709551616], [0, 2**63], [2**31, 2**31], [0] * 8 + [1],
                                   [1, -1], [1.5], [True], "12", None])
def test_bad_shapes_are_protocol_errors(shape):
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": shape,
                                     "parameters": {"binary_data_size": 0}}]}).encode()
    with pytest.raises(ProtocolError, match="shape"):
        decode_request(header, len(header))
    with pytest.raises(ProtocolError):
        decode_request(json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": shape, "data": []}]})
                       .encode(), None)


def test_zero_size_shape_with_huge_dims_was_a_500():
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [0, 2**31 - 1],
                                     "parameters": {"binary_data_size": 0}}]}).encode()
    req = decode_request(header, len(header))  # within limits: an empty tensor, fine to decode
    assert req.inputs[0].data.shape == (0, 2**31 - 1)


@pytest.mark.parametrize("body", [b"[" * 200_000 + b"]" * 200_000, b"{\"inputs\":" + b"[" * 100_000,
                                  ('{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":'
                                   + "[" * 3000 + "1" + "]" * 3000 + "}]}").encode()])
def test_deep_json_is_a_protocol_error(body):
    with pytest.raises(ProtocolError):
        decode_request(body, None)


def _valid(rng: np.random.Generator) -> tuple[bytes, int | None]:
    px = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    return encode_request([Tensor("pixel_values", "FP32", px), Tensor("image", "BYTES", bytes_tensor([b"ab", b""]))])


@settings(max_examples=400, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), cut=st.integers(0, 600), flips=st.lists(
    st.tuples(st.integers(0, 600), st.integers(1, 255)), max_size=3), hl_delta=st.integers(-5, 5))
def test_corrupted_binary_bodies(seed, cut, flips, hl_delta):
    body, hl = _valid(np.random.default_rng(seed))
    data = bytearray(body)
    for pos, x in flips:
        if pos < len(data):
            data[pos] ^= x
    _decode(bytes(data[:cut] if cut < len(data) else data), None if hl is None else hl + hl_delta)


VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
                      lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                      max_leaves=10)


@settings(max_examples=400, deadline=None)
@given(key=st.sampled_from(["name", "datatype", "shape", "data", "parameters", "extra"]), value=VALUES,
       top=st.sampled_from([None, "inputs", "outputs", "parameters", "id"]), top_value=VALUES)
def test_random_json_headers(key, value, top, top_value):
    entry = {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]}
    entry[key] = value
    header = {"inputs": [entry]}
    if top is not None:
        header[top] = top_value
    req = _decode(json.dumps(header).encode(), None)
    if req is not None and key == "shape":
        assert math.prod(req.inputs[0].shape) == req.inputs[0].data.size


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(["name", "datatype", "shape", "data", "parameters"]), value=VALUES,
       outputs=st.sampled_from([None, "value"]), extra=st.binary(max_size=16))
def test_random_responses_from_a_malicious_server(key, value, outputs, extra):
    """The device client's decoder: a hostile server's answer is a ProtocolError line, never a traceback."""
    from mist_kit.runtime.v2_protocol import decode_response

    entry = {"name": "f", "datatype": "INT8", "shape": [1, 4], "parameters": {"binary_data_size": 4}}
    entry[key] = value
    header = json.dumps({"outputs": value if outputs == "value" else [entry]}).encode()
    try:
        out = decode_response(header + b"\x01\x02\x03\x04" + extra, len(header))
    except ProtocolError as exc:
        assert "\n" not in str(exc)
        return
    for arr in out.values():
        assert isinstance(arr, np.ndarray)
