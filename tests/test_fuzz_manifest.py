"""Structure-level fuzz of manifest.json on the tiny bundle (issue 15 item 3): truncations, deleted keys and
wrong-typed values anywhere in the tree. Opening the bundle either works or fails with one MistError line;
never another exception. Paths come from the fixture's own manifest, so no field names are hard-coded and the
suite follows the manifest format as it changes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mist_kit.errors import MistError
from mist_kit.runtime.bundle import open_edge_bundle
from mist_kit.runtime.manifest import read_manifest

COUNTS: dict[str, int] = {"accepted": 0, "refused": 0}


@pytest.fixture(scope="module")
def fuzz_bundle(tiny_bundle: Path, tmp_path_factory) -> tuple[Path, bytes, list[tuple]]:
    root = Path(shutil.copytree(tiny_bundle, tmp_path_factory.mktemp("fuzz_manifest") / "bundle"))
    raw = (root / "manifest.json").read_bytes()
    return root, raw, _paths(json.loads(raw))


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    print(f"\nmanifest fuzz: {COUNTS}")  # for docs/SECURITY.md (pytest -s)


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key/index path in the manifest, except inside the (large) files table's hex strings."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):
            out += _paths(v, (*prefix, i))
    return out


def _open(root: Path, data: bytes) -> None:
    """Open a mutated manifest whose digest was rewritten to match (the typed checks, not the digest, must hold)."""
    from mist_kit.runtime.signing import write_manifest_digest

    (root / "manifest.json").write_bytes(data)
    write_manifest_digest(root)
    try:
        read_manifest(root)
        open_edge_bundle(root)
    except MistError as exc:
        assert "\n" not in str(exc), str(exc)
        COUNTS["refused"] += 1
        return
    COUNTS["accepted"] += 1


JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-2**65, 2**65) | st.floats() | st.text(max_size=8),
                       lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                       max_leaves=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_wrong_types_and_deleted_keys(fuzz_bundle, data):
    root, raw, paths = fuzz_bundle
    m = json.loads(raw)
    path = data.draw(st.sampled_from(paths))
    parent = m
    for key in path[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(JSONISH)
    _open(root, json.dumps(m).encode())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frac=st.floats(0, 1, exclude_max=True), junk=st.binary(max_size=8))
def test_truncations(fuzz_bundle, frac, junk):
    root, raw, _ = fuzz_bundle
    _open(root, raw[:int(len(raw) * frac)] + junk)


def test_targeted_manifests_refused(fuzz_bundle):
    root, raw, _ = fuzz_bundle
    for data in (b"", b"[]", b"null", b"[" * 100_000, json.dumps({"schema": "mist-kit/bundle/1"}).encode(),
                 b"\xff\xfe", raw.replace(b'"files"', b'"filez"')):
        before = COUNTS["refused"]
        _open(root, data)
        assert COUNTS["refused"] == before + 1, data[:40]
    (root / "manifest.json").write_bytes(raw)
    from mist_kit.runtime.signing import write_manifest_digest

    write_manifest_digest(root)
    read_manifest(root)
