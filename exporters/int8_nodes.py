"""Which edge-graph nodes int8 pays for: a structural pre-selection, then a measured one, each decision recorded.

Why not every MatMul: in the LAE graph the attention products (q k^T, attn @ v) multiply two activations, so a
quantized version has to find both ranges at run time (or trust calibrated ones that an outlier-heavy gather
breaks: static int8 on every MatMul dropped to 91% agreement on Caltech-101), and the rank-r products (K = 16)
do so little arithmetic per value that the quantize/dequantize around them costs more than the int8 GEMM saves.
Measured on ViT-S/14 gathers, quantizing those made the int8 graph slower than fp32 (issue 14). So a node is a
candidate only when its second operand is a constant weight and its reduction dimension K is large (the D -> 3r
projections, K = D); `prune_by_latency` then keeps a candidate in fp32 where leaving it fp32 measures faster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnx

MIN_REDUCTION = 64  # K below this: the QDQ / dynamic-range work around the product outweighs the int8 saving


@dataclass(frozen=True)
class NodeDecision:
    """One quantizable node of the fp32 edge graph: is it int8 in the shipped graph, and why."""

    name: str
    op_type: str
    int8: bool
    why: str
    reduction: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.name, "op_type": self.op_type, "int8": self.int8, "why": self.why,
                "reduction_dim": self.reduction}

    def kept_fp32(self, why: str) -> NodeDecision:
        return NodeDecision(self.name, self.op_type, False, why, self.reduction)


def _constant_weight_k(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto]) -> int | None:
    """Reduction dimension K of a MatMul/Gemm whose B operand is a constant, else None."""
    if len(node.input) < 2 or node.input[1] not in consts:
        return None
    dims = list(consts[node.input[1]].dims)
    if len(dims) != 2:
        return None
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return int(dims[1] if trans_b else dims[0])
    return int(dims[0])


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    consts = {t.name: t for t in model.graph.initializer}
    for n in model.graph.node:  # the dynamo exporter sometimes emits weights as Constant nodes
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = n.attribute[0].t
    return consts


def preselect(model: onnx.ModelProto, op_types: tuple[str, ...], min_reduction: int = MIN_REDUCTION
              ) -> list[NodeDecision]:
    """Structural decision for every node of `op_types`: int8 only for constant weights with K >= min_reduction."""
    consts = _constants(model)
    out = []
    for n in model.graph.node:
        if n.op_type not in op_types:
            continue
        k = _constant_weight_k(n, consts)
        if k is None:
            out.append(NodeDecision(n.name, n.op_type, False, "both operands are activations: int8 would need run-time "
                                    "ranges of both (or calibrated ones an outlier breaks) for a small product"))
        elif k < min_reduction:
            out.append(NodeDecision(n.name, n.op_type, False, f"reduction dim K={k} < {min_reduction}: quantize/"
                                    "dequantize around it costs more than the int8 product saves", k))
        else:
            out.append(NodeDecision(n.name, n.op_type, True, f"constant weight, reduction dim K={k}", k))
    return out


def chosen(decisions: list[NodeDecision]) -> tuple[str, ...]:
    return tuple(d.name for d in decisions if d.int8)
