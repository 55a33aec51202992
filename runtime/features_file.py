"""The features file (`mist-kit extract` output, `run-edge` / `finetune-edge` input): a safetensors file.

Layout (docs/CONTRACTS.md): one tensor per cloud output, named as in `manifest.cloud.outputs`, batch-first and
exactly as cloud.onnx emits them; optional `labels` int64 [N] (-1 = unknown); string metadata `format`,
`model_name`, `codec` (JSON: sent tensor name -> codec spec), `outputs` (JSON), `ids` (JSON list of N strings).

Why a hand-rolled reader/writer around the standard format: a Caltech test split is gigabytes of features, and a
device has ~2 GB. The writer streams batches into a header sized up front (`FeaturesWriter`), the reader reads
batches with positioned reads instead of mmap (`FeaturesFile.batches`), so peak RSS stays at one batch. The files
remain plain safetensors: `safetensors.numpy.load_file` opens them. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mist_kit.atomic import atomic_path
from mist_kit.errors import InputError
from mist_kit.runtime.manifest import manifest_codecs

FEATURES_FORMAT = "mist-kit/features/1"
LABELS = "labels"
_MAX_HEADER = 1 << 30  # a header larger than this is corruption, not a features file

# safetensors dtype codes <-> numpy dtype names used in the manifest.
_ST_TO_NP = {"F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32", "I16": "int16",
             "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool"}
_NP_TO_ST = {v: k for k, v in _ST_TO_NP.items()}


class FeaturesError(InputError):
    """A features file is truncated, malformed, or was made for another bundle / codec."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file (absolute byte offset) and what it is."""

    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0


def _expected_outputs(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [dict(o) for o in manifest["cloud"]["outputs"]]


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _metadata(manifest: Mapping[str, Any], ids: Sequence[str]) -> dict[str, str]:
    return {"format": FEATURES_FORMAT, "model_name": str(manifest["model_name"]),
            "codec": json.dumps(manifest_codecs(manifest), sort_keys=True),
            "outputs": json.dumps(_expected_outputs(manifest)),
            "ids": json.dumps([str(i) for i in ids])}


class FeaturesWriter:
    """Stream N samples of a bundle's cloud outputs into a features file; atomic (temp + fsync + rename).

    Usage: `with FeaturesWriter(path, manifest, ids, with_labels=True) as w: w.write(tensors, labels)` per batch.
    The header is written first (N is known from `ids`), so the file never has to be held in memory. If fewer
    than N rows are written, or a batch has the wrong name/dtype/shape, nothing is left at `path`.
    """

    def __init__(self, path: str | os.PathLike[str], manifest: Mapping[str, Any], ids: Sequence[str],
                 *, with_labels: bool = False) -> None:
        self.path = Path(path)
        self.n = len(ids)
        self._outputs = _expected_outputs(manifest)
        entries: dict[str, Any] = {"__metadata__": _metadata(manifest, ids)}
        self._infos: list[TensorInfo] = []
        pos = 0
        specs = [(o["name"], o["dtype"], [int(d) for d in o["shape"][1:]]) for o in self._outputs]
        if with_labels:
            specs.append((LABELS, "int64", []))
        for name, dtype, tail in specs:
            if dtype not in _NP_TO_ST:
                raise FeaturesError(f"manifest cloud output {name!r}: unsupported dtype {dtype!r}")
            if any(d < 0 for d in tail):
                raise FeaturesError(f"manifest cloud output {name!r}: non-batch dims must be fixed, got {tail}")
            shape = (self.n, *tail)
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            entries[name] = {"dtype": _NP_TO_ST[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            self._infos.append(TensorInfo(name, dtype, shape, pos, nbytes))
            pos += nbytes
        header = json.dumps(entries, separators=(",", ":")).encode("utf-8")
        header += b" " * (-len(header) % 8)  # safetensors pads the header to 8-byte alignment
        self._header = struct.pack("<Q", len(header)) + header
        self._data_start = len(self._header)
        self._rows = 0
        self._ctx: Any = None
        self._fh: Any = None

    def __enter__(self) -> FeaturesWriter:
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        self._fh = open(tmp, "wb")
        self._fh.write(self._header)
        total = sum(i.nbytes for i in self._infos)
        self._fh.truncate(self._data_start + total)  # sparse until filled; size is final from the start
        return self

    def write(self, tensors: Mapping[str, np.ndarray], labels: np.ndarray | Sequence[int] | None = None) -> None:
        """Append one batch: every cloud output (same batch size), and labels when the file carries them."""
        names = [o["name"] for o in self._outputs]
        if set(tensors) != set(names):
            raise FeaturesError(f"{self.path}: batch has tensors {sorted(tensors)}, bundle expects {names}")
        b = None
        for info in self._infos:
            if info.name == LABELS:
                if labels is None:
                    raise FeaturesError(f"{self.path}: this file carries labels; pass labels with every batch")
                arr = np.asarray(labels, dtype=np.int64).reshape(-1)
            else:
                arr = np.asarray(tensors[info.name])
                if arr.dtype != np.dtype(info.dtype) or tuple(arr.shape[1:]) != info.shape[1:]:
                    raise FeaturesError(f"{self.path}: tensor {info.name!r} is {arr.dtype}{list(arr.shape)}, "
                                        f"expected {info.dtype}{[-1, *info.shape[1:]]}")
            b = arr.shape[0] if b is None else b
            if arr.shape[0] != b:
                raise FeaturesError(f"{self.path}: tensor {info.name!r} has batch {arr.shape[0]}, others {b}")
            if self._rows + b > self.n:
                raise FeaturesError(f"{self.path}: more than the {self.n} samples announced")
            self._fh.seek(self._data_start + info.offset + self._rows * info.row_bytes)
            self._fh.write(np.ascontiguousarray(arr).tobytes())
        self._rows += b or 0

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._fh.close()
        if exc_type is None and self._rows != self.n:
            err = FeaturesError(f"{self.path}: {self._rows} samples written, {self.n} announced; nothing was written")
            self._ctx.__exit__(FeaturesError, err, None)
            raise err
        self._ctx.__exit__(exc_type, exc, tb)


def write_features(path: str | os.PathLike[str], manifest: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
                   ids: Sequence[str], labels: np.ndarray | Sequence[int] | None = None) -> Path:
    """Write a whole in-memory batch set as one features file (atomic). Returns the path."""
    with FeaturesWriter(path, manifest, ids, with_labels=labels is not None) as writer:
        if ids:
            writer.write(tensors, labels)
    return Path(path)


@dataclass(frozen=True)
class FeaturesFile:
    """A validated features file, read lazily: `batches()` yields slices without loading the whole file."""

    path: Path
    n: int
    tensors: tuple[TensorInfo, ...]  # cloud outputs, in manifest order
    labels: np.ndarray | None  # int64 [N], -1 = unknown
    ids: tuple[str, ...]
    metadata: dict[str, str]
    allow_non_finite: bool = False

    @property
    def has_labels(self) -> bool:
        return self.labels is not None and bool((self.labels >= 0).any())

    def read(self, start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Rows [start, stop) of every cloud output, as fresh arrays (positioned reads, no mmap)."""
        stop = self.n if stop is None else min(stop, self.n)
        out = {}
        with open(self.path, "rb") as fh:
            for info in self.tensors:
                count = max(stop - start, 0)
                fh.seek(info.offset + start * info.row_bytes)
                arr = np.empty((count, *info.shape[1:]), dtype=info.dtype)
                # straight into the array: one buffer per batch, not a bytes object plus its copy
                if fh.readinto(memoryview(arr.reshape(-1)).cast("B")) != count * info.row_bytes:
                    raise FeaturesError(f"{self.path}: truncated while reading {info.name!r}")
                if not self.allow_non_finite and arr.dtype.kind == "f":
                    self._check_finite(info.name, arr, start)
                out[info.name] = arr
        return out

    def _check_finite(self, name: str, arr: np.ndarray, start: int) -> None:
        bad = np.flatnonzero(~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1))
        if len(bad):
            rows = (bad[:5] + start).tolist()
            ids = [self.ids[r] for r in rows]
            more = f" and {len(bad) - 5} more in this batch" if len(bad) > 5 else ""
            raise FeaturesError(f"{self.path}: tensor {name!r} holds NaN/Inf in rows {rows}{more} (ids {ids}); "
                                "refusing non-finite features (re-extract them)")

    def batches(self, batch_size: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Yield (start index, tensors) for consecutive batches."""
        if batch_size < 1:
            raise FeaturesError(f"batch size must be >= 1, got {batch_size}")
        for start in range(0, self.n, batch_size):
            yield start, self.read(start, start + batch_size)


def _parse_header(path: Path) -> tuple[dict[str, Any], int, int]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise FeaturesError(f"{path}: {size} bytes, too short to be a safetensors features file (truncated?)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > min(_MAX_HEADER, size - 8):
                raise FeaturesError(f"{path}: header of {hlen} bytes does not fit in the {size}-byte file "
                                    "(truncated or not safetensors)")
            raw = fh.read(hlen)
    except OSError as exc:
        raise FeaturesError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise FeaturesError(f"{path}: header is not valid safetensors JSON (corrupt or not a features file)") from None
    if not isinstance(header, dict):
        raise FeaturesError(f"{path}: header is not a JSON object (not a safetensors file)")
    return header, 8 + hlen, size


def read_features(path: str | os.PathLike[str], manifest: Mapping[str, Any] | None = None,
                  allow_non_finite: bool = False) -> FeaturesFile:
    """Open and validate a features file; with `manifest`, also check it was made for that bundle.

    NaN/Inf in float tensors are refused when the rows are read (one line naming the rows), unless
    `allow_non_finite`: a head trained on them, or predictions from them, are garbage that looks like a result.

    Every problem is one FeaturesError line naming the file and the expectation: not safetensors, truncated,
    wrong format tag, another codec / model / output layout (= extracted with another bundle), tensor
    names/dtypes/shapes off, labels or ids inconsistent.
    """
    path = Path(path)
    if not path.is_file():
        raise FeaturesError(f"{path}: no such features file (write one with `mist-kit extract BUNDLE DATA --out F`)")
    header, data_start, size = _parse_header(path)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise FeaturesError(f"{path}: __metadata__ must map names to strings (safetensors)")
    if meta.get("format") != FEATURES_FORMAT:
        raise FeaturesError(f"{path}: metadata format {meta.get('format')!r}, expected {FEATURES_FORMAT!r} "
                            "(write features with `mist-kit extract`)")
    try:
        outputs = json.loads(meta["outputs"])
        codec = json.loads(meta["codec"])
        raw_ids = json.loads(meta["ids"])
        if "model_name" not in meta:
            raise KeyError("model_name")
    except KeyError as exc:
        raise FeaturesError(f"{path}: metadata field {exc.args[0]!r} missing") from None
    except (json.JSONDecodeError, TypeError, RecursionError):
        raise FeaturesError(f"{path}: metadata outputs/codec/ids are not valid JSON") from None
    if not isinstance(raw_ids, list) or not all(isinstance(i, str) for i in raw_ids):
        raise FeaturesError(f"{path}: metadata 'ids' must be a JSON list of strings")
    ids = tuple(raw_ids)
    if not isinstance(codec, dict) or not isinstance(outputs, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) and isinstance(o.get("dtype"), str)
            and _is_shape(o.get("shape"), allow_batch=True) for o in outputs):
        raise FeaturesError(f"{path}: metadata 'outputs' must be a list of {{name, dtype, shape}} and 'codec' an "
                            "object")
    if manifest is not None:
        _check_against_manifest(path, meta, outputs, codec, manifest)
    infos = _tensor_infos(path, header, data_start, size)
    cloud = []
    for out in outputs:
        name = out["name"]
        if name not in infos:
            raise FeaturesError(f"{path}: tensor {name!r} missing (metadata lists it as a cloud output)")
        info = infos[name]
        want = [int(d) for d in out["shape"][1:]]
        if info.dtype != out["dtype"] or list(info.shape[1:]) != want or not info.shape:
            raise FeaturesError(f"{path}: tensor {name!r} is {info.dtype}{list(info.shape)}, expected "
                                f"{out['dtype']}{[-1, *want]}")
        cloud.append(info)
    n = len(ids)
    for info in cloud:
        if info.shape[0] != n:
            raise FeaturesError(f"{path}: tensor {info.name!r} has {info.shape[0]} rows, metadata ids list {n}")
    labels = None
    if LABELS in infos:
        info = infos[LABELS]
        if info.dtype != "int64" or info.shape != (n,):
            raise FeaturesError(f"{path}: 'labels' is {info.dtype}{list(info.shape)}, expected int64[{n}]")
        with open(path, "rb") as fh:
            fh.seek(info.offset)
            labels = np.frombuffer(fh.read(info.nbytes), dtype=np.int64).copy()
        if len(labels) and labels.min() < -1:
            rows = np.flatnonzero(labels < -1)[:5].tolist()
            raise FeaturesError(f"{path}: labels must be class indices or -1 (unknown); rows {rows} hold "
                                f"{labels[rows].tolist()}")
    extra = set(infos) - {o["name"] for o in outputs} - {LABELS}
    if extra:
        raise FeaturesError(f"{path}: unexpected tensors {sorted(extra)} (expected cloud outputs and 'labels')")
    return FeaturesFile(path=path, n=n, tensors=tuple(cloud), labels=labels, ids=ids, metadata=dict(meta),
                        allow_non_finite=allow_non_finite)


def _is_shape(raw: Any, allow_batch: bool = False) -> bool:
    """A list of non-negative ints (not bools); with `allow_batch` the first may be -1 (any batch)."""
    return isinstance(raw, list) and len(raw) <= 16 and all(
        isinstance(d, int) and not isinstance(d, bool) and (d >= 0 or (allow_batch and i == 0 and d == -1))
        for i, d in enumerate(raw))


def _tensor_infos(path: Path, header: dict[str, Any], data_start: int, size: int) -> dict[str, TensorInfo]:
    """Every tensor entry checked: known dtype, integer shape, and data_offsets that tile the data exactly.

    safetensors requires the byte ranges to be in range, ordered, non-overlapping and to cover the data area
    with no gap: a range pointing into the header or at another tensor would read the wrong bytes as features.
    """
    infos: dict[str, TensorInfo] = {}
    ranges = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str) or entry["dtype"] not in _ST_TO_NP \
                or not _is_shape(entry.get("shape")):
            raise FeaturesError(f"{path}: tensor {name!r} has a malformed or unsupported header entry (dtype one of "
                                f"{sorted(_ST_TO_NP)}, shape a list of non-negative integers)")
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and
                all(isinstance(x, int) and not isinstance(x, bool) for x in offsets)):
            raise FeaturesError(f"{path}: tensor {name!r}: data_offsets must be [begin, end] integers")
        dtype, shape = _ST_TO_NP[entry["dtype"]], tuple(entry["shape"])
        begin, stop = offsets
        if not 0 <= begin <= stop <= size - data_start:
            raise FeaturesError(f"{path}: tensor {name!r}: data_offsets {offsets} outside the data area of "
                                f"{size - data_start} bytes (truncated or corrupt)")
        if stop - begin != math.prod(shape) * np.dtype(dtype).itemsize:
            raise FeaturesError(f"{path}: tensor {name!r} byte range does not match its shape {list(shape)}")
        infos[name] = TensorInfo(name, dtype, shape, data_start + begin, stop - begin)
        ranges.append((begin, stop, name))
    pos = 0
    for begin, stop, name in sorted(ranges):
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes"
            raise FeaturesError(f"{path}: tensor {name!r}: data_offsets [{begin}, {stop}] {what} (corrupt)")
        pos = stop
    if pos != size - data_start:
        raise FeaturesError(f"{path}: tensors cover {pos} of the {size - data_start} data bytes (truncated, padded "
                            "or corrupt; re-run `mist-kit extract`)")
    return infos


def _check_against_manifest(path: Path, meta: Mapping[str, str], outputs: list[dict[str, Any]],
                            codec: dict[str, Any], manifest: Mapping[str, Any]) -> None:
    """One line that says the file belongs to another bundle, and how it differs."""
    want_codec, want_outputs = manifest_codecs(manifest), _expected_outputs(manifest)
    hint = "features were extracted with another bundle; re-run `mist-kit extract` with this one"
    if _canon(codec) != _canon(want_codec):
        def label(c: Mapping[str, Any]) -> str:
            names = ", ".join(f"{t}: {v.get('name', 'fp32') if isinstance(v, dict) else v}" for t, v in c.items())
            return f"{names} (calibration {hashlib.sha256(_canon(c).encode()).hexdigest()[:8]})"

        raise FeaturesError(f"{path}: codecs {label(codec)} do not match the bundle's {label(want_codec)} ({hint})")
    got = [(o.get("name"), o.get("dtype"), list(o.get("shape", []))[1:]) for o in outputs]
    want = [(o["name"], o["dtype"], list(o["shape"])[1:]) for o in want_outputs]
    if got != want:
        raise FeaturesError(f"{path}: cloud outputs {got} do not match the bundle's {want} ({hint})")
    if meta.get("model_name") != manifest["model_name"]:
        raise FeaturesError(f"{path}: model {meta.get('model_name')!r}, bundle serves {manifest['model_name']!r} "
                            f"({hint})")
