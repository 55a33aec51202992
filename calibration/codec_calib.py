"""Codec calibration from cached features: scales and PCA bases fitted per backbone, candidate and sent tensor.

Calibration data follows onnxruntime's idea of a protocol, minus the class: any iterable of `dict[str,
np.ndarray]` whose entry for the sent tensor is a float [B, T, D] batch (streamed from the memory-mapped cache,
or an in-memory list in tests). Only `max_images` rows, spread evenly over the split, are used: percentiles and
covariances settle long before that and a full Caltech split of fp32 gathers would not fit in a Pi-sized memory.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mist_kit.cache import InputRows
from mist_kit.errors import CodecError, InputError, UsageError
from mist_kit.runtime.codec import Codec, codec_params, fit_codec, parse_codec_name

DEFAULT_MAX_IMAGES = 256


def evenly_spaced(n: int, max_images: int) -> np.ndarray:
    """Deterministic row indices: all rows, or `max_images` spread over the split (class-sorted lists too)."""
    if n <= max_images:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_images).round().astype(np.int64))


def batches_from_array(x: np.ndarray, max_images: int = DEFAULT_MAX_IMAGES, batch_size: int = 64,
                       name: str = "features") -> Iterator[dict[str, np.ndarray]]:
    """Stream calibration batches from a (memory-mapped) [N, T, D] array without loading all of it."""
    idx = evenly_spaced(len(x), max_images)
    for i in range(0, len(idx), batch_size):
        yield {name: np.asarray(x[idx[i:i + batch_size]], dtype=np.float32)}


def fit_from_batches(name: str, batches: Iterable[dict[str, np.ndarray]], num_prefix_tokens: int,
                     max_images: int = DEFAULT_MAX_IMAGES, tensor: str = "features") -> Codec:
    """Collect up to `max_images` rows of `tensor` from the calibration iterable and fit codec `name` on them."""
    rows: list[np.ndarray] = []
    count = 0
    for batch in batches:
        if tensor not in batch:
            raise CodecError(f"calibration batch: expected a {tensor!r} entry, got {sorted(batch)}")
        arr = np.asarray(batch[tensor], dtype=np.float32)
        rows.append(arr[: max_images - count])
        count += len(rows[-1])
        if count >= max_images:
            break
    if not count:
        raise CodecError(f"codec {name!r}: no calibration features (empty calibration data)")
    return fit_codec(name, np.concatenate(rows), num_prefix_tokens, tensor=tensor)


def fit_for_inputs(name: str, rows: InputRows, num_prefix_tokens: int,
                   max_images: int = DEFAULT_MAX_IMAGES) -> dict[str, Codec]:
    """Codec `name` calibrated separately for every sent tensor of one candidate: each has its own ranges."""
    from mist_kit.runtime.codec.registry import same_tokens_codec

    idx = evenly_spaced(len(rows), max_images)
    batch = rows.batch(idx)
    out = {}
    for tensor in rows.names:
        x = batch[tensor]
        if x.shape[1] == 1:  # the final cls: no prefix/patch split, nothing to pool: the codec's quantizer alone
            base, level = parse_codec_name(name)
            one = same_tokens_codec(base) + ("" if level is None else f"+zstd{level}")
            out[tensor] = fit_codec(one, x, 0, tensor=tensor)
        else:
            out[tensor] = fit_codec(name, x, min(num_prefix_tokens, x.shape[1] - 1), tensor=tensor)
    return out


def fit_for_candidates(name: str, train_x: Mapping[Hashable, InputRows], num_prefix_tokens: int,
                       max_images: int = DEFAULT_MAX_IMAGES) -> dict[Hashable, dict[str, Codec]]:
    """One calibrated codec per candidate and sent tensor (each gather depth has its own value ranges)."""
    return {key: fit_for_inputs(name, rows, num_prefix_tokens, max_images) for key, rows in train_x.items()}


def fit_for_export(config: Any, name: str, cache_dir: Path | None = None,
                   log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Calibrate codec `name` for every sent tensor of an fp32-trained checkpoint, from its training cache.

    Only codecs that keep the token layout qualify: a pooling codec changes what the edge network sees, so the
    network must be retrained for it (`mist-kit train --codec NAME`), which export cannot do.
    """
    from mist_kit.calibration.features import find_cached_split, plan_of

    base, _ = parse_codec_name(name)
    if codec_params(base).changes_tokens:
        raise UsageError(f"--codec {name}: token pooling or selection changes what the edge network sees; retrain "
                         f"it with `mist-kit train --codec {name}` and export that checkpoint")
    plan = plan_of(config)
    split = find_cached_split(config, config.training.get("train"), plan, cache_dir)
    if split is None:
        raise InputError(f"--codec {name}: calibrating it needs the checkpoint's training feature cache "
                         f"({', '.join(str(s) for s in sorted(plan.sources))}); none found under "
                         f"{cache_dir or config.training.get('cache_dir')}; retrain with "
                         f"`mist-kit train --codec {name}` or pass --cache-dir")
    rows = split.inputs({t.name: str(t.source) for t in plan.tensors})
    codecs = fit_for_inputs(name, rows, config.backbone.num_prefix_tokens)
    log(f"codec {name}: calibrated on {min(len(rows), DEFAULT_MAX_IMAGES)} cached training images per tensor "
        f"({', '.join(codecs)})")
    return {tensor: c.spec() for tensor, c in codecs.items()}
