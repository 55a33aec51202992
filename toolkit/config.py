"""Checkpoint configuration: what a trained model is, as frozen dataclasses with validated JSON round trips.

Torch-free so the exporter, runtime and tests can read a checkpoint's `config.json` without loading a model.
Every field problem is reported as one line naming the file and field.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mist_kit.errors import CheckpointError
from mist_kit.runtime.plan import BackboneShape

CHECKPOINT_SCHEMA = "mist-kit/checkpoint/2"
LEGACY_SCHEMAS = ("mist-kit/checkpoint/1",)  # one codec for the one tensor of mist / linear: read, converted
_LEGACY_TENSOR = {"mist": "gather", "linear": "cls"}
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "edge.safetensors"


@dataclass(frozen=True)
class BackboneSpec:
    """The frozen cloud backbone and how images are prepared for it.

    `weights` is the file the backbone was loaded from (None for `pretrained` hub weights); `weights_sha256` binds
    caches, checkpoints and bundles to the exact tensors, so features from other weights are never mixed.
    """

    name: str
    weights_sha256: str
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_blocks: int
    num_tokens: int
    embed_dim: int
    num_prefix_tokens: int
    weights: str | None = None
    source: str = "file"  # "file" | "pretrained"
    resize: str = "bicubic"  # images are resized straight to img_size x img_size (VTAB protocol), no crop

    def __post_init__(self) -> None:
        if self.source not in ("file", "pretrained"):
            raise CheckpointError(f"backbone.source: expected 'file' or 'pretrained', got {self.source!r}")
        if self.source == "file" and not self.weights:
            raise CheckpointError("backbone.weights: a file-sourced backbone needs the weights path")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise CheckpointError("backbone.mean/std: expected 3 values each (RGB)")
        if any(s <= 0 for s in self.std):
            raise CheckpointError(f"backbone.std: expected positive values, got {list(self.std)}")

    @property
    def shape(self) -> BackboneShape:
        """What cloud plans and edge methods need to know of this backbone."""
        return BackboneShape(self.embed_dim, self.num_tokens, self.num_prefix_tokens, self.num_blocks)


@dataclass(frozen=True)
class MethodSpec:
    """An edge method by registered name, its hyperparameters, and its depth `k` (what the cloud runs: MIST's
    gather depth, ViT-Split's split point; None for a method without one)."""

    name: str
    k: int | None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointConfig:
    """Everything needed to rebuild a trained model besides the tensors in `edge.safetensors`."""

    backbone: BackboneSpec
    method: MethodSpec
    classes: tuple[str, ...]
    codecs: dict[str, dict[str, Any]] = field(default_factory=dict)  # sent tensor name -> codec spec (absent: fp32)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    schema: str = CHECKPOINT_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["backbone"]["mean"] = list(self.backbone.mean)
        d["backbone"]["std"] = list(self.backbone.std)
        d["classes"] = list(self.classes)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any], source: str = CONFIG_FILE) -> CheckpointConfig:
        """Parse and validate; errors name `source` and the field."""

        def need(obj: dict[str, Any], key: str, where: str) -> Any:
            if not isinstance(obj, dict) or key not in obj:
                raise CheckpointError(f"{source}: missing field '{where}{key}'")
            return obj[key]

        if d.get("schema", CHECKPOINT_SCHEMA) not in (CHECKPOINT_SCHEMA, *LEGACY_SCHEMAS):
            raise CheckpointError(f"{source}: schema {d.get('schema')!r} is not {CHECKPOINT_SCHEMA!r}")
        b = need(d, "backbone", "")
        m = need(d, "method", "")
        try:
            backbone = BackboneSpec(
                name=str(need(b, "name", "backbone.")),
                weights_sha256=str(need(b, "weights_sha256", "backbone.")),
                img_size=int(need(b, "img_size", "backbone.")),
                mean=tuple(float(x) for x in need(b, "mean", "backbone.")),  # type: ignore[arg-type]
                std=tuple(float(x) for x in need(b, "std", "backbone.")),  # type: ignore[arg-type]
                num_blocks=int(need(b, "num_blocks", "backbone.")),
                num_tokens=int(need(b, "num_tokens", "backbone.")),
                embed_dim=int(need(b, "embed_dim", "backbone.")),
                num_prefix_tokens=int(need(b, "num_prefix_tokens", "backbone.")),
                weights=b.get("weights"),
                source=str(b.get("source", "file")),
                resize=str(b.get("resize", "bicubic")),
            )
            k = m.get("k")
            method = MethodSpec(name=str(need(m, "name", "method.")), k=None if k is None else int(k),
                                params=dict(m.get("params", {})))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: invalid value: {exc}") from None
        classes = need(d, "classes", "")
        if not isinstance(classes, list) or not classes:
            raise CheckpointError(f"{source}: field 'classes' must be a non-empty list of names")
        return CheckpointConfig(
            backbone=backbone,
            method=method,
            classes=tuple(str(c) for c in classes),
            codecs=_codecs(d, method.name, source),
            training=dict(d.get("training", {})),
            metrics=dict(d.get("metrics", {})),
            version=str(d.get("version", "")),
        )


def _codecs(d: dict[str, Any], method: str, source: str) -> dict[str, dict[str, Any]]:
    """`codecs` (name -> spec); a schema-1 checkpoint's single `codec` belongs to its method's one tensor."""
    if "codecs" in d:
        codecs = d["codecs"]
        if not isinstance(codecs, dict) or not all(isinstance(v, dict) for v in codecs.values()):
            raise CheckpointError(f"{source}: field 'codecs' must map tensor names to codec specs")
        return {str(k): dict(v) for k, v in codecs.items()}
    legacy = d.get("codec")
    if legacy is None or (isinstance(legacy, dict) and legacy.get("name", "fp32") == "fp32"):
        return {}
    if not isinstance(legacy, dict):
        raise CheckpointError(f"{source}: field 'codec' must be a codec spec object")
    return {_LEGACY_TENSOR.get(method, "gather"): dict(legacy)}


def load_config(checkpoint_dir: str | Path) -> CheckpointConfig:
    """Read `<checkpoint_dir>/config.json` with one-line errors for a missing or malformed file."""
    path = Path(checkpoint_dir) / CONFIG_FILE
    if not Path(checkpoint_dir).is_dir():
        raise CheckpointError(f"{checkpoint_dir}: not a checkpoint directory (expected {CONFIG_FILE} + {WEIGHTS_FILE})")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a checkpoint directory holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return CheckpointConfig.from_dict(data, source=str(path))
