"""The int8 agreement gate is measured on data the edge network never trained on.

Training rows are fitted with wide margins, so int8 rarely flips an argmax there: a gate measured on them always
passes. These tests pin where the held-out data comes from: val for a plain checkpoint, --eval for one refit on
train + val (which has no held-out data of its own), never the training split.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mist_kit.cli.app import app
from mist_kit.errors import InputError


def _refit_copy(tiny_checkpoint: dict, tmp_path: Path) -> Path:
    """The tiny checkpoint, labelled as refit on train + val (only the data-selection policy reads the flag)."""
    dst = tmp_path / "refit_ckpt"
    shutil.copytree(tiny_checkpoint["checkpoint"], dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["training"]["refit"] = True
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _real_data(checkpoint: Path | str, eval_data: str | None = None, need_held_out: bool = True):
    """What export does: resolve the held-out source (required for int8), then load calibration + held-out data."""
    from mist_kit.calibration.features import held_out_source, real_data
    from mist_kit.checkpoint import load_checkpoint

    config, _ = load_checkpoint(checkpoint)
    held_out = held_out_source(config, None, eval_data, required=need_held_out)
    return config, real_data(config, None, calib=None, held_out=held_out, n_calib=64, n_eval=1000,
                             rng=np.random.default_rng(0), transforms={}, cache_root=None, log=lambda _m: None)


def test_plain_checkpoint_holds_out_its_val_split(tiny_checkpoint: dict, digits_lists: dict) -> None:
    from mist_kit.data import load_image_list

    config, data = _real_data(tiny_checkpoint["checkpoint"])
    val = load_image_list(digits_lists["val"])
    assert data.source == config.training["val"] == str(digits_lists["val"])
    assert len(data.held_out) == len(val) < 1000  # all of val, no training rows topping it up
    np.testing.assert_array_equal(np.sort(data.held_out_labels), np.sort(val.labels_for(config.classes)))


def test_refit_checkpoint_has_no_held_out_data_of_its_own(tiny_checkpoint: dict, tmp_path: Path) -> None:
    ckpt = _refit_copy(tiny_checkpoint, tmp_path)
    with pytest.raises(InputError, match=r"refit on train \+ val.*pass --eval DATA"):
        _real_data(ckpt)
    _config, data = _real_data(ckpt, need_held_out=False)  # --quantize none: nothing to gate, nothing invented
    assert data.held_out is None and data.held_out_labels is None


def test_eval_data_that_was_trained_on_is_refused(tiny_checkpoint: dict, digits_lists: dict, tmp_path: Path) -> None:
    ckpt = _refit_copy(tiny_checkpoint, tmp_path)
    for split in ("train", "val"):
        with pytest.raises(InputError, match="trained on this data"):
            _real_data(ckpt, eval_data=str(digits_lists[split]))


def test_refit_checkpoint_exports_with_eval_data(tiny_checkpoint: dict, digits_lists: dict, tmp_path: Path) -> None:
    """--eval images run through the backbone (an empty --cache-dir: no cached gathers) and score the gate."""
    from mist_kit.data import load_image_list

    ckpt = _refit_copy(tiny_checkpoint, tmp_path)
    out = tmp_path / "bundle"
    runner = CliRunner()
    failed = runner.invoke(app, ["export", str(ckpt), "--out", str(out), "--codec", "fp32"])
    lines = [ln for ln in failed.output.splitlines() if ln.strip()]  # refused before any work: one line only
    assert failed.exit_code == 2 and len(lines) == 1 and "--eval DATA" in lines[0], failed.output
    assert not out.exists()
    done = runner.invoke(app, ["export", str(ckpt), "--out", str(out), "--codec", "fp32", "--eval",
                               str(digits_lists["test"]), "--n-eval", "300", "--cache-dir", str(tmp_path / "no-cache"),
                               "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)  # progress and log lines go to stderr, even with --json
    parity = report["manifest"]["parity"]
    assert parity["eval_data"] == "test.txt" and parity["n_eval"] == 300
    assert report["data"] == [f"calibration: 256 images of {digits_lists['train']}",
                              f"held-out: 300 images of {digits_lists['test']}"]
    test = load_image_list(digits_lists["test"])
    assert 0.5 < parity["edge_top1_fp32"] <= 1.0 and len(test) > 300


def test_bf16_trained_checkpoint_exports_from_its_own_caches(digits_lists: dict, tiny_weights: Path,
                                                            tmp_path: Path) -> None:
    """A checkpoint trained on a bf16 cache finds that cache at export (default codec calibration and the int8
    gate's held-out rows), instead of falling back to fp32 features or re-running the backbone."""
    from mist_kit.exporters.export import export_bundle
    from mist_kit.pipeline import TrainRequest, run_training
    from mist_kit.train import TrainParams

    req = TrainRequest(backbone="test_vit", weights=str(tiny_weights), img_size=32, train=str(digits_lists["train"]),
                       val=str(digits_lists["val"]), out=tmp_path / "bf16", k=2, backbone_precision="bf16",
                       params=TrainParams(epochs=1, min_steps=0, lr=1e-2, seed=0), progress=False, refit=False)
    report = run_training(req, log=lambda _m: None)
    logs: list[str] = []
    exported = export_bundle(report["checkpoint"], tmp_path / "bundle", log=logs.append)
    assert exported.ok, exported.problems
    assert exported.manifest["cloud"]["plan"]["tensors"][0]["codec"]["name"] == "int8-channel"
    assert any("cached" in n for n in exported.data) and not any("computing" in m for m in logs), logs
