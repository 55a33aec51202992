"""Real data for calibration and validation: gathered features from the checkpoint's cache, or images via --calib.

Quantization ranges and the int8 verdict are only as good as the data they are measured on, so both come from
real gathers: the training split's cache (calibration) and data the edge network never trained on (held-out
evaluation: `--eval DATA`, or the val split of a checkpoint that was not refit on it). With `--calib DATA` the
images are run through the backbone instead.
Real images are also needed for cloud-graph parity; they are read from the dataset the checkpoint was trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mist_kit.cache import CachedSplit, open_complete, split_cache_dir
from mist_kit.calibration.reader import InMemoryBatches, InputBatches, Transform
from mist_kit.config import CheckpointConfig
from mist_kit.data import ImageList, load_image_list, load_pixels, relabel
from mist_kit.errors import DataError, InputError
from mist_kit.runtime.plan import CloudPlan

Log = Callable[[str], None]
Transforms = dict[str, Transform | None]
Batches = InputBatches | InMemoryBatches


@dataclass
class RealData:
    """Calibration batches, held-out batches (with labels when known) and a few real images for cloud parity."""

    calib: Batches  # {sent tensor name: decoded float32 batch}: the edge core's inputs
    held_out: Batches | None  # None only when no check needs it (--quantize none)
    held_out_labels: np.ndarray | None
    source: str  # where the held-out data came from ("" when there is none)
    notes: list[str] = field(default_factory=list)


def plan_of(config: CheckpointConfig) -> CloudPlan:
    """The cloud plan a checkpoint's method declares at its recorded depth."""
    from mist_kit.edge import get_edge_method

    m = config.method
    return get_edge_method(m.name).cloud_plan(config.backbone.shape, m.k, m.params)


def find_cached_split(config: CheckpointConfig, source: str | None, plan: CloudPlan,
                      cache_root: Path | None = None, precision: str | None = None) -> CachedSplit | None:
    """The complete cache of dataset `source` bound to this checkpoint's backbone and holding the plan's tensors.

    `precision` defaults to the backbone precision the checkpoint trained with (a bf16-trained checkpoint's
    caches are bf16 ones: export must find them for codec calibration and the int8 gate). The binding is
    recomputed from the image list (names, labels, bytes), as training computed it; a list that is not readable
    here has no usable cache.
    """
    from mist_kit.featurize import cache_binding

    precision = precision or str(config.training.get("backbone_precision") or "fp32")
    root = cache_root or (Path(config.training["cache_dir"]) if config.training.get("cache_dir") else None)
    if root is None or source is None or not Path(source).exists():
        return None
    try:
        images = load_image_list(source)
    except DataError:
        return None
    path = split_cache_dir(Path(root), source, precision)
    split, _why = open_complete(path, cache_binding(config.backbone, images, precision),
                                [str(s) for s in plan.sources])
    return split


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


def _cached_rows(config: CheckpointConfig, source: str | None, plan: CloudPlan, n: int, rng: np.random.Generator,
                 transforms: Transforms, cache_root: Path | None) -> tuple[InputBatches, np.ndarray] | None:
    """Up to `n` random rows of `source`'s bound cache as batches, with their labels in batch order."""
    split = find_cached_split(config, source, plan, cache_root)
    if split is None:
        return None
    rows = split.inputs({t.name: str(t.source) for t in plan.tensors})
    positions = np.sort(rng.permutation(len(rows))[:n])
    labels = np.asarray(split.labels())[split.valid()][positions]
    if split.classes and list(split.classes) != list(config.classes):  # other class order: match by name
        labels = relabel(labels, split.classes, config.classes)
    return InputBatches(rows, positions, transforms=transforms), labels


def _image_tensors(images: ImageList, rows: np.ndarray, cloud: Any, config: CheckpointConfig,
                   transforms: Transforms, batch_size: int = 16) -> dict[str, np.ndarray]:
    """The plan's tensors (after each codec's round trip) for `images.paths[rows]`, from the torch cloud module."""
    import torch

    b = config.backbone
    names = list(cloud.plan.names)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            px = np.stack([load_pixels(images.paths[i], b.img_size, b.mean, b.std)
                           for i in rows[start:start + batch_size]])
            for name, t in zip(names, cloud(torch.from_numpy(px)), strict=True):
                parts[name].append(t.numpy())
    out = {}
    for name in names:
        x = np.concatenate(parts[name]).astype(np.float32)
        fn = transforms.get(name)
        out[name] = np.asarray(fn(x), dtype=np.float32) if fn is not None else x
    return out


def _chunks(x: dict[str, np.ndarray], size: int = 32) -> InMemoryBatches:
    n = len(next(iter(x.values())))
    return InMemoryBatches([{name: a[i:i + size] for name, a in x.items()} for i in range(0, n, size)])


def _take(x: dict[str, np.ndarray], sl: slice) -> dict[str, np.ndarray]:
    return {name: a[sl] for name, a in x.items()}


def _held_out_from(source: str, config: CheckpointConfig, cloud: Any, n: int, rng: np.random.Generator,
                   transforms: Transforms, cache_root: Path | None, log: Log) -> tuple[Batches, np.ndarray, str]:
    plan = cloud.plan if cloud is not None else plan_of(config)
    cached = _cached_rows(config, source, plan, n, rng, transforms, cache_root)
    if cached is not None:
        return cached[0], cached[1], f"held-out: {len(cached[0])} cached images of {source}"
    if cloud is None:
        raise InputError(f"{source}: no feature cache of it for this checkpoint; its images need the backbone")
    images = load_image_list(source)
    rows = np.sort(rng.permutation(len(images))[:n])
    log(f"computing held-out cloud tensors for {len(rows)} images of {source}")
    x = _image_tensors(images, rows, cloud, config, transforms)
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
    if val and not t.get("refit") and Path(val).exists():
        return str(val)
    if calib is not None and not _was_trained_on(config, calib):
        return calib
    if required:
        why = "was refit on train + val, so none of its data is held out" if t.get("refit") else \
            "has no val split readable here"
        raise InputError(f"the checkpoint {why}; the int8 agreement check needs images the edge network never "
                         "trained on: pass --eval DATA (ImageFolder or list file; labels optional)")
    return None


def real_data(config: CheckpointConfig, cloud: Any, *, calib: str | None, held_out: str | None, n_calib: int,
              n_eval: int, rng: np.random.Generator, transforms: Transforms, cache_root: Path | None,
              log: Log) -> RealData:
    """Calibration data, and the held-out data `held_out` names (from `held_out_source`; None: none).

    Calibration: `calib` images, else the training split's cache, else the training images (through `cloud`, the
    torch cloud module). When `held_out` is `calib` itself, the images not used for calibration are held out.
    """
    t = config.training
    plan = cloud.plan if cloud is not None else plan_of(config)
    source = held_out
    from_calib = source is not None and source == calib
    notes: list[str] = []
    calib_rows: Batches | None = None
    spare: tuple[InMemoryBatches, np.ndarray, str] | None = None
    if calib is None:
        cached = _cached_rows(config, t.get("train"), plan, n_calib, rng, transforms, cache_root)
        if cached is not None:
            calib_rows = cached[0]
            notes.append(f"calibration: {len(calib_rows)} cached train images of {t.get('train')}")
        else:
            calib = t.get("train")
            if not calib or not Path(calib).exists():
                raise InputError(f"no feature cache for this checkpoint ({', '.join(plan.names)}) and its training "
                                 f"data {calib} is not readable here; pass --calib DATA (ImageFolder or list file)")
            log(f"no matching feature cache; computing calibration tensors from the training images {calib}")
    if calib_rows is None:
        if cloud is None:
            raise InputError(f"{calib}: no feature cache of it for this checkpoint; its images need the backbone")
        images = load_image_list(calib)
        if len(images) < 2:
            raise InputError(f"{images.source}: --calib needs at least 2 images, found {len(images)}")
        take = n_calib + (n_eval if from_calib else 0)
        pick = rng.permutation(len(images))[:take]
        log(f"computing calibration tensors for {len(pick)} images of {images.source}")
        x = _image_tensors(images, pick, cloud, config, transforms)
        n_all = len(next(iter(x.values())))
        n_c = min(n_calib, max(1, n_all // 2)) if from_calib else n_all
        calib_rows = _chunks(_take(x, slice(0, n_c)))
        notes.append(f"calibration: {n_c} images of {images.source}")
        if from_calib and n_all > n_c:
            spare = (_chunks(_take(x, slice(n_c, None))), images.labels_for(config.classes)[pick[n_c:]],
                     f"held-out: {n_all - n_c} images of {images.source} not used for calibration")

    held: Batches | None = None
    labels: np.ndarray | None = None
    if source is not None and not from_calib:
        held, labels, note = _held_out_from(source, config, cloud, n_eval, rng, transforms, cache_root, log)
        notes.append(note)
    elif spare is not None:
        held, labels, note = spare
        notes.append(note)
    else:
        notes.append("held-out: none (no data the checkpoint did not train on)")
    return RealData(calib_rows, held, labels, source or "", notes)
