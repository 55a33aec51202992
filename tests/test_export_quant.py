"""int8 recipes, streaming calibration data, the per-node error table, the accuracy fallback, the CLI report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from mist_kit.calibration.modes import CalibMethod, QuantFormat, QuantMode, QuantSpec, resolve_modes
from mist_kit.calibration.reader import ArrayBatches, FeatureReader
from mist_kit.errors import UsageError


def test_quant_spec_rejects_contradictions() -> None:
    with pytest.raises(UsageError, match="cannot set both dynamic"):
        QuantSpec("x", QuantMode.DYNAMIC, fmt=QuantFormat.QDQ)
    with pytest.raises(UsageError, match="static mode needs"):
        QuantSpec("x", QuantMode.STATIC, calib=CalibMethod.MINMAX)
    with pytest.raises(UsageError, match="valid: auto, dynamic"):
        resolve_modes("int4")
    assert [s.op_types for s in resolve_modes("static-qdq", ("MatMul",))] == [("MatMul",)]
    assert QuantSpec("d").excluding(("b", "a")).excluding(("a",)).exclude == ("a", "b")


def test_feature_reader_streams_memmap_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = rng.standard_normal((50, 5, 8)).astype(np.float16)
    np.save(tmp_path / "g.npy", arr)
    mm = np.load(tmp_path / "g.npy", mmap_mode="r")
    rows = np.array([40, 3, 7, 22, 9])
    reader = FeatureReader(ArrayBatches(mm, rows, batch_size=2, transform=lambda x: x * 2))
    seen = []
    while (batch := reader.get_next()) is not None:
        assert set(batch) == {"features"} and batch["features"].dtype == np.float32
        seen.append(batch["features"])
    assert len({len(b) for b in seen}) == 1  # one uniform batch length (onnxruntime's calibrators stack batches)
    got = np.concatenate(seen)
    np.testing.assert_array_equal(got, arr[np.sort(rows)].astype(np.float32) * 2)
    reader.rewind()
    assert reader.get_next() is not None


@pytest.fixture(scope="module")
def edge_data(tiny_bundle_fp32: Path, tiny_checkpoint: dict):
    from mist_kit.calibration.features import held_out_source, real_data
    from mist_kit.checkpoint import load_checkpoint
    from mist_kit.runtime.bundle import Head

    config, method = load_checkpoint(tiny_checkpoint["checkpoint"])
    held_out = held_out_source(config, None, None, required=True)
    data = real_data(config, None, calib=None, held_out=held_out, n_calib=128, n_eval=300,
                     rng=np.random.default_rng(0), transforms={}, cache_root=None, log=print)
    assert "cached" in data.notes[0] and "cached" in data.notes[1], data.notes  # both from the feature cache
    head = Head(method.head.weight.detach().numpy(), method.head.bias.detach().numpy(), tuple(config.classes))
    return onnx.load(str(tiny_bundle_fp32 / "edge.fp32.onnx")), data, head


def test_node_error_table_is_exact_for_identical_graphs(edge_data) -> None:
    from mist_kit.calibration.node_errors import node_error_table

    fp32, data, _ = edge_data
    table = node_error_table(fp32, fp32, list(data.held_out)[:2], QuantSpec("dynamic"))
    assert len(table) >= 16 and all(e.sqnr_db == 100.0 and e.drop_db == 0.0 for e in table)


def test_node_error_table_ranks_real_int8_loss(edge_data) -> None:
    from mist_kit.calibration.node_errors import node_error_table
    from mist_kit.exporters.quantize import quantize

    fp32, data, _ = edge_data
    spec = QuantSpec("dynamic")
    table = node_error_table(fp32, quantize(fp32, spec, None), list(data.held_out)[:2], spec)
    drops = [e.drop_db for e in table]
    assert drops == sorted(drops, reverse=True) and drops[0] > 0.0
    assert all(e.sqnr_db < 100.0 for e in table if e.op_type == "MatMul" and e.quantized)


def test_fallback_excludes_worst_nodes_or_fails_with_table(edge_data) -> None:
    """min_agreement=1.0 forces the fallback whenever plain dynamic int8 flips any prediction."""
    from mist_kit.exporters.quantize import quantize_edge

    fp32, data, head = edge_data
    res = quantize_edge(fp32, resolve_modes("dynamic"), data.calib, data.held_out, head, data.held_out_labels,
                        1.0, log=lambda _m: None, max_exclusions=3)
    first = res.candidates[0]
    if first.agreement == 1.0:
        assert res.passed and res.chosen is first
        return
    assert len(res.candidates) > 1, "fallback did not run"
    excluded = res.chosen.spec.exclude
    assert excluded and set(excluded) <= {n.name for n in fp32.graph.node}
    assert res.node_table, "no per-node table reported"
    if res.passed:
        assert res.chosen.agreement == 1.0
    else:
        assert len(excluded) == 3 and res.chosen.agreement < 1.0


def test_cli_json_export_replaces_bundle_whole(tiny_checkpoint: dict, tmp_path: Path) -> None:
    from mist_kit.cli.app import app
    from mist_kit.runtime.manifest import open_bundle

    out = tmp_path / "bundle"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"old")
    result = CliRunner().invoke(app, ["export", str(tiny_checkpoint["checkpoint"]), "--out", str(out), "--split",
                                      "--quantize", "none", "--json", "--model-name", "digits-cloud"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["quantization"] is None and report["cloud"]["max_abs_err"] < 1e-3
    manifest = open_bundle(out)
    assert not (out / "stale.bin").exists(), "exporting over a bundle must replace it whole"
    assert manifest["model_name"] == "digits-cloud" and manifest["edge"]["quantization"] is None
    assert manifest["parity"]["edge_top1_agreement"] == 1.0
    assert manifest["files"]["edge.onnx"]["sha256"] == manifest["files"]["edge.fp32.onnx"]["sha256"]
