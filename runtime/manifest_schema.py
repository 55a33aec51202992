"""Typed validation of `manifest.json` fields, after the structural check in `read_manifest`.

Why a small schema of our own rather than msgspec or pydantic: on the device every MB counts, and measured
`python -c 'import X'` peak RSS over a 10 MB interpreter was +4 MB for msgspec and +7 MB for pydantic, against
0 for these ~100 lines; the checks are few and the messages must name the manifest field exactly. Each rule is
one line in `RULES` so the bundle format 2 fields (cloud.plan, edge.params, ...) can be added beside them.
Every failure is one BundleError line: `<manifest>: field 'input.size': expected an integer in 16..4096, got 0`.
Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mist_kit.errors import BundleError
from mist_kit.runtime.paths import check_relative

_MISSING = object()
DTYPES = ("bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float16", "float32",
          "float64")


class _Bad(Exception):
    """A field's value is wrong; the message says what was expected."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def int_in(lo: int, hi: int) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if not _is_int(v) or not lo <= v <= hi:
            raise _Bad(f"expected an integer in {lo}..{hi}")
    return check


def floats(n: int, positive: bool = False) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if not isinstance(v, list) or len(v) != n or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and (x > 0 or not positive)
                for x in v):
            raise _Bad(f"expected {n} finite{' positive' if positive else ''} numbers")
    return check


def one_of(*choices: str) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if not isinstance(v, str) or v not in choices:
            raise _Bad(f"expected one of {', '.join(repr(c) for c in choices)} (what the runtime implements)")
    return check


def str_list(v: Any) -> None:
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v) or len(set(v)) != len(v):
        raise _Bad("expected a non-empty list of distinct non-empty strings")


def non_empty_str(v: Any) -> None:
    if not isinstance(v, str) or not v:
        raise _Bad("expected a non-empty string")


def optional_path(v: Any) -> None:
    if v not in (None, ""):
        try:
            check_relative(v, "path")
        except BundleError as exc:
            raise _Bad(str(exc).removeprefix("path: ")) from None


def tensor_specs(v: Any) -> None:
    """[{name, dtype, shape}], shape a list of positive ints except a leading batch -1."""
    if not isinstance(v, list) or not v:
        raise _Bad("expected a non-empty list of {name, dtype, shape}")
    names = set()
    for i, t in enumerate(v):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise _Bad(f"entry {i}: expected an object with a string 'name'")
        if t["name"] in names:
            raise _Bad(f"entry {i}: name {t['name']!r} repeats")
        names.add(t["name"])
        if t.get("dtype") not in DTYPES:
            raise _Bad(f"entry {i} ({t['name']}): dtype must be one of {', '.join(DTYPES)}")
        shape = t.get("shape")
        if not isinstance(shape, list) or not 1 <= len(shape) <= 8 or not all(
                _is_int(d) and (1 <= d <= 2**31 - 1 or (j == 0 and d == -1)) for j, d in enumerate(shape)):
            raise _Bad(f"entry {i} ({t['name']}): shape must be 1..8 positive integers, the batch may be -1")


def files_table(v: Any) -> None:
    if not isinstance(v, dict) or not v:
        raise _Bad("expected an object {relative path: {sha256, bytes}}")
    for rel, entry in v.items():
        try:
            check_relative(rel, "path")
        except BundleError as exc:
            raise _Bad(str(exc).removeprefix("path: ")) from None
        if not isinstance(entry, dict) or not _is_int(entry.get("bytes")) or entry["bytes"] < 0:
            raise _Bad(f"{rel!r}: expected {{sha256: 64 hex digits, bytes: integer >= 0}}")
        sha = entry.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise _Bad(f"{rel!r}: sha256 must be 64 lowercase hex digits")


def is_object(v: Any) -> None:
    if not isinstance(v, dict):
        raise _Bad("expected a JSON object")


# (dotted field, required, check). Fields absent from a manifest and not required are skipped.
RULES: list[tuple[str, bool, Callable[[Any], None]]] = [
    ("model_name", True, non_empty_str),
    ("mist_kit_version", False, non_empty_str),
    ("k", False, lambda v: None if v is None else int_in(0, 4096)(v)),  # the method's depth (information)
    ("method", True, is_object),
    ("method.name", True, non_empty_str),
    ("method.params", False, is_object),
    ("input", True, is_object),
    ("input.size", True, int_in(16, 4096)),
    ("input.mean", True, floats(3)),
    ("input.std", True, floats(3, positive=True)),
    ("input.layout", False, one_of("NCHW")),
    ("input.resize", False, one_of("bicubic")),
    ("classes", True, str_list),
    ("files", True, files_table),
    ("cloud", True, is_object),
    ("cloud.file", False, optional_path),
    ("cloud.inputs", False, tensor_specs),
    ("cloud.outputs", True, tensor_specs),
    ("cloud.plan", True, is_object),  # its tensors are parsed by runtime.plan.CloudPlan.from_dict
    ("edge.params", True, int_in(0, 1 << 40)),
    ("edge.macs_per_image", True, int_in(0, 1 << 50)),
    ("edge.activation_bytes", True, int_in(0, 1 << 40)),
    ("edge", True, is_object),
    ("edge.file", False, optional_path),
    ("edge.reference", False, optional_path),
    ("edge.tflite", False, optional_path),
    ("edge.inputs", True, tensor_specs),
    ("edge.outputs", False, tensor_specs),
    ("head", True, is_object),
    ("head.file", False, optional_path),
    ("head.embedding_dim", False, int_in(1, 1 << 20)),
    ("head.num_classes", False, int_in(1, 1 << 20)),
]


def _get(manifest: dict[str, Any], dotted: str) -> Any:
    obj: Any = manifest
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return _MISSING
        obj = obj[part]
    return obj


def validate_manifest(manifest: dict[str, Any], path: str | Path) -> None:
    """Check every rule; the first failure is one BundleError naming the file and the field."""
    for dotted, required, check in RULES:
        value = _get(manifest, dotted)
        if value is _MISSING:
            if required:
                raise BundleError(f"{path}: missing field '{dotted}'")
            continue
        try:
            check(value)
        except _Bad as exc:
            raise BundleError(f"{path}: field '{dotted}': {exc}, got {_short(value)}") from None
    num = _get(manifest, "head.num_classes")
    if num is not _MISSING and num != len(manifest["classes"]):
        raise BundleError(f"{path}: field 'head.num_classes': {num}, but 'classes' lists {len(manifest['classes'])}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
