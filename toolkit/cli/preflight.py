"""Checks a command can make before importing torch/timm (~30 s on a busy machine), so simple mistakes fail at once.

Everything here is torch-free and cheap: paths exist, data list files parse, and what can be read from a timm
model name (`..._patch16_224`, `vit_small_...`) without building the model: the patch size the input size must
be a multiple of, and the depth a fixed `--k` must not exceed. Names that do not say (e.g. `test_vit`) are left
to the backbone's own checks.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from mist_kit.errors import DataError, DependencyError, UsageError

# Depth of the standard ViT sizes (timm's vit_*/deit_*/*_dinov2 naming); names without a size word say nothing.
_DEPTH_BY_SIZE = {"tiny": 12, "small": 12, "base": 12, "large": 24, "huge": 32, "giant": 40}
_SIZE_WORD = re.compile(r"^(?:vit|deit|deit3)_(tiny|small|base|large|huge|giant)_")
_PATCH = re.compile(r"_patch(\d+)")
HUB_HOST = "huggingface.co"


def patch_size_from_name(name: str) -> int | None:
    """16 for 'vit_tiny_patch16_224', 14 for 'vit_small_patch14_dinov2'; None when the name does not say."""
    m = _PATCH.search(name)
    return int(m.group(1)) if m else None


def depth_from_name(name: str) -> int | None:
    """Blocks of a standard-size ViT name (12 for vit_small_*, 24 for vit_large_*); None when unknown."""
    m = _SIZE_WORD.match(name)
    return _DEPTH_BY_SIZE[m.group(1)] if m else None


def check_file(path: Path | None, flag: str) -> None:
    if path is not None and not Path(path).is_file():
        what = "is a directory" if Path(path).is_dir() else "does not exist"
        raise UsageError(f"{flag} {path}: {what}; expected a weights file (.safetensors or .pth)")


def check_data(source: str | None, flag: str) -> None:
    """The list file / ImageFolder opens and names images (reads the list only, decodes nothing)."""
    if source is None:
        return
    from mist_kit.data import load_image_list

    try:
        images = load_image_list(source)
    except DataError as exc:
        raise DataError(f"{flag}: {exc}") from None
    if len(images) == 0:
        raise DataError(f"{flag} {source}: no images")


def check_backbone_args(backbone: str, img_size: int | None, k: int | None, ks: tuple[int, ...] | None) -> None:
    """--img-size against the name's patch size, --k/--ks against the name's depth (where the name says)."""
    if img_size is not None:
        if img_size < 1:
            raise UsageError(f"--img-size must be positive, got {img_size}")
        patch = patch_size_from_name(backbone)
        if patch is not None and img_size % patch:
            lo, hi = max(patch, img_size // patch * patch), (img_size // patch + 1) * patch
            raise UsageError(f"--img-size {img_size} is not a multiple of {backbone}'s patch size {patch} "
                             f"(try {lo} or {hi})")
    depth = depth_from_name(backbone)
    for value, flag in [(k, "--k"), *((x, "--ks") for x in ks or ())]:
        if value is None:
            continue
        if value < 0:
            raise UsageError(f"{flag} {value}: k counts blocks, it must be >= 0")
        if depth is not None and value > depth:
            raise UsageError(f"{flag} {value} is beyond {backbone}'s depth ({depth} blocks); use 0..{depth}")


def check_pretrained_reachable(backbone: str, timeout_s: float = 3.0) -> None:
    """--pretrained downloads from the Hugging Face hub: fail now when offline and the model is not cached."""
    if _in_hf_cache(backbone):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    if not offline:
        try:
            socket.create_connection((HUB_HOST, 443), timeout=timeout_s).close()
            return
        except OSError:
            pass
    why = " (HF_HUB_OFFLINE is set)" if offline else ""
    raise DependencyError(f"--pretrained: {backbone} is not in the Hugging Face cache and the model hub "
                          f"({HUB_HOST}) cannot be reached{why}; pass --weights FILE instead")


def _in_hf_cache(backbone: str) -> bool:
    home = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME") or Path.home() / ".cache" /
                                                        "huggingface") / "hub")
    return home.is_dir() and any(home.glob(f"models--timm--{backbone.split('.')[0]}*"))
