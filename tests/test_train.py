"""Training from cached features: it learns, it is deterministic, k search / refit / linear paths work, and
contradictory requests are refused. Pipeline runs reuse the session's tiny cache (no extra backbone passes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mist_kit.edge import create_edge_method
from mist_kit.errors import UsageError
from mist_kit.pipeline import TrainRequest, run_training
from mist_kit.runtime.plan import BackboneShape
from mist_kit.train import TrainParams, cross_entropy, fit, fit_candidates, improves, predict_logits, top1

TOK, DIM, CLASSES = 5, 16, 4


def _blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gather-shaped features whose cls token carries a class signal under noise (float16, like the cache)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(size=(CLASSES, DIM)) * 1.5
    y = rng.integers(0, CLASSES, size=n)
    x = rng.normal(size=(n, TOK, DIM))
    x[:, 0] += centres[y]
    return x.astype(np.float16), y


def _lae(seed: int = 0):
    return create_edge_method("mist", backbone=BackboneShape(DIM, TOK, 1, 6), depth=2, num_classes=CLASSES, seed=seed)


def test_fit_learns_and_loss_falls() -> None:
    x, y = _blobs(256, seed=0)
    vx, vy = _blobs(128, seed=1)
    model = _lae()
    res = fit(model, x, y, TrainParams(epochs=12, min_steps=0, lr=1e-2, batch_size=32, patience=12), vx, vy)
    losses = [row["loss"] for row in res.history]
    assert losses[-1] < 0.5 * losses[0]
    assert res.best_val_top1 is not None and res.best_val_top1 > 0.8  # chance is 0.25
    assert top1(predict_logits(model, vx), vy) == pytest.approx(res.best_val_top1)  # best state was restored


def test_fit_is_deterministic_for_a_seed() -> None:
    x, y = _blobs(96, seed=0)
    params = TrainParams(epochs=3, min_steps=0, lr=5e-3, seed=7)
    a, b, c = _lae(), _lae(), _lae()
    fit(a, x, y, params)
    fit(b, x, y, params)
    fit(c, x, y, TrainParams(epochs=3, min_steps=0, lr=5e-3, seed=8))
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(ta, tb, atol=0, rtol=0, msg=name)
    assert any(not torch.equal(ta, tc) for ta, tc in zip(a.state_dict().values(), c.state_dict().values(),
                                                           strict=True))


def test_candidates_stop_early_independently() -> None:
    x, y = _blobs(128, seed=0)
    vx, vy = _blobs(64, seed=1)
    noise = {"signal": x, "noise": np.random.default_rng(5).normal(size=x.shape).astype(np.float16)}
    vnoise = {"signal": vx, "noise": np.random.default_rng(6).normal(size=vx.shape).astype(np.float16)}
    models = {"signal": _lae(), "noise": _lae()}
    res = fit_candidates(models, noise, y, TrainParams(epochs=20, min_steps=0, lr=1e-2, patience=3,
                                                       prune_margin=None, halving=False), vnoise, vy)
    assert res["signal"].best_val_top1 > res["noise"].best_val_top1 + 0.3
    assert res["noise"].epochs_run == res["noise"].best_epoch + 3 < 20  # stopped 3 epochs after its best
    for r in res.values():
        assert len(r.history) == r.epochs_run


def test_prune_margin_stops_trailing_candidates_early() -> None:
    x, y = _blobs(128, seed=0)
    vx, vy = _blobs(64, seed=1)
    feats = {"signal": x, "noise": np.random.default_rng(5).normal(size=x.shape).astype(np.float16)}
    vfeats = {"signal": vx, "noise": np.random.default_rng(6).normal(size=vx.shape).astype(np.float16)}
    params = TrainParams(epochs=8, min_steps=0, lr=1e-2, patience=8, prune_margin=0.2, prune_after=2, halving=False)
    res = fit_candidates({"signal": _lae(), "noise": _lae()}, feats, y, params, vfeats, vy)
    assert res["noise"].epochs_run == 2 and res["noise"].history[-1]["pruned"] == 1.0
    assert res["signal"].epochs_run == 8  # the leader is never pruned


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"epochs": 0}, "--epochs"), ({"lr": 0.0}, "--lr"), ({"weight_decay": -1.0}, "--weight-decay"),
    ({"label_smoothing": 1.0}, "--label-smoothing"), ({"patience": 0}, "--patience"), ({"batch_size": 0}, "--batch"),
    ({"prune_margin": 1.5}, "--prune-margin"), ({"prune_after": 0}, "--prune-after"),
])
def test_train_params_refuse_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        TrainParams(**kwargs)


def test_default_recipe_and_min_steps_floor() -> None:
    p = TrainParams()  # the recipe measured in BENCHMARKS.md ("Accuracy levers")
    assert (p.epochs, p.lr, p.weight_decay, p.label_smoothing, p.patience, p.warmup_epochs, p.min_steps) == \
        (20, 3e-3, 0.05, 0.1, 4, 2, 500)
    assert p.for_rows(800) == TrainParams(min_steps=0)  # 25 steps x 20 epochs = 500 already: unchanged
    small = p.for_rows(94)  # 3 steps per epoch: factor 500 / 60
    assert (small.epochs, small.patience, small.warmup_epochs, small.min_steps) == (167, 34, 17, 0)
    assert small.prune_after == 25 and p.prune_margin == 0.1  # pruning waits as many steps as on a large task
    assert small.for_rows(94) == small  # applied once
    assert TrainParams(epochs=3, min_steps=0).for_rows(10).epochs == 3
    with pytest.raises(UsageError, match="--min-steps"):
        TrainParams(min_steps=-1)


def test_cross_entropy_and_the_tie_break() -> None:
    logits = np.array([[2.0, 0.0], [0.0, 1.0]])
    expect = -(np.log(np.exp(2) / (np.exp(2) + 1)) + np.log(np.e / (1 + np.e))) / 2
    assert cross_entropy(logits, np.array([0, 1])) == pytest.approx(expect, rel=1e-12)
    assert improves(0.5, 9.0, None, None) and improves(0.6, 9.0, 0.5, 1.0)
    assert improves(0.5, 0.9, 0.5, 1.0) and not improves(0.5, 1.1, 0.5, 1.0) and not improves(0.4, 0.1, 0.5, 1.0)


def test_saturated_val_keeps_the_lowest_loss_epoch() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(CLASSES, DIM)) * 8.0  # far apart: val top-1 reaches 1.0 within a few epochs

    def easy(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        r = np.random.default_rng(seed)
        y = r.integers(0, CLASSES, size=n)
        x = r.normal(size=(n, TOK, DIM))
        x[:, 0] += centres[y]
        return x.astype(np.float16), y

    (x, y), (vx, vy) = easy(64, 1), easy(32, 2)
    res = fit(_lae(), x, y, TrainParams(epochs=10, min_steps=0, lr=1e-2, patience=10), vx, vy)
    hist = res.history
    top = max(h["val_top1"] for h in hist)
    first = next(h["epoch"] for h in hist if h["val_top1"] == top)
    lowest = min((h for h in hist if h["val_top1"] == top), key=lambda h: (h["val_loss"], h["epoch"]))["epoch"]
    assert top == 1.0 and res.best_epoch == lowest and res.best_epoch > first  # not the first saturated epoch
    assert res.best_val_loss == pytest.approx(hist[lowest - 1]["val_loss"])


def test_refit_is_on_by_default_with_val(tmp_path: Path) -> None:
    kw = {"backbone": "test_vit", "train": "t", "out": tmp_path, "weights": "w"}
    assert TrainRequest(**kw, val="v").refit is True
    assert TrainRequest(**kw, val="v", refit=False).refit is False  # --no-refit
    assert TrainRequest(**kw, val=None, k=2).refit is False


def test_train_request_refuses_contradictions(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="both --weights and --pretrained"):
        TrainRequest(backbone="test_vit", train="t", val="v", out=tmp_path, weights="w", pretrained=True)
    with pytest.raises(UsageError, match="--k auto chooses k on validation data"):
        TrainRequest(backbone="test_vit", train="t", val=None, out=tmp_path, weights="w")
    with pytest.raises(UsageError, match="--refit retrains on train \\+ val"):
        TrainRequest(backbone="test_vit", train="t", val=None, out=tmp_path, weights="w", k=2, refit=True)
    TrainRequest(backbone="test_vit", train="t", val=None, out=tmp_path, weights="w", method="linear")  # no k


def _request(tiny_checkpoint: dict, digits_lists: dict[str, Path], tiny_weights: Path, out: Path,
             **kw) -> TrainRequest:
    base = {"backbone": "test_vit", "weights": str(tiny_weights), "img_size": 32, "train": str(digits_lists["train"]),
            "val": str(digits_lists["val"]), "test": str(digits_lists["test"]), "out": out,
            "cache_dir": Path(tiny_checkpoint["out"]) / "cache", "progress": False}
    return TrainRequest(**{**base, **kw})


def test_tiny_pipeline_learns_well_above_chance(tiny_checkpoint: dict) -> None:
    assert tiny_checkpoint["k"] == 2 and tiny_checkpoint["method"] == "mist"
    assert tiny_checkpoint["val_top1"] > 0.5 and tiny_checkpoint["test_top1"] > 0.5  # 10 classes: chance 0.1
    assert tiny_checkpoint["cache_seconds"] > 0 and tiny_checkpoint["images"] == {"train": 800, "val": 200,
                                                                                    "test": 797}


def test_pipeline_is_deterministic_and_k_auto_searches(tiny_checkpoint, digits_lists, tiny_weights,
                                                       tmp_path: Path) -> None:
    params = TrainParams(epochs=2, min_steps=0, lr=1e-2, seed=3)
    reports = [run_training(_request(tiny_checkpoint, digits_lists, tiny_weights, tmp_path / f"r{i}", ks=(2, 4),
                                     params=params), log=lambda _m: None) for i in range(2)]
    a, b = reports
    assert a["cache_seconds"] == 0.0  # the session cache served every split
    assert a["k"] in (2, 4) and set(a["k_search"]) == {"2", "4"}
    assert a["val_top1"] == max(r["val_top1"] for r in a["k_search"].values())
    for key in ("k", "val_top1", "test_top1", "trainable_params", "k_search"):
        assert a[key] == b[key], key
    from safetensors.torch import load_file

    wa = load_file(str(Path(a["checkpoint"]) / "edge.safetensors"))
    wb = load_file(str(Path(b["checkpoint"]) / "edge.safetensors"))
    assert all(torch.equal(wa[n], wb[n]) for n in wa)


def test_refit_trains_on_train_plus_val(tiny_checkpoint, digits_lists, tiny_weights, tmp_path: Path) -> None:
    logs: list[str] = []
    report = run_training(_request(tiny_checkpoint, digits_lists, tiny_weights, tmp_path / "refit", k=2, refit=True,
                                   params=TrainParams(epochs=6, min_steps=0, lr=1e-2, seed=0)), log=logs.append)
    best_epoch = report["k_search"]["2"]["best_epoch"]
    assert report["refit"] is True and report["test_top1"] > 0.5
    assert f"refit on train + val for {best_epoch} epochs (k=2)" in logs  # as many epochs as val said was best
    from mist_kit.config import load_config

    cfg = load_config(report["checkpoint"])
    assert cfg.training["refit"] is True and cfg.method.k == 2 and cfg.metrics["test_top1"] == report["test_top1"]


def test_linear_method_learns(tiny_checkpoint, digits_lists, tiny_weights, tmp_path: Path) -> None:
    report = run_training(_request(tiny_checkpoint, digits_lists, tiny_weights, tmp_path / "lin", method="linear",
                                   params=TrainParams(epochs=15, min_steps=0, lr=3e-2, seed=0)), log=lambda _m: None)
    assert report["k"] is None and report["method"] == "linear"
    assert report["trainable_params"] == 64 * 10 + 10
    assert report["test_top1"] > 0.3  # random-init backbone, final cls token only: well above 0.1 chance
