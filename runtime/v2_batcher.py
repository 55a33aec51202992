"""Dynamic batching for the cloud server: concurrent requests share one onnxruntime call.

A ViT on CPU is far more efficient per image at batch 8-16 than at batch 1, and devices send one or a few images
each. One asyncio task collects waiting requests until `max_batch` rows are queued or the oldest has waited
`max_delay`, then runs the model in a worker thread so the event loop keeps accepting, parsing and answering.
The queue is bounded: a full queue is refused at once (the server answers 503 and clients back off) instead of
letting latency grow without limit. Torch-free and framework-free.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from mist_kit.errors import MistError


class QueueFullError(MistError):
    """The batcher's queue is at --max-queue requests (HTTP 503; retry later)."""


@dataclass
class _Job:
    pixels: np.ndarray  # (n, 3, H, W)
    future: asyncio.Future[dict[str, np.ndarray]]
    enqueued: float


class DynamicBatcher:
    """Collect jobs into batches of at most `max_batch` rows; run `run(batch)` in `executor`; split the outputs."""

    def __init__(self, run: Callable[[np.ndarray], dict[str, np.ndarray]], executor: Executor, max_batch: int,
                 max_delay_s: float, max_queue: int) -> None:
        self._run, self._executor = run, executor
        self.max_batch, self.max_delay_s, self.max_queue = max_batch, max_delay_s, max_queue
        self._jobs: deque[_Job] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batch_sizes: Counter[int] = Counter()  # rows per model call -> count (observability, tests)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="mist-kit-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in self._jobs:
            if not job.future.done():
                job.future.set_exception(QueueFullError("server is shutting down"))
        self._jobs.clear()

    @property
    def queued(self) -> int:
        return len(self._jobs)

    async def submit(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Queue one request's rows and wait for its slice of the batch outputs."""
        if len(self._jobs) >= self.max_queue:
            raise QueueFullError(f"server queue is full ({self.max_queue} requests waiting); retry later")
        if len(pixels) > self.max_batch:
            raise ValueError(f"{len(pixels)} rows > max_batch {self.max_batch}")  # callers validate first
        loop = asyncio.get_running_loop()
        job = _Job(pixels, loop.create_future(), loop.time())
        self._jobs.append(job)
        self._wake.set()
        return await job.future

    def _queued_rows(self) -> int:
        return sum(len(j.pixels) for j in self._jobs if not j.future.done())

    async def _next_batch(self) -> list[_Job]:
        while True:
            while not self._jobs:
                self._wake.clear()
                await self._wake.wait()
            while self._jobs and self._jobs[0].future.done():  # timed out or cancelled while waiting
                self._jobs.popleft()
            if self._jobs:
                break
        loop = asyncio.get_running_loop()
        deadline = self._jobs[0].enqueued + self.max_delay_s
        while self._queued_rows() < self.max_batch and (left := deadline - loop.time()) > 0:
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)
        batch, rows = [], 0
        while self._jobs:
            job = self._jobs[0]
            if job.future.done():
                self._jobs.popleft()
                continue
            if rows + len(job.pixels) > self.max_batch:
                break
            batch.append(self._jobs.popleft())
            rows += len(job.pixels)
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            pixels = batch[0].pixels if len(batch) == 1 else np.concatenate([j.pixels for j in batch])
            self.batch_sizes[len(pixels)] += 1
            try:
                outputs = await loop.run_in_executor(self._executor, self._run, pixels)
            except Exception as exc:
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            start = 0
            for job in batch:
                stop = start + len(job.pixels)
                if not job.future.done():
                    job.future.set_result({k: v[start:stop] for k, v in outputs.items()})
                start = stop
