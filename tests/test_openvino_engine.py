"""OpenVINO as the cloud engine: parity with torch / onnxruntime on the tiny test_vit, serve-cloud and train.

Every test that runs OpenVINO is skipped cleanly when it is not installed; the bad-choice and Triton-config tests
need no openvino. References are independent: torch fp32 `run_backbone`, and onnxruntime on the same cloud.onnx.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mist_kit.cli.app import app
from mist_kit.errors import UsageError
from mist_kit.runtime.plan import TensorSource

TINY = "test_vit"
IMG = 32
SOURCES = [TensorSource.parse(s) for s in ("gather:2", "gather:6", "final_cls")]


def _bf16() -> bool:
    from mist_kit.runtime.cloud_engine import cpu_bf16_supported

    return cpu_bf16_supported()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


@pytest.fixture(scope="module")
def vit(tiny_weights: Path):
    from mist_kit.backbone import load_backbone

    model, _spec = load_backbone(TINY, img_size=IMG, weights=str(tiny_weights))
    return model.eval()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(3).standard_normal((5, 3, IMG, IMG), dtype=np.float32))


@pytest.fixture(scope="module")
def reference(vit, pixels) -> dict[str, np.ndarray]:
    from mist_kit.backbone_run import run_backbone

    return {k: v.numpy() for k, v in run_backbone(vit, pixels, SOURCES, "fp32").items()}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_openvino_backbone_matches_torch(vit, pixels, reference, precision) -> None:
    pytest.importorskip("openvino")
    if precision == "bf16" and not _bf16():
        pytest.skip("this CPU has no native bf16 in OpenVINO's CPU plugin")
    from mist_kit.cloud_engines import backbone_runner

    got = backbone_runner(vit, SOURCES, precision, "openvino", IMG)(pixels)
    tol = 1e-5 if precision == "fp32" else 3e-2
    for key, ref in reference.items():
        out = got[key].numpy()
        assert out.shape == ref.shape and out.dtype == np.float32
        assert _rel(out, ref) < tol, (key, _rel(out, ref))
    if precision == "bf16":  # bf16 really ran: not bit-equal to fp32
        assert max(_rel(got[k].numpy(), r) for k, r in reference.items()) > 1e-5


def test_cloud_onnx_openvino_equals_onnxruntime(tiny_bundle_fp32: Path) -> None:
    pytest.importorskip("openvino")
    from mist_kit.runtime.cloud_engine import open_cloud_session

    rng = np.random.default_rng(1)
    px = rng.standard_normal((3, 3, IMG, IMG), dtype=np.float32)
    ort, ort_info = open_cloud_session(tiny_bundle_fp32 / "cloud.onnx", 1, "onnxruntime", "fp32")
    ov, ov_info = open_cloud_session(tiny_bundle_fp32 / "cloud.onnx", 1, "openvino", "fp32")
    assert (ort_info.engine, ov_info.engine, ov_info.precision) == ("onnxruntime", "openvino", "fp32")
    names = [o.name for o in ort.get_outputs()]
    assert [(p.name, p.type) for p in ov.get_outputs()] == [(p.name, p.type) for p in ort.get_outputs()]
    want = ort.run(names, {"pixel_values": px})
    got = ov.run(names, {"pixel_values": px})
    for w, g in zip(want, got, strict=True):
        assert g.shape == w.shape and _rel(g, w) < 1e-5


def test_serve_cloud_openvino_answers_like_onnxruntime(tiny_bundle: Path) -> None:
    pytest.importorskip("openvino")
    pytest.importorskip("fastapi")
    import io

    from PIL import Image

    from mist_kit.runtime.manifest import open_bundle
    from mist_kit.runtime.v2_client import fetch_features
    from mist_kit.runtime.v2_model import CloudModel, ServeConfig
    from mist_kit.runtime.v2_server import serve_in_thread

    rng = np.random.default_rng(2)
    images = []
    for _ in range(3):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
        images.append(buf.getvalue())
    manifest = open_bundle(tiny_bundle)
    got = {}
    for engine in ("onnxruntime", "openvino"):
        model = CloudModel(tiny_bundle, ServeConfig(threads=1, engine=engine))
        with serve_in_thread(model=model) as url:
            got[engine] = fetch_features(url, images, manifest, send="image")
        if engine == "openvino":
            meta = model.metadata()["parameters"]["engine"]
            assert (meta["engine"], meta["precision"]) == ("openvino", "fp32")
            assert meta["parity"]["reference"] == "onnxruntime fp32" and "openvino" in model.engine_line()
            # the tiny bundle's cloud graph ends in the int8-channel codec: a code may move one step at an edge
            assert all(v < 1e-2 for v in meta["parity"]["rel_err"].values()), meta
        else:
            assert model.parity is None and model.metadata()["parameters"]["engine"]["engine"] == "onnxruntime"
    assert got["openvino"].keys() == got["onnxruntime"].keys()
    for name, want in got["onnxruntime"].items():
        g = got["openvino"][name]
        assert g.shape == want.shape and g.dtype == want.dtype
        diff = np.abs(g.astype(np.float64) - want.astype(np.float64))
        assert _rel(g.astype(np.float32), want.astype(np.float32)) < 1e-2 and diff.max() <= 1 + 1e-3 * np.abs(
            want.astype(np.float64)).max(), name


def test_bad_engine_choices_are_one_line_exit_2(tiny_bundle: Path) -> None:
    from mist_kit.runtime.v2_model import ServeConfig

    with pytest.raises(UsageError, match="--engine 'tensorrt'"):
        ServeConfig(engine="tensorrt")
    with pytest.raises(UsageError, match="needs --engine openvino"):
        ServeConfig(engine="onnxruntime", precision="bf16")
    res = CliRunner().invoke(app, ["serve-cloud", str(tiny_bundle), "--engine", "nope"])
    assert res.exit_code == 2 and "--engine 'nope'" in res.output and "Traceback" not in res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.output


def test_bf16_refused_where_cpu_lacks_it(tiny_bundle: Path, monkeypatch) -> None:
    pytest.importorskip("openvino")
    from mist_kit.runtime import cloud_engine

    monkeypatch.setattr(cloud_engine, "cpu_bf16_supported", lambda core=None: False)
    res = CliRunner().invoke(app, ["serve-cloud", str(tiny_bundle), "--engine", "openvino", "--precision", "bf16"])
    assert res.exit_code == 2 and "has no native bf16" in res.output, res.output
    assert len([ln for ln in res.output.strip().splitlines() if ln.strip() and "serve-cloud:" not in ln]) == 1


def test_train_backbone_engine_openvino_fills_the_same_cache(tmp_path: Path, digits_lists, tiny_weights) -> None:
    pytest.importorskip("openvino")
    from mist_kit.cache import source_file
    from mist_kit.pipeline import TrainRequest, run_training
    from mist_kit.train import TrainParams

    reports = {}
    for engine in ("torch", "openvino"):
        req = TrainRequest(backbone=TINY, weights=str(tiny_weights), img_size=IMG, train=str(digits_lists["val"]),
                           val=str(digits_lists["val"]), out=tmp_path / engine, k=2, cache_dir=tmp_path / "cache",
                           params=TrainParams(epochs=2, lr=1e-2, seed=0), progress=False, backbone_engine=engine)
        reports[engine] = run_training(req, log=lambda _m: None)
    dirs = sorted(p for p in (tmp_path / "cache").iterdir() if p.is_dir())
    assert len(dirs) == 2 and any(d.name.endswith("-openvino-fp32") for d in dirs)  # kept apart
    ov_dir = next(d for d in dirs if d.name.endswith("-openvino-fp32"))
    pt_dir = next(d for d in dirs if not d.name.endswith("-openvino-fp32"))
    meta = json.loads((ov_dir / "meta.json").read_text())
    assert meta["binding"]["precision"] == "openvino-fp32"
    for src in meta["sources"]:
        a, b = np.load(ov_dir / source_file(src)), np.load(pt_dir / source_file(src))
        assert a.shape == b.shape and _rel(a.astype(np.float32), b.astype(np.float32)) < 1e-3
    par = reports["openvino"]["backbone_engine"]
    assert "backbone_engine" not in reports["torch"]
    assert par["engine"] == "openvino" and par["precision"] == "fp32" and par["max_rel_err"] < 1e-5
    assert par["edge_top1_agreement"] == 1.0 and par["images"] == 32


def test_train_refuses_bf16_openvino_where_cpu_lacks_it(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("openvino")
    from mist_kit.pipeline import TrainRequest
    from mist_kit.runtime import cloud_engine

    monkeypatch.setattr(cloud_engine, "cpu_bf16_supported", lambda core=None: False)
    with pytest.raises(UsageError, match="has no native bf16"):
        TrainRequest(backbone=TINY, train=str(tmp_path), val=None, out=tmp_path, k=2, backbone_engine="openvino",
                     backbone_precision="bf16")


def test_train_cli_rejects_unknown_backbone_engine(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["train", "--train", str(tmp_path), "--out", str(tmp_path / "o"),
                                   "--backbone-engine", "tensorrt"])
    assert res.exit_code == 2 and "tensorrt" in res.output


def test_triton_config_targets_openvino(tiny_bundle: Path) -> None:
    from mist_kit.exporters.deploy import triton_config
    from mist_kit.runtime.manifest import open_bundle

    m = open_bundle(tiny_bundle)
    ins, outs = m["cloud"]["inputs"], m["cloud"]["outputs"]
    for backend, bf16 in (("openvino", False), ("openvino-bf16", True)):
        cfg = _parse_pbtxt(triton_config(m["model_name"], ins, outs, backend=backend))
        assert cfg["backend"] == "openvino" and cfg["default_model_filename"] == "model.onnx"
        assert cfg["max_batch_size"] == "64" and cfg["name"] == m["model_name"]
        assert cfg["parameters"].get("HINT_BF16") == ("YES" if bf16 else None)
        assert cfg["parameters"]["PERFORMANCE_HINT"] == "LATENCY"
    ort = _parse_pbtxt(triton_config(m["model_name"], ins, outs))
    assert ort["backend"] == "onnxruntime" and "default_model_filename" not in ort and not ort["parameters"]
    with pytest.raises(UsageError, match="--triton-backend"):
        triton_config(m["model_name"], ins, outs, backend="tensorrt")


def test_export_writes_openvino_triton_repository(tmp_path: Path, tiny_checkpoint) -> None:
    from mist_kit.calibration.modes import Precision
    from mist_kit.exporters.export import ExportOptions, export_bundle

    with pytest.raises(UsageError, match="--triton-backend"):
        ExportOptions(triton_backend="bogus")
    out = tmp_path / "b"
    rep = export_bundle(tiny_checkpoint["checkpoint"], out, ExportOptions(quantize=Precision.NONE, codec="fp32",
                                                                         triton_backend="openvino"),
                        log=lambda _m: None)
    assert rep.ok, rep.problems
    (model_dir,) = (out / "deploy" / "triton").iterdir()
    cfg = _parse_pbtxt((model_dir / "config.pbtxt").read_text())
    assert cfg["backend"] == "openvino" and (model_dir / "1" / cfg["default_model_filename"]).is_file()


def test_run_edge_never_imports_openvino(tiny_bundle: Path, tmp_path: Path, digits_lists) -> None:
    from mist_kit.runtime.codec.extract import extract

    features = tmp_path / "f.safetensors"
    extract(tiny_bundle, digits_lists["val"], features, batch_size=64)
    code = ("import sys\nfrom mist_kit.cli.app import app\ntry:\n    app(sys.argv[1:], prog_name='mist-kit')\n"
            "except SystemExit as e:\n    c = e.code or 0\nprint('OV=' + str('openvino' in sys.modules), "
            "file=sys.stderr)\nsys.exit(c)\n")
    res = subprocess.run([sys.executable, "-c", code, "run-edge", "--device", "rpi4", "--bundle", str(tiny_bundle),
                          "--features", str(features), "--json"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ))
    assert res.returncode == 0, res.stderr
    assert "OV=False" in res.stderr


def _parse_pbtxt(text: str) -> dict:
    """The top-level scalar fields of a config.pbtxt, plus its parameters as {key: string_value}: enough to check
    what Triton reads, parsed independently of the writer (protobuf text format: `key: value`, # comments)."""
    import re

    lines = [ln.split("#", 1)[0] for ln in text.splitlines()]
    body = "\n".join(lines)
    out: dict = {}
    depth = 0
    for ln in lines:
        s = ln.strip()
        if depth == 0 and re.fullmatch(r"\w+:\s*.+", s):
            k, v = s.split(":", 1)
            out[k.strip()] = v.strip().strip('"')
        depth += s.count("{") + s.count("[") - s.count("}") - s.count("]")
    assert depth == 0, "unbalanced braces"
    out["parameters"] = dict(re.findall(r'key:\s*"(\w+)"\s*value:\s*\{\s*string_value:\s*"([^"]*)"\s*\}', body))
    return out
