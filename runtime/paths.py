"""Paths named inside a bundle are confined to it: relative, no `..`, and no symlink that resolves outside.

Why: the manifest is data from whoever sent the bundle. `edge.file = "../elsewhere/other.onnx"`, an absolute
path, or an `edge.onnx` symlink to another file would make the device hash and run a file that is not part of
the bundle it was given. Torch-free, stdlib only.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from mist_kit.errors import BundleError


def check_relative(rel: object, where: str) -> str:
    """`rel` is a non-empty relative POSIX path with no `..`, no backslash and no NUL; returns it."""
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"{where}: expected a relative file path, got {rel!r}"[:200])
    pure = PurePosixPath(rel)
    if pure.is_absolute() or rel.startswith("~") or "\\" in rel or "\0" in rel or ":" in pure.parts[0]:
        raise BundleError(f"{where}: {rel!r} is not a path inside the bundle (absolute paths are refused)"[:200])
    if any(part in ("..", ".", "") for part in rel.split("/")):
        raise BundleError(f"{where}: {rel!r} leaves or obscures the bundle directory ('..', '.', '//' refused)"[:200])
    return rel


def confined(root: str | Path, rel: object, where: str) -> Path:
    """`root / rel`, after checking `rel` and that the file it resolves to (symlinks followed) is inside `root`."""
    check_relative(rel, where)
    base = Path(root).resolve()
    path = Path(root) / str(rel)
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise BundleError(f"{path}: cannot resolve ({exc})") from None
    if real != base and base not in real.parents:
        raise BundleError(f"{path}: resolves to {real}, outside the bundle {base} (a symlink leading out is "
                          "refused)")
    return path
