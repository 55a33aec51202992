"""Codec measurements that need no model: bytes per image (raw and zstd), SNR, cosine, encode/decode throughput.

Torch-free so `mist-kit codec bench` can run on a device. Accuracy (top-1, agreement) needs an edge network and
lives in `mist_kit.codec_bench`. SNR and cosine compare the decoded features with what the codec *should*
deliver losslessly: for pooling codecs that is the pooled fp32 features (pooling is a deliberate change the edge
network is trained for; only the quantization error is noise).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from mist_kit.runtime.codec.codec import Codec
from mist_kit.runtime.codec.wire import encode_payload

ZSTD_LEVEL = 3
ROW_KEYS = ("codec", "bytes_per_image", "ratio_vs_fp32", "snr_db", "encode_mb_s", "decode_mb_s", "top1", "top1_delta",
            "agreement", "jpeg_q90_bytes")


def synthetic_features(n: int = 32, tokens: int = 257, dim: int = 384, prefix: int = 1,
                       seed: int = 0) -> np.ndarray:
    """Gather-like features [n, T, D]: per-channel scales spanning 50x, a few outlier channels, a distinct
    prefix token, and patch tokens correlated with their grid neighbours (so pooling is not a no-op).
    Used when no bundle or checkpoint is given; every number measured on them is labelled synthetic."""
    rng = np.random.default_rng(seed)
    grid = int(np.sqrt(tokens - prefix))
    scale = np.exp(rng.uniform(np.log(0.1), np.log(5.0), dim)).astype(np.float32)
    scale[rng.choice(dim, size=max(1, dim // 64), replace=False)] *= 20.0  # outlier channels, as in real ViTs
    smooth = rng.standard_normal((n, grid + 1, grid + 1, dim)).astype(np.float32)
    patches = (smooth[:, :-1, :-1] + smooth[:, 1:, :-1] + smooth[:, :-1, 1:] + smooth[:, 1:, 1:]) / 2
    patches = patches.reshape(n, grid * grid, dim)
    rest = tokens - prefix - grid * grid
    noise = rng.standard_normal((n, rest, dim)).astype(np.float32)
    pre = 3.0 * rng.standard_normal((n, prefix, dim)).astype(np.float32)
    return (np.concatenate([pre, patches, noise], axis=1) * scale).astype(np.float32)


def snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """10 log10(signal power / error power); inf when lossless."""
    err = float(np.sum((ref.astype(np.float64) - got) ** 2))
    sig = float(np.sum(ref.astype(np.float64) ** 2))
    return float("inf") if err == 0 else 10.0 * np.log10(sig / err)


def mean_cosine(ref: np.ndarray, got: np.ndarray) -> float:
    """Mean cosine similarity between reference and decoded token vectors."""
    a = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    b = got.reshape(-1, got.shape[-1]).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.where(den > 0, np.sum(a * b, axis=1) / np.maximum(den, 1e-30), 1.0)
    return float(cos.mean())


def _best_time(fn: Any, repeats: int) -> tuple[Any, float]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, max(best, 1e-9)


def measure(codec: Codec, x: np.ndarray, repeats: int = 3) -> dict[str, Any]:
    """Bytes, fidelity and speed of one fitted codec on features x [N, T, D] (float32).

    MB/s are megabytes (1e6) of fp32 input features per second, for encode and decode alike, so rows compare.
    Bytes with zstd are measured on the whole batch's wire payload (header included) divided by N.
    """
    x = np.asarray(x, dtype=np.float32)
    n, t, d = x.shape
    enc, t_enc = _best_time(lambda: codec.encode(x), repeats)
    dec, t_dec = _best_time(lambda: codec.decode(enc), repeats)
    ref = Codec(codec.name, codec.params.geometry_only(), t, d, codec.prefix).pool(x)
    raw = codec.bytes_per_image()
    zstd = len(encode_payload(codec, enc, zstd_level=ZSTD_LEVEL)) / n
    mb = x.nbytes / 1e6
    return {"codec": codec.name, "bytes_per_image": raw, "bytes_per_image_zstd": round(zstd, 1),
            "ratio_vs_fp32": round(t * d * 4 / raw, 2), "snr_db": _finite(snr_db(ref, dec)),
            "cosine": round(mean_cosine(ref, dec), 6), "encode_mb_s": round(mb / t_enc, 1),
            "decode_mb_s": round(mb / t_dec, 1), "tokens": codec.out_tokens}


def _finite(value: float) -> float | None:
    """JSON has no infinity: a lossless codec's SNR is reported as None ("lossless")."""
    return None if not np.isfinite(value) else round(value, 2)
