"""TFLite benchmark on the real Caltech-101 MIST model: edge.tflite int8 (litert-torch PT2E) vs fp32, and vs ORT.

Builds, in one run and on the same features: the fp32 edge graph, two int8 onnxruntime graphs for comparison
(static-qdq-minmax, the static recipe closest to LiteRT's, and dynamic-per-channel), and the LiteRT graphs
(fp32 by litert-torch, int8 by `mist_kit.exporters.tflite.quantize_convert`, the code `export --tflite` runs),
calibrated on 256 cached train gathers. Measured on the test split's cached gathers: file size, top-1, argmax
agreement with the fp32 edge graph, and latency per image at batch 1 with one thread. Writes the `tflite` section
of BENCHMARKS.md. Needs the tflite extra (`make tflite-env`), so run it with that environment's python:

    ../tflite-venv/bin/python bench/export_tflite_caltech.py [--work bench/work/caltech] [--test-cache DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
DEFAULT_TEST_CACHE = ROOT / "bench" / "work" / "caltech" / "cache" / "test-6eb47143-bf16"


def _test_features(config, test_cache: Path) -> tuple[np.ndarray, np.ndarray]:
    from _caltech import bound_test_cache, split_array

    split = bound_test_cache(config, test_cache)
    rows = split.valid()
    labels = np.asarray(split.labels())[rows]
    if list(split.classes) and list(split.classes) != list(config.classes):
        from mist_kit.data import relabel

        labels = relabel(labels, split.classes, config.classes)
    return np.asarray(split_array(split, config)[rows], dtype=np.float32), labels


def _median_ms(run, x: np.ndarray, repeats: int) -> float:
    for i in range(5):
        run(x[i:i + 1])
    times = []
    for i in range(repeats):
        row = x[i % len(x): i % len(x) + 1]
        t = time.perf_counter()
        run(row)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "caltech")
    ap.add_argument("--test-cache", type=Path, default=DEFAULT_TEST_CACHE,
                    help="feature-cache directory of the test split (default: the bf16-backbone test cache)")
    ap.add_argument("--n-calib", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args()
    from mist_kit.errors import MistError
    from mist_kit.exporters.tflite import require_tflite

    try:
        require_tflite()
    except MistError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    import litert_torch
    import onnxruntime
    import torch
    from _caltech import one_tensor, plan_of, split_array
    from _report import markdown_table, update_section

    from mist_kit.calibration.features import find_cached_split
    from mist_kit.calibration.modes import resolve_modes
    from mist_kit.calibration.reader import InMemoryBatches
    from mist_kit.checkpoint import load_checkpoint
    from mist_kit.exporters.edge_onnx import _Embed, export_edge
    from mist_kit.exporters.onnx_utils import ort_session
    from mist_kit.exporters.quantize import quantize
    from mist_kit.exporters.tflite import interpreter, op_summary, quantize_convert, run_rows
    from mist_kit.runtime.bundle import Head

    torch.set_num_threads(1)
    ckpt = args.work / "mist" / "checkpoint"
    config, method = load_checkpoint(ckpt)
    k, b = config.method.k, config.backbone
    tensor_name, _source = one_tensor(config)  # mist's one sent tensor (`gather`): the edge graph's input name
    tokens, dim = method.input_shapes[tensor_name]
    head = Head(method.head.weight.detach().numpy(), method.head.bias.detach().numpy(), tuple(config.classes))
    train = find_cached_split(config, config.training.get("train"), plan_of(config),
                              Path(config.training.get("cache_dir") or args.work / "cache"),
                              config.training.get("backbone_precision", "fp32"))
    if train is None:
        print("error: no cached train gathers for this checkpoint", file=sys.stderr)
        return 2
    pick = np.sort(np.random.default_rng(0).permutation(train.valid())[:args.n_calib])
    calib_x = np.asarray(split_array(train, config)[pick], dtype=np.float32)
    calib = InMemoryBatches([{tensor_name: calib_x[i:i + 32]} for i in range(0, len(calib_x), 32)])
    x, labels = _test_features(config, args.test_cache)
    print(f"calibration: {len(calib_x)} train gathers; test: {len(x)} gathers of {args.test_cache}", flush=True)

    fp32 = export_edge(method)
    specs = {s.name: s for s in resolve_modes("auto")}
    variants: list[tuple[str, str, bytes]] = [("onnxruntime", "fp32 edge.fp32.onnx", fp32.SerializeToString())]
    for name in ("static-qdq-minmax", "dynamic-per-channel"):
        variants.append(("onnxruntime", f"int8 edge.onnx ({name})", quantize(fp32, specs[name], calib)
                         .SerializeToString()))
    t = time.perf_counter()
    litert_torch.config.show_progress = False
    lite_fp32 = litert_torch.convert(_Embed(method.eval()).eval(), (torch.zeros(1, tokens, dim),))
    with __import__("tempfile").TemporaryDirectory() as tmp:
        lite_fp32.export(f"{tmp}/fp32.tflite")
        variants.append(("LiteRT", "fp32 (litert-torch, no quantizer)", Path(f"{tmp}/fp32.tflite").read_bytes()))
    t_fp32 = time.perf_counter() - t
    t = time.perf_counter()
    int8_bytes = quantize_convert(method, tokens, dim, calib, log=lambda m: print(m, flush=True))
    t_int8 = time.perf_counter() - t
    variants.append(("LiteRT", "int8 edge.tflite (PT2E, `export --tflite`)", int8_bytes))

    table, ref_pred, lite_ops = [], None, {}
    for engine, name, blob in variants:
        if engine == "onnxruntime":
            sess = ort_session(blob, threads=1)
            inp = sess.get_inputs()[0].name
            emb = np.concatenate([sess.run(None, {inp: x[i:i + 64]})[0] for i in range(0, len(x), 64)])

            def run(row: np.ndarray, sess=sess, inp=inp) -> None:
                sess.run(None, {inp: row})
        else:
            interp = interpreter(blob, threads=1)
            emb = run_rows(interp, (x[i:i + 1] for i in range(len(x))))
            i_in, i_out = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]

            def run(row: np.ndarray, interp=interp, i_in=i_in, i_out=i_out) -> None:
                interp.set_tensor(i_in, row)
                interp.invoke()
                interp.get_tensor(i_out)
            lite_ops[name] = op_summary(blob)
        pred = head.logits(emb).argmax(1)
        ref_pred = pred if ref_pred is None else ref_pred
        lat = _median_ms(run, x, args.repeats)
        table.append([engine, name, f"{len(blob) / 1024:.0f} KiB", f"{100 * (pred == labels).mean():.2f}",
                      f"{100 * (pred == ref_pred).mean():.2f}%", f"{lat:.3f}"])
        print(table[-1], flush=True)

    from importlib.metadata import version

    ops, int8_ops = lite_ops["int8 edge.tflite (PT2E, `export --tflite`)"]
    body = (
        f"Real Caltech-101 (VTAB-1k) MIST checkpoint: {b.name}, k={k}, codec fp32 (the bare edge core); "
        f"{len(labels)} test gathers from {args.test_cache.name} (bf16 backbone), int8 calibrated on "
        f"{len(calib_x)} cached train gathers. Every graph runs on CPU at batch 1 with one thread (onnxruntime "
        f"{onnxruntime.__version__}: intra-op 1; ai-edge-litert {version('ai-edge-litert')}: num_threads=1, its "
        f"default XNNPACK delegate), median of {args.repeats} runs. Agreement = argmax agreement with the fp32 "
        "edge.fp32.onnx on the test set (litert-torch's fp32 graph is the same function).\n\n"
        + markdown_table(["engine", "edge graph", "file", "test top-1 %", "agreement", "ms / image"], table)
        + f"\n\nlitert-torch {version('litert-torch')} with torch {torch.__version__} (torchao "
        f"{version('torchao')}); PT2E `get_symmetric_quantization_config(is_per_channel=True)`: int8 symmetric "
        f"per-channel weights, static int8 activations (histogram observer). Conversion took {t_int8:.0f} s for "
        f"int8 (calibration included), {t_fp32:.0f} s for fp32. int8 compute ops in edge.tflite: "
        f"{', '.join(f'{n} x{c}' for n, c in int8_ops.items())} of {ops.get('FULLY_CONNECTED', 0)} "
        "FULLY_CONNECTED (on this model: the 16 q/k/v/o projections and the 4 attention-score products "
        "q k^T; the 4 attention-times-v products, softmax and LayerNorm stay float). edge.tflite has a fixed "
        "batch of 1: litert-torch 0.10 cannot lower LayerNorm with a dynamic batch axis, and the XNNPACK "
        "delegate cannot resize the static graph. Not measured here: "
        "an aarch64 device (this is x86_64 under a shared 2-core load).\n")
    cmd = ("../tflite-venv/bin/python bench/export_tflite_caltech.py"
           + (f" --test-cache {args.test_cache}" if args.test_cache != DEFAULT_TEST_CACHE else ""))
    update_section("tflite", "TFLite: edge.tflite int8 vs fp32 (Caltech-101 MIST)", body, cmd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
