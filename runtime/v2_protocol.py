"""KServe v2 / Open Inference Protocol REST messages with the binary tensor extension, on numpy buffers.

Torch-free (numpy + stdlib) because both ends use it: the cloud server, and the device client that must not pay
for an HTTP framework. Binary tensors are little-endian, row-major, unpadded; a BYTES element is a 4-byte
little-endian length followed by its bytes. The JSON header's length travels in `Inference-Header-Content-Length`
and the binary buffers follow it in the order of the tensors that declare `binary_data_size`. Decoding is strict:
every declared size must add up to the body exactly, so a truncated or padded message is an error, never garbage.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mist_kit.errors import InputError

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_DIMS = 8
MAX_DIM = 2**31 - 1  # one dimension; numpy and onnxruntime refuse larger (and no body holds that many elements)

# v2 datatype -> numpy dtype in wire byte order (None: BYTES, variable-length elements).
DATATYPES: dict[str, np.dtype | None] = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
    "BYTES": None,
}
# numpy dtype names as written in the bundle manifest -> v2 datatype.
MANIFEST_DTYPES = {"bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
                   "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64", "float16": "FP16",
                   "float32": "FP32", "float64": "FP64", "bytes": "BYTES"}
# Triton model-config data types (config.pbtxt) -> v2 datatype.
TRITON_CONFIG_DTYPES = {f"TYPE_{k}": k for k in DATATYPES if k != "BYTES"} | {"TYPE_STRING": "BYTES"}


class ProtocolError(InputError):
    """A v2 message is malformed, inconsistent with its own declared sizes, or does not fit the model (HTTP 400)."""

    status = 400


@dataclass(frozen=True)
class Tensor:
    """One named tensor. BYTES data is a numpy object array of `bytes`; other data a numpy array of its dtype."""

    name: str
    datatype: str
    data: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.data.shape)


@dataclass(frozen=True)
class RequestedOutput:
    """An entry of the request's `outputs`: `binary` None means 'as the request-level default says'."""

    name: str
    binary: bool | None = None


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: tuple[Tensor, ...]
    outputs: tuple[RequestedOutput, ...] | None  # None: every model output
    binary_data_output: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


def v2_datatype(manifest_dtype: str) -> str:
    """Manifest dtype name ('float32') -> v2 datatype ('FP32')."""
    try:
        return MANIFEST_DTYPES[manifest_dtype]
    except KeyError:
        raise ProtocolError(f"dtype {manifest_dtype!r} has no v2 datatype; valid: {', '.join(MANIFEST_DTYPES)}") \
            from None


def numpy_dtype(datatype: str) -> np.dtype:
    """v2 datatype -> numpy dtype (wire byte order); BYTES has none."""
    dt = DATATYPES.get(datatype)
    if dt is None:
        raise ProtocolError(f"datatype {datatype!r} has no fixed-size numpy dtype")
    return dt


def datatype_of(arr: np.ndarray) -> str:
    """numpy array -> v2 datatype (object arrays are BYTES)."""
    if arr.dtype == object:
        return "BYTES"
    for name, dt in DATATYPES.items():
        if dt is not None and dt.kind == arr.dtype.kind and dt.itemsize == arr.dtype.itemsize:
            return name
    raise ProtocolError(f"numpy dtype {arr.dtype} has no v2 datatype")


def bytes_tensor(items: Iterable[bytes], shape: Sequence[int] | None = None) -> np.ndarray:
    """Pack byte strings into an object array (the BYTES tensor representation)."""
    values = list(items)
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr.reshape(tuple(shape)) if shape is not None else arr


def serialize_bytes(arr: np.ndarray) -> bytes:
    """BYTES tensor -> wire form: for each element (row-major) a uint32 little-endian length, then the bytes."""
    parts: list[bytes] = []
    for item in arr.reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes(buf: bytes | memoryview, count: int, name: str) -> np.ndarray:
    """Wire form -> object array of exactly `count` bytes elements; the buffer must be consumed exactly."""
    view = memoryview(buf)
    if count * 4 > len(view):
        raise ProtocolError(f"input '{name}': {len(view)} binary bytes cannot hold {count} BYTES elements")
    out = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(view):
            raise ProtocolError(f"input '{name}': BYTES element {i} has no 4-byte length prefix (truncated)")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise ProtocolError(f"input '{name}': BYTES element {i} declares {length} bytes, "
                                f"only {len(view) - offset} remain (truncated)")
        out[i] = bytes(view[offset:offset + length])
        offset += length
    if offset != len(view):
        raise ProtocolError(f"input '{name}': {len(view) - offset} bytes left over after {count} BYTES elements")
    return out


def to_binary(tensor: Tensor) -> bytes:
    """Tensor -> its binary-extension buffer."""
    if tensor.datatype == "BYTES":
        return serialize_bytes(tensor.data)
    return np.ascontiguousarray(tensor.data, dtype=numpy_dtype(tensor.datatype)).tobytes()


def _shape(raw: Any, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_DIMS or \
            not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in raw):
        raise ProtocolError(f"{where}: 'shape' must be a list of at most {MAX_DIMS} non-negative integers "
                            f"<= {MAX_DIM}, got {raw!r}"[:300])
    if math.prod(raw) > MAX_DIM:
        raise ProtocolError(f"{where}: shape {raw} has {math.prod(raw)} elements, more than {MAX_DIM}"[:300])
    return tuple(raw)


def _from_binary(name: str, datatype: str, shape: tuple[int, ...], buf: memoryview) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        return deserialize_bytes(buf, count, name).reshape(shape)
    dt = numpy_dtype(datatype)
    if len(buf) != count * dt.itemsize:
        raise ProtocolError(f"input '{name}': {datatype} {list(shape)} needs {count * dt.itemsize} bytes, "
                            f"binary_data_size is {len(buf)}")
    return np.frombuffer(buf, dtype=dt).reshape(shape)


def _from_json(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        try:
            flat = np.asarray(data, dtype=object).reshape(-1) if isinstance(data, list) else None
        except (ValueError, RecursionError):
            flat = None
        if flat is None or not all(isinstance(x, str) for x in flat):
            raise ProtocolError(f"input '{name}': BYTES data in JSON must be a list of strings "
                                "(send binary data for raw bytes such as JPEG files)")
        arr = bytes_tensor(x.encode("utf-8") for x in flat)
    else:
        try:
            arr = np.asarray(data, dtype=numpy_dtype(datatype)).reshape(-1)
        except (ValueError, TypeError, OverflowError, RecursionError):
            raise ProtocolError(f"input '{name}': 'data' is not a (nested) list of {datatype} values") from None
    if arr.size != count:
        raise ProtocolError(f"input '{name}': shape {list(shape)} has {count} elements, 'data' has {arr.size}")
    return arr.reshape(shape)


def _parse_header(body: bytes, header_length: str | int | None) -> tuple[dict[str, Any], memoryview]:
    if header_length is None:
        hl = len(body)
    else:
        try:
            hl = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH}: {header_length!r} is not an integer") from None
        if not 0 < hl <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {hl} is outside the body's {len(body)} bytes")
    try:
        header = json.loads(body[:hl])
    except RecursionError:
        raise ProtocolError("request header nests JSON too deeply") from None
    except (UnicodeDecodeError, ValueError):
        hint = "" if header_length is not None else f" (binary data needs the {HEADER_LENGTH} header)"
        raise ProtocolError(f"request header is not valid JSON{hint}") from None
    if not isinstance(header, dict):
        raise ProtocolError("request header must be a JSON object")
    return header, memoryview(body)[hl:]


def _params(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise ProtocolError(f"{where}: 'parameters' must be a JSON object")
    for key in params:
        if key.startswith("shared_memory") or key == "classification":
            raise ProtocolError(f"{where}: parameter '{key}' is not supported by this server")
    return params


def decode_request(body: bytes, header_length: str | int | None) -> InferRequest:
    """Parse an infer request body; every binary_data_size must be honest and together cover the rest exactly."""
    header, rest = _parse_header(body, header_length)
    params = _params(header, "request")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("request: 'inputs' must be a non-empty list")
    inputs: list[Tensor] = []
    offset = 0
    for i, raw in enumerate(raw_inputs):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise ProtocolError(f"request: inputs[{i}] must be an object with a string 'name'")
        name = raw["name"]
        if any(t.name == name for t in inputs):
            raise ProtocolError(f"request: input '{name}' appears twice")
        datatype = raw.get("datatype")
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise ProtocolError(f"input '{name}': datatype {datatype!r} is not one of {', '.join(DATATYPES)}")
        shape = _shape(raw.get("shape"), f"input '{name}'")
        size = _params(raw, f"input '{name}'").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ProtocolError(f"input '{name}': binary_data_size must be a non-negative integer")
            if "data" in raw:
                raise ProtocolError(f"input '{name}': has both 'data' and binary_data_size")
            if offset + size > len(rest):
                raise ProtocolError(f"input '{name}': binary_data_size {size} runs past the body "
                                    f"({len(rest) - offset} binary bytes left)")
            data = _from_binary(name, datatype, shape, rest[offset:offset + size])
            offset += size
        elif "data" in raw:
            data = _from_json(name, datatype, shape, raw["data"])
        else:
            raise ProtocolError(f"input '{name}': neither 'data' nor a binary_data_size parameter")
        inputs.append(Tensor(name, datatype, data))
    if offset != len(rest):
        raise ProtocolError(f"request: {len(rest) - offset} bytes after the JSON header are not claimed by any "
                            "input's binary_data_size")
    outputs = None
    if "outputs" in header:
        raw_outputs = header["outputs"]
        if not isinstance(raw_outputs, list):
            raise ProtocolError("request: 'outputs' must be a list")
        outs = []
        for raw in raw_outputs:
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise ProtocolError("request: each 'outputs' entry must be an object with a string 'name'")
            binary = _params(raw, f"output '{raw['name']}'").get("binary_data")
            outs.append(RequestedOutput(raw["name"], None if binary is None else bool(binary)))
        outputs = tuple(outs)
    req_id = header.get("id")
    return InferRequest(id=None if req_id is None else str(req_id), inputs=tuple(inputs), outputs=outputs,
                        binary_data_output=bool(params.get("binary_data_output", False)), parameters=params)


def _json_data(tensor: Tensor) -> list[Any]:
    flat = tensor.data.reshape(-1)
    if tensor.datatype == "BYTES":
        try:
            return [bytes(x).decode("utf-8") for x in flat]
        except UnicodeDecodeError:
            raise ProtocolError(f"output '{tensor.name}': BYTES are not UTF-8; request it as binary data") from None
    return flat.tolist()


def _encode(header: dict[str, Any], key: str, tensors: Sequence[Tensor], binary: Sequence[bool],
            ) -> tuple[bytes, int | None]:
    entries, buffers = [], []
    for tensor, as_binary in zip(tensors, binary, strict=True):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if as_binary:
            buf = to_binary(tensor)
            entry["parameters"] = {"binary_data_size": len(buf)}
            buffers.append(buf)
        else:
            entry["data"] = _json_data(tensor)
        entries.append(entry)
    header[key] = entries
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if not buffers:
        return head, None
    return b"".join([head, *buffers]), len(head)


def encode_request(inputs: Sequence[Tensor], outputs: Sequence[str] | None = None, binary_outputs: bool = True,
                   binary_inputs: bool = True, request_id: str | None = None) -> tuple[bytes, int | None]:
    """Build an infer request body; returns (body, JSON header length or None when the body is all JSON)."""
    header: dict[str, Any] = {}
    if request_id is not None:
        header["id"] = request_id
    if outputs is not None:
        header["outputs"] = [{"name": n, "parameters": {"binary_data": binary_outputs}} for n in outputs]
    elif binary_outputs:
        header["parameters"] = {"binary_data_output": True}
    return _encode(header, "inputs", inputs, [binary_inputs] * len(inputs))


def encode_response(model_name: str, model_version: str, request_id: str | None, outputs: Sequence[Tensor],
                    binary: Sequence[bool]) -> tuple[bytes, int | None]:
    """Build an infer response body; returns (body, JSON header length or None when the body is all JSON)."""
    header: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        header["id"] = request_id
    return _encode(header, "outputs", outputs, binary)


def decode_response(body: bytes, header_length: str | int | None) -> dict[str, np.ndarray]:
    """Parse an infer response into {output name: array}; binary sizes must cover the body exactly."""
    try:
        header, rest = _parse_header(body, header_length)
    except ProtocolError as exc:
        raise ProtocolError(f"response: {exc}") from None
    raw_outputs = header.get("outputs")
    if not isinstance(raw_outputs, list):
        raise ProtocolError("response: 'outputs' must be a list")
    result: dict[str, np.ndarray] = {}
    offset = 0
    for raw in raw_outputs:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or \
                not isinstance(raw.get("datatype"), str) or raw["datatype"] not in DATATYPES:
            raise ProtocolError("response: each output needs a string 'name' and a v2 'datatype'")
        name, datatype = raw["name"], raw["datatype"]
        shape = _shape(raw.get("shape"), f"response output '{name}'")
        params = raw.get("parameters") or {}
        if not isinstance(params, dict):
            raise ProtocolError(f"response output '{name}': 'parameters' must be a JSON object")
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(rest):
                raise ProtocolError(f"response output '{name}': binary_data_size {size!r} does not fit the body")
            result[name] = _from_binary(name, datatype, shape, rest[offset:offset + size])
            offset += size
        else:
            result[name] = _from_json(name, datatype, shape, raw.get("data"))
    if offset != len(rest):
        raise ProtocolError(f"response: {len(rest) - offset} trailing bytes not claimed by any output")
    return result


def check_tensor(tensor: Tensor, spec: Mapping[str, Any], max_batch: int | None = None) -> None:
    """Check a request tensor against a model-metadata entry {name, datatype, shape}; -1 matches any size."""
    want_dt, want_shape = spec["datatype"], list(spec["shape"])
    if tensor.datatype != want_dt:
        raise ProtocolError(f"input '{tensor.name}': datatype {tensor.datatype}, the model expects {want_dt}")
    got = list(tensor.shape)
    if len(got) != len(want_shape) or any(w != -1 and w != g for w, g in zip(want_shape, got, strict=True)):
        raise ProtocolError(f"input '{tensor.name}': shape {got}, the model expects {want_shape} (-1 = any)")
    if max_batch is not None and got and not 1 <= got[0] <= max_batch:
        raise ProtocolError(f"input '{tensor.name}': batch of {got[0]}, this server takes 1..{max_batch} per "
                            "request (serve-cloud --max-batch)")
