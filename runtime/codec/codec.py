"""The numpy reference of every codec: fit on calibration features, encode, decode, round trip, spec.

This is what tests, `codec bench` and training (the round trip the edge network is trained on) use, and what the
ONNX fragments in `exporters/codec_graphs.py` must reproduce. Every float operation is written in the same order
the graph performs it (sum of pooled tokens left to right, divide, round half to even, clip), so integer outputs
match the graph bit for bit. Torch-free: numpy only.

Shapes: B = batch, T = tokens in (prefix + grid*grid patches), T' = tokens out, D = channels, r = PCA rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mist_kit.errors import CodecError
from mist_kit.runtime.codec.params import QMAX, QRANGE, CodecParams, Quant
from mist_kit.runtime.codec.registry import codec_params

MIN_SCALE = np.float32(1e-12)  # an all-zero channel or token still gets a finite, positive scale
# The sent tensor a codec encodes names its encoded tensors: fp32/fp16 keep the name, int8 adds `_q` (and
# `_scale`), int4 `_q4`. A codec fitted without a name (codec bench, standalone use) encodes `features`.
DEFAULT_TENSOR = "features"


@dataclass(frozen=True)
class TensorSpec:
    """One encoded tensor per image: name, numpy dtype name, shape without the batch axis."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * math.prod(self.shape))


def _floats(spec: dict[str, Any], key: str, shape: tuple[int, ...], positive: bool) -> np.ndarray:
    """A calibration array from the spec, checked for shape and finiteness before use."""
    try:
        arr = np.asarray(spec[key], dtype=np.float32)
    except KeyError:
        raise CodecError(f"codec spec {spec.get('name')!r}: missing field '{key}' (is the codec calibrated?)") \
            from None
    except (TypeError, ValueError):
        raise CodecError(f"codec spec field '{key}': expected numbers") from None
    if arr.shape != shape:
        raise CodecError(f"codec spec field '{key}': expected shape {list(shape)}, got {list(arr.shape)}")
    if not np.all(np.isfinite(arr)) or (positive and not np.all(arr > 0)):
        raise CodecError(f"codec spec field '{key}': expected finite{' positive' if positive else ''} numbers")
    return arr


def _int_field(spec: dict[str, Any], key: str, low: int) -> int:
    value = spec.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise CodecError(f"codec spec field '{key}': expected an integer >= {low}, got {value!r}")
    return value


class Codec:
    """A codec with its geometry and calibration: `Codec.fit(name, x, prefix)` or `Codec.from_spec(spec)`."""

    def __init__(self, name: str, params: CodecParams, tokens: int | None = None, dim: int | None = None,
                 prefix: int | None = None, zstd: int | None = None, scale: np.ndarray | None = None,
                 prefix_scale: np.ndarray | None = None, mean: np.ndarray | None = None,
                 basis: np.ndarray | None = None, tensor: str = DEFAULT_TENSOR) -> None:
        self.name, self.params, self.tensor = name, params, tensor
        self.tokens, self.dim, self.prefix, self.zstd = tokens, dim, prefix, zstd
        self.scale, self.prefix_scale, self.mean, self.basis = scale, prefix_scale, mean, basis
        if zstd is not None and not 1 <= zstd <= 22:
            raise CodecError(f"codec spec field 'zstd': expected a level in 1..22, got {zstd}")
        self.grid = 0
        if params.pool > 1:
            if tokens is None or prefix is None or dim is None:
                raise CodecError(f"codec {name!r}: pooling needs the token geometry (tokens, prefix, dim)")
            self.grid = math.isqrt(tokens - prefix)
            if self.grid * self.grid != tokens - prefix or self.grid % params.pool:
                raise CodecError(f"codec {name!r}: {params.pool}x{params.pool} pooling needs a square patch grid "
                                 f"divisible by {params.pool}; got {tokens - prefix} patch tokens")
        if params.prefix_only:
            if tokens is None or prefix is None or dim is None:
                raise CodecError(f"codec {name!r}: sending the prefix tokens needs the token geometry "
                                 "(tokens, prefix, dim)")
            if prefix < 1:
                raise CodecError(f"codec {name!r} sends only the prefix (cls) tokens; these features have none")
        if params.quant is Quant.INT4 and dim is not None and dim % 2:
            raise CodecError(f"codec {name!r}: int4 packs two channels per byte; D={dim} is odd")
        if params.calibrated and (scale is None or dim is None or tokens is None):
            raise CodecError(f"codec {name!r} is not calibrated; fit it on calibration features first")

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, name: str, x: np.ndarray, num_prefix_tokens: int, zstd: int | None = None,
            tensor: str = DEFAULT_TENSOR) -> Codec:
        """Calibrate codec `name` on features x [N, T, D] (scales, PCA basis) and record the geometry."""
        params = codec_params(name)
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 3 or x.shape[0] < 1:
            raise CodecError(f"codec calibration features: expected [N, T, D] with N >= 1, got {list(x.shape)}")
        _, t, d = x.shape
        if not 0 <= num_prefix_tokens < t:
            raise CodecError(f"codec calibration: prefix tokens {num_prefix_tokens} do not fit T={t}")
        bare = cls(name, params.geometry_only(), t, d, num_prefix_tokens, tensor=tensor)
        pooled = bare.pool(x)  # (N, T', D)
        kw: dict[str, Any] = {}
        q = params.quant
        if q in (Quant.INT8, Quant.INT4):
            body = pooled[:, num_prefix_tokens:] if params.prefix_scales else pooled
            kw["scale"] = _channel_scale(body.reshape(-1, d), params.percentile, QMAX[q])
            if params.prefix_scales and num_prefix_tokens:
                kw["prefix_scale"] = _channel_scale(pooled[:, :num_prefix_tokens].reshape(-1, d), 100.0, QMAX[q])
        elif q is Quant.PCA_INT8:
            rank = int(params.rank or 0)
            if rank > d:
                raise CodecError(f"codec {name!r}: PCA rank {rank} exceeds D={d}")
            flat = pooled.reshape(-1, d).astype(np.float64)
            mean = flat.mean(axis=0)
            centred = flat - mean
            _, vecs = np.linalg.eigh(centred.T @ centred / max(1, len(flat) - 1))
            kw["mean"] = mean.astype(np.float32)
            kw["basis"] = np.ascontiguousarray(vecs[:, ::-1][:, :rank], dtype=np.float32)  # (D, r), top variance
            proj = (pooled.reshape(-1, d) - kw["mean"]) @ kw["basis"]
            kw["scale"] = _channel_scale(proj, params.percentile, QMAX[q])
        return cls(name, params, t, d, num_prefix_tokens, zstd=zstd, tensor=tensor, **kw)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Codec:
        """Rebuild a codec from its recorded spec, validating every field before any array is used."""
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise CodecError("codec spec: expected an object with a string field 'name'")
        name = spec["name"]
        params = codec_params(name)
        geo = {key: _int_field(spec, key, 0 if key == "prefix" else 1) if key in spec else None
               for key in ("tokens", "dim", "prefix")}
        zstd = spec.get("zstd")
        if zstd is not None:
            zstd = _int_field(spec, "zstd", 1)
        t, d = geo["tokens"], geo["dim"]
        kw: dict[str, Any] = {}
        if params.calibrated:
            if t is None or d is None or geo["prefix"] is None:
                raise CodecError(f"codec spec {name!r}: missing 'tokens'/'dim'/'prefix' (is the codec calibrated?)")
            width = int(params.rank) if params.rank else d
            kw["scale"] = _floats(spec, "scale", (width,), positive=True)
            if "prefix_scale" in spec:
                kw["prefix_scale"] = _floats(spec, "prefix_scale", (d,), positive=True)
            if params.quant is Quant.PCA_INT8:
                kw["mean"] = _floats(spec, "mean", (d,), positive=False)
                kw["basis"] = _floats(spec, "basis", (d, width), positive=False)
        tensor = spec.get("tensor", DEFAULT_TENSOR)
        if not isinstance(tensor, str) or not tensor.isidentifier() or len(tensor) > 48:
            raise CodecError(f"codec spec field 'tensor': expected a tensor name, got {tensor!r}")
        return cls(name, params, t, d, geo["prefix"], zstd=zstd, tensor=tensor, **kw)

    def spec(self) -> dict[str, Any]:
        """JSON-ready spec (recorded in checkpoint config and bundle manifest); float32 values round-trip exactly."""
        out: dict[str, Any] = {"name": self.name, "quant": self.params.quant.value, "pool": self.params.pool}
        if self.tensor != DEFAULT_TENSOR:
            out["tensor"] = self.tensor
        if self.tokens is not None:
            out.update(tokens=self.tokens, dim=self.dim, prefix=self.prefix, num_tokens=self.out_tokens)
        if self.zstd is not None:
            out["zstd"] = self.zstd
        for key in ("scale", "prefix_scale", "mean", "basis"):
            arr = getattr(self, key)
            if arr is not None:
                out[key] = arr.tolist()
        return out

    # ---- geometry -----------------------------------------------------------------------------------------------
    @property
    def out_tokens(self) -> int | None:
        """T': tokens the device receives (prefix + pooled grid, or the prefix alone)."""
        if self.params.prefix_only:
            return self.prefix
        if self.tokens is None or self.params.pool == 1:
            return self.tokens
        return int(self.prefix or 0) + (self.grid // self.params.pool) ** 2

    @property
    def lossless(self) -> bool:
        return self.params.quant is Quant.FP32 and self.params.pool == 1

    def outputs(self, tokens: int | None = None, dim: int | None = None) -> list[TensorSpec]:
        """The encoded tensors per image, in order (= cloud.onnx outputs = edge.onnx inputs)."""
        t = self.out_tokens if self.out_tokens is not None else tokens
        d = self.dim if self.dim is not None else dim
        if t is None or d is None:
            raise CodecError(f"codec {self.name!r}: geometry unknown; pass tokens and dim or fit the codec")
        q = self.params.quant
        if q is Quant.FP32:
            return [TensorSpec(self.tensor, "float32", (t, d))]
        if q is Quant.FP16:
            return [TensorSpec(self.tensor, "float16", (t, d))]
        if q is Quant.INT8:
            return [TensorSpec(f"{self.tensor}_q", "int8", (t, d))]
        if q is Quant.INT8_TOKEN:
            return [TensorSpec(f"{self.tensor}_q", "int8", (t, d)),
                    TensorSpec(f"{self.tensor}_scale", "float32", (t, 1))]
        if q is Quant.INT4:
            return [TensorSpec(f"{self.tensor}_q4", "uint8", (t, d // 2))]
        return [TensorSpec(f"{self.tensor}_q", "int8", (t, int(self.params.rank or 0)))]

    def bytes_per_image(self, tokens: int | None = None, dim: int | None = None) -> int:
        return sum(s.nbytes for s in self.outputs(tokens, dim))

    def full_scale(self) -> np.ndarray:
        """Per-channel scale as a [T', D] array when prefix tokens have their own scales, else [D]."""
        assert self.scale is not None
        if self.prefix_scale is None or not self.prefix:
            return self.scale
        t_out = int(self.out_tokens or 0)
        rows = [self.prefix_scale] * int(self.prefix) + [self.scale] * (t_out - int(self.prefix))
        return np.stack(rows).astype(np.float32)

    # ---- the codec ----------------------------------------------------------------------------------------------
    def _check_input(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 3:
            raise CodecError(f"codec {self.name!r}: expected features [B, T, D], got shape {list(x.shape)}")
        if (self.tokens is not None and x.shape[1] != self.tokens) or (self.dim is not None and x.shape[2] != self.dim):
            raise CodecError(f"codec {self.name!r}: calibrated for [B, {self.tokens}, {self.dim}], "
                             f"got {list(x.shape)}")
        return x

    def pool(self, x: np.ndarray) -> np.ndarray:
        """The tokens the codec sends: p x p average pooling of the patch grid with the prefix tokens kept, or the
        prefix tokens alone (prefix_only): (B, T, D) -> (B, T', D)."""
        if self.params.prefix_only:
            return np.ascontiguousarray(x[:, :int(self.prefix or 0)])
        p = self.params.pool
        if p == 1:
            return x
        b, _, d = x.shape
        n, g = int(self.prefix or 0), self.grid // p
        v = x[:, n:].reshape(b, g, p, g, p, d)  # (B, g, p, g, p, D)
        acc = v[:, :, 0, :, 0]
        for i in range(p):
            for j in range(p):
                if i or j:
                    acc = acc + v[:, :, i, :, j]  # same left-to-right order as the graph's Add chain
        pooled = (acc * np.float32(1.0 / (p * p))).reshape(b, g * g, d)
        return np.concatenate([x[:, :n], pooled], axis=1)

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Features float32 [B, T, D] -> the named encoded tensors (what cloud.onnx outputs)."""
        x = self.pool(self._check_input(x))  # (B, T', D)
        q = self.params.quant
        if q is Quant.FP32:
            return {self.tensor: np.ascontiguousarray(x)}
        if q is Quant.FP16:
            return {self.tensor: x.astype(np.float16)}
        if q is Quant.INT8_TOKEN:
            s = np.maximum(np.max(np.abs(x), axis=2, keepdims=True) / np.float32(127), MIN_SCALE)  # (B, T', 1)
            return {f"{self.tensor}_q": _quantize(x, s, q).astype(np.int8),
                    f"{self.tensor}_scale": s.astype(np.float32)}
        if q is Quant.PCA_INT8:
            assert self.mean is not None and self.basis is not None and self.scale is not None
            proj = (x - self.mean) @ self.basis  # (B, T', r)
            return {f"{self.tensor}_q": _quantize(proj, self.scale, q).astype(np.int8)}
        vals = _quantize(x, self.full_scale(), q)  # (B, T', D) float holding integers
        if q is Quant.INT8:
            return {f"{self.tensor}_q": vals.astype(np.int8)}
        packed = (vals[..., 0::2] + np.float32(8)) + (vals[..., 1::2] + np.float32(8)) * np.float32(16)
        return {f"{self.tensor}_q4": packed.astype(np.uint8)}  # (B, T', D/2): even channel low nibble, odd high

    def check_encoded(self, tensors: dict[str, np.ndarray]) -> int:
        """Validate names, dtypes and per-image shapes of encoded tensors; return the batch size."""
        if self.dim is None:  # a geometry-free codec (fp32/fp16 by name only) takes the shape it is given
            first = next(iter(tensors.values()), None)
            if not isinstance(first, np.ndarray) or first.ndim != 3:
                raise CodecError(f"codec {self.name!r}: expected one [B, T, D] tensor")
            specs = self.outputs(first.shape[1], first.shape[2])
        else:
            specs = self.outputs()
        if sorted(tensors) != sorted(s.name for s in specs):
            raise CodecError(f"codec {self.name!r}: expected tensors {[s.name for s in specs]}, got {sorted(tensors)}")
        batch = None
        for s in specs:
            arr = tensors[s.name]
            if not isinstance(arr, np.ndarray) or arr.dtype != np.dtype(s.dtype) or tuple(arr.shape[1:]) != s.shape:
                got = f"{getattr(arr, 'dtype', type(arr).__name__)} {list(getattr(arr, 'shape', []))}"
                raise CodecError(f"codec {self.name!r}: tensor '{s.name}' must be {s.dtype} [B, "
                                 f"{', '.join(map(str, s.shape))}], got {got}")
            if batch is not None and arr.shape[0] != batch:
                raise CodecError(f"codec {self.name!r}: tensors disagree on the batch size")
            batch = arr.shape[0]
        return int(batch or 0)

    def decode(self, tensors: dict[str, np.ndarray]) -> np.ndarray:
        """The named encoded tensors -> float32 [B, T', D] (what the edge network consumes)."""
        self.check_encoded(tensors)
        q = self.params.quant
        if q in (Quant.FP32, Quant.FP16):
            return tensors[self.tensor].astype(np.float32)
        if q is Quant.INT8_TOKEN:
            return tensors[f"{self.tensor}_q"].astype(np.float32) * tensors[f"{self.tensor}_scale"]
        if q is Quant.PCA_INT8:
            assert self.mean is not None and self.basis is not None and self.scale is not None
            return (tensors[f"{self.tensor}_q"].astype(np.float32) * self.scale) @ self.basis.T + self.mean
        if q is Quant.INT8:
            return tensors[f"{self.tensor}_q"].astype(np.float32) * self.full_scale()
        packed = tensors[f"{self.tensor}_q4"].astype(np.float32)  # (B, T', D/2)
        hi = np.floor(packed / np.float32(16))
        lo = packed - hi * np.float32(16)
        vals = np.stack([lo - np.float32(8), hi - np.float32(8)], axis=-1).reshape(*packed.shape[:2], -1)
        return vals * self.full_scale()

    def roundtrip(self, x: np.ndarray) -> np.ndarray:
        """decode(encode(x)): what the device's edge network sees; used as the training transform."""
        return self.decode(self.encode(x))


def _channel_scale(flat: np.ndarray, percentile: float, qmax: int) -> np.ndarray:
    """Per-column scale from |values| [M, C]: absmax (100) or a percentile, divided by the integer range."""
    mags = np.abs(flat)
    stat = mags.max(axis=0) if percentile >= 100.0 else np.percentile(mags, percentile, axis=0)
    return np.maximum(stat.astype(np.float32) / np.float32(qmax), MIN_SCALE).astype(np.float32)


def _quantize(x: np.ndarray, scale: np.ndarray, quant: Quant) -> np.ndarray:
    """round_half_even(x / scale) clipped to the quantizer's range, still float32 (cast by the caller)."""
    lo, hi = QRANGE[quant]
    return np.clip(np.rint(x / scale), np.float32(lo), np.float32(hi)).astype(np.float32)
