"""Shared fixtures: a tiny digits dataset and a tiny trained checkpoint, built once per test session.

Everything is offline, seeded and written under pytest's tmp paths; nothing needs ../shared.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import two_tensor_method  # noqa: F401  (registers the two-tensor test method for every test)
from hypothesis import settings as _hypothesis_settings

# hypothesis draws its examples from each test's source, not from a random seed: every run tests the same inputs
_hypothesis_settings.register_profile("deterministic", derandomize=True)
_hypothesis_settings.load_profile("deterministic")

pytest_plugins = ["small_cache_data"]  # small_list, backbone: the cache tests' private digits and tiny ViT

TINY_BACKBONE = "test_vit"  # timm's registered tiny ViT: width 64, 6 blocks
TINY_IMG = 32  # 2x2 patches of 16 px + cls = 5 tokens: fast everywhere


@pytest.fixture(scope="session")
def digits_lists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """train/val/test list files of upscaled sklearn digits (800/200/797 images)."""
    from mist_kit.demo_data import write_digits

    return write_digits(tmp_path_factory.mktemp("digits"), size=16)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seeded random-init test_vit weights as safetensors."""
    from mist_kit.backbone import save_random_backbone

    return save_random_backbone(TINY_BACKBONE, tmp_path_factory.mktemp("weights") / "tiny.safetensors",
                                img_size=TINY_IMG, seed=0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, digits_lists: dict[str, Path],
                    tiny_weights: Path) -> dict:
    """A mist checkpoint trained on digits at k=2 (report dict from run_training; 'checkpoint' is its path)."""
    from mist_kit.pipeline import TrainRequest, run_training
    from mist_kit.train import TrainParams

    out = tmp_path_factory.mktemp("tiny_run")
    req = TrainRequest(backbone=TINY_BACKBONE, weights=str(tiny_weights), img_size=TINY_IMG,
                       train=str(digits_lists["train"]), val=str(digits_lists["val"]),
                       test=str(digits_lists["test"]), out=out, k=2,
                       params=TrainParams(epochs=15, min_steps=0, lr=1e-2, seed=0), progress=False, refit=False)
    report = run_training(req, log=lambda _m: None)
    report["out"] = out
    _add_cls_to_cache(req, out / "cache", digits_lists)
    return report


def _add_cls_to_cache(req, cache_root: Path, lists: dict[str, Path]) -> None:
    """The shared cache also holds what `train` as typed needs (mist + its cls-token extension: final_cls), so tests
    that pass `--cache-dir` to the CLI hit it (one extra tiny backbone pass, here, once per session)."""
    from mist_kit.backbone import load_backbone
    from mist_kit.data import load_image_list
    from mist_kit.edge import get_edge_method
    from mist_kit.featurize import cache_features
    from mist_kit.runtime.plan import union_sources

    model, spec = load_backbone(req.backbone, img_size=req.img_size, weights=req.weights)
    sources = union_sources(get_edge_method("mist").default_candidate_plans(spec.shape))
    for name in ("train", "val", "test"):
        cache_features(model, spec, load_image_list(str(lists[name])), cache_root, sources, progress=False,
                       log=lambda _m: None)


def _export(tmp_path_factory: pytest.TempPathFactory, checkpoint: str, name: str, **options) -> Path:
    from mist_kit.exporters.export import export_bundle

    out = tmp_path_factory.mktemp(name) / "bundle"
    report = export_bundle(checkpoint, out, log=lambda _m: None, **options)
    assert report.ok, report.problems
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: dict) -> Path:
    """The tiny checkpoint exported with every default (int8 edge.onnx, auto recipe, int8-channel codec)."""
    return _export(tmp_path_factory, tiny_checkpoint["checkpoint"], "tiny_bundle")


@pytest.fixture(scope="session")
def tiny_bundle_fp32(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: dict) -> Path:
    """The same export with codec fp32: cloud.onnx emits the plain gather, edge.onnx is the bare int8 core."""
    return _export(tmp_path_factory, tiny_checkpoint["checkpoint"], "tiny_bundle_fp32", codec="fp32")
