"""The cloud-plan contract end to end on a method that sends two tensors (block 1's output and the gather of
blocks 0..k), with parity checked at each step: train -> export -> extract -> run-edge -> finetune-edge ->
serve-cloud. Also: plans round-trip through the manifest, `devices check` reports the MACs the method computes on a
pooled codec, and a format-1 bundle is refused with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from edge_path import check_device_path
from two_tensor_method import NAME
from typer.testing import CliRunner

from mist_kit.cli.app import app
from mist_kit.errors import BundleError
from mist_kit.runtime.plan import FINAL_CLS, BackboneShape, CloudPlan, TensorSource, block, gather

runner = CliRunner()


@pytest.fixture(scope="module")
def two_tensor_run(tiny_checkpoint: dict, digits_lists: dict, tiny_weights: Path, tmp_path_factory) -> dict:
    """Train the two-tensor method from the session's cache (k searched over 2, 3) with the int8-channel codec on
    both tensors, then export it with an int8 edge graph."""
    from mist_kit.exporters.export import export_bundle
    from mist_kit.pipeline import TrainRequest, run_training
    from mist_kit.train import TrainParams

    out = tmp_path_factory.mktemp("two_tensor")
    req = TrainRequest(backbone="test_vit", weights=str(tiny_weights), img_size=32, train=str(digits_lists["train"]),
                       val=str(digits_lists["val"]), test=str(digits_lists["test"]), out=out, method=NAME,
                       params=TrainParams(epochs=6, min_steps=0, lr=1e-2, seed=0), progress=False,
                       cache_dir=Path(tiny_checkpoint["out"]) / "cache", refit=False)
    report = run_training(req, log=lambda _m: None, codec={"name": "int8-channel"})
    export = export_bundle(report["checkpoint"], out / "bundle", log=lambda _m: None)
    assert export.ok, export.problems
    return {"report": report, "export": export, "bundle": out / "bundle", "out": out}


def test_training_searches_the_methods_depths_and_learns(two_tensor_run: dict) -> None:
    r = two_tensor_run["report"]
    assert r["method"] == NAME and set(r["k_search"]) == {"2", "3"} and r["k"] in (2, 3)
    assert r["test_top1"] > 0.3  # 10 classes: chance is 0.1
    assert r["bytes_per_image"] == 2 * 5 * 64  # two int8 [5, 64] tensors
    assert r["edge"]["macs_per_image"] == 2 * 64 * 16 + 16 * 10


def test_bundle_declares_the_plan_and_every_tensor_has_its_codec(two_tensor_run: dict) -> None:
    from mist_kit.runtime.manifest import manifest_plan, open_bundle

    manifest = open_bundle(two_tensor_run["bundle"])
    k = two_tensor_run["report"]["k"]
    plan = manifest_plan(manifest)
    assert [(t.name, str(t.source)) for t in plan.tensors] == [("z1", "block:1"), ("g", f"gather:{k}")]
    assert manifest["cloud"]["plan"]["blocks"] == k
    assert [o["name"] for o in manifest["cloud"]["outputs"]] == ["z1_q", "g_q"]
    assert [i["name"] for i in manifest["edge"]["inputs"]] == ["z1_q", "g_q"]
    codecs = [t["codec"] for t in manifest["cloud"]["plan"]["tensors"]]
    assert all(c["name"] == "int8-channel" for c in codecs) and codecs[0]["scale"] != codecs[1]["scale"]
    assert manifest["edge"]["macs_per_image"] == two_tensor_run["report"]["edge"]["macs_per_image"]
    assert two_tensor_run["export"].quantization is not None  # the edge graph's two MatMuls went int8
    assert manifest["parity"]["edge_top1_agreement"] >= 0.99


def test_bundle_chain_equals_torch_on_both_tensors(two_tensor_run: dict, digits_lists: dict) -> None:
    """cloud.onnx -> edge.fp32.onnx -> head against the torch cloud module -> codec round trips -> torch method."""
    from mist_kit.backbone import load_backbone_for
    from mist_kit.backbone_run import CloudModule
    from mist_kit.checkpoint import load_checkpoint
    from mist_kit.data import load_image_list, load_pixels
    from mist_kit.exporters.verify import run_chain, torch_logits
    from mist_kit.runtime.codec.plan_codecs import plan_codecs, roundtrips
    from mist_kit.runtime.manifest import open_bundle

    config, method = load_checkpoint(two_tensor_run["report"]["checkpoint"])
    cloud = CloudModule(load_backbone_for(config.backbone), method.plan).eval()
    images = load_image_list(digits_lists["test"])
    px = np.stack([load_pixels(p, 32, config.backbone.mean, config.backbone.std) for p in images.paths[:64]])
    transforms = roundtrips(plan_codecs(method.plan, config.codecs, 1))
    ref = torch_logits(cloud, method, px.astype(np.float32), transforms)
    manifest = open_bundle(two_tensor_run["bundle"])
    got = run_chain(two_tensor_run["bundle"], manifest, px.astype(np.float32), "reference")
    np.testing.assert_allclose(got, ref, atol=1e-3)
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_extract_run_edge_finetune_on_two_tensors(two_tensor_run: dict, digits_lists: dict, tmp_path: Path) -> None:
    from mist_kit.runtime.features_file import read_features

    _, feats = check_device_path(two_tensor_run["bundle"], digits_lists, two_tensor_run["report"]["test_top1"],
                                 tmp_path)
    assert {t.name for t in read_features(feats["test"]).tensors} == {"z1_q", "g_q"}


def test_serve_cloud_sends_both_tensors(two_tensor_run: dict, digits_lists: dict) -> None:
    from mist_kit.data import load_image_list
    from mist_kit.runtime.v2_server import serve_roundtrip

    paths = list(load_image_list(digits_lists["test"]).paths[:8])
    feats, report = serve_roundtrip(two_tensor_run["bundle"], paths, batch=4)
    assert set(feats) == {"z1_q", "g_q"} and report["max_abs_diff_vs_in_process"] == 0.0
    assert report["wire_bytes_per_image"] == 2 * 5 * 64


def test_devices_check_uses_the_methods_own_macs_on_a_pooled_codec(tiny_checkpoint: dict, digits_lists: dict,
                                                                   tiny_weights: Path, tmp_path: Path) -> None:
    """pool2-int4 sends 2 tokens (cls + one pooled cell) where the backbone has 5: the budget counts the edge
    network on what it receives (hand count below), not on the backbone's [T, D]."""
    from mist_kit.calibration.modes import Precision
    from mist_kit.exporters.export import export_bundle
    from mist_kit.pipeline import TrainRequest, run_training
    from mist_kit.train import TrainParams

    req = TrainRequest(backbone="test_vit", weights=str(tiny_weights), img_size=32, train=str(digits_lists["train"]),
                       val=str(digits_lists["val"]), out=tmp_path / "p", k=2,
                       params=TrainParams(epochs=1, min_steps=0, lr=1e-2, seed=0), progress=False,
                       cache_dir=Path(tiny_checkpoint["out"]) / "cache", refit=False)
    report = run_training(req, log=lambda _m: None, codec={"name": "pool2-int4"})
    assert export_bundle(report["checkpoint"], tmp_path / "b", quantize=Precision.NONE, log=lambda _m: None).ok
    res = runner.invoke(app, ["devices", "check", str(tmp_path / "b"), "--device", "rpi4", "--json"])
    assert res.exit_code == 0, res.stderr
    t, d, r, c, q = 2, 64, 16, 10, 1  # the last block answers the cls row only (q = 1)
    full = 3 * t * d * r + 2 * t * t * r + t * r * d
    last = 2 * t * d * r + q * d * r + 2 * q * t * r + q * r * d
    hand = 3 * full + last + d * c
    assert json.loads(res.stdout)["edge_macs_per_image"] == hand


def test_format_1_bundle_is_refused_in_one_line(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "old"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["schema"] = "mist-kit/bundle/1"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    (bundle / "manifest.sha256").unlink()  # format 1 had no manifest digest
    from mist_kit.runtime.manifest import read_manifest

    with pytest.raises(BundleError, match="re-export it") as info:
        read_manifest(bundle)
    assert "\n" not in str(info.value)
    res = runner.invoke(app, ["devices", "check", str(bundle), "--device", "rpi4"])
    assert res.exit_code == 2 and "re-export" in res.stderr and "Traceback" not in res.output


def test_plan_round_trips_and_rejects_bad_fields() -> None:
    shape = BackboneShape(64, 5, 1, 6)
    plan = CloudPlan.build(shape, [("a", block(0)), ("b", gather(3)), ("c", FINAL_CLS)])
    assert plan.blocks == 6 and plan.fp32_bytes == 4 * (5 * 64 * 2 + 64)
    assert CloudPlan.from_dict(plan.to_dict()) == plan
    assert TensorSource.parse("normed:11") == TensorSource("normed", 11)
    bad = plan.to_dict()
    bad["tensors"][1]["source"] = "gather:x"
    with pytest.raises(BundleError, match=r"cloud.plan.tensors\[1\]: tensor source 'gather:x'"):
        CloudPlan.from_dict(bad)
    bad = plan.to_dict()
    bad["blocks"] = 2
    with pytest.raises(BundleError, match="disagrees"):
        CloudPlan.from_dict(bad)
    with pytest.raises(ValueError, match="unique"):
        CloudPlan.build(shape, [("a", block(0)), ("a", block(1))])


def test_one_backbone_pass_serves_every_candidate_of_two_methods(tiny_checkpoint: dict, digits_lists: dict,
                                                                 tiny_weights: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """mist's ks and the two-tensor method's tensors come from one cache: after it holds their union, training
    either method runs no backbone pass at all (counted)."""
    import mist_kit.featurize as featurize
    from mist_kit.pipeline import TrainRequest, run_training
    from mist_kit.train import TrainParams

    passes: list[int] = []
    real = featurize.run_backbone
    monkeypatch.setattr(featurize, "run_backbone", lambda m, p, *a: (passes.append(len(p)), real(m, p, *a))[1])
    base = {"backbone": "test_vit", "weights": str(tiny_weights), "img_size": 32, "train": str(digits_lists["train"]),
            "val": str(digits_lists["val"]), "params": TrainParams(epochs=1, min_steps=0, lr=1e-2), "progress": False,
            "refit": False,
            "cache_dir": tmp_path / "cache"}
    run_training(TrainRequest(**base, out=tmp_path / "a", method=NAME), log=lambda _m: None)
    first = sum(passes)
    assert first == 1000  # train + val, once each
    passes.clear()
    run_training(TrainRequest(**base, out=tmp_path / "b", method="mist", ks=(2, 3)), log=lambda _m: None)
    run_training(TrainRequest(**base, out=tmp_path / "c", method=NAME, k=3), log=lambda _m: None)
    assert passes == []


def test_multi_input_edge_graph_exports_with_dynamo_not_the_fallback() -> None:
    """`_Embed.forward(*tensors)` is one varargs parameter to torch.export: its dynamic shapes must be nested, or
    dynamo fails and the TorchScript fallback silently writes a larger graph."""
    pytest.importorskip("onnxscript")
    from mist_kit.edge import create_edge_method
    from mist_kit.exporters.edge_onnx import _Embed
    from mist_kit.exporters.onnx_utils import export_dynamic_batch

    method = create_edge_method(NAME, backbone=BackboneShape(64, 5, 1, 6), depth=2, num_classes=10, seed=0).eval()
    module = _Embed(method)
    import torch

    examples = tuple(torch.zeros(2, *shape) for shape in method.input_shapes.values())
    model, exporter = export_dynamic_batch(module, examples, module.names, ["embedding"], 18, "edge graph")
    assert exporter == "dynamo"
    assert [i.name for i in model.graph.input] == ["z1", "g"]
