"""Thread cap and `devices tune`: a profile's threads never exceed the usable cores; the tuned graph is recorded
beside the bundle (never inside it), honoured by EdgeSession, and ignored once stale."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mist_kit.devices import get_device
from mist_kit.devices.caps import capped_threads, device_caps, usable_cores


def test_threads_are_capped_at_usable_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    assert capped_threads(4, cores=2)[0] == 2 and "capped at 2" in capped_threads(4, cores=2)[1]
    assert capped_threads(2, cores=2) == (2, "")
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {3})  # e.g. `taskset -c 3`
    assert usable_cores() == 1
    with device_caps(get_device("rpi4"), apply_cap=False) as emu:  # rpi4 asks for 4 threads
        assert emu.threads == 1 and "1 threads" in emu.note()


def test_edge_session_caps_threads_and_says_so(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mist_kit.runtime.bundle import open_edge_bundle
    from mist_kit.runtime.edge_session import EdgeSession, SessionSettings

    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0})
    session = EdgeSession(open_edge_bundle(tiny_bundle), SessionSettings(threads=3))
    info = session.describe()
    assert session.threads == 1 and info["threads"] == 1 and "profile asks 3" in info["threads_note"]
    assert info["disabled_optimizers"] == ["SkipLayerNormFusion"]


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    return out


def test_tune_records_the_fastest_passing_graph_beside_the_bundle(bundle_copy: Path) -> None:
    from mist_kit.devices.tune import tune, tune_path

    before = sorted(p.name for p in bundle_copy.iterdir())
    report = tune(bundle_copy, get_device("generic-x86"), rounds=2, rows=4)
    assert sorted(p.name for p in bundle_copy.iterdir()) == before  # nothing written into the hashed bundle
    rec = json.loads(tune_path(bundle_copy).read_text())["devices"]["generic-x86"]
    assert set(rec["ms_per_image"]) >= {"int8", "fp32"} and rec["agreement"]["fp32"] == 1.0
    passing = {v: t for v, t in rec["ms_per_image"].items() if rec["agreement"][v] >= rec["min_agreement"]}
    assert rec["variant"] == report["chosen"] == min(passing, key=passing.__getitem__)
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    assert rec["sha256"] == manifest["files"][rec["file"]]["sha256"]


def _record(bundle: Path, variant: str, sha256: str, device: str = "generic-x86") -> None:
    from mist_kit.devices.tune import TUNE_FORMAT, tune_path

    file = {"fp32": "edge.fp32.onnx", "int8": "edge.onnx"}[variant]
    rec = {"variant": variant, "file": file, "sha256": sha256, "ms_per_image": {"int8": 2.0, "fp32": 1.0}}
    tune_path(bundle).write_text(json.dumps({"format": TUNE_FORMAT, "devices": {device: rec}}))


def test_edge_session_honours_the_tuned_choice_and_ignores_a_stale_one(bundle_copy: Path) -> None:
    from mist_kit.runtime.bundle import open_edge_bundle
    from mist_kit.runtime.edge_session import EdgeSession, SessionSettings

    profile = get_device("generic-x86")
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    fp32_sha = manifest["files"]["edge.fp32.onnx"]["sha256"]
    _record(bundle_copy, "fp32", fp32_sha)
    session = EdgeSession(open_edge_bundle(bundle_copy), SessionSettings.from_profile(profile))
    assert session.bundle.edge_path.name == "edge.fp32.onnx" and not session.per_row
    assert "devices tune chose edge.fp32.onnx for generic-x86" in session.describe()["tune_note"]
    # the swapped-in graph really runs: its embeddings equal the fp32 reference session's
    ref = EdgeSession(open_edge_bundle(bundle_copy, variant="fp32"), SessionSettings(use_tune=False))
    x = {i["name"]: np.random.default_rng(0).integers(0, 255, [2, *i["shape"][1:]]).astype(i["dtype"])
         for i in manifest["edge"]["inputs"]}
    np.testing.assert_array_equal(session.embed(x), ref.embed(x))
    # another device's record, a stale sha256 or use_tune=False: the default graph runs
    cases = (("rpi4", fp32_sha, True), ("generic-x86", "0" * 64, True), ("generic-x86", fp32_sha, False))
    for device, sha, use in cases:
        _record(bundle_copy, "fp32", sha, device)
        s = EdgeSession(open_edge_bundle(bundle_copy), SessionSettings(device="generic-x86", use_tune=use))
        assert s.bundle.edge_path.name == "edge.onnx" and "tune_note" not in s.describe()


def test_cli_tune_json_and_corrupt_record(bundle_copy: Path) -> None:
    from mist_kit.cli.app import app
    from mist_kit.devices.tune import tune_path

    runner = CliRunner()
    res = runner.invoke(app, ["devices", "tune", str(bundle_copy), "--device", "generic-x86", "--rounds", "1",
                              "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["chosen"] in ("int8", "fp32")
    tune_path(bundle_copy).write_text("{not json")
    res = runner.invoke(app, ["devices", "tune", str(bundle_copy), "--device", "generic-x86", "--rounds", "1"])
    assert res.exit_code == 2 and "tune.json" in res.output and "Traceback" not in res.output


def test_manifest_records_each_nodes_int8_decision(tiny_bundle: Path) -> None:
    import onnx

    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    q = manifest["edge"]["quantization"]
    fp32 = onnx.load(str(tiny_bundle / manifest["edge"]["reference"]))
    matmuls = {n.name for n in fp32.graph.node if n.op_type in q["op_types"]}  # the codec decoder has none
    recorded = {n["node"]: n for n in q["nodes"]}
    assert set(recorded) == matmuls and all(n["why"] for n in recorded.values())
    int8 = sorted(n for n, d in recorded.items() if d["int8"])
    assert int8 and (q["quantized_nodes"] is None or sorted(q["quantized_nodes"]) == int8)


def test_tune_gates_on_many_feature_rows_not_the_timing_rows(bundle_copy: Path, tmp_path: Path) -> None:
    """With --features, agreement is measured on up to `agreement_rows` rows of the file (read in chunks), not on
    the handful of timing rows, where one flipped prediction fails a 0.99 gate."""
    from mist_kit.devices.tune import tune
    from mist_kit.runtime.bundle import open_edge_bundle
    from mist_kit.runtime.edge_session import EdgeSession, SessionSettings
    from mist_kit.runtime.features_file import read_features, write_features

    man = open_edge_bundle(bundle_copy).manifest
    rng = np.random.default_rng(11)
    n = 41
    tensors = {}
    for out in man["cloud"]["outputs"]:
        shape, dtype = (n, *[int(d) for d in out["shape"][1:]]), np.dtype(out["dtype"])
        tensors[out["name"]] = (rng.standard_normal(shape).astype(dtype) if dtype.kind == "f"
                                else rng.integers(-100, 101, shape).astype(dtype))
    path = write_features(tmp_path / "f.safetensors", man, tensors, [f"s{i}" for i in range(n)],
                          np.zeros(n, np.int64))
    report = tune(bundle_copy, get_device("generic-x86"), features=path, rounds=1, rows=4, agreement_rows=37)
    assert report["agreement_rows"] == 37 and report["agreement_source"] == "features"
    data = read_features(path, man).read(0, 37)
    argmax = {}
    for variant in ("int8", "fp32"):
        s = EdgeSession(open_edge_bundle(bundle_copy, variant=variant), SessionSettings(threads=1, use_tune=False))
        argmax[variant] = np.array([s.logits({k: v[i:i + 1] for k, v in data.items()}).argmax() for i in range(37)])
    assert report["agreement"]["int8"] == pytest.approx(float(np.mean(argmax["int8"] == argmax["fp32"])))
    assert report["agreement"]["fp32"] == 1.0
    assert tune(bundle_copy, get_device("generic-x86"), features=path, rounds=1, rows=4)["agreement_rows"] == n
