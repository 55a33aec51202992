"""Datasets as image lists: an ImageFolder directory or a VTAB-style list file, plus image preprocessing.

Torch-free (Pillow + numpy): the cloud server and `extract` preprocess images with the same code the trainer
used, so what the manifest's `input` spec says is what every consumer does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mist_kit.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# Pillow's own guard is a warning up to 2x this; we refuse anything larger outright (decompression bombs).
MAX_IMAGE_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


@dataclass(frozen=True)
class ImageList:
    """Image paths with integer labels (-1 = unknown) and the class names the labels index."""

    source: str
    paths: tuple[Path, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        """sha256 over every image's relative name, label and bytes: any change to the data changes it."""
        h = hashlib.sha256()
        root = Path(self.source)
        root = root if root.is_dir() else root.parent
        for path, label in zip(self.paths, self.labels, strict=True):
            try:
                rel = path.relative_to(root)
            except ValueError:
                rel = path
            h.update(f"{rel.as_posix()}\0{label}\0".encode())
            try:
                h.update(hashlib.sha256(path.read_bytes()).digest())
            except OSError as exc:
                raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
        h.update("\0".join(self.classes).encode())
        return h.hexdigest()

    def labels_for(self, classes: Sequence[str]) -> np.ndarray:
        """Labels as indices into `classes` (a model's class list), matched by name; -1 where a class is unknown.

        A dataset may list its classes in another order, or only some of them: matching by name keeps accuracy
        and agreement numbers honest when such data is scored against a model.
        """
        return relabel(self.labels, self.classes, classes)


def relabel(labels: Sequence[int], names: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """`labels` indexing `names`, re-expressed as indices into `classes` by class name; -1 where unknown."""
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index.get(names[lab], -1) if 0 <= lab < len(names) else -1 for lab in labels], dtype=np.int64)


def _read_classes_txt(path: Path) -> tuple[str, ...] | None:
    classes_file = path.parent / "classes.txt"
    if not classes_file.is_file():
        return None
    names = [ln.strip() for ln in classes_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return tuple(names) or None


def _load_list_file(path: Path) -> ImageList:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read list file ({exc})") from None
    paths: list[Path] = []
    labels: list[int] = []
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        rel, sep, label_text = line.rpartition(" ")
        if not sep or not rel.strip():
            raise DataError(f"{path}:{lineno}: expected '<relative image path> <integer label>', got {line!r}")
        try:
            label = int(label_text)
        except ValueError:
            raise DataError(f"{path}:{lineno}: label {label_text!r} is not an integer") from None
        if label < 0:
            raise DataError(f"{path}:{lineno}: label {label} is negative")
        paths.append(path.parent / rel.strip())
        labels.append(label)
    if not paths:
        raise DataError(f"{path}: list file is empty; expected lines '<relative image path> <integer label>'")
    classes = _read_classes_txt(path)
    n_classes = max(labels) + 1
    if classes is None:
        classes = tuple(str(i) for i in range(n_classes))
    elif n_classes > len(classes):
        raise DataError(f"{path}: label {max(labels)} is out of range for the {len(classes)} names in classes.txt")
    return ImageList(str(path), tuple(paths), tuple(labels), classes)


def _load_image_folder(root: Path) -> ImageList:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class sub-folders; expected ImageFolder layout <root>/<class>/<image>")
    paths: list[Path] = []
    labels: list[int] = []
    for label, cdir in enumerate(class_dirs):
        for img in sorted(cdir.rglob("*")):
            if img.is_file() and img.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(img)
                labels.append(label)
    if not paths:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES[:3])}, ...) under its class folders")
    return ImageList(str(root), tuple(paths), tuple(labels), tuple(d.name for d in class_dirs))


def load_image_list(source: str | Path) -> ImageList:
    """Open a dataset given as an ImageFolder directory or a list file; errors name the path."""
    path = Path(source)
    if path.is_dir():
        return _load_image_folder(path)
    if path.is_file():
        return _load_list_file(path)
    raise DataError(f"{path}: no such file or directory; expected an ImageFolder directory or a list file")


def decode_image(data: bytes | Path, name: str) -> Image.Image:
    """Decode an image (file path or encoded bytes) to RGB, refusing corrupt files and decompression bombs."""
    import io
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            src = io.BytesIO(data) if isinstance(data, bytes) else data
            with Image.open(src) as img:
                w, h = img.size
                if w * h > MAX_IMAGE_PIXELS:
                    raise DataError(f"{name}: image is {w}x{h}, over the {MAX_IMAGE_PIXELS:,} pixel limit")
                img.load()
                return img.convert("RGB")
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{name}: image is over the {MAX_IMAGE_PIXELS:,} pixel limit (decompression bomb?)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{name}: cannot decode image ({exc})") from None


def preprocess(img: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """RGB image -> float32 [3, size, size]: bicubic resize to a square (no crop), scale to [0, 1], normalise."""
    resized = img.resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(resized, dtype=np.float32) / 255.0  # (H, W, 3)
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def load_pixels(path: Path, size: int, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Read one image file and return its normalised [3, size, size] float32 tensor."""
    return preprocess(decode_image(path, str(path)), size, mean, std)
