"""Cloud engine speed and parity (issue 14, item 3): the MIST cloud graph on every engine, interleaved.

DINOv2 ViT-S/14 at 224 px, MIST's plan at k = 12 (the gather of blocks 0..12), batch 16, 2 threads. Engines:
torch fp32 eager and torch bf16 autocast (`run_backbone`, what cache filling ran before), onnxruntime fp32 and
OpenVINO fp32 / bf16, both on the exporter's own cloud.onnx (`runtime.cloud_engine.open_cloud_session`, what
`serve-cloud --engine` runs). One call per engine per round, rounds A,B,C,D,E,A,B,...; medians.

Parity, per engine, against torch fp32 on the 200 Caltech-101 val images: relative gather error
||g - g_ref|| / ||g_ref|| over all of them, and top-1 agreement of a trained MIST k = 12 edge network (a checkpoint
given with --checkpoint) fed both feature sets rounded to float16 as the cache stores them.

    nice -n 10 .venv/bin/python bench/cloud_engines.py --checkpoint CKPT [--rounds 7] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
SHARED = next((p for p in (ROOT.parent / "shared", ROOT.parents[1] / "shared") if p.is_dir()), ROOT.parent / "shared")
DATA = SHARED / "data" / "caltech101-vtab1k"
WEIGHTS = ROOT / "bench" / "work" / "dinov2_vits14.safetensors"
BATCH = 16
THREADS = 2


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _engines(model: Any, plan: Any, onnx_path: Path) -> dict[str, Any]:
    """name -> (pixels float32 [B,3,H,W] -> {source: float32 array}) for every engine measured."""
    from mist_kit.backbone_run import run_backbone
    from mist_kit.runtime.cloud_engine import open_cloud_session

    sources = sorted(plan.sources, key=str)
    names = list(plan.names)
    by_name = {t.name: str(t.source) for t in plan.tensors}

    def torch_engine(precision: str) -> Any:
        def run(px: np.ndarray) -> dict[str, np.ndarray]:
            with torch.no_grad():
                return {k: v.numpy() for k, v in run_backbone(model, torch.from_numpy(px), sources, precision).items()}
        return run

    def onnx_engine(engine: str, precision: str) -> tuple[Any, Any]:
        session, info = open_cloud_session(onnx_path, THREADS, engine, precision)

        def run(px: np.ndarray) -> dict[str, np.ndarray]:
            values = session.run(names, {"pixel_values": px})
            return {by_name[n]: v for n, v in zip(names, values, strict=True)}
        return run, info

    out = {"torch fp32 eager": (torch_engine("fp32"), {"engine": "torch", "version": torch.__version__}),
           "torch bf16 autocast": (torch_engine("bf16"), {"engine": "torch", "version": torch.__version__})}
    for engine, precision in (("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")):
        run, info = onnx_engine(engine, precision)
        out[f"{engine} {precision}"] = (run, info.as_dict())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="trained MIST k=12 checkpoint (DINOv2 ViT-S/14)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n-parity", type=int, default=200)
    ap.add_argument("--write", action="store_true", help="write the BENCHMARKS.md section")
    args = ap.parse_args()
    if not WEIGHTS.is_file() or not DATA.is_dir():
        raise SystemExit(f"error: needs {WEIGHTS} and {DATA}")
    torch.set_num_threads(THREADS)
    from mist_kit.backbone import load_backbone
    from mist_kit.backbone_run import CloudModule
    from mist_kit.calibration.features import plan_of
    from mist_kit.checkpoint import load_checkpoint
    from mist_kit.cloud_engines import relative_error
    from mist_kit.data import load_image_list, load_pixels
    from mist_kit.exporters.cloud_onnx import export_cloud
    from mist_kit.runtime.cloud_engine import cpu_bf16_supported, openvino_core
    from mist_kit.train import predict_logits

    load_start = _load()
    config, edge = load_checkpoint(args.checkpoint)
    if config.method.name != "mist" or config.codecs:
        raise SystemExit("error: --checkpoint must be an fp32-codec MIST checkpoint")
    plan = plan_of(config)
    model, spec = load_backbone(config.backbone.name, img_size=config.backbone.img_size, weights=WEIGHTS)
    model.eval()
    if spec.weights_sha256 != config.backbone.weights_sha256:
        raise SystemExit("error: checkpoint was trained on other backbone weights")
    work = Path(tempfile.mkdtemp(prefix="cloud-engines-"))
    onnx_model, exporter = export_cloud(CloudModule(model, plan), spec.img_size)
    import onnx

    onnx.save(onnx_model, str(work / "cloud.onnx"))
    engines = _engines(model, plan, work / "cloud.onnx")

    images = load_image_list(str(DATA / "val200.txt"))
    n = min(args.n_parity, len(images))
    pixels = np.stack([load_pixels(images.paths[i], spec.img_size, spec.mean, spec.std) for i in range(n)])
    labels = np.asarray(images.labels)[:n]

    # --- speed: interleaved rounds on one real batch --------------------------------------------------------
    batch = np.ascontiguousarray(pixels[:BATCH])
    for run, _ in engines.values():
        run(batch)  # warm-up (compilation, arenas)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, (run, _info) in engines.items():
            t = time.perf_counter()
            run(batch)
            times[name].append(time.perf_counter() - t)

    # --- parity on the val images ----------------------------------------------------------------------------
    src = str(plan.tensors[0].source)
    feats = {name: np.concatenate([run(np.ascontiguousarray(pixels[i:i + BATCH]))[src]
                                   for i in range(0, n, BATCH)]) for name, (run, _) in engines.items()}
    ref = feats["torch fp32 eager"]

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.argmax(predict_logits(edge, {plan.tensors[0].name: x.astype(np.float16)}), axis=1)

    ref_pred = predict(ref)
    base = statistics.median(times["torch fp32 eager"])
    rows = []
    for name, (_run, info) in engines.items():
        med = statistics.median(times[name])
        pred = predict(feats[name])
        rows.append({"engine": name, "version": info.get("version"), "images_per_s": round(BATCH / med, 2),
                     "ms_per_batch": round(med * 1e3, 1), "speedup_vs_torch_fp32": round(base / med, 2),
                     "rel_gather_err": float(f"{relative_error(ref, feats[name]):.3g}"),
                     "edge_top1_agreement": round(float(np.mean(pred == ref_pred)), 4),
                     "edge_top1": round(float(np.mean(pred == labels)), 4)})
    core = openvino_core()
    result = {"rows": rows, "batch": BATCH, "threads": THREADS, "rounds": args.rounds, "n_parity": n,
              "k": config.method.k, "exporter": exporter, "checkpoint_val_top1": config.metrics.get("val_top1"),
              "cpu": core.get_property("CPU", "FULL_DEVICE_NAME"), "bf16": cpu_bf16_supported(core),
              "load_start": load_start, "load_end": _load(), "cores": os.cpu_count()}
    print(json.dumps(result, indent=1))
    if args.write:
        _write(result, args)


def _write(res: dict[str, Any], args: argparse.Namespace) -> None:
    from _report import markdown_table, update_section

    goal = next(r for r in res["rows"] if r["engine"] == "openvino bf16")
    met = (goal["speedup_vs_torch_fp32"] >= 5 and goal["rel_gather_err"] <= 0.01
           and goal["edge_top1_agreement"] >= 0.995)
    table = markdown_table(
        ["engine", "images/s", "ms / batch 16", "x torch fp32", "rel. gather error", "edge top-1 agreement",
         "edge top-1 (val)"],
        [[r["engine"] + (f" {r['version'].split('-')[0]}" if r["version"] else ""), r["images_per_s"],
          r["ms_per_batch"], r["speedup_vs_torch_fp32"], r["rel_gather_err"], r["edge_top1_agreement"], r["edge_top1"]]
         for r in res["rows"]])
    body = (f"DINOv2 ViT-S/14 at 224 px, MIST cloud plan at k = {res['k']} (gather of blocks 0..12), batch "
            f"{res['batch']}, {res['threads']} threads, {res['rounds']} interleaved rounds (one call per engine per "
            f"round), medians. CPU: {res['cpu']} (OpenVINO reports native bf16: {res['bf16']}). Load average "
            f"{res['load_start']} at start, {res['load_end']} at end (shared machine: ratios only).\n\n{table}\n\n"
            f"Parity is against torch fp32 eager on the {res['n_parity']} Caltech-101 val images: relative gather "
            "error ||g - g_ref|| / ||g_ref|| over all of them, and top-1 agreement of a trained MIST k = 12 edge "
            "network fed both feature sets (rounded to float16, as the cache stores them). That edge network is a "
            f"short training run (val top-1 {res['checkpoint_val_top1']}), not a converged one: its low-margin "
            f"argmaxes flip more easily than a converged model's would; with {res['n_parity']} images one "
            f"disagreement is {100 / res['n_parity']:.1f}%. onnxruntime and OpenVINO run the exporter's "
            f"cloud.onnx ({res['exporter']}); `serve-cloud --engine openvino --precision bf16` runs exactly that, "
            "and `train --backbone-engine openvino` runs the same backbone converted from torch.\n\n"
            f"Goal (issue 14): cloud >= 5x torch fp32 eager at <= 1% relative gather error and >= 99.5% edge "
            f"agreement: **{'met' if met else 'not met'}** by OpenVINO bf16 here ({goal['speedup_vs_torch_fp32']}x, "
            f"{goal['rel_gather_err']}, {goal['edge_top1_agreement']}).")
    update_section("cloud-engines", "Cloud engines: torch, onnxruntime, OpenVINO fp32/bf16 (issue 14)", body,
                   f"nice -n 10 .venv/bin/python bench/cloud_engines.py --checkpoint CKPT --rounds {args.rounds} "
                   "--write")


if __name__ == "__main__":
    main()
