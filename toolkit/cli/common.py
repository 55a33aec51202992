"""Shared CLI plumbing: one-line errors with exit codes, JSON output, and parsing helpers.

Torch-free: `run-edge` must start without importing torch, so heavy modules are imported inside commands.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from mist_kit.errors import MistError

F = TypeVar("F", bound=Callable[..., Any])


def _stderr_console() -> Console:
    """Human-readable output goes to stderr (stdout stays clean for --json).

    Off a terminal (a log file, a pipe) rich would wrap every line at 80 columns; soft wrap keeps each log line
    whole, and tables get a width that fits their columns.
    """
    probe = Console(stderr=True)
    if probe.is_terminal:
        return probe
    return Console(stderr=True, soft_wrap=True, width=int(os.environ.get("COLUMNS") or 200))


console = _stderr_console()

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or log lines on stderr (errors still)")]


def cli_errors(fn: F) -> F:
    """Turn `MistError` into `error: <message>` on stderr with its exit code (never a traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MistError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished work was kept (caches resume on the next run)", err=True)
            raise typer.Exit(130) from None
        except MemoryError:
            typer.echo("error: out of memory (the device profile's memory cap was exceeded?)", err=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def strict_json(obj: Any) -> Any:
    """`obj` with numpy values made plain and NaN/Inf floats made null: RFC 8259 has no NaN, and a consumer's
    parser (jq, JavaScript, Go) rejects Python's bare `NaN`."""
    if isinstance(obj, dict):
        return {(k.item() if hasattr(k, "item") else k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return strict_json(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def print_json(obj: Any) -> None:
    """One strictly standard JSON object on stdout (numpy converted, NaN/Inf as null, other objects as str)."""
    sys.stdout.write(json.dumps(strict_json(obj), default=str, allow_nan=False) + "\n")
    sys.stdout.flush()


def parse_triple(text: str | None, flag: str) -> tuple[float, float, float] | None:
    """Parse 'a,b,c' into three floats (for --mean/--std)."""
    if text is None:
        return None
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"{flag}: expected three comma-separated numbers, got {text!r}") from None
    if len(parts) != 3:
        raise typer.BadParameter(f"{flag}: expected three comma-separated numbers, got {text!r}")
    return parts  # type: ignore[return-value]


def parse_ints(text: str | None, flag: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"{flag}: expected comma-separated integers, got {text!r}") from None


def logger(quiet: bool) -> Callable[[str], None]:
    """Log lines to stderr unless quiet (also under --json: stdout carries only the JSON)."""
    if quiet:
        return lambda _msg: None
    return lambda msg: console.print(msg, highlight=False, markup=False)


def debug_enabled() -> bool:
    return os.environ.get("MIST_KIT_DEBUG", "") not in ("", "0")
