"""Fixtures shared by the cache tests: a private, modifiable copy of a few digits and the tiny ViT over them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mist_kit.backbone import load_backbone

N_IMAGES = 12


@pytest.fixture
def small_list(tmp_path: Path, digits_lists: dict[str, Path]) -> Path:
    """A private copy (images + list) of the first N_IMAGES training digits, safe to modify."""
    src = digits_lists["train"]
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    lines = src.read_text().splitlines()[:N_IMAGES]
    for line in lines:
        rel = line.rsplit(" ", 1)[0]
        shutil.copy(src.parent / rel, root / rel)
    shutil.copy(src.parent / "classes.txt", root / "classes.txt")
    (root / "list.txt").write_text("\n".join(lines) + "\n")
    return root / "list.txt"


@pytest.fixture(scope="module")
def backbone(tiny_weights: Path):
    return load_backbone("test_vit", img_size=32, weights=tiny_weights)
