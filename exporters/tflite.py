"""`--tflite`: an int8 LiteRT edge graph (litert-torch PT2E quantizer, validated with ai-edge-litert). No TensorFlow.

The same fp32 edge core as edge.onnx (`EdgeMethod.embed`: features [1,T,D] -> embedding [1,E], head outside the
graph) is captured with torch.export, quantized with litert-torch's PT2E quantizer (int8 symmetric per-channel
weights; int8 static activations calibrated on the export's real calibration gathers, or, when those fail the gate,
dynamic int8 activations ranged at run time), converted to a .tflite
flatbuffer, and then judged exactly like the ONNX int8 graph: the ai-edge-litert interpreter runs it on the held-out
gathers and the head's top-1 must agree with the fp32 edge network on at least `--min-agreement` of them, or the
export fails and nothing is written. There is no node-exclusion fallback here (the ONNX path has one).

Limits of litert-torch 0.10 that shape this graph:
- the batch axis is fixed at 1: its LayerNorm lowering cannot take a symbolic batch dimension, and the XNNPACK
  delegate cannot resize the static graph to another batch; callers feed one row at a time;
- the codec decoder is a float torch prefix (codes * per-channel scale), so only codec fp32 and the int8
  per-channel codecs (e.g. the default int8-channel) are supported; the core is quantized on decoded features.

The extra (`pip install 'mist-kit[tflite]'`: litert-torch, ai-edge-litert) pulls jax, transformers and torchao and
downgrades typing_extensions/pydantic; install it in its own environment (`make tflite-env`). Without it
`--tflite` fails fast with one line, before any export work starts.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mist_kit.errors import DependencyError, ExportError, UsageError

REQUIRED = ("litert_torch", "ai_edge_litert")
BATCH = 1  # litert-torch 0.10 cannot lower LayerNorm with a dynamic batch axis
Log = Callable[[str], None]
Batches = Iterable[dict[str, np.ndarray]]


def require_tflite() -> None:
    """Fail fast (before exporting anything) with a one-line error when the LiteRT extra is missing."""
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        raise DependencyError(f"--tflite needs litert-torch and ai-edge-litert ({', '.join(missing)} not installed): "
                              "pip install 'mist-kit[tflite]' (or make tflite-env), or export without --tflite")


def _rows(batches: Batches, limit: int | None = None) -> Iterable[np.ndarray]:
    """Single rows [1,T,D] float32 from feature batches (the first array of each batch), up to `limit`."""
    seen = 0
    for batch in batches:
        x = np.asarray(next(iter(batch.values())), dtype=np.float32)
        for i in range(len(x)):
            if limit is not None and seen >= limit:
                return
            yield np.ascontiguousarray(x[i:i + 1])
            seen += 1


class _Decoder:
    """The codecs edge.tflite can begin with: the bare fp32 features, or int8 codes times a per-channel scale."""

    def __init__(self, codec: dict[str, Any] | None) -> None:
        self.name = (codec or {}).get("name", "fp32")
        self.scale: np.ndarray | None = None
        if self.name == "fp32":
            return
        from mist_kit.runtime.codec import Codec, Quant

        c = Codec.from_spec(codec)  # type: ignore[arg-type]
        if c.params.quant is Quant.FP32:
            return
        if c.params.quant is not Quant.INT8:
            raise UsageError(f"--tflite: codec {self.name!r} ({c.params.quant.value}) has no LiteRT decoder here; "
                             "edge.tflite supports codec fp32 and the int8 per-channel codecs (e.g. int8-channel); "
                             "export with one of those or without --tflite")
        self.scale = np.asarray(c.full_scale(), dtype=np.float32)  # [D] or [T', D]

    @property
    def dtype(self) -> str:
        return "float32" if self.scale is None else "int8"

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Decoded features (what the calibration/held-out batches hold) -> this graph's input."""
        if self.scale is None:
            return x
        return np.clip(np.rint(x / self.scale), -128, 127).astype(np.int8)  # exact: x is codes * scale

    def wrap(self, core: Any) -> Any:
        """`core` (decoded features -> embedding) preceded by the codec's float decoder (not quantized)."""
        if self.scale is None:
            return core
        import torch

        scale = torch.from_numpy(self.scale)

        class Decoded(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.core = core
                self.register_buffer("scale", scale)

            def forward(self, codes: torch.Tensor) -> torch.Tensor:
                return self.core(codes.to(torch.float32) * self.scale)

        wrapper = Decoded()
        wrapper.training = False  # not .eval(): exported GraphModules refuse train()/eval()
        return wrapper


def quantize_convert(method: Any, tokens: int, dim: int, calib: Batches, log: Log = print,
                     decoder: _Decoder | None = None, dynamic: bool = False) -> bytes:
    """PT2E int8 (per-channel weights; activations static, calibrated on `calib`, or with `dynamic` quantized at
    run time per tensor) -> .tflite bytes (batch 1).

    The edge core is quantized on the decoded calibration features; a codec decoder, if any, is put in front of the
    quantized core afterwards, in float (it is exact: int8 codes times the codec's scales).
    """
    decoder = decoder or _Decoder(None)
    import litert_torch
    import torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from mist_kit.exporters.edge_onnx import _Embed

    module = _Embed(method.eval()).eval()
    example = (torch.zeros(BATCH, tokens, dim),)
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True,
                                                                             is_dynamic=dynamic))
    # litert-torch prints a progress tree on stdout (keep `--json` output clean); its C++ logs go to stderr
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        captured = torch.export.export(module, example).module()
        observed = prepare_pt2e(captured, quantizer)
        n = 0
        for row in _rows(calib):
            observed(torch.from_numpy(row))
            n += 1
        if n == 0:
            raise ExportError("--tflite: no calibration features to calibrate the int8 activations on")
        if not dynamic:
            log(f"edge.tflite: calibrated int8 activations on {n} gathers")
        quantized = decoder.wrap(convert_pt2e(observed, fold_quantize=False))
        graph_in = (torch.from_numpy(decoder.encode(np.zeros((BATCH, tokens, dim), np.float32))),)
        edge_model = litert_torch.convert(quantized, graph_in, quant_config=QuantConfig(pt2e_quantizer=quantizer))
        with tempfile.TemporaryDirectory(prefix="mist-tflite-") as tmp:
            path = Path(tmp) / "edge.tflite"
            edge_model.export(str(path))
            return path.read_bytes()


def interpreter(model: bytes, threads: int = 1) -> Any:
    """An allocated ai-edge-litert interpreter for `model` (the runtime's import; tflite-runtime as a fallback)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - fallback only (needs numpy < 2, slow int8 kernels)
        from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]
    interp = Interpreter(model_content=model, num_threads=threads)
    interp.allocate_tensors()
    return interp


def run_rows(interp: Any, rows: Iterable[np.ndarray]) -> np.ndarray:
    """Embeddings [N,E] of single-row inputs, one invoke each."""
    inp = interp.get_input_details()[0]["index"]
    out = interp.get_output_details()[0]["index"]
    embs = []
    for row in rows:
        interp.set_tensor(inp, row)
        interp.invoke()
        embs.append(np.array(interp.get_tensor(out), dtype=np.float32))
    return np.concatenate(embs)


def latency_ms(interp: Any, row: np.ndarray, repeats: int = 50) -> float:
    """Median per-image latency at batch 1 (the interpreter's thread count)."""
    from mist_kit.runtime.metrics import median_ms

    inp, out = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]

    def once() -> None:
        interp.set_tensor(inp, row)
        interp.invoke()
        interp.get_tensor(out)

    return median_ms(once, repeats)


COMPUTE_OPS = ("FULLY_CONNECTED", "BATCH_MATMUL", "CONV_2D", "DEPTHWISE_CONV_2D")


def op_summary(model: bytes) -> tuple[dict[str, int], dict[str, int]]:
    """(op counts of the flatbuffer, compute ops that run int8: int8 activations (static), or int8 weights with
    float activations (dynamic range: LiteRT's hybrid kernels quantize the activations at run time)), read with the
    default delegate off."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interp = Interpreter(model_content=model,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interp.allocate_tensors()
    ops = interp._get_ops_details()  # private, but the only op listing there is
    dtypes = {t["index"]: np.dtype(t["dtype"]) for t in interp.get_tensor_details()}
    counts = Counter(str(o["op_name"]) for o in ops)
    int8 = Counter(str(o["op_name"]) for o in ops if o["op_name"] in COMPUTE_OPS
                   and any(dtypes.get(int(i)) == np.dtype(np.int8) for i in list(o["inputs"])[:2] if int(i) >= 0))
    return dict(sorted(counts.items())), dict(sorted(int8.items()))


def check_signature(interp: Any, tokens: int, dim: int, embedding_dim: int, dtype: str = "float32") -> list[str]:
    """edge.tflite takes one [1,T,D] input (float32 features or int8 codec codes), returns float32 [1,E]."""
    ins, outs = interp.get_input_details(), interp.get_output_details()
    got_in = [(list(map(int, d["shape"])), np.dtype(d["dtype"]).name) for d in ins]
    got_out = [(list(map(int, d["shape"])), np.dtype(d["dtype"]).name) for d in outs]
    problems = []
    if got_in != [([BATCH, tokens, dim], dtype)]:
        problems.append(f"edge.tflite inputs {got_in} != expected {[([BATCH, tokens, dim], dtype)]}")
    if got_out != [([BATCH, embedding_dim], "float32")]:
        problems.append(f"edge.tflite outputs {got_out} != expected {[([BATCH, embedding_dim], 'float32')]}")
    return problems


def validate(model: bytes, method: Any, tokens: int, dim: int, held_out: Batches, head: Any,
             labels: np.ndarray | None, min_agreement: float, n_max: int | None = None,
             decoder: _Decoder | None = None) -> dict[str, Any]:
    """Run `model` with ai-edge-litert on the held-out gathers and compare with the fp32 torch edge network."""
    import torch

    from mist_kit.runtime.metrics import sqnr_db, top1_known

    decoder = decoder or _Decoder(None)
    interp = interpreter(model, threads=1)
    problems = check_signature(interp, tokens, dim, method.embedding_dim, decoder.dtype)
    rows = list(_rows(held_out, n_max))
    if not rows:
        return {"problems": [*problems, "--tflite: no held-out features to validate edge.tflite on"]}
    if problems:
        return {"problems": problems}
    x = np.concatenate(rows)
    with torch.no_grad():
        ref = np.concatenate([method.embed(torch.from_numpy(x[i:i + 64])).numpy() for i in range(0, len(x), 64)])
    emb = run_rows(interp, (decoder.encode(r) for r in rows))
    ref_pred, pred = head.logits(ref).argmax(1), head.logits(emb).argmax(1)
    agreement = float((pred == ref_pred).mean())
    lab = None if labels is None else np.asarray(labels)[:len(rows)]
    if lab is not None and len(lab) != len(rows):
        lab = None
    top1_fp32, top1_int8 = top1_known(ref_pred, lab), top1_known(pred, lab)
    all_ops, int8_ops = op_summary(model)
    report = {"bytes": len(model), "batch": BATCH, "quantizer": "litert-torch PT2E (int8 per-channel weights)",
              "agreement": agreement, "top1_fp32": top1_fp32, "top1_int8": top1_int8,
              "embedding_sqnr_db": sqnr_db(ref, emb), "codec": decoder.name, "input_dtype": decoder.dtype,
              "latency_ms_per_image": latency_ms(interp, decoder.encode(rows[0])),
              "ops": all_ops, "int8_ops": int8_ops, "n_eval": len(rows), "min_agreement": min_agreement,
              "passed": agreement >= min_agreement, "problems": []}
    if not int8_ops:
        report["problems"].append("edge.tflite runs no int8 compute operators")
    if agreement < min_agreement:
        report["problems"].append(f"edge.tflite int8 top-1 agreement {agreement:.4f} < --min-agreement "
                                  f"{min_agreement} (litert-torch PT2E has no node-exclusion fallback)")
    return report


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def export_tflite(method: Any, tokens: int, dim: int, calib: Batches, held_out: Batches | None, head: Any,
                  labels: np.ndarray | None, min_agreement: float, codec: dict[str, Any] | None = None,
                  log: Log = print) -> tuple[bytes | None, dict[str, Any]]:
    """edge.tflite bytes and its report; on failure (report["problems"] not empty) the caller writes nothing."""
    require_tflite()
    decoder = _Decoder(codec)
    if held_out is None:
        return None, {"problems": ["--tflite: no held-out features to validate edge.tflite on"]}
    t0 = time.perf_counter()
    tried: list[dict[str, Any]] = []
    # Static int8 activations first (fastest where it holds); when the gate refuses it (softmax attention and GELU
    # in a copied ViT block lose ~3% agreement with static ranges), dynamic int8 activations, ranges taken at run
    # time: the same recipe order as edge.onnx's gate.
    for activations in ("static", "dynamic"):
        log(f"exporting edge.tflite (litert-torch PT2E int8, {activations} activations)")
        try:
            model = quantize_convert(method, tokens, dim, calib, log, decoder, dynamic=activations == "dynamic")
        except ExportError:
            raise
        except Exception as exc:  # litert-torch / torch.export raise many types; one line names the step
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            tried.append({"activations": activations, "problems": [
                f"edge.tflite: litert-torch conversion failed ({type(exc).__name__}: {first})"]})
            continue
        report = validate(model, method, tokens, dim, held_out, head, labels, min_agreement, decoder=decoder)
        report["activations"] = activations
        if "agreement" in report:
            log(f"edge.tflite ({activations}): {report['bytes']} bytes, top-1 agreement {report['agreement']:.4f} "
                f"on {report['n_eval']} held-out gathers, {report['latency_ms_per_image']:.2f} ms/image at 1 thread")
        if not report["problems"]:
            break
        tried.append({k: report.get(k) for k in ("activations", "agreement", "latency_ms_per_image", "problems")})
    else:
        problems = [p for t in tried for p in t["problems"]]
        return None, {"problems": problems, "tried": tried}
    report["tried"] = tried
    report["versions"] = {p: _version(p) for p in ("litert-torch", "ai-edge-litert", "torch")}
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return model, report
