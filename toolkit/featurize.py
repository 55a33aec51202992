"""Run the frozen backbone once over a dataset and fill the feature cache (batched, no grad, resumable).

Decoding the next batch's images overlaps with the backbone running on the current one (a small thread pool;
Pillow releases the GIL while decoding). Ctrl-C keeps every finished batch; the next run resumes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mist_kit.backbone_run import run_backbone
from mist_kit.cache import DONE, CachedSplit, CacheWriter, cached_sources, open_complete, split_cache_dir
from mist_kit.cloud_engines import Runner, backbone_runner, cache_tag
from mist_kit.config import BackboneSpec
from mist_kit.data import ImageList, load_pixels
from mist_kit.errors import DataError
from mist_kit.progress import Progress
from mist_kit.runtime.plan import TensorSource

Log = Callable[[str], None]


def cache_binding(spec: BackboneSpec, images: ImageList, precision: str = "fp32") -> dict:
    """Everything the cached numbers depend on; any change makes the cache stale. Which tensors are held is
    recorded beside it (a cache holding more serves fewer). bf16 caches carry `"precision": "bf16"`."""
    extra = {} if precision == "fp32" else {"precision": precision}
    return {
        **extra,
        "backbone": spec.name,
        "weights_sha256": spec.weights_sha256,
        "img_size": spec.img_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "resize": spec.resize,
        "images_sha256": images.fingerprint(),
        "n": len(images),
        "tokens": spec.num_tokens,
        "dim": spec.embed_dim,
    }


def _load_batch(images: ImageList, rows: np.ndarray, spec: BackboneSpec, skip_bad: bool
                ) -> tuple[list[int], list[np.ndarray], list[int]]:
    ok_rows, pixels, bad_rows = [], [], []
    for r in rows:
        try:
            pixels.append(load_pixels(images.paths[r], spec.img_size, spec.mean, spec.std))
            ok_rows.append(int(r))
        except DataError:
            if not skip_bad:
                raise
            bad_rows.append(int(r))
    return ok_rows, pixels, bad_rows


def cache_features(model: nn.Module | Callable[[], nn.Module], spec: BackboneSpec, images: ImageList,
                   cache_root: Path, sources: Iterable[TensorSource], *, batch_size: int = 32,
                   skip_bad: bool = False, progress: bool = True, log: Log = print,
                   precision: str = "fp32", engine: str = "torch") -> tuple[CachedSplit, float, int]:
    """Return (cache, seconds spent computing, images skipped) for `images`, computing only what is missing.

    `sources` are the tensors every plan being served needs (their union); a cache that lacks some is rebuilt with
    what it held plus them, in one backbone pass. `model` may be a zero-argument callable that builds the backbone,
    so a cache hit never loads it. `precision` is the backbone's compute precision (see `run_backbone`); caches
    of different precisions live side by side (a bf16 cache never serves an fp32 request, nor the reverse).
    `engine` runs the backbone: torch, or openvino (mist_kit.cloud_engines; its caches are kept apart too).
    """
    tag = cache_tag(engine, precision)
    binding = cache_binding(spec, images, tag)
    path = split_cache_dir(Path(cache_root), images.source, tag)
    want = sorted({str(s) for s in sources})
    cached, reason = open_complete(path, binding, want, log)
    if cached is not None:
        skipped = int(len(images) - len(cached.valid()))
        log(f"cache hit: {path} ({len(images)} images)")
        return cached, 0.0, skipped
    with build_lock(path, log):
        cached, reason = open_complete(path, binding, want, log)  # another process may have finished it meanwhile
        if cached is not None:
            log(f"cache hit: {path} (built by another process)")
            return cached, 0.0, int(len(images) - len(cached.valid()))
        held = cached_sources(path, binding) if reason and reason.startswith("missing") else set()
        everything = sorted(set(want) | held)
        if reason:
            log(f"cache {path}: {reason}; rebuilding" + (f" with {', '.join(everything)}" if held else ""))
        backbone = model if isinstance(model, nn.Module) else model()
        parsed = [TensorSource.parse(s) for s in everything]
        run: Runner = (lambda px: run_backbone(backbone, px, parsed, precision)) if engine == "torch" else \
            backbone_runner(backbone, parsed, precision, engine, spec.img_size)
        return _build(run, spec, images, path, binding, parsed, batch_size, skip_bad, progress, log)


@contextlib.contextmanager
def build_lock(path: Path, log: Log) -> Iterator[None]:
    """Exclusive lock on one split's cache while it is built: two runs sharing a cache directory would otherwise
    write the same `.partial` files. The second waits, then finds the finished cache. (POSIX flock; the lock file
    stays, empty, beside the cache.)"""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX: no locking, as before
            yield
            return
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"cache {path}: another process is building it; waiting")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build(run: Runner, spec: BackboneSpec, images: ImageList, path: Path, binding: dict,
           sources: list[TensorSource], batch_size: int, skip_bad: bool, progress: bool, log: Log,
           ) -> tuple[CachedSplit, float, int]:
    """Fill (or resume) the cache at `path`; the caller holds its build lock."""
    shapes = {str(s): s.shape(spec.shape) for s in sources}
    writer = CacheWriter(path, binding, images.classes, np.asarray(images.labels), shapes)
    todo = writer.pending()
    if len(todo) < len(images):
        log(f"resuming cache {path}: {len(images) - len(todo)} of {len(images)} images already done")
    batches = [todo[i: i + batch_size] for i in range(0, len(todo), batch_size)]
    start = time.perf_counter()
    bar = _progress(progress, len(todo), f"caching {Path(images.source).name}")
    with ThreadPoolExecutor(max_workers=2) as pool, bar:
        future = pool.submit(_load_batch, images, batches[0], spec, skip_bad) if batches else None
        for i in range(len(batches)):
            ok_rows, pixels, bad_rows = future.result()  # type: ignore[union-attr]
            if i + 1 < len(batches):
                future = pool.submit(_load_batch, images, batches[i + 1], spec, skip_bad)
            for r in bad_rows:
                log(f"skipping unreadable image {images.paths[r]}")
                writer.skip(r)
            if ok_rows:
                out = run(torch.from_numpy(np.stack(pixels)))
                writer.write(np.asarray(ok_rows), {k: v.numpy() for k, v in out.items()})
            bar.advance(len(batches[i]))
    seconds = time.perf_counter() - start
    if not (writer.status == DONE).any():  # never publish a cache with no features: it would "hit" next time
        raise DataError(f"{images.source}: every image was unreadable")
    split = writer.publish()
    return split, seconds, int(len(images) - len(split.valid()))


def _progress(enabled: bool, total: int, label: str) -> Progress:
    """A bar on a terminal, periodic plain lines on stderr otherwise, nothing when off (see mist_kit.progress)."""
    return Progress(total, label, enabled=enabled)
