"""Device-side KServe v2 client: send images to the cloud model, get its encoded features back as numpy arrays.

Torch-free, on httpx (already a core dependency). tritonclient[http] does install on aarch64, but it would add
gevent, geventhttpclient, aiohttp, python-rapidjson, brotli and ml_dtypes (about 14 MB of wheels) to every device,
has no retry/backoff, and its errors would need wrapping anyway; the wire format it speaks is the one in
v2_protocol, and the tests hold this client and our server to it by running tritonclient against both.

The same client talks to `mist-kit serve-cloud` (which takes encoded JPEG/PNG bytes as input `image`) and to NVIDIA
Triton / KServe serving the bundle's deploy/ model repository (input `pixel_values` only: then the device
preprocesses with `mist_kit.data`, the same code the server runs). Before sending anything it checks that the
server's model matches the bundle the device holds: model name, output names/dtypes/shapes and, when the server
reports it, the cloud graph's sha256 and codec.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from mist_kit.errors import InputError, MistError
from mist_kit.runtime.manifest import codec_names, manifest_codecs
from mist_kit.runtime.v2_protocol import (
    HEADER_LENGTH,
    ProtocolError,
    Tensor,
    bytes_tensor,
    decode_response,
    encode_request,
    numpy_dtype,
    v2_datatype,
)

RETRY_STATUSES = (503,)


class CloudError(MistError):
    """The cloud server is unreachable, failed, or stayed overloaded through every retry."""


class CloudAuthError(InputError):
    """The server wants a bearer token, or rejected the one given (HTTP 401)."""


class CloudRequestError(InputError):
    """The server refused a request as invalid (HTTP 4xx) or serves another model than the bundle's."""


def _message(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("error", resp.text))[:500]
    except ValueError:
        return resp.text[:500] or resp.reason_phrase


class V2Client:
    """A few v2 REST calls over one keep-alive connection pool, with backoff on 503."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 60.0, retries: int = 4,
                 backoff_s: float = 0.25, transport: httpx.BaseTransport | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise InputError(f"--cloud {url!r}: expected an http:// or https:// URL of a v2 inference server")
        self.url = url.rstrip("/")
        self.retries, self.backoff_s = retries, backoff_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s, transport=transport)

    def __enter__(self) -> V2Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            try:
                resp = self._http.request(method, path, **kwargs)
            except httpx.ConnectError as exc:
                raise CloudError(f"{self.url}: cannot connect ({exc}); is `mist-kit serve-cloud` (or Triton) "
                                 "running there?") from None
            except httpx.TimeoutException:
                raise CloudError(f"{self.url}{path}: no answer within the client timeout") from None
            except httpx.HTTPError as exc:
                raise CloudError(f"{self.url}{path}: {type(exc).__name__}: {exc}") from None
            if resp.status_code not in RETRY_STATUSES or attempt == self.retries:
                break
            time.sleep(self.backoff_s * 2**attempt)
        if resp.status_code == 401:
            raise CloudAuthError(f"{self.url}: 401 {_message(resp)}")
        if resp.status_code in RETRY_STATUSES:
            raise CloudError(f"{self.url}{path}: still {resp.status_code} after {self.retries} retries: "
                             f"{_message(resp)}")
        if 400 <= resp.status_code < 500:
            raise CloudRequestError(f"{self.url}{path}: {resp.status_code} {_message(resp)}")
        if resp.status_code != 200:
            raise CloudError(f"{self.url}{path}: {resp.status_code} {_message(resp)}")
        return resp

    def ready(self) -> bool:
        try:
            return self._http.get("/v2/health/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def server_metadata(self) -> dict[str, Any]:
        return self._request("GET", "/v2").json()

    def model_metadata(self, name: str) -> dict[str, Any]:
        return self._request("GET", f"/v2/models/{name}").json()

    def infer(self, name: str, inputs: Sequence[Tensor], outputs: Sequence[str] | None = None,
              ) -> dict[str, np.ndarray]:
        """One infer call with binary inputs and binary outputs."""
        body, json_size = encode_request(inputs, outputs, binary_outputs=True)
        headers = {"Content-Type": "application/octet-stream"}
        if json_size is not None:
            headers[HEADER_LENGTH] = str(json_size)
        resp = self._request("POST", f"/v2/models/{name}/infer", content=body, headers=headers)
        try:
            return decode_response(resp.content, resp.headers.get(HEADER_LENGTH))
        except ProtocolError as exc:
            raise CloudError(f"{self.url}: malformed infer response ({exc})") from None


def _check_model(meta: dict[str, Any], manifest: dict[str, Any], url: str) -> None:
    """Refuse a server whose model is not the bundle's: wrong features would silently ruin every prediction."""
    want = [(e["name"], v2_datatype(e["dtype"]), list(e["shape"])[1:]) for e in manifest["cloud"]["outputs"]]
    got = [(o.get("name"), o.get("datatype"), list(o.get("shape", []))[1:]) for o in meta.get("outputs", [])]
    if got != want:
        raise CloudRequestError(f"{url}: model '{meta.get('name')}' outputs {got}, the bundle's cloud outputs are "
                                f"{want}: the server runs another bundle")
    params = meta.get("parameters") or {}
    cloud_file = manifest["cloud"].get("file", "cloud.onnx")
    sha = manifest["files"].get(cloud_file, {}).get("sha256")
    if params.get("cloud_sha256") not in (None, sha):
        raise CloudRequestError(f"{url}: serves a cloud graph with sha256 {str(params['cloud_sha256'])[:12]}..., "
                                f"the bundle's is {str(sha)[:12]}...: export and serve the same bundle")
    if "codecs" in params and params["codecs"] != manifest_codecs(manifest):
        raise CloudRequestError(f"{url}: the server's codecs ({', '.join(sorted(params['codecs']))}) differ from the "
                                f"bundle's ({codec_names(manifest)}): export and serve the same bundle")


def _image_paths(images: Any) -> list[Path | bytes]:
    items = getattr(images, "paths", images)
    return [item if isinstance(item, bytes) else Path(item) for item in items]


def _read(item: Path | bytes) -> bytes:
    if isinstance(item, bytes):
        return item
    try:
        return item.read_bytes()
    except OSError as exc:
        raise InputError(f"{item}: cannot read image ({exc.strerror or exc})") from None


def fetch_features(url: str, images: Any, manifest: dict[str, Any], token: str | None = None, batch: int = 8,
                   retries: int = 4, backoff_s: float = 0.25, timeout_s: float = 60.0, send: str = "auto",
                   log: Callable[[str], None] | None = None,
                   transport: httpx.BaseTransport | None = None) -> dict[str, np.ndarray]:
    """Encoded features for every image, in order: {cloud output name: array with len(images) rows}.

    `images`: an ImageList (its `.paths`) or a sequence of paths or encoded-image bytes. `send`: "image" sends the
    files as they are (serve-cloud), "pixel_values" preprocesses here (Triton/KServe running cloud.onnx), "auto"
    picks "image" when the server's model declares that input.
    """
    if send not in ("auto", "image", "pixel_values"):
        raise InputError(f"send={send!r}: expected 'auto', 'image' or 'pixel_values'")
    if batch < 1:
        raise InputError(f"batch={batch}: must be >= 1")
    items = _image_paths(images)
    if not items:
        raise InputError("no images to send")
    name = manifest["model_name"]
    out_specs = manifest["cloud"]["outputs"]
    with V2Client(url, token, timeout_s, retries, backoff_s, transport) as client:
        meta = client.model_metadata(name)
        _check_model(meta, manifest, url)
        input_names = [i.get("name") for i in meta.get("inputs", [])]
        if send == "auto":
            send = "image" if "image" in input_names else "pixel_values"
        if send not in input_names:
            raise CloudRequestError(f"{url}: model '{name}' has inputs {input_names}, not '{send}'")
        server_max = (meta.get("parameters") or {}).get("max_batch_size")
        step = min(batch, server_max) if isinstance(server_max, int) and server_max > 0 else batch
        chunks: dict[str, list[np.ndarray]] = {s["name"]: [] for s in out_specs}
        for start in range(0, len(items), step):
            part = items[start:start + step]
            tensor = _input_tensor(part, send, manifest)
            result = client.infer(name, [tensor], [s["name"] for s in out_specs])
            for spec in out_specs:
                arr = result.get(spec["name"])
                if arr is None or arr.dtype != numpy_dtype(v2_datatype(spec["dtype"])) or len(arr) != len(part):
                    got = None if arr is None else f"{arr.dtype} {list(arr.shape)}"
                    raise CloudError(f"{url}: output '{spec['name']}' came back as {got}, expected {spec['dtype']} "
                                     f"with {len(part)} rows")
                chunks[spec["name"]].append(arr)
            if log is not None:
                log(f"cloud features: {min(start + step, len(items))}/{len(items)} images")
    return {k: np.concatenate(v) for k, v in chunks.items()}


def _input_tensor(part: list[Path | bytes], send: str, manifest: dict[str, Any]) -> Tensor:
    if send == "image":
        return Tensor("image", "BYTES", bytes_tensor(_read(p) for p in part))
    from mist_kit.data import decode_image, preprocess

    spec = manifest["input"]
    pixels = np.stack([preprocess(decode_image(_read(p), str(p) if isinstance(p, Path) else f"image {i}"),
                                  int(spec["size"]), spec["mean"], spec["std"]) for i, p in enumerate(part)])
    return Tensor("pixel_values", "FP32", pixels)
