"""Per-chunk checksums of a feature cache: flipped bytes, NaN runs and shuffled labels are found on open.

`checksums.json` beside the arrays records a CRC-32 of every chunk of rows of every `.npy` data region (the
float16 tensors, `labels.npy`, `status.npy`; a chunk is about `CHUNK_BYTES` of rows), a CRC of the meta fields
the binding key does not cover (sources, shapes, classes), and a sha256 of its own content, so damage to the
checksum file itself is told apart from damage to the data.

Why CRC-32 (stdlib `zlib`) and not a library hash: measured on one core of a loaded 2-core box
(bench/cache_hash.py), crc32 hashes float16 features at ~6.5 GB/s, sha256 ~1.8, blake2b ~1.2, xxh3 ~32 GB/s. A
2.6 GB cache (1,000 images x 13 tensors of [257, 384]) costs ~0.4 s with crc32 when its pages are cached, and the
disk read otherwise, which xxhash would not shorten. This guards against accidents (bit rot, a partial copy, a
stray write), not attackers: whoever can write the cache can rewrite its checksums.

Non-finite values: `CacheWriter.write` refuses rows that are not finite in float16, so a checksum that matches
proves the bytes are the finite ones written. A cache written before checksums existed ("legacy") is scanned
for NaN/Inf once, then its checksums are recorded (trust on first use). Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mist_kit.atomic import write_json

CHECKSUM_FILE = "checksums.json"
CHECKSUM_SCHEMA = "mist-kit/feature-cache-checksums/1"
CHUNK_BYTES = 8 << 20  # ~8 MiB of rows: 42 images of a [257, 384] float16 tensor, one CRC per chunk
_F16_EXP = np.uint16(0x7C00)  # float16 exponent bits: all ones is Inf or NaN


def chunk_rows(row_bytes: int) -> int:
    """Rows per checksum chunk for arrays whose rows take `row_bytes` bytes."""
    return max(1, CHUNK_BYTES // max(1, row_bytes))


def _chunks(arr: np.ndarray, rows: int) -> Iterator[tuple[int, int, np.ndarray]]:
    for lo in range(0, len(arr), rows):
        yield lo, min(lo + rows, len(arr)), arr[lo: lo + rows]


def _crc(block: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(block).view(np.uint8).reshape(-1))  # a memmap slice: no copy


def non_finite_f16(block: np.ndarray) -> bool:
    """True if a float16 block holds any NaN or Inf (exponent bits all ones): ~7x faster than np.isfinite on
    float16, which converts to float32 first."""
    return bool(((block.view(np.uint16) & _F16_EXP) == _F16_EXP).any())


def _rows_label(name: str, index: int, lo: int, hi: int) -> str:
    return f"{name}: chunk {index} (rows {lo}..{hi - 1})"


def file_sums(arr: np.ndarray) -> dict[str, Any]:
    """{chunk_rows, crc32: [one per chunk]} of one array's data (rows along axis 0)."""
    rows = chunk_rows(int(arr[:1].nbytes) if len(arr) else 1)
    return {"chunk_rows": rows, "crc32": [_crc(block) for _lo, _hi, block in _chunks(arr, rows)]}


def meta_crc(meta: dict[str, Any]) -> int:
    """CRC of the meta fields outside the binding key (the key covers the binding itself)."""
    covered = {k: meta.get(k) for k in ("sources", "shapes", "classes")}
    return zlib.crc32(json.dumps(covered, sort_keys=True).encode())


def _self_digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def record(path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write `checksums.json` for the arrays {file name: array} of the cache at `path` (atomically)."""
    body = {"schema": CHECKSUM_SCHEMA, "algorithm": "crc32", "meta": meta_crc(meta),
            "files": {name: file_sums(arr) for name, arr in sorted(arrays.items())}}
    write_json(path / CHECKSUM_FILE, {**body, "digest": _self_digest(body)})


def read(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the checksum table, None), (None, why it is damaged), or (None, None) when there is none."""
    file = path / CHECKSUM_FILE
    if not file.exists():
        return None, None
    try:
        table = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None, f"{CHECKSUM_FILE}: unreadable"
    if not isinstance(table, dict) or table.get("schema") != CHECKSUM_SCHEMA or "digest" not in table:
        return None, f"{CHECKSUM_FILE}: not a {CHECKSUM_SCHEMA} table"
    body = {k: v for k, v in table.items() if k != "digest"}
    if table["digest"] != _self_digest(body):
        return None, f"{CHECKSUM_FILE}: damaged (its own digest does not match)"
    files = table.get("files")
    if table.get("algorithm") != "crc32" or not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("chunk_rows"), int) and e["chunk_rows"] >= 1
            and isinstance(e.get("crc32"), list) for e in files.values()):
        return None, f"{CHECKSUM_FILE}: damaged (malformed entries)"
    return table, None


def verify(table: dict[str, Any], meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> str | None:
    """Why the arrays {file name: array} disagree with `table`, naming the file and chunk; or None."""
    if table.get("meta") != meta_crc(meta):
        return f"meta.json: sources, shapes or classes differ from {CHECKSUM_FILE}"
    for name, arr in arrays.items():
        entry = table["files"].get(name)
        if entry is None:
            return f"{name}: not in {CHECKSUM_FILE}"
        rows, sums = entry["chunk_rows"], entry["crc32"]
        if len(sums) != -(-len(arr) // rows):
            return f"{name}: {CHECKSUM_FILE} has {len(sums)} chunks of {rows} rows for {len(arr)} rows"
        for index, (lo, hi, block) in enumerate(_chunks(arr, rows)):
            if _crc(block) != sums[index]:
                nan = arr.dtype == np.float16 and non_finite_f16(np.asarray(block))
                return _rows_label(name, index, lo, hi) + (" holds NaN/Inf and" if nan else "") + \
                    f" does not match {CHECKSUM_FILE}"
    return None


def first_non_finite(arrays: Iterable[tuple[str, np.ndarray]]) -> str | None:
    """Where the first NaN/Inf of the float16 arrays is (file and chunk), or None: the legacy-cache scan."""
    for name, arr in arrays:
        rows = chunk_rows(int(arr[:1].nbytes) if len(arr) else 1)
        for index, (lo, hi, block) in enumerate(_chunks(arr, rows)):
            if non_finite_f16(np.asarray(block)):
                return _rows_label(name, index, lo, hi) + " holds NaN/Inf"
    return None
