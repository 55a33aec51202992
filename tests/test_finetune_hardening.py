"""finetune-edge / run-edge hardening on the tiny bundle: parallel runs keep every head, a worse head waits for
--force, degenerate features are refused, tokens stay out of argv (issue 15 items 1 and 9, issue 16 items 7, 10)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mist_kit.cli.app import app
from mist_kit.runtime.head_store import HeadStore

runner = CliRunner()
RUNNER = "import sys\nfrom mist_kit.cli.app import app\napp(sys.argv[1:], prog_name='mist-kit')\n"


@pytest.fixture(scope="module")
def env(tiny_bundle: Path, digits_lists: dict, tmp_path_factory) -> dict:
    from mist_kit.runtime.codec.extract import extract

    root = tmp_path_factory.mktemp("ft_hardening")
    features = root / "train.safetensors"
    extract(tiny_bundle, digits_lists["train"], features, batch_size=64)
    return {"bundle": tiny_bundle, "features": features}


def _copy(env: dict, tmp_path: Path) -> Path:
    return Path(shutil.copytree(env["bundle"], tmp_path / "bundle"))


def test_parallel_finetune_runs_keep_every_head(env, tmp_path):
    bundle = _copy(env, tmp_path)
    args = ["finetune-edge", "--device", "rpi4", "--bundle", str(bundle), "--features", str(env["features"]),
            "--epochs", "2", "--json", "--no-cap"]
    procs = [subprocess.Popen([sys.executable, "-c", RUNNER, *args, "--seed", str(s)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in range(3)]
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        reports.append(json.loads(out))
    stored = sorted(r["stored_version"] for r in reports)
    assert stored == [1, 2, 3]
    store = HeadStore(open_bundle(bundle))
    assert sorted(h["version"] for h in store.history()) == stored and store.versions() == stored


def open_bundle(bundle: Path):
    from mist_kit.runtime.bundle import open_edge_bundle

    return open_edge_bundle(bundle)


def test_worse_head_is_stored_not_activated_unless_forced(env, tmp_path, monkeypatch):
    import mist_kit.runtime.edge_run as edge_run

    real = edge_run.train_head

    def worse(*a, **k):  # a training run that ends below the current head on the held-out split
        res = real(*a, **k)
        res.head.weight[:] = -res.head.weight
        res.val_top1_after = 0.0
        return res

    monkeypatch.setattr(edge_run, "train_head", worse)
    bundle = _copy(env, tmp_path)
    args = ["finetune-edge", "--device", "rpi4", "--bundle", str(bundle), "--features", str(env["features"]),
            "--epochs", "2", "--no-cap"]
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["activated"] is False and rep["head_version"] == 0 and rep["stored_version"] == 1
    assert "below the current head" in rep["activation"] and "--force" in rep["activation"]
    store = HeadStore(open_bundle(bundle))
    assert store.current_version() == 0 and store.versions() == [1]
    res = runner.invoke(app, args)  # human output: one line says why
    assert res.exit_code == 0
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("activation")]
    assert len(lines) == 1 and "not activated" in lines[0]
    res = runner.invoke(app, [*args, "--json", "--force"])
    rep = json.loads(res.stdout)
    assert rep["activated"] is True and rep["head_version"] == 3 and "--force" in rep["activation"]
    assert HeadStore(open_bundle(bundle)).current_version() == 3


def test_non_finite_features_never_train_a_head(env, tmp_path):
    from mist_kit.runtime.features_file import FeaturesWriter, read_features

    bundle = _copy(env, tmp_path)
    ff = read_features(env["features"], allow_non_finite=True)
    tensors = ff.read()
    name = next(iter(tensors))
    if tensors[name].dtype.kind != "f":
        pytest.skip("this bundle's features are integer-coded: NaN cannot occur in them")
    tensors[name][[3, 7]] = np.nan
    bad = tmp_path / "nan.safetensors"
    with FeaturesWriter(bad, open_bundle(bundle).manifest, ff.ids, with_labels=True) as w:
        w.write(tensors, ff.labels)
    res = runner.invoke(app, ["finetune-edge", "--device", "rpi4", "--bundle", str(bundle), "--features", str(bad),
                              "--no-cap"])
    assert res.exit_code == 2 and "non-finite" in res.stderr and "[3, 7]" in res.stderr
    assert not (tmp_path / "bundle.heads").exists() or not HeadStore(open_bundle(bundle)).versions()


def _run_edge_cloud(*extra: str, env_vars: dict | None = None):
    args = ["run-edge", "--device", "rpi4", "--bundle", "/nonexistent/bundle", "--cloud", "http://127.0.0.1:9",
            "--images", "/nonexistent/images", *extra]
    return runner.invoke(app, args, env=env_vars)


def test_token_file_permissions_and_argv_warning(tmp_path):
    tok = tmp_path / "token"
    tok.write_text("s3cret\n")
    os.chmod(tok, 0o644)
    res = _run_edge_cloud("--token-file", str(tok))
    assert res.exit_code == 2 and "readable by group/others" in res.stderr and "chmod 600" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    os.chmod(tok, 0o600)
    res = _run_edge_cloud("--token-file", str(tok))  # token accepted; fails later on the missing bundle/images
    assert "token" not in res.stderr
    res = _run_edge_cloud("--token", "s3cret")
    assert "warning: --token puts the token in the process list" in res.stderr
    res = _run_edge_cloud("--token", "a", "--token-file", str(tok))
    assert res.exit_code == 2 and "one of --token and --token-file" in res.stderr
