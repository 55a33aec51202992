"""Calibration data as a stream of `{input name: batch}` dicts, read lazily from memory-mapped feature arrays.

onnxruntime.quantization pulls calibration data through `CalibrationDataReader.get_next() -> dict | None`. Ours is
any iterable of `dict[str, np.ndarray]`; `FeatureReader` adapts one to ORT's protocol so a 10k-image float16 cache
is never loaded whole: rows are sliced from the memory map a batch at a time and converted to float32 on the fly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sized

import numpy as np

from mist_kit.cache import InputRows

Transform = Callable[[np.ndarray], np.ndarray]


class ArrayBatches:
    """Rows of one (possibly memory-mapped) array in ascending order, re-iterable, as `{name: float32 batch}`."""

    def __init__(self, array: np.ndarray, rows: np.ndarray, name: str = "features", batch_size: int = 32,
                 transform: Transform | None = None) -> None:
        # rows are read in ascending order (sequential on the memmap); consumers pair outputs with np.sort(rows)
        self.array, self.rows, self.name = array, np.sort(np.asarray(rows)), name
        self.batch_size, self.transform = max(1, int(batch_size)), transform

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self.rows), self.batch_size):
            idx = self.rows[start: start + self.batch_size]
            batch = np.asarray(self.array[idx], dtype=np.float32)  # (b, T, D)
            if self.transform is not None:
                batch = np.asarray(self.transform(batch), dtype=np.float32)
            yield {self.name: batch}


class InMemoryBatches:
    """A list of ready batches (tests, images run through the backbone)."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return sum(len(next(iter(b.values()))) for b in self.batches)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.batches)


def uniform_batch_size(n_rows: int | None, target: int) -> int:
    """The largest batch size <= target that divides n_rows (1 when the row count is unknown).

    onnxruntime's histogram calibrators (entropy, percentile) stack every batch's activations with
    `np.asarray(list_of_batches)`, which fails ("inhomogeneous shape") as soon as one batch is shorter than the
    others; so calibration batches must all have the same length, without padding (a padded row would skew the
    ranges). A divisor of N gives that for any N (a prime N runs one row at a time, still correct).
    """
    if not n_rows or n_rows < 1:
        return 1
    for size in range(min(max(1, target), n_rows), 0, -1):
        if n_rows % size == 0:
            return size
    return 1  # pragma: no cover - size 1 always divides


def count_rows(batches: Iterable[dict[str, np.ndarray]]) -> int | None:
    """Rows in a batch source without reading it: ArrayBatches/InMemoryBatches know; a list is summed; else None."""
    if isinstance(batches, list | tuple):
        return sum(len(next(iter(b.values()))) for b in batches)
    return len(batches) if isinstance(batches, Sized) else None


def rebatch(batches: Iterable[dict[str, np.ndarray]], size: int) -> Iterator[dict[str, np.ndarray]]:
    """The same rows, in order, as batches of exactly `size` rows (a shorter tail only if size does not divide N)."""
    pending: list[dict[str, np.ndarray]] = []
    held = 0
    for batch in batches:
        pending.append(batch)
        held += len(next(iter(batch.values())))
        while held >= size:
            merged = {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}
            yield {k: v[:size] for k, v in merged.items()}
            rest = {k: v[size:] for k, v in merged.items()}
            held -= size
            pending = [rest] if held else []
    if held:
        yield {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}


class FeatureReader:
    """onnxruntime's CalibrationDataReader protocol over any re-iterable of batches (duck-typed, no ORT import).

    Batches are re-cut to one uniform length (see `uniform_batch_size`), so any number of calibration rows works
    with every calibration method.
    """

    def __init__(self, batches: Iterable[dict[str, np.ndarray]], batch_size: int = 32) -> None:
        self.batches = batches
        self.batch_size = uniform_batch_size(count_rows(batches), batch_size)
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = rebatch(self.batches, self.batch_size)
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None

    def set_range(self, start_index: int, end_index: int) -> None:  # pragma: no cover - ORT's stride API
        self._it = None


class InputBatches:
    """Positions of cached `InputRows` in ascending order, re-iterable, as `{tensor name: float32 batch}`.

    The multi-tensor form of `ArrayBatches`: every sent tensor of a plan, each through its own codec round trip.
    """

    def __init__(self, rows: InputRows, positions: np.ndarray, batch_size: int = 32,
                 transforms: Mapping[str, Transform | None] | None = None) -> None:
        self.rows, self.positions = rows, np.sort(np.asarray(positions))
        self.batch_size, self.transforms = max(1, int(batch_size)), dict(transforms or {})

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self.positions), self.batch_size):
            yield self.rows.batch(self.positions[start: start + self.batch_size], self.transforms)
