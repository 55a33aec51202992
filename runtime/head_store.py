"""Where device-trained heads live: a state directory beside the bundle, versioned, atomic, with rollback.

Why outside the bundle: the bundle is a signed-by-hash artifact (every file in manifest.files); writing a new head
into it would make verification fail or force rewriting the manifest on the device. So the bundle stays
read-only and the device keeps its heads in `<bundle>.heads/` (or `--state DIR`):

    head-v0001.safetensors   weight/bias + metadata (version, parent, classes, edge sha256, report)
    head-v0002.safetensors
    current.json             {"version": 2, "file": ..., "sha256": ..., "edge_sha256": ...}

Version 0 is the bundle's own head. A new head is written (temp + fsync + rename) before `current.json` points at
it, so a crash leaves the previous head active. `rollback()` re-points `current.json` at the parent version;
the last `keep` versions stay on disk. Heads are bound to the edge graph's sha256: a head trained on another
edge graph's embeddings is refused. Torch-free.

Concurrency: two `finetune-edge` runs on one bundle share the state directory. Version allocation, the head write
and the `current.json` read-modify-write happen under an exclusive `fcntl.flock` on `<state>/.lock`, so each run
gets its own version and every version lands in the history; a second run waits for the first (bounded wait,
then one HeadStateError line). The lock also guards the cleanup of temp files a SIGKILL left behind: they are
removed only while no writer holds it. A head with non-finite weights is refused before anything is written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from mist_kit.atomic import atomic_path, write_json
from mist_kit.errors import InputError
from mist_kit.runtime.bundle import EdgeBundle, Head, load_head_file
from mist_kit.runtime.manifest import sha256_file

HEAD_FORMAT = "mist-kit/head/1"
STATE_FORMAT = "mist-kit/head-state/1"
CURRENT = "current.json"
LOCK = ".lock"
LOCK_WAIT_S = 120.0  # a save takes milliseconds; longer means a stuck process, reported rather than waited on
_NAME = re.compile(r"^head-v(\d{4,})\.safetensors$")
# temp files of atomic_path(): ".head-v0005.safetensors.<random>.tmp", ".current.json.<random>.tmp"
_TEMP = re.compile(r"^\.(head-v\d{4,}\.safetensors|current\.json)\..+\.tmp$")


class HeadStateError(InputError):
    """The device's head state directory is inconsistent (tampered, for another edge graph, nothing to undo)."""


def default_state_dir(bundle_root: str | os.PathLike[str]) -> Path:
    root = Path(bundle_root).resolve()
    return root.parent / f"{root.name}.heads"


class HeadStore:
    """Versioned heads for one bundle on one device."""

    def __init__(self, bundle: EdgeBundle, state_dir: str | os.PathLike[str] | None = None, keep: int = 5) -> None:
        self.bundle = bundle
        self.dir = Path(state_dir) if state_dir is not None else default_state_dir(bundle.root)
        self.keep = max(keep, 2)
        self.edge_sha256 = bundle.manifest["files"][bundle.manifest["edge"].get("file") or "edge.onnx"]["sha256"]
        self.cleanup_orphans()

    @contextlib.contextmanager
    def lock(self, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
        """Hold the state directory's exclusive lock (waits up to `wait_s`, then a one-line HeadStateError)."""
        import fcntl  # POSIX only, like the devices this runs on

        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise HeadStateError(f"{self.dir / LOCK}: another finetune-edge has held the head store "
                                             f"for over {wait_s:g} s; retry when it has finished") from None
                    time.sleep(0.02)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def cleanup_orphans(self) -> list[Path]:
        """Remove temp files left by a killed writer; skipped while another process holds the lock."""
        if not self.dir.is_dir() or not any(_TEMP.match(p.name) for p in self.dir.iterdir()):
            return []
        try:
            with self.lock(wait_s=0.0):
                removed = [p for p in self.dir.iterdir() if _TEMP.match(p.name)]
                for p in removed:
                    p.unlink(missing_ok=True)
        except HeadStateError:  # a writer is active: its temp file is not an orphan
            return []
        return removed

    def _path(self, version: int) -> Path:
        return self.dir / f"head-v{version:04d}.safetensors"

    def versions(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _NAME.match(p.name)))

    def _state(self) -> dict[str, Any] | None:
        path = self.dir / CURRENT
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise HeadStateError(f"{path}: unreadable ({exc}); delete it to fall back to the bundle head") from None
        if state.get("format") != STATE_FORMAT or not isinstance(state.get("version"), int):
            raise HeadStateError(f"{path}: format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        if state.get("edge_sha256") != self.edge_sha256:
            raise HeadStateError(f"{path}: heads were trained on another edge graph (edge sha256 differs from "
                                 f"{self.bundle.root}); use another --state directory")
        return state

    def current_version(self) -> int:
        state = self._state()
        return 0 if state is None else int(state["version"])

    def _read(self, version: int) -> tuple[Head, dict[str, str]]:
        if version == 0:
            return self.bundle.head, {"version": "0", "parent": ""}
        from safetensors import safe_open

        path = self._path(version)
        if not path.is_file():
            raise HeadStateError(f"{path}: head version {version} is missing from the state directory")
        with safe_open(str(path), framework="np") as fh:
            meta = fh.metadata() or {}
        if meta.get("format") != HEAD_FORMAT or meta.get("edge_sha256") != self.edge_sha256:
            raise HeadStateError(f"{path}: not a head for this bundle's edge graph (format/edge_sha256 mismatch)")
        classes = tuple(json.loads(meta["classes"]))
        return load_head_file(path, classes, version=version), meta

    def load(self) -> Head:
        """The active head: the latest committed version, or the bundle head when none was trained."""
        state = self._state()
        if state is None or state["version"] == 0:
            return self.bundle.head
        path = self._path(state["version"])
        if path.is_file() and sha256_file(path) != state.get("sha256"):
            raise HeadStateError(f"{path}: sha256 does not match {self.dir / CURRENT} (tampered or corrupted)")
        return self._read(int(state["version"]))[0]

    def history(self) -> list[dict[str, Any]]:
        """current.json's history entries, oldest first ({version, at} and, for stored-only heads, activated)."""
        return list((self._state() or {}).get("history", []))

    def _commit(self, version: int, stored: int | None = None) -> None:
        """Point current.json at `version`; `stored` records a version written but not activated. Under the lock."""
        state = self._state() or {}
        entry: dict[str, Any] = {"version": version, "at": _now()}
        if stored is not None:
            entry = {"version": stored, "at": _now(), "activated": False}
        history = [*state.get("history", []), entry][-50:]
        sha = sha256_file(self._path(version)) if version else ""
        write_json(self.dir / CURRENT, {"format": STATE_FORMAT, "version": version,
                                        "file": self._path(version).name if version else "",
                                        "sha256": sha, "edge_sha256": self.edge_sha256, "history": history})

    def _next_version(self) -> int:
        """One more than any version on disk, in current.json or in its history (pruned numbers are not reused)."""
        state = self._state() or {}
        seen = [0, *self.versions(), int(state.get("version", 0))]
        seen += [int(h["version"]) for h in state.get("history", []) if isinstance(h.get("version"), int)]
        return max(seen) + 1

    def save(self, head: Head, report: dict[str, Any] | None = None, activate: bool = True) -> int:
        """Write `head` as the next version (atomic) and, if `activate`, make it current; prune. Returns its version.

        Allocation, write and switch run under the store's lock, so concurrent savers get distinct versions and
        every one is in the history. `activate=False` stores the head (for inspection or a later decision) and
        records it in the history, but leaves the current head active.
        """
        from safetensors.numpy import save_file

        weight = np.ascontiguousarray(head.weight, dtype=np.float32)
        bias = np.ascontiguousarray(head.bias, dtype=np.float32)
        if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
            raise HeadStateError(f"{self.dir}: the new head has non-finite weights (training diverged or the "
                                 "features hold NaN/Inf); nothing was written, the current head stays active")
        with self.lock():
            parent = self.current_version()
            version = self._next_version()
            meta = {"format": HEAD_FORMAT, "version": str(version), "parent": str(parent),
                    "classes": json.dumps(list(head.classes)), "edge_sha256": self.edge_sha256, "created": _now(),
                    "report": json.dumps(_finite(report or {}), default=float, allow_nan=False)}
            with atomic_path(self._path(version)) as tmp:
                save_file({"weight": weight, "bias": bias}, str(tmp), metadata=meta)
            if activate:
                self._commit(version)
            else:
                self._commit(parent, stored=version)
            self._prune(version if activate else parent, also_keep=version)
        return version

    def rollback(self) -> tuple[int, int]:
        """Make the current head's parent current again. Returns (from_version, to_version)."""
        current = self.current_version()
        if current == 0:
            raise HeadStateError(f"{self.dir}: the bundle head is active; nothing to roll back")
        _, meta = self._read(current)
        parent = int(meta.get("parent") or 0)
        if parent:
            self._read(parent)  # refuse to point at a missing or foreign file
        with self.lock():
            if self.current_version() != current:
                raise HeadStateError(f"{self.dir}: the active head changed while rolling back; run it again")
            self._commit(parent)
        return current, parent

    def _prune(self, current: int, also_keep: int | None = None) -> None:
        keep = set(self.versions()[-self.keep:]) | {current, also_keep}
        for version in self.versions():
            if version not in keep:
                self._path(version).unlink(missing_ok=True)


def _finite(obj: Any) -> Any:
    """Report values made JSON-standard: NaN/Inf floats become None (the metadata must be strict JSON)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not math.isfinite(float(obj)):
        return None
    return obj


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
