"""The device runtime end to end on the tiny exported bundle: run-edge, finetune-edge, rollback, devices check.

CLI commands run in-process with --no-cap (a memory cap would bind the test runner, which has torch loaded);
the cap itself and the torch-free guarantee are checked in subprocesses (tests/test_runtime_isolated.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mist_kit.cli.app import app
from mist_kit.runtime.bundle import open_edge_bundle
from mist_kit.runtime.edge_run import run_edge
from mist_kit.runtime.edge_session import EdgeSession
from mist_kit.runtime.features_file import FeaturesWriter, read_features, write_features

runner = CliRunner()


@pytest.fixture(scope="module")
def edge_env(tiny_bundle: Path, tiny_checkpoint: dict, digits_lists: dict, tmp_path_factory) -> dict:
    """The tiny bundle plus features files of the digits train/test splits (via `extract`, the codec's writer)."""
    from mist_kit.runtime.codec.extract import extract

    out = tmp_path_factory.mktemp("edge_features")
    env = {"bundle": tiny_bundle, "checkpoint": tiny_checkpoint["checkpoint"],
           "test_top1": tiny_checkpoint["test_top1"]}
    for split in ("train", "test"):
        env[split] = out / f"{split}.safetensors"
        extract(tiny_bundle, digits_lists[split], env[split], batch_size=64)
    return env


def _cli(*args: str) -> tuple[int, str, str]:
    res = runner.invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_run_edge_json_report_and_accuracy(edge_env):
    code, out, err = _cli("run-edge", "--device", "rpi4", "--bundle", str(edge_env["bundle"]), "--features",
                          str(edge_env["test"]), "--batch", "8", "--json", "--no-cap")
    assert code == 0, err
    rep = json.loads(out)
    for key in ("device", "images", "latency_ms_p50", "latency_ms_p95", "images_per_s", "peak_rss_mb",
                "predictions", "top1"):
        assert key in rep, key
    n = read_features(edge_env["test"]).n
    assert rep["device"] == "rpi4" and rep["images"] == n == len(rep["predictions"])
    assert rep["latency_ms_p95"] >= rep["latency_ms_p50"] > 0 and rep["peak_rss_mb"] > 0
    # the int8 edge graph + numpy head keep the checkpoint's accuracy (10 classes: chance is 0.1)
    assert rep["top1"] == pytest.approx(edge_env["test_top1"], abs=0.05)


def test_predictions_match_numpy_reference_and_batch_size(edge_env):
    bundle = open_edge_bundle(edge_env["bundle"])
    ff = read_features(edge_env["test"], bundle.manifest)
    session = EdgeSession(bundle)
    tensors = ff.read(0, 40)
    ref = bundle.head.weight @ session.embed(tensors).T  # (C, B): head applied independently of Head.logits
    ref_idx = (ref + bundle.head.bias[:, None]).argmax(axis=0)
    one = run_edge(edge_env["bundle"], edge_env["test"], device="generic-x86", batch=1, apply_caps=False)
    many = run_edge(edge_env["bundle"], edge_env["test"], device="generic-x86", batch=16, apply_caps=False)
    idx_one = [p["index"] for p in one["predictions"]]
    assert idx_one[:40] == ref_idx.tolist()
    assert idx_one == [p["index"] for p in many["predictions"]]
    stream = np.concatenate(list(session.stream(b for _, b in ff.batches(7))))
    assert stream.shape == (ff.n, bundle.head.embedding_dim)


def test_fp32_reference_agrees_with_int8(edge_env):
    int8 = run_edge(edge_env["bundle"], edge_env["test"], batch=32, apply_caps=False)
    fp32 = run_edge(edge_env["bundle"], edge_env["test"], batch=32, variant="fp32", apply_caps=False)
    agree = np.mean([a["index"] == b["index"] for a, b in zip(int8["predictions"], fp32["predictions"], strict=True)])
    assert agree >= 0.95 and fp32["graph"] == "edge.fp32.onnx"


def test_litert_preference_falls_back_with_a_note(edge_env):
    rep = run_edge(edge_env["bundle"], edge_env["test"], device="rpi-zero-2w", batch=64, apply_caps=False)
    assert rep["backend"] == "onnxruntime" and "LiteRT" in rep["backend_note"]


def test_finetune_new_class_then_rollback(edge_env, tmp_path):
    bundle = Path(shutil.copytree(edge_env["bundle"], tmp_path / "bundle"))
    ff = read_features(edge_env["train"])
    manifest = open_edge_bundle(bundle).manifest
    labels = ff.labels.copy()
    labels[labels == 9] = 10  # the device meets a class its head has never seen
    relabelled = tmp_path / "train_new.safetensors"
    with FeaturesWriter(relabelled, manifest, ff.ids, with_labels=True) as w:
        w.write(ff.read(), labels)
    code, out, err = _cli("finetune-edge", "--device", "rpi4", "--bundle", str(bundle), "--features", str(relabelled),
                          "--new-classes", "nine-again", "--epochs", "60", "--json", "--no-cap")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["head_version"] == 1 and rep["classes"] == 11
    assert rep["top1_after"] > rep["top1_before"] + 0.03  # class 10 was unpredictable before
    assert Path(rep["state_dir"]) == tmp_path / "bundle.heads"
    run = json.loads(_cli("run-edge", "--device", "rpi4", "--bundle", str(bundle), "--features",
                          str(relabelled), "--batch", "64", "--json", "--no-cap")[1])
    assert run["head_version"] == 1 and any(p["class"] == "nine-again" for p in run["predictions"])
    assert open_edge_bundle(bundle).head.version == 0  # bundle still verifies after fine-tuning
    code, out, _ = _cli("finetune-edge", "--device", "rpi4", "--bundle", str(bundle), "--rollback", "--json")
    assert code == 0 and json.loads(out)["head_version"] == 0
    run = json.loads(_cli("run-edge", "--device", "rpi4", "--bundle", str(bundle), "--features",
                          str(edge_env["test"]), "--batch", "64", "--json", "--no-cap")[1])
    assert run["head_version"] == 0 and run["top1"] == pytest.approx(edge_env["test_top1"], abs=0.05)


def _one_line_error(result: tuple[int, str, str], expect_code: int, *needles: str) -> None:
    code, out, err = result
    assert code == expect_code, err
    assert out == ""  # nothing on stdout: a --json consumer sees no half report
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _features_like(manifest: dict, path: Path, **changes) -> Path:
    other = json.loads(json.dumps(manifest))
    out = other["cloud"]["outputs"][0]
    out["shape"] = [-1, *changes.get("shape", out["shape"][1:])]
    if "codec" in changes:
        other["cloud"]["plan"]["tensors"][0]["codec"] = changes["codec"]
    rng = np.random.default_rng(0)
    tensors = {o["name"]: rng.standard_normal((3, *o["shape"][1:])).astype(o["dtype"])
               for o in other["cloud"]["outputs"]}
    return write_features(path, other, tensors, ["a", "b", "c"], [0, 1, 2])


def test_bad_inputs_fail_in_one_line_and_write_nothing(edge_env, tmp_path):
    bundle = Path(shutil.copytree(edge_env["bundle"], tmp_path / "bundle"))
    manifest = open_edge_bundle(bundle).manifest
    shape = manifest["cloud"]["outputs"][0]["shape"][1:]
    wrong_shape = _features_like(manifest, tmp_path / "shape.safetensors", shape=[shape[0] + 1, *shape[1:]])
    wrong_codec = _features_like(manifest, tmp_path / "codec.safetensors", codec={"name": "other-codec"})
    data = Path(edge_env["test"]).read_bytes()
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    before = _files(tmp_path)
    for cmd in ("run-edge", "finetune-edge"):
        base = [cmd, "--device", "rpi4", "--bundle", str(bundle), "--no-cap", "--features"]
        _one_line_error(_cli(*base, str(wrong_shape)), 2, "another bundle")
        _one_line_error(_cli(*base, str(wrong_codec)), 2, "codec", "another bundle")
        _one_line_error(_cli(*base, str(truncated)), 2, "truncated")
        _one_line_error(_cli(cmd, "--device", "pi9", "--bundle", str(bundle), "--features", str(edge_env["test"])),
                        2, "unknown device 'pi9'")
    edge = bundle / "edge.onnx"
    raw = bytearray(edge.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    edge.write_bytes(bytes(raw))
    for cmd in ("run-edge", "finetune-edge"):
        _one_line_error(_cli(cmd, "--device", "rpi4", "--bundle", str(bundle), "--features",
                              str(edge_env["train"]), "--no-cap"), 2, "edge.onnx", "tampered")
    assert _files(tmp_path) == before  # no state dir, no temp files


def test_devices_check_on_bundle(edge_env):
    from mist_kit.checkpoint import load_checkpoint

    code, out, err = _cli("devices", "check", str(edge_env["bundle"]), "--device", "rpi4", "--batch", "4", "--json")
    assert code == 0, err
    rep = json.loads(out)
    _, method = load_checkpoint(edge_env["checkpoint"])
    assert rep["edge_macs_per_image"] == method.macs_per_image()  # independent: the torch model's own count
    assert rep["fits"] and rep["backend"] == "onnxruntime" and rep["verdict"].startswith("fits")
    code, out, _ = _cli("devices", "check", str(edge_env["bundle"]), "--device", "rpi4", "--memory", "230",
                        "--json")
    assert code == 1 and json.loads(out)["verdict"].startswith("does not fit")


def test_run_edge_from_cloud_equals_features_file(edge_env, digits_lists, tmp_path):
    pytest.importorskip("uvicorn")
    from mist_kit.runtime.v2_server import serve_in_thread

    subset = tmp_path / "subset.txt"
    lines = Path(digits_lists["test"]).read_text().splitlines()[:24]
    base = Path(digits_lists["test"]).parent
    subset.write_text("\n".join(str(base / ln.split()[0]) + " " + ln.split()[1] for ln in lines) + "\n")
    shutil.copy(base / "classes.txt", tmp_path / "classes.txt")  # labels map to the bundle's classes by name
    local = tmp_path / "subset.safetensors"
    from mist_kit.runtime.codec.extract import extract

    extract(edge_env["bundle"], subset, local)
    with serve_in_thread(edge_env["bundle"]) as url:
        code, out, err = _cli("run-edge", "--device", "rpi4", "--bundle", str(edge_env["bundle"]), "--cloud", url,
                              "--images", str(subset), "--batch", "8", "--json", "--no-cap")
    assert code == 0, err
    cloud = json.loads(out)
    ref = run_edge(edge_env["bundle"], local, batch=8, apply_caps=False)
    assert [p["index"] for p in cloud["predictions"]] == [p["index"] for p in ref["predictions"]]
    assert cloud["images"] == 24 and cloud["top1"] == ref["top1"]
