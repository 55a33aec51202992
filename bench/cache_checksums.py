"""Cost of the feature-cache checksums (toolkit/cache_integrity.py): hash throughput and the open-time cost.

    nice -n 10 .venv/bin/python bench/cache_checksums.py [--rows 1000] [--tensors 2] [--repeats 5]

1. Throughput of candidate hashes on float16 features in 8 MiB chunks (what one checksum covers), plus the two
   NaN/Inf scans, interleaved (A, B, A, B), median of `--repeats`.
2. A synthetic cache of `--rows` images x `--tensors` sources of [257, 384] float16 (ViT-S/14 at 224: 197 KB per
   image per source), written with CacheWriter in a temp dir: the time `open_complete` takes (verify against
   checksums.json) with its pages cached, and the first open of the same cache without checksums (legacy: NaN/Inf
   scan + recording). The 13-tensor cost is this times 13 / `--tensors` (both are one pass over the bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from mist_kit.cache import CacheWriter, open_complete
from mist_kit.cache_integrity import CHUNK_BYTES, non_finite_f16


def _throughput(repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64 << 20) // 2, dtype=np.float32).astype(np.float16)  # 64 MiB
    buf = memoryview(a).cast("B")
    fns = {"crc32 (zlib)": zlib.crc32, "adler32 (zlib)": zlib.adler32,
           "sha256": lambda b: hashlib.sha256(b).digest(), "blake2b-128": lambda b: hashlib.blake2b(b, digest_size=16)}
    try:
        import xxhash
        fns["xxh3_64 (xxhash)"] = xxhash.xxh3_64_digest
    except ImportError:
        pass
    times: dict[str, list[float]] = {k: [] for k in [*fns, "NaN/Inf scan: np.isfinite", "NaN/Inf scan: exponent bits"]}
    step = CHUNK_BYTES // 2
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            for i in range(0, len(buf), CHUNK_BYTES):
                fn(buf[i: i + CHUNK_BYTES])
            times[name].append(time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(0, len(a), step):
            np.isfinite(a[i: i + step]).all()
        times["NaN/Inf scan: np.isfinite"].append(time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(0, len(a), step):
            non_finite_f16(a[i: i + step])
        times["NaN/Inf scan: exponent bits"].append(time.perf_counter() - t)
    return {k: a.nbytes / statistics.median(v) / 1e9 for k, v in times.items()}


def _open_cost(rows: int, tensors: int, repeats: int) -> tuple[float, float, float]:
    rng = np.random.default_rng(1)
    shapes = {f"block:{i}": (257, 384) for i in range(tensors)}
    binding = {"backbone": "synthetic", "n": rows}
    with tempfile.TemporaryDirectory() as tmp:
        writer = CacheWriter(Path(tmp) / "c", binding, ("a", "b"), rng.integers(0, 2, rows), shapes)
        for lo in range(0, rows, 50):
            idx = np.arange(lo, min(rows, lo + 50))
            writer.write(idx, {s: rng.standard_normal((len(idx), 257, 384), dtype=np.float32) for s in shapes})
        path = writer.publish().path
        gb = sum((path / f"block-{i}.npy").stat().st_size for i in range(tensors)) / 1e9
        verify, legacy = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            split, why = open_complete(path, binding, list(shapes), log=lambda m: None)
            verify.append(time.perf_counter() - t)
            assert split is not None and why is None, why
            (path / "checksums.json").unlink()
            meta = json.loads((path / "meta.json").read_text())
            del meta["checksums"]
            (path / "meta.json").write_text(json.dumps(meta))
            t = time.perf_counter()
            split, why = open_complete(path, binding, list(shapes), log=lambda m: None)
            legacy.append(time.perf_counter() - t)
            assert split is not None and why is None, why
    return gb, statistics.median(verify), statistics.median(legacy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--tensors", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    for name, gbs in _throughput(args.repeats).items():
        print(f"{name:30s} {gbs:6.2f} GB/s")
    gb, verify, legacy = _open_cost(args.rows, args.tensors, args.repeats)
    scale = 13 / args.tensors
    print(f"cache {args.rows} x {args.tensors} x [257, 384] float16 = {gb:.2f} GB of features (pages cached)")
    print(f"open_complete, verify checksums: {verify:.3f} s (13 tensors, {gb * scale:.1f} GB: ~{verify * scale:.2f} s)")
    print(f"open_complete, legacy first open: {legacy:.3f} s  (13 tensors: ~{legacy * scale:.2f} s)")


if __name__ == "__main__":
    main()
