"""Shared by the Caltech-101 benches: a checkpoint's one sent tensor, and caches written by another bench.

The benches measure MIST, a single-tensor method (its cloud plan sends `gather` = gather:k), so they read one
cached array per split; the helpers here resolve that array from the checkpoint's cloud plan instead of assuming
a k-keyed layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def plan_of(config: Any) -> Any:
    """The cloud plan the checkpoint's method declares at its recorded depth."""
    from mist_kit.calibration.features import plan_of as _plan_of

    return _plan_of(config)


def one_tensor(config: Any) -> tuple[str, str]:
    """(sent tensor name, cache source key) of a single-input checkpoint; exit for a multi-tensor method."""
    plan = plan_of(config)
    if len(plan.tensors) != 1:
        raise SystemExit(f"error: these benches measure single-tensor methods; {config.method.name!r} sends "
                         f"{len(plan.tensors)} ({', '.join(plan.names)})")
    t = plan.tensors[0]
    return t.name, str(t.source)


def split_array(split: Any, config: Any) -> np.ndarray:
    """The float16 [N, T, D] memory map of the checkpoint's one sent tensor in `split`."""
    return split.array(one_tensor(config)[1])


def bound_test_cache(config: Any, test_cache: Path) -> Any:
    """The CachedSplit at `test_cache`, checked to hold this checkpoint's tensor for its weights (else exit)."""
    from mist_kit.cache import CachedSplit

    meta = json.loads((test_cache / "meta.json").read_text())
    source = one_tensor(config)[1]
    if meta["binding"]["weights_sha256"] != config.backbone.weights_sha256 or source not in meta.get("sources", ()):
        raise SystemExit(f"error: {test_cache}: cache is for other backbone weights or lacks {source}")
    return CachedSplit(test_cache, meta)
