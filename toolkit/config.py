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

CHECKPOINT_SCHEMA = "mist-kit/checkpoint/1"
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

    def candidate_ks(self) -> tuple[int, ...]:
        """MIST's default k candidates: N/3, 2N/3, N (ViT-B: 4, 8, 12)."""
        n = self.num_blocks
        return tuple(sorted({max(1, round(n / 3)), max(1, round(2 * n / 3)), n}))


@dataclass(frozen=True)
class MethodSpec:
    """An edge method by registered name, its hyperparameters, and which gather depth k feeds it."""

    name: str
    k: int | None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointConfig:
    """Everything needed to rebuild a trained model besides the tensors in `edge.safetensors`."""

    backbone: BackboneSpec
    method: MethodSpec
    classes: tuple[str, ...]
    codec: dict[str, Any] = field(default_factory=lambda: {"name": "fp32"})
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

        if d.get("schema", CHECKPOINT_SCHEMA) != CHECKPOINT_SCHEMA:
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
            codec=dict(d.get("codec", {"name": "fp32"})),
            training=dict(d.get("training", {})),
            metrics=dict(d.get("metrics", {})),
            version=str(d.get("version", "")),
        )


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
