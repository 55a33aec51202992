"""Small ONNX helpers shared by the exporters: signatures, node naming, int8 op counting, serialization.

Signatures are the `{"name", "dtype", "shape"}` dicts the bundle manifest and the deployment files use, read back
from the saved graph itself so what the manifest says is what the file holds.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import onnx

from mist_kit.atomic import atomic_path
from mist_kit.errors import ExportError

INT8_OPS = frozenset({"QLinearMatMul", "QLinearConv", "QLinearAdd", "QLinearMul", "MatMulInteger",
                      "ConvInteger", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear",
                      "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "QLinearSoftmax", "QAttention"})
# Ops that do the arithmetic in integers (QDQ graphs are fused into these by ORT at load time).
INT8_COMPUTE_OPS = frozenset({"QLinearMatMul", "QLinearConv", "MatMulInteger", "MatMulIntegerToFloat",
                              "DynamicQuantizeMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QAttention",
                              "ConvInteger", "QLinearSoftmax"})


def dtype_name(elem_type: int) -> str:
    """ONNX TensorProto element type -> numpy-style name ("float32", "int8", ...)."""
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name


def value_info_dict(vi: onnx.ValueInfoProto) -> dict[str, Any]:
    """A graph input/output as {"name", "dtype", "shape"} with -1 for symbolic (dynamic) dims."""
    tt = vi.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
    return {"name": vi.name, "dtype": dtype_name(tt.elem_type), "shape": shape}


def signature(model: onnx.ModelProto) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inputs, outputs) of a model, initializers excluded."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [value_info_dict(v) for v in model.graph.input if v.name not in inits]
    return inputs, [value_info_dict(v) for v in model.graph.output]


def name_nodes(model: onnx.ModelProto, prefix: str = "n") -> onnx.ModelProto:
    """Give every node a unique name (quantization exclusion lists and error tables address nodes by name)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{prefix}{i}_{node.op_type}"
        seen.add(node.name)
    return model


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each op type the graph has (top-level graph)."""
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def int8_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Counts of the quantization-related ops: the structural proof that a graph is int8."""
    return {k: v for k, v in op_counts(model).items() if k in INT8_OPS}


def save_model(model: onnx.ModelProto, path: str | Path) -> Path:
    """Check and write a single-file ONNX model atomically (weights inline: our graphs are far below 2 GB)."""
    onnx.checker.check_model(model)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp), save_as_external_data=False)
    return Path(path)


def set_batch_dim(model: onnx.ModelProto, name: str = "batch") -> onnx.ModelProto:
    """Make dim 0 of every graph input/output symbolic (`batch`), keeping the other dims static."""
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_param = name
    return model


def ort_session(path: Path | bytes, threads: int = 1) -> Any:
    """A CPU onnxruntime session (one intra-op thread unless asked: reproducible and fair to shared hosts)."""
    from mist_kit.runtime.ort_session import cpu_session

    return cpu_session(path, threads)


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def _takes_varargs(module: Any) -> bool:
    import inspect

    return any(p.kind is inspect.Parameter.VAR_POSITIONAL
               for p in inspect.signature(module.forward).parameters.values())


def export_dynamic_batch(module: Any, examples: tuple[Any, ...], input_names: list[str], output_names: list[str],
                         opset: int, what: str) -> tuple[onnx.ModelProto, str]:
    """Export a torch module (positional tensor inputs -> tensor or tuple of tensors) with a dynamic batch axis on
    every input and output; returns (model, exporter used).

    torch.onnx's dynamo exporter (needs onnxscript) first, the TorchScript exporter (opset 17) as the fallback for
    modules dynamo cannot trace; if both fail, one ExportError names `what` and carries both reasons.
    """
    import io
    import warnings

    import torch

    errors = []
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's dependency; fail over cleanly without it)

        batch = torch.export.Dim("batch", min=1, max=65536)
        per_input = tuple({0: batch} for _ in examples)
        # torch.export matches dynamic_shapes to forward's parameters: a `*tensors` parameter is one tuple
        dynamic = (per_input,) if _takes_varargs(module) else per_input
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, tuple(examples), None, dynamo=True, input_names=input_names, output_names=output_names,
                dynamic_shapes=dynamic, opset_version=opset, verbose=False)
        return program.model_proto, "dynamo"
    except Exception as exc:  # any exporter failure: try the other exporter, report both if it fails too
        errors.append(f"dynamo: {_first_line(exc)}")
    try:
        buf = io.BytesIO()
        axes = {name: {0: "batch"} for name in [*input_names, *output_names]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, tuple(examples), buf, dynamo=False, input_names=input_names,
                              output_names=output_names, dynamic_axes=axes, opset_version=17)
        return onnx.load_from_string(buf.getvalue()), "torchscript"
    except Exception as exc:
        errors.append(f"torchscript: {_first_line(exc)}")
    raise ExportError(f"{what} export failed with both exporters (" + "; ".join(errors) + ")")
