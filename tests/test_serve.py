"""serve-cloud on loopback: tritonclient (a third-party v2 client) and our client against our server.

Features must equal running the bundle's cloud.onnx directly on the same preprocessing; every bad input gets a 4xx
with a clear message and the server keeps serving. Servers run in a background thread on a free 127.0.0.1 port
and always stop at the end of their fixture.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from mist_kit.data import decode_image, preprocess
from mist_kit.runtime.manifest import open_bundle
from mist_kit.runtime.v2_client import CloudAuthError, CloudError, CloudRequestError, fetch_features
from mist_kit.runtime.v2_model import CloudModel, ServeConfig
from mist_kit.runtime.v2_protocol import HEADER_LENGTH, Tensor, bytes_tensor, encode_request
from mist_kit.runtime.v2_server import serve_in_thread

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONFIG = ServeConfig(max_batch=4, max_delay_ms=30, max_queue=32, max_body_mb=1, timeout_s=20, threads=1)


def encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Path:
    """The exporter's real tiny bundle (tests/conftest.py): test_vit, digits, int8 edge graph, deploy/."""
    return tiny_bundle


@pytest.fixture(scope="module")
def manifest(bundle: Path) -> dict:
    return open_bundle(bundle)


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for i, (h, w) in enumerate([(40, 50), (64, 64), (23, 31), (80, 40), (33, 33), (50, 70)]):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out.append(encode(arr, "JPEG" if i % 2 == 0 else "PNG"))
    return out


@pytest.fixture(scope="module")
def model(bundle: Path) -> CloudModel:
    return CloudModel(bundle, CONFIG)


@pytest.fixture(scope="module")
def url(model: CloudModel):
    with serve_in_thread(model=model, token=TOKEN) as base:
        yield base


def direct(model: CloudModel, images: list[bytes]) -> np.ndarray:
    """Reference: decode + preprocess with mist_kit.data and run cloud.onnx in onnxruntime, no server."""
    m = model.manifest["input"]
    px = np.stack([preprocess(decode_image(b, "ref"), m["size"], m["mean"], m["std"]) for b in images])
    return model.session.run(None, {"pixel_values": px})


def triton(url: str, token: str | None = TOKEN):
    import tritonclient.http as th

    headers = {"Authorization": f"Bearer {token}"} if token else None
    return th, th.InferenceServerClient(url.removeprefix("http://")), headers


def test_tritonclient_metadata(url: str, manifest: dict) -> None:
    _th, client, headers = triton(url)
    assert client.is_server_live() and client.is_server_ready()
    assert "binary_tensor_data" in client.get_server_metadata(headers=headers)["extensions"]
    name = manifest["model_name"]
    assert client.is_model_ready(name, headers=headers)
    meta = client.get_model_metadata(name, headers=headers)
    assert meta["name"] == name
    assert {i["name"]: i["datatype"] for i in meta["inputs"]} == {"image": "BYTES", "pixel_values": "FP32"}
    assert [o["name"] for o in meta["outputs"]] == [o["name"] for o in manifest["cloud"]["outputs"]]
    assert meta["parameters"]["codecs"] == {t["name"]: t["codec"] for t in manifest["cloud"]["plan"]["tensors"]}
    assert meta["parameters"]["plan"] == manifest["cloud"]["plan"]


def test_tritonclient_infer_binary_outputs_equal_cloud_onnx(url: str, model: CloudModel, images: list[bytes]) -> None:
    th, client, headers = triton(url)
    inp = th.InferInput("image", [3], "BYTES")
    inp.set_data_from_numpy(np.array(images[:3], dtype=object), binary_data=True)
    outs = [th.InferRequestedOutput(n, binary_data=True) for n in model.output_names]
    result = client.infer(model.name, [inp], outputs=outs, headers=headers)
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] > 0
    for name, ref in zip(model.output_names, direct(model, images[:3]), strict=True):
        got = result.as_numpy(name)
        assert got.dtype == ref.dtype and got.shape == ref.shape
        np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), rtol=1e-4, atol=1e-4)
    # pixel_values in, JSON (non-binary) out: the other half of the protocol
    m = model.manifest["input"]
    px = np.stack([preprocess(decode_image(b, "x"), m["size"], m["mean"], m["std"]) for b in images[3:5]])
    inp = th.InferInput("pixel_values", list(px.shape), "FP32")
    inp.set_data_from_numpy(px, binary_data=True)
    outs = [th.InferRequestedOutput(n, binary_data=False) for n in model.output_names]
    result = client.infer(model.name, [inp], outputs=outs, headers=headers)
    assert "binary_data_size" not in (result.get_response()["outputs"][0].get("parameters") or {})
    ref = direct(model, images[3:5])[0]
    np.testing.assert_allclose(result.as_numpy(model.output_names[0]).astype(np.float32), ref.astype(np.float32),
                               rtol=1e-4, atol=1e-4)


def test_tritonclient_auth_and_bad_input(url: str, model: CloudModel, images: list[bytes]) -> None:
    from tritonclient.utils import InferenceServerException

    th, client, _ = triton(url)
    inp = th.InferInput("image", [1], "BYTES")
    inp.set_data_from_numpy(np.array(images[:1], dtype=object))
    for headers in (None, {"Authorization": "Bearer wrong"}):
        with pytest.raises(InferenceServerException) as err:
            client.infer(model.name, [inp], headers=headers)
        assert err.value.status() == "401" and "bearer token" in err.value.message()
    bad = th.InferInput("image", [1], "BYTES")
    bad.set_data_from_numpy(np.array([b"\xff\xd8\xff\xe0 not really a jpeg"], dtype=object))
    with pytest.raises(InferenceServerException) as err:
        client.infer(model.name, [bad], headers=dict(AUTH))  # tritonclient mutates it
    assert err.value.status() == "400" and "not a JPEG or PNG image" in err.value.message()


def test_our_client_equals_cloud_onnx(url: str, model: CloudModel, manifest: dict, images: list[bytes],
                                      tmp_path: Path) -> None:
    paths = []
    for i, data in enumerate(images):
        p = tmp_path / f"img{i}.{'jpg' if i % 2 == 0 else 'png'}"
        p.write_bytes(data)
        paths.append(p)
    feats = fetch_features(url, paths, manifest, token=TOKEN, batch=4)
    refs = direct(model, images)
    for name, ref in zip(model.output_names, refs, strict=True):
        assert feats[name].shape == ref.shape and feats[name].dtype == ref.dtype
        np.testing.assert_allclose(feats[name].astype(np.float32), ref.astype(np.float32), rtol=1e-4, atol=1e-4)
    # pixel_values mode (what the client sends to Triton): preprocessing on the device, same features
    local = fetch_features(url, paths, manifest, token=TOKEN, batch=3, send="pixel_values")
    for name, ref in zip(model.output_names, refs, strict=True):
        np.testing.assert_allclose(local[name].astype(np.float32), ref.astype(np.float32), rtol=1e-4, atol=1e-4)


def test_our_client_errors(url: str, manifest: dict, images: list[bytes]) -> None:
    with pytest.raises(CloudAuthError, match="401 bearer token missing"):
        fetch_features(url, images[:1], manifest)
    with pytest.raises(CloudAuthError, match="rejected"):
        fetch_features(url, images[:1], manifest, token="nope")
    other = {**manifest, "model_name": "someone_else"}
    with pytest.raises(CloudRequestError, match="not found; this server serves"):
        fetch_features(url, images[:1], other, token=TOKEN)
    with pytest.raises(CloudRequestError, match="not a JPEG or PNG"):
        fetch_features(url, [b"garbage"], manifest, token=TOKEN)
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(CloudError, match="cannot connect"):
        fetch_features(dead, images[:1], manifest)


def test_our_client_retries_503(url: str, manifest: dict, images: list[bytes]) -> None:
    calls = {"n": 0}
    real = httpx.HTTPTransport()

    def flaky(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if request.url.path.endswith("/infer") and calls["n"] <= 3:
            return httpx.Response(503, json={"error": "queue is full"})
        return real.handle_request(request)

    feats = fetch_features(url, images[:2], manifest, token=TOKEN, backoff_s=0.01,
                           transport=httpx.MockTransport(flaky))
    assert calls["n"] == 4 and len(next(iter(feats.values()))) == 2
    calls["n"] = -100  # always 503 from here on
    with pytest.raises(CloudError, match="still 503 after 2 retries"):
        fetch_features(url, images[:1], manifest, token=TOKEN, retries=2, backoff_s=0.01,
                       transport=httpx.MockTransport(flaky))


def png_bomb(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR claims width x height (the classic decompression bomb header)."""
    data = encode(np.zeros((1, 1, 3), np.uint8), "PNG")
    ihdr = struct.pack(">II", width, height) + data[24:29]
    chunk = b"IHDR" + ihdr
    return data[:12] + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


def post(url: str, name: str, inputs: list[Tensor], headers: dict | None = None, **kw) -> httpx.Response:
    body, hl = encode_request(inputs, None)
    h = {**AUTH, **({HEADER_LENGTH: str(hl)} if hl else {}), **(headers or {})}
    return httpx.post(f"{url}/v2/models/{name}/infer", content=kw.get("content", body), headers=h, timeout=30)


def test_bad_inputs_get_clear_4xx(url: str, model: CloudModel, images: list[bytes]) -> None:
    n, size = model.name, model.size
    truncated = images[0][: len(images[0]) // 2]
    cases = [
        ([Tensor("image", "BYTES", bytes_tensor([truncated]))], 400, "cannot decode image"),
        ([Tensor("image", "BYTES", bytes_tensor([png_bomb(30000, 30000)]))], 400, "pixel limit"),
        ([Tensor("pixel_values", "FP16", np.zeros((1, 3, size, size), np.float16))], 400, "expects FP32"),
        ([Tensor("pixel_values", "FP32", np.zeros((1, 3, size, size + 1), np.float32))], 400, "expects [-1, 3"),
        ([Tensor("pixel_values", "FP32", np.full((1, 3, size, size), np.nan, np.float32))], 400, "NaN"),
        ([Tensor("image", "BYTES", bytes_tensor(images[:1] * 5))], 400, "1..4 per request"),
        ([Tensor("wrong", "FP32", np.zeros(3, np.float32))], 400, "send exactly one of 'image'"),
    ]
    for inputs, status, match in cases:
        resp = post(url, n, inputs)
        assert resp.status_code == status and match in resp.json()["error"], (match, resp.text)
    assert post(url, "nope", cases[0][0]).status_code == 404
    assert post(url, n, cases[0][0], headers={"Authorization": ""}).status_code == 401
    huge = b"\x00" * (2 << 20)  # 2 MiB > --max-body-mb 1
    resp = post(url, n, [], content=huge)
    assert resp.status_code == 413 and "byte limit" in resp.json()["error"]
    gzip_bomb = zlib.compress(b"{" + b" " * (8 << 20), 9)  # 8 MiB of JSON whitespace in ~10 KB
    resp = post(url, n, [], content=gzip_bomb, headers={"Content-Encoding": "deflate"})
    assert resp.status_code == 413 and "inflates past" in resp.json()["error"]
    resp = post(url, n, [], content=b'{"inputs": [', headers={HEADER_LENGTH: "9"})
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]
    # still serving, and the answer is still right
    ok = post(url, n, [Tensor("image", "BYTES", bytes_tensor(images[:1]))])
    assert ok.status_code == 200 and json.loads(ok.content[: int(ok.headers[HEADER_LENGTH])])["model_name"] == n


def test_concurrent_requests_share_model_calls(url: str, model: CloudModel, images: list[bytes]) -> None:
    def one(i: int) -> np.ndarray:
        r = post(url, model.name, [Tensor("image", "BYTES", bytes_tensor([images[i % len(images)]]))])
        assert r.status_code == 200, r.text
        return r

    stats = httpx.get(f"{url}/v2/models/{model.name}/stats", headers=AUTH).json()["model_stats"][0]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(16)))
    after = httpx.get(f"{url}/v2/models/{model.name}/stats", headers=AUTH).json()["model_stats"][0]
    assert after["inference_count"] - stats["inference_count"] == 16
    calls = after["execution_count"] - stats["execution_count"]
    assert calls < 16, f"16 concurrent single-image requests ran as {calls} model calls: no batching"
    assert max(b["batch_size"] for b in after["batch_stats"]) > 1


def test_queue_full_503_and_timeout_504(bundle: Path, images: list[bytes]) -> None:
    import time

    slow = CloudModel(bundle, ServeConfig(max_batch=1, max_delay_ms=0, max_queue=1, timeout_s=1.5, threads=1))
    fast_run, delay = slow.run, {"s": 0.3}
    slow.run = lambda px: (time.sleep(delay["s"]), fast_run(px))[1]  # type: ignore[method-assign]
    with serve_in_thread(model=slow) as base:
        with ThreadPoolExecutor(6) as pool:
            codes = sorted(pool.map(lambda _i: post(base, slow.name, [Tensor(
                "image", "BYTES", bytes_tensor(images[:1]))]).status_code, range(6)))
        assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
        delay["s"] = 2.5
        resp = post(base, slow.name, [Tensor("image", "BYTES", bytes_tensor(images[:1]))])
        assert resp.status_code == 504 and "--timeout-s" in resp.json()["error"]
        assert httpx.get(f"{base}/v2/health/live").status_code == 200

