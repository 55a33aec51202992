"""The engine that runs a bundle's cloud.onnx for `serve-cloud`: onnxruntime (the reference) or OpenVINO.

Both are returned behind the small session interface `CloudModel` already used (`get_inputs()`, `get_outputs()`
with `.name` / `.type`, `run(names, feeds)`), so the KServe v2 server and batcher do not know which one runs.

Why OpenVINO: on x86 CPUs its ViT kernels are well ahead of onnxruntime's (BENCHMARKS.md, cloud engines), and in
bf16 further still where the CPU has native bf16 (avx512_bf16 / AMX). Its CPU plugin *defaults* to bf16 on such
CPUs, so fp32 is pinned explicitly here: the precision that runs is always the one asked for, and is reported.

Torch-free. openvino is imported lazily, only when asked for: `run-edge` on a device never imports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mist_kit.errors import DependencyError, UsageError

ENGINES = ("onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16")
# OpenVINO element type names -> the onnxruntime type strings CloudModel checks against the manifest.
_OV_TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)", "i8": "tensor(int8)", "u8": "tensor(uint8)",
             "i32": "tensor(int32)", "i64": "tensor(int64)", "f64": "tensor(double)"}
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}


@dataclass(frozen=True)
class EngineInfo:
    """What actually runs: the engine, the compute precision it compiled with, and its version."""

    engine: str
    precision: str
    version: str
    threads: int

    def as_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "precision": self.precision, "version": self.version, "threads": self.threads}


def check_choice(engine: str, precision: str) -> None:
    """Unknown engine / precision names, and bf16 on onnxruntime, fail as one UsageError line."""
    if engine not in ENGINES:
        raise UsageError(f"--engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if engine == "onnxruntime" and precision != "fp32":
        raise UsageError("--precision bf16 needs --engine openvino (onnxruntime's CPU provider runs this graph in "
                         "fp32 only)")


def openvino_core() -> Any:
    """An `openvino.Core`, or a DependencyError naming the extra that installs it."""
    try:
        import openvino as ov
    except ImportError as exc:
        raise DependencyError(f"openvino is not installed ({exc}); pip install 'mist-kit[openvino]'") from None
    return ov.Core()


def cpu_bf16_supported(core: Any | None = None) -> bool:
    """True when OpenVINO's CPU plugin reports native bf16 (its OPTIMIZATION_CAPABILITIES list holds 'BF16')."""
    core = core or openvino_core()
    return "BF16" in [str(c).upper() for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]


def openvino_config(precision: str, threads: int, core: Any) -> dict[str, str]:
    """compile_model properties: the precision pinned (fp32 is not the default on bf16 CPUs), latency hint,
    `threads` inference threads (0 = the plugin's default, all cores). bf16 on a CPU without it is refused."""
    if precision == "bf16" and not cpu_bf16_supported(core):
        name = core.get_property("CPU", "FULL_DEVICE_NAME")
        raise UsageError(f"--precision bf16: this CPU ({name}) has no native bf16 in OpenVINO's CPU plugin "
                         "(OPTIMIZATION_CAPABILITIES lacks BF16); use --precision fp32")
    config = {"INFERENCE_PRECISION_HINT": _OV_PRECISION[precision], "PERFORMANCE_HINT": "LATENCY",
              "NUM_STREAMS": "1"}
    if threads > 0:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return config


def unfuse_fake_quantize(model: Any) -> int:
    """Rewrite every FakeQuantize (what OpenVINO reads an ONNX QuantizeLinear as) into plain element-wise ops.

    Why: the codec's per-channel QuantizeLinear on the last axis of [B, T, D] becomes a FakeQuantize with [1, 1, D]
    ranges; OpenVINO's CPU plugin (2026.4) fuses it into the preceding Add and then quantizes along the wrong
    axis (codes off by up to 70 steps vs onnxruntime, measured on the tiny test bundle), and refuses it unfused
    ("doesn't support non per-tensor quantization for axis: 2"). The same formula, written as Maximum/Minimum,
    Subtract, Divide, Round (half to even, as QuantizeLinear) and back, is exact. Returns how many were rewritten.
    """
    import openvino.opset13 as ops

    count = 0
    for node in model.get_ordered_ops():
        if node.get_type_name() != "FakeQuantize":
            continue
        x, lo, hi, out_lo, out_hi = (node.input_value(i) for i in range(5))
        steps = float(node.get_attributes()["levels"] - 1)
        clipped = ops.minimum(ops.maximum(x, lo), hi)
        q = ops.round(ops.multiply(ops.divide(ops.subtract(clipped, lo), ops.subtract(hi, lo)),
                                   ops.constant(np.float32(steps))), "half_to_even")
        y = ops.add(ops.multiply(ops.divide(q, ops.constant(np.float32(steps))), ops.subtract(out_hi, out_lo)),
                    out_lo)
        node.output(0).replace(y.output(0))
        count += 1
    if count:
        model.validate_nodes_and_infer_types()
    return count


@dataclass(frozen=True)
class _Port:
    name: str
    type: str


class OpenVINOSession:
    """A compiled OpenVINO model that answers like an onnxruntime InferenceSession (the part CloudModel uses).

    One infer request is reused; outputs are copied out of its tensors (OpenVINO reuses them on the next call).
    Not thread-safe, like the one-at-a-time batcher that calls it.
    """

    def __init__(self, model: Any, precision: str = "fp32", threads: int = 0, core: Any | None = None) -> None:
        import openvino as ov

        self.core = core or openvino_core()
        config = openvino_config(precision, threads, self.core)
        self.compiled = self.core.compile_model(model, "CPU", config)
        self._request = self.compiled.create_infer_request()
        self._inputs = [_Port(p.get_any_name(), _OV_TYPES.get(p.get_element_type().get_type_name(),
                                                             p.get_element_type().get_type_name()))
                        for p in self.compiled.inputs]
        self._outputs = [_Port(p.get_any_name(), _OV_TYPES.get(p.get_element_type().get_type_name(),
                                                              p.get_element_type().get_type_name()))
                         for p in self.compiled.outputs]
        ran = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type: 'f32' / 'bf16'
        ran = ran.get_type_name() if hasattr(ran, "get_type_name") else str(ran)
        self.precision = {"f32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}.get(ran, ran)
        self.version = ov.__version__

    def get_inputs(self) -> list[_Port]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Port]:
        return list(self._outputs)

    def run(self, names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self._request.infer({k: np.ascontiguousarray(v) for k, v in feeds.items()})
        wanted = names or [p.name for p in self._outputs]
        return [np.array(self._request.get_tensor(n).data, copy=True) for n in wanted]


def open_cloud_session(path: str | os.PathLike[str], threads: int = 0, engine: str = "onnxruntime",
                       precision: str = "fp32") -> tuple[Any, EngineInfo]:
    """(session, what runs) for a cloud.onnx: onnxruntime through the shared CPU factory, or OpenVINO reading the
    same file (`Core.read_model`) and compiling it for the CPU at `precision`."""
    check_choice(engine, precision)
    if engine == "onnxruntime":
        import onnxruntime as ort

        from mist_kit.runtime.ort_session import cpu_session

        return cpu_session(path, threads), EngineInfo("onnxruntime", "fp32", ort.__version__, threads)
    core = openvino_core()
    model = core.read_model(str(Path(path)))
    unfuse_fake_quantize(model)
    session = OpenVINOSession(model, precision, threads, core)
    if session.precision != precision:  # never serve a precision other than the one asked for, silently
        raise UsageError(f"--precision {precision}: OpenVINO compiled the graph at {session.precision}")
    return session, EngineInfo("openvino", session.precision, session.version, threads)


def output_parity(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict[str, float]:
    """{output: relative error} = ||other - ref|| / ||ref|| (Frobenius, float64), per output."""
    out = {}
    for name, ref in reference.items():
        r = ref.astype(np.float64)
        diff = float(np.linalg.norm(other[name].astype(np.float64) - r))
        out[name] = diff / max(float(np.linalg.norm(r)), 1e-30)
    return out
