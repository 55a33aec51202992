"""Edge graph speed (issue 14): ms per image at batch 1 and 32, 1 thread, every variant interleaved.

Variants: torch eager (the formula as first written, and the restructured training forward), ORT fp32 of the old
structure (three projections, final norm on every token, onnxruntime's default fusions) and of the new one
(`LaeInference`, SkipLayerNormFusion off), ORT int8 of both (old: every MatMul, the recipes export used to pick;
new: only the nodes `exporters.int8_nodes` selects), and the fp32 floor = MACs / the matmul peak measured with
onnxruntime on the edge network's own shapes. Features are real ViT-S/14 gathers (DINOv2 weights from
../shared/tools/dinov2_small_weights.py) of Caltech-101 images; the LAE is seeded with trained-sized weights
(no trained checkpoint ships here) and its head is a ridge fit on the fp32 embeddings of labelled train images,
so agreement is measured on a head that separates the classes.

    nice -n 10 .venv/bin/python bench/speed_edge.py [--k 4] [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
SHARED = next((p for p in (ROOT.parent / "shared", ROOT.parents[1] / "shared") if p.is_dir()), ROOT.parent / "shared")
DATA = SHARED / "data" / "caltech101-vtab1k"
WEIGHTS = ROOT / "bench" / "work" / "dinov2_vits14.safetensors"


class _Reference(torch.nn.Module):
    """The old structure for export: `reference_embed` (no inference_module, so edge_onnx exports it as is)."""

    def __init__(self, lae: Any) -> None:
        super().__init__()
        self.lae, self.input_shapes = lae, lae.input_shapes

    def embed(self, inputs: Any) -> torch.Tensor:
        from mist_kit.edge.lae import reference_embed

        return reference_embed(self.lae, inputs)


def real_gathers(k: int, lists: list[tuple[str, int]]) -> tuple[dict[str, np.ndarray], Any]:
    """g_k of ViT-S/14 (DINOv2) at 224 px for (split file, count) pairs; returns {split: [N, 257, 384]} and labels."""
    from mist_kit.backbone import create_vit
    from mist_kit.backbone_run import CloudModule
    from mist_kit.data import load_image_list, load_pixels
    from mist_kit.edge.lae import LowRankAttentionEdge
    from mist_kit.runtime.plan import BackboneShape

    vit = create_vit("vit_small_patch14_dinov2", img_size=224, weights=WEIGHTS)
    shape = BackboneShape(384, 257, 1, len(vit.blocks))
    cloud = CloudModule(vit, LowRankAttentionEdge.cloud_plan(shape, k, {})).eval()
    mean, std = vit.pretrained_cfg["mean"], vit.pretrained_cfg["std"]
    feats, labels = {}, {}
    for split, count in lists:
        items = load_image_list(DATA / split)
        paths, ys = list(items.paths)[:count], np.asarray(items.labels[:count])
        out = []
        with torch.no_grad():
            for i in range(0, len(paths), 16):
                px = torch.from_numpy(np.stack([load_pixels(p, 224, mean, std) for p in paths[i:i + 16]]))
                out.append(cloud(px)[0].numpy())
        feats[split], labels[split] = np.concatenate(out).astype(np.float32), ys
    return feats, labels


def trained_like_lae(seed: int = 0) -> Any:
    from mist_kit.edge import create_edge_method
    from mist_kit.runtime.plan import BackboneShape

    torch.manual_seed(seed)
    m = create_edge_method("mist", backbone=BackboneShape(384, 257, 1, 12), depth=4, num_classes=102, params={})
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for b in m.blocks:  # trained LAEs move o off zero; q/k/v keep their init scale
            b.o.weight.copy_(0.02 * torch.randn(b.o.weight.shape, generator=gen))
    return m.eval()


def ridge_head(emb: np.ndarray, y: np.ndarray, classes: int, lam: float = 1.0) -> Any:
    from mist_kit.runtime.bundle import Head

    x = np.concatenate([emb, np.ones((len(emb), 1), np.float32)], 1).astype(np.float64)
    t = np.eye(classes)[y]
    w = np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ t)
    return Head(w[:-1].T.astype(np.float32), w[-1].astype(np.float32), tuple(str(i) for i in range(classes)))


def old_session(model: onnx.ModelProto) -> Any:
    from mist_kit.exporters.onnx_utils import ort_session

    return ort_session(model.SerializeToString())  # what export and the device used: every default fusion


def matmul_peak_gflops(batch: int, rounds: int) -> float:
    """Best GFLOP/s of onnxruntime's MatMul (1 thread) over the edge network's shapes at this batch."""
    from mist_kit.runtime.edge_session import edge_ort_session

    t, d, r = 257, 384, 16
    shapes = [(batch * t, d, 3 * r), (batch * t, r, d), (t, r, t)]
    best = 0.0
    for m, k, n in shapes:
        a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])
        w = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n), dtype=np.float32), "w")
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])
        g = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"])], "mm", [a], [y], [w])
        s = edge_ort_session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString())
        x = {"a": np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)}
        reps = max(1, int(2e6 // (m * k * n / 1e3)))
        s.run(None, x)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(reps):
                s.run(None, x)
            times.append((time.perf_counter() - t0) / reps)
        best = max(best, 2 * m * k * n / float(np.median(times)) / 1e9)
    return best


def interleaved(runners: dict[str, Any], x: np.ndarray, rounds: int, reps: int) -> dict[str, float]:
    """Median ms per image of each runner over `rounds` A,B,C,... rounds of `reps` calls each."""
    for f in runners.values():
        f(x)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for name, f in runners.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                f(x)
            times[name].append((time.perf_counter() - t0) / reps / len(x) * 1000)
    return {k: float(np.median(v)) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--n-fit", type=int, default=240)
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "work" / "speed_edge.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from mist_kit.calibration.modes import resolve_modes
    from mist_kit.exporters.edge_onnx import export_edge
    from mist_kit.exporters.quantize import embeddings, quantize, quantize_edge
    from mist_kit.runtime.edge_session import edge_ort_session, one_row_at_a_time
    from mist_kit.runtime.metrics import agreement

    t0 = time.time()
    feats, labels = real_gathers(args.k, [("train800.txt", args.n_fit), ("val200.txt", args.n_eval)])
    fit, held = feats["train800.txt"], feats["val200.txt"]
    print(f"features: fit {fit.shape}, held-out {held.shape} in {time.time() - t0:.0f} s", flush=True)
    lae = trained_like_lae()
    fit_batches = [{"gather": fit[i:i + 32]} for i in range(0, len(fit), 32)]
    held_batches = [{"gather": held[i:i + 32]} for i in range(0, len(held), 32)]
    new_fp32, old_fp32 = export_edge(lae), export_edge(_Reference(lae))
    fp32_emb = embeddings(edge_ort_session(new_fp32.SerializeToString()), fit_batches)
    head = ridge_head(fp32_emb, labels["train800.txt"], 102)
    ref_held = embeddings(edge_ort_session(new_fp32.SerializeToString()), held_batches)
    top1 = float((head.logits(ref_held).argmax(1) == labels["val200.txt"]).mean())
    print(f"head: ridge on {len(fit)} train embeddings, fp32 val top-1 {top1:.3f}", flush=True)

    # int8: old = every MatMul (as shipped before), new = the selected nodes; both recipes export used to choose
    int8: dict[str, onnx.ModelProto] = {}
    report: dict[str, Any] = {}
    for spec in resolve_modes("dynamic") + resolve_modes("static-qdq-minmax"):
        int8[f"int8 old all-MatMul {spec.name}"] = quantize(old_fp32, spec, fit_batches)
        res = quantize_edge(new_fp32, [spec], fit_batches, held_batches, head, labels["val200.txt"], 0.0,
                            log=lambda _m: None)
        int8[f"int8 new selected {spec.name}"] = res.chosen.model
        report[spec.name] = res.chosen.to_dict()
    dynamic = {k for k in int8 if "dynamic" in k}

    def ort_runner(sess: Any, per_row: bool = False) -> Any:
        def run(x: np.ndarray) -> np.ndarray:
            return sess.run(None, {"gather": x})[0]
        return (lambda x: one_row_at_a_time(lambda f: sess.run(None, f)[0], {"gather": x})) if per_row else run

    runners = {
        "torch eager, formula (old)": lambda x: reference_of(lae, x),
        "torch eager, restructured": lambda x: embed_of(lae, x),
        "ORT fp32 old structure, default fusions": ort_runner(old_session(old_fp32)),
        "ORT fp32 old structure, SkipLayerNorm off": ort_runner(edge_ort_session(old_fp32.SerializeToString())),
        "ORT fp32 new structure": ort_runner(edge_ort_session(new_fp32.SerializeToString())),
    }
    for name, model in int8.items():
        sess = old_session(model) if " old " in name else edge_ort_session(model.SerializeToString())
        runners[f"ORT {name}"] = ort_runner(sess, per_row=name in dynamic)
    agree = {}
    for name, model in int8.items():
        sess = edge_ort_session(model.SerializeToString())
        emb = embeddings(sess, held_batches, per_row=name in dynamic)
        agree[f"ORT {name}"] = agreement(head.logits(emb).argmax(1), head.logits(ref_held).argmax(1))

    macs = lae.macs_per_image() - 384 * 102
    macs_old = 4 * (3 * 257 * 384 * 16 + 2 * 257 * 257 * 16 + 257 * 16 * 384)
    results: dict[str, Any] = {"load": os.getloadavg(), "macs_new": macs, "macs_old": macs_old, "top1_fp32": top1,
                               "agreement": agree, "quant_report": report, "batches": {}}
    for batch in (1, 32):
        x = held[:batch]
        peak = matmul_peak_gflops(batch, 7)
        ms = interleaved(runners, x, args.rounds, reps=10 if batch == 1 else 1)
        floor = 2 * macs / (peak * 1e9) * 1000
        results["batches"][batch] = {"matmul_peak_gflops": peak, "floor_ms": floor, "ms_per_image": ms}
        print(f"\nbatch {batch}: matmul peak {peak:.0f} GFLOP/s -> fp32 floor {floor:.3f} ms/image "
              f"({macs / 1e6:.1f} M MACs; old structure {macs_old / 1e6:.1f} M)", flush=True)
        eager = ms["torch eager, formula (old)"]
        for name, v in ms.items():
            a = f", agreement {agree[name]:.4f}" if name in agree else ""
            print(f"  {name:55s} {v:7.3f} ms  {v / floor:5.2f}x floor  {eager / v:5.2f}x faster than eager{a}")
    results["load_after"] = os.getloadavg()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(f"\nload avg before {results['load']}, after {results['load_after']}; wrote {args.json}")


def reference_of(lae: Any, x: np.ndarray) -> np.ndarray:
    from mist_kit.edge.lae import reference_embed

    with torch.no_grad():
        return reference_embed(lae, {"gather": torch.from_numpy(x)}).numpy()


def embed_of(lae: Any, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return lae.embed({"gather": torch.from_numpy(x)}).numpy()


if __name__ == "__main__":
    main()
