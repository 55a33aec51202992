"""`export_bundle`: checkpoint -> validated split bundle (cloud.onnx, edge.onnx int8, head, deploy/, manifest).

Order matters and is deliberate: export both fp32 graphs, check them against torch, quantize the edge *core* on
real features (calibration before any codec decoder is prepended, so ranges describe what the LAE sees), attach
the codec's encoder/decoder fragments, write everything to a temporary directory, re-validate the written files end
to end (cloud.onnx -> edge graph -> head vs the torch checkpoint), and only then publish. Problems are collected
and returned in the typed report (`ok=False`, nothing written); bad input raises the matching MistError.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mist_kit.calibration.modes import AUTO, Precision, resolve_modes
from mist_kit.errors import InputError, UsageError
from mist_kit.exporters.deploy import TRITON_BACKENDS

Log = Callable[[str], None]


@dataclass(frozen=True)
class ExportOptions:
    """What `mist-kit export` can be asked; contradictory settings are rejected here, before any work."""

    quantize: Precision = Precision.INT8
    mode: str = AUTO
    op_types: tuple[str, ...] | None = None
    min_agreement: float = 0.99
    calib: str | None = None  # images (ImageFolder / list file) instead of the checkpoint's feature cache
    eval_data: str | None = None  # held-out images for the int8 gate (default: val, unless the checkpoint was refit)
    n_calib: int = 256
    n_eval: int = 1000
    n_parity: int = 8
    tflite: bool = False
    codec: str | None = None  # default: the checkpoint's codec; for an fp32-trained one, int8-channel
    model_name: str | None = None
    weights: str | None = None  # backbone weights file, if moved since training
    cache_dir: Path | None = None
    seed: int = 0
    triton_backend: str = "onnxruntime"  # deploy/triton config.pbtxt backend (exporters/deploy.py TRITON_BACKENDS)

    def __post_init__(self) -> None:
        if not 0.0 < self.min_agreement <= 1.0:
            raise UsageError(f"--min-agreement {self.min_agreement} must be in (0, 1]")
        if self.n_calib < 1 or self.n_eval < 1 or self.n_parity < 1:
            raise UsageError("calibration / evaluation / parity sample counts must be >= 1")
        if self.tflite and self.quantize is Precision.NONE:
            raise UsageError("cannot set both --tflite and --quantize none: edge.tflite is the int8 LiteRT graph")
        if self.quantize is Precision.NONE and (self.mode != AUTO or self.op_types):
            raise UsageError("cannot set both --quantize none and --mode/--op-types")
        if self.model_name is not None:  # the manifest's own rule, checked before any work, not at load time
            from mist_kit.runtime.manifest_schema import check_served_name

            check_served_name(self.model_name, "--model-name")
        if self.triton_backend not in TRITON_BACKENDS:
            raise UsageError(f"--triton-backend {self.triton_backend!r}: expected one of {', '.join(TRITON_BACKENDS)}")
        if self.quantize is Precision.INT8:
            resolve_modes(self.mode, self.op_types)  # unknown mode names fail now, not after the export


@dataclass
class ExportReport:
    """What the export did and measured; `ok` is False when validation failed (then nothing was written)."""

    ok: bool
    bundle: str
    problems: list[str]
    manifest: dict[str, Any]
    cloud: dict[str, Any]
    quantization: dict[str, Any] | None
    chain: dict[str, Any]
    data: list[str]
    seconds: float
    tflite: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _codec_specs(config: Any, plan: Any, requested: str | None, cache_dir: Path | None,
                 log: Log) -> dict[str, dict[str, Any]]:
    """The codec of every sent tensor: the requested one, else the checkpoint's, else the measured default.

    An fp32-trained checkpoint exports with `DEFAULT_LAYOUT_PRESERVING_CODEC` (int8-channel: 4x fewer bytes per
    image, -0.15 pt on Caltech-101, see BENCHMARKS.md) on every tensor: the best codec that needs no retraining.
    It is calibrated per tensor on the training cache; without one the export falls back to fp32 and says so (an
    explicit --codec fails).
    """
    from mist_kit.runtime.codec import DEFAULT_LAYOUT_PRESERVING_CODEC, parse_codec_name
    from mist_kit.runtime.codec.registry import same_tokens_codec

    trained = {name: spec for name, spec in (config.codecs or {}).items() if spec.get("name", "fp32") != "fp32"}
    names = {spec["name"] for spec in trained.values()}
    def trained_for(req: str) -> bool:
        """Every tensor carries `req`, or, on a one-token tensor (the cls), its quantizer alone: what
        `train --codec req` wrote (pool2-int4 -> int4-channel there)."""
        base = parse_codec_name(req)[0]
        return all(spec["name"] in (req, base) or (spec.get("tokens") == 1 and spec["name"] == same_tokens_codec(base))
                   for spec in trained.values())

    if trained and (requested is None or trained_for(requested)):
        return trained
    if trained:
        raise UsageError(f"--codec {requested}: the checkpoint's edge network was trained for codec "
                         f"{', '.join(sorted(names))}; retrain it for {requested!r} (mist-kit train --codec) first")
    name = requested or DEFAULT_LAYOUT_PRESERVING_CODEC
    if name == "fp32":
        return {}
    from mist_kit.calibration.codec_calib import fit_for_export

    try:
        return fit_for_export(config, name, cache_dir, log)
    except InputError as exc:
        if requested is not None:
            raise
        log(f"codec: fp32, not the default {name} ({exc}); pass --codec fp32 to silence this")
        return {}


def _has_matmuls(model: Any, op_types: tuple[str, ...]) -> bool:
    return any(n.op_type in op_types for n in model.graph.node)


class _OneInput:
    """A single-input method seen through the one-tensor interface edge.tflite's converter takes."""

    def __init__(self, method: Any) -> None:
        self.method, self.name = method, next(iter(method.input_shapes))
        self.embedding_dim, self.head = method.embedding_dim, method.head

    def embed(self, x: Any) -> Any:
        return self.method.embed({self.name: x})

    def eval(self) -> _OneInput:
        self.method.eval()
        return self

    def inference_module(self) -> Any:
        """What the converter traces: the method's own inference module (its `embed` takes the {name: tensor}
        mapping), not this wrapper, whose `embed` takes the bare tensor."""
        from mist_kit.exporters.edge_onnx import inference_module

        return inference_module(self.method)

    def __getattr__(self, item: str) -> Any:
        return getattr(self.method, item)


def export_bundle(checkpoint: str | Path, out: str | Path, options: ExportOptions | None = None,
                  log: Log = print, **overrides: Any) -> ExportReport:
    """Export `checkpoint` to the bundle directory `out` (replaced whole on success, untouched on failure).

    `overrides` are ExportOptions fields (`export_bundle(ckpt, out, quantize=Precision.NONE)`).
    """
    import torch

    from mist_kit.backbone import load_backbone_for
    from mist_kit.backbone_run import CloudModule
    from mist_kit.calibration.features import held_out_source, parity_pixels, real_data
    from mist_kit.checkpoint import load_checkpoint
    from mist_kit.exporters import cloud_onnx, edge_onnx
    from mist_kit.exporters import codec_graphs as cg
    from mist_kit.exporters.bundle import Artifacts, ValidationFailed, base_manifest, model_name_for, write_bundle
    from mist_kit.exporters.quantize import embeddings, quantize_edge
    from mist_kit.exporters.verify import chain_check
    from mist_kit.runtime.bundle import Head
    from mist_kit.runtime.codec.plan_codecs import plan_codecs, roundtrips
    from mist_kit.runtime.metrics import top1_known

    t0 = time.perf_counter()
    opts = options or ExportOptions()
    if overrides:
        opts = ExportOptions(**{**asdict(opts), **overrides})
    if opts.tflite:
        from mist_kit.exporters.tflite import require_tflite

        require_tflite()
    config, method = load_checkpoint(checkpoint)
    plan = method.plan
    if opts.tflite and len(plan.tensors) != 1:
        raise UsageError(f"--tflite: edge.tflite takes one input tensor; method {config.method.name!r} sends "
                         f"{len(plan.tensors)} ({', '.join(plan.names)})")
    # before any work: without data the network never trained on, the int8 gate would have nothing honest to score
    held_out = held_out_source(config, opts.calib, opts.eval_data, opts.cache_dir,
                               required=opts.quantize is Precision.INT8)
    b = config.backbone
    backbone = load_backbone_for(b, opts.weights)  # wrong weights fail before any work
    specs = _codec_specs(config, plan, opts.codec, opts.cache_dir, log)
    codecs = plan_codecs(plan, specs, b.num_prefix_tokens)
    transforms = roundtrips(codecs)
    rng = np.random.default_rng(opts.seed)
    torch.manual_seed(opts.seed)
    cloud_module = CloudModule(backbone, plan).eval()
    problems: list[str] = []
    notes: list[str] = []

    log(f"exporting cloud graph ({b.name}, blocks 1..{plan.blocks}, sends {', '.join(plan.names)})")
    cloud, exporter = cloud_onnx.export_cloud(cloud_module, b.img_size)
    problems += cloud_onnx.check_signature(cloud, plan, b.img_size)
    pixels = parity_pixels(config, opts.calib, opts.n_parity, rng)
    parity = cloud_onnx.cloud_parity_model(cloud, cloud_module, pixels)
    problems += parity.problems

    log("exporting edge graph (fp32 reference)")
    edge_fp32 = edge_onnx.export_edge(method)
    problems += edge_onnx.check_signature(edge_fp32, method)

    data = real_data(config, cloud_module, calib=opts.calib, held_out=held_out, n_calib=opts.n_calib,
                     n_eval=opts.n_eval, rng=rng, transforms=transforms, cache_root=opts.cache_dir, log=log)
    for note in data.notes:
        log(note)
    head = Head(method.head.weight.detach().numpy().astype(np.float32),
                method.head.bias.detach().numpy().astype(np.float32), tuple(config.classes))
    sample = next(iter(data.held_out if data.held_out is not None else data.calib))
    edge_err = edge_onnx.edge_parity(cloud_onnx.ort_session(edge_fp32.SerializeToString()), method, sample)
    if edge_err > edge_onnx.EDGE_MAX_ABS:
        problems.append(f"edge.fp32.onnx differs from torch embed: max abs err {edge_err:.3g} > "
                        f"{edge_onnx.EDGE_MAX_ABS:g}")
    quant = None
    edge = edge_fp32
    labels = data.held_out_labels
    specs_q = resolve_modes(opts.mode, opts.op_types) if opts.quantize is Precision.INT8 else []
    quantizable = bool(specs_q) and _has_matmuls(edge_fp32, specs_q[0].op_types)
    if specs_q and not quantizable:
        notes.append(f"edge graph of {config.method.name!r} has no matrix products to quantize; edge.onnx is the "
                     "fp32 graph (the codec carries the int8)")
        log(notes[-1])
    if quantizable and data.held_out is not None:
        result = quantize_edge(edge_fp32, specs_q, data.calib, data.held_out, head, labels, opts.min_agreement, log)
        quant = result.to_dict()
        edge = result.chosen.model
        m = result.chosen
        if not result.passed:
            problems.append(f"int8 edge graph top-1 agreement {m.agreement:.4f} < --min-agreement "
                            f"{opts.min_agreement} after excluding {len(m.spec.exclude)} nodes (see node table)")
        if not m.runtime_int8_ops:
            problems.append(f"edge.onnx ({m.spec.name}) runs no int8 operators in onnxruntime")
        agreement, top1_fp32, top1_int8, n_eval = m.agreement, m.top1_fp32, m.top1_int8, m.n_eval
    elif data.held_out is not None:
        emb = embeddings(cloud_onnx.ort_session(edge_fp32.SerializeToString()), data.held_out)
        top1_fp32 = top1_known(head.logits(emb).argmax(1), labels)
        agreement, top1_int8, n_eval = 1.0, top1_fp32, len(emb)
    else:  # --quantize none and no data the checkpoint did not train on: nothing to score honestly
        agreement, top1_fp32, top1_int8, n_eval = 1.0, None, None, 0

    tflite_bytes, tflite_report = None, None
    if opts.tflite:  # the same fp32 core as int8 LiteRT, gated like edge.onnx (see exporters/tflite.py)
        from mist_kit.exporters.tflite import export_tflite

        one = _OneInput(method)
        (tokens, dim), = method.input_shapes.values()
        tflite_bytes, tflite_report = export_tflite(one, tokens, dim, data.calib, data.held_out, head, labels,
                                                    opts.min_agreement, specs.get(one.name) or {"name": "fp32"}, log)
        problems += tflite_report["problems"]

    for name, codec in codecs.items():  # the seam: codec fragments wrap the validated fp32/int8 cores
        if not codec.lossless:
            cloud = cg.attach_encoder(cloud, codec, features_output=name)
            edge_fp32 = cg.attach_decoder(edge_fp32, codec, features_input=name)
            edge = cg.attach_decoder(edge, codec, features_input=name)

    parity_d = {"cloud_max_abs_err": parity.max_abs_err, "cloud_max_rel_err": parity.max_rel_err,
                "edge_top1_agreement": agreement, "edge_top1_fp32": top1_fp32, "edge_top1_int8": top1_int8,
                "n_eval": n_eval, "eval_data": Path(data.source).name if n_eval else None,
                "n_cloud_images": parity.n_images}
    name = opts.model_name or model_name_for(config)
    art = Artifacts(cloud, edge_fp32, edge, method, tflite_bytes)
    manifest = base_manifest(config, name, plan, codecs, art, quant and _manifest_quant(quant), parity_d)
    chain: dict[str, Any] = {}

    def validate(tmp: Path, final: dict[str, Any]) -> list[str]:
        chain.update(chain_check(tmp, final, cloud_module, method, transforms, pixels))
        return problems + chain["problems"]

    out = Path(out)
    try:
        manifest = write_bundle(out, art, manifest, validate, opts.triton_backend) if not problems else manifest
        ok = not problems
    except ValidationFailed as exc:
        ok, problems = False, exc.problems
    if not ok:
        notes.append(f"validation failed: nothing was written to {out}")
    cloud_info = {"exporter": exporter, "max_abs_err": parity.max_abs_err, "max_rel_err": parity.max_rel_err,
                  "n_images": parity.n_images}
    return ExportReport(ok, str(out), problems, manifest, cloud_info, quant, chain, data.notes,
                        round(time.perf_counter() - t0, 2), tflite_report, notes)


def _manifest_quant(q: dict[str, Any]) -> dict[str, Any]:
    """The manifest keeps the chosen recipe and its proof of int8-ness; the full candidate list stays in the report."""
    c = q["chosen"]
    return {**c["mode"], "int8_ops": c["int8_ops"], "runtime_int8_ops": c["runtime_int8_ops"],
            "agreement": c["agreement"], "embedding_sqnr_db": c["embedding_sqnr_db"],
            "min_agreement": q["min_agreement"], "nodes": c.get("nodes", [])}
