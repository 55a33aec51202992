"""Write a bundle directory whole: graphs, head, deployment files and `manifest.json` with every file's sha256.

The directory is assembled in a temporary sibling (`atomic_dir`) and validated *as written* (the files, not the
in-memory models) before it is renamed into place: exporting over an existing bundle replaces it whole, and a
failed validation or a crash leaves the previous bundle (or nothing) behind, never a half-written one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from mist_kit import __version__
from mist_kit.atomic import atomic_dir, write_json
from mist_kit.config import CheckpointConfig
from mist_kit.edge import EdgeMethod
from mist_kit.errors import ExportError
from mist_kit.exporters.deploy import write_deploy
from mist_kit.exporters.edge_onnx import write_head
from mist_kit.exporters.onnx_utils import save_model, signature
from mist_kit.runtime.codec import Codec
from mist_kit.runtime.manifest import (
    BUNDLE_SCHEMA,
    CLOUD_FILE,
    EDGE_FILE,
    EDGE_FP32_FILE,
    EDGE_TFLITE_FILE,
    HEAD_FILE,
    MANIFEST_FILE,
    files_table,
)
from mist_kit.runtime.plan import CloudPlan
from mist_kit.runtime.signing import write_manifest_digest


@dataclass
class Artifacts:
    """Everything that goes into a bundle, in memory, before any file is written."""

    cloud: onnx.ModelProto
    edge_fp32: onnx.ModelProto
    edge: onnx.ModelProto
    method: EdgeMethod
    tflite: bytes | None = None


class ValidationFailed(Exception):
    """Raised inside the atomic write to discard the temporary bundle; carries the problems found."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def model_name_for(config: CheckpointConfig) -> str:
    """Default served name of the cloud graph: method + backbone + depth (what Triton/KServe call the model)."""
    base = "".join(c if c.isalnum() or c in "-_" else "-" for c in config.backbone.name)
    depth = "" if config.method.k is None else f"-k{config.method.k}"
    return f"{config.method.name}-{base}{depth}"


def base_manifest(config: CheckpointConfig, model_name: str, plan: CloudPlan, codecs: Mapping[str, Codec],
                  art: Artifacts, quantization: dict[str, Any] | None, parity: dict[str, Any]) -> dict[str, Any]:
    """The manifest's fields besides `files` (bundle format 2, see docs/CONTRACTS.md), read off the graphs."""
    b = config.backbone
    cloud_in, cloud_out = signature(art.cloud)
    edge_in, edge_out = signature(art.edge)
    head_w = art.method.head.weight
    return {
        "schema": BUNDLE_SCHEMA,
        "mist_kit_version": __version__,
        "model_name": model_name,
        "backbone": {"name": b.name, "weights_sha256": b.weights_sha256, "num_blocks": b.num_blocks,
                     "num_tokens": b.num_tokens, "embed_dim": b.embed_dim,
                     "num_prefix_tokens": b.num_prefix_tokens},
        "method": {"name": config.method.name, "params": dict(config.method.params), "k": config.method.k},
        "k": config.method.k,
        "input": {"size": b.img_size, "mean": list(b.mean), "std": list(b.std), "layout": "NCHW",
                  "resize": b.resize},
        "cloud": {"file": CLOUD_FILE, "inputs": cloud_in, "outputs": cloud_out,
                  "plan": plan.to_dict({name: c.spec() for name, c in codecs.items()})},
        "edge": {"file": EDGE_FILE, "reference": EDGE_FP32_FILE,
                 "tflite": EDGE_TFLITE_FILE if art.tflite is not None else None,
                 "inputs": edge_in, "outputs": edge_out, "quantization": quantization,
                 **art.method.cost().to_dict(),
                 "decoded_inputs": {name: list(shape) for name, shape in art.method.input_shapes.items()}},
        "head": {"file": HEAD_FILE, "embedding_dim": int(head_w.shape[1]), "num_classes": int(head_w.shape[0])},
        "classes": list(config.classes),
        "parity": parity,
    }


def write_bundle(out: str | Path, art: Artifacts, manifest: dict[str, Any],
                 validate: Callable[[Path, dict[str, Any]], list[str]], triton_backend: str = "onnxruntime",
                 ) -> dict[str, Any]:
    """Write every file into a temp dir, run `validate(tmp, manifest)` on the written files, then publish.

    Returns the final manifest. Raises ValidationFailed (nothing published) if `validate` reports problems.
    """
    cloud_in, cloud_out = signature(art.cloud)
    edge_in, _ = signature(art.edge)
    if [(e["name"], e["dtype"]) for e in edge_in] != [(e["name"], e["dtype"]) for e in cloud_out]:
        raise ExportError(f"edge.onnx inputs {edge_in} are not the cloud outputs {cloud_out} (codec fragments "
                          "disagree)")
    with atomic_dir(out) as tmp:
        save_model(art.cloud, tmp / CLOUD_FILE)
        save_model(art.edge_fp32, tmp / EDGE_FP32_FILE)
        save_model(art.edge, tmp / EDGE_FILE)
        write_head(art.method, tmp / HEAD_FILE)
        if art.tflite is not None:
            (tmp / EDGE_TFLITE_FILE).write_bytes(art.tflite)
        write_deploy(tmp, CLOUD_FILE, manifest["model_name"], cloud_in, cloud_out, backend=triton_backend)
        final = {**manifest, "files": files_table(tmp)}
        problems = validate(tmp, final)
        if problems:
            raise ValidationFailed(problems)
        write_json(tmp / MANIFEST_FILE, final)
        write_manifest_digest(tmp)  # manifest.sha256: the manifest is covered by a digest of its own
        _readable(tmp)
    return final


def _readable(root: Path) -> None:
    """Temp files are created owner-only; a bundle is meant to be served and copied: make it world-readable."""
    root.chmod(0o755)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
