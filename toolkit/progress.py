"""Progress on stderr that works in a terminal, a log file and under `--json`, and never touches stdout.

A terminal gets a rich bar (transient: it leaves no blank line behind). Anything else (a pipe, a log file, CI) gets
plain lines at most every `interval_s` seconds plus one final line, the way tqdm does off a terminal:

    caching train.txt: 320/800 (40%) 12.3 img/s ETA 39s

Used as `with Progress(total, label) as bar: bar.advance(n)`; `enabled=False` (`--quiet`) prints nothing.
Torch-free (the runtime's `extract` uses it on a Pi).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any

DEFAULT_INTERVAL_S = 10.0


def format_eta(seconds: float) -> str:
    """39s, 3m12s, 1h02m: short enough for a log line."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def progress_line(label: str, done: int, total: int, elapsed_s: float, unit: str = "img") -> str:
    """One plain progress line: done/total, percent, rate and ETA (rate and ETA once anything has been done)."""
    text = f"{label}: {done}/{total}"
    if total > 0:
        text += f" ({100 * done / total:.0f}%)"
    if done > 0 and elapsed_s > 0:
        rate = done / elapsed_s
        text += f" {rate:.1f} {unit}/s"
        if done < total:
            text += f" ETA {format_eta((total - done) / rate)}"
        else:
            text += f" in {format_eta(elapsed_s)}"
    return text


class Progress:
    """A progress reporter for one loop over `total` items (see the module docstring)."""

    def __init__(self, total: int, label: str, *, enabled: bool = True, unit: str = "img",
                 stream: IO[str] | None = None, interval_s: float = DEFAULT_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.label, self.unit = int(total), label, unit
        self.enabled = enabled and self.total > 0
        self._stream, self.interval_s, self._clock = stream, interval_s, clock
        self.done = 0
        self._start = self._last = 0.0
        self._rich: Any = None
        self._task: Any = None

    @property
    def stream(self) -> IO[str]:
        return self._stream if self._stream is not None else sys.stderr  # looked up late: tests swap sys.stderr

    def __enter__(self) -> Progress:
        self._start = self._last = self._clock()
        if self.enabled and _is_tty(self.stream):
            import rich.progress as rp
            from rich.console import Console

            self._rich = rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(),
                                     rp.TaskProgressColumn(), rp.TimeRemainingColumn(),
                                     console=Console(file=self.stream), transient=True)
            self._rich.__enter__()
            self._task = self._rich.add_task(self.label, total=self.total)
        return self

    def advance(self, n: int = 1) -> None:
        self.done += int(n)
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.advance(self._task, n)
            return
        now = self._clock()
        if now - self._last >= self.interval_s and self.done < self.total:
            self._last = now
            self._write(now)

    def describe(self, label: str) -> None:
        """Change the label (e.g. the codec being benchmarked)."""
        self.label = label
        if self._rich is not None:
            self._rich.update(self._task, description=label)

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)
            self._rich = None
        elif self.enabled and self.done > 0:
            self._write(self._clock())  # the final line, also when interrupted (says how far it got)

    def _write(self, now: float) -> None:
        self.stream.write(progress_line(self.label, self.done, self.total, now - self._start, self.unit) + "\n")
        self.stream.flush()


def _is_tty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
