"""Datasets: list files and ImageFolder directories, their one-line errors, and preprocessing numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mist_kit.data import decode_image, load_image_list, preprocess
from mist_kit.errors import DataError


def _png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (6, 4)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_list_file_paths_labels_and_classes(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "x.png", (255, 0, 0))
    _png(tmp_path / "b" / "y z.png", (0, 255, 0))  # a space in the name: the label is the last field
    (tmp_path / "classes.txt").write_text("cat\ndog\nemu\n")
    (tmp_path / "list.txt").write_text("# comment\na/x.png 2\n\nb/y z.png 0\n")
    images = load_image_list(tmp_path / "list.txt")
    assert images.paths == (tmp_path / "a" / "x.png", tmp_path / "b" / "y z.png")
    assert images.labels == (2, 0) and images.classes == ("cat", "dog", "emu") and len(images) == 2


def test_list_file_without_classes_txt_numbers_the_classes(tmp_path: Path) -> None:
    _png(tmp_path / "x.png", (1, 2, 3))
    (tmp_path / "list.txt").write_text("x.png 3\n")
    assert load_image_list(tmp_path / "list.txt").classes == ("0", "1", "2", "3")


@pytest.mark.parametrize(("line", "match"), [
    ("just-a-path.png", r"list.txt:1: expected '<relative image path> <integer label>'"),
    ("x.png cat", r"list.txt:1: label 'cat' is not an integer"),
    ("x.png -1", r"list.txt:1: label -1 is negative"),
])
def test_list_file_line_errors_name_file_and_line(tmp_path: Path, line: str, match: str) -> None:
    (tmp_path / "list.txt").write_text(line + "\n")
    with pytest.raises(DataError, match=match):
        load_image_list(tmp_path / "list.txt")


def test_label_beyond_classes_txt(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("a\nb\n")
    (tmp_path / "list.txt").write_text("x.png 2\n")
    with pytest.raises(DataError, match=r"label 2 is out of range for the 2 names in classes\.txt"):
        load_image_list(tmp_path / "list.txt")


def test_image_folder_layout_and_errors(tmp_path: Path) -> None:
    _png(tmp_path / "ds" / "zebra" / "1.png", (0, 0, 0))
    _png(tmp_path / "ds" / "ant" / "2.jpg", (0, 0, 0))
    (tmp_path / "ds" / "ant" / "notes.txt").write_text("not an image")
    images = load_image_list(tmp_path / "ds")
    assert images.classes == ("ant", "zebra") and images.labels == (0, 1) and len(images) == 2
    (tmp_path / "flat").mkdir()
    _png(tmp_path / "flat" / "1.png", (0, 0, 0))
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_list(tmp_path / "flat")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_image_list(tmp_path / "empty")


def test_fingerprint_tracks_bytes_labels_and_names(tmp_path: Path) -> None:
    _png(tmp_path / "x.png", (10, 20, 30))
    (tmp_path / "list.txt").write_text("x.png 0\n")
    base = load_image_list(tmp_path / "list.txt").fingerprint()
    assert load_image_list(tmp_path / "list.txt").fingerprint() == base
    (tmp_path / "list.txt").write_text("x.png 1\n")
    relabelled = load_image_list(tmp_path / "list.txt").fingerprint()
    _png(tmp_path / "x.png", (10, 20, 31))
    changed = load_image_list(tmp_path / "list.txt").fingerprint()
    assert len({base, relabelled, changed}) == 3


def test_preprocess_matches_hand_computation() -> None:
    img = Image.new("RGB", (3, 5), (51, 102, 204))  # uniform colour: bicubic resize keeps it exactly
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    out = preprocess(img, 7, mean, std)
    assert out.shape == (3, 7, 7) and out.dtype == np.float32
    expected = [(51 / 255 - 0.5) / 0.2, (102 / 255 - 0.4) / 0.25, (204 / 255 - 0.3) / 0.5]
    np.testing.assert_allclose(out.reshape(3, -1).mean(axis=1), expected, atol=1e-6)
    np.testing.assert_allclose(out.reshape(3, -1).std(axis=1), 0, atol=1e-6)


def test_decode_refuses_corrupt_and_converts_grey(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"upload\.jpg: cannot decode image"):
        decode_image(b"\xff\xd8\xff garbage", "upload.jpg")
    grey = tmp_path / "g.png"
    Image.new("L", (4, 4), 7).save(grey)
    assert decode_image(grey, str(grey)).mode == "RGB"
