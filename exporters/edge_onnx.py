"""The edge graph: features [B,T,D] -> LAE blocks -> final norm -> pooling -> embedding [B,E]; head to safetensors.

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
from mist_kit.errors import UsageError
from mist_kit.exporters.onnx_utils import export_dynamic_batch, name_nodes, set_batch_dim, signature

FEATURES = "features"
EMBEDDING = "embedding"
OPSET = 18
EDGE_MAX_ABS = 1e-4  # fp32 edge graph vs torch embed(); LayerNorm-bounded values, so an absolute bound is right


class _Embed(nn.Module):
    """Wraps `EdgeMethod.embed` as a module so the exporter traces embed only, never the head."""

    def __init__(self, method: EdgeMethod) -> None:
        super().__init__()
        self.method = method

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.method.embed(features)  # (B, T, D) -> (B, E)


def export_edge(method: EdgeMethod, tokens: int, dim: int, opset: int = OPSET) -> onnx.ModelProto:
    """Export the embedding part of an edge method with a dynamic batch axis and named nodes."""
    if method.input_kind != "gather":
        raise UsageError(f"method {method.method_name!r} consumes {method.input_kind!r}, not the gather; split "
                         "export supports gather-consuming edge methods (e.g. mist)")
    module = _Embed(method.eval()).eval()
    example = torch.zeros(2, tokens, dim)
    model, _exporter = export_dynamic_batch(module, example, FEATURES, EMBEDDING, opset, "edge graph")
    set_batch_dim(model)
    return name_nodes(model, "edge")


def check_signature(model: onnx.ModelProto, tokens: int, dim: int, embedding_dim: int) -> list[str]:
    """The fp32 edge core takes `features` [-1,T,D] float32 and returns `embedding` [-1,E] float32."""
    inputs, outputs = signature(model)
    problems = []
    want_in = [{"name": FEATURES, "dtype": "float32", "shape": [-1, tokens, dim]}]
    want_out = [{"name": EMBEDDING, "dtype": "float32", "shape": [-1, embedding_dim]}]
    if inputs != want_in:
        problems.append(f"edge graph inputs {inputs} != expected {want_in}")
    if outputs != want_out:
        problems.append(f"edge graph outputs {outputs} != expected {want_out}")
    return problems


def edge_parity(session: object, method: EdgeMethod, features: np.ndarray) -> float:
    """Max abs difference between the fp32 edge graph and torch `embed` on real features."""
    with torch.no_grad():
        ref = method.embed(torch.from_numpy(features)).numpy()
    got = session.run([EMBEDDING], {FEATURES: features})[0]  # type: ignore[attr-defined]
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
