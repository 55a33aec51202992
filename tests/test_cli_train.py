"""`mist-kit train / evaluate / methods` through typer's CliRunner: exit codes, one-line errors (never a traceback),
and the JSON reports. Runs that train reuse the session's tiny feature cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mist_kit.cli.app import app

runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _one_line_error(result, code: int, *needles: str) -> str:
    err = result.stderr.strip()
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture
def base_args(digits_lists: dict[str, Path], tiny_weights: Path, tiny_checkpoint: dict, tmp_path: Path) -> list:
    return ["train", "--backbone", "test_vit", "--weights", tiny_weights, "--img-size", "32",
            "--cache-dir", Path(tiny_checkpoint["out"]) / "cache", "--out", tmp_path / "run"]


def test_missing_folder(base_args: list, tmp_path: Path, digits_lists) -> None:
    missing = tmp_path / "nowhere"
    result = _invoke(*base_args, "--train", missing, "--val", digits_lists["val"])
    _one_line_error(result, 2, str(missing), "no such file or directory")


def test_empty_list_file(base_args: list, tmp_path: Path, digits_lists) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    result = _invoke(*base_args, "--train", empty, "--val", digits_lists["val"])
    _one_line_error(result, 2, str(empty), "list file is empty")


def test_corrupt_jpeg_names_the_file_and_skip_bad_counts_it(base_args: list, tmp_path: Path, digits_lists) -> None:
    src = digits_lists["train"]
    data = tmp_path / "data"
    data.mkdir()
    lines = [f"{(src.parent / ln.rsplit(' ', 1)[0]).resolve()} {ln.rsplit(' ', 1)[1]}"
             for ln in src.read_text().splitlines()[:30]]
    (data / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF truncated")
    (data / "train.txt").write_text("\n".join([*lines, "corrupt.jpg 1"]) + "\n")
    args = [a if a != base_args[-1] else tmp_path / "out2" for a in base_args]
    args[args.index("--cache-dir") + 1] = tmp_path / "cache"
    result = _invoke(*args, "--train", data / "train.txt", "--method", "linear", "--epochs", "1")
    _one_line_error(result, 2, "corrupt.jpg", "cannot decode image")
    result = _invoke(*args, "--train", data / "train.txt", "--method", "linear", "--epochs", "1", "--skip-bad",
                     "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["skipped_images"] == 1 and report["images"]["train"] == 30  # the skipped image is not counted


def test_unknown_backbone(base_args: list, digits_lists) -> None:
    args = list(base_args)
    args[args.index("--backbone") + 1] = "vit_tiny_patch16_22"
    result = _invoke(*args, "--train", digits_lists["train"], "--val", digits_lists["val"])
    _one_line_error(result, 2, "unknown backbone 'vit_tiny_patch16_22'", "did you mean")


def test_weights_with_pretrained(base_args: list, digits_lists) -> None:
    result = _invoke(*base_args, "--pretrained", "--train", digits_lists["train"], "--val", digits_lists["val"])
    _one_line_error(result, 2, "--weights", "--pretrained")


def test_pretrained_offline_is_one_quick_line(digits_lists, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mist_kit.backbone as bb

    monkeypatch.setattr(bb, "_hub_reachable", lambda timeout=3.0: False)  # deterministic "offline"
    monkeypatch.setattr(bb, "_pretrained_in_local_cache", lambda name: False)
    start = time.perf_counter()
    result = _invoke("train", "--backbone", "test_vit", "--pretrained", "--train", digits_lists["train"],
                     "--val", digits_lists["val"], "--out", tmp_path / "o")
    assert time.perf_counter() - start < 10
    _one_line_error(result, 1, "model hub", "--weights FILE")


def test_train_json_report(base_args: list, digits_lists, tmp_path: Path) -> None:
    result = _invoke(*base_args, "--train", digits_lists["train"], "--val", digits_lists["val"], "--test",
                     digits_lists["test"], "--ks", "2,4", "--epochs", "4", "--lr", "0.01", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stdout holds exactly one JSON object
    for key in ("k", "val_top1", "test_top1", "trainable_params", "checkpoint", "cache_seconds", "train_seconds"):
        assert key in report, key
    assert report["k"] in (2, 4)
    assert 0.0 <= report["val_top1"] <= 1.0 and 0.0 <= report["test_top1"] <= 1.0
    assert report["trainable_params"] > 0 and report["train_seconds"] > 0 and report["cache_seconds"] == 0.0
    assert (Path(report["checkpoint"]) / "config.json").is_file()
    training = json.loads((Path(report["checkpoint"]) / "config.json").read_text())["training"]
    # an explicit --epochs is taken literally (no min-steps floor); --val turns the refit on by default
    assert training["epochs"] == 4 and training["min_steps"] == 0 and training["refit"] is True
    assert report["refit"] is True


def test_evaluate_json_reproduces_training_test_top1(tiny_checkpoint: dict, digits_lists) -> None:
    result = _invoke("evaluate", tiny_checkpoint["checkpoint"], digits_lists["test"], "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["top1"] == pytest.approx(tiny_checkpoint["test_top1"], abs=1e-9)
    assert report["images"] == 797 and report["k"] == 2
    human = _invoke("evaluate", tiny_checkpoint["out"], digits_lists["test"])  # the --out dir works too
    assert human.exit_code == 0 and f"top1 {report['top1']:.4f} on 797 images" in human.stderr


def _copy_checkpoint(tiny_checkpoint: dict, dst: Path) -> Path:
    import shutil

    shutil.copytree(tiny_checkpoint["checkpoint"], dst)
    return dst


def test_evaluate_corrupt_weights(tiny_checkpoint: dict, digits_lists, tmp_path: Path) -> None:
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    weights = ckpt / "edge.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    result = _invoke("evaluate", ckpt, digits_lists["test"])
    _one_line_error(result, 2, "edge.safetensors", "corrupt safetensors")


def test_evaluate_missing_config_field(tiny_checkpoint: dict, digits_lists, tmp_path: Path) -> None:
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    del config["backbone"]["embed_dim"]
    (ckpt / "config.json").write_text(json.dumps(config))
    result = _invoke("evaluate", ckpt, digits_lists["test"])
    _one_line_error(result, 2, "config.json", "missing field 'backbone.embed_dim'")


def test_evaluate_not_a_checkpoint(tmp_path: Path, digits_lists) -> None:
    result = _invoke("evaluate", tmp_path, digits_lists["test"])
    _one_line_error(result, 2, str(tmp_path), "not a checkpoint")


def test_methods_lists_the_registry() -> None:
    result = _invoke("methods")
    assert result.exit_code == 0
    names = [line.split("\t")[0] for line in result.stdout.splitlines()]
    assert {"mist", "linear"} <= set(names)
