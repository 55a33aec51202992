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


class _Clock:
    """A hand-driven monotonic clock (no sleeping, no wall time in the test)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_off_a_terminal_prints_periodic_plain_lines_and_a_final_one() -> None:
    import io

    from mist_kit.progress import Progress

    out, clock = io.StringIO(), _Clock()
    with Progress(800, "caching train.txt", stream=out, interval_s=10.0, clock=clock) as bar:
        for _ in range(25):  # 25 batches of 32 images, 4 s each
            clock.now += 4.0
            bar.advance(32)
    lines = out.getvalue().splitlines()
    # a line when 10 s have passed since the last (at 12 s, 24 s, ... 96 s: 8 lines), then the final one
    assert len(lines) == 9 and all(line.startswith("caching train.txt: ") for line in lines)
    assert lines[0] == "caching train.txt: 96/800 (12%) 8.0 img/s ETA 1m28s"
    assert lines[-1] == "caching train.txt: 800/800 (100%) 8.0 img/s in 1m40s"
    assert "\n\n" not in out.getvalue()  # no blank lines where a bar would be

    quiet = io.StringIO()
    with Progress(800, "x", enabled=False, stream=quiet, clock=clock) as bar:
        bar.advance(800)
    assert quiet.getvalue() == ""


def test_featurize_progress_is_the_shared_reporter() -> None:
    pytest.importorskip("torch")
    from mist_kit.featurize import _progress
    from mist_kit.progress import Progress

    bar = _progress(True, 10, "caching x")
    assert isinstance(bar, Progress) and bar.enabled and bar.label == "caching x"
    assert not _progress(False, 10, "x").enabled


def test_codec_list_marks_the_real_defaults_by_name() -> None:
    import json

    from typer.testing import CliRunner

    from mist_kit.cli.app import app

    res = CliRunner().invoke(app, ["codec", "list", "--json"])
    marks = {r["codec"]: r["default"] for r in json.loads(res.stdout)}
    assert marks["pool2-int4"] is None  # the default of neither train nor export
    assert "train default" in marks["fp32"] and "export default" in marks["int8-channel"]


def test_codec_bench_json_keeps_stdout_pure_and_reports_progress_on_stderr() -> None:
    import json

    from typer.testing import CliRunner

    from mist_kit.cli.app import app

    res = CliRunner().invoke(app, ["codec", "bench", "--codecs", "fp32,fp16,int8-channel", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)  # the whole of stdout is one JSON document
    assert [r["codec"] for r in rows] == ["fp32", "fp16", "int8-channel"]
    assert "codec bench: 3/3 (100%)" in res.stderr
    # fp32's encode returns its input: no speed to report (it printed ~12.7 TB/s); the others are timed
    assert rows[0]["encode_mb_s"] is None and "no-op" in rows[0]["encode_note"]
    assert all(r["encode_mb_s"] > 0 for r in rows[1:])
    quiet = CliRunner().invoke(app, ["codec", "bench", "--codecs", "fp32", "--json", "--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_codec_bench_interrupted_prints_the_finished_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import mist_kit.codec_bench as cb
    from mist_kit.cli.app import app

    real, calls = cb.measure_row, []

    def stop_at_third(codec, x):  # type: ignore[no-untyped-def]
        calls.append(codec.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(codec, x)

    monkeypatch.setattr(cb, "measure_row", stop_at_third)
    res = CliRunner().invoke(app, ["codec", "bench", "--codecs", "fp32,fp16,int8-channel,int4-channel"])
    assert res.exit_code == 130
    assert "fp16" in res.stderr and "int4-channel" not in res.stderr.split("codec bench (synthetic")[1]
    assert "interrupted: 2 of 4 codecs finished" in res.stderr


def test_codec_bench_says_what_it_retrains_and_no_retrain_skips_it(tiny_checkpoint: dict, digits_lists: dict) -> None:
    import json

    from typer.testing import CliRunner

    from mist_kit.cli.app import app

    args = ["codec", "bench", "--checkpoint", tiny_checkpoint["checkpoint"], "--data", str(digits_lists["test"]),
            "--codecs", "fp32,int8-channel,pool2-int4", "--json"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    head = res.stderr.split("pool2-int4: retraining")[0]  # the plan comes before any retraining
    assert "will retrain 1 edge network(s) (pool2-int4)" in head and "--no-retrain" in head
    assert [r["retrained"] for r in json.loads(res.stdout)] == [False, False, True]

    res = CliRunner().invoke(app, [*args, "--no-retrain"])
    assert res.exit_code == 0, res.output
    rows = {r["codec"]: r for r in json.loads(res.stdout)}
    assert "retrain" not in res.stderr
    assert not rows["pool2-int4"]["retrained"] and rows["pool2-int4"]["top1"] is None
    assert rows["pool2-int4"]["bytes_per_image"] > 0 and rows["int8-channel"]["top1"] is not None


_FAST_FAIL_SCRIPT = r"""
import json, sys
from typer.testing import CliRunner
from mist_kit.cli.app import app
out = []
for args in json.loads(sys.argv[1]):
    res = CliRunner().invoke(app, args)
    out.append([res.exit_code, res.output.strip()])
print(json.dumps({"results": out, "torch": "torch" in sys.modules, "timm": "timm" in sys.modules}))
"""


def test_train_mistakes_fail_before_torch_is_imported(tmp_path: Path, digits_lists: dict) -> None:
    """A bad --weights, --img-size against the patch, --k beyond the depth: one line, exit 2, no torch import."""
    import json
    import subprocess
    import sys

    w = tmp_path / "w.safetensors"
    w.write_bytes(b"x")
    base = ["train", "--train", str(digits_lists["train"]), "--out", str(tmp_path / "o")]
    cases = [
        ([*base, "--weights", str(tmp_path / "nope.safetensors"), "--k", "2"], "nope.safetensors: does not exist"),
        ([*base, "--weights", str(w), "--backbone", "vit_tiny_patch16_224", "--img-size", "70", "--k", "2"],
         "not a multiple of vit_tiny_patch16_224's patch size 16 (try 64 or 80)"),
        ([*base, "--weights", str(w), "--backbone", "vit_small_patch14_dinov2", "--k", "13"],
         "--k 13 is beyond vit_small_patch14_dinov2's depth (12 blocks)"),
        ([*base, "--weights", str(w), "--val", str(tmp_path / "missing.txt")], "--val: "),
        ([*base, "--backbone", "vit_tiny_patch16_224"], "no backbone weights"),
    ]
    proc = subprocess.run([sys.executable, "-c", _FAST_FAIL_SCRIPT, json.dumps([c[0] for c in cases])],
                          capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for (code, output), (_, expected) in zip(report["results"], cases, strict=True):
        assert code == 2 and output.startswith("error: ") and expected in output, output
        assert len(output.splitlines()) == 1, output
    assert not report["torch"] and not report["timm"]


def test_pretrained_offline_fails_at_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mist_kit.cli.preflight import check_pretrained_reachable
    from mist_kit.errors import DependencyError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(DependencyError, match=r"not in the Hugging Face cache .*HF_HUB_OFFLINE is set"):
        check_pretrained_reachable("vit_tiny_patch16_224")
    (tmp_path / "models--timm--vit_tiny_patch16_224.augreg_in21k").mkdir()
    check_pretrained_reachable("vit_tiny_patch16_224")  # cached: no network needed
