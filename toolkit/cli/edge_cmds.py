"""`mist-kit run-edge` and `mist-kit finetune-edge`: the device side, thin commands over `mist_kit.runtime.edge_run`.

Module-level imports stay torch-free (a test proves run-edge never loads torch, timm or onnx); numpy and
onnxruntime load inside the commands.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from mist_kit.cli.common import cli_errors, logger, print_json
from mist_kit.errors import UsageError

CLOUD_CHUNK = 64  # images per cloud round trip series: bounds device memory when streaming from the cloud


def register(app: typer.Typer) -> None:
    app.command("run-edge")(run_edge_cmd)
    app.command("finetune-edge")(finetune_edge_cmd)


def _cloud_batches(url: str, images: str, manifest: dict[str, Any], batch: int, token: str | None,
                   log: Any) -> Iterator[Any]:
    """Stream (ids, encoded tensors, labels) from the cloud model, CLOUD_CHUNK images at a time."""
    from mist_kit.data import load_image_list
    from mist_kit.runtime.edge_run import Batch

    try:
        from mist_kit.runtime.v2_client import fetch_features
    except ImportError:  # the KServe v2 client is part of the cloud-service work
        raise UsageError("--cloud: the KServe v2 client (mist_kit.runtime.v2_client) is not available in this "
                         "install; use --features F.safetensors from `mist-kit extract`") from None
    data = load_image_list(images)
    labels = data.labels_for(manifest["classes"])
    for start in range(0, len(data.paths), CLOUD_CHUNK):
        paths = data.paths[start:start + CLOUD_CHUNK]
        # cloud requests carry up to 8 images whatever the edge batch: one round trip per image wastes the uplink
        tensors = fetch_features(url, list(paths), manifest, token=token, batch=max(batch, 8), log=log)
        for s in range(0, len(paths), batch):
            yield Batch([str(p) for p in paths[s:s + batch]], {k: v[s:s + batch] for k, v in tensors.items()},
                        labels[start + s:start + s + len(paths[s:s + batch])])


def _print_run(report: dict[str, Any], show: int) -> None:
    preds = report["predictions"]
    for p in preds[:show]:
        mark = "" if "label" not in p else ("  ok" if p["label"] == p["index"] else f"  (label {p['label']})")
        typer.echo(f"{p['id']}\t{p['class']}\t{p['prob']:.3f}{mark}")
    if len(preds) > show:
        typer.echo(f"... {len(preds) - show} more (use --show or --json)")
    keys = ("device", "backend", "graph", "threads", "head_version", "images", "batch", "latency_ms_p50",
            "latency_ms_p95", "images_per_s", "peak_rss_mb", "top1", "backend_note", "threads_note", "tune_note",
            "emulation")
    for key in keys:
        if key in report:
            typer.echo(f"{key:16s} {report[key]}")


def _resolve_token(token: str | None, token_file: Path | None) -> str | None:
    """--token-file, else $MIST_KIT_TOKEN, else --token (with a warning: argv is visible to every local user)."""
    import os

    from mist_kit.runtime.token_file import TOKEN_ENV, read_token_file

    if token is not None and token_file is not None:
        raise UsageError("give one of --token and --token-file")
    if token_file is not None:
        return read_token_file(token_file)
    if token is not None:
        typer.echo("warning: --token puts the token in the process list (`ps`); use --token-file or "
                   f"${TOKEN_ENV}", err=True)
        return token
    return os.environ.get(TOKEN_ENV) or None


@cli_errors
def run_edge_cmd(
    device: Annotated[str, typer.Option("--device", help="Device profile, e.g. rpi4 (see `mist-kit devices list`)")],
    bundle: Annotated[Path, typer.Option("--bundle", help="Bundle directory (mist-kit export output)")],
    features: Annotated[Path | None, typer.Option("--features", help="Features file from `mist-kit extract`")]
    = None,
    cloud: Annotated[str | None, typer.Option("--cloud", help="Cloud model URL (KServe v2), with --images")] = None,
    images: Annotated[str | None, typer.Option("--images", help="Images (ImageFolder dir or list file) for --cloud")]
    = None,
    token: Annotated[str | None, typer.Option("--token", help="Bearer token for --cloud (visible in `ps`: prefer "
                                              "--token-file or MIST_KIT_TOKEN)")] = None,
    token_file: Annotated[Path | None, typer.Option("--token-file", help="File holding the bearer token for --cloud "
                                                    "(mode 600)")] = None,
    batch: Annotated[int, typer.Option("--batch", help="Images per edge call (latency is per call)")] = 1,
    memory: Annotated[int | None, typer.Option("--memory", help="Device RAM in MB (another variant)")] = None,
    memory_cap: Annotated[int | None, typer.Option("--memory-cap", help="Cap in MB (default: the budget)")] = None,
    no_cap: Annotated[bool, typer.Option("--no-cap", help="Do not apply the memory cap")] = False,
    threads: Annotated[int | None, typer.Option("--threads", help="Override the profile's threads")] = None,
    fp32: Annotated[bool, typer.Option("--fp32", help="Run edge.fp32.onnx (reference) instead of int8")] = False,
    state: Annotated[Path | None, typer.Option("--state", help="Device head state dir (default BUNDLE.heads)")]
    = None,
    show: Annotated[int, typer.Option("--show", help="Predictions to print (text mode)")] = 20,
    trust: Annotated[Path | None, typer.Option("--trust", help="Publisher's public key: refuse a bundle not signed "
                                               "with it (export --sign)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout")] = False,
) -> None:
    """Run the edge model as DEVICE would (threads, memory cap) on encoded features; print predictions + report."""
    from mist_kit.runtime.edge_run import run_edge

    if (features is None) == (cloud is None):
        raise UsageError("give exactly one of --features F.safetensors or --cloud URL --images DATA")
    if cloud is not None and images is None:
        raise UsageError("--cloud needs --images DATA (an ImageFolder directory or a list file)")
    if images is not None and cloud is None:
        raise UsageError("--images goes with --cloud URL (for a features file use --features)")
    token = _resolve_token(token, token_file)
    if trust is not None:
        from mist_kit.runtime.signing import verify_signature

        verify_signature(bundle, trust)
    batches = None
    if cloud is not None:
        from mist_kit.runtime.manifest import read_manifest

        batches = _cloud_batches(cloud, str(images), read_manifest(bundle), batch, token,
                                 logger(json_out))
    report = run_edge(bundle, features, device=device, batch=batch, memory_mb=memory, memory_cap_mb=memory_cap,
                      state_dir=state, variant="fp32" if fp32 else "int8", threads=threads, apply_caps=not no_cap,
                      batches=batches)
    if json_out:
        print_json(report)
    else:
        _print_run(report, show)


@cli_errors
def finetune_edge_cmd(
    device: Annotated[str, typer.Option("--device", help="Device profile, e.g. rpi4")],
    bundle: Annotated[Path, typer.Option("--bundle", help="Bundle directory (mist-kit export output)")],
    features: Annotated[Path | None, typer.Option("--features", help="Labelled features file (mist-kit extract)")]
    = None,
    eval_features: Annotated[Path | None, typer.Option("--eval", help="Features file for top-1 before/after")]
    = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Maximum epochs")] = 100,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate")] = 1e-2,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="L2 on the head weights")] = 1e-4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Training minibatch")] = 64,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Held-out part for early stopping")] = 0.2,
    patience: Annotated[int, typer.Option("--patience", help="Early stopping patience (epochs)")] = 10,
    new_classes: Annotated[str | None, typer.Option("--new-classes", help="Names of added classes, comma-separated; "
                                                    "labels C, C+1, ... in the features file")] = None,
    rollback: Annotated[bool, typer.Option("--rollback", help="Re-activate the previous head and exit")] = False,
    state: Annotated[Path | None, typer.Option("--state", help="Device head state dir (default BUNDLE.heads)")]
    = None,
    memory: Annotated[int | None, typer.Option("--memory", help="Device RAM in MB (another variant)")] = None,
    memory_cap: Annotated[int | None, typer.Option("--memory-cap", help="Cap in MB (default: the budget)")] = None,
    no_cap: Annotated[bool, typer.Option("--no-cap", help="Do not apply the memory cap")] = False,
    threads: Annotated[int | None, typer.Option("--threads", help="Override the profile's threads (edge graph)")]
    = None,
    seed: Annotated[int, typer.Option("--seed", help="Split and shuffling seed")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Activate the new head even if it is worse on the "
                                        "held-out split than the current one")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout")] = False,
) -> None:
    """Fine-tune the head on the device: int8 edge embeddings, numpy training, atomic versioned head update."""
    from mist_kit.devices import get_device
    from mist_kit.runtime.edge_run import finetune_edge, rollback_head
    from mist_kit.runtime.head import HeadTrainParams

    get_device(device, memory)  # an unknown device fails before anything else
    if rollback:
        if features is not None or new_classes or force:
            raise UsageError("--rollback takes no --features / --new-classes / --force")
        report = rollback_head(bundle, state)
    else:
        if features is None:
            raise UsageError("--features F.safetensors is required (or --rollback)")
        names = tuple(c.strip() for c in new_classes.split(",") if c.strip()) if new_classes else ()
        params = HeadTrainParams(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                                 val_fraction=val_fraction, patience=patience, seed=seed)
        report = finetune_edge(bundle, features, device=device, params=params, new_classes=names,
                               eval_features=eval_features, state_dir=state, memory_mb=memory,
                               memory_cap_mb=memory_cap, apply_caps=not no_cap, force=force, threads=threads)
    if json_out:
        print_json(report)
    else:
        for key, value in report.items():
            if key not in ("activation", "activated"):
                typer.echo(f"{key:18s} {value}")
        if "activation" in report:
            typer.echo(f"{'activation':18s} {report['activation']}")
