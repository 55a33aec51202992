"""train --codec, codec list/bench, export with a codec and extract, on the tiny digits fixture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mist_kit.cli.app import app
from mist_kit.runtime.codec import create_codec, list_codecs
from mist_kit.runtime.codec.bench import ROW_KEYS

runner = CliRunner()


def _json(result) -> object:  # type: ignore[no-untyped-def]
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def codec_checkpoint(tiny_checkpoint: dict, digits_lists: dict, tiny_weights: Path,
                     tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A pool2-int4 checkpoint trained through run_training, reusing the tiny fixture's feature cache."""
    from mist_kit.pipeline import TrainRequest, run_training
    from mist_kit.train import TrainParams

    out = tmp_path_factory.mktemp("codec_run")
    req = TrainRequest(backbone="test_vit", weights=str(tiny_weights), img_size=32, train=str(digits_lists["train"]),
                       val=str(digits_lists["val"]), test=str(digits_lists["test"]), out=out, k=2,
                       params=TrainParams(epochs=4, min_steps=0, lr=1e-2, seed=0), progress=False,
                       cache_dir=Path(tiny_checkpoint["out"]) / "cache", refit=False)
    report = run_training(req, log=lambda _m: None, codec={"name": "pool2-int4"})
    report["out"] = out
    return report


def test_train_with_codec_records_it_and_trains_on_pooled_tokens(codec_checkpoint: dict) -> None:
    from mist_kit.checkpoint import load_checkpoint

    config, model = load_checkpoint(codec_checkpoint["checkpoint"])
    assert codec_checkpoint["codec"] == "pool2-int4"
    codec = config.codecs["gather"]
    assert codec["name"] == "pool2-int4" and codec["num_tokens"] == 2  # cls + 2x2 grid pooled to 1
    assert model.num_tokens == 2 and len(codec["scale"]) == config.backbone.embed_dim
    assert codec_checkpoint["test_top1"] > 0.3  # 10 classes: chance is 0.1



def test_train_with_cls_codec_trains_on_the_cls_token_alone(tiny_checkpoint: dict, digits_lists: dict,
                                                           tiny_weights: Path, tmp_path: Path) -> None:
    from mist_kit.calibration.codec_calib import fit_for_export
    from mist_kit.checkpoint import load_checkpoint
    from mist_kit.edge.lae import LowRankAttentionEdge
    from mist_kit.errors import UsageError
    from mist_kit.pipeline import TrainRequest, run_training
    from mist_kit.runtime.plan import BackboneShape
    from mist_kit.train import TrainParams

    req = TrainRequest(backbone="test_vit", weights=str(tiny_weights), img_size=32, train=str(digits_lists["train"]),
                       val=str(digits_lists["val"]), out=tmp_path / "cls", k=2,
                       params=TrainParams(epochs=2, min_steps=0, lr=1e-2, seed=0), progress=False,
                       cache_dir=Path(tiny_checkpoint["out"]) / "cache", refit=False)
    report = run_training(req, log=lambda _m: None, codec={"name": "cls-int8"})
    config, model = load_checkpoint(report["checkpoint"])
    codec = config.codecs["gather"]
    assert codec["name"] == "cls-int8" and codec["num_tokens"] == 1 and model.num_tokens == 1
    with pytest.raises(UsageError, match="retrain"):  # an fp32 checkpoint cannot be exported with it
        fit_for_export(config, "cls-int8")
    with pytest.raises(ValueError, match="pool='cls'"):  # nothing to average without patch tokens
        LowRankAttentionEdge(backbone=BackboneShape(8, 5, 1, 6), depth=2, inputs={"gather": (1, 8)}, num_classes=3,
                             pool="mean")
    from mist_kit.calibration.modes import Precision
    from mist_kit.exporters.export import export_bundle
    from mist_kit.runtime.manifest import read_manifest

    exported = export_bundle(report["checkpoint"], tmp_path / "bundle", quantize=Precision.NONE, log=lambda _m: None)
    assert exported.ok, exported.problems  # the exporter checks the graphs (codec fragments included) against torch
    assert read_manifest(tmp_path / "bundle")["cloud"]["plan"]["tensors"][0]["codec"]["name"] == "cls-int8"


def test_evaluate_applies_the_recorded_codec(codec_checkpoint: dict, digits_lists: dict) -> None:
    from mist_kit.pipeline import run_evaluation

    ev = run_evaluation(codec_checkpoint["checkpoint"], str(digits_lists["test"]), progress=False,
                        log=lambda _m: None)
    assert ev["top1"] == pytest.approx(codec_checkpoint["test_top1"])


def test_train_rejects_unknown_codec_before_any_work(tmp_path: Path) -> None:
    res = runner.invoke(app, ["train", "--train", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"),
                              "--k", "2", "--codec", "int3-magic"])
    assert res.exit_code == 2
    assert "unknown codec 'int3-magic'" in res.output and "Traceback" not in res.output


def test_codec_list_json_matches_registry() -> None:
    rows = _json(runner.invoke(app, ["codec", "list", "--json"]))
    assert [r["codec"] for r in rows] == list_codecs()
    byname = {r["codec"]: r for r in rows}
    assert byname["int8-channel"]["bytes_per_image_vit_s"] == 257 * 384
    assert byname["pool2-int4"]["bytes_per_image_vit_s"] == 65 * 384 // 2


def test_codec_bench_synthetic_json_and_plot(tmp_path: Path) -> None:
    png = tmp_path / "bench.png"
    rows = _json(runner.invoke(app, ["codec", "bench", "--codecs", "fp32,int8-channel,pool4-int4", "--json",
                                     "--plot", str(png)]))
    assert [r["codec"] for r in rows] == ["fp32", "int8-channel", "pool4-int4"]
    for r in rows:
        assert set(ROW_KEYS) <= set(r) and r["source"] == "synthetic" and r["top1"] is None
    assert rows[1]["ratio_vs_fp32"] == 4.0 and rows[2]["bytes_per_image"] == 17 * 384 // 2
    assert rows[0]["snr_db"] is None and rows[1]["snr_db"] > 20
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_codec_bench_bad_input_is_one_line() -> None:
    res = runner.invoke(app, ["codec", "bench", "--codecs", "fp32,nope"])
    assert res.exit_code == 2 and "unknown codec 'nope'" in res.output
    res = runner.invoke(app, ["codec", "bench", "--checkpoint", "x"])
    assert res.exit_code == 2 and "--data" in res.output


def test_codec_bench_with_checkpoint_measures_accuracy(codec_checkpoint: dict, digits_lists: dict) -> None:
    rows = _json(runner.invoke(app, ["codec", "bench", "--checkpoint", codec_checkpoint["checkpoint"], "--data",
                                     str(digits_lists["test"]), "--codecs", "fp32,int8-channel,pool2-int4",
                                     "--json"]))
    byname = {r["codec"]: r for r in rows}
    # the checkpoint was trained for pool2-int4, so every row uses an edge network retrained the same way
    assert all(r["retrained"] for r in rows) and byname["fp32"]["top1_delta"] == 0.0
    for r in rows:
        assert 0.0 <= r["agreement"] <= 1.0 and r["top1"] > 0.3 and r["jpeg_q90_bytes"] > 0
    assert byname["pool2-int4"]["bytes_per_image"] == 2 * 64 // 2


@pytest.fixture(scope="module")
def int8_bundle(tiny_checkpoint: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fp32-trained tiny checkpoint exported with --codec int8-channel (calibrated from its cache)."""
    from mist_kit.calibration.modes import Precision
    from mist_kit.exporters.export import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "b"
    report = export_bundle(tiny_checkpoint["checkpoint"], out, quantize=Precision.NONE, codec="int8-channel",
                           log=lambda _m: None)
    assert report.ok, report.problems
    return out


def test_export_with_codec_then_extract(int8_bundle: Path, tiny_checkpoint: dict, digits_lists: dict,
                                        tmp_path: Path) -> None:
    from mist_kit.runtime.features_file import read_features
    from mist_kit.runtime.manifest import read_manifest

    manifest = read_manifest(int8_bundle)
    assert manifest["cloud"]["plan"]["tensors"][0]["codec"]["name"] == "int8-channel"
    assert [o["name"] for o in manifest["cloud"]["outputs"]] == ["gather_q"]
    out = tmp_path / "f.safetensors"
    report = _json(runner.invoke(app, ["extract", str(int8_bundle), str(digits_lists["test"]), "--out", str(out),
                                       "--json"]))
    assert report["images"] == 797 and report["bytes_per_image"] == 5 * 64
    ff = read_features(out, manifest)
    assert ff.n == 797 and ff.has_labels and ff.tensors[0].dtype == "int8"
    codec = create_codec(manifest["cloud"]["plan"]["tensors"][0]["codec"])
    decoded = codec.decode(ff.read(0, 16))
    assert decoded.shape == (16, 5, 64) and np.all(np.isfinite(decoded))
    res = runner.invoke(app, ["extract", str(int8_bundle), str(tmp_path / "nothing"), "--out", str(out)])
    assert res.exit_code == 2 and "nothing" in res.output


def test_codec_bench_with_bundle(int8_bundle: Path, digits_lists: dict) -> None:
    rows = _json(runner.invoke(app, ["codec", "bench", "--bundle", str(int8_bundle), "--data",
                                     str(digits_lists["val"]), "--codecs", "fp32,int8-channel,pool2-int4",
                                     "--json"]))
    byname = {r["codec"]: r for r in rows}
    assert byname["fp32"]["top1_delta"] == 0.0 and byname["int8-channel"]["agreement"] > 0.9
    assert byname["pool2-int4"]["top1"] is None and "checkpoint" in byname["pool2-int4"]["note"]


def test_codec_bench_default_list_skips_codecs_the_features_cannot_take(int8_bundle: Path, digits_lists: dict):
    """D = 64 on the tiny model: pca128 cannot exist there. The default list skips it (saying so); naming it fails."""
    from mist_kit.runtime.codec import list_codecs

    rows = _json(runner.invoke(app, ["codec", "bench", "--bundle", str(int8_bundle), "--data",
                                     str(digits_lists["val"]), "--json"]))
    names = [r["codec"] for r in rows]
    assert "pca128-int8" not in names and "pca64-int8" in names and "fp32" in names
    assert names == [n for n in list_codecs() if n in names]  # registry order kept
    text = runner.invoke(app, ["codec", "bench", "--bundle", str(int8_bundle), "--data", str(digits_lists["val"])])
    assert text.exit_code == 0 and "pca128-int8: skipped" in text.output
    named = runner.invoke(app, ["codec", "bench", "--bundle", str(int8_bundle), "--data", str(digits_lists["val"]),
                                "--codecs", "pca128-int8"])
    assert named.exit_code == 2 and "PCA rank 128 exceeds D=64" in named.output
