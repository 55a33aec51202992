"""The feature cache: values equal a direct backbone pass, stale caches (weights, images, preprocessing) are
detected and rebuilt, a cache with more tensors serves fewer (no backbone pass, counted), a corrupt cache is rebuilt,
an interrupted build resumes, and --skip-bad counts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from small_cache_data import N_IMAGES

import mist_kit.featurize as featurize
from mist_kit.backbone import load_backbone, save_random_backbone
from mist_kit.backbone_run import run_backbone
from mist_kit.data import ImageList, load_image_list, load_pixels
from mist_kit.errors import DataError
from mist_kit.featurize import cache_features
from mist_kit.runtime.plan import FINAL_CLS, block, gather


def _cache(backbone, images: ImageList, root: Path, ks=(2, 4), extra=(), **kw):
    model, spec = backbone
    logs: list[str] = []
    sources = [gather(k) for k in ks] + list(extra)
    split, secs, skipped = cache_features(model, spec, images, root, sources, batch_size=4, progress=False,
                                          log=logs.append, **kw)
    return split, secs, skipped, logs


def test_cached_values_equal_a_direct_backbone_pass(backbone, small_list: Path, tmp_path: Path) -> None:
    model, spec = backbone
    images = load_image_list(small_list)
    split, secs, skipped, _ = _cache(backbone, images, tmp_path / "c", extra=(FINAL_CLS, block(3)))
    assert secs > 0 and skipped == 0 and split.sources == ("block:3", "final_cls", "gather:2", "gather:4")
    pixels = torch.from_numpy(np.stack([load_pixels(p, 32, spec.mean, spec.std) for p in images.paths]))
    ref = run_backbone(model, pixels, [gather(2), gather(4), block(3), FINAL_CLS])
    for src in ("gather:2", "gather:4", "block:3"):
        got = np.asarray(split.array(src), dtype=np.float32)
        assert got.shape == (N_IMAGES, 5, 64)
        np.testing.assert_allclose(got, ref[src].numpy(), atol=2e-2, rtol=2e-3)  # float16 storage
    np.testing.assert_allclose(np.asarray(split.array("final_cls"), np.float32), ref["final_cls"].numpy(),
                               atol=2e-2, rtol=2e-3)
    assert split.array("final_cls").shape == (N_IMAGES, 1, 64)
    assert split.bytes_per_image() == 2 * (3 * 5 * 64 + 64)
    assert list(split.labels()) == list(images.labels)


def test_a_superset_cache_serves_a_smaller_plan_with_no_backbone_pass(backbone, small_list: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    images = load_image_list(small_list)
    real = featurize.run_backbone
    passes: list[int] = []
    monkeypatch.setattr(featurize, "run_backbone", lambda m, p, *a: (passes.append(len(p)), real(m, p, *a))[1])
    first, _, _, _ = _cache(backbone, images, tmp_path / "c", ks=(2, 4), extra=(block(1),))
    assert sum(passes) == N_IMAGES  # one pass over the images filled three tensors
    mtime = (first.path / "gather-2.npy").stat().st_mtime_ns
    passes.clear()
    again, secs, _, logs = _cache(backbone, images, tmp_path / "c", ks=(2,), extra=(block(1),))
    assert secs == 0.0 and passes == [] and any("cache hit" in m for m in logs)
    assert (again.path / "gather-2.npy").stat().st_mtime_ns == mtime
    bigger, secs, _, logs = _cache(backbone, images, tmp_path / "c", ks=(6,))
    assert secs > 0 and sum(passes) == N_IMAGES  # one more pass, keeping what the cache held
    assert bigger.sources == ("block:1", "gather:2", "gather:4", "gather:6")
    assert any("missing tensors gather:6" in m for m in logs)
    passes.clear()
    _cache(backbone, images, tmp_path / "c", ks=(4, 2))
    assert passes == []


def test_a_truncated_or_reshaped_cache_is_rebuilt_not_used(backbone, small_list: Path, tmp_path: Path) -> None:
    images = load_image_list(small_list)
    first, _, _, _ = _cache(backbone, images, tmp_path / "c")
    ref = np.array(first.array("gather:4"), dtype=np.float32)
    target = first.path / "gather-4.npy"
    target.write_bytes(target.read_bytes()[:-100])  # truncated
    again, secs, _, logs = _cache(backbone, images, tmp_path / "c")
    assert secs > 0 and any("corrupt (gather-4.npy: truncated" in m for m in logs)
    np.testing.assert_array_equal(np.asarray(again.array("gather:4"), np.float32), ref)
    np.save(again.path / "status.npy", np.zeros(N_IMAGES + 1, np.uint8))  # a header that disagrees with n
    _, secs, _, logs = _cache(backbone, images, tmp_path / "c")
    assert secs > 0 and any("corrupt (status.npy" in m for m in logs)


def test_changed_weights_make_the_cache_stale(backbone, small_list: Path, tmp_path: Path) -> None:
    images = load_image_list(small_list)
    first, _, _, _ = _cache(backbone, images, tmp_path / "c")
    before = np.array(first.array("gather:4"), dtype=np.float32)
    other = save_random_backbone("test_vit", tmp_path / "other.safetensors", img_size=32, seed=1)
    rebuilt, secs, _, logs = _cache(load_backbone("test_vit", img_size=32, weights=other), images, tmp_path / "c")
    assert secs > 0 and any("stale (weights_sha256 changed)" in m for m in logs)
    assert not np.allclose(np.asarray(rebuilt.array("gather:4"), np.float32), before)


def test_changed_image_bytes_make_the_cache_stale(backbone, small_list: Path, tmp_path: Path) -> None:
    images = load_image_list(small_list)
    first, _, _, _ = _cache(backbone, images, tmp_path / "c")
    before = np.array(first.array("gather:2"), dtype=np.float32)
    from PIL import Image

    target = images.paths[3]
    Image.open(target).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(target)
    rebuilt, secs, _, logs = _cache(backbone, load_image_list(small_list), tmp_path / "c")
    assert secs > 0 and any("stale (images_sha256 changed)" in m for m in logs)
    after = np.asarray(rebuilt.array("gather:2"), np.float32)
    np.testing.assert_array_equal(after[:3], before[:3])  # untouched images: same numbers
    assert not np.allclose(after[3], before[3])


def test_changed_preprocessing_makes_the_cache_stale(backbone, small_list: Path, tmp_path: Path) -> None:
    model, spec = backbone
    images = load_image_list(small_list)
    _cache(backbone, images, tmp_path / "c")
    other_spec = replace(spec, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    _, secs, _, logs = _cache((model, other_spec), images, tmp_path / "c")
    assert secs > 0 and any("stale (mean, std changed)" in m for m in logs)


def test_interrupted_build_resumes_where_it_stopped(backbone, small_list: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    images = load_image_list(small_list)
    real = featurize.run_backbone
    calls: list[int] = []

    def crash_on_third_batch(model, pixels, *args):
        calls.append(len(pixels))
        if len(calls) == 3:
            raise KeyboardInterrupt  # what Ctrl-C does mid-build
        return real(model, pixels, *args)

    monkeypatch.setattr(featurize, "run_backbone", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        _cache(backbone, images, tmp_path / "c")
    partial = next((tmp_path / "c").glob("*.partial"))
    assert int((np.load(partial / "status.npy") == 1).sum()) == 8  # two batches of 4 kept
    calls.clear()
    monkeypatch.setattr(featurize, "run_backbone", lambda m, p, *a: (calls.append(len(p)), real(m, p, *a))[1])
    resumed, _, _, logs = _cache(backbone, images, tmp_path / "c")
    assert calls == [4] and any("8 of 12 images already done" in m for m in logs)
    assert not partial.exists()
    fresh, _, _, _ = _cache(backbone, images, tmp_path / "fresh")
    np.testing.assert_array_equal(np.asarray(resumed.array("gather:4")), np.asarray(fresh.array("gather:4")))


def test_skip_bad_counts_and_excludes_corrupt_images(backbone, small_list: Path, tmp_path: Path) -> None:
    lines = small_list.read_text().splitlines()
    (small_list.parent / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    small_list.write_text("\n".join([*lines[:5], "images/broken.jpg 3", *lines[5:]]) + "\n")
    images = load_image_list(small_list)
    with pytest.raises(DataError, match=r"broken\.jpg: cannot decode image"):
        _cache(backbone, images, tmp_path / "c")
    split, _, skipped, logs = _cache(backbone, images, tmp_path / "c", skip_bad=True)
    assert skipped == 1 and any("broken.jpg" in m for m in logs)
    assert list(split.valid()) == [i for i in range(N_IMAGES + 1) if i != 5]
    _, secs, skipped_again, _ = _cache(backbone, images, tmp_path / "c", skip_bad=True)
    assert secs == 0.0 and skipped_again == 1  # the hit still reports the count


def test_all_images_unreadable_is_an_error(backbone, tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"nope")
    (tmp_path / "list.txt").write_text("bad.png 0\n")
    with pytest.raises(DataError, match="every image was unreadable"):
        _cache(backbone, load_image_list(tmp_path / "list.txt"), tmp_path / "c", skip_bad=True)


def test_bf16_cache_lives_beside_fp32_and_stays_close(backbone, small_list: Path, tmp_path: Path) -> None:
    images = load_image_list(small_list)
    fp32, _, _, _ = _cache(backbone, images, tmp_path / "c", ks=(6,))
    bf16, secs, _, logs = _cache(backbone, images, tmp_path / "c", ks=(6,), precision="bf16")
    assert secs > 0 and not any("stale" in m for m in logs)  # its own directory: the fp32 cache is untouched
    assert bf16.path != fp32.path and bf16.meta["binding"]["precision"] == "bf16"
    assert "precision" not in fp32.meta["binding"]
    a, b = np.asarray(fp32.array("gather:6"), np.float32), np.asarray(bf16.array("gather:6"), np.float32)
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert 0 < rel < 0.03  # bfloat16 products: a small, nonzero difference
    _, secs, _, _ = _cache(backbone, images, tmp_path / "c", ks=(6,))
    assert secs == 0.0  # the fp32 cache still serves fp32 requests


def test_a_second_builder_waits_for_the_first(backbone, small_list: Path, tmp_path: Path) -> None:
    import fcntl
    import threading

    from mist_kit.cache import split_cache_dir

    images = load_image_list(small_list)
    path = split_cache_dir(tmp_path / "c", images.source)
    path.parent.mkdir(parents=True)
    lock = open(path.with_name(path.name + ".lock"), "a+")  # noqa: SIM115 - held across the thread's start
    fcntl.flock(lock, fcntl.LOCK_EX)  # play "another process" building this split
    logs: list[str] = []
    done = threading.Event()

    def second() -> None:
        model, spec = backbone
        cache_features(model, spec, images, tmp_path / "c", [gather(2)], batch_size=4, progress=False,
                       log=logs.append)
        done.set()

    worker = threading.Thread(target=second)
    worker.start()
    assert not done.wait(1.0)  # blocked on the lock, not writing the same .partial files
    fcntl.flock(lock, fcntl.LOCK_UN)
    lock.close()
    worker.join(60)
    assert done.is_set() and any("another process is building it; waiting" in m for m in logs)
