"""Subprocess checks of the device runtime: no torch/timm/onnx ever imported, and the memory cap's clear error.

Each test starts a fresh interpreter: a cap must not bind the test runner, and "never imports torch" can only be
shown in a process where importing torch raises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# sitecustomize runs at interpreter start-up: any import of a heavy module raises.
BLOCKER = '''
import sys
BLOCKED = ("torch", "timm", "onnx", "torchvision", "onnxscript")
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked import of {name}: the device runtime must not need it")
        return None
sys.meta_path.insert(0, _Block())
'''

# runs the CLI, then reports which heavy modules ended up loaded
RUNNER = '''
import json, sys
from mist_kit.cli.app import app
code = 0
try:
    app(sys.argv[1:], prog_name="mist-kit")
except SystemExit as exc:
    code = exc.code or 0
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "onnx"))
sys.stderr.write("\\nHEAVY=" + json.dumps(heavy) + "\\n")
sys.exit(code)
'''


@pytest.fixture(scope="module")
def env(tiny_bundle: Path, digits_lists: dict, tmp_path_factory) -> dict:
    from mist_kit.runtime.codec.extract import extract

    root = tmp_path_factory.mktemp("isolated")
    (root / "site").mkdir()
    (root / "site" / "sitecustomize.py").write_text(BLOCKER)
    features = root / "train.safetensors"
    extract(tiny_bundle, digits_lists["train"], features, batch_size=64)
    return {"root": root, "bundle": tiny_bundle, "features": features}


def _run(env: dict, *args: str, block: bool = True) -> subprocess.CompletedProcess:
    penv = dict(os.environ)
    if block:
        penv["PYTHONPATH"] = os.pathsep.join([str(env["root"] / "site"), penv.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", RUNNER, *args], capture_output=True, text=True, env=penv,
                          timeout=300)


def test_blocker_really_blocks(env):
    out = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(env["root"] / "site")})
    assert out.returncode != 0 and "blocked import of torch" in out.stderr


def test_run_edge_and_finetune_edge_without_torch_timm_onnx(env):
    state = env["root"] / "state"
    res = _run(env, "run-edge", "--device", "rpi4", "--bundle", str(env["bundle"]), "--features",
               str(env["features"]), "--batch", "16", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["images"] > 0 and 'HEAVY=[]' in res.stderr
    res = _run(env, "finetune-edge", "--device", "rpi4", "--bundle", str(env["bundle"]), "--features",
               str(env["features"]), "--epochs", "5", "--state", str(state), "--json")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["head_version"] == 1 and (state / "head-v0001.safetensors").is_file() and 'HEAVY=[]' in res.stderr
    assert rep["peak_rss_mb"] < rep["memory_cap_mb"]


def test_memory_cap_exceeded_is_one_clear_line(env):
    state = env["root"] / "capped-state"
    for cmd, batch_flag in (("run-edge", "--batch"), ("finetune-edge", "--batch-size")):
        res = _run(env, cmd, "--device", "rpi4", "--bundle", str(env["bundle"]), "--features", str(env["features"]),
                   batch_flag, "512", "--memory-cap", "200", "--state", str(state), block=False)
        err = res.stderr.split("\nHEAVY=")[0].strip().splitlines()
        assert res.returncode == 1, res.stderr
        assert len(err) == 1 and "memory cap of 200 MB for device rpi4 exceeded" in err[0], res.stderr
    assert not state.exists()
