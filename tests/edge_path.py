"""The device path a method's bundle must survive, shared by the per-method end-to-end tests: extract features
through cloud.onnx, run-edge at the checkpoint's test top-1, finetune-edge without losing it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from mist_kit.cli.app import app

runner = CliRunner()


def check_device_path(bundle: Path, digits_lists: dict, test_top1: float, tmp_path: Path) -> tuple[Path, dict]:
    """Copy the bundle, extract train/test features, run-edge and finetune-edge on them; returns (bundle copy,
    features paths) for further checks."""
    from mist_kit.runtime.codec.extract import extract

    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    feats = {s: tmp_path / f"{s}.safetensors" for s in ("train", "test")}
    for split, path in feats.items():
        extract(copy, digits_lists[split], path, batch_size=64)
    res = runner.invoke(app, ["run-edge", "--device", "rpi4", "--bundle", str(copy), "--features",
                              str(feats["test"]), "--json", "--no-cap"])
    assert res.exit_code == 0, res.stderr
    # the torch checkpoint's own test top-1, through the codec's tensors and the int8 edge graph
    assert abs(json.loads(res.stdout)["top1"] - test_top1) <= 0.03
    res = runner.invoke(app, ["finetune-edge", "--device", "rpi4", "--bundle", str(copy), "--features",
                              str(feats["train"]), "--eval", str(feats["test"]), "--json", "--no-cap",
                              "--state", str(tmp_path / "state")])
    assert res.exit_code == 0, res.stderr
    ft = json.loads(res.stdout)
    assert ft["eval_top1_after"] >= ft["eval_top1_before"] - 0.05
    return copy, feats
