"""Export benchmark on the real Caltech-101 MIST model: edge fp32 vs int8 recipes (ORT; TFLite when built).

For every recipe: file size, test top-1, argmax agreement with fp32, and per-image latency at batch 1 with one
thread. The int8 graphs are built by the same code `mist-kit export` uses (calibrated on cached train gathers),
and the test split's gathers come from the feature cache (computed once if missing). Writes the `export`
section of BENCHMARKS.md.

    python bench/export_caltech.py [--work bench/work/caltech] [--test /work/shared/data/caltech101-vtab1k/test.txt]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def _test_features(config, test_list: str, cache_root: Path, test_cache: Path | None):
    """The test split's g_k from the cache (computed with the frozen backbone if absent) and its labels."""
    import json

    from mist_kit.cache import CachedSplit
    from mist_kit.calibration.features import find_cached_split

    if test_cache is not None:  # a cache written by another bench (e.g. a bf16-backbone test subset)
        meta = json.loads((test_cache / "meta.json").read_text())
        b = meta["binding"]
        if b["weights_sha256"] != config.backbone.weights_sha256 or config.method.k not in b["ks"]:
            raise SystemExit(f"error: {test_cache}: cache is for other backbone weights or lacks k={config.method.k}")
        split = CachedSplit(test_cache, meta)
        rows = split.valid()
        return split.gather(config.method.k), rows, np.asarray(split.labels())[rows]
    split = find_cached_split(config, test_list, config.method.k, cache_root)
    if split is None:
        from mist_kit.backbone import load_backbone_for
        from mist_kit.data import load_image_list
        from mist_kit.featurize import cache_features

        print(f"computing test gathers for {test_list} (cached for next time)", flush=True)
        split, _, _ = cache_features(load_backbone_for(config.backbone), config.backbone,
                                     load_image_list(test_list), cache_root, (config.method.k,), progress=False)
    rows = split.valid()
    return split.gather(config.method.k), rows, np.asarray(split.labels())[rows]


def _latency_ms(session, x: np.ndarray, repeats: int) -> float:
    name = session.get_inputs()[0].name
    for _ in range(5):
        session.run(None, {name: x[:1]})
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        session.run(None, {name: x[i % len(x): i % len(x) + 1]})
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "caltech")
    ap.add_argument("--test", default="/work/shared/data/caltech101-vtab1k/test.txt")
    ap.add_argument("--test-cache", type=Path, default=None, help="use this feature-cache directory as the test set")
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--full", action="store_true", help="run the whole `export_bundle` (cloud graph too)")
    args = ap.parse_args()
    if not (args.work / "READY").exists():
        print(f"error: {args.work / 'READY'} missing: the Caltech-101 MIST checkpoint is not trained yet",
              file=sys.stderr)
        return 2
    import onnx
    from _report import markdown_table, update_section

    from mist_kit.calibration.modes import resolve_modes
    from mist_kit.checkpoint import load_checkpoint
    from mist_kit.exporters.cloud_onnx import ort_session
    from mist_kit.exporters.export import ExportOptions, export_bundle
    from mist_kit.exporters.quantize import Head, embeddings, quantize

    ckpt = args.work / "mist" / "checkpoint"
    bundle = args.work / "bundle"
    config, method = load_checkpoint(ckpt)
    cache_root = Path(config.training.get("cache_dir") or args.work / "cache")
    head = Head(method.head.weight.detach().numpy(), method.head.bias.detach().numpy())
    from mist_kit.calibration.features import from_cache
    from mist_kit.calibration.reader import ArrayBatches

    data = from_cache(config, config.method.k, 256, 1000, np.random.default_rng(0), None, cache_root)
    if args.full:
        report = export_bundle(ckpt, bundle, ExportOptions(), log=lambda m: print(m, flush=True))
        if not report.ok:
            print("error: export failed validation: " + "; ".join(report.problems), file=sys.stderr)
            return 1
        fp32 = onnx.load(str(bundle / "edge.fp32.onnx"))
        shipped = onnx.load(str(bundle / "edge.onnx"))
        q = report.quantization
        p = report.manifest["parity"]
        held = f"cloud.onnx vs torch max abs err {p['cloud_max_abs_err']:.3g}; "
    else:  # the edge half of `export_bundle`, same library calls (the cloud graph is not needed for this table)
        from mist_kit.exporters.edge_onnx import export_edge
        from mist_kit.exporters.quantize import quantize_edge

        b = config.backbone
        fp32 = export_edge(method, b.num_tokens, b.embed_dim)
        res = quantize_edge(fp32, resolve_modes("auto"), data.calib, data.held_out, head,  # type: ignore[union-attr]
                            data.held_out_labels, 0.99, log=lambda m: print(m, flush=True))  # type: ignore[union-attr]
        shipped, q, held = res.chosen.model, res.to_dict(), ""
    feats, rows, labels = _test_features(config, args.test, cache_root, args.test_cache)
    test_batches = ArrayBatches(feats, rows, batch_size=64)
    chosen = q["chosen"]  # type: ignore[index]
    variants: list[tuple[str, onnx.ModelProto]] = [("fp32 (edge.fp32.onnx)", fp32)]
    for spec in resolve_modes("auto"):
        variants.append((f"int8 {spec.name}", quantize(fp32, spec, data.calib)))  # type: ignore[union-attr]
    variants.append((f"int8 chosen by `--mode auto` ({chosen['mode']['name']}, "
                     f"{len(chosen['mode']['excluded_nodes'])} nodes kept fp32)", shipped))
    sample = np.asarray(feats[rows[:64]], dtype=np.float32)
    ref_pred = None
    table = []
    for name, model in variants:
        blob = model.SerializeToString()
        session = ort_session(blob, threads=1)
        pred = head.logits(embeddings(session, test_batches)).argmax(1)
        ref_pred = pred if ref_pred is None else ref_pred
        lat = _latency_ms(session, sample, args.repeats)
        table.append([name, f"{len(blob) / 1024:.0f} KiB", f"{100 * (pred == labels).mean():.2f}",
                      f"{100 * (pred == ref_pred).mean():.2f}%", f"{lat:.3f}"])
        print(table[-1], flush=True)
    body = (f"Real Caltech-101 (VTAB-1k) MIST checkpoint: {config.backbone.name}, k={config.method.k}, "
            f"{len(labels)} test images ({args.test_cache or args.test}); edge graphs run in onnxruntime "
            f"{__import__('onnxruntime').__version__} on CPU, batch 1, one intra-op thread, median of "
            f"{args.repeats} runs. Agreement = argmax agreement with the fp32 edge graph on the test set.\n\n"
            + markdown_table(["edge graph", "file", "test top-1 %", "agreement", "ms / image"], table)
            + f"\n\nExport-time validation ({', '.join(data.notes)}): {held}chosen int8 graph agreement "  # type: ignore
            f"{chosen['agreement']:.4f} on {chosen['n_eval']} held-out gathers (gate: 0.99). "
            "TFLite: not built (`--tflite` fails with a one-line error; see README, export section).\n")
    cmd = "python bench/export_caltech.py" + (f" --test-cache {args.test_cache}" if args.test_cache else "")
    update_section("export", "Export: edge fp32 vs int8 (Caltech-101 MIST)", body, cmd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
