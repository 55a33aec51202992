"""`mist-kit serve-cloud`: parse options, hand the bundle to mist_kit.runtime.v2_server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mist_kit.cli.common import cli_errors, console


def register(app: typer.Typer) -> None:
    app.command("serve-cloud")(serve_cloud)


# The docstring is the --help text, rendered as rich markup: no square brackets in it.
@cli_errors
def serve_cloud(
    bundle: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Bundle directory from `export`")],
    host: Annotated[str, typer.Option(help="Bind address; loopback by default, use 0.0.0.0 deliberately")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port")] = 8000,
    token_file: Annotated[Path | None, typer.Option(help="File holding a bearer token clients must send")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Most images per model call (and per request)")] = 16,
    max_delay_ms: Annotated[float, typer.Option(min=0, help="Longest wait to fill a batch")] = 5.0,
    max_queue: Annotated[int, typer.Option(min=1, help="Requests waiting beyond this get 503")] = 64,
    max_body_mb: Annotated[float, typer.Option(help="Request body limit in MiB (413 beyond)")] = 32.0,
    timeout_s: Annotated[float, typer.Option(help="Per-request time limit in seconds (504 beyond)")] = 30.0,
    threads: Annotated[int, typer.Option(min=0, help="Engine threads (0 = all cores)")] = 0,
    header_timeout_s: Annotated[float, typer.Option(help="Close connections that send no complete request "
                                                    "headers within this")] = 10.0,
    body_timeout_s: Annotated[float, typer.Option(help="Request body deadline in seconds (408 beyond)")] = 30.0,
    trust: Annotated[Path | None, typer.Option(help="Publisher's public key: refuse a bundle not signed with it")
                     ] = None,
    engine: Annotated[str, typer.Option(help="Cloud engine: onnxruntime (reference) or openvino (faster on x86; "
                                             "the openvino extra)")] = "onnxruntime",
    precision: Annotated[str, typer.Option(help="Compute precision: fp32, or bf16 (openvino, CPUs with native "
                                                "bf16 only)")] = "fp32",
) -> None:
    """Serve the bundle's cloud.onnx over the KServe v2 / Open Inference Protocol (binary tensor extension).

    Inputs: 'image' (BYTES: encoded JPEG/PNG, preprocessed per the manifest) or 'pixel_values' (FP32, B x 3 x H x W).
    Outputs: the bundle's encoded features. Endpoints: /v2/health/live, /v2/health/ready, /v2, /v2/models/NAME,
    /v2/models/NAME/ready, /v2/models/NAME/infer.
    """
    from mist_kit.runtime.signing import verify_signature
    from mist_kit.runtime.v2_model import CloudModel, ServeConfig
    from mist_kit.runtime.v2_server import Deadlines, read_token, serve

    if trust is not None:
        verify_signature(bundle, trust)
    deadlines = Deadlines(header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s)
    config = ServeConfig(max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue,
                         max_body_mb=max_body_mb, timeout_s=timeout_s, threads=threads,
                         engine=engine, precision=precision)
    token = read_token(token_file) if token_file is not None else None
    if host not in ("127.0.0.1", "localhost", "::1") and token is None:
        console.print(f"warning: serving on {host} without --token-file: anyone who can reach it can use it",
                      highlight=False, markup=False)
    console.print(f"serve-cloud: {bundle} on http://{host}:{port} (max batch {max_batch}, "
                  f"{'token required' if token else 'no token'})", highlight=False, markup=False)
    model = CloudModel(bundle, config)
    console.print(f"serve-cloud: {model.engine_line()}", highlight=False, markup=False)
    serve(bundle, host=host, port=port, token=token, config=config, deadlines=deadlines, model=model)
