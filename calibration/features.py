"""Real data for calibration and validation: gathered features from the checkpoint's cache, or images via --calib.

Quantization ranges and the int8 verdict are only as good as the data they are measured on, so both come from
real gathers: the training split's cache (calibration) and data the edge network never trained on (held-out
evaluation: `--eval DATA`, or the val split of a checkpoint that was not refit on it). With `--calib DATA` the
images are run through the backbone instead.
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
from mist_kit.data import ImageList, load_image_list, load_pixels, relabel
from mist_kit.errors import DataError, InputError

Log = Callable[[str], None]
_BINDING_FIELDS = ("backbone", "weights_sha256", "img_size", "mean", "std", "resize", "tokens", "dim")


@dataclass
class RealData:
    """Calibration batches, held-out batches (with labels when known) and a few real images for cloud parity."""

    calib: ArrayBatches | InMemoryBatches
    held_out: ArrayBatches | InMemoryBatches | None  # None only when no check needs it (--quantize none)
    held_out_labels: np.ndarray | None
    pixels: np.ndarray  # float32 [n, 3, H, W]
    source: str  # where the held-out data came from ("" when there is none)
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


def trained_sources(config: CheckpointConfig) -> list[str]:
    """The datasets the edge network was fit on: train, plus val when the checkpoint was refit on train + val."""
    t = config.training
    return [src for src in (t.get("train"), t.get("val") if t.get("refit") else None) if src]


def _same_source(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _was_trained_on(config: CheckpointConfig, source: str) -> bool:
    return any(_same_source(source, s) for s in trained_sources(config))


def _cached_rows(config: CheckpointConfig, source: str | None, k: int, n: int, rng: np.random.Generator,
                 transform: Transform | None, cache_root: Path | None) -> tuple[ArrayBatches, np.ndarray] | None:
    """Up to `n` random rows of `source`'s bound cache as batches, with their labels in batch order."""
    split = find_cached_split(config, source, k, cache_root)
    if split is None:
        return None
    rows = np.sort(rng.permutation(split.valid())[:n])
    labels = np.asarray(split.labels())[rows]
    if split.classes and list(split.classes) != list(config.classes):  # other class order: match by name
        labels = relabel(labels, split.classes, config.classes)
    return ArrayBatches(split.gather(k), rows, transform=transform), labels


def _image_gathers(images: ImageList, rows: np.ndarray, gather: Any, config: CheckpointConfig,
                   transform: Transform | None, batch_size: int = 16) -> np.ndarray:
    """g_k (after the codec round trip, if any) for `images.paths[rows]`, computed with the torch gather model."""
    import torch

    b = config.backbone
    feats = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            px = np.stack([load_pixels(images.paths[i], b.img_size, b.mean, b.std)
                           for i in rows[start:start + batch_size]])
            feats.append(gather(torch.from_numpy(px)).numpy())
    x = np.concatenate(feats).astype(np.float32)
    return np.asarray(transform(x), dtype=np.float32) if transform is not None else x


def _chunks(x: np.ndarray, size: int = 32) -> InMemoryBatches:
    return InMemoryBatches([{"features": x[i:i + size]} for i in range(0, len(x), size)])


def _held_out_from(source: str, config: CheckpointConfig, gather: Any, n: int, rng: np.random.Generator,
                   transform: Transform | None, cache_root: Path | None,
                   log: Log) -> tuple[ArrayBatches | InMemoryBatches, np.ndarray, str]:
    cached = _cached_rows(config, source, config.method.k, n, rng, transform, cache_root)
    if cached is not None:
        return cached[0], cached[1], f"held-out: {len(cached[0])} cached gathers of {source}"
    images = load_image_list(source)
    rows = np.sort(rng.permutation(len(images))[:n])
    log(f"computing held-out gathers for {len(rows)} images of {source}")
    x = _image_gathers(images, rows, gather, config, transform)
    return _chunks(x), images.labels_for(config.classes)[rows], f"held-out: {len(rows)} images of {source}"


def held_out_source(config: CheckpointConfig, calib: str | None, eval_data: str | None,
                    cache_root: Path | None = None, required: bool = False) -> str | None:
    """Where an export's held-out data comes from (None: nowhere; an InputError if `required`).

    `eval_data`, else the val split when the checkpoint was not refit on it, else `calib` (the images not used
    for calibration) when it is not training data. Training rows never qualify: the network fits them with wide
    margins, so int8 would look perfect there and the gate could never engage. Cheap (no backbone): the export
    calls it before any work starts.
    """
    if eval_data is not None:
        if _was_trained_on(config, eval_data):
            raise InputError(f"--eval {eval_data}: the checkpoint was trained on this data; the int8 agreement "
                             "check needs images it never saw")
        return eval_data
    t = config.training
    val = t.get("val")
    if val and not t.get("refit") and (Path(val).exists() or
                                       find_cached_split(config, val, config.method.k, cache_root) is not None):
        return str(val)
    if calib is not None and not _was_trained_on(config, calib):
        return calib
    if required:
        why = "was refit on train + val, so none of its data is held out" if t.get("refit") else \
            "has no val split readable here"
        raise InputError(f"the checkpoint {why}; the int8 agreement check needs images the edge network never "
                         "trained on: pass --eval DATA (ImageFolder or list file; labels optional)")
    return None


def real_data(config: CheckpointConfig, gather: Any, *, calib: str | None, held_out: str | None, n_calib: int,
              n_eval: int, rng: np.random.Generator, transform: Transform | None, cache_root: Path | None,
              log: Log) -> RealData:
    """Calibration data, and the held-out data `held_out` names (from `held_out_source`; None: none).

    Calibration: `calib` images, else the training split's cache, else the training images. When `held_out` is
    `calib` itself, the images not used for calibration are the held-out set.
    """
    k = config.method.k
    t = config.training
    source = held_out
    from_calib = source is not None and source == calib
    notes: list[str] = []
    calib_rows: ArrayBatches | InMemoryBatches | None = None
    spare: tuple[InMemoryBatches, np.ndarray, str] | None = None
    if calib is None:
        cached = _cached_rows(config, t.get("train"), k, n_calib, rng, transform, cache_root)
        if cached is not None:
            calib_rows = cached[0]
            notes.append(f"calibration: {len(calib_rows)} cached train gathers of {t.get('train')}")
        else:
            calib = t.get("train")
            if not calib or not Path(calib).exists():
                raise InputError(f"no feature cache for this checkpoint (k={k}) and its training data {calib} is "
                                 "not readable here; pass --calib DATA (ImageFolder or list file)")
            log(f"no matching feature cache; computing calibration gathers from the training images {calib}")
    if calib_rows is None:
        images = load_image_list(calib)
        if len(images) < 2:
            raise InputError(f"{images.source}: --calib needs at least 2 images, found {len(images)}")
        take = n_calib + (n_eval if from_calib else 0)
        pick = rng.permutation(len(images))[:take]
        log(f"computing calibration gathers for {len(pick)} images of {images.source}")
        x = _image_gathers(images, pick, gather, config, transform)
        n_c = min(n_calib, max(1, len(x) // 2)) if from_calib else len(x)
        calib_rows = _chunks(x[:n_c])
        notes.append(f"calibration: {n_c} images of {images.source}")
        if from_calib and len(x) > n_c:
            spare = (_chunks(x[n_c:]), images.labels_for(config.classes)[pick[n_c:]],
                     f"held-out: {len(x) - n_c} images of {images.source} not used for calibration")

    held: ArrayBatches | InMemoryBatches | None = None
    labels: np.ndarray | None = None
    if source is not None and not from_calib:
        held, labels, note = _held_out_from(source, config, gather, n_eval, rng, transform, cache_root, log)
        notes.append(note)
    elif spare is not None:
        held, labels, note = spare
        notes.append(note)
    else:
        notes.append("held-out: none (no data the checkpoint did not train on)")
    return RealData(calib_rows, held, labels, np.zeros((0,), np.float32), source or "", notes)
