"""`export --tflite`: int8 edge.tflite via litert-torch PT2E, validated with ai-edge-litert; one line without the extra.

The conversion tests need the `tflite` extra (litert-torch, ai-edge-litert), which the main environment does not
carry (it downgrades typing_extensions/pydantic): they skip there and run in `make tflite-env`'s environment.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mist_kit.cli.app import app

HAVE_EXTRA = all(importlib.util.find_spec(m) is not None for m in ("litert_torch", "ai_edge_litert"))
needs_extra = pytest.mark.skipif(not HAVE_EXTRA, reason="tflite extra (litert-torch, ai-edge-litert) not installed")


def _old_bundle(tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text('{"old": true}')
    return out


@pytest.mark.skipif(HAVE_EXTRA, reason="the tflite extra is installed here")
def test_missing_extra_is_one_line_and_writes_nothing(tiny_checkpoint: dict, tmp_path: Path) -> None:
    out = _old_bundle(tmp_path)
    result = CliRunner().invoke(app, ["export", str(tiny_checkpoint["checkpoint"]), "--out", str(out), "--tflite"])
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --tflite needs litert-torch"), result.output
    assert "pip install 'mist-kit[tflite]'" in lines[0]
    assert json.loads((out / "manifest.json").read_text()) == {"old": True}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".bundle.")]


@pytest.fixture(scope="module")
def tflite_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: dict) -> tuple[Path, dict]:
    """The tiny checkpoint exported with --tflite (codec fp32: the bare core) through the CLI, with --json."""
    out = tmp_path_factory.mktemp("tflite") / "bundle"
    result = CliRunner().invoke(app, ["export", str(tiny_checkpoint["checkpoint"]), "--out", str(out), "--tflite",
                                      "--codec", "fp32", "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


@needs_extra
def test_tflite_bundle_is_int8_validated_and_listed(tflite_bundle: tuple[Path, dict]) -> None:
    from mist_kit.runtime.manifest import sha256_file

    out, report = tflite_bundle
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["edge"]["tflite"] == "edge.tflite"
    entry = manifest["files"]["edge.tflite"]
    assert entry["sha256"] == sha256_file(out / "edge.tflite")
    assert entry["bytes"] == (out / "edge.tflite").stat().st_size
    t = report["tflite"]
    assert t["problems"] == [] and t["passed"] and t["agreement"] >= t["min_agreement"]
    assert t["int8_ops"].get("FULLY_CONNECTED", 0) > 0, t["ops"]  # the LAE projections really run in int8
    assert t["bytes"] == entry["bytes"] and t["n_eval"] > 0 and t["batch"] == 1
    assert t["input_dtype"] == "float32" and t["versions"]["litert-torch"] != "?"


@needs_extra
def test_edge_session_runs_tflite_like_onnx(tflite_bundle: tuple[Path, dict]) -> None:
    """The runtime's LiteRT backend loads the written file; its predictions match the int8 edge.onnx's."""
    from mist_kit.runtime.bundle import open_edge_bundle
    from mist_kit.runtime.edge_session import EdgeSession, SessionSettings

    out, _ = tflite_bundle
    bundle = open_edge_bundle(out, variant="tflite")
    lite = EdgeSession(bundle, SessionSettings(backend="litert"))
    assert lite.backend == "litert" and lite.bundle.edge_path.name == "edge.tflite"
    ort = EdgeSession(open_edge_bundle(out), SessionSettings())
    shape = bundle.inputs[0]["shape"][1:]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, *shape)).astype(np.float32)
    name = bundle.inputs[0]["name"]
    lite_pred = np.concatenate([lite.logits({name: x[i:i + 1]}) for i in range(len(x))]).argmax(1)  # batch 1
    np.testing.assert_array_equal(lite.logits({name: x}).argmax(1), lite_pred)  # a batch-1 graph takes batches
    ort_pred = ort.logits({name: x}).argmax(1)
    assert (lite_pred == ort_pred).mean() >= 0.75


@needs_extra
def test_agreement_gate_fails_export_and_writes_nothing(tiny_checkpoint: dict, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Below --min-agreement the export fails (exit 1), names edge.tflite, and leaves the old bundle alone."""
    from mist_kit.exporters import tflite

    real = tflite.validate

    def harsh(*args, **kwargs):
        report = real(*args, **kwargs)
        report["agreement"] = 0.5  # as if int8 LiteRT lost half the predictions
        report["problems"].append(f"edge.tflite int8 top-1 agreement 0.5000 < --min-agreement {args[7]}")
        return report

    monkeypatch.setattr(tflite, "validate", harsh)
    out = _old_bundle(tmp_path)
    result = CliRunner().invoke(app, ["export", str(tiny_checkpoint["checkpoint"]), "--out", str(out), "--tflite",
                                      "--codec", "fp32"])
    assert result.exit_code != 0, result.output
    assert "edge.tflite int8 top-1 agreement" in result.output
    assert json.loads((out / "manifest.json").read_text()) == {"old": True}


@needs_extra
def test_static_activations_refused_by_the_gate_fall_back_to_dynamic(tiny_checkpoint: dict, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The first recipe (static int8 activations) failing the gate is not the end: dynamic activations are tried,
    and the report says which one shipped and what the other measured."""
    from mist_kit.exporters import tflite

    real, calls = tflite.validate, []

    def static_fails(*args, **kwargs):
        report = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            report["problems"].append("edge.tflite int8 top-1 agreement 0.9000 < --min-agreement 0.99")
        return report

    monkeypatch.setattr(tflite, "validate", static_fails)
    out = tmp_path / "bundle"
    result = CliRunner().invoke(app, ["export", str(tiny_checkpoint["checkpoint"]), "--out", str(out), "--tflite",
                                      "--codec", "fp32", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["tflite"]
    assert report["activations"] == "dynamic" and len(calls) == 2
    assert [t["activations"] for t in report["tried"]] == ["static"] and report["tried"][0]["problems"]
    assert (out / "edge.tflite").is_file()


@needs_extra
def test_int8_codec_decoder_is_in_the_graph(tiny_checkpoint: dict, tmp_path: Path) -> None:
    """With the int8-channel codec edge.tflite takes the int8 codes the cloud graph sends, like edge.onnx."""
    from mist_kit.exporters.export import export_bundle

    out = tmp_path / "bundle"
    report = export_bundle(tiny_checkpoint["checkpoint"], out, log=lambda _m: None, tflite=True,
                           codec="int8-channel")
    assert report.ok, report.problems
    assert report.tflite is not None and report.tflite["input_dtype"] == "int8" and report.tflite["passed"]
    assert "edge.tflite" in report.manifest["files"]


@needs_extra
def test_unsupported_codec_is_a_usage_error(tiny_checkpoint: dict, tmp_path: Path) -> None:
    out = _old_bundle(tmp_path)
    result = CliRunner().invoke(app, ["export", str(tiny_checkpoint["checkpoint"]), "--out", str(out), "--tflite",
                                      "--codec", "int8-token"])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip() and ln.startswith("error:")]
    assert len(lines) == 1 and "--tflite" in lines[0] and "int8-token" in lines[0], result.output
    assert json.loads((out / "manifest.json").read_text()) == {"old": True}


@needs_extra
def test_vitsplit_lite_exports_to_tflite_and_agrees(tiny_checkpoint: dict, digits_lists: dict, tiny_weights: Path,
                                                    tmp_path: Path) -> None:
    """The copied ViT block (softmax attention, GELU MLP, cls-only query) converts and passes the same gate."""
    from mist_kit.pipeline import TrainRequest, run_training
    from mist_kit.runtime.bundle import open_edge_bundle
    from mist_kit.runtime.edge_session import EdgeSession, SessionSettings
    from mist_kit.train import TrainParams

    req = TrainRequest(backbone="test_vit", weights=str(tiny_weights), img_size=32, train=str(digits_lists["train"]),
                       val=str(digits_lists["val"]), out=tmp_path / "run", method="vitsplit-lite",
                       params=TrainParams(epochs=2, min_steps=0, seed=0), progress=False, refit=False,
                       cache_dir=Path(tiny_checkpoint["out"]) / "cache")
    report = run_training(req, log=lambda _m: None, codec={"name": "fp32"})
    out = tmp_path / "bundle"
    result = CliRunner().invoke(app, ["export", report["checkpoint"], "--out", str(out), "--tflite", "--codec", "fp32",
                                      "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"]["name"] == "vitsplit-lite" and manifest["edge"]["tflite"] == "edge.tflite"
    tfl = json.loads(result.stdout)["tflite"]
    assert tfl["passed"] and tfl["agreement"] >= 0.99 and tfl["int8_ops"], tfl
    lite = EdgeSession(open_edge_bundle(out, variant="tflite"), SessionSettings(backend="litert"))
    ort = EdgeSession(open_edge_bundle(out), SessionSettings())
    name = lite.bundle.inputs[0]["name"]
    x = np.random.default_rng(0).standard_normal((8, *lite.bundle.inputs[0]["shape"][1:])).astype(np.float32)
    lite_pred = np.concatenate([lite.logits({name: x[i:i + 1]}) for i in range(len(x))]).argmax(1)
    assert (lite_pred == ort.logits({name: x}).argmax(1)).mean() >= 0.75
