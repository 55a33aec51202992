"""The training loop's speed changes keep its numbers (issue 14 item 4).

- `InputRows.batch` (runs cast straight from the float16 map) equals a row-by-row reference for any order,
  repeats and segment mix, transforms included;
- `fit` with `reuse_freed_memory` (the allocator setting) gives the same weights, bit for bit, as without it.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import mist_kit.train as train_mod
from mist_kit.cache import InputRows
from mist_kit.edge import create_edge_method
from mist_kit.runtime.plan import BackboneShape


def _segments(tmp_path, rng) -> tuple[InputRows, list[np.ndarray], list[np.ndarray]]:
    """Two memory-mapped float16 segments, each over a subset of its rows (as train + val for a refit)."""
    arrays, rows = [], []
    for i, n in enumerate((13, 9)):
        path = tmp_path / f"seg{i}.npy"
        mm = np.lib.format.open_memmap(path, "w+", np.float16, (n, 5, 3))
        mm[:] = rng.standard_normal((n, 5, 3)).astype(np.float16)
        mm.flush()
        arrays.append(np.load(path, mmap_mode="r"))
        rows.append(np.sort(rng.choice(n, size=n - 2, replace=False)))
    return InputRows([({"g": a}, r) for a, r in zip(arrays, rows, strict=True)]), arrays, rows


def _reference(arrays: list[np.ndarray], rows: list[np.ndarray], idx: np.ndarray) -> np.ndarray:
    flat = [(a, r) for a, rs in zip(arrays, rows, strict=True) for r in rs]
    return np.stack([np.asarray(flat[i][0][flat[i][1]], dtype=np.float32) for i in idx]) if len(idx) else \
        np.zeros((0, 5, 3), np.float32)


@pytest.mark.parametrize("case", ["sorted", "shuffled", "repeats", "one_segment", "contiguous", "empty"])
def test_batch_equals_row_by_row_reference(tmp_path, case):
    rng = np.random.default_rng(3)
    x, arrays, rows = _segments(tmp_path, rng)
    n = len(x)
    idx = {"sorted": np.sort(rng.choice(n, 12, replace=False)), "shuffled": rng.permutation(n),
           "repeats": rng.integers(0, n, 25), "one_segment": np.array([4, 1, 7]),
           "contiguous": np.arange(3, 17), "empty": np.zeros(0, np.int64)}[case]
    got = x.batch(idx)["g"]
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, _reference(arrays, rows, idx))
    doubled = x.batch(idx, {"g": lambda a: 2 * a})["g"]
    np.testing.assert_array_equal(doubled, 2 * _reference(arrays, rows, idx))


def _tiny_fit(x: np.ndarray, y: np.ndarray) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = create_edge_method("mist", backbone=BackboneShape(8, 5, 1, 2), depth=2, num_classes=3, params={})
    train_mod.fit(model, x[:30], y[:30], train_mod.TrainParams(epochs=3, batch_size=8, seed=1), x[30:], y[30:])
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_fit_weights_identical_with_and_without_memory_reuse(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 5, 8)).astype(np.float16)
    y = rng.integers(0, 3, 40)
    new = _tiny_fit(x, y)
    monkeypatch.setattr(train_mod, "reuse_freed_memory", contextlib.nullcontext)
    old = _tiny_fit(x, y)
    assert new.keys() == old.keys()
    for key in new:
        assert torch.equal(new[key], old[key]), key
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in new.values())

