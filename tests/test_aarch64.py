"""aarch64 proof (slow; `pytest -m slow tests/test_aarch64.py`): the runtime under qemu-aarch64 -cpu cortex-a72.

Drives bench/aarch64/check.py, which runs the same code on x86 and in the cached Debian arm64 root
(bench/work/aarch64, built by bench/aarch64/setup_root.sh) and compares. Skips cleanly when qemu or the root is
missing; writes nothing outside bench/work/ (no BENCHMARKS.md update: --no-report).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CHECK = REPO / "bench" / "aarch64" / "check.py"


def _check_module():
    spec = importlib.util.spec_from_file_location("aarch64_check", CHECK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def check():
    mod = _check_module()
    why = mod.root_ready()
    if why:
        pytest.skip(f"aarch64 root not available: {why}")
    return mod


def _run(step: str) -> dict:
    proc = subprocess.run([sys.executable, str(CHECK), step, "--no-report"], capture_output=True, text=True,
                          timeout=3600, check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_numpy_and_onnxruntime_run_on_aarch64(check) -> None:
    summary = _run("smoke")
    smoke = summary["smoke"]
    assert smoke["ok"]
    for graph in smoke["graphs"]:
        assert graph["argmax_equal"] == graph["n"], graph


def test_runtime_predictions_equal_x86(check) -> None:
    if not check._has_command("export") or not check._has_command("extract"):
        pytest.skip("mist-kit export/extract not available")
    summary = _run("runtime")
    rt = summary["runtime"]
    assert rt["aarch64_facts"]["machine"] == "aarch64"
    assert rt["aarch64_facts"]["forbidden_imported"] == []
    assert rt["pred_equal"] == rt["n"] > 0
    assert rt["embedding_max_abs_diff"] <= 1e-3 * max(rt["embedding_max_abs"], 1.0)
    if "finetune" in rt:
        assert rt["finetune"]["pred_equal"] == rt["finetune"]["n"]
