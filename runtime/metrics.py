"""Scores used across export, runtime and benchmarks: top-1 over the labelled rows, agreement, SQNR.

One definition each, so an export's parity report, `run-edge` and the benchmarks count the same way. Torch-free.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

SQNR_CAP_DB = 100.0  # an exact match reports this instead of infinity


def top1_known(pred: np.ndarray, labels: np.ndarray | None) -> float | None:
    """Top-1 of predicted class indices over the rows whose label is known (>= 0); None if no row is labelled."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    known = labels >= 0
    if not known.any():
        return None
    return float((np.asarray(pred)[known] == labels[known]).mean())


def agreement(pred_a: np.ndarray, pred_b: np.ndarray) -> float:
    """Fraction of rows where two classifiers pick the same class."""
    return float((np.asarray(pred_a) == np.asarray(pred_b)).mean()) if len(pred_a) else 1.0


def sqnr_from_powers(signal: float, noise: float) -> float:
    """10 log10(signal / noise) in dB, SQNR_CAP_DB when the noise is negligible (below 1e-10 of the signal)."""
    if noise <= signal * 1e-10:
        return SQNR_CAP_DB
    return min(SQNR_CAP_DB, float(10.0 * np.log10(max(signal, 1e-30) / max(noise, 1e-30))))


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    """10 log10(signal power / error power) of `got` against `ref`, capped at SQNR_CAP_DB for exact matches."""
    ref64 = np.asarray(ref, dtype=np.float64)
    noise = float(np.sum((ref64 - np.asarray(got, dtype=np.float64)) ** 2))
    return sqnr_from_powers(float(np.sum(ref64 ** 2)), noise)


def median_ms(run: Callable[[], object], repeats: int = 20, warmup: int = 1) -> float:
    """Median wall milliseconds of `run()` over `repeats` calls after `warmup` untimed ones (first-call
    allocations and kernel selection are not per-image cost)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000.0)
