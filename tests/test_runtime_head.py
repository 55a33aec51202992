"""On-device head training against independent references, and the versioned head store with rollback."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mist_kit.errors import InputError
from mist_kit.runtime.bundle import EdgeBundle, Head
from mist_kit.runtime.head import HeadTrainParams, extend_head, loss_and_grad, train_head
from mist_kit.runtime.head_store import HeadStateError, HeadStore, default_state_dir


def _blobs(rng: np.random.Generator, n: int = 240, e: int = 8, c: int = 3) -> tuple[np.ndarray, np.ndarray]:
    centers = rng.standard_normal((c, e)) * 1.5
    y = rng.integers(0, c, n)
    return (centers[y] + rng.standard_normal((n, e))).astype(np.float32), y


def _zero_head(c: int, e: int) -> Head:
    return Head(np.zeros((c, e), np.float32), np.zeros(c, np.float32), tuple(f"c{i}" for i in range(c)))


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((17, 6)), rng.integers(0, 4, 17)
    w, b, wd = rng.standard_normal((4, 6)), rng.standard_normal(4), 0.3
    _, gw, gb = loss_and_grad(w, b, x, y, wd)
    eps = 1e-6
    num_w = np.zeros_like(w)
    for i in np.ndindex(*w.shape):
        d = np.zeros_like(w)
        d[i] = eps
        num_w[i] = (loss_and_grad(w + d, b, x, y, wd)[0] - loss_and_grad(w - d, b, x, y, wd)[0]) / (2 * eps)
    num_b = np.array([(loss_and_grad(w, b + eps * np.eye(4)[j], x, y, wd)[0]
                       - loss_and_grad(w, b - eps * np.eye(4)[j], x, y, wd)[0]) / (2 * eps) for j in range(4)])
    np.testing.assert_allclose(gw, num_w, atol=1e-7)
    np.testing.assert_allclose(gb, num_b, atol=1e-7)


def test_training_reaches_sklearn_logistic_regression_optimum():
    sklearn = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(1)
    x, y = _blobs(rng)
    n, wd = len(y), 1e-2
    res = train_head(x, y, _zero_head(3, 8), HeadTrainParams(epochs=1500, lr=0.02, batch_size=n, weight_decay=wd,
                                                             val_fraction=0.0))
    # same objective: sklearn minimises 0.5||W||^2 + C * sum CE; C = 1/(n wd) gives mean CE + wd/2 ||W||^2
    ref = sklearn.LogisticRegression(C=1 / (n * wd), tol=1e-12, max_iter=100_000).fit(x.astype(np.float64), y)
    ours = loss_and_grad(res.head.weight.astype(np.float64), res.head.bias.astype(np.float64), x, y, wd)[0]
    theirs = loss_and_grad(ref.coef_, ref.intercept_, x, y, wd)[0]
    assert ours == pytest.approx(theirs, abs=1e-5)
    np.testing.assert_allclose(res.head.weight, ref.coef_, atol=5e-3)
    # softmax is invariant to a common bias shift: compare centred biases
    np.testing.assert_allclose(res.head.bias - res.head.bias.mean(), ref.intercept_ - ref.intercept_.mean(),
                               atol=5e-3)


def test_early_stopping_new_classes_and_bad_labels():
    rng = np.random.default_rng(2)
    x, y = _blobs(rng, n=300, c=4)
    start = _zero_head(3, 8)
    res = train_head(x, y, start, HeadTrainParams(epochs=200, lr=0.05, patience=3), new_classes=("new",))
    assert res.head.classes == ("c0", "c1", "c2", "new") and res.head.weight.shape == (4, 8)
    assert res.n_val == 60 and res.epochs_run < 200 and res.best_epoch <= res.epochs_run
    assert res.val_top1_after > 0.8 > res.val_top1_before  # the zero head predicts class 0 only
    with pytest.raises(InputError, match=r"labels span 0\.\.3, the head has 3 classes"):
        train_head(x, y, start)
    with pytest.raises(InputError, match="already exist"):
        extend_head(start, ("c1",))


def _fake_bundle(tmp_path) -> EdgeBundle:
    root = tmp_path / "bundle"
    root.mkdir()
    manifest = {"edge": {"file": "edge.onnx"}, "files": {"edge.onnx": {"sha256": "ab" * 32, "bytes": 1}}}
    return EdgeBundle(root=root, manifest=manifest, edge_path=root / "edge.onnx", head=_zero_head(3, 8),
                      classes=("c0", "c1", "c2"))


def _head(seed: int, c: int = 3) -> Head:
    rng = np.random.default_rng(seed)
    return Head(rng.standard_normal((c, 8)).astype(np.float32), rng.standard_normal(c).astype(np.float32),
                tuple(f"c{i}" for i in range(c)))


def test_store_versions_and_rollback(tmp_path):
    bundle = _fake_bundle(tmp_path)
    store = HeadStore(bundle)
    assert store.dir == default_state_dir(bundle.root) and store.load() is bundle.head
    assert not store.dir.exists()  # nothing written until a head is saved
    v1 = store.save(_head(1))
    v2 = store.save(extend_head(_head(2), ("bird",)))
    assert (v1, v2) == (1, 2) and store.load().classes[-1] == "bird"
    assert list(bundle.root.iterdir()) == []  # the bundle itself is never touched
    assert store.rollback() == (2, 1)
    np.testing.assert_array_equal(store.load().weight, _head(1).weight)
    assert store.rollback() == (1, 0)
    assert store.load() is bundle.head
    with pytest.raises(HeadStateError, match="nothing to roll back"):
        store.rollback()
    assert store.save(_head(3)) == 3  # versions keep increasing; old files are kept
    assert store.versions() == [1, 2, 3]


def test_store_refuses_tampered_or_foreign_heads(tmp_path):
    bundle = _fake_bundle(tmp_path)
    store = HeadStore(bundle)
    store.save(_head(1))
    path = store.dir / "head-v0001.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(HeadStateError, match="sha256 does not match"):
        store.load()
    state = json.loads((store.dir / "current.json").read_text())
    state["edge_sha256"] = "cd" * 32
    (store.dir / "current.json").write_text(json.dumps(state))
    with pytest.raises(HeadStateError, match="another edge graph"):
        store.load()
