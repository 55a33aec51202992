"""`mist-kit export`: checkpoint -> split bundle (cloud.onnx, int8 edge.onnx, head, deploy/, manifest).

Thin by design: parse options into `ExportOptions`, call `export_bundle`, render its report, exit 1 when the
export failed its own validation (nothing was written then). Torch and onnx are imported inside the command only.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from mist_kit.cli.common import Quiet, cli_errors, console, logger, print_json
from mist_kit.errors import UsageError


class QuantizeChoice(str, Enum):
    int8 = "int8"
    none = "none"


def register(app: typer.Typer) -> None:
    app.command("export")(export)


@cli_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory (or a train --out directory)")],
    out: Annotated[Path, typer.Option("--out", help="Bundle directory to write (replaced whole on success)")],
    split: Annotated[bool, typer.Option("--split/--no-split", help="Split cloud/edge export (the only layout)")]
    = True,
    quantize: Annotated[QuantizeChoice, typer.Option(help="Edge graph precision")] = QuantizeChoice.int8,
    calib: Annotated[str | None, typer.Option(help="Calibration images (ImageFolder or list file) instead of "
                                                   "the checkpoint's feature cache")] = None,
    eval_data: Annotated[str | None, typer.Option("--eval", help="Held-out images for the int8 agreement check "
                                                               "(default: the val split unless the checkpoint "
                                                               "was refit on it; labels optional)")] = None,
    min_agreement: Annotated[float, typer.Option(help="Minimum int8 vs fp32 top-1 agreement on held-out data")]
    = 0.99,
    mode: Annotated[str, typer.Option(help="int8 recipe: auto (measure and pick), dynamic, dynamic-per-channel, "
                                           "static-qdq, static-qdq-minmax, static-qdq-entropy, static-qoperator")]
    = "auto",
    op_types: Annotated[str | None, typer.Option(help="Op types to quantize, comma-separated (default "
                                                      "MatMul,Gemm)")] = None,
    n_calib: Annotated[int, typer.Option(help="Calibration samples")] = 256,
    n_eval: Annotated[int, typer.Option(help="Held-out samples for the agreement check")] = 1000,
    tflite: Annotated[bool, typer.Option("--tflite", help="Also write edge.tflite (int8, LiteRT extra)")] = False,
    codec: Annotated[str | None, typer.Option(help="Feature codec (default: the checkpoint's; int8-channel "
                                                     "for an fp32-trained one; fp32 for none)")] = None,
    model_name: Annotated[str | None, typer.Option(help="Served name of the cloud model")] = None,
    weights: Annotated[Path | None, typer.Option(help="Backbone weights if moved since training")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Feature cache root (default: the training one)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object")] = False,
    sign: Annotated[Path | None, typer.Option("--sign", help="Sign the bundle with this ed25519 private key "
                                              "(`mist-kit keygen`)")] = None,
    triton_backend: Annotated[str, typer.Option(help="Backend named in deploy/triton config.pbtxt: onnxruntime, "
                                                     "openvino or openvino-bf16 (same model.onnx)")]
    = "onnxruntime",
    quiet: Quiet = False,
) -> None:
    """Export a checkpoint as a validated split bundle; exits 1 if validation fails (nothing written then)."""
    if not split:
        raise UsageError("--no-split: only the split cloud/edge export exists; drop the flag")
    if sign is not None:  # a bad key fails before minutes of export work
        from mist_kit.runtime.signing import check_private_key

        check_private_key(sign)
    from mist_kit.calibration.modes import Precision
    from mist_kit.exporters.export import ExportOptions, export_bundle

    ops = tuple(x.strip() for x in op_types.split(",") if x.strip()) if op_types else None
    opts = ExportOptions(quantize=Precision(quantize.value), mode=mode, op_types=ops, min_agreement=min_agreement,
                         calib=calib, eval_data=eval_data, n_calib=n_calib, n_eval=n_eval, tflite=tflite, codec=codec,
                         model_name=model_name, weights=str(weights) if weights else None, cache_dir=cache_dir,
                         triton_backend=triton_backend)
    report = export_bundle(checkpoint, out, opts, log=logger(quiet))
    if sign is not None and report.ok:
        from mist_kit.runtime.signing import sign_bundle

        key = sign_bundle(out, sign)
        logger(quiet)(f"signed {out / 'manifest.json'} with key {key} (manifest.sig)")
    if json_out:
        print_json(report.to_dict())
    else:
        _render(report.to_dict())
    if not report.ok:
        if not json_out:
            typer.echo(f"error: export failed validation ({len(report.problems)} problem(s)); nothing was written to "
                       f"{out}", err=True)
        raise typer.Exit(1)


def _render(r: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    q = r["quantization"]
    if q:
        t = Table(title="int8 recipes measured on held-out real features")
        for col in ("recipe", "excluded", "agreement", "top-1 int8", "SQNR dB", "ms/image", "int8 ops (runtime)"):
            t.add_column(col)
        for c in q["candidates"]:
            top1 = f"{c['top1_int8']:.4f}" if c["top1_int8"] is not None else "-"
            t.add_row(c["mode"]["name"], str(len(c["mode"]["excluded_nodes"])), f"{c['agreement']:.4f}", top1,
                      f"{c['embedding_sqnr_db']:.1f}", f"{c['latency_ms_per_image']:.3f}",
                      ", ".join(f"{k}x{v}" for k, v in c["runtime_int8_ops"].items()))
        console.print(t)
        if q["node_errors"] and (not q["passed"] or q["chosen"]["mode"]["excluded_nodes"]):
            nt = Table(title="per-node SQNR (worst loss first)")
            for col in ("node", "op", "SQNR dB", "input SQNR dB", "loss dB", "int8"):
                nt.add_column(col)
            for n in q["node_errors"][:12]:
                nt.add_row(escape(n["node"]), n["op_type"], f"{n['sqnr_db']:.1f}", f"{n['input_sqnr_db']:.1f}",
                           f"{n['drop_db']:.1f}", "yes" if n["quantized"] else "no (fp32)")
            console.print(nt)
    p = r["manifest"].get("parity", {})
    summary = Table(title="mist-kit export")
    summary.add_column("check")
    summary.add_column("result")
    summary.add_row("cloud graph", f"{r['cloud']['exporter']} exporter; max abs err {r['cloud']['max_abs_err']:.3g}, "
                    f"max rel err {r['cloud']['max_rel_err']:.3g} on {r['cloud']['n_images']} real images")
    if p:
        f32, i8 = p.get("edge_top1_fp32"), p.get("edge_top1_int8")
        acc = f"; top-1 fp32 {f32:.4f} / edge.onnx {i8:.4f}" if f32 is not None and i8 is not None else ""
        summary.add_row("edge graph", f"agreement {p['edge_top1_agreement']:.4f} on {p['n_eval']} held-out{acc}")
    if r["chain"]:
        summary.add_row("bundle chain", f"fp32 top-1 match {r['chain']['fp32_top1_match']:.3f}, int8 "
                        f"{r['chain']['int8_top1_match']:.3f} on {r['chain']['n_images']} images")
    if r.get("tflite"):
        summary.add_row("edge.tflite", escape(str({k: v for k, v in r["tflite"].items() if k != "problems"})))
    for prob in r["problems"]:
        summary.add_row("[red]problem[/red]", escape(prob))
    summary.add_row("bundle", escape(r["bundle"]) if r["ok"] else "(not written)")
    console.print(summary)
