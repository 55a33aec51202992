"""Quantization choices as closed types: what `--quantize/--mode` can ask for, rejected early when contradictory.

Torch- and onnx-free so the CLI can parse and validate options before importing anything heavy. The Enums mirror
onnxruntime.quantization's (`QuantFormat`, `CalibrationMethod`) but add `dynamic` as a mode of its own and give
every field a typed home instead of an untyped `extra_options` bag.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from mist_kit.errors import UsageError


class Precision(str, Enum):
    """What the edge graph `edge.onnx` holds."""

    INT8 = "int8"
    NONE = "none"  # edge.onnx is the fp32 graph itself (no quantization)


class QuantMode(str, Enum):
    """How activations are quantized: at run time from each input (dynamic) or with calibrated ranges (static)."""

    DYNAMIC = "dynamic"
    STATIC = "static"


class QuantFormat(str, Enum):
    """Static graph layout: QuantizeLinear/DequantizeLinear pairs around float ops (QDQ) or QLinear* ops."""

    QDQ = "qdq"
    QOPERATOR = "qoperator"


class CalibMethod(str, Enum):
    """How static activation ranges are derived from calibration data."""

    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"


DEFAULT_OP_TYPES = ("MatMul", "Gemm")


@dataclass(frozen=True)
class QuantSpec:
    """One int8 recipe for the edge graph. `name` is how reports and `--mode` refer to it."""

    name: str
    mode: QuantMode = QuantMode.DYNAMIC
    per_channel: bool = False
    fmt: QuantFormat | None = None  # static only
    calib: CalibMethod | None = None  # static only
    percentile: float = 99.999
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    reduce_range: bool = False
    exclude: tuple[str, ...] = field(default_factory=tuple)  # node names kept in fp32 (accuracy fallback)
    nodes: tuple[str, ...] | None = None  # only these nodes may be int8 (None: every node of op_types)

    def __post_init__(self) -> None:
        if self.mode is QuantMode.DYNAMIC and (self.fmt is not None or self.calib is not None):
            raise UsageError(f"quantization {self.name!r}: cannot set both dynamic mode and a static format or "
                             "calibration method")
        if self.mode is QuantMode.STATIC and (self.fmt is None or self.calib is None):
            raise UsageError(f"quantization {self.name!r}: static mode needs a format (qdq|qoperator) and a "
                             "calibration method (minmax|entropy|percentile)")
        if not 90.0 < self.percentile <= 100.0:
            raise UsageError(f"quantization {self.name!r}: percentile {self.percentile} is outside (90, 100]")
        if not self.op_types:
            raise UsageError(f"quantization {self.name!r}: op_types is empty; e.g. MatMul,Gemm")
        if self.nodes is not None and not self.nodes:  # onnxruntime reads an empty list as "every node"
            raise UsageError(f"quantization {self.name!r}: the node list is empty; leave it unset to quantize all")

    def excluding(self, nodes: tuple[str, ...]) -> QuantSpec:
        """The same recipe with `nodes` kept in fp32."""
        return replace(self, exclude=tuple(sorted(set(self.exclude) | set(nodes))))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "mode": self.mode.value, "per_channel": self.per_channel,
                "format": self.fmt.value if self.fmt else None,
                "calibration": self.calib.value if self.calib else None,
                "percentile": self.percentile if self.calib is CalibMethod.PERCENTILE else None,
                "op_types": list(self.op_types), "reduce_range": self.reduce_range,
                "excluded_nodes": list(self.exclude),
                "quantized_nodes": None if self.nodes is None else [n for n in self.nodes if n not in self.exclude]}


# Named recipes `--mode` accepts. `auto` (the default) measures the CANDIDATES on held-out real features and keeps
# the one with the best top-1 agreement: our probe found the library default (static QDQ on all ops) lost 10+ pts
# on outlier-heavy gathers, so no single fixed recipe is trusted without measuring it on the model at hand.
PRESETS: dict[str, QuantSpec] = {
    "dynamic": QuantSpec("dynamic"),
    "dynamic-per-channel": QuantSpec("dynamic-per-channel", per_channel=True),
    "static-qdq": QuantSpec("static-qdq", QuantMode.STATIC, True, QuantFormat.QDQ, CalibMethod.PERCENTILE),
    "static-qdq-minmax": QuantSpec("static-qdq-minmax", QuantMode.STATIC, True, QuantFormat.QDQ, CalibMethod.MINMAX),
    "static-qdq-entropy": QuantSpec("static-qdq-entropy", QuantMode.STATIC, True, QuantFormat.QDQ,
                                    CalibMethod.ENTROPY),
    "static-qoperator": QuantSpec("static-qoperator", QuantMode.STATIC, True, QuantFormat.QOPERATOR,
                                  CalibMethod.PERCENTILE),
}
AUTO = "auto"
AUTO_CANDIDATES = ("dynamic", "dynamic-per-channel", "static-qdq", "static-qdq-minmax")


def resolve_modes(mode: str, op_types: tuple[str, ...] | None = None) -> list[QuantSpec]:
    """`--mode` value -> the recipes to try, in order; unknown names list the valid ones."""
    names = AUTO_CANDIDATES if mode == AUTO else (mode,)
    if mode != AUTO and mode not in PRESETS:
        raise UsageError(f"--mode {mode!r} is not a quantization mode; valid: {AUTO}, {', '.join(PRESETS)}")
    specs = [PRESETS[n] for n in names]
    if op_types:
        specs = [replace(s, op_types=tuple(op_types)) for s in specs]
    return specs
