"""The linear probe: C chosen on val only, deterministic, and its folded raw-feature head is the fitted model."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from mist_kit.errors import InputError, UsageError
from mist_kit.linear_probe import fit_linear_probe


def _blobs(seed: int, n: int, d: int = 12, k: int = 4, spread: float = 2.5, offset: float = 3.0):
    """Gaussian class blobs on un-standardised features (per-dimension scale and offset differ)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(100).normal(size=(k, d))
    y = rng.integers(0, k, size=n)
    scale = np.linspace(0.2, 5.0, d)
    x = (centres[y] + spread * rng.normal(size=(n, d))) * scale + offset
    return x.astype(np.float32), y


def test_choice_uses_val_only_and_refit_does_not_change_it() -> None:
    tx, ty = _blobs(0, 120)
    vx, vy = _blobs(1, 80)
    a = fit_linear_probe(tx, ty, vx, vy, Cs=(1e-3, 1e-2, 1.0), refit=False)
    b = fit_linear_probe(tx, ty, vx, vy, Cs=(1e-3, 1e-2, 1.0), refit=True)
    assert a.C == b.C and a.val_top1_by_C == b.val_top1_by_C
    assert a.train_rows == 120 and b.train_rows == 200
    assert not np.allclose(a.weight, b.weight)  # the refit saw val rows, the choice did not move
    perm = np.random.default_rng(2).permutation(len(vx))  # the choice is a function of the val set, not its order
    c = fit_linear_probe(tx, ty, vx[perm], vy[perm], Cs=(1e-3, 1e-2, 1.0), refit=False)
    assert c.C == a.C and c.val_top1_by_C == a.val_top1_by_C
    np.testing.assert_array_equal(c.weight, a.weight)


def test_val_labels_decide_the_choice() -> None:
    tx, ty = _blobs(3, 60, d=30, spread=3.0)
    vx, _ = _blobs(4, 120, d=30, spread=3.0)
    weak = fit_linear_probe(tx, ty, vx, np.zeros(len(vx), int), Cs=(1e-3,), refit=False, num_classes=4)
    strong = fit_linear_probe(tx, ty, vx, np.zeros(len(vx), int), Cs=(100.0,), refit=False, num_classes=4)
    p_weak, p_strong = weak.logits(vx).argmax(1), strong.logits(vx).argmax(1)
    assert (p_weak != p_strong).any()  # precondition: the two Cs disagree somewhere on val
    pick_weak = fit_linear_probe(tx, ty, vx, p_weak, Cs=(1e-3, 100.0), refit=False)
    pick_strong = fit_linear_probe(tx, ty, vx, p_strong, Cs=(1e-3, 100.0), refit=False)
    assert pick_weak.C == 1e-3 and pick_weak.val_top1_by_C[1e-3] == 1.0
    assert pick_strong.C == 100.0 and pick_strong.val_top1_by_C[100.0] == 1.0


def test_deterministic() -> None:
    tx, ty = _blobs(5, 100)
    vx, vy = _blobs(6, 50)
    a = fit_linear_probe(tx, ty, vx, vy, seed=0)
    b = fit_linear_probe(tx, ty, vx, vy, seed=0)
    np.testing.assert_array_equal(a.weight, b.weight)
    np.testing.assert_array_equal(a.bias, b.bias)
    assert a.C == b.C and a.val_top1_by_C == b.val_top1_by_C


@pytest.mark.parametrize("k", [2, 5])
def test_folded_head_matches_sklearn_on_standardised_features(k: int) -> None:
    tx, ty = _blobs(7, 150, k=k)
    vx, vy = _blobs(8, 60, k=k)
    res = fit_linear_probe(tx, ty, vx, vy, Cs=(0.05, 0.5), refit=False)
    scaler = StandardScaler().fit(tx.astype(np.float64))
    clf = LogisticRegression(C=res.C, max_iter=2000, tol=1e-4).fit(scaler.transform(tx.astype(np.float64)), ty)
    z = scaler.transform(vx.astype(np.float64))
    logits = res.logits(vx)
    assert logits.shape == (len(vx), k) and res.weight.shape == (k, tx.shape[1])
    np.testing.assert_array_equal(logits.argmax(1), clf.predict(z))
    np.testing.assert_allclose(softmax(logits.astype(np.float64), axis=1), clf.predict_proba(z), atol=1e-4)
    if k > 2:
        np.testing.assert_allclose(logits, clf.decision_function(z), rtol=1e-4, atol=1e-3)
    else:  # sklearn's binary decision function is the logit difference
        np.testing.assert_allclose(logits[:, 1] - logits[:, 0], clf.decision_function(z), rtol=1e-4, atol=1e-3)


def test_matches_an_independent_reference_solver() -> None:
    """L-BFGS (scipy) on 0.5*|W|^2 + C * sum cross-entropy over hand-standardised features, intercept unpenalised."""
    tx, ty = _blobs(9, 90, d=6, k=3)
    vx, vy = _blobs(10, 40, d=6, k=3)
    res = fit_linear_probe(tx, ty, vx, vy, Cs=(0.3,), refit=False, tol=1e-8, max_iter=5000)
    x64 = tx.astype(np.float64)
    mu, sd = x64.mean(0), x64.std(0)
    z = (x64 - mu) / sd
    n, d, k = len(z), z.shape[1], 3
    onehot = np.eye(k)[ty]

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: k * d].reshape(k, d), theta[k * d:]
        logp = log_softmax(z @ w.T + b, axis=1)
        g = 0.3 * (np.exp(logp) - onehot)  # (n, k)
        return 0.5 * np.sum(w * w) - 0.3 * np.sum(onehot * logp), np.concatenate([(g.T @ z + w).ravel(), g.sum(0)])

    sol = minimize(objective, np.zeros(k * d + k), jac=True, method="L-BFGS-B", options={"gtol": 1e-10,
                                                                                        "maxiter": 10000})
    w, b = sol.x[: k * d].reshape(k, d), sol.x[k * d:]
    ref = softmax(((vx.astype(np.float64) - mu) / sd) @ w.T + b, axis=1)
    np.testing.assert_allclose(softmax(res.logits(vx).astype(np.float64), axis=1), ref, atol=2e-4)
    assert n == res.train_rows


def test_class_absent_from_train_is_never_predicted() -> None:
    tx, ty = _blobs(11, 80, k=3)
    vx, vy = _blobs(12, 30, k=3)
    res = fit_linear_probe(tx, ty, vx, vy, Cs=(1.0,), num_classes=5, refit=False)
    assert res.weight.shape == (5, tx.shape[1]) and res.bias.shape == (5,)
    assert set(np.unique(res.logits(vx).argmax(1))) <= {0, 1, 2}


def test_bad_input_is_one_clear_error() -> None:
    tx, ty = _blobs(13, 40)
    vx, vy = _blobs(14, 20)
    with pytest.raises(InputError, match="val labels"):
        fit_linear_probe(tx, ty, vx, vy[:5])
    with pytest.raises(InputError, match="val features: expected width"):
        fit_linear_probe(tx, ty, vx[:, :3], vy)
    with pytest.raises(InputError, match="train features: expected a 2-D"):
        fit_linear_probe(tx[0], ty, vx, vy)
    with pytest.raises(UsageError, match="Cs must be"):
        fit_linear_probe(tx, ty, vx, vy, Cs=(0.0,))
    with pytest.raises(InputError, match="at least 2 classes"):
        fit_linear_probe(tx, np.zeros_like(ty), vx, vy)
