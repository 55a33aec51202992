"""Calibration data as a stream of `{input name: batch}` dicts, read lazily from memory-mapped feature arrays.

onnxruntime.quantization pulls calibration data through `CalibrationDataReader.get_next() -> dict | None`. Ours is
any iterable of `dict[str, np.ndarray]`; `FeatureReader` adapts one to ORT's protocol so a 10k-image float16 cache
is never loaded whole: rows are sliced from the memory map a batch at a time and converted to float32 on the fly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

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


class FeatureReader:
    """onnxruntime's CalibrationDataReader protocol over any re-iterable of batches (duck-typed, no ORT import)."""

    def __init__(self, batches: Iterable[dict[str, np.ndarray]]) -> None:
        self.batches = batches
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = iter(self.batches)
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
