"""Codec calibration from cached features: per-channel scales and PCA bases are fitted per backbone and k.

Calibration data follows onnxruntime's idea of a protocol, minus the class: any iterable of
`dict[str, np.ndarray]` whose "features" entry is a float [B, T, D] batch (streamed from the memory-mapped cache,
or an in-memory list in tests). Only `max_images` rows, spread evenly over the split, are used: percentiles and
covariances settle long before that and a full Caltech split of fp32 gathers would not fit in a Pi-sized memory.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mist_kit.errors import CodecError, InputError, UsageError
from mist_kit.runtime.codec import Codec, codec_params, fit_codec, parse_codec_name

DEFAULT_MAX_IMAGES = 256


def evenly_spaced(n: int, max_images: int) -> np.ndarray:
    """Deterministic row indices: all rows, or `max_images` spread over the split (class-sorted lists too)."""
    if n <= max_images:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_images).round().astype(np.int64))


def batches_from_array(x: np.ndarray, max_images: int = DEFAULT_MAX_IMAGES,
                       batch_size: int = 64) -> Iterator[dict[str, np.ndarray]]:
    """Stream calibration batches from a (memory-mapped) [N, T, D] array without loading all of it."""
    idx = evenly_spaced(len(x), max_images)
    for i in range(0, len(idx), batch_size):
        yield {"features": np.asarray(x[idx[i:i + batch_size]], dtype=np.float32)}


def fit_from_batches(name: str, batches: Iterable[dict[str, np.ndarray]], num_prefix_tokens: int,
                     max_images: int = DEFAULT_MAX_IMAGES) -> Codec:
    """Collect up to `max_images` feature rows from the calibration iterable and fit codec `name` on them."""
    rows: list[np.ndarray] = []
    count = 0
    for batch in batches:
        if "features" not in batch:
            raise CodecError(f"calibration batch: expected a 'features' entry, got {sorted(batch)}")
        arr = np.asarray(batch["features"], dtype=np.float32)
        rows.append(arr[: max_images - count])
        count += len(rows[-1])
        if count >= max_images:
            break
    if not count:
        raise CodecError(f"codec {name!r}: no calibration features (empty calibration data)")
    return fit_codec(name, np.concatenate(rows), num_prefix_tokens)


def fit_for_candidates(name: str, train_x: Mapping[Hashable, np.ndarray], num_prefix_tokens: int,
                       max_images: int = DEFAULT_MAX_IMAGES) -> dict[Hashable, Codec]:
    """One calibrated codec per candidate k: each gather depth has its own value ranges."""
    return {key: fit_from_batches(name, batches_from_array(x, max_images), num_prefix_tokens, max_images)
            for key, x in train_x.items()}


def fit_for_export(config: Any, name: str, cache_dir: Path | None = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Calibrate codec `name` for exporting an fp32-trained checkpoint, from its training split's cache.

    Only codecs that keep the token layout qualify: a pooling codec changes what the edge network sees, so the
    network must be retrained for it (`mist-kit train --codec NAME`), which export cannot do.
    """
    from mist_kit.calibration.features import find_cached_split

    base, _ = parse_codec_name(name)
    if codec_params(base).changes_tokens:
        raise UsageError(f"--codec {name}: token pooling or selection changes what the edge network sees; retrain "
                         f"it with `mist-kit train --codec {name}` and export that checkpoint")
    k = config.method.k
    split = find_cached_split(config, config.training.get("train"), k, cache_dir)
    if split is None:
        raise InputError(f"--codec {name}: calibrating it needs the checkpoint's training feature cache (k={k}); "
                         f"none found under {cache_dir or config.training.get('cache_dir')}; retrain with "
                         f"`mist-kit train --codec {name}` or pass --cache-dir")
    x = np.asarray(split.gather(k))[split.valid()]
    codec = fit_from_batches(name, batches_from_array(x), config.backbone.num_prefix_tokens)
    log(f"codec {name}: calibrated on {min(len(x), DEFAULT_MAX_IMAGES)} cached training gathers (k={k})")
    return codec.spec()
