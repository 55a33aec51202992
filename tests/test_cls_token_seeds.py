"""MIST's cls-token extension (the final-norm cls token concatenated before the head: two sent tensors) and
`train --seeds` (one model per seed, mean and sd, the top-level checkpoint chosen on val only)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mist_kit.edge import create_edge_method
from mist_kit.edge.lae import LaeInference, reference_embed
from mist_kit.pipeline import TrainRequest, choose_seed, run_training
from mist_kit.runtime.plan import BackboneShape
from mist_kit.train import TrainParams

SHAPE = BackboneShape(16, 5, 1, 6)


def _pair() -> tuple:
    """The same LAE with and without the extension (shared weights except the head)."""
    plain = create_edge_method("mist", backbone=SHAPE, depth=2, num_classes=3, seed=0)
    ext = create_edge_method("mist", backbone=SHAPE, depth=2, num_classes=3, params={"cls_token": True}, seed=0)
    for block in plain.blocks:  # trained-looking residuals, so the blocks are not the identity
        torch.nn.init.normal_(block.o.weight, std=0.1)
    ext.load_state_dict({k: v for k, v in plain.state_dict().items() if not k.startswith("head.")}, strict=False)
    return plain.eval(), ext.eval()


def test_cls_token_plan_and_embedding() -> None:
    plain, ext = _pair()
    assert [(t.name, str(t.source)) for t in ext.plan.tensors] == [("gather", "gather:2"), ("cls", "final_cls")]
    assert [t.name for t in plain.plan.tensors] == ["gather"]
    assert ext.head.in_features == 32 and ext.hparams()["cls_token"] is True
    rng = np.random.default_rng(0)
    g = torch.from_numpy(rng.normal(size=(4, 5, 16)).astype(np.float32))
    c = torch.from_numpy(rng.normal(size=(4, 1, 16)).astype(np.float32))
    with torch.no_grad():
        e = ext.embed({"gather": g, "cls": c})
        torch.testing.assert_close(e[:, :16], plain.embed({"gather": g}))  # the LAE half is the paper's LAE
        torch.testing.assert_close(e[:, 16:], c[:, 0])  # the other half is the cls token as sent
        torch.testing.assert_close(LaeInference(ext).embed({"gather": g, "cls": c}), e, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reference_embed(ext, {"gather": g, "cls": c}), e, atol=1e-5, rtol=1e-5)
    assert ext.macs_per_image() - plain.macs_per_image() == 16 * 3  # the head's second half


def test_cls_token_trains_exports_and_sends_two_tensors(tiny_checkpoint, digits_lists, tiny_weights,
                                                        tmp_path: Path) -> None:
    from mist_kit.exporters.export import export_bundle

    req = TrainRequest(backbone="test_vit", weights=str(tiny_weights), img_size=32, train=str(digits_lists["train"]),
                       val=str(digits_lists["val"]), out=tmp_path / "cls", k=2, refit=False, progress=False,
                       method_params={"cls_token": True}, cache_dir=Path(tiny_checkpoint["out"]) / "cache",
                       params=TrainParams(epochs=2, min_steps=0, lr=1e-2, seed=0))
    report = run_training(req, log=lambda _m: None)
    assert report["val_top1"] > 0.3  # 10 classes: chance 0.1
    exported = export_bundle(report["checkpoint"], tmp_path / "bundle", log=lambda _m: None)
    assert exported.ok, exported.problems
    assert [t["name"] for t in exported.manifest["cloud"]["plan"]["tensors"]] == ["gather", "cls"]


def test_choose_seed_looks_at_val_only() -> None:
    reports = {0: {"val_top1": 0.80, "val_loss": 0.5, "test_top1": 0.99},
               1: {"val_top1": 0.85, "val_loss": 0.9, "test_top1": 0.10},
               2: {"val_top1": 0.85, "val_loss": 0.7, "test_top1": 0.20}}
    assert choose_seed(reports) == 2  # best val, tie broken on val loss; test (seed 0 best) is never read
    assert choose_seed({5: {"val_top1": 0.5, "val_loss": 1.0}, 3: {"val_top1": 0.5, "val_loss": 1.0}}) == 5


def test_seeds_train_one_model_each_and_report_mean_and_sd(tiny_checkpoint, digits_lists, tiny_weights,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "seeds"
    req = TrainRequest(backbone="test_vit", weights=str(tiny_weights), img_size=32, train=str(digits_lists["train"]),
                       val=str(digits_lists["val"]), test=str(digits_lists["test"]), out=out, k=2, refit=False,
                       progress=False, seeds=(0, 1), cache_dir=Path(tiny_checkpoint["out"]) / "cache",
                       params=TrainParams(epochs=1, min_steps=0, lr=1e-2))
    report = run_training(req, log=lambda _m: None)
    summary = report["seeds"]
    per = {row["seed"]: row for row in summary["per_seed"]}
    assert set(per) == {0, 1} and per[0]["val_top1"] != per[1]["val_top1"]  # seeded differently
    for seed in (0, 1):
        cfg = json.loads((out / f"seed-{seed}" / "checkpoint" / "config.json").read_text())
        assert cfg["training"]["seed"] == seed and cfg["metrics"]["test_top1"] == per[seed]["test_top1"]
    vals, tests = [per[s]["val_top1"] for s in (0, 1)], [per[s]["test_top1"] for s in (0, 1)]
    assert summary["val_top1"]["mean"] == pytest.approx(np.mean(vals))
    assert summary["test_top1"]["sd"] == pytest.approx(abs(tests[0] - tests[1]) / np.sqrt(2))
    chosen = max((0, 1), key=lambda s: per[s]["val_top1"])
    assert summary["chosen_seed"] == chosen and report["val_top1"] == per[chosen]["val_top1"]
    top = json.loads((out / "checkpoint" / "config.json").read_text())
    assert top["training"]["seed"] == chosen and report["checkpoint"] == str(out / "checkpoint")
    with pytest.raises(Exception, match="--seeds must list distinct"):
        TrainRequest(backbone="test_vit", train="t", val="v", out=tmp_path, weights="w", seeds=(1, 1))


def test_train_cli_default_is_the_methods_train_defaults() -> None:
    """`train` as typed and `compare` (which reads `train_defaults`) build the same mist: its reproduce commands
    rebuild the row."""
    import inspect

    from mist_kit.cli.train_cmds import train
    from mist_kit.edge import get_edge_method

    default = inspect.signature(train).parameters["cls_token"].default
    assert default == get_edge_method("mist").train_defaults["cls_token"] is True
