"""The edge graph: the plan's decoded tensors {name: [B,T,D]} -> the method's `embed` -> embedding [B,E]; head apart.

The last linear layer is deliberately NOT in the graph: a device retrains it in numpy on its own labelled
samples (`head.safetensors`: weight [C,E], bias [C]), so the int8 graph never has to change after deployment.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from mist_kit.atomic import atomic_path
from mist_kit.edge import EdgeMethod
from mist_kit.exporters.onnx_utils import export_dynamic_batch, name_nodes, set_batch_dim, signature

EMBEDDING = "embedding"
OPSET = 18
EDGE_MAX_ABS = 1e-4  # fp32 edge graph vs torch embed(); LayerNorm-bounded values, so an absolute bound is right


class _Embed(nn.Module):
    """Wraps an `embed` (the method's, or its restructured inference module's) as a module of positional tensors
    (the plan's order) so the exporter traces embed only, never the head."""

    def __init__(self, method: EdgeMethod) -> None:
        super().__init__()
        self.names = list(method.input_shapes)
        self.inner = inference_module(method)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.inner.embed(dict(zip(self.names, tensors, strict=True)))  # {name: (B, T, D)} -> (B, E)


def inference_module(method: EdgeMethod) -> nn.Module:
    """What the edge graph is exported from: a method's `inference_module()` (the same function restructured for
    inference: fused projections, no work on tokens the pooling never reads) when it has one, else the method."""
    build = getattr(method, "inference_module", None)
    return (build() if callable(build) else method).eval()


def export_edge(method: EdgeMethod, opset: int = OPSET) -> onnx.ModelProto:
    """Export the embedding part of an edge method (inputs: its decoded tensors by name) with a dynamic batch axis
    and named nodes."""
    module = _Embed(method.eval()).eval()
    examples = tuple(torch.zeros(2, *shape) for shape in method.input_shapes.values())
    model, _exporter = export_dynamic_batch(module, examples, module.names, [EMBEDDING], opset, "edge graph")
    set_batch_dim(model)
    return name_nodes(model, "edge")


def check_signature(model: onnx.ModelProto, method: EdgeMethod) -> list[str]:
    """The fp32 edge core takes the decoded tensors [-1,T,D] float32 by name and returns `embedding` [-1,E]."""
    inputs, outputs = signature(model)
    problems = []
    want_in = [{"name": name, "dtype": "float32", "shape": [-1, *shape]} for name, shape in method.input_shapes.items()]
    want_out = [{"name": EMBEDDING, "dtype": "float32", "shape": [-1, method.embedding_dim]}]
    if inputs != want_in:
        problems.append(f"edge graph inputs {inputs} != expected {want_in}")
    if outputs != want_out:
        problems.append(f"edge graph outputs {outputs} != expected {want_out}")
    return problems


def edge_parity(session: object, method: EdgeMethod, inputs: dict[str, np.ndarray]) -> float:
    """Max abs difference between the fp32 edge graph and torch `embed` on real inputs."""
    with torch.no_grad():
        ref = method.embed({k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()
    got = session.run([EMBEDDING], inputs)[0]  # type: ignore[attr-defined]
    return float(np.abs(got - ref).max())


def write_head(method: EdgeMethod, path: str | Path) -> dict[str, int]:
    """Save the classifier as `weight` [C,E] / `bias` [C] float32 safetensors; returns its shape info."""
    from safetensors.numpy import save_file

    head = method.head
    weight = head.weight.detach().cpu().numpy().astype(np.float32)  # (C, E)
    bias = (head.bias.detach().cpu().numpy() if head.bias is not None
            else np.zeros(weight.shape[0])).astype(np.float32)  # (C,)
    with atomic_path(path) as tmp:
        save_file({"weight": np.ascontiguousarray(weight), "bias": np.ascontiguousarray(bias)}, str(tmp),
                  metadata={"format": "mist-kit/head/1", "logits": "embedding @ weight.T + bias"})
    return {"num_classes": int(weight.shape[0]), "embedding_dim": int(weight.shape[1])}
