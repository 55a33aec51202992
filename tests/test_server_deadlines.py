"""serve-cloud against slow and hostile clients on loopback (issue 15 items 2 and 8): stalled bodies do not
block other clients, bodies and headers have deadlines, huge dimensions and deep JSON answer 400, never 500.

Every loop is bounded (socket timeouts, fixed request counts); deadlines are set short so the tests stay fast."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from mist_kit.runtime.v2_model import CloudModel, ServeConfig
from mist_kit.runtime.v2_protocol import HEADER_LENGTH, Tensor, encode_request
from mist_kit.runtime.v2_server import Deadlines, serve_in_thread

CONFIG = ServeConfig(max_batch=1, max_delay_ms=0, max_queue=1, max_body_mb=1, timeout_s=20, threads=1)


@pytest.fixture(scope="module")
def model(tiny_bundle: Path) -> CloudModel:
    return CloudModel(tiny_bundle, CONFIG)


@pytest.fixture(scope="module")
def url(model: CloudModel):
    with serve_in_thread(model=model, deadlines=Deadlines(header_timeout_s=1.0, body_timeout_s=2.0)) as base:
        yield base


def _pixels(model: CloudModel) -> bytes:
    size = model.manifest["input"]["size"]
    px = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    body, hl = encode_request([Tensor("pixel_values", "FP32", px)])
    return body, hl


def _post(url: str, model: CloudModel, body: bytes, hl: int | None, timeout: float = 30.0) -> httpx.Response:
    headers = {HEADER_LENGTH: str(hl)} if hl is not None else {}
    return httpx.post(f"{url}/v2/models/{model.name}/infer", content=body, headers=headers, timeout=timeout)


def _connect(url: str) -> socket.socket:
    u = urlparse(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=10)
    return sock


def _stall_body(url: str, model: CloudModel) -> socket.socket:
    """Headers announcing 100000 bytes, then one byte, then nothing."""
    sock = _connect(url)
    sock.sendall(f"POST /v2/models/{model.name}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                 f"{HEADER_LENGTH}: 10\r\n\r\n{{".encode())
    return sock


def _read_all(sock: socket.socket, limit_s: float) -> bytes:
    sock.settimeout(limit_s)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


def test_stalled_bodies_do_not_block_other_clients(url, model):
    body, hl = _pixels(model)
    stalled = [_stall_body(url, model) for _ in range(2)]  # as many as --max-queue + --max-batch
    try:
        time.sleep(0.2)
        codes = [_post(url, model, body, hl).status_code for _ in range(4)]
        assert codes == [200] * 4, codes
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
    finally:
        replies = [_read_all(s, 5.0) for s in stalled]
        for s in stalled:
            s.close()
    for reply in replies:  # each stalled client got 408 at the body deadline and the connection was closed
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"not received within 2 s" in reply


def test_slow_headers_are_closed(url):
    sock = _connect(url)
    t0 = time.monotonic()
    try:
        sock.sendall(b"POST /v2/models/x/infer HTTP/1.1\r\nHost: x\r\n")  # headers never finish
        for _ in range(3):  # trickle, as slowloris does: each byte would reset a per-read timeout
            time.sleep(0.2)
            sock.sendall(b"X-A: b\r\n")
        reply = _read_all(sock, 5.0)
    finally:
        sock.close()
    waited = time.monotonic() - t0
    assert reply == b"" and waited < 4.5  # closed by the server around the 1 s header deadline


def test_idle_connection_without_any_bytes_is_closed(url):
    sock = _connect(url)
    try:
        assert _read_all(sock, 5.0) == b""
    finally:
        sock.close()


@pytest.mark.parametrize("shape", [[0, 18446744073709551616], [2**31, 2**31], [0, 2**40, 2**40], [-1, 3]])
def test_dimension_overflow_is_400(url, model, shape):
    header = {"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": shape,
                          "parameters": {"binary_data_size": 0}}]}
    raw = json.dumps(header).encode()
    resp = _post(url, model, raw, len(raw))
    assert resp.status_code == 400 and "shape" in resp.json()["error"], resp.text
    resp = _post(url, model, json.dumps({"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": shape,
                                                     "data": []}]}).encode(), None)
    assert resp.status_code == 400, resp.text


def test_deep_json_is_400(url, model):
    deep = b"[" * 200_000 + b"]" * 200_000
    resp = _post(url, model, deep, None)
    assert resp.status_code == 400 and "too deeply" in resp.json()["error"]
    nested_data = ("[" * 5000 + "1.0" + "]" * 5000)
    resp = _post(url, model, ('{"inputs":[{"name":"pixel_values","datatype":"FP32","shape":[1],"data":'
                              + nested_data + '}]}').encode(), None)
    assert resp.status_code == 400, resp.text
    assert httpx.get(f"{url}/v2/health/live").status_code == 200
