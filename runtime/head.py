"""On-device training of the linear head in numpy: softmax cross-entropy + L2 weight decay, Adam, early stopping.

Why only the head: the edge graph is int8 and frozen on the device; its embeddings of the device's own labelled
samples are computed once, and a multinomial logistic regression on them fits in a few MB and seconds on a Pi.
Training starts from the current head (fine-tuning, not re-learning); new classes get zero-initialised rows.
The objective is mean cross-entropy + weight_decay/2 * ||W||^2 (bias not decayed), the same convex problem as
scikit-learn's LogisticRegression(C = 1 / (N * weight_decay)), which the tests use as the reference. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mist_kit.errors import InputError
from mist_kit.runtime.bundle import Head


@dataclass(frozen=True)
class HeadTrainParams:
    """Hyperparameters; the constructor rejects impossible settings."""

    epochs: int = 100
    lr: float = 1e-2
    batch_size: int = 64
    weight_decay: float = 1e-4
    val_fraction: float = 0.2  # held-out part for early stopping (0 = none: train for all epochs)
    patience: int = 10  # epochs without a better held-out loss before stopping
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise InputError(f"epochs/batch_size/patience: expected >= 1, got {self.epochs}/{self.batch_size}/"
                             f"{self.patience}")
        if not 0 <= self.val_fraction < 1:
            raise InputError(f"val_fraction: expected 0 <= f < 1, got {self.val_fraction}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise InputError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}/{self.weight_decay}")


@dataclass
class HeadTrainResult:
    """The trained head plus what happened, for the report."""

    head: Head
    epochs_run: int
    best_epoch: int
    n_train: int
    n_val: int
    train_loss: float
    val_loss: float | None
    val_top1_before: float | None
    val_top1_after: float | None
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"epochs_run": self.epochs_run, "best_epoch": self.best_epoch, "n_train": self.n_train,
                "n_val": self.n_val, "train_loss": round(self.train_loss, 6),
                "val_loss": None if self.val_loss is None else round(self.val_loss, 6),
                "val_top1_before": self.val_top1_before, "val_top1_after": self.val_top1_after}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def loss_and_grad(weight: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray,
                  weight_decay: float) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean softmax cross-entropy + weight_decay/2 * ||W||^2 and its gradients w.r.t. W (C, E) and b (C,)."""
    n = x.shape[0]
    logits = x @ weight.T + bias  # (N, C)
    z = logits - logits.max(axis=1, keepdims=True)
    logsum = np.log(np.exp(z).sum(axis=1))
    loss = float((logsum - z[np.arange(n), y]).mean()) + 0.5 * weight_decay * float((weight * weight).sum())
    probs = np.exp(z - logsum[:, None])  # (N, C)
    probs[np.arange(n), y] -= 1.0
    probs /= n
    grad_w = probs.T @ x + weight_decay * weight  # (C, E)
    grad_b = probs.sum(axis=0)  # (C,)
    return loss, grad_w, grad_b


def top1(head: Head, x: np.ndarray, y: np.ndarray) -> float | None:
    """Fraction of rows whose argmax logit is the label; None for no rows. Labels the head lacks count as errors."""
    if len(y) == 0:
        return None
    return round(float((head.logits(x).argmax(axis=1) == y).mean()), 6)


def extend_head(head: Head, new_classes: tuple[str, ...]) -> Head:
    """Add zero-initialised rows for new classes (names must be new)."""
    dup = sorted(set(new_classes) & set(head.classes)) or sorted({c for c in new_classes if new_classes.count(c) > 1})
    if dup:
        raise InputError(f"--new-classes: {dup} already exist or repeat (head has {len(head.classes)} classes)")
    if not new_classes:
        return head
    e = head.embedding_dim
    weight = np.concatenate([head.weight, np.zeros((len(new_classes), e), np.float32)])
    bias = np.concatenate([head.bias, np.zeros(len(new_classes), np.float32)])
    return Head(weight=weight, bias=bias, classes=head.classes + tuple(new_classes), version=head.version)


def _split(n: int, params: HeadTrainParams, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(n)
    n_val = round(n * params.val_fraction) if n >= 10 else 0
    return perm[n_val:], perm[:n_val]


def train_head(x: np.ndarray, y: np.ndarray, head: Head, params: HeadTrainParams | None = None,
               new_classes: tuple[str, ...] = ()) -> HeadTrainResult:
    """Fine-tune `head` (extended by `new_classes`) on embeddings x (N, E) with labels y (N,) in [0, C).

    Adam on minibatches of the training part; after each epoch the held-out loss decides the best weights and
    early stopping. Top-1 on the held-out part is reported for the starting and the final head.
    """
    params = params or HeadTrainParams()
    start = extend_head(head, new_classes)
    c, e = start.weight.shape
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != e or y.shape != (x.shape[0],):
        raise InputError(f"embeddings {list(x.shape)} / labels {list(y.shape)}: expected [N, {e}] and [N]")
    if len(y) == 0:
        raise InputError("no labelled samples to train on (labels are all -1 or missing)")
    if y.min() < 0 or y.max() >= c:
        raise InputError(f"labels span {int(y.min())}..{int(y.max())}, the head has {c} classes "
                         f"({len(head.classes)} + {len(new_classes)} new); name new classes with --new-classes")
    rng = np.random.default_rng(params.seed)
    tr, va = _split(len(y), params, rng)
    xt, yt, xv, yv = x[tr], y[tr], x[va], y[va]
    weight, bias = start.weight.astype(np.float32).copy(), start.bias.astype(np.float32).copy()
    m = [np.zeros_like(weight), np.zeros_like(bias)]
    v = [np.zeros_like(weight), np.zeros_like(bias)]
    b1, b2, eps, step = 0.9, 0.999, 1e-8, 0
    # epoch 0 = the starting head: training never returns a head worse on the held-out loss than it began with
    start_loss = loss_and_grad(weight, bias, xv, yv, 0.0)[0] if len(yv) else np.inf
    best = (start_loss, weight.copy(), bias.copy(), 0)
    history: list[dict[str, float]] = []
    since_best, epoch = 0, 0
    for epoch in range(1, params.epochs + 1):
        order = rng.permutation(len(yt))
        for s in range(0, len(order), params.batch_size):
            idx = order[s:s + params.batch_size]
            _, gw, gb = loss_and_grad(weight, bias, xt[idx], yt[idx], params.weight_decay)
            step += 1
            for i, (p, g) in enumerate(((weight, gw), (bias, gb))):
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g * g
                p -= params.lr * (m[i] / (1 - b1 ** step)) / (np.sqrt(v[i] / (1 - b2 ** step)) + eps)
        train_loss = loss_and_grad(weight, bias, xt, yt, params.weight_decay)[0]
        val_loss = loss_and_grad(weight, bias, xv, yv, 0.0)[0] if len(yv) else train_loss
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        if val_loss < best[0] - 1e-7:
            best, since_best = (val_loss, weight.copy(), bias.copy(), epoch), 0
        else:
            since_best += 1
            if len(yv) and since_best >= params.patience:
                break
    _, bw, bb, best_epoch = best
    trained = Head(weight=bw, bias=bb, classes=start.classes, version=head.version)
    return HeadTrainResult(head=trained, epochs_run=epoch, best_epoch=best_epoch, n_train=len(yt), n_val=len(yv),
                           train_loss=loss_and_grad(bw, bb, xt, yt, params.weight_decay)[0],
                           val_loss=loss_and_grad(bw, bb, xv, yv, 0.0)[0] if len(yv) else None,
                           val_top1_before=top1(head, xv, yv), val_top1_after=top1(trained, xv, yv),
                           history=history)
