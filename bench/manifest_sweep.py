"""Exhaustive manifest sweep (issue 15 item 3): every key/index path of a bundle's manifest.json x 12 wrong values,
plus its deletion, each opened the way a device opens a bundle (`read_manifest` + `open_edge_bundle`), with the
manifest digest rewritten so the typed checks, not the digest, must catch it.

    .venv/bin/python bench/manifest_sweep.py BUNDLE [--show-accepted]

Prints how many variants, how many were accepted, refused (one MistError line) and ended in another exception (a
traceback). Variants equal to the original are not counted. Lists are swept at their first 4 items, as
tests/test_fuzz_manifest.py does. Works on a copy in a temp dir; BUNDLE is not modified.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from mist_kit.errors import MistError
from mist_kit.runtime.bundle import open_edge_bundle
from mist_kit.runtime.manifest import read_manifest
from mist_kit.runtime.signing import write_manifest_digest

WRONG: list[Any] = [None, True, 0, -1, 2**40, 1.5, float("nan"), "", "x", [], {}, [1, 2]]
DELETE = object()


def paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):
            out += paths(v, (*prefix, i))
    return out


def mutate(manifest: dict[str, Any], path: tuple, value: Any) -> dict[str, Any] | None:
    m = copy.deepcopy(manifest)
    parent = m
    for key in path[:-1]:
        parent = parent[key]
    if value is DELETE:
        if not isinstance(parent, dict):
            return None
        del parent[path[-1]]
    else:
        old = parent[path[-1]]
        if type(old) is type(value) and old == value:
            return None  # not a change
        parent[path[-1]] = value
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--show-accepted", action="store_true", help="list each accepted variant")
    args = ap.parse_args()
    counts: Counter[str] = Counter()
    accepted: list[str] = []
    crashes: Counter[str] = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(shutil.copytree(args.bundle, Path(tmp) / "bundle"))
        original = json.loads((root / "manifest.json").read_text())
        for path in paths(original):
            for value in [*WRONG, DELETE]:
                m = mutate(original, path, value)
                if m is None:
                    continue
                (root / "manifest.json").write_text(json.dumps(m))
                write_manifest_digest(root)
                counts["variants"] += 1
                try:
                    read_manifest(root)
                    open_edge_bundle(root)
                except MistError:
                    counts["refused"] += 1
                    continue
                except Exception as exc:  # what the sweep counts
                    counts["traceback"] += 1
                    crashes[f"{type(exc).__name__} at {'.'.join(map(str, path))}"] += 1
                    continue
                counts["accepted"] += 1
                accepted.append(f"{'.'.join(map(str, path))} = {'<deleted>' if value is DELETE else repr(value)}")
    print(json.dumps(dict(counts)))
    for what, n in crashes.most_common(20):
        print(f"  traceback x{n}: {what}")
    if args.show_accepted:
        for line in accepted:
            print(f"  accepted: {line}")


if __name__ == "__main__":
    main()
