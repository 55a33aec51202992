"""Export benchmark on the real Caltech-101 MIST model: edge fp32 vs int8 recipes in onnxruntime.

For every recipe: file size, test top-1, argmax agreement with fp32, and per-image latency at batch 1 with one
thread. The int8 graphs are built by the same code `mist-kit export` uses (calibrated on cached train gathers);
the int8 gate is scored on one half of the test split and every reported number on the other half. The test
split's gathers come from the feature cache (computed once if missing). Writes the `export` section of
BENCHMARKS.md.

    python bench/export_caltech.py [--work bench/work/caltech] [--test-cache DIR | --test LIST]
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
    """The test split's cached tensor (computed with the frozen backbone if absent), its valid rows and labels."""
    from _caltech import bound_test_cache, plan_of, split_array

    from mist_kit.calibration.features import find_cached_split

    if test_cache is not None:  # a cache written by another bench (e.g. a bf16-backbone test subset)
        split = bound_test_cache(config, test_cache)
        rows = split.valid()
        return split_array(split, config), rows, np.asarray(split.labels())[rows]
    plan = plan_of(config)
    split = find_cached_split(config, test_list, plan, cache_root)
    if split is None:
        from mist_kit.backbone import load_backbone_for
        from mist_kit.data import load_image_list
        from mist_kit.featurize import cache_features

        print(f"computing test tensors ({', '.join(map(str, plan.sources))}) for {test_list} (cached for next time)",
              flush=True)
        split, _, _ = cache_features(load_backbone_for(config.backbone), config.backbone,
                                     load_image_list(test_list), cache_root, plan.sources, progress=False)
    rows = split.valid()
    return split_array(split, config), rows, np.asarray(split.labels())[rows]


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
    args = ap.parse_args()
    if not (args.work / "READY").exists():
        print(f"error: {args.work / 'READY'} missing: the Caltech-101 MIST checkpoint is not trained yet",
              file=sys.stderr)
        return 2
    import onnx
    from _caltech import one_tensor
    from _report import markdown_table, update_section

    from mist_kit.calibration.features import real_data
    from mist_kit.calibration.modes import resolve_modes
    from mist_kit.calibration.reader import ArrayBatches, InputBatches
    from mist_kit.checkpoint import load_checkpoint
    from mist_kit.exporters.cloud_onnx import ort_session
    from mist_kit.exporters.edge_onnx import export_edge
    from mist_kit.exporters.export import _codec_specs
    from mist_kit.exporters.quantize import embeddings, quantize, quantize_edge
    from mist_kit.runtime.bundle import Head
    from mist_kit.runtime.codec.plan_codecs import plan_codecs, roundtrips

    ckpt = args.work / "mist" / "checkpoint"
    config, method = load_checkpoint(ckpt)
    tensor, _source = one_tensor(config)  # mist's one sent tensor (`gather`): the edge graph's input name
    cache_root = Path(config.training.get("cache_dir") or args.work / "cache")
    head = Head(method.head.weight.detach().numpy(), method.head.bias.detach().numpy(), tuple(config.classes))
    say = lambda m: print(m, flush=True)  # noqa: E731
    # calibration: cached train gathers, as `mist-kit export` does (the checkpoint is refit: no held-out of its own)
    data = real_data(config, None, calib=None, held_out=None, n_calib=256, n_eval=0,
                     rng=np.random.default_rng(0), transforms={}, cache_root=cache_root, log=say)
    feats, rows, labels = _test_features(config, args.test, cache_root, args.test_cache)
    # The test split is halved: the int8 gate (recipe choice + node fallback, labels unused) sees one half only,
    # every number in the table comes from the other half, so nothing reported was selected on.
    perm = np.random.default_rng(0).permutation(len(rows))
    gate_idx, report_idx = np.sort(perm[: len(rows) // 2]), np.sort(perm[len(rows) // 2:])
    gate = ArrayBatches(feats, rows[gate_idx], name=tensor, batch_size=64)
    report = ArrayBatches(feats, rows[report_idx], name=tensor, batch_size=64)
    report_labels = labels[report_idx]

    b = config.backbone
    fp32 = export_edge(method)
    res = quantize_edge(fp32, resolve_modes("auto"), data.calib, gate, head, labels[gate_idx], 0.99, log=say)
    chosen = res.chosen
    plan = method.plan
    specs = _codec_specs(config, plan, None, cache_root, say)  # the export default for this fp32-trained checkpoint
    codec = specs.get(tensor) or {"name": "fp32"}
    transform = roundtrips(plan_codecs(plan, specs, b.num_prefix_tokens))[tensor]
    coded_calib = InputBatches(data.calib.rows, data.calib.positions,  # type: ignore[union-attr]
                               transforms={tensor: transform})
    coded_res = quantize_edge(fp32, resolve_modes("auto"), coded_calib,
                              ArrayBatches(feats, rows[gate_idx], name=tensor, batch_size=64, transform=transform),
                              head, labels[gate_idx], 0.99, log=say)

    variants: list[tuple[str, onnx.ModelProto, ArrayBatches]] = [("fp32 (edge.fp32.onnx)", fp32, report)]
    for spec in resolve_modes("auto"):
        variants.append((f"int8 {spec.name}", quantize(fp32, spec, data.calib), report))  # type: ignore[arg-type]
    variants.append((f"int8 `--mode auto` + gate: {chosen.spec.name}, {len(chosen.spec.exclude)} nodes kept fp32",
                     chosen.model, report))
    c = coded_res.chosen
    coded_report = ArrayBatches(feats, rows[report_idx], name=tensor, batch_size=64, transform=transform)
    variants.append((f"fp32 edge on `{codec['name']}` features (the codec's own cost)", fp32, coded_report))
    variants.append((f"export default: `{codec['name']}` codec + {c.spec.name}, {len(c.spec.exclude)} nodes fp32",
                     c.model, coded_report))
    sample = np.asarray(feats[rows[:64]], dtype=np.float32)
    ref_pred = None
    table = []
    for name, model, batches in variants:
        blob = model.SerializeToString()
        session = ort_session(blob, threads=1)
        pred = head.logits(embeddings(session, batches)).argmax(1)
        ref_pred = pred if ref_pred is None else ref_pred
        lat = _latency_ms(session, sample, args.repeats)
        table.append([name, f"{len(blob) / 1024:.0f} KiB", f"{100 * (pred == report_labels).mean():.2f}",
                      f"{100 * (pred == ref_pred).mean():.2f}%", f"{lat:.3f}"])
        say(str(table[-1]))
    gate_log = "; ".join(f"{m.spec.name} ({len(m.spec.exclude)} excluded) {m.agreement:.4f}"
                         for m in res.candidates)
    body = (f"Real Caltech-101 (VTAB-1k) MIST checkpoint: {b.name}, k={config.method.k}, refit on train800 + "
            f"val200, so it has no held-out data of its own. The {len(rows)} test images "
            f"({args.test_cache or args.test}) are split at random (seed 0) into a gate half ({len(gate_idx)}: "
            f"the export-time int8 check, `--eval`, labels unused) and a report half ({len(report_idx)}): every "
            f"number below is on the report half. Int8 {data.notes[0]}. Edge graphs run in "
            f"onnxruntime {__import__('onnxruntime').__version__} on CPU, batch 1, one intra-op thread, median of "
            f"{args.repeats} runs. Agreement = argmax agreement with the fp32 edge graph.\n\n"
            + markdown_table(["edge graph", "file", "test top-1 %", "agreement", "ms / image"], table)
            + f"\n\nGate (`--min-agreement 0.99` on the gate half): {gate_log}. "
            f"{'Passed' if res.passed else 'FAILED'} with {chosen.spec.name}, excluded nodes: "
            f"{', '.join(chosen.spec.exclude) or 'none'}. With the default codec: "
            f"{'passed' if coded_res.passed else 'FAILED'} at {coded_res.chosen.agreement:.4f}, excluded: "
            f"{', '.join(c.spec.exclude) or 'none'}. The export default row feeds the edge graph the codec's "
            "round trip of the same test features (what a device receives); its agreement with the plain fp32 row "
            "includes the codec's own flips (row above it). Latency: a 2-core machine shared with other jobs.\n")
    cmd = "python bench/export_caltech.py" + (f" --test-cache {args.test_cache}" if args.test_cache else "")
    update_section("export", "Export: edge fp32 vs int8 (Caltech-101 MIST)", body, cmd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
