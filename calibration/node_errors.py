"""Per-node quantization error: SQNR of every quantizable node's output, int8 graph vs fp32 graph, on real data.

As onnxruntime's qdq_loss_debug does, both graphs are re-run with their intermediate tensors exposed as outputs
and tensors are matched by name (ORT's quantizers keep the original names of node outputs). A node's output SQNR
includes the error inherited from upstream, so nodes are ranked by the SQNR *lost across the node*: the worst
SQNR among its activation inputs minus the SQNR of its output. That isolates where quantization hurts most, which
is what the accuracy-driven fallback needs to decide which node to keep in fp32. Sums are accumulated a few rows at
a time, so [B,T,D] intermediates of a ViT-B-sized gather never pile up in memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from mist_kit.calibration.modes import QuantSpec

EXACT_DB = 100.0  # SQNR reported for tensors that match exactly (graph inputs, unquantized prefixes)


@dataclass
class NodeError:
    """One fp32-graph node: its output SQNR in the int8 graph, its inputs' SQNR, and the difference."""

    name: str
    op_type: str
    sqnr_db: float
    input_sqnr_db: float
    drop_db: float
    quantized: bool

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.name, "op_type": self.op_type, "sqnr_db": round(self.sqnr_db, 2),
                "input_sqnr_db": round(self.input_sqnr_db, 2), "drop_db": round(self.drop_db, 2),
                "quantized": self.quantized}


def _expose(model: onnx.ModelProto, names: list[str]) -> bytes:
    """A copy of `model` whose graph outputs also include the intermediate tensors `names` (untyped is fine)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    present = {o.name for o in m.graph.output}
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in present)
    return m.SerializeToString()


def _rows(batches: Iterable[dict[str, np.ndarray]], rows: int) -> Iterable[dict[str, np.ndarray]]:
    for batch in batches:
        n = len(next(iter(batch.values())))
        for start in range(0, n, rows):
            yield {name: x[start: start + rows] for name, x in batch.items()}


def node_error_table(fp32: onnx.ModelProto, quant: onnx.ModelProto, batches: Iterable[dict[str, np.ndarray]],
                     spec: QuantSpec, rows: int = 4) -> list[NodeError]:
    """Rank the fp32 graph's nodes of `spec.op_types` by SQNR lost across the node (worst first)."""
    from mist_kit.runtime.metrics import sqnr_from_powers
    from mist_kit.runtime.ort_session import cpu_session as ort_session

    inits = {i.name for i in fp32.graph.initializer} | {i.name for i in fp32.graph.input}  # never exposed
    nodes = [n for n in fp32.graph.node if n.op_type in spec.op_types]
    quant_tensors = {o for n in quant.graph.node for o in n.output} | {i.name for i in quant.graph.input}
    wanted = sorted({t for n in nodes for t in list(n.output) + list(n.input)
                     if t and t not in inits and t in quant_tensors})
    ref_s = ort_session(_expose(fp32, wanted))
    q_s = ort_session(_expose(quant, wanted))
    in_names = [i.name for i in fp32.graph.input if i.name not in {j.name for j in fp32.graph.initializer}]
    ref_names = [o.name for o in ref_s.get_outputs()]
    q_names = [o.name for o in q_s.get_outputs()]
    signal = dict.fromkeys(wanted, 0.0)
    noise = dict.fromkeys(wanted, 0.0)
    for x in _rows(batches, rows):
        feeds = {name: x[name] for name in in_names}
        ref = dict(zip(ref_names, ref_s.run(None, feeds), strict=True))
        got = dict(zip(q_names, q_s.run(None, feeds), strict=True))
        for t in wanted:
            r = ref[t].astype(np.float64)
            signal[t] += float(np.sum(r * r))
            noise[t] += float(np.sum((r - got[t]) ** 2))

    def db(t: str) -> float:
        return sqnr_from_powers(signal[t], noise[t]) if t in signal else EXACT_DB

    quantized_nodes = set(spec.op_types)
    table = []
    for n in nodes:
        out_db = db(n.output[0]) if n.output[0] in signal else EXACT_DB
        acts = [t for t in n.input if t and t not in inits]
        in_db = min((db(t) for t in acts), default=EXACT_DB)
        table.append(NodeError(n.name, n.op_type, out_db, in_db, in_db - out_db,
                               n.op_type in quantized_nodes and n.name not in spec.exclude))
    return sorted(table, key=lambda e: -e.drop_db)
