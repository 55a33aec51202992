"""Real data for calibration and validation: gathered features from the checkpoint's cache, or images via --calib.

Quantization ranges and the int8 verdict are only as good as the data they are measured on, so both come from
real gathers: the training split's cache (calibration) and rows the calibration never saw (held-out evaluation:
the val split, then unused train rows). With `--calib DATA` the images are run through the backbone instead.
Real images are also needed for cloud-graph parity; they are read from the dataset the checkpoint was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mist_kit.cache import CachedSplit, split_cache_dir
from mist_kit.calibration.reader import ArrayBatches, InMemoryBatches, Transform
from mist_kit.config import BackboneSpec, CheckpointConfig
from mist_kit.data import ImageList, load_image_list, load_pixels
from mist_kit.errors import DataError, InputError

Log = Callable[[str], None]
_BINDING_FIELDS = ("backbone", "weights_sha256", "img_size", "mean", "std", "resize", "tokens", "dim")


@dataclass
class RealData:
    """Calibration batches, held-out batches (with labels when known) and a few real images for cloud parity."""

    calib: ArrayBatches | InMemoryBatches
    held_out: ArrayBatches | InMemoryBatches
    held_out_labels: np.ndarray | None
    pixels: np.ndarray  # float32 [n, 3, H, W]
    source: str
    notes: list[str] = field(default_factory=list)


def _binding_fits(meta: dict[str, Any], spec: BackboneSpec, k: int) -> bool:
    b = meta.get("binding", {})
    want = {"backbone": spec.name, "weights_sha256": spec.weights_sha256, "img_size": spec.img_size,
            "mean": list(spec.mean), "std": list(spec.std), "resize": spec.resize, "tokens": spec.num_tokens,
            "dim": spec.embed_dim}
    return all(b.get(f) == want[f] for f in _BINDING_FIELDS) and k in b.get("ks", [])


def find_cached_split(config: CheckpointConfig, source: str | None, k: int,
                      cache_root: Path | None = None, precision: str = "fp32") -> CachedSplit | None:
    """The complete cache of dataset `source` bound to this checkpoint's backbone and holding g_k, if any."""
    root = cache_root or (Path(config.training["cache_dir"]) if config.training.get("cache_dir") else None)
    if root is None or source is None:
        return None
    path = split_cache_dir(Path(root), source, precision)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return CachedSplit(path, meta) if _binding_fits(meta, config.backbone, k) else None


def _real_images(sources: list[str | None], n: int, rng: np.random.Generator) -> tuple[list[Path], str | None]:
    for src in sources:
        if src and Path(src).exists():
            try:
                images = load_image_list(src)
            except DataError:
                continue
            pick = rng.choice(len(images), size=min(n, len(images)), replace=False)
            return [images.paths[i] for i in sorted(pick)], src
    return [], None


def parity_pixels(config: CheckpointConfig, calib: str | None, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` real images, preprocessed per the checkpoint, from --calib or the training data; error if none."""
    t = config.training
    paths, _src = _real_images([calib, t.get("val"), t.get("train")], n, rng)
    if not paths:
        raise InputError("no real images for cloud parity: the checkpoint's training data "
                         f"({t.get('train')}) is not readable here; pass --calib DATA (ImageFolder or list file)")
    b = config.backbone
    return np.stack([load_pixels(p, b.img_size, b.mean, b.std) for p in paths]).astype(np.float32)


def from_cache(config: CheckpointConfig, k: int, n_calib: int, n_eval: int, rng: np.random.Generator,
               transform: Transform | None, cache_root: Path | None = None) -> RealData | None:
    """Calibrate on train-cache rows, hold out val rows (+ unused train rows); None when no matching cache."""
    t = config.training
    train = find_cached_split(config, t.get("train"), k, cache_root)
    if train is None:
        return None
    val = find_cached_split(config, t.get("val"), k, cache_root)
    rows = rng.permutation(train.valid())
    calib_rows = rows[:n_calib]
    spare = rows[n_calib:]
    notes = [f"calibration: {len(calib_rows)} cached train gathers ({train.path.name})"]
    held: list[tuple[CachedSplit, np.ndarray]] = []
    if val is not None:
        vrows = val.valid()[:n_eval]
        held.append((val, vrows))
        notes.append(f"held-out: {len(vrows)} val gathers")
    left = n_eval - sum(len(r) for _s, r in held)
    if left > 0 and len(spare):
        held.append((train, spare[:left]))
        notes.append(f"held-out: {min(left, len(spare))} train gathers not used for calibration")
    if not held:
        return None
    if len(held) == 1:
        split, hrows = held[0]
        held_batches: ArrayBatches | InMemoryBatches = ArrayBatches(split.gather(k), hrows, transform=transform)
        labels = np.asarray(split.labels())[np.sort(hrows)]
    else:  # concatenate lazily: a list of batches from both sources
        batches, labels_parts = [], []
        for split, hrows in held:
            batches.extend(ArrayBatches(split.gather(k), hrows, transform=transform))
            labels_parts.append(np.asarray(split.labels())[np.sort(hrows)])
        held_batches = InMemoryBatches(batches)
        labels = np.concatenate(labels_parts)
    calib_batches = ArrayBatches(train.gather(k), calib_rows, transform=transform)
    return RealData(calib_batches, held_batches, labels, np.zeros((0,), np.float32), str(train.path), notes)


def from_images(images: ImageList, gather: Any, config: CheckpointConfig, n_calib: int, n_eval: int,
                rng: np.random.Generator, transform: Transform | None, log: Log, batch_size: int = 16) -> RealData:
    """Run up to n_calib + n_eval images through the torch gather model and split them (calibration first)."""
    import torch

    b = config.backbone
    pick = rng.permutation(len(images))[: n_calib + n_eval]
    if len(pick) < 2:
        raise InputError(f"{images.source}: --calib needs at least 2 images, found {len(images)}")
    log(f"computing gathers for {len(pick)} calibration images from {images.source}")
    feats = []
    with torch.no_grad():
        for start in range(0, len(pick), batch_size):
            rows = pick[start:start + batch_size]
            px = np.stack([load_pixels(images.paths[i], b.img_size, b.mean, b.std) for i in rows])
            feats.append(gather(torch.from_numpy(px)).numpy())
    x = np.concatenate(feats).astype(np.float32)
    if transform is not None:
        x = np.asarray(transform(x), dtype=np.float32)
    n_c = min(n_calib, max(1, len(x) // 2))
    labels = np.asarray(images.labels)[pick[n_c:]]
    chunks = [{"features": x[i:i + 32]} for i in range(n_c, len(x), 32)]
    calib = [{"features": x[i:min(i + 32, n_c)]} for i in range(0, n_c, 32)]
    notes = [f"calibration: {n_c} images from {images.source}", f"held-out: {len(x) - n_c} images"]
    return RealData(InMemoryBatches(calib), InMemoryBatches(chunks), labels, np.zeros((0,), np.float32),
                    images.source, notes)
