"""The device's view of a bundle: verified edge graph(s), the bundle head, classes and feature spec.

Why verify on every open: a device runs what it was sent, so a tampered or half-copied `edge.onnx` must be refused
before it is parsed (sha256 + size from the manifest). Only the files the device uses are hashed: the cloud graph
can be hundreds of MB and never runs here. Device-local state (retrained heads) lives outside the bundle
(see `head_store`), so verification keeps holding after on-device fine-tuning. Torch-free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mist_kit.errors import BundleError
from mist_kit.runtime.manifest import EDGE_FILE, EDGE_FP32_FILE, HEAD_FILE, manifest_plan, read_manifest, verify_files
from mist_kit.runtime.plan import CloudPlan


@dataclass(frozen=True)
class Head:
    """A linear head: logits = embedding @ weight.T + bias; `classes` names its rows."""

    weight: np.ndarray  # (C, E) float32
    bias: np.ndarray  # (C,) float32
    classes: tuple[str, ...]
    version: int = 0  # 0 = the bundle's own head

    def __post_init__(self) -> None:
        c = len(self.classes)
        if self.weight.ndim != 2 or self.weight.shape[0] != c or self.bias.shape != (c,):
            raise BundleError(f"head: weight {list(self.weight.shape)} / bias {list(self.bias.shape)} do not fit "
                              f"{c} classes (expected [{c}, E] and [{c}])")

    @property
    def embedding_dim(self) -> int:
        return int(self.weight.shape[1])

    def logits(self, embedding: np.ndarray) -> np.ndarray:
        """(B, E) -> (B, C) in float32."""
        return embedding.astype(np.float32, copy=False) @ self.weight.T + self.bias


def load_head_file(path: str | os.PathLike[str], classes: tuple[str, ...], version: int = 0) -> Head:
    """Read `weight`/`bias` from a safetensors head file."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise BundleError(f"{path}: cannot read head ({exc})") from None
    if "weight" not in tensors or "bias" not in tensors:
        raise BundleError(f"{path}: expected tensors 'weight' [C,E] and 'bias' [C], got {sorted(tensors)}")
    return Head(weight=tensors["weight"].astype(np.float32), bias=tensors["bias"].astype(np.float32),
                classes=classes, version=version)


@dataclass(frozen=True)
class EdgeBundle:
    """A verified bundle, as the device sees it."""

    root: Path
    manifest: dict[str, Any]
    edge_path: Path  # the graph the session runs (edge.onnx, edge.fp32.onnx or edge.tflite)
    head: Head
    classes: tuple[str, ...]

    @property
    def inputs(self) -> list[dict[str, Any]]:
        return list(self.manifest["edge"]["inputs"])

    @property
    def plan(self) -> CloudPlan:
        """What the cloud sends this device (tensor names, backbone sources, shapes before the codec)."""
        return manifest_plan(self.manifest)

    @property
    def edge_sha256(self) -> str:
        rel = self.edge_path.relative_to(self.root).as_posix()
        return str(self.manifest["files"][rel]["sha256"])


def _edge_rel(manifest: dict[str, Any], variant: str) -> str:
    edge = manifest["edge"]
    if variant == "int8":
        return str(edge.get("file") or EDGE_FILE)
    if variant == "fp32":
        return str(edge.get("reference") or EDGE_FP32_FILE)
    if variant == "tflite":
        rel = edge.get("tflite")
        if not rel:
            raise BundleError("bundle has no edge.tflite (manifest edge.tflite is empty); export with --tflite")
        return str(rel)
    raise BundleError(f"edge variant {variant!r}: expected 'int8', 'fp32' or 'tflite'")


def open_edge_bundle(bundle_dir: str | os.PathLike[str], variant: str = "int8") -> EdgeBundle:
    """Read the manifest, verify the edge graph and head against it, check their shapes agree.

    Raises BundleError (exit 2) naming the file: missing, truncated, tampered, or inconsistent with the manifest.
    """
    root = Path(bundle_dir)
    manifest = read_manifest(root)
    edge_rel = _edge_rel(manifest, variant)
    head_rel = str(manifest["head"].get("file") or HEAD_FILE)
    verify_files(root, manifest, only=(edge_rel, head_rel))
    edge, cloud = manifest["edge"], manifest["cloud"]
    sig = [(o["name"], o["dtype"], list(o["shape"])[1:]) for o in cloud["outputs"]]
    if [(i["name"], i["dtype"], list(i["shape"])[1:]) for i in edge["inputs"]] != sig:
        raise BundleError(f"{root / 'manifest.json'}: edge.inputs do not equal cloud.outputs (inconsistent bundle)")
    classes = tuple(str(c) for c in manifest["classes"])
    head = load_head_file(root / head_rel, classes)
    want_e = int(manifest["head"].get("embedding_dim", head.embedding_dim))
    if head.embedding_dim != want_e:
        raise BundleError(f"{root / head_rel}: embedding dim {head.embedding_dim}, manifest head.embedding_dim "
                          f"{want_e}")
    return EdgeBundle(root=root, manifest=manifest, edge_path=root / edge_rel, head=head, classes=classes)
