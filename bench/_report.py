"""Write one benchmark's section into BENCHMARKS.md between markers, leaving the other sections alone.

Each bench script owns a section name; re-running it replaces only that section (atomic write).
"""

from __future__ import annotations

import platform
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
HEADER = ("# mist-kit benchmarks\n\nEvery section is written by the script named in it, with the command that "
          "produced it. Ratios are measured within one run on one machine.\n")


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {sys.version.split()[0]}"


def update_section(name: str, title: str, body: str, command: str) -> None:
    """Replace (or add) section `name` in BENCHMARKS.md."""
    sys.path.insert(0, str(ROOT))
    from mist_kit.atomic import write_text

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = (f"<!-- BEGIN {name} -->\n## {title}\n\nCommand: `{command}`  \nRun: {stamp} on {machine()}\n\n"
             f"{body.strip()}\n<!-- END {name} -->")
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else HEADER
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:  # a new section goes at the end: every other line of the file (marked or not) is kept as it is
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_text(BENCHMARKS, text)


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)
