"""Head store under concurrency and bad input: distinct versions for parallel savers, orphan cleanup,
non-finite heads refused, worse heads stored but not activated (issue 15 item 1, issue 16 items 7 and 10)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest

from mist_kit.runtime.bundle import EdgeBundle, Head
from mist_kit.runtime.edge_run import activation_decision
from mist_kit.runtime.head_store import HeadStateError, HeadStore

SAVES_PER_PROCESS = 4
PROCESSES = 4


def _zero_head(c: int = 3, e: int = 8) -> Head:
    return Head(np.zeros((c, e), np.float32), np.zeros(c, np.float32), tuple(f"c{i}" for i in range(c)))


def _bundle(root: Path) -> EdgeBundle:
    root.mkdir(exist_ok=True)
    manifest = {"edge": {"file": "edge.onnx"}, "files": {"edge.onnx": {"sha256": "ab" * 32, "bytes": 1}}}
    return EdgeBundle(root=root, manifest=manifest, edge_path=root / "edge.onnx", head=_zero_head(),
                      classes=("c0", "c1", "c2"))


def _head(seed: int) -> Head:
    rng = np.random.default_rng(seed)
    return Head(rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal(3).astype(np.float32),
                ("c0", "c1", "c2"))


def _saver(root: str, seed: int, start: mp.synchronize.Event, out: mp.Queue) -> None:
    store = HeadStore(_bundle(Path(root)), keep=100)
    start.wait(10)
    out.put([store.save(_head(seed * 100 + i)) for i in range(SAVES_PER_PROCESS)])


def test_concurrent_saves_get_distinct_versions_all_in_history(tmp_path):
    ctx = mp.get_context("spawn")  # a fresh interpreter per saver, as separate finetune-edge runs are
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_saver, args=(str(tmp_path / "bundle"), s, start, out)) for s in range(PROCESSES)]
    for p in procs:
        p.start()
    start.set()
    got = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    versions = sorted(v for vs in got for v in vs)
    assert versions == list(range(1, PROCESSES * SAVES_PER_PROCESS + 1))  # distinct, none lost
    store = HeadStore(_bundle(tmp_path / "bundle"), keep=100)
    assert sorted(h["version"] for h in store.history()) == versions
    assert store.versions() == versions and store.current_version() in versions
    for vs in got:  # each process's own saves are increasing
        assert vs == sorted(vs)


def test_second_writer_waits_then_fails_clearly(tmp_path):
    store = HeadStore(_bundle(tmp_path / "bundle"))
    with store.lock():
        other = HeadStore(_bundle(tmp_path / "bundle"))
        with pytest.raises(HeadStateError, match="another finetune-edge"), other.lock(wait_s=0.1):
            pass
    assert other.save(_head(1)) == 1  # once released, it proceeds


def test_orphaned_temp_files_are_removed_on_open_but_not_under_a_writer(tmp_path):
    store = HeadStore(_bundle(tmp_path / "bundle"))
    store.save(_head(1))
    orphans = [store.dir / ".head-v0002.safetensors.abc123.tmp", store.dir / ".current.json.x9.tmp"]
    for p in orphans:
        p.write_bytes(b"partial")
    keep = store.dir / "notes.txt"  # not ours: never touched
    keep.write_text("x")
    with store.lock():  # a writer is active: its temp files are not orphans
        HeadStore(_bundle(tmp_path / "bundle"))
        assert all(p.exists() for p in orphans)
    HeadStore(_bundle(tmp_path / "bundle"))
    assert not any(p.exists() for p in orphans) and keep.exists()
    assert HeadStore(_bundle(tmp_path / "bundle")).current_version() == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_head_is_refused_and_nothing_written(tmp_path, bad):
    store = HeadStore(_bundle(tmp_path / "bundle"))
    store.save(_head(1))
    head = _head(2)
    head.weight[1, 3] = bad
    before = sorted(p.name for p in store.dir.iterdir())
    with pytest.raises(HeadStateError, match="non-finite weights"):
        store.save(head)
    assert sorted(p.name for p in store.dir.iterdir()) == before and store.current_version() == 1


def test_stored_but_not_activated_head(tmp_path):
    store = HeadStore(_bundle(tmp_path / "bundle"))
    assert store.save(_head(1)) == 1
    assert store.save(_head(2), activate=False) == 2
    assert store.current_version() == 1 and 2 in store.versions()
    np.testing.assert_array_equal(store.load().weight, _head(1).weight)
    assert store.history()[-1] == {"version": 2, "at": store.history()[-1]["at"], "activated": False}
    assert store.save(_head(3)) == 3  # the stored-only number is not reused
    state = json.loads((store.dir / "current.json").read_text())
    assert state["version"] == 3


def test_report_nan_is_stored_as_standard_json(tmp_path):
    from safetensors import safe_open

    store = HeadStore(_bundle(tmp_path / "bundle"))
    v = store.save(_head(1), {"top1_before": float("nan"), "x": [float("inf"), 1.0]})
    with safe_open(str(store.dir / f"head-v{v:04d}.safetensors"), framework="np") as fh:
        assert json.loads(fh.metadata()["report"]) == {"top1_before": None, "x": [None, 1.0]}


def test_activation_decision():
    assert activation_decision(0.80, 0.81, False)[0]
    assert activation_decision(0.80, 0.80, False)[0]
    ok, why = activation_decision(0.7854, 0.7829, False)
    assert not ok and "0.7829" in why and "0.7854" in why and "--force" in why
    assert activation_decision(0.7854, 0.7829, True)[0]
    assert activation_decision(None, None, False)[0]


def test_lock_file_is_private(tmp_path):
    store = HeadStore(_bundle(tmp_path / "bundle"))
    store.save(_head(1))
    assert os.stat(store.dir / ".lock").st_mode & 0o077 == 0
