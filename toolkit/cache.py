"""The feature cache: the backbone runs once per image, training streams batches from float16 memory maps.

One array per *tensor source* (runtime/plan.py), so one backbone pass serves every candidate of every method: MIST's
gathers for each k, a split point's block output, a stack of block outputs, the final cls token. Layout of one
split's cache directory (plain .npy files anyone can `np.load(mmap_mode="r")`):
    meta.json        the binding (backbone, weights sha256, preprocessing, image-list fingerprint), its key, the
                     sources held and their shapes
    gather-4.npy     float16 [N, T, D] per source ("gather:4" -> gather-4.npy, "final_cls" -> final_cls.npy [N, 1, D])
    labels.npy       int64 [N]
    status.npy       uint8 [N]: 0 = not computed yet, 1 = done, 2 = unreadable image skipped (--skip-bad)
    checksums.json   a CRC-32 per chunk of rows of every array, checked on open (toolkit/cache_integrity.py)
A cache under construction lives in `<dir>.partial/` and is renamed into place when complete, so an interrupted
run resumes where it stopped and a complete cache is never half-written. A cache whose binding differs from what
is asked for is stale: it is reported and rebuilt, never reused; one that lacks a source is rebuilt holding the
union of what it had and what is asked, in one pass. A cache whose bytes disagree with its checksums (flipped
bytes, NaN runs, shuffled labels) is corrupt and rebuilt; one written before checksums existed gets them recorded
on its first open, after a NaN/Inf scan (trust on first use). Torch-free (reading needs numpy only).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mist_kit import cache_integrity as integrity
from mist_kit.atomic import write_json
from mist_kit.errors import DataError, InputError

CACHE_SCHEMA = "mist-kit/feature-cache/2"
PENDING, DONE, SKIPPED = 0, 1, 2
Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def binding_key(binding: dict[str, Any]) -> str:
    """Stable hash of the binding dict (sorted JSON): what the cached numbers depend on, sources excluded."""
    return hashlib.sha256(json.dumps(binding, sort_keys=True).encode()).hexdigest()


def describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Which binding fields changed, for the 'stale cache' message."""
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(changed) or "format"


def source_file(source: str) -> str:
    """The .npy file name of a source key ('gather:4' -> 'gather-4.npy')."""
    return source.replace(":", "-") + ".npy"


def _check_array(path: Path, shape: tuple[int, ...], dtype: Any) -> str | None:
    """Why the .npy at `path` is unusable (header shape/dtype or file length), or None. Reads the header only."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            got_shape, _fortran, got_dtype = read_header(fh)
            offset = fh.tell()
    except Exception as exc:  # numpy's header parser raises ValueError, SyntaxError, TokenError...
        return f"{path.name}: unreadable header ({type(exc).__name__})"
    if tuple(got_shape) != tuple(shape) or np.dtype(got_dtype) != np.dtype(dtype):
        return f"{path.name}: {np.dtype(got_dtype)} {list(got_shape)}, expected {np.dtype(dtype)} {list(shape)}"
    need = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    if path.stat().st_size < need:
        return f"{path.name}: truncated ({path.stat().st_size} of {need} bytes)"
    return None


@dataclass
class CachedSplit:
    """A complete cache opened read-only: arrays are memory-mapped, nothing is loaded until sliced."""

    path: Path
    meta: dict[str, Any]
    checksums: dict[str, Any] | None = None  # the checksum table once read; sources checked against it so far
    checked: set[str] = field(default_factory=set)

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(self.meta["sources"])

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.meta["classes"])

    @property
    def n(self) -> int:
        return int(self.meta["binding"]["n"])

    def _array(self, name: str) -> np.ndarray:
        return np.load(self.path / name, mmap_mode="r")

    def valid(self) -> np.ndarray:
        """Indices of images whose features exist (skipped unreadable images excluded)."""
        return np.flatnonzero(self._array("status.npy") == DONE)

    def array(self, source: str) -> np.ndarray:
        """The float16 [N, T, D] memory map of one source."""
        if source not in self.sources:
            raise InputError(f"{self.path}: no cached tensor {source}; cached: {', '.join(self.sources)}")
        if self.checksums is not None and source not in self.checked:  # opened for other sources: check it now
            why = self.verify_sums([source])
            if why:
                raise DataError(f"{self.path}: corrupt ({why}); rerun to rebuild it")
        return self._array(source_file(source))

    def labels(self) -> np.ndarray:
        return self._array("labels.npy")

    def bytes_per_image(self, sources: Iterable[str] | None = None) -> int:
        """float16 bytes one image takes in this cache (all sources, or the given ones)."""
        shapes = self.meta["shapes"]
        return sum(2 * int(np.prod(shapes[s])) for s in (sources or self.sources))

    def inputs(self, tensors: Mapping[str, str], rows: np.ndarray | None = None) -> InputRows:
        """A method's inputs: tensor name -> source key, over `rows` (default: every valid row)."""
        arrays = {name: self.array(src) for name, src in tensors.items()}
        return InputRows([(arrays, self.valid() if rows is None else np.asarray(rows))])

    def verify(self, sources: Iterable[str] | None = None) -> str | None:
        """Why this cache cannot be used, or None: its structure (truncated or reshaped arrays, bad status or
        labels), then the checksums of labels, status and `sources` (default: all). A cache without checksums
        passes on structure alone (see `open_complete` for recording them)."""
        why = self.verify_structure()
        if why is None:
            table, why = integrity.read(self.path)
            if table is not None:
                self.checksums = table
            elif why is None and self.meta.get("checksums"):
                why = f"{integrity.CHECKSUM_FILE}: missing (meta.json says the cache has one)"
        if why is None and self.checksums is not None:
            why = self.verify_sums(self.sources if sources is None else sources, with_rows=True)
        return why

    def verify_sums(self, sources: Iterable[str], with_rows: bool = False) -> str | None:
        """Check `sources` (and labels + status if `with_rows`) against the checksum table already read."""
        assert self.checksums is not None
        names = [source_file(s) for s in sources] + (["labels.npy", "status.npy"] if with_rows else [])
        why = integrity.verify(self.checksums, self.meta, {name: np.load(self.path / name, mmap_mode="r")
                                                           for name in names})
        if why is None:
            self.checked.update(sources)
        return why

    def record_legacy(self, log: Log) -> str | None:
        """Trust on first use, for a cache written before checksums existed: scan it for NaN/Inf (returning where,
        naming file and chunk), then record its checksums, saying so. checksums.json is written before the
        meta.json marker, so a crash between the two leaves a cache that still opens. A cache that cannot be
        written to (a read-only copy) is used on its scan alone."""
        arrays = {source_file(s): self._array(source_file(s)) for s in self.sources}
        why = integrity.first_non_finite(arrays.items())
        if why:
            return why
        arrays.update({name: self._array(name) for name in ("labels.npy", "status.npy")})
        try:
            integrity.record(self.path, self.meta, arrays)
            write_json(self.path / "meta.json", {**self.meta, "checksums": integrity.CHECKSUM_FILE})
        except OSError as exc:
            log(f"cache {self.path}: has no checksums and they cannot be recorded ({exc.strerror or exc}); using "
                "it as is (no NaN/Inf found)")
            return None
        self.meta = {**self.meta, "checksums": integrity.CHECKSUM_FILE}
        self.checksums, _ = integrity.read(self.path)
        self.checked = set(self.sources)
        log(f"cache {self.path}: written without checksums (older mist-kit); no NaN/Inf found, recorded them in "
            f"{integrity.CHECKSUM_FILE} (trusted on first use)")
        return None

    def verify_structure(self) -> str | None:
        """Why the arrays' headers, lengths, status or labels make this cache unusable, or None."""
        n = self.n
        for src in self.sources:
            why = _check_array(self.path / source_file(src), (n, *self.meta["shapes"][src]), np.float16)
            if why:
                return why
        for name, dtype in (("labels.npy", np.int64), ("status.npy", np.uint8)):
            why = _check_array(self.path / name, (n,), dtype)
            if why:
                return why
        status = self._array("status.npy")
        if not np.isin(status, (DONE, SKIPPED)).all():
            return "status.npy: rows neither done nor skipped in a complete cache"
        labels = np.asarray(self.labels())
        if len(labels) and (labels.min() < -1 or labels.max() >= max(1, len(self.classes))):
            return "labels.npy: labels outside the class list"
        return None


Transform = Callable[[np.ndarray], np.ndarray]


class InputRows:
    """Rows of one or more cached splits as a method's named inputs, read a batch at a time (never all at once).

    Training touches a few MB per batch instead of loading whole splits: a 12-block stack of ViT-S/14 features is
    2.4 MB per image in float16. Segments let train + val be concatenated for a refit without copying.
    """

    def __init__(self, segments: list[tuple[Mapping[str, np.ndarray], np.ndarray]]) -> None:
        self.segments = [(dict(a), np.asarray(r, dtype=np.int64)) for a, r in segments]
        names = [tuple(a) for a, _ in self.segments]
        if len(set(names)) != 1:
            raise ValueError(f"input segments disagree on tensor names: {names}")
        self.names = names[0]
        self._starts = np.cumsum([0] + [len(r) for _, r in self.segments])

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> InputRows:
        """In-memory arrays (tests, benchmarks): every row, in order."""
        n = len(next(iter(arrays.values())))
        return cls([(arrays, np.arange(n))])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __add__(self, other: InputRows) -> InputRows:
        return InputRows(self.segments + other.segments)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.segments[0][0][name].shape[1:])

    def batch(self, idx: np.ndarray, transforms: Mapping[str, Transform | None] | None = None
              ) -> dict[str, np.ndarray]:
        """float32 arrays for positions `idx` (ascending reads per segment, returned in `idx` order).

        Each run of consecutive cached rows is cast from the float16 memory map straight into its place in the
        float32 batch: one pass over the batch, no float16 gather copy and no float32 scatter copy (the old path's
        two extra passes over 12.6 MB per ViT-S/14 batch of 32). A shuffled training batch is runs of one row;
        evaluation reads whole slices.
        """
        idx = np.asarray(idx, dtype=np.int64)
        seg = np.searchsorted(self._starts, idx, side="right") - 1
        runs: list[tuple[Mapping[str, np.ndarray], int, int, int]] = []  # (arrays, batch pos, cached row, length)
        for s in np.unique(seg):
            arrays, rows = self.segments[s]
            where = np.flatnonzero(seg == s)
            local = rows[idx[where] - self._starts[s]]
            order = np.argsort(local, kind="stable")
            where, local = where[order], local[order]
            cuts = np.flatnonzero((np.diff(local) != 1) | (np.diff(where) != 1)) + 1
            for w, loc in zip(np.split(where, cuts), np.split(local, cuts), strict=True):
                runs.append((arrays, int(w[0]), int(loc[0]), len(w)))
        out: dict[str, np.ndarray] = {}
        for name in self.names:
            parts = np.empty((len(idx), *self.shape(name)), dtype=np.float32)
            for arrays, pos, row, length in runs:
                parts[pos:pos + length] = arrays[name][row:row + length]
            fn = (transforms or {}).get(name)
            out[name] = np.asarray(fn(parts), dtype=np.float32) if fn is not None else parts
        return out


def open_complete(path: Path, binding: dict[str, Any], sources: Iterable[str],
                  log: Log = _stderr) -> tuple[CachedSplit | None, str | None]:
    """The cache at `path` if complete, bound to `binding`, holding `sources` and matching its checksums (those of
    `sources`, labels and status: all are read once, at open, where a rebuild is still possible); else (None, why
    not). A cache without checksums (written before they existed) has them recorded now, with a `log` line."""
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        return None, None
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, "unreadable metadata"
    if not isinstance(meta, dict) or meta.get("schema") != CACHE_SCHEMA:
        return None, "stale (older cache format)"
    if meta.get("key") != binding_key(binding):
        return None, f"stale ({describe_difference(meta.get('binding', {}), binding)} changed)"
    why = _meta_problem(meta)
    if why:
        return None, f"corrupt (meta.json: {why})"
    sources = sorted(set(sources))
    missing = sorted(set(sources) - set(meta.get("sources", [])))
    if missing:
        return None, f"missing tensors {', '.join(missing)}"
    split = CachedSplit(path, meta)
    why = split.verify(sources)
    if why is None and split.checksums is None:
        why = split.record_legacy(log)
    if why:
        return None, f"corrupt ({why})"
    return split, None


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """What in meta.json (beyond the binding, which its key covers) is malformed, or None."""
    sources, shapes, classes = meta.get("sources"), meta.get("shapes"), meta.get("classes")
    if not isinstance(sources, list) or not all(isinstance(s, str) and s for s in sources):
        return "'sources' is not a list of tensor names"
    if not isinstance(shapes, dict) or set(shapes) != set(sources) or not all(
            isinstance(v, list) and v and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in v)
            for v in shapes.values()):
        return "'shapes' does not give positive dimensions for each source"
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        return "'classes' is not a list of names"
    n = meta["binding"].get("n") if isinstance(meta.get("binding"), dict) else None
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        return "'binding.n' is not a row count"
    return None


def cached_sources(path: Path, binding: dict[str, Any]) -> set[str]:
    """Sources a complete cache at `path` bound to `binding` already holds (to keep them when it is extended)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return set()
    if not isinstance(meta, dict) or meta.get("schema") != CACHE_SCHEMA or meta.get("key") != binding_key(binding):
        return set()
    return set(meta.get("sources", []))


class CacheWriter:
    """Creates or resumes `<dir>.partial/`, accepts batches of rows, and publishes the complete cache."""

    def __init__(self, path: Path, binding: dict[str, Any], classes: tuple[str, ...], labels: np.ndarray,
                 shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.final_path = path
        self.path = path.with_name(path.name + ".partial")
        key = binding_key(binding)
        sources = sorted(shapes)
        self.meta = {"schema": CACHE_SCHEMA, "key": key, "binding": binding, "sources": sources,
                     "shapes": {s: list(shapes[s]) for s in sources}, "classes": list(classes)}
        n = len(labels)
        existing = self.path / "meta.json"
        resumable = False
        if existing.is_file():
            try:
                old = json.loads(existing.read_text())
                resumable = old.get("key") == key and old.get("sources") == sources
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                resumable = False
        if resumable:
            resumable = all(_check_array(self.path / source_file(s), (n, *shapes[s]), np.float16) is None
                            for s in sources) and _check_array(self.path / "status.npy", (n,), np.uint8) is None
        if not resumable:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir(parents=True)
            for s in sources:
                np.lib.format.open_memmap(self.path / source_file(s), "w+", np.float16, (n, *shapes[s])).flush()
            np.save(self.path / "labels.npy", np.asarray(labels, dtype=np.int64))
            np.lib.format.open_memmap(self.path / "status.npy", "w+", np.uint8, (n,)).flush()
            write_json(self.path / "meta.json", self.meta)
        self.arrays = {s: np.load(self.path / source_file(s), mmap_mode="r+") for s in sources}
        self.status = np.load(self.path / "status.npy", mmap_mode="r+")

    def pending(self) -> np.ndarray:
        """Row indices still to compute (all of them for a new cache, the remainder when resuming)."""
        return np.flatnonzero(self.status == PENDING)

    def write(self, rows: np.ndarray, tensors: Mapping[str, np.ndarray]) -> None:
        """Store a batch; data is flushed before the rows are marked done, so a crash never marks garbage done."""
        for src, arr in tensors.items():
            with np.errstate(over="ignore"):  # checked after the cast: |x| > 65504 becomes Inf
                half = np.asarray(arr).astype(np.float16)
            finite = np.isfinite(half.reshape(len(half), -1)).all(axis=1)
            if not finite.all():
                bad = rows[~finite][:5].tolist()
                if np.isfinite(arr).all():
                    raise InputError(f"the backbone produced features beyond the float16 range (|x| > 65504) for "
                                     f"rows {bad} of {src}; they cannot be cached")
                raise InputError(f"the backbone produced non-finite features for rows {bad} (broken weights?)")
            self.arrays[src][rows] = half
            self.arrays[src].flush()
        self.status[rows] = DONE
        self.status.flush()

    def skip(self, row: int) -> None:
        self.status[row] = SKIPPED
        self.status.flush()

    def publish(self) -> CachedSplit:
        """Record the checksums, then atomically move the complete cache into place, replacing a stale one. (The
        checksums are taken from the finished arrays, whose pages the writes just cached: one pass at memory speed,
        and right for rows written by an earlier, interrupted run too.)"""
        arrays = {source_file(s): a for s, a in self.arrays.items()}
        arrays.update({"labels.npy": np.load(self.path / "labels.npy", mmap_mode="r"), "status.npy": self.status})
        integrity.record(self.path, self.meta, arrays)
        self.meta = {**self.meta, "checksums": integrity.CHECKSUM_FILE}
        write_json(self.path / "meta.json", self.meta)
        del self.arrays, self.status, arrays  # close the memory maps before renaming
        if self.final_path.exists():
            shutil.rmtree(self.final_path)
        self.path.rename(self.final_path)
        split = CachedSplit(self.final_path, self.meta)
        split.checksums, _ = integrity.read(self.final_path)
        split.checked = set(split.sources)
        return split


def split_cache_dir(cache_root: Path, source: str, precision: str = "fp32") -> Path:
    """One directory per dataset source (readable name plus a short hash of its absolute path) and precision."""
    src = Path(source).resolve()
    tag = hashlib.sha256(str(src).encode()).hexdigest()[:8]
    stem = src.stem if src.is_file() else src.name
    suffix = "" if precision == "fp32" else f"-{precision}"
    return cache_root / f"{stem}-{tag}{suffix}"
