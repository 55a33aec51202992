"""Checkpoint configuration: what a trained model is, as frozen dataclasses with validated JSON round trips.

Torch-free so the exporter, runtime and tests can read a checkpoint's `config.json` without loading a model.
Every field problem is reported as one line naming the file and field.
"""

from __future__ import annotations

import json
import math
import re
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
IMG_SIZE_RANGE = (16, 4096)
# method.params that are structural sizes: positive integers (rank 0 divides by zero in the attention scale)
_POSITIVE_INT_PARAMS = ("rank", "depth", "depth_blocks", "num_heads", "hidden", "width")


def _int(value: Any, where: str, lo: int | None = None, hi: int | None = None) -> int:
    """An integer field, strictly: 2.5, "2", true and 2.0 are refused, never truncated or coerced."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{where}: expected an integer, got {json.dumps(value)[:60]}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
        raise CheckpointError(f"{where}: {value} is outside {span}")
    return value


def _floats(value: Any, where: str, n: int) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or len(value) != n or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value):
        raise CheckpointError(f"{where}: expected {n} finite numbers, got {json.dumps(value)[:80]}")
    return tuple(float(x) for x in value)


def _patch_of(name: str) -> int | None:
    """The patch size a timm name states ("vit_small_patch14_dinov2" -> 14); None when it does not say."""
    m = re.search(r"patch(\d+)", name)
    return int(m.group(1)) if m else None


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
        for key in ("img_size", "num_blocks", "num_tokens", "embed_dim", "num_prefix_tokens"):
            _int(getattr(self, key), f"backbone.{key}", lo=0 if key == "num_prefix_tokens" else 1)
        _int(self.img_size, "backbone.img_size", *IMG_SIZE_RANGE)
        if self.num_prefix_tokens >= self.num_tokens:
            raise CheckpointError(f"backbone.num_prefix_tokens: {self.num_prefix_tokens} must be below num_tokens "
                                  f"({self.num_tokens})")
        patch = _patch_of(self.name)
        if patch and self.img_size % patch:
            raise CheckpointError(f"backbone.img_size: {self.img_size} is not a multiple of {self.name}'s patch size "
                                  f"{patch} (e.g. {max(patch, self.img_size // patch * patch)})")
        grid = math.isqrt(self.num_tokens - self.num_prefix_tokens)
        if grid * grid == self.num_tokens - self.num_prefix_tokens and self.img_size % grid:
            raise CheckpointError(f"backbone.img_size: {self.img_size} does not split into the {grid}x{grid} patch "
                                  f"grid that num_tokens {self.num_tokens} implies")

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
        if not isinstance(b, dict) or not isinstance(m, dict):
            raise CheckpointError(f"{source}: fields 'backbone' and 'method' must be JSON objects")

        def text(obj: dict[str, Any], key: str, where: str, default: str | None = None) -> str:
            value = obj.get(key, default) if default is not None else need(obj, key, where)
            if not isinstance(value, str) or not value:
                raise CheckpointError(f"{source}: field '{where}{key}' must be a non-empty string")
            return value

        try:
            weights = b.get("weights")
            if weights is not None and not isinstance(weights, str):
                raise CheckpointError("backbone.weights: expected a path string or null")
            backbone = BackboneSpec(
                name=text(b, "name", "backbone."),
                weights_sha256=text(b, "weights_sha256", "backbone."),
                img_size=need(b, "img_size", "backbone."),
                mean=_floats(need(b, "mean", "backbone."), "backbone.mean", 3),  # type: ignore[arg-type]
                std=_floats(need(b, "std", "backbone."), "backbone.std", 3),  # type: ignore[arg-type]
                num_blocks=need(b, "num_blocks", "backbone."),
                num_tokens=need(b, "num_tokens", "backbone."),
                embed_dim=need(b, "embed_dim", "backbone."),
                num_prefix_tokens=need(b, "num_prefix_tokens", "backbone."),
                weights=weights,
                source=text(b, "source", "backbone.", "file"),
                resize=text(b, "resize", "backbone.", "bicubic"),
            )
            k = m.get("k")
            if k is not None:
                _int(k, "method.k", 0, backbone.num_blocks)
            params = m.get("params", {})
            if not isinstance(params, dict):
                raise CheckpointError("method.params: expected a JSON object")
            for key in _POSITIVE_INT_PARAMS:
                if key in params:
                    _int(params[key], f"method.params.{key}", lo=1)
            if "dropout" in params and not (isinstance(params["dropout"], (int, float)) and
                                            not isinstance(params["dropout"], bool) and 0 <= params["dropout"] < 1):
                raise CheckpointError(f"method.params.dropout: expected a number in [0, 1), got {params['dropout']!r}")
            method = MethodSpec(name=text(m, "name", "method."), k=k, params=dict(params))
        except CheckpointError as exc:
            msg = str(exc)
            raise CheckpointError(msg if msg.startswith(source) else f"{source}: {msg}") from None
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{source}: invalid value: {exc}") from None
        classes = need(d, "classes", "")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
            raise CheckpointError(f"{source}: field 'classes' must be a non-empty list of names")
        if len(set(classes)) != len(classes):
            raise CheckpointError(f"{source}: field 'classes' repeats a name")
        for key in ("codec", "codecs", "training", "metrics"):
            if not isinstance(d.get(key, {}), dict):
                raise CheckpointError(f"{source}: field '{key}' must be a JSON object")
        codecs = _codecs(d, method.name, source)
        for tensor, spec in codecs.items():
            if spec.get("num_tokens") is not None:
                try:
                    _int(spec["num_tokens"], f"codecs.{tensor}.num_tokens", 1, backbone.num_tokens)
                except CheckpointError as exc:
                    raise CheckpointError(f"{source}: {exc}") from None
        return CheckpointConfig(
            backbone=backbone,
            method=method,
            classes=tuple(str(c) for c in classes),
            codecs=codecs,
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
