"""The demo's embedded dataset: scikit-learn's bundled 8x8 digits, upscaled and written as PNG list files.

Real image files on disk (not arrays) so the demo exercises the same loading path as a user's data, offline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mist_kit.atomic import write_text
from mist_kit.errors import DependencyError

SPLITS = (("train", 800), ("val", 200), ("test", 797))  # VTAB-1k-like: 800 + 200 to train, the rest to test


def write_digits(root: Path, size: int = 32, seed: int = 0) -> dict[str, Path]:
    """Write digits PNGs (size x size, RGB) and train/val/test list files; return split -> list file."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - the train extra brings scikit-learn
        raise DependencyError("the demo needs scikit-learn's bundled digits: pip install 'mist-kit[train]'") from None
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.images))
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    write_text(root / "classes.txt", "\n".join(str(i) for i in range(10)) + "\n")
    lists: dict[str, Path] = {}
    start = 0
    for name, count in SPLITS:
        lines = []
        for idx in order[start: start + count]:
            rel = f"images/{idx:04d}.png"
            path = root / rel
            if not path.exists():
                pixels = (digits.images[idx] / 16.0 * 255.0).astype(np.uint8)
                Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.NEAREST).convert("RGB") \
                    .save(path)
            lines.append(f"{rel} {int(digits.target[idx])}")
        start += count
        lists[name] = root / f"{name}.txt"
        write_text(lists[name], "\n".join(lines) + "\n")
    return lists
