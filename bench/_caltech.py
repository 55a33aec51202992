"""Shared by the Caltech-101 benches: open a feature cache written by another bench, refusing a foreign one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def bound_test_cache(config: Any, test_cache: Path) -> Any:
    """The CachedSplit at `test_cache`, checked to hold g_k of this checkpoint's backbone weights (else exit)."""
    from mist_kit.cache import CachedSplit

    meta = json.loads((test_cache / "meta.json").read_text())
    b = meta["binding"]
    if b["weights_sha256"] != config.backbone.weights_sha256 or config.method.k not in b["ks"]:
        raise SystemExit(f"error: {test_cache}: cache is for other backbone weights or lacks k={config.method.k}")
    return CachedSplit(test_cache, meta)
