"""A strong, honest linear-probe baseline: standardised multinomial logistic regression, C chosen on val.

Why this and not a few epochs of SGD on a `nn.Linear`: on ~1k-image tasks a linear probe's accuracy depends mostly
on its regularisation, and a weakly regularised or unscaled probe flatters whatever it is compared with. So the
features are standardised (per-dimension mean/std of the training rows), scikit-learn's L-BFGS logistic regression
is fitted for each C of a grid on train only, the C with the best val top-1 is kept (ties: lower val cross-entropy,
then the smaller C), and optionally the probe is refitted on train + val with that C. The test set is never seen.

The result is a torch-free linear head on the RAW features: the standardisation is folded into the weights,
    logits = ((x - mu) / sigma) @ A.T + a  =  x @ (A / sigma).T + (a - A @ (mu / sigma))  =  x @ W.T + b,
so an exported edge graph is the identity on the final-norm cls token and `head.safetensors` holds W [C, D], b [C].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mist_kit.errors import DependencyError, InputError, UsageError

DEFAULT_CS: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass(frozen=True)
class LinearProbeResult:
    """The chosen probe as a raw-feature linear head, plus the evidence for the choice."""

    weight: np.ndarray  # float32 [num_classes, D]: logits = x @ weight.T + bias on raw features
    bias: np.ndarray  # float32 [num_classes]
    C: float  # the inverse regularisation strength chosen on val
    val_top1_by_C: dict[float, float]  # val top-1 of the train-only fit for every C of the grid
    val_loss_by_C: dict[float, float]  # val cross-entropy (natural log) of the same fits; the tie-breaker
    refit: bool  # whether weight/bias come from a refit on train + val
    train_rows: int  # rows the returned head was fitted on
    iterations: int = 0  # L-BFGS iterations of the returned fit
    notes: list[str] = field(default_factory=list)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits [N, num_classes] for raw features x [N, D]."""
        return np.asarray(x, dtype=np.float32) @ self.weight.T + self.bias


def _sklearn():
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise DependencyError(f"scikit-learn is not installed ({exc}); install the training extra: "
                              "pip install 'mist-kit[train]'") from None
    return LogisticRegression, StandardScaler


def _check(name: str, x: np.ndarray, y: np.ndarray, num_classes: int | None) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    if x.ndim != 2:
        raise InputError(f"{name} features: expected a 2-D array [N, D], got shape {x.shape}")
    if y.shape != (len(x),):
        raise InputError(f"{name} labels: expected shape ({len(x)},) to match the features, got {y.shape}")
    if len(x) == 0:
        raise InputError(f"{name}: no rows")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or (num_classes is not None and y.max() >= num_classes):
        raise InputError(f"{name} labels: expected integers in [0, {num_classes}), got range {y.min()}..{y.max()}")
    if not np.isfinite(x).all():
        raise InputError(f"{name} features: contain NaN or infinity")
    return x, y.astype(np.int64)


def _fit(x: np.ndarray, y: np.ndarray, c: float, num_classes: int, seed: int, max_iter: int, tol: float
         ) -> tuple[np.ndarray, np.ndarray, int]:
    """Fit one standardised probe on (x, y); return its folded raw-feature head (W [K, D], b [K]) and iterations."""
    LogisticRegression, StandardScaler = _sklearn()
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=c, max_iter=max_iter, tol=tol, random_state=seed)
    clf.fit(scaler.transform(x), y)
    coef, intercept = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # binary: sklearn keeps one logit z for classes_[1]; [-z/2, z/2] has the same softmax
        coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    a = coef / scaler.scale_  # (K_present, D)
    b = intercept - a @ scaler.mean_  # (K_present,)
    weight = np.zeros((num_classes, x.shape[1]), np.float64)
    bias = np.full(num_classes, -1e4)  # a class absent from the training rows is never predicted
    weight[clf.classes_], bias[clf.classes_] = a, b
    return weight, bias, int(np.max(clf.n_iter_))


def fit_probe_head(x: np.ndarray, y: np.ndarray, c: float, *, num_classes: int, seed: int = 0, max_iter: int = 2000,
                   tol: float = 1e-4) -> tuple[np.ndarray, np.ndarray]:
    """One standardised probe with a given C on (x, y), as a raw-feature head (float32 W [K, D], b [K]): for a C
    already chosen on val, such as the refit of `train --probe-init` on train + val."""
    x, y = _check("probe", x, y, num_classes)
    w, b, _ = _fit(x, y, c, num_classes, seed, max_iter, tol)
    return w.astype(np.float32), b.astype(np.float32)


def _scores(weight: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    logits = x @ weight.T + bias
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(np.mean(np.argmax(logits, axis=1) == y)), float(-np.mean(logp[np.arange(len(y)), y]))


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
                     Cs: Sequence[float] = DEFAULT_CS, seed: int = 0, refit: bool = True,
                     num_classes: int | None = None, max_iter: int = 2000, tol: float = 1e-4) -> LinearProbeResult:
    """Choose C on (val_x, val_y) among `Cs` for a probe fitted on train only; return its raw-feature head.

    With `refit`, the returned head is refitted on train + val with the chosen C (the VTAB protocol's final
    model); the choice itself never changes. `num_classes` defaults to 1 + the largest label seen.
    """
    cs = sorted({float(c) for c in Cs})
    if not cs or any(not (c > 0 and np.isfinite(c)) for c in cs):
        raise UsageError(f"Cs must be a non-empty list of positive numbers, got {list(Cs)}")
    if max_iter < 1:
        raise UsageError(f"max_iter must be >= 1, got {max_iter}")
    tx, ty = _check("train", train_x, train_y, num_classes)
    vx, vy = _check("val", val_x, val_y, num_classes)
    if vx.shape[1] != tx.shape[1]:
        raise InputError(f"val features: expected width {tx.shape[1]} like train, got {vx.shape[1]}")
    k = num_classes if num_classes is not None else int(max(ty.max(), vy.max())) + 1
    if len(np.unique(ty)) < 2:
        raise InputError("train labels: a probe needs at least 2 classes among the training rows")
    top1_by_c, loss_by_c, iters = {}, {}, {}
    for c in cs:
        w, b, it = _fit(tx, ty, c, k, seed, max_iter, tol)
        top1_by_c[c], loss_by_c[c] = _scores(w, b, vx, vy)
        iters[c] = (w, b, it)
    best = min(cs, key=lambda c: (-top1_by_c[c], loss_by_c[c], c))
    notes = [f"C={c:g} stopped at max_iter={max_iter}" for c in cs if iters[c][2] >= max_iter]
    if refit:
        w, b, it = _fit(np.concatenate([tx, vx]), np.concatenate([ty, vy]), best, k, seed, max_iter, tol)
        rows = len(tx) + len(vx)
    else:
        (w, b, it), rows = iters[best], len(tx)
    return LinearProbeResult(weight=w.astype(np.float32), bias=b.astype(np.float32), C=best,
                             val_top1_by_C=top1_by_c, val_loss_by_C=loss_by_c, refit=refit, train_rows=rows,
                             iterations=it, notes=notes)
