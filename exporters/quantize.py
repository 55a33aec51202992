"""int8 edge graph with onnxruntime.quantization, judged on real held-out features, with accuracy-driven fallback.

An int8 graph that silently lost accuracy is worse than none. Each recipe (`calibration.modes.QuantSpec`) is
applied to the fp32 edge core and measured against it on held-out real gathers: top-1 agreement of the head's
argmax, embedding SQNR, and latency. Below `min_agreement` the per-node error table (SQNR of every node output vs
fp32, as onnxruntime's qdq_loss_debug computes it) names the nodes whose quantization loses the most signal; they
are excluded one at a time until the graph passes, or the export fails with the table. A structural check counts
the int8 operators in the saved graph and in the graph onnxruntime actually executes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from mist_kit.calibration.modes import CalibMethod, QuantFormat, QuantMode, QuantSpec
from mist_kit.calibration.node_errors import NodeError, node_error_table
from mist_kit.calibration.reader import FeatureReader
from mist_kit.errors import ExportError
from mist_kit.exporters.int8_nodes import NodeDecision, chosen, preselect
from mist_kit.exporters.onnx_utils import INT8_COMPUTE_OPS, int8_op_counts, op_counts
from mist_kit.runtime.bundle import Head
from mist_kit.runtime.edge_session import edge_ort_session, one_row_at_a_time
from mist_kit.runtime.metrics import agreement, median_ms, sqnr_db, top1_known

Log = Callable[[str], None]
Batches = Iterable[dict[str, np.ndarray]]


@dataclass
class Measurement:
    """One int8 recipe measured against the fp32 edge graph on held-out real features."""

    spec: QuantSpec
    agreement: float
    top1_fp32: float | None
    top1_int8: float | None
    embedding_sqnr_db: float
    latency_ms: float
    int8_ops: dict[str, int]
    runtime_int8_ops: dict[str, int]
    n_eval: int
    model: onnx.ModelProto | None = field(default=None, repr=False)
    nodes: list[NodeDecision] = field(default_factory=list)  # per-node int8 decision (filled for the chosen graph)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.spec.to_dict(), "agreement": self.agreement, "top1_fp32": self.top1_fp32,
                "top1_int8": self.top1_int8, "embedding_sqnr_db": self.embedding_sqnr_db,
                "latency_ms_per_image": self.latency_ms, "int8_ops": self.int8_ops,
                "runtime_int8_ops": self.runtime_int8_ops, "n_eval": self.n_eval,
                "nodes": [d.to_dict() for d in self.nodes]}


@dataclass
class QuantResult:
    """The chosen int8 graph, everything measured on the way, and the node table if the fallback ran."""

    chosen: Measurement
    candidates: list[Measurement]
    node_table: list[NodeError]
    passed: bool
    min_agreement: float
    fp32_latency_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen.to_dict(), "candidates": [c.to_dict() for c in self.candidates],
                "node_errors": [n.to_dict() for n in self.node_table[:20]], "passed": self.passed,
                "min_agreement": self.min_agreement, "fp32_latency_ms_per_image": self.fp32_latency_ms}


def quantize(fp32: onnx.ModelProto, spec: QuantSpec, calib: Batches | None) -> onnx.ModelProto:
    """Apply one recipe with onnxruntime.quantization and return the int8 model."""
    from onnxruntime.quantization import CalibrationMethod, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization import QuantFormat as OrtFormat

    # ORT's quantizer print()s calibration details and logs "consider pre-processing" on the root logger; stdout
    # must stay clean for `--json`, and our own report says what was done.
    with tempfile.TemporaryDirectory(prefix="mist-quant-") as tmp, contextlib.redirect_stdout(io.StringIO()), \
            _quiet_root_logger():
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(fp32, str(src))
        common = {"op_types_to_quantize": list(spec.op_types), "per_channel": spec.per_channel,
                  "reduce_range": spec.reduce_range, "weight_type": QuantType.QInt8,
                  "nodes_to_exclude": list(spec.exclude),
                  "nodes_to_quantize": list(spec.nodes) if spec.nodes is not None else None}
        if spec.mode is QuantMode.DYNAMIC:
            quantize_dynamic(src, dst, **common, extra_options={"MatMulConstBOnly": False})
        else:
            if calib is None:
                raise ExportError(f"quantization {spec.name!r}: static mode needs calibration data")
            method = {CalibMethod.MINMAX: CalibrationMethod.MinMax, CalibMethod.ENTROPY: CalibrationMethod.Entropy,
                      CalibMethod.PERCENTILE: CalibrationMethod.Percentile}[spec.calib]  # type: ignore[index]
            fmt = OrtFormat.QDQ if spec.fmt is QuantFormat.QDQ else OrtFormat.QOperator
            # uint8 activations x int8 weights (U8S8) is the fast x86/ARM path for both layouts
            extra = {"CalibPercentile": spec.percentile, "CalibMovingAverage": spec.calib is CalibMethod.MINMAX}
            quantize_static(src, dst, FeatureReader(calib), quant_format=fmt, activation_type=QuantType.QUInt8,
                            calibrate_method=method, extra_options=extra, **common)
        return onnx.load_model(str(dst))


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def runtime_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Op counts of the graph onnxruntime executes after its fusions (QDQ pairs become QLinear*/MatMulInteger)."""
    from mist_kit.runtime.ort_session import cpu_session

    with tempfile.TemporaryDirectory(prefix="mist-opt-") as tmp:
        optimized = str(Path(tmp) / "opt.onnx")
        cpu_session(model.SerializeToString(), 1, optimization="extended", optimized_model_path=optimized)
        counts = op_counts(onnx.load_model(optimized))
    return {k: v for k, v in counts.items() if k in INT8_COMPUTE_OPS}


def embeddings(session: Any, batches: Batches, limit: int | None = None, per_row: bool = False) -> np.ndarray:
    """Run an edge session over batches ({input name: array}, every graph input) and stack the embeddings.

    `per_row` runs one row per call: dynamic int8 takes its activation scales from the whole input tensor, so a
    batched run would score each image with its batch mates' ranges, not as the device (which runs dynamic
    graphs row by row, see runtime.edge_session) will.
    """
    names = [i.name for i in session.get_inputs()]

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return session.run(None, feeds)[0]

    out, seen = [], 0
    for batch in batches:
        feeds = {name: batch[name] for name in names}
        out.append(one_row_at_a_time(run, feeds) if per_row else run(feeds))
        seen += len(out[-1])
        if limit is not None and seen >= limit:
            break
    return np.concatenate(out)


def latency_ms(session: Any, sample: dict[str, np.ndarray], repeats: int = 20) -> float:
    """Median per-image latency at batch 1 (one intra-op thread, as a small device runs it)."""
    x = {i.name: sample[i.name][:1] for i in session.get_inputs()}
    return median_ms(lambda: session.run(None, x), repeats)


def measure(model: onnx.ModelProto, spec: QuantSpec, ref_emb: np.ndarray, held_out: Batches, head: Head,
            labels: np.ndarray | None, sample: dict[str, np.ndarray]) -> Measurement:
    """Agreement / top-1 / SQNR / latency of `model` vs the fp32 embeddings `ref_emb` of the same batches."""
    session = edge_ort_session(model.SerializeToString())
    emb = embeddings(session, held_out, per_row=spec.mode is QuantMode.DYNAMIC)
    ref_pred = head.logits(ref_emb).argmax(1)
    pred = head.logits(emb).argmax(1)
    return Measurement(spec, agreement(pred, ref_pred), top1_known(ref_pred, labels), top1_known(pred, labels),
                       sqnr_db(ref_emb, emb),
                       latency_ms(session, sample), int8_op_counts(model), runtime_ops(model), len(emb), model)


def _rank(m: Measurement) -> tuple[int, float, float]:
    """Graphs that really run int8 first (a recipe that quantized nothing, e.g. dynamic mode on Gemm nodes, keeps
    perfect agreement and must not win for it); then the best agreement; near-ties go to the faster graph."""
    return (0 if m.runtime_int8_ops else 1, -round(m.agreement, 3), m.latency_ms)


def quantize_edge(fp32: onnx.ModelProto, specs: list[QuantSpec], calib: Batches, held_out: Batches, head: Head,
                  labels: np.ndarray | None, min_agreement: float, log: Log = print,
                  max_exclusions: int | None = None, select_nodes: bool = True) -> QuantResult:
    """Measure every recipe in `specs`, keep the best; below `min_agreement` exclude worst nodes until it passes.

    With `select_nodes` (the default) only the nodes where int8 pays are quantized: the structural pre-selection
    of `exporters.int8_nodes`, then each int8 node is kept fp32 where that measures faster (`_prune_by_latency`).
    Every decision lands in `chosen.nodes`. Never returns a failing graph as a success: `passed` is False when the
    fallback ran out of nodes to exclude, and the caller turns that into an ExportError carrying the node table.
    """
    ref_session = edge_ort_session(fp32.SerializeToString())
    ref_emb = embeddings(ref_session, held_out)
    sample = next(iter(held_out))
    fp32_ms = latency_ms(ref_session, sample)
    decisions = preselect(fp32, specs[0].op_types) if specs else []
    picked = chosen(decisions)
    if select_nodes and picked:
        specs = [replace(s, nodes=picked) if s.nodes is None else s for s in specs]
    elif select_nodes:
        log("int8: no node passes the structural selection; quantizing every node of the asked op types")
    candidates = []
    for spec in specs:
        m = measure(quantize(fp32, spec, calib), spec, ref_emb, held_out, head, labels, sample)
        log(f"int8 {spec.name}: agreement {m.agreement:.4f}, embedding SQNR {m.embedding_sqnr_db:.1f} dB, "
            f"{m.latency_ms:.3f} ms/image (fp32 {fp32_ms:.3f})")
        candidates.append(m)
    best = min(candidates, key=_rank)
    table: list[NodeError] = []
    quantizable = [n.name for n in fp32.graph.node if n.op_type in best.spec.op_types]
    limit = max_exclusions if max_exclusions is not None else max(1, len(quantizable) // 2)
    current = best
    gate_reasons: dict[str, str] = {}
    while current.agreement < min_agreement and len(current.spec.exclude) < limit:
        probe = list(current_batches(held_out, 256))
        table = node_error_table(fp32, current.model, probe, current.spec)  # type: ignore[arg-type]
        todo = [n for n in table if n.name not in current.spec.exclude and n.op_type in current.spec.op_types
                and (current.spec.nodes is None or n.name in current.spec.nodes)]
        if not todo:
            break
        worst = todo[0]
        spec = current.spec.excluding((worst.name,))
        m = measure(quantize(fp32, spec, calib), spec, ref_emb, held_out, head, labels, sample)
        log(f"agreement {current.agreement:.4f} < {min_agreement}: keeping {worst.name} ({worst.op_type}, "
            f"SQNR loss {worst.drop_db:.1f} dB) in fp32 -> agreement {m.agreement:.4f}")
        gate_reasons[worst.name] = (f"agreement gate: int8 here lost {worst.drop_db:.1f} dB SQNR and agreement "
                                    f"{current.agreement:.4f} < {min_agreement}")
        candidates.append(m)
        current = m
    passed = current.agreement >= min_agreement
    latency_reasons: dict[str, str] = {}
    if passed and select_nodes and current.spec.nodes is not None:
        current = _prune_by_latency(fp32, current, calib, ref_emb, held_out, head, labels, sample, min_agreement,
                                    latency_reasons, log)
    if current is not best or not passed:  # the table of the graph actually shipped (or refused)
        table = node_error_table(fp32, current.model, list(current_batches(held_out, 256)),  # type: ignore[arg-type]
                                 current.spec)
    current.nodes = _final_decisions(decisions, current.spec, gate_reasons, latency_reasons)
    return QuantResult(current, candidates, table, passed, min_agreement, fp32_ms)


def _final_decisions(decisions: list[NodeDecision], spec: QuantSpec, gate: dict[str, str],
                     latency: dict[str, str]) -> list[NodeDecision]:
    """The structural decisions updated with what the agreement gate and the latency probe changed."""
    if spec.nodes is None:  # every node of op_types was asked for (selection off or nothing passed it)
        decisions = [NodeDecision(d.name, d.op_type, True, "selection off: every node of the asked op types",
                                  d.reduction) for d in decisions]
    out = []
    for d in decisions:
        if d.name in gate:
            d = d.kept_fp32(gate[d.name])
        elif d.name in latency:
            d = d.kept_fp32(latency[d.name])
        elif d.name in spec.exclude:
            d = d.kept_fp32("excluded by the recipe")
        out.append(d)
    return out


def _prune_by_latency(fp32: onnx.ModelProto, current: Measurement, calib: Batches, ref_emb: np.ndarray,
                      held_out: Batches, head: Head, labels: np.ndarray | None, sample: dict[str, np.ndarray],
                      min_agreement: float, reasons: dict[str, str], log: Log, margin: float = 0.05) -> Measurement:
    """Keep an int8 node in fp32 when the graph without it measures at least `margin` faster in most interleaved
    rounds (paired rounds: a load spike hits both graphs of a round, so one noisy round cannot flip a decision);
    the change is adopted only if the agreement gate still passes."""
    for name in [n for n in current.spec.nodes or () if n not in current.spec.exclude]:
        remaining = [n for n in current.spec.nodes or () if n not in current.spec.exclude and n != name]
        if not remaining:
            break  # the last int8 node: whether int8 pays at all is the device's call (`devices tune`)
        spec = current.spec.excluding((name,))
        model = quantize(fp32, spec, calib)
        with_r, without_r = interleaved_rounds([current.model, model], sample)  # type: ignore[list-item]
        wins = sum(b < a * (1 - margin) for a, b in zip(with_r, without_r, strict=True))
        with_ms, without_ms = float(np.median(with_r)), float(np.median(without_r))
        if wins >= 0.75 * len(with_r) and without_ms < with_ms * (1 - margin):
            m = measure(model, spec, ref_emb, held_out, head, labels, sample)
            if m.agreement >= min_agreement:
                reasons[name] = (f"measured: graph {with_ms:.3f} ms/image with it int8, {without_ms:.3f} ms without "
                                 f"(faster without in {wins}/{len(with_r)} paired rounds)")
                log(f"int8: keeping {name} in fp32 ({reasons[name]})")
                current = m
    return current


def interleaved_rounds(models: list[onnx.ModelProto], sample: dict[str, np.ndarray], rounds: int = 12,
                       repeats: int = 5) -> list[list[float]]:
    """Batch-1 ms per round of each model, run A,B,A,B... so that host load hits every variant alike."""
    sessions = [edge_ort_session(m.SerializeToString()) for m in models]
    feeds = [{i.name: sample[i.name][:1] for i in s.get_inputs()} for s in sessions]
    for s, x in zip(sessions, feeds, strict=True):
        s.run(None, x)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for s, x, t in zip(sessions, feeds, times, strict=True):
            start = time.perf_counter()
            for _ in range(repeats):
                s.run(None, x)
            t.append((time.perf_counter() - start) / repeats)
    return [[v * 1000.0 for v in t] for t in times]


def current_batches(batches: Batches, limit: int) -> Iterable[dict[str, np.ndarray]]:
    """The first `limit` rows of a batch stream (the node table needs a sample, not the whole held-out set)."""
    seen = 0
    for batch in batches:
        yield batch
        seen += len(next(iter(batch.values())))
        if seen >= limit:
            return
