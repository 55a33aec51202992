"""Training edge methods from cached features: AdamW, warmup + cosine schedule, seeded, early-stopped on val.

Several candidates (one per k) train in one loop over the same shuffled batches, each with its own optimiser,
and each stops when its validation top-1 has not improved for `patience` epochs. That is MIST's k selection on
validation data at the cost of one training run per candidate, with no extra backbone passes. With
`prune_margin`, a candidate whose best val top-1 trails the leader's by more than the margin after `prune_after`
epochs is stopped at once: collapsed candidates stop costing epochs. With `halving` (successive halving), at
epochs `prune_after`, 2x, 4x, ... only the better half of the remaining candidates (by best val top-1, ties to the
lower val loss) keeps training: candidates that cannot win stop early even when they trail by less than the margin.

Two regularisers need no extra backbone pass: `ema` keeps an exponential moving average of the weights (timm's
`ModelEmaV3`, with its warmup) and evaluates, keeps and exports the average; `mixup` trains on convex mixtures of
two cached feature rows and of their labels (Zhang et al., 2018), applied to every tensor the method reads.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import math
import sys
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from timm.utils import ModelEmaV3
from torch import nn

from mist_kit.cache import InputRows
from mist_kit.edge.base import EdgeMethod
from mist_kit.errors import UsageError

FeatureTransform = Callable[[np.ndarray], np.ndarray]
Transforms = Mapping[str, FeatureTransform | None]  # sent tensor name -> codec round trip (None: lossless)
Inputs = InputRows | Mapping[str, np.ndarray] | np.ndarray
EpochCallback = Callable[[int, dict[Hashable, dict[str, float]]], None]


@dataclass(frozen=True)
class TrainParams:
    """Optimisation settings. The defaults are the recipe measured in BENCHMARKS.md ("Accuracy levers"): on
    Caltech-101 VTAB-1k, faces2 and few10 it beat the old defaults (epochs 30, wd 1e-2, patience 8, no smoothing)
    on val with 3 seeds each.

    `min_steps` counts training length in optimiser steps, not epochs: a 100-image task has 4 steps per epoch, so
    20 epochs would be 80 steps, too few for the LAE to converge (few10: +6.8 pt test with the floor). When
    `epochs x steps per epoch` falls short of it, epochs, patience and warmup grow by one factor (`for_rows`);
    ~1k-image tasks already have 500 steps and are unchanged. 0 turns the floor off.
    """

    epochs: int = 20
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    label_smoothing: float = 0.1
    patience: int = 4
    seed: int = 0
    min_steps: int = 500
    prune_margin: float | None = 0.1  # stop a candidate trailing the best val top-1 by more than this
    prune_after: int = 3  # ... once it has trained this many epochs
    precision: str = "fp32"  # "bf16": training forward/backward under CPU bf16 autocast (see train_autocast)
    halving: bool = True  # k search: at prune_after x 1, 2, 4, ... epochs keep only the better half of candidates
    ema: float = 0.0  # decay of an exponential moving average of the weights (0: off); the average is kept
    mixup: float = 0.0  # Beta(a, a) feature mixup on cached rows (0: off)
    refit_min_steps: int | None = None  # the refit on train + val trains at least this many steps (None: min_steps)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise UsageError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise UsageError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.label_smoothing < 1:
            raise UsageError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.patience < 1:
            raise UsageError(f"--patience must be >= 1, got {self.patience}")
        if self.prune_margin is not None and not 0 <= self.prune_margin <= 1:
            raise UsageError(f"--prune-margin must be in [0, 1] (a top-1 fraction), got {self.prune_margin}")
        if self.prune_after < 1:
            raise UsageError(f"--prune-after must be >= 1, got {self.prune_after}")
        if self.min_steps < 0:
            raise UsageError(f"--min-steps must be >= 0, got {self.min_steps}")
        if not 0 <= self.ema < 1:
            raise UsageError(f"--ema must be in [0, 1) (a decay; 0 is off), got {self.ema}")
        if self.mixup < 0:
            raise UsageError(f"--mixup must be >= 0 (a Beta alpha; 0 is off), got {self.mixup}")
        if self.refit_min_steps is not None and self.refit_min_steps < 0:
            raise UsageError(f"--refit-min-steps must be >= 0, got {self.refit_min_steps}")
        if self.precision not in ("fp32", "bf16"):
            raise UsageError(f"--train-precision must be fp32 or bf16, got {self.precision!r}")
        if self.precision == "bf16" and not cpu_has_bf16():
            raise UsageError("--train-precision bf16: this CPU has no bf16 instructions (avx512_bf16 or AMX); "
                             "use fp32")

    @property
    def refit_floor(self) -> int:
        """Optimiser steps the refit on train + val takes at least: `refit_min_steps`, by default `min_steps` (a
        refit is a training run like the search; see pipeline.refit_epochs for why it needs the floor)."""
        return self.min_steps if self.refit_min_steps is None else self.refit_min_steps

    def for_rows(self, n: int) -> TrainParams:
        """These settings for `n` training rows with the `min_steps` floor applied (and then switched off, so a
        second call, or a refit that sets its own epoch count, changes nothing)."""
        if not self.min_steps:
            return self
        steps = max(1, math.ceil(n / self.batch_size))
        f = max(1.0, self.min_steps / (steps * self.epochs))
        return replace(self, epochs=math.ceil(self.epochs * f), patience=math.ceil(self.patience * f),
                       warmup_epochs=math.ceil(self.warmup_epochs * f), prune_after=math.ceil(self.prune_after * f),
                       min_steps=0)


def cpu_has_bf16() -> bool:
    """Whether bf16 matmuls run natively here (AVX-512 BF16 or AMX); emulated bf16 is slower than fp32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def train_autocast(params: TrainParams) -> Any:
    """The context the training step runs in. bf16 autocast on an AMX / AVX-512-BF16 CPU: measured on ViT-S/14
    shapes (batch 32, 1 thread), one vitsplit step (3 copied blocks + prior head) 6.34 s -> 2.17 s and vitsplit-lite
    0.24 -> 0.10 s; MIST's LAE does not gain (0.14 -> 0.15 s: its products are too small). Parameters, optimiser
    and evaluation stay fp32, so the exported graphs are what they were."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=params.precision == "bf16")


@dataclass
class FitResult:
    """One candidate's outcome: the state to keep (best on val, or last without val) and its history."""

    state: dict[str, torch.Tensor]
    best_epoch: int
    best_val_top1: float | None
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    best_val_loss: float | None = None  # val cross-entropy of the kept state: breaks ties in val top-1


def _schedule(params: TrainParams, steps_per_epoch: int) -> Callable[[int], float]:
    total = params.epochs * steps_per_epoch
    warmup = min(params.warmup_epochs * steps_per_epoch, total // 2)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def as_rows(model: EdgeMethod, x: Inputs) -> InputRows:
    """Accept cached rows, in-memory arrays by tensor name, or one array for a single-input method."""
    if isinstance(x, InputRows):
        return x
    if isinstance(x, np.ndarray):
        names = list(model.input_shapes)
        if len(names) != 1:
            raise UsageError(f"method {model.method_name!r} takes {names}; pass a mapping name -> array")
        return InputRows.of({names[0]: x})
    return InputRows.of(x)


def _as_transforms(model: EdgeMethod, transform: FeatureTransform | Transforms | None) -> Transforms:
    if transform is None or isinstance(transform, Mapping):
        return transform or {}
    return dict.fromkeys(model.input_shapes, transform)


def _batch(x: InputRows, idx: np.ndarray, transforms: Transforms) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(arr)) for name, arr in x.batch(idx, transforms).items()}


@torch.no_grad()
def predict_logits(model: EdgeMethod, x: Inputs, transform: FeatureTransform | Transforms | None = None,
                   batch_size: int = 256) -> np.ndarray:
    """Logits [N, C] for cached inputs `x` (float16 or float32, any N), read a batch at a time."""
    model.eval()
    rows, tx = as_rows(model, x), _as_transforms(model, transform)
    out = [model(_batch(rows, np.arange(i, min(i + batch_size, len(rows))), tx)).numpy()
           for i in range(0, len(rows), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, model.num_classes), np.float32)


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose argmax equals the label."""
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels))) if len(labels) else 0.0


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)
_GLIBC_TRIM_DEFAULT, _GLIBC_MMAP_MAX_DEFAULT = 128 * 1024, 65536


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Keep freed activation buffers in the heap for the next step instead of handing them back to the kernel.

    Why: a ViT-S/14 batch of 32 makes [32, 257, 384] float32 activations of 12.6 MB each, a dozen per step kept
    for backward. glibc serves blocks that large with fresh mmap()s and returns them on free, so every step
    page-faults ~150 MB of zeroed pages again: a residual add measured 9-14 ms on fresh memory against 0.9 ms on
    reused memory, and an epoch of `fit` 20-25% more CPU time. Serving everything from the heap (no mmap) and
    not trimming it while training removes that; the allocator is restored and the heap trimmed afterwards.
    Arithmetic is untouched (same weights, bit for bit). A no-op off glibc.
    """
    libc = None
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            if not libc.mallopt(_M_MMAP_MAX, 0):  # not glibc's allocator (musl: a stub that returns 0)
                libc = None
            else:
                libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX_DEFAULT)
            libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM_DEFAULT)
            libc.malloc_trim(0)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean natural-log cross-entropy of `logits` [N, C] against integer labels (no smoothing), in float64."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-np.mean(logp[np.arange(len(z)), np.asarray(labels)])) if len(z) else 0.0


def improves(acc: float, loss: float, best_acc: float | None, best_loss: float | None) -> bool:
    """Whether an epoch with val (top-1, loss) beats the kept one: higher top-1, or equal top-1 and lower loss.

    The loss tie-break matters when val saturates: on faces2 (27 val images) top-1 is 100% from epoch 3 on, and
    keeping the first best epoch stopped training (and sized the refit) at 3 epochs while the model kept improving.
    The linear probe breaks its C ties the same way.
    """
    if best_acc is None or acc > best_acc:
        return True
    return acc == best_acc and best_loss is not None and loss < best_loss


def halving_rung(epoch: int, params: TrainParams) -> bool:
    """Whether successive halving cuts the candidates after this epoch: at prune_after x 1, 2, 4, ..."""
    if not params.halving or epoch < params.prune_after or epoch % params.prune_after:
        return False
    rung = epoch // params.prune_after
    return rung & (rung - 1) == 0


def halve(results: Mapping[Hashable, FitResult], alive: set[Hashable]) -> set[Hashable]:
    """The better half (rounded up) of the `alive` candidates: best val top-1, ties to the lower val loss, then
    to the first listed. Candidates stopped by patience still count: one that stopped on top is not overtaken."""
    order = list(results)
    ranked = sorted(alive, key=lambda key: (-(results[key].best_val_top1 or 0.0),
                                            results[key].best_val_loss or 0.0, order.index(key)))
    return set(ranked[: math.ceil(len(ranked) / 2)])


def mix_batch(batch: dict[str, torch.Tensor], lam: float, perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mixup of cached rows: every tensor the method reads becomes lam * row + (1 - lam) * row[perm]."""
    return {name: t * lam + t[perm] * (1.0 - lam) for name, t in batch.items()}


def fit_candidates(models: Mapping[Hashable, EdgeMethod], train_x: Mapping[Hashable, Inputs],
                   train_y: np.ndarray, params: TrainParams,
                   val_x: Mapping[Hashable, Inputs] | None = None, val_y: np.ndarray | None = None,
                   transform: FeatureTransform | Mapping[Hashable, Transforms | FeatureTransform | None] | None
                   = None, on_epoch: EpochCallback | None = None) -> dict[Hashable, FitResult]:
    """Train every candidate on the same batch sequence; with val data, keep each one's best-val state (ties in
    val top-1: the lower val loss). `params.min_steps` is applied here for `len(train_y)` rows (`for_rows`).

    `transform` may be one callable for all candidates or, per candidate key, a callable or a mapping tensor
    name -> callable (codecs calibrated per k and per tensor). Batches stream from the cache's memory maps.
    """
    raw = transform if isinstance(transform, Mapping) else dict.fromkeys(models, transform)
    per_key = {key: _as_transforms(models[key], raw.get(key)) for key in models}
    tx = {key: as_rows(models[key], train_x[key]) for key in models}
    vx = None if val_x is None else {key: as_rows(models[key], val_x[key]) for key in models}
    params = params.for_rows(len(train_y))
    rng = np.random.default_rng(params.seed)
    n = len(train_y)
    steps_per_epoch = max(1, math.ceil(n / params.batch_size))
    y_all = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=params.label_smoothing)
    opts, scheds = {}, {}
    for key, model in models.items():
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"], "lr": params.lr * g["lr_scale"]}
                  for g in model.param_groups(params.weight_decay) if g["params"]]
        opts[key] = torch.optim.AdamW(groups, lr=params.lr)
        scheds[key] = torch.optim.lr_scheduler.LambdaLR(opts[key], _schedule(params, steps_per_epoch))
    results = {key: FitResult(state=copy.deepcopy(m.state_dict()), best_epoch=0, best_val_top1=None, epochs_run=0)
               for key, m in models.items()}
    # what is evaluated and kept: the model itself, or the moving average of its weights
    emas = {key: ModelEmaV3(m, decay=params.ema, use_warmup=True) for key, m in models.items()} if params.ema else {}
    kept = {key: emas[key].module if key in emas else m for key, m in models.items()}
    mix_rng = np.random.default_rng([params.seed, 1])  # its own stream: mixup off leaves the batch order as it was
    active, alive = set(models), set(models)
    with torch.random.fork_rng(), reuse_freed_memory():
        torch.manual_seed(params.seed)
        # each candidate draws its dropout masks from its own stream, so what it learns does not depend on which
        # other candidates train beside it (or when they stop): k = 12 in a k search equals k = 12 trained alone
        streams = {key: torch.get_rng_state() for key in models}
        for epoch in range(1, params.epochs + 1):
            order = rng.permutation(n)
            losses = {key: 0.0 for key in active}
            for key in active:
                models[key].train()
            for s in range(steps_per_epoch):
                idx = np.sort(order[s * params.batch_size: (s + 1) * params.batch_size])
                y = y_all[idx]
                if params.mixup:  # one draw per step, shared by the candidates (same data for each)
                    lam = float(mix_rng.beta(params.mixup, params.mixup))
                    perm = torch.from_numpy(mix_rng.permutation(len(idx)))
                for key in active:
                    torch.set_rng_state(streams[key])
                    batch = _batch(tx[key], idx, per_key[key])
                    with train_autocast(params):
                        if params.mixup:
                            out = models[key](mix_batch(batch, lam, perm)).float()
                            loss = lam * loss_fn(out, y) + (1.0 - lam) * loss_fn(out, y[perm])
                        else:
                            loss = loss_fn(models[key](batch).float(), y)
                    opts[key].zero_grad(set_to_none=True)
                    loss.backward()
                    opts[key].step()
                    scheds[key].step()
                    streams[key] = torch.get_rng_state()
                    if key in emas:
                        emas[key].update(models[key], step=(epoch - 1) * steps_per_epoch + s + 1)
                    losses[key] += float(loss.detach()) * len(idx) / n
            report: dict[Hashable, dict[str, float]] = {}
            for key in list(active):
                res = results[key]
                res.epochs_run = epoch
                row = {"epoch": epoch, "loss": losses[key]}
                if vx is not None and val_y is not None:
                    logits = predict_logits(kept[key], vx[key], per_key[key])
                    acc, vloss = top1(logits, val_y), cross_entropy(logits, val_y)
                    row["val_top1"], row["val_loss"] = acc, vloss
                    if improves(acc, vloss, res.best_val_top1, res.best_val_loss):
                        res.best_val_top1, res.best_val_loss, res.best_epoch = acc, vloss, epoch
                        res.state = copy.deepcopy(kept[key].state_dict())
                    elif epoch - res.best_epoch >= params.patience:
                        active.discard(key)
                else:
                    res.best_epoch, res.state = epoch, copy.deepcopy(kept[key].state_dict())
                res.history.append(row)
                report[key] = row
            if vx is not None and params.prune_margin is not None and epoch >= params.prune_after \
                    and len(active) > 1:
                leader = max(results[key].best_val_top1 or 0.0 for key in models)
                for key in list(active):
                    if (results[key].best_val_top1 or 0.0) < leader - params.prune_margin:
                        active.discard(key)
                        alive.discard(key)
                        report[key]["pruned"] = 1.0
            if vx is not None and len(active) > 1 and halving_rung(epoch, params):
                keep = halve(results, alive)
                for key in active - keep:
                    report[key]["pruned"] = 1.0
                active, alive = active & keep, keep
            if on_epoch is not None:
                on_epoch(epoch, report)
            if not active:
                break
    for key, model in models.items():
        model.load_state_dict(results[key].state)
        model.eval()
    return results


def fit(model: EdgeMethod, train_x: Inputs, train_y: np.ndarray, params: TrainParams,
        val_x: Inputs | None = None, val_y: np.ndarray | None = None,
        transform: FeatureTransform | Transforms | None = None, on_epoch: EpochCallback | None = None) -> FitResult:
    """Train one model (see `fit_candidates`)."""
    res = fit_candidates({0: model}, {0: train_x}, train_y, params,
                         None if val_x is None else {0: val_x}, val_y, {0: transform}, on_epoch)
    return res[0]


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run `fn`, return (result, wall seconds)."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start
