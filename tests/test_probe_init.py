"""`train --probe-init`: every MIST head (cls-token extension) starts from the linear probe on the cls token.

Checked against independent references: at the start the network's eval logits equal the probe's own
`x_cls @ W.T + b` in numpy; in the pipeline the starting heads are the probe fitted on train only with the C that
val chose, and the refit's is the same C refitted on train + val (scikit-learn called here directly).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mist_kit.edge import create_edge_method
from mist_kit.errors import UsageError
from mist_kit.pipeline import TrainRequest, run_training
from mist_kit.runtime.plan import BackboneShape
from mist_kit.train import TrainParams

SHAPE = BackboneShape(16, 5, 1, 6)


def test_the_started_network_computes_the_probes_logits() -> None:
    model = create_edge_method("mist", backbone=SHAPE, depth=2, num_classes=3, params={"cls_token": True}, seed=0)
    for block in model.blocks:  # non-trivial LAE embedding: its half of the head must be what is zeroed
        torch.nn.init.normal_(block.o.weight, std=0.1)
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(3, 16)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    model.init_head_from_probe(w, b)
    g = rng.normal(size=(4, 5, 16)).astype(np.float32)
    c = rng.normal(size=(4, 1, 16)).astype(np.float32)
    with torch.no_grad():
        got = model.eval()({"gather": torch.from_numpy(g), "cls": torch.from_numpy(c)}).numpy()
    np.testing.assert_allclose(got, c[:, 0] @ w.T + b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expected weight"):
        model.init_head_from_probe(w[:, :8], b)


def test_probe_init_needs_a_raw_cls_input_and_val() -> None:
    plain = create_edge_method("mist", backbone=SHAPE, depth=2, num_classes=3, seed=0)
    with pytest.raises(ValueError, match="no input its head reads raw"):
        plain.init_head_from_probe(np.zeros((3, 16), np.float32), np.zeros(3, np.float32))
    with pytest.raises(UsageError, match="does not read it raw"):
        TrainRequest(backbone="test_vit", train="t", val="v", out=Path("o"), probe_init=True,
                     method_params={"cls_token": False})
    with pytest.raises(UsageError, match="does not read it raw"):
        TrainRequest(backbone="test_vit", train="t", val="v", out=Path("o"), probe_init=True, method="vitsplit")
    with pytest.raises(UsageError, match="pass --val"):
        TrainRequest(backbone="test_vit", train="t", val=None, k=2, out=Path("o"), probe_init=True,
                     method_params={"cls_token": True})


def _probe_reference(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn directly: standardise, fit, fold the scaling into raw-feature weights (binary excluded)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=c, max_iter=2000, tol=1e-4, random_state=0).fit(scaler.transform(x), y)
    w = clf.coef_ / scaler.scale_
    return w, clf.intercept_ - w @ scaler.mean_


def test_pipeline_starts_search_and_refit_from_the_val_chosen_probe(tiny_checkpoint, digits_lists, tiny_weights,
                                                                    tmp_path: Path, monkeypatch) -> None:
    import mist_kit.edge.base as base

    started: list[tuple[np.ndarray, np.ndarray]] = []
    original = base.EdgeMethod.init_head_from_probe

    def spy(self, weight, bias):
        started.append((np.array(weight), np.array(bias)))
        original(self, weight, bias)

    monkeypatch.setattr(base.EdgeMethod, "init_head_from_probe", spy)
    cache = Path(tiny_checkpoint["out"]) / "cache"
    req = TrainRequest(backbone="test_vit", weights=str(tiny_weights), img_size=32, train=str(digits_lists["train"]),
                       val=str(digits_lists["val"]), out=tmp_path / "p", ks=(2, 4), progress=False,
                       method_params={"cls_token": True}, cache_dir=cache, probe_init=True,
                       params=TrainParams(epochs=2, min_steps=0, lr=1e-2, seed=0))
    report = run_training(req, log=lambda _m: None)
    c = report["probe_init"]["C"]
    assert len(started) == 3  # two candidates (one probe: the same fp32 cls rows), then the refit
    np.testing.assert_array_equal(started[0][0], started[1][0])

    from mist_kit.backbone import load_backbone  # the cls rows, straight from the cache the pipeline filled
    from mist_kit.data import load_image_list
    from mist_kit.featurize import cache_features
    from mist_kit.runtime.plan import FINAL_CLS

    bb, spec = load_backbone("test_vit", img_size=32, weights=str(tiny_weights))

    def rows(split: str) -> tuple[np.ndarray, np.ndarray]:
        cached, secs, _ = cache_features(bb, spec, load_image_list(str(digits_lists[split])), cache, {FINAL_CLS},
                                         progress=False, log=lambda _m: None)
        assert secs == 0.0  # a cache hit: the same rows training read
        ok = cached.valid()
        return np.asarray(cached.array(str(FINAL_CLS)))[ok][:, 0], np.asarray(cached.labels())[ok]

    (tx, ty), (vx, vy) = rows("train"), rows("val")
    w, b = _probe_reference(tx.astype(np.float64), ty, c)
    np.testing.assert_allclose(started[0][0], w, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(started[0][1], b, rtol=1e-3, atol=1e-4)
    w, b = _probe_reference(np.concatenate([tx, vx]).astype(np.float64), np.concatenate([ty, vy]), c)
    np.testing.assert_allclose(started[2][0], w, rtol=1e-3, atol=1e-4)
    assert report["refit"] is True and report["val_top1"] > 0.3
    linear = run_training(TrainRequest(backbone="test_vit", weights=str(tiny_weights), img_size=32,
                                       train=str(digits_lists["train"]), val=str(digits_lists["val"]),
                                       out=tmp_path / "lin", method="linear", cache_dir=cache, progress=False),
                          log=lambda _m: None)
    assert c == linear["probe"]["C"]  # the baseline's own choice on val: the prior is that probe
