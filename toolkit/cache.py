"""The feature cache: the backbone runs once per image, training reads memory-mapped float16 arrays.

Layout of one split's cache directory (plain .npy files anyone can `np.load(mmap_mode="r")`):
    meta.json      the binding (backbone, weights sha256, preprocessing, image-list fingerprint, ks) and its key
    g{k}.npy       float16 [N, T, D]: the gather g_k for each candidate k
    cls.npy        float16 [N, D]: the backbone's final-norm cls token (linear-probe baseline)
    labels.npy     int64 [N]
    status.npy     uint8 [N]: 0 = not computed yet, 1 = done, 2 = unreadable image skipped (--skip-bad)
A cache under construction lives in `<dir>.partial/` and is renamed into place when complete, so an interrupted
run resumes where it stopped and a complete cache is never half-written. A cache whose binding differs from
what is asked for is stale: it is reported and rebuilt, never reused. Torch-free (reading needs numpy only).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mist_kit.atomic import write_json
from mist_kit.errors import InputError

CACHE_SCHEMA = "mist-kit/feature-cache/1"
PENDING, DONE, SKIPPED = 0, 1, 2


def binding_key(binding: dict[str, Any]) -> str:
    """Stable hash of the binding dict (sorted JSON), without `ks`: a cache holding more ks still serves."""
    rest = {k: v for k, v in binding.items() if k != "ks"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Which binding fields changed, for the 'stale cache' message."""
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(changed) or "format"


@dataclass
class CachedSplit:
    """A complete cache opened read-only: arrays are memory-mapped, nothing is loaded until sliced."""

    path: Path
    meta: dict[str, Any]

    @property
    def ks(self) -> tuple[int, ...]:
        return tuple(self.meta["binding"]["ks"])

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.meta["classes"])

    def _array(self, name: str) -> np.ndarray:
        return np.load(self.path / name, mmap_mode="r")

    def valid(self) -> np.ndarray:
        """Indices of images whose features exist (skipped unreadable images excluded)."""
        return np.flatnonzero(self._array("status.npy") == DONE)

    def gather(self, k: int) -> np.ndarray:
        if k not in self.ks:
            raise InputError(f"{self.path}: no gather for k={k}; cached ks are {list(self.ks)}")
        return self._array(f"g{k}.npy")

    def final_cls(self) -> np.ndarray:
        return self._array("cls.npy")

    def labels(self) -> np.ndarray:
        return self._array("labels.npy")

    def features(self, input_kind: str, k: int | None) -> np.ndarray:
        """What an edge method of `input_kind` consumes: the gather at k, or the final cls token."""
        if input_kind == "final_cls":
            return self.final_cls()
        if k is None:
            raise InputError("a gather-consuming method needs k")
        return self.gather(k)


def open_complete(path: Path, binding: dict[str, Any]) -> tuple[CachedSplit | None, str | None]:
    """Return the cache at `path` if it is complete and bound to `binding`; else (None, reason it is unusable)."""
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        return None, None
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None, "unreadable metadata"
    if meta.get("schema") != CACHE_SCHEMA or meta.get("key") != binding_key(binding):
        return None, f"stale ({describe_difference(meta.get('binding', {}), binding)} changed)"
    missing = sorted(set(binding["ks"]) - set(meta["binding"].get("ks", [])))
    if missing:
        return None, f"stale (no gather for k={missing})"
    return CachedSplit(path, meta), None


class CacheWriter:
    """Creates or resumes `<dir>.partial/`, accepts batches of rows, and publishes the complete cache."""

    def __init__(self, path: Path, binding: dict[str, Any], classes: tuple[str, ...], labels: np.ndarray,
                 tokens: int, dim: int) -> None:
        self.final_path = path
        self.path = path.with_name(path.name + ".partial")
        self.binding = binding
        key = binding_key(binding)
        self.meta = {"schema": CACHE_SCHEMA, "key": key, "binding": binding, "classes": list(classes)}
        n = len(labels)
        existing = self.path / "meta.json"
        resumable = False
        if existing.is_file():
            old = json.loads(existing.read_text())
            resumable = old.get("key") == key and old["binding"].get("ks") == binding["ks"]
        if not resumable:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir(parents=True)
            for k in binding["ks"]:
                np.lib.format.open_memmap(self.path / f"g{k}.npy", "w+", np.float16, (n, tokens, dim)).flush()
            np.lib.format.open_memmap(self.path / "cls.npy", "w+", np.float16, (n, dim)).flush()
            np.save(self.path / "labels.npy", np.asarray(labels, dtype=np.int64))
            np.lib.format.open_memmap(self.path / "status.npy", "w+", np.uint8, (n,)).flush()
            write_json(self.path / "meta.json", self.meta)
        self.gathers = {k: np.load(self.path / f"g{k}.npy", mmap_mode="r+") for k in binding["ks"]}
        self.cls = np.load(self.path / "cls.npy", mmap_mode="r+")
        self.status = np.load(self.path / "status.npy", mmap_mode="r+")

    def pending(self) -> np.ndarray:
        """Row indices still to compute (all of them for a new cache, the remainder when resuming)."""
        return np.flatnonzero(self.status == PENDING)

    def write(self, rows: np.ndarray, gathers: dict[int, np.ndarray], cls: np.ndarray) -> None:
        """Store a batch; data is flushed before the rows are marked done, so a crash never marks garbage done."""
        for k, arr in gathers.items():
            self.gathers[k][rows] = arr.astype(np.float16)
            self.gathers[k].flush()
        self.cls[rows] = cls.astype(np.float16)
        self.cls.flush()
        self.status[rows] = DONE
        self.status.flush()

    def skip(self, row: int) -> None:
        self.status[row] = SKIPPED
        self.status.flush()

    def publish(self) -> CachedSplit:
        """Atomically move the complete cache into place, replacing a stale one."""
        del self.gathers, self.cls, self.status  # close the memory maps before renaming
        if self.final_path.exists():
            shutil.rmtree(self.final_path)
        self.path.rename(self.final_path)
        return CachedSplit(self.final_path, self.meta)


def split_cache_dir(cache_root: Path, source: str, precision: str = "fp32") -> Path:
    """One directory per dataset source (readable name plus a short hash of its absolute path) and precision."""
    src = Path(source).resolve()
    tag = hashlib.sha256(str(src).encode()).hexdigest()[:8]
    stem = src.stem if src.is_file() else src.name
    suffix = "" if precision == "fp32" else f"-{precision}"
    return cache_root / f"{stem}-{tag}{suffix}"
