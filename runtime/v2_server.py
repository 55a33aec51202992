"""`mist-kit serve-cloud`: the cloud half over the KServe v2 REST protocol (binary tensor extension), on FastAPI.

A thin layer, not the KServe SDK: its ModelServer re-decodes binary BYTES inputs as UTF-8 (a JPEG fails, kserve
#3731) and turns binary tensors into Python lists. Here bodies go straight into numpy buffers (v2_protocol), images
are decoded in a worker pool, and concurrent requests share onnxruntime calls (v2_batcher). Every failure is a
JSON `{"error": ...}` with a 4xx/5xx status; nothing a client sends can stop the server. fastapi/uvicorn are the
`serve` extra and are imported only by this module.

Slow clients: a connection must finish its request headers within `header_timeout_s` (closed otherwise; uvicorn
has no such deadline, so `_DeadlineH11` adds one) and its body within `body_timeout_s` (408). A request takes an
admission slot (--max-queue + --max-batch) only once its body is in memory, so clients that stall mid-body
cannot starve the model; they hold one of `max_readers` reader slots instead, each for at most the body deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mist_kit import __version__
from mist_kit.errors import DataError, DependencyError, MistError, UsageError
from mist_kit.runtime.token_file import read_token_file
from mist_kit.runtime.v2_batcher import DynamicBatcher, QueueFullError
from mist_kit.runtime.v2_model import MODEL_VERSION, CloudModel, ServeConfig
from mist_kit.runtime.v2_protocol import HEADER_LENGTH, ProtocolError, decode_request, encode_response

try:
    import h11
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.requests import ClientDisconnect  # fastapi's own request layer
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError as _exc:  # pragma: no cover - depends on the install
    raise DependencyError(f"serve-cloud needs the 'serve' extra (pip install 'mist-kit[serve]'): {_exc}") from None

log = logging.getLogger("mist_kit.serve")
SERVER_NAME = "mist-kit"
EXTENSIONS = ["binary_tensor_data"]
HEADER_TIMEOUT_S = 10.0  # request line + headers, from connection (or end of the previous response)
BODY_TIMEOUT_S = 30.0  # whole request body, once the headers are in


@dataclass(frozen=True)
class Deadlines:
    """Slow-client limits: header and body read deadlines, and how many bodies may be read at once."""

    header_timeout_s: float = HEADER_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S
    max_readers: int | None = None  # default: 4 x (--max-queue + --max-batch)

    def __post_init__(self) -> None:
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0 or (self.max_readers or 1) < 1:
            raise UsageError("--header-timeout-s and --body-timeout-s must be > 0, max_readers >= 1")


class _DeadlineH11(H11Protocol):
    """uvicorn's h11 protocol plus a request-header deadline: a connection that has not completed its request
    line and headers `header_timeout_s` after connecting (or after its previous response) is closed.

    Keep-alive alone does not cover this: uvicorn cancels the keep-alive timer on the first byte received."""

    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if getattr(self, "_header_timer", None) is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline)

    def _disarm_header_timer(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()  # type: ignore[union-attr]
            self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closing a connection that sent no complete request headers within %g s",
                     self.header_timeout_s)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # headers complete: the body deadline takes over
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)


class HTTPError(Exception):
    """An answer other than 200, raised anywhere in a handler and rendered as v2's {"error": msg}."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def read_token(path: str | Path) -> str:
    """The bearer token from a file (first line, stripped); empty, unreadable or group/other-readable is refused."""
    return read_token_file(path, "--token-file")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """Read at most `limit` bytes (413 beyond), inflating gzip/deflate bodies with the same bound."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HTTPError(413, f"request body of {declared} bytes is over this server's {limit} byte limit "
                             "(serve-cloud --max-body-mb)")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"request body is over this server's {limit} byte limit "
                                     "(serve-cloud --max-body-mb)")
            chunks.append(chunk)
    except ClientDisconnect:
        raise HTTPError(400, "client disconnected before sending the whole body") from None
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding in ("gzip", "deflate"):
        inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        try:
            body = inflater.decompress(body, limit + 1)
        except zlib.error as exc:
            raise HTTPError(400, f"request body is not valid {encoding} ({exc})") from None
        if len(body) > limit or inflater.unconsumed_tail:
            raise HTTPError(413, f"{encoding} request body inflates past this server's {limit} byte limit")
    elif encoding != "identity":
        raise HTTPError(415, f"Content-Encoding {encoding!r} is not supported (identity, gzip, deflate)")
    return body


def create_app(model: CloudModel, token: str | None = None, deadlines: Deadlines | None = None) -> FastAPI:
    """The ASGI app for one model; `token` (if set) is required as `Authorization: Bearer <token>`."""
    cfg = model.config
    deadlines = deadlines or Deadlines()
    decode_pool = ThreadPoolExecutor(max(2, cfg.threads or 2), thread_name_prefix="mist-decode")
    model_pool = ThreadPoolExecutor(1, thread_name_prefix="mist-ort")  # ORT parallelises inside one call
    state: dict[str, Any] = {"ready": False, "inflight": 0, "reading": 0}
    # Admission bound, taken once the body is in memory: requests being decoded, queued or run. Bodies being read
    # have their own bound (max_readers, each held at most body_timeout_s); together they bound memory to about
    # (max_inflight + max_readers) x --max-body-mb however many clients connect.
    max_inflight = cfg.max_queue + cfg.max_batch
    max_readers = deadlines.max_readers or 4 * max_inflight
    expected = f"Bearer {token}".encode() if token else None

    @asynccontextmanager
    async def lifespan(_app: FastAPI):  # type: ignore[no-untyped-def]
        await asyncio.get_running_loop().run_in_executor(model_pool, model.warmup)
        batcher = DynamicBatcher(model.run, model_pool, cfg.max_batch, cfg.max_delay_ms / 1000, cfg.max_queue)
        batcher.start()
        state.update(batcher=batcher, ready=True)
        try:
            yield
        finally:
            state["ready"] = False
            await batcher.stop()
            decode_pool.shutdown(wait=False, cancel_futures=True)
            model_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="mist-kit serve-cloud", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.model, app.state.serve = model, state

    def authorize(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            why = "missing" if not given else "rejected"
            raise HTTPError(401, f"bearer token {why}: send 'Authorization: Bearer <token>' (serve-cloud "
                                 "--token-file)", {"WWW-Authenticate": "Bearer"})

    def find_model(name: str, version: str | None = None) -> None:
        if name != model.name:
            raise HTTPError(404, f"model '{name}' not found; this server serves '{model.name}'")
        if version not in (None, "", MODEL_VERSION):
            raise HTTPError(404, f"model '{name}' has no version '{version}'; versions: ['{MODEL_VERSION}']")

    @app.exception_handler(HTTPError)
    async def _http_error(_request: Request, exc: HTTPError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.get("/v2/health/live")
    async def live() -> JSONResponse:
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    @app.get("/v2")
    async def server_metadata(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(request: Request, name: str, version: str | None = None) -> JSONResponse:
        authorize(request)
        find_model(name, version)
        return JSONResponse(model.metadata())

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(request: Request, name: str, version: str | None = None) -> JSONResponse:
        authorize(request)
        find_model(name, version)
        return JSONResponse({"name": model.name, "ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    @app.get("/v2/models/{name}/stats")
    @app.get("/v2/models/{name}/versions/{version}/stats")
    async def model_stats(request: Request, name: str, version: str | None = None) -> JSONResponse:
        """Triton's statistics-extension shape, reduced to what the batcher knows: model calls per batch size."""
        authorize(request)
        find_model(name, version)
        sizes = state["batcher"].batch_sizes if "batcher" in state else {}
        batches = [{"batch_size": n, "compute_infer": {"count": c}} for n, c in sorted(sizes.items())]
        return JSONResponse({"model_stats": [{
            "name": model.name, "version": MODEL_VERSION, "inference_count": sum(n * c for n, c in sizes.items()),
            "execution_count": sum(sizes.values()), "batch_stats": batches}]})

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(request: Request, name: str, version: str | None = None) -> Response:
        authorize(request)
        find_model(name, version)
        if not state["ready"]:
            raise HTTPError(503, "model is loading; retry later", {"Retry-After": "1"})
        if state["reading"] >= max_readers:
            raise HTTPError(503, f"server is reading {max_readers} request bodies already; retry later",
                            {"Retry-After": "1"})
        state["reading"] += 1
        try:
            body = await asyncio.wait_for(_read_body(request, cfg.max_body_bytes), deadlines.body_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPError(408, f"request body not received within {deadlines.body_timeout_s:g} s",
                            {"Connection": "close"}) from None
        finally:
            state["reading"] -= 1
        if state["inflight"] >= max_inflight:
            raise HTTPError(503, f"server is at its {max_inflight} requests in flight (--max-queue + --max-batch); "
                                 "retry later", {"Retry-After": "1"})
        state["inflight"] += 1
        try:
            return await asyncio.wait_for(_infer(body, request.headers.get(HEADER_LENGTH)), cfg.timeout_s)
        except asyncio.TimeoutError:
            raise HTTPError(504, f"inference took longer than {cfg.timeout_s:g} s (serve-cloud --timeout-s)") from None
        finally:
            state["inflight"] -= 1

    async def _infer(body: bytes, header_length: str | None) -> Response:
        loop = asyncio.get_running_loop()

        def prepare() -> tuple[Any, Any, Any]:
            req = decode_request(body, header_length)
            return req, model.pixels_for(req), model.outputs_for(req)

        try:
            req, pixels, chosen = await loop.run_in_executor(decode_pool, prepare)
            outputs = await state["batcher"].submit(pixels)
            payload, json_size = encode_response(model.name, MODEL_VERSION, req.id, model.tensors(outputs, chosen),
                                                 [binary for _, binary in chosen])
        except (ProtocolError, DataError) as exc:
            raise HTTPError(400, str(exc)) from None
        except QueueFullError as exc:
            raise HTTPError(503, str(exc), {"Retry-After": "1"}) from None
        except MistError as exc:
            raise HTTPError(400 if exc.exit_code == 2 else 500, str(exc)) from None
        except Exception as exc:
            log.exception("inference failed")
            raise HTTPError(500, f"inference failed: {type(exc).__name__}: {exc}") from None
        if json_size is None:
            return Response(payload, media_type="application/json")
        return Response(payload, media_type="application/octet-stream", headers={HEADER_LENGTH: str(json_size)})

    return app


def _uvicorn_config(app: FastAPI, host: str, port: int, log_level: str,
                    deadlines: Deadlines | None = None) -> uvicorn.Config:
    deadlines = deadlines or Deadlines()
    protocol = type("DeadlineH11", (_DeadlineH11,), {"header_timeout_s": deadlines.header_timeout_s})
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                          timeout_graceful_shutdown=5, server_header=False, http=protocol,
                          timeout_keep_alive=max(1, min(5, int(deadlines.header_timeout_s))))


def serve(bundle_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, token: str | None = None,
          config: ServeConfig | None = None, log_level: str = "info", deadlines: Deadlines | None = None,
          model: CloudModel | None = None) -> None:
    """Load the bundle (or serve an already loaded `model`) until interrupted (the CLI entry point)."""
    model = model or CloudModel(bundle_dir, config)
    # uvicorn re-raises Ctrl+C after its graceful shutdown; for a server that is the normal way to stop (exit 0)
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(_uvicorn_config(create_app(model, token, deadlines), host, port, log_level, deadlines)).run()


@contextmanager
def serve_in_thread(bundle_dir: str | Path | None = None, *, model: CloudModel | None = None,
                    token: str | None = None, config: ServeConfig | None = None, host: str = "127.0.0.1",
                    startup_timeout_s: float = 60.0, deadlines: Deadlines | None = None) -> Iterator[str]:
    """Serve on a free loopback port in a background thread; yields the base URL, stops on exit.

    For the demo, tests and benchmarks: the served path end to end in one process, always shut down.
    """
    if model is None:
        if bundle_dir is None:
            raise UsageError("serve_in_thread needs a bundle directory or a loaded CloudModel")
        model = CloudModel(bundle_dir, config)
    app = create_app(model, token, deadlines)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    server = uvicorn.Server(_uvicorn_config(app, host, sock.getsockname()[1], "warning", deadlines))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="mist-kit-serve", daemon=True)
    thread.start()
    try:
        deadline = threading.Event()
        waited = 0.0
        while not server.started:
            if not thread.is_alive():
                raise MistError("serve-cloud thread stopped during startup (see the log above)")
            if waited > startup_timeout_s:
                raise MistError(f"serve-cloud did not start within {startup_timeout_s:g} s")
            deadline.wait(0.02)
            waited += 0.02
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def serve_roundtrip(bundle_dir: str | Path, images: Any, batch: int = 4) -> tuple[dict[str, Any], dict[str, Any]]:
    """The served path end to end on loopback, for `mist-kit demo`: returns (features, report).

    Starts the server in a thread with a random token, fetches features for `images` (paths or encoded bytes) with
    the device client, stops the server, and checks them against cloud.onnx run in-process on the same images.
    """
    import secrets
    import time

    import numpy as np

    from mist_kit.data import decode_image, preprocess
    from mist_kit.runtime.v2_client import fetch_features

    model = CloudModel(bundle_dir, ServeConfig(max_batch=max(1, batch)))
    token = secrets.token_urlsafe(16)
    t0 = time.perf_counter()
    with serve_in_thread(model=model, token=token) as url:
        feats = fetch_features(url, images, model.manifest, token=token, batch=batch)
    seconds = time.perf_counter() - t0
    items = list(getattr(images, "paths", images))
    raw = [i if isinstance(i, bytes) else Path(i).read_bytes() for i in items]
    px = np.stack([preprocess(decode_image(b, f"image {n}"), model.size, model.mean, model.std)
                   for n, b in enumerate(raw)])
    ref = model.run(px)
    diff = max(float(np.abs(feats[k].astype(np.float32) - ref[k].astype(np.float32)).max()) for k in ref)
    report = {"url": url, "model": model.name, "images": len(raw), "seconds": round(seconds, 3),
              "wire_bytes_per_image": int(sum(v[0].nbytes for v in feats.values())),
              "max_abs_diff_vs_in_process": diff, "outputs": {k: list(v.shape) for k, v in feats.items()}}
    return feats, report
