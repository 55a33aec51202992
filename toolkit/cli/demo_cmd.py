"""`mist-kit demo`: the whole pipeline, offline, on bundled data with a small seeded random-init ViT.

cache -> train (k auto) -> evaluate -> export (cloud.onnx + int8 edge.onnx) -> extract (cloud graph over the test
images) -> codec table -> run-edge as an rpi4 -> finetune-edge -> the served path (KServe v2 on loopback) -> a small
`compare` (linear and mist x fp32 and int8-channel, for an rpi4, from the same cache).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mist_kit.cli.common import cli_errors, console

DEMO_BACKBONE = "test_vit"  # timm's tiny registered ViT: width 64, 6 blocks
DEMO_IMG_SIZE = 64
DEMO_CODECS = ("fp32", "fp16", "int8-channel", "int4-channel", "pool2-int4")
# Sized to finish in about a minute on a busy 2-core machine while going through every stage: two k candidates
# (still a k search), 12 epochs (val top-1 has levelled off by then on digits), one torch thread (see `demo`).
DEMO_KS = (3, 6)
DEMO_EPOCHS = 12
# The compare stage: two methods x two codecs, mist at the k the train stage chose (no second search).
DEMO_COMPARE_METHODS = ("linear", "mist")
DEMO_COMPARE_CODECS = ("fp32", "int8-channel")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


def _say(msg: str) -> None:
    console.print(msg, highlight=False, markup=False)


def _stage(t_start: float, msg: str) -> None:
    """A stage header with the time since the demo started (where a slow machine spends it is visible)."""
    import time

    _say(f"\n{msg}  (+{time.perf_counter() - t_start:.0f} s)")


def _codec_table(rows: list[dict[str, Any]], jpeg: float | None) -> Table:
    table = Table(title="codec table (val split; pooled codecs retrained from the cache)")
    for col in ("codec", "bytes/img", "vs fp32", "SNR dB", "top-1", "Δ top-1", "agreement"):
        table.add_column(col)
    for r in rows:
        pct = (lambda v: "-" if v is None else f"{v:.3f}")  # noqa: E731
        delta = r.get("top1_delta")
        table.add_row(str(r["codec"]) + (" (retrained)" if r.get("retrained") else ""), f"{r['bytes_per_image']:,}",
                      f"1/{r['ratio_vs_fp32']:.1f}" if r.get("ratio_vs_fp32") else "-",
                      "-" if r.get("snr_db") is None else f"{r['snr_db']:.1f}", pct(r.get("top1")),
                      "-" if delta is None else f"{delta * 100:+.2f} pt", pct(r.get("agreement")))
    if jpeg:
        table.caption = f"the input image as JPEG q90 at {DEMO_IMG_SIZE}px: {jpeg:,.0f} bytes"
    return table


@cli_errors
def demo(
    out: Annotated[Path, typer.Option(help="Working directory for data, checkpoint, bundle")] = Path("demo-out"),
    epochs: Annotated[int, typer.Option(help="Maximum training epochs")] = DEMO_EPOCHS,
    serve: Annotated[bool, typer.Option(help="Also run the served path (KServe v2 on loopback)")] = True,
    compare: Annotated[bool, typer.Option(help="Also run a small `compare` (linear, mist x fp32, int8-channel)")]
    = True,
) -> None:
    """Run the whole pipeline on scikit-learn's digits with a random-init tiny ViT, then print a summary."""
    import time

    import torch

    # The demo's networks are tiny (width 64): one thread does each op in microseconds, and on a loaded 2-core
    # machine two OpenMP threads wait on each other at every op: measured 3-4 s/epoch with 1 thread against
    # 18-48 s/epoch with 2 (load average 10-15), the main reason the train step took 727 s.
    torch.set_num_threads(1)
    from mist_kit.backbone import save_random_backbone
    from mist_kit.codec_bench import bench_codecs
    from mist_kit.demo_data import write_digits
    from mist_kit.errors import ExportError
    from mist_kit.exporters.export import export_bundle
    from mist_kit.pipeline import TrainRequest, run_evaluation, run_training
    from mist_kit.runtime.codec.extract import extract
    from mist_kit.runtime.edge_run import finetune_edge, run_edge
    from mist_kit.train import TrainParams

    _say(f"mist-kit demo: backbone {DEMO_BACKBONE} with RANDOM-INIT weights (seed 0), not pretrained: the numbers "
         "show the pipeline works, not what a pretrained ViT reaches.")
    t_start = time.perf_counter()
    lists = write_digits(out / "data")
    weights = out / "backbone.safetensors"
    if not weights.exists():
        save_random_backbone(DEMO_BACKBONE, weights, img_size=DEMO_IMG_SIZE, seed=0)

    _stage(t_start, "[1/8] cache features + train (k chosen on val)")
    req = TrainRequest(backbone=DEMO_BACKBONE, weights=str(weights), img_size=DEMO_IMG_SIZE,
                       train=str(lists["train"]), val=str(lists["val"]), test=str(lists["test"]),
                       out=out / "train", ks=DEMO_KS,
                       # the demo's own short schedule (no 500-step floor), and no refit: val stays held out for
                       # the export's int8 gate and the device fine-tune below. It shows the pipeline, in seconds
                       params=TrainParams(epochs=epochs, lr=3e-3, batch_size=32, patience=6, min_steps=0),
                       refit=False)
    report = run_training(req, log=_say)
    ckpt = report["checkpoint"]
    ev = run_evaluation(ckpt, str(lists["test"]), log=_say, progress=False)

    _stage(t_start, "[2/8] export: cloud.onnx + int8 edge.onnx + head, validated")
    bundle = out / "bundle"
    exp = export_bundle(ckpt, bundle, log=_say)
    if not exp.ok:
        raise ExportError("demo export failed validation: " + "; ".join(exp.problems))
    parity = exp.manifest["parity"]

    _stage(t_start, "[3/8] extract: run cloud.onnx over the val and test images")
    val_feats, test_feats = out / "val.features.safetensors", out / "test.features.safetensors"
    extract(bundle, str(lists["val"]), val_feats, 64)
    ext = extract(bundle, str(lists["test"]), test_feats, 64)

    _stage(t_start, "[4/8] codec bench (val split)")
    codecs = bench_codecs(list(DEMO_CODECS), checkpoint=ckpt, data=str(lists["val"]), log=_say)

    _stage(t_start, "[5/8] run-edge --device rpi4 on the test features")
    edge = run_edge(bundle, test_feats, device="rpi4", batch=32)

    _stage(t_start, "[6/8] finetune-edge --device rpi4: retrain the head on the val features, measured on test")
    state_dir = out / "device-heads"
    shutil.rmtree(state_dir, ignore_errors=True)  # each demo run starts from the bundle's head
    ft = finetune_edge(bundle, val_feats, device="rpi4", eval_features=test_feats, state_dir=state_dir)

    served = None
    if serve:
        _stage(t_start, "[7/8] serve-cloud on loopback + the edge client (KServe v2, binary tensors)")
        from mist_kit.data import load_image_list
        from mist_kit.runtime.v2_server import serve_roundtrip

        _, served = serve_roundtrip(bundle, list(load_image_list(str(lists["test"])).paths[:16]), batch=8)

    compared = None
    if compare:
        _stage(t_start, "[8/8] compare: linear and mist x fp32 and int8-channel for an rpi4 (same cache)")
        from mist_kit.cli.compare_cmd import render
        from mist_kit.compare import CompareRequest, run_compare

        creq = CompareRequest(backbone=DEMO_BACKBONE, weights=str(weights), img_size=DEMO_IMG_SIZE,
                              train=str(lists["train"]), val=str(lists["val"]), test=str(lists["test"]),
                              out=out / "compare", methods=DEMO_COMPARE_METHODS, codecs=DEMO_COMPARE_CODECS,
                              device="rpi4", epochs=epochs, cache_dir=out / "train" / "cache",
                              depths={"mist": int(report["k"])}, progress=False)
        compared = run_compare(creq, log=_say)

    console.print(_codec_table(codecs.rows, codecs.jpeg_q90_bytes))
    if compared is not None:
        console.print(render(compared))
    total_s = time.perf_counter() - t_start
    table = Table(title="mist-kit demo summary")
    table.add_column("step")
    table.add_column("result")
    search = ", ".join(f"k={k}: {v['val_top1']:.3f}" for k, v in report["k_search"].items())
    table.add_row("feature cache", f"{sum(report['images'].values())} images in {report['cache_seconds']:.1f} s")
    table.add_row("k search (val top-1)", f"{search}; chosen k={report['k']}")
    table.add_row("train", f"{report['train_seconds']:.1f} s, {report['trainable_params']:,} trainable params")
    table.add_row("test top-1 (torch checkpoint)", f"{ev['top1']:.4f}")
    table.add_row("export parity", f"cloud max abs err {parity['cloud_max_abs_err']:.2e}; int8 vs fp32 agreement "
                  f"{parity['edge_top1_agreement']:.4f} (fp32 {parity['edge_top1_fp32']:.4f}, int8 "
                  f"{parity['edge_top1_int8']:.4f})")
    table.add_row("extract", f"{ext['images']} images, {ext['bytes_per_image']:,} bytes/image ({ext['codec']})")
    table.add_row("run-edge rpi4 (int8)", f"test top-1 {edge.get('top1', float('nan')):.4f}, p50 "
                  f"{edge['latency_ms_p50']:.2f} ms/batch of 32, {edge['images_per_s']:.0f} images/s")
    table.add_row("finetune-edge rpi4", f"test top-1 {ft['eval_top1_before']:.4f} -> {ft['eval_top1_after']:.4f}, "
                  f"head v{ft['head_version']} in {ft['state_dir']}")
    if served is not None:
        table.add_row("served path (loopback)", f"{served['images']} JPEG/PNG -> {served['model']}: max abs diff vs "
                      f"in-process {served['max_abs_diff_vs_in_process']:.1e}, {served['seconds']:.2f} s")
    if compared is not None and compared.best is not None:
        b = compared.best
        table.add_row("compare (rpi4, chosen on val)", f"{b['method']} with {b['codec']}: val top-1 "
                      f"{b['val_top1']:.3f}, {b['bytes_per_image']:,} B/image; table above, rows in {out / 'compare'}")
    table.add_row("bundle", str(bundle))
    table.add_row("wall time", f"{total_s:.0f} s for the whole demo (data, every stage, summary)")
    console.print(table)
