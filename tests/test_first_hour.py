"""Issue 16 (a new user's first hour): each failure a fresh user hit, pinned by a test that failed before the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mist_kit.calibration.modes import CalibMethod, QuantFormat, QuantMode, QuantSpec
from mist_kit.calibration.reader import ArrayBatches, FeatureReader, InMemoryBatches, uniform_batch_size


def _tiny_graph(rng: np.random.Generator, tokens: int = 5, dim: int = 8) -> onnx.ModelProto:
    """features (B, T, D) -> MatMul -> Relu -> MatMul: enough for quantize_static to calibrate two activations."""
    w1 = numpy_helper.from_array(rng.standard_normal((dim, dim)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((dim, 3)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["features", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["logits"], name="mm2")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("features", TensorProto.FLOAT,
                                                                            ["B", tokens, dim])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", tokens, 3])],
                              initializer=[w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("calib", [CalibMethod.ENTROPY, CalibMethod.PERCENTILE, CalibMethod.MINMAX])
def test_static_quantization_calibrates_on_any_row_count(tmp_path: Path, calib: CalibMethod) -> None:
    """200 rows in batches of 32 leave a tail of 8: ORT's histogram calibrators stacked the batches and crashed."""
    from mist_kit.exporters.quantize import quantize

    rng = np.random.default_rng(0)
    feats = rng.standard_normal((200, 5, 8)).astype(np.float16)
    np.save(tmp_path / "g.npy", feats)
    source = ArrayBatches(np.load(tmp_path / "g.npy", mmap_mode="r"), np.arange(200), batch_size=32)
    assert len(source) % source.batch_size != 0
    spec = QuantSpec("s", QuantMode.STATIC, fmt=QuantFormat.QDQ, calib=calib)
    int8 = quantize(_tiny_graph(rng), spec, source)
    assert any(n.op_type == "QuantizeLinear" for n in int8.graph.node)


def test_feature_reader_feeds_uniform_batches_with_every_row_once() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((245, 3, 4)).astype(np.float32)
    source = InMemoryBatches([{"features": x[i:i + 32]} for i in range(0, 245, 32)])
    reader = FeatureReader(source)
    seen = []
    while (batch := reader.get_next()) is not None:
        seen.append(batch["features"])
    assert {len(b) for b in seen} == {7}  # 245 = 5 * 7 * 7: the largest divisor <= 32
    np.testing.assert_array_equal(np.concatenate(seen), x)
    assert [uniform_batch_size(n, 32) for n in (256, 200, 197, 31, 0, None)] == [32, 25, 1, 31, 1, 1]


def _command_paths() -> list[tuple[str, ...]]:
    """Every command and sub-command of the typer app, walked from click's tree (new commands are covered)."""
    import typer

    from mist_kit.cli.app import app

    paths: list[tuple[str, ...]] = [()]

    def walk(cmd: object, prefix: tuple[str, ...]) -> None:
        # duck-typed: typer >= 0.2x vendors click, so isinstance(click.Group) no longer holds
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            paths.append((*prefix, name))
            walk(sub, (*prefix, name))

    walk(typer.main.get_command(app), ())
    return paths


def test_help_of_every_command_renders() -> None:
    """`serve-cloud --help` died on rich markup in its docstring ('[/ready|/infer]'); walk them all."""
    from typer.testing import CliRunner

    from mist_kit.cli.app import app

    paths = _command_paths()
    assert ("serve-cloud",) in paths and ("codec", "bench") in paths
    runner = CliRunner()
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output, result.exception)
        assert "Usage" in result.output, path
