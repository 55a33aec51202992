"""Bearer tokens read from a file, never from argv: one token on the first line, in a file only its owner reads.

Why: a token passed as `--token T` is visible to every local user in `ps` and lands in shell history. A token
file readable by group or others leaks the same way, so it is refused (as ssh refuses a private key with loose
permissions). Torch-free, stdlib only: both the device client and the server use it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from mist_kit.errors import UsageError

TOKEN_ENV = "MIST_KIT_TOKEN"


def read_token_file(path: str | os.PathLike[str], flag: str = "--token-file") -> str:
    """The token in `path` (first line, stripped); loose permissions, an empty file or spaces are usage errors."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{flag} {p}: cannot read ({exc})") from None
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(f"{flag} {p}: readable by group/others (mode {stat.S_IMODE(mode):o}); "
                         f"run `chmod 600 {p}`")
    lines = text.splitlines()
    token = lines[0].strip() if lines else ""
    if not token or any(c.isspace() for c in token):
        raise UsageError(f"{flag} {p}: expected one token without spaces on the first line")
    return token
