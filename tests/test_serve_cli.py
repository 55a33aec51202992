"""`mist-kit serve-cloud` as users run it, `run-edge --cloud` against it, and deploy/ (Triton) vs served metadata."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from mist_kit.runtime.manifest import open_bundle
from mist_kit.runtime.v2_client import fetch_features
from mist_kit.runtime.v2_model import CloudModel, ServeConfig
from mist_kit.runtime.v2_protocol import TRITON_CONFIG_DTYPES
from mist_kit.runtime.v2_server import serve_in_thread


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Path:
    """The exporter's real tiny bundle (tests/conftest.py): test_vit, digits, int8 edge graph, deploy/."""
    return tiny_bundle


def parse_triton_config(text: str) -> dict:
    """The parts of a config.pbtxt that define the wire contract: name, max_batch_size, inputs, outputs."""
    out: dict = {"name": re.search(r'^name:\s*"([^"]+)"', text, re.M).group(1),
                 "max_batch_size": int(re.search(r"^max_batch_size:\s*(\d+)", text, re.M).group(1))}
    for section in ("input", "output"):
        block = re.search(rf"^{section}\s*\[(.*?)^\]", text, re.S | re.M).group(1)
        out[section] = [{"name": n, "datatype": TRITON_CONFIG_DTYPES[t], "dims": [int(d) for d in dims.split(",")]}
                        for n, t, dims in re.findall(r'name:\s*"([^"]+)"\s*data_type:\s*(\w+)\s*dims:\s*\[([^\]]*)\]',
                                                     block)]
    return out


def test_deploy_triton_config_matches_served_metadata(bundle: Path) -> None:
    meta = CloudModel(bundle, ServeConfig(threads=1)).metadata()
    configs = sorted((bundle / "deploy").rglob("config.pbtxt"))
    assert len(configs) == 1, configs
    cfg = parse_triton_config(configs[0].read_text())
    assert cfg["name"] == meta["name"] == configs[0].parent.name
    assert (configs[0].parent / "1" / "model.onnx").is_file()
    assert cfg["max_batch_size"] > 0  # so Triton's metadata shapes gain a leading -1 like ours
    served_inputs = {i["name"]: i for i in meta["inputs"]}
    assert [i["name"] for i in cfg["input"]] == ["pixel_values"]
    for spec in cfg["input"]:  # Triton runs cloud.onnx directly: pixel_values only, no JPEG decoding
        assert served_inputs[spec["name"]]["datatype"] == spec["datatype"]
        assert served_inputs[spec["name"]]["shape"] == [-1, *spec["dims"]]
    assert [(o["name"], o["datatype"], o["shape"]) for o in meta["outputs"]] == \
           [(o["name"], o["datatype"], [-1, *o["dims"]]) for o in cfg["output"]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_cloud_command(bundle: Path, tmp_path: Path) -> None:
    """The real command in a subprocess: token file, ready, features equal to cloud.onnx, clean SIGINT stop."""
    token_file = tmp_path / "token"
    token_file.write_text("tok-123\n")
    token_file.chmod(0o600)  # a token file readable by others is refused
    port = free_port()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-c", "from mist_kit.cli.app import main; main()", "serve-cloud", str(bundle),
           "--port", str(port), "--token-file", str(token_file), "--max-batch", "2", "--threads", "1"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert proc.poll() is None, log.read_text()
        manifest = open_bundle(bundle)
        from PIL import Image

        img = tmp_path / "x.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(img)
        feats = fetch_features(url, [img, img, img], manifest, token="tok-123")
        assert all(len(v) == 3 for v in feats.values())
        assert httpx.get(f"{url}/v2", timeout=5).status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, log.read_text()
    assert "127.0.0.1" in log.read_text()


def test_serve_cloud_usage_errors(bundle: Path, tmp_path: Path) -> None:
    from mist_kit.cli.app import app

    runner = CliRunner()
    res = runner.invoke(app, ["serve-cloud", str(tmp_path)])
    assert res.exit_code == 2 and "manifest.json: missing" in res.output, res.output
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    res = runner.invoke(app, ["serve-cloud", str(bundle), "--token-file", str(empty)])
    assert res.exit_code == 2 and "--token-file" in res.output, res.output


def test_run_edge_cloud_matches_direct_features(bundle: Path, digits_lists: dict) -> None:
    """run-edge --cloud predictions equal the edge model run on features computed by cloud.onnx directly."""
    from mist_kit.cli.app import app
    from mist_kit.data import load_image_list, load_pixels
    from mist_kit.runtime.edge_run import Batch, run_edge

    lines = digits_lists["test"].read_text().splitlines()[:12]
    small = digits_lists["test"].parent / "serve_small.txt"
    small.write_text("\n".join(lines) + "\n")
    model = CloudModel(bundle, ServeConfig(max_batch=4, threads=1))
    with serve_in_thread(model=model, token="edge-tok") as url:
        res = CliRunner().invoke(app, ["run-edge", "--device", "rpi4", "--bundle", str(bundle), "--cloud", url,
                                       "--images", str(small), "--token", "edge-tok", "--batch", "4", "--json",
                                       "--no-cap"])  # RLIMIT_AS would also cap this process's server thread
        assert res.exit_code == 0, res.output
        denied = CliRunner().invoke(app, ["run-edge", "--device", "rpi4", "--bundle", str(bundle), "--cloud", url,
                                          "--images", str(small), "--json", "--no-cap"])
        assert denied.exit_code == 2 and "401" in denied.output, denied.output
    import json

    served = json.loads(res.stdout.strip().splitlines()[-1])
    data = load_image_list(small)
    m = model.manifest["input"]
    px = np.stack([load_pixels(p, m["size"], m["mean"], m["std"]) for p in data.paths])
    feats = model.run(px)
    direct = run_edge(bundle, device="rpi4", batch=4, apply_caps=False, batches=[
        Batch([str(p) for p in data.paths], feats, np.array(data.labels, dtype=np.int64))])
    assert served["images"] == direct["images"] == 12
    assert [p["index"] for p in served["predictions"]] == [p["index"] for p in direct["predictions"]]
