"""Feature-cache checksums (issue 15 item 6): flipped bytes, NaN runs, shuffled labels, a zeroed status and a
damaged checksum file are each found on open, reported in one line naming the file and chunk, and rebuilt (one
backbone pass, counted); a cache written before checksums existed opens with no backbone pass and gets them.

Chunks are made 4 rows long (CHUNK_BYTES patched to 4 rows of a [5, 64] float16 tensor) so the messages name a
chunk other than the first."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from small_cache_data import N_IMAGES

import mist_kit.cache_integrity as integrity
import mist_kit.featurize as featurize
from mist_kit.cache import CacheWriter, open_complete
from mist_kit.data import load_image_list
from mist_kit.errors import DataError, InputError
from mist_kit.featurize import cache_features
from mist_kit.runtime.plan import gather

ROW_BYTES = 5 * 64 * 2  # one image of a gather tensor of the tiny ViT: [5, 64] float16


@pytest.fixture(autouse=True)
def four_row_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(integrity, "CHUNK_BYTES", 4 * ROW_BYTES)


@pytest.fixture
def passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Images the backbone ran on, per call (a cache hit runs it on none)."""
    real = featurize.run_backbone
    seen: list[int] = []
    monkeypatch.setattr(featurize, "run_backbone", lambda m, p, *a: (seen.append(len(p)), real(m, p, *a))[1])
    return seen


def _cache(backbone, list_path: Path, root: Path, ks=(2, 4)):
    model, spec = backbone
    logs: list[str] = []
    split, _secs, _ = cache_features(model, spec, load_image_list(list_path), root, [gather(k) for k in ks],
                                    batch_size=4, progress=False, log=logs.append)
    return split, logs


def _rebuilt_after(damage, backbone, small_list: Path, tmp_path: Path, passes: list[int]) -> list[str]:
    """Build, damage, open again: the rebuild lines the second open logged (the 'cache DIR: ' prefix checked and
    removed), after checking it rebuilt the same values."""
    first, _ = _cache(backbone, small_list, tmp_path / "c")
    ref = {s: np.array(first.array(s)) for s in first.sources}
    labels, status = np.array(first.labels()), np.load(first.path / "status.npy")
    damage(first.path)
    passes.clear()
    again, logs = _cache(backbone, small_list, tmp_path / "c")
    assert sum(passes) == N_IMAGES  # one full backbone pass: rebuilt, not used
    for s, arr in ref.items():
        np.testing.assert_array_equal(np.asarray(again.array(s)), arr)
    np.testing.assert_array_equal(again.labels(), labels)
    np.testing.assert_array_equal(np.load(again.path / "status.npy"), status)
    passes.clear()
    _cache(backbone, small_list, tmp_path / "c")
    assert passes == []  # the rebuilt cache is a hit
    lines = [m for m in logs if "rebuilding" in m]
    assert all(m.startswith(f"cache {first.path}: ") and "\n" not in m for m in lines), lines
    return [m.removeprefix(f"cache {first.path}: ") for m in lines]


def _data_offset(npy: Path) -> int:
    with open(npy, "rb") as fh:
        np.lib.format.read_magic(fh)
        np.lib.format.read_array_header_1_0(fh)
        return fh.tell()


def test_flipped_bytes_in_one_feature_file(backbone, small_list: Path, tmp_path: Path, passes: list[int]) -> None:
    def flip(path: Path) -> None:
        f = path / "gather-4.npy"
        raw = bytearray(f.read_bytes())
        start = _data_offset(f) + 5 * ROW_BYTES  # row 5: chunk 1
        for i in range(0, 40, 2):  # 20 low bytes of float16 values: never makes a NaN or an Inf
            raw[start + i] ^= 0x01
        f.write_bytes(bytes(raw))

    logs = _rebuilt_after(flip, backbone, small_list, tmp_path, passes)
    assert logs == ["corrupt (gather-4.npy: chunk 1 (rows 4..7) does not match checksums.json); rebuilding"]


def test_a_nan_run(backbone, small_list: Path, tmp_path: Path, passes: list[int]) -> None:
    def nan_run(path: Path) -> None:
        arr = np.load(path / "gather-2.npy", mmap_mode="r+")
        arr[9, 2, 10:30] = np.nan
        arr.flush()

    logs = _rebuilt_after(nan_run, backbone, small_list, tmp_path, passes)
    assert logs == ["corrupt (gather-2.npy: chunk 2 (rows 8..11) holds NaN/Inf and does not match "
                            "checksums.json); rebuilding"]


def test_shuffled_labels(backbone, small_list: Path, tmp_path: Path, passes: list[int]) -> None:
    def shuffle(path: Path) -> None:
        labels = np.load(path / "labels.npy")
        shuffled = np.random.default_rng(0).permutation(labels)
        assert (shuffled != labels).any() and sorted(shuffled) == sorted(labels)  # same labels, other rows
        np.save(path / "labels.npy", shuffled)

    logs = _rebuilt_after(shuffle, backbone, small_list, tmp_path, passes)
    assert logs == ["corrupt (labels.npy: chunk 0 (rows 0..11) does not match checksums.json); rebuilding"]


def test_zeroed_status_and_a_done_row_marked_skipped(backbone, small_list: Path, tmp_path: Path,
                                                     passes: list[int]) -> None:
    logs = _rebuilt_after(lambda p: np.save(p / "status.npy", np.zeros(N_IMAGES, np.uint8)), backbone, small_list,
                          tmp_path, passes)
    assert logs == ["corrupt (status.npy: rows neither done nor skipped in a complete cache); rebuilding"]

    def skip_one(path: Path) -> None:  # structurally valid: only the checksum tells
        status = np.load(path / "status.npy")
        status[3] = 2
        np.save(path / "status.npy", status)

    logs = _rebuilt_after(skip_one, backbone, small_list, tmp_path / "again", passes)
    assert logs == ["corrupt (status.npy: chunk 0 (rows 0..11) does not match checksums.json); rebuilding"]


def _make_legacy(path: Path) -> None:
    """What the code before checksums wrote: no checksums.json, no 'checksums' key in meta.json."""
    (path / "checksums.json").unlink()
    meta = json.loads((path / "meta.json").read_text())
    del meta["checksums"]
    (path / "meta.json").write_text(json.dumps(meta))


def test_a_legacy_cache_opens_without_a_rebuild_and_gets_checksums(backbone, small_list: Path, tmp_path: Path,
                                                                   passes: list[int]) -> None:
    first, _ = _cache(backbone, small_list, tmp_path / "c")
    ref = np.array(first.array("gather:4"))
    _make_legacy(first.path)
    mtime = (first.path / "gather-4.npy").stat().st_mtime_ns
    passes.clear()
    again, logs = _cache(backbone, small_list, tmp_path / "c", ks=(4,))
    assert passes == []  # no backbone pass
    assert f"cache {first.path}: written without checksums (older mist-kit); no NaN/Inf found, recorded them in " \
        "checksums.json (trusted on first use)" in logs
    assert (first.path / "gather-4.npy").stat().st_mtime_ns == mtime  # the features were not rewritten
    np.testing.assert_array_equal(np.asarray(again.array("gather:4")), ref)
    table = json.loads((first.path / "checksums.json").read_text())
    assert set(table["files"]) == {"gather-2.npy", "gather-4.npy", "labels.npy", "status.npy"}  # every source
    assert json.loads((first.path / "meta.json").read_text())["checksums"] == "checksums.json"
    _, logs = _cache(backbone, small_list, tmp_path / "c")
    assert passes == [] and not any("checksums" in m for m in logs)  # recorded once
    arr = np.load(first.path / "gather-2.npy", mmap_mode="r+")  # from now on damage is found
    arr[0, 0, 0] = -arr[0, 0, 0] if arr[0, 0, 0] != 0 else 1
    arr.flush()
    del arr
    _, logs = _cache(backbone, small_list, tmp_path / "c")
    assert sum(passes) == N_IMAGES
    assert f"cache {first.path}: corrupt (gather-2.npy: chunk 0 (rows 0..3) does not match checksums.json); " \
        "rebuilding" in logs


def test_a_read_only_legacy_cache_is_used_on_its_scan(backbone, small_list: Path, tmp_path: Path,
                                                      passes: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    first, _ = _cache(backbone, small_list, tmp_path / "c")
    _make_legacy(first.path)

    def read_only(*_a, **_k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(integrity, "record", read_only)
    passes.clear()
    _, logs = _cache(backbone, small_list, tmp_path / "c")
    assert passes == [] and not (first.path / "checksums.json").exists()
    assert f"cache {first.path}: has no checksums and they cannot be recorded (Permission denied); using it as is " \
        "(no NaN/Inf found)" in logs


def test_a_legacy_cache_with_a_nan_run_is_rebuilt(backbone, small_list: Path, tmp_path: Path,
                                                  passes: list[int]) -> None:
    def legacy_nan(path: Path) -> None:
        _make_legacy(path)
        arr = np.load(path / "gather-4.npy", mmap_mode="r+")
        arr[6, :, :8] = np.inf
        arr.flush()

    logs = _rebuilt_after(legacy_nan, backbone, small_list, tmp_path, passes)
    assert logs == ["corrupt (gather-4.npy: chunk 1 (rows 4..7) holds NaN/Inf); rebuilding"]


@pytest.mark.parametrize(("damage", "why"), [
    ("digit", "checksums.json: damaged (its own digest does not match)"),
    ("truncate", "checksums.json: unreadable"),
    ("delete", "checksums.json: missing (meta.json says the cache has one)"),
])
def test_a_damaged_checksum_file(backbone, small_list: Path, tmp_path: Path, passes: list[int], damage: str,
                                 why: str) -> None:
    def hurt(path: Path) -> None:
        f = path / "checksums.json"
        text = f.read_text()
        if damage == "digit":  # one digit of one CRC: still valid JSON
            at = re.search(r'"crc32": \[\s*(\d)', text).start(1)  # type: ignore[union-attr]
            f.write_text(text[:at] + ("1" if text[at] != "1" else "2") + text[at + 1:])
        elif damage == "truncate":
            f.write_text(text[: len(text) // 2])
        else:
            f.unlink()

    logs = _rebuilt_after(hurt, backbone, small_list, tmp_path, passes)
    assert logs == [f"corrupt ({why}); rebuilding"]


def test_a_source_not_asked_for_is_checked_when_first_read(backbone, small_list: Path, tmp_path: Path) -> None:
    first, _ = _cache(backbone, small_list, tmp_path / "c")
    arr = np.load(first.path / "gather-4.npy", mmap_mode="r+")
    arr[1, 1, 1] = 7.0 if arr[1, 1, 1] != 7.0 else 8.0
    arr.flush()
    del arr
    split, why = open_complete(first.path, first.meta["binding"], ["gather:2"])
    assert why is None and split is not None  # gather-4.npy is not read on this open
    split.array("gather:2")
    with pytest.raises(DataError) as err:
        split.array("gather:4")
    assert str(err.value) == f"{first.path}: corrupt (gather-4.npy: chunk 0 (rows 0..3) does not match " \
        "checksums.json); rerun to rebuild it"


def test_features_beyond_float16_range_are_refused_at_write(tmp_path: Path) -> None:
    writer = CacheWriter(tmp_path / "c", {"n": 2}, ("a",), np.zeros(2, np.int64), {"gather:1": (1, 2)})
    with pytest.raises(InputError, match=r"beyond the float16 range \(\|x\| > 65504\) for rows \[1\] of gather:1"):
        writer.write(np.array([0, 1]), {"gather:1": np.array([[[1.0, 2.0]], [[7e4, 0.0]]], np.float32)})
    with pytest.raises(InputError, match=r"non-finite features for rows \[0\]"):
        writer.write(np.array([0, 1]), {"gather:1": np.array([[[np.nan, 2.0]], [[1.0, 0.0]]], np.float32)})
    assert (writer.pending() == [0, 1]).all()  # nothing marked done
