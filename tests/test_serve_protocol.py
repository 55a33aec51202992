"""v2 protocol codec: round trips, strict size checks, and byte-level agreement with tritonclient's own codec."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mist_kit.runtime.v2_protocol import (
    HEADER_LENGTH,
    ProtocolError,
    Tensor,
    bytes_tensor,
    check_tensor,
    decode_request,
    decode_response,
    deserialize_bytes,
    encode_request,
    encode_response,
    serialize_bytes,
)

NUMERIC = ["FP32", "FP16", "FP64", "INT8", "UINT8", "INT16", "INT32", "INT64", "UINT64", "BOOL"]


def _tensor(datatype: str, rng: np.random.Generator, shape: tuple[int, ...] = (2, 3, 4)) -> Tensor:
    from mist_kit.runtime.v2_protocol import numpy_dtype

    dt = numpy_dtype(datatype)
    if dt.kind == "f":
        data = rng.standard_normal(shape).astype(dt)
    elif dt.kind == "b":
        data = rng.integers(0, 2, shape).astype(bool)
    else:
        info = np.iinfo(dt)
        data = rng.integers(max(info.min, -1000), min(info.max, 1000), shape, endpoint=True).astype(dt)
    return Tensor("x", datatype, data)


@pytest.mark.parametrize("datatype", NUMERIC)
@pytest.mark.parametrize("binary", [True, False])
def test_request_round_trip(datatype: str, binary: bool) -> None:
    t = _tensor(datatype, np.random.default_rng(0))
    body, hl = encode_request([t], ["y"], binary_inputs=binary)
    req = decode_request(body, hl)
    assert req.inputs[0].datatype == datatype and req.inputs[0].shape == (2, 3, 4)
    np.testing.assert_array_equal(req.inputs[0].data, t.data)
    assert req.outputs is not None and req.outputs[0].name == "y" and req.outputs[0].binary is True


def test_bytes_tensor_wire_format() -> None:
    arr = bytes_tensor([b"", b"\xff\xd8jpeg", "é".encode()])
    wire = serialize_bytes(arr)
    assert wire[:4] == b"\x00\x00\x00\x00" and wire[4:8] == (6).to_bytes(4, "little")
    assert list(deserialize_bytes(wire, 3, "x")) == [b"", b"\xff\xd8jpeg", "é".encode()]
    with pytest.raises(ProtocolError, match="left over"):
        deserialize_bytes(wire + b"\x00", 3, "x")
    with pytest.raises(ProtocolError, match="truncated"):
        deserialize_bytes(wire[:-1], 3, "x")


@pytest.mark.parametrize("datatype", ["FP32", "FP16", "INT8", "UINT8", "INT64", "BYTES"])
def test_request_matches_tritonclient_bytes(datatype: str) -> None:
    """Our encoder produces the same body as tritonclient's; our decoder reads tritonclient's body."""
    from tritonclient.http import InferInput, InferRequestedOutput
    from tritonclient.http._utils import _get_inference_request

    rng = np.random.default_rng(1)
    if datatype == "BYTES":
        data = bytes_tensor([rng.bytes(int(n)) for n in rng.integers(0, 50, 6)], (3, 2))
        triton_data = data
    else:
        data = _tensor(datatype, rng).data
        triton_data = data
    inp = InferInput("x", list(data.shape), datatype)
    inp.set_data_from_numpy(triton_data, binary_data=True)
    body, hl = _get_inference_request([inp], "", [InferRequestedOutput("y", binary_data=True)], 0, False, False, 0,
                                      None, None)
    req = decode_request(body, hl)
    np.testing.assert_array_equal(req.inputs[0].data, data)
    ours, ours_hl = encode_request([Tensor("x", datatype, data)], ["y"])
    assert json.loads(ours[:ours_hl]) == json.loads(body[:hl])
    assert ours[ours_hl:] == body[hl:]


def test_response_decodes_in_tritonclient() -> None:
    from tritonclient.http import InferResult

    rng = np.random.default_rng(2)
    feats = rng.standard_normal((2, 5, 8)).astype(np.float32)
    codes = rng.integers(-128, 127, (2, 5, 8)).astype(np.int8)
    outs = [Tensor("features", "FP32", feats), Tensor("codes", "INT8", codes)]
    body, hl = encode_response("m", "1", "abc", outs, [True, False])
    result = InferResult.from_response_body(body, header_length=hl)
    np.testing.assert_array_equal(result.as_numpy("features"), feats)
    np.testing.assert_array_equal(result.as_numpy("codes"), codes)
    mine = decode_response(body, hl)
    np.testing.assert_array_equal(mine["features"], feats)
    np.testing.assert_array_equal(mine["codes"], codes)
    all_json, none_hl = encode_response("m", "1", None, outs, [False, False])
    assert none_hl is None and json.loads(all_json)["outputs"][1]["data"][0] == int(codes.reshape(-1)[0])


def _body(header: dict, binary: bytes = b"") -> tuple[bytes, int]:
    head = json.dumps(header).encode()
    return head + binary, len(head)


@pytest.mark.parametrize(("header", "binary", "match"), [
    ({"inputs": []}, b"", "non-empty"),
    ({"inputs": [{"name": "x", "datatype": "FP33", "shape": [1]}]}, b"", "datatype"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}]}, b"", "non-negative"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}]},
     b"\x00" * 4, "runs past"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 4}}]},
     b"\x00" * 4, "needs 8 bytes"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]},
     b"\x00" * 8, "not claimed"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2]}]}, b"", "has 2"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": ["a", "b"]}]}, b"", "FP32 values"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]},
                 {"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}, b"", "twice"),
    ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1],
                  "parameters": {"shared_memory_region": "r"}}]}, b"", "not supported"),
])
def test_decode_request_rejects(header: dict, binary: bytes, match: str) -> None:
    body, hl = _body(header, binary)
    with pytest.raises(ProtocolError, match=match):
        decode_request(body, hl)


def test_header_length_checks() -> None:
    body, _hl = _body({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]})
    assert decode_request(body, None).inputs[0].data.tolist() == [1.0]
    with pytest.raises(ProtocolError, match=HEADER_LENGTH):
        decode_request(body, "abc")
    with pytest.raises(ProtocolError, match="outside"):
        decode_request(body, len(body) + 1)
    with pytest.raises(ProtocolError, match="not valid JSON"):
        decode_request(b"\xff\xd8\xff" + body, None)


def test_check_tensor_against_metadata() -> None:
    spec = {"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, 4, 4]}
    good = Tensor("pixel_values", "FP32", np.zeros((2, 3, 4, 4), np.float32))
    check_tensor(good, spec, max_batch=2)
    with pytest.raises(ProtocolError, match="expects FP32"):
        check_tensor(Tensor("pixel_values", "FP16", np.zeros((2, 3, 4, 4), np.float16)), spec)
    with pytest.raises(ProtocolError, match=r"expects \[-1, 3, 4, 4\]"):
        check_tensor(Tensor("pixel_values", "FP32", np.zeros((2, 3, 4, 5), np.float32)), spec)
    with pytest.raises(ProtocolError, match="max-batch"):
        check_tensor(good, spec, max_batch=1)


def test_serving_modules_are_torch_free() -> None:
    """runtime/ runs on devices: the v2 client, model and server must not pull in torch, timm or onnx."""
    import subprocess
    import sys

    code = ("import sys, mist_kit.runtime.v2_client, mist_kit.runtime.v2_model, mist_kit.runtime.v2_server; "
            "print([m for m in ('torch', 'timm', 'onnx') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
