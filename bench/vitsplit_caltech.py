"""ViT-Split edge methods on Caltech-101 VTAB-1k with DINOv2 ViT-S/14, next to MIST and linear on the same cache.

Protocol (as MIST's bench): the split is chosen on train800 -> val200, the chosen model is refit on train800 + val200
from the cache, and test (2,000 images) is scored once, by the torch model on cached test features. Every method
trains from one bf16 feature cache (`--backbone-precision bf16`: the backbone pass in bfloat16 autocast, used
because the 2-core machine is shared). Per method: top-1 (fp32 tensors, and the same model on the int8-channel
round trip of its test tensors, not retrained), chosen K_t, bytes per image (fp32, int8-channel), edge parameters,
MACs, ms per image of the exported edge graph (onnxruntime, 1 thread, batch 1, fp32 vs int8, interleaved, median),
seconds per training epoch from the cache (interleaved with a MIST k=12 epoch), and `devices check` on rpi-zero-2w,
rpi4 and rpi5 at every memory variant (fresh torch-free process). Writes bench/work/caltech/vitsplit.json and
prints the BENCHMARKS.md section with `--render`.

    nice -n 10 .venv/bin/python bench/vitsplit_caltech.py [--methods vitsplit-lite,linear] [--epochs 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = "vit_small_patch14_dinov2"
DATA = ROOT.parent.parent / "shared" / "data" / "caltech101-vtab1k"
WORK = ROOT / "bench" / "work"
# fixed before looking at test: MIST's bench recipe (bench/train_caltech.py MIST_PARAMS); the copied blocks train
# at 0.1x of lr (3e-4, ViT-Split's base lr for ViT-S)
PARAMS = {"epochs": 20, "patience": 4, "lr": 3e-3, "weight_decay": 0.05, "label_smoothing": 0.1,
          "prune_margin": 0.1, "prune_after": 3}
METHOD_PARAMS = {"vitsplit": {"pool": "cls", "dropout": 0.1}, "vitsplit-lite": {"pool": "cls", "dropout": 0.1},
                 "linear": {}, "mist": {"pool": "cls", "dropout": 0.1}}
LINEAR_PARAMS = {"epochs": 30, "patience": 6, "lr": 1e-2, "weight_decay": 1e-4}


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def request(method: str, args: argparse.Namespace, out: Path, k: int | None = None):
    from mist_kit.pipeline import TrainRequest
    from mist_kit.train import TrainParams

    params = LINEAR_PARAMS if method == "linear" else {**PARAMS, "epochs": args.epochs}
    return TrainRequest(backbone=BACKBONE, weights=str(args.weights), img_size=224,
                        train=str(args.data / "train800.txt"), val=str(args.data / "val200.txt"),
                        out=out, method=method, k=k,
                        method_params=METHOD_PARAMS[method], params=TrainParams(**params), refit=True,
                        cache_dir=args.work / "cache", backbone_precision="bf16", progress=False)


def train(method: str, args: argparse.Namespace) -> dict:
    """run_training with the protocol above; a finished report is reused (the bench resumes)."""
    from mist_kit.pipeline import run_training

    out = args.work / method
    done = out / "report.json"
    if done.is_file():
        return json.loads(done.read_text())
    say(f"train {method}")
    k = 12 if method == "mist" else (args.k if method == "vitsplit" else None)
    report = run_training(request(method, args, out, k=k), log=say)
    report["test_top1"] = score_test(report, args)
    out.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(report, indent=1))
    return report


def test_split(args: argparse.Namespace, sources) -> object:
    """The bf16 test cache (built once, or waited for while another process builds it)."""
    from mist_kit.backbone import load_backbone
    from mist_kit.data import load_image_list
    from mist_kit.featurize import cache_features

    spec = load_backbone(BACKBONE, img_size=224, weights=str(args.weights))[1]
    images = load_image_list(str(args.data / "test.txt"))
    model = lambda: load_backbone(BACKBONE, img_size=224, weights=str(args.weights))[0]  # noqa: E731
    return cache_features(model, spec, images, args.work / "cache", sources, progress=False, log=say,
                          precision="bf16")[0]


def score_test(report: dict, args: argparse.Namespace) -> float:
    """Test top-1 of the refit checkpoint, once, on cached bf16 test features (the training run never saw them)."""
    from mist_kit.checkpoint import load_checkpoint
    from mist_kit.pipeline import plan_tensors
    from mist_kit.train import predict_logits, top1

    _config, method = load_checkpoint(report["checkpoint"])
    test = test_split(args, method.plan.sources)
    labels = np.asarray(test.labels())[test.valid()]
    return top1(predict_logits(method, test.inputs(plan_tensors(method.plan))), labels)


def int8_channel(report: dict, args: argparse.Namespace) -> dict:
    """Bytes per image and test top-1 of the fp32-trained model on the int8-channel round trip of its tensors
    (codec calibrated on 256 cached train800 images per tensor; the model is not retrained for the codec)."""
    from mist_kit.cache import CachedSplit
    from mist_kit.calibration.codec_calib import fit_for_inputs
    from mist_kit.checkpoint import load_checkpoint
    from mist_kit.pipeline import plan_tensors, wire_bytes
    from mist_kit.runtime.codec.plan_codecs import roundtrips
    from mist_kit.train import predict_logits, top1

    config, method = load_checkpoint(report["checkpoint"])
    tensors = plan_tensors(method.plan)
    cache = args.work / "cache"

    def split(name: str) -> CachedSplit:
        path = next(p for p in cache.glob(f"{name}-*-bf16") if p.is_dir())
        return CachedSplit(path, json.loads((path / "meta.json").read_text()))

    train_rows, test = split("train800").inputs(tensors), test_split(args, method.plan.sources)
    codecs = fit_for_inputs("int8-channel", train_rows, config.backbone.num_prefix_tokens)
    specs = {n: c.spec() for n, c in codecs.items()}
    labels = np.asarray(test.labels())[test.valid()]
    logits = predict_logits(method, test.inputs(tensors), roundtrips(codecs))
    return {"bytes_per_image": wire_bytes(method.plan, specs, config.backbone.num_prefix_tokens),
            "test_top1": top1(logits, labels)}


def export(method: str, report: dict, args: argparse.Namespace) -> Path:
    """fp32 + int8 edge graphs; the int8 gate runs on the first 200 test images (labels unused: every image of this
    dataset is train, val or test, and the refit model trained on train + val)."""
    from mist_kit.exporters.export import export_bundle

    bundle = args.work / method / "bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    gate = args.work / "gate200.txt"
    lines = (args.data / "test.txt").read_text().splitlines()[:200]
    gate.write_text("".join(f"{args.data / ln.split()[0]} {ln.split()[1]}\n" for ln in lines))
    say(f"export {method}")
    rep = export_bundle(report["checkpoint"], bundle, log=say, codec="fp32", eval_data=str(gate), n_eval=200,
                        cache_dir=args.work / "cache")
    if not rep.ok:
        raise SystemExit(f"error: export of {method} failed: {rep.problems}")
    return bundle


def edge_ms(bundle: Path, rounds: int = 5, runs: int = 20) -> dict:
    """ms per image, onnxruntime CPU, 1 intra-op thread, batch 1, fp32 and int8 interleaved; medians."""
    import onnxruntime as ort

    manifest = json.loads((bundle / "manifest.json").read_text())
    files = {"fp32": bundle / "edge.fp32.onnx", "int8": bundle / "edge.onnx"}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
    sessions = {k: ort.InferenceSession(str(f), opts, providers=["CPUExecutionProvider"]) for k, f in files.items()}
    rng = np.random.default_rng(0)
    feeds = {i["name"]: rng.standard_normal((1, *i["shape"][1:])).astype(np.float32)
             for i in manifest["edge"]["inputs"]}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, feeds)
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(runs):
                t = time.perf_counter()
                s.run(None, feeds)
                times[k].append(1e3 * (time.perf_counter() - t))
    return {k: round(statistics.median(v), 2) for k, v in times.items()}


def devices(bundle: Path) -> dict:
    """`devices check` (measured peak RSS) on every memory variant of rpi-zero-2w, rpi4 and rpi5, one fresh
    torch-free process each (as on the device)."""
    code = ("import json, sys\nfrom mist_kit.devices import get_device\n"
            "from mist_kit.runtime.device_check import check_bundle\n"
            "r = check_bundle(sys.argv[1], get_device(sys.argv[2]))\n"
            "print(json.dumps({k: r[k] for k in ('fits', 'budget_mb', 'peak_rss_mb_measured', 'edge_macs_per_image',"
            " 'edge_params', 'model_mb')}))\n")
    from mist_kit.devices import list_devices

    out = {}
    for p in list_devices():
        if (p.base or p.name) in ("rpi-zero-2w", "rpi4", "rpi5"):
            proc = subprocess.run([sys.executable, "-c", code, str(bundle), p.name], capture_output=True, text=True,
                                  timeout=600)
            out[p.name] = json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr.strip()[-300:]}
    return out


def epoch_seconds(args: argparse.Namespace, methods: list[str], reports: dict, rounds: int = 2) -> dict:
    """Seconds of one training epoch over train800 from the cache (batch 32), per method at its chosen depth,
    interleaved A, B, A, B; median."""
    from mist_kit.backbone import load_backbone
    from mist_kit.cache import CachedSplit
    from mist_kit.checkpoint import new_method
    from mist_kit.pipeline import plan_tensors
    from mist_kit.train import TrainParams, fit

    model_bb, spec = load_backbone(BACKBONE, img_size=224, weights=str(args.weights))
    path = next(p for p in (args.work / "cache").glob("train800-*-bf16") if p.is_dir())
    train_split = CachedSplit(path, json.loads((path / "meta.json").read_text()))
    y = np.asarray(train_split.labels())[train_split.valid()]
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        for m in methods:
            from mist_kit.edge import get_edge_method

            k = reports[m]["k"] if m in reports else 12
            plan = get_edge_method(m).cloud_plan(spec.shape, k, METHOD_PARAMS[m])
            model = new_method(m, spec.shape, k, 101, METHOD_PARAMS[m], 0, None)
            if model.needs_backbone_init:
                model.init_from_backbone(model_bb)
            x = train_split.inputs(plan_tensors(plan))
            t = time.perf_counter()
            fit(model, x, y, TrainParams(epochs=1, lr=3e-3))
            times[m].append(time.perf_counter() - t)
            say(f"epoch {m}: {times[m][-1]:.1f} s")
    return {m: round(statistics.median(v), 2) for m, v in times.items()}


def epoch_equivalents(rep: dict) -> float | None:
    """Training epochs over 800 images in the run: every candidate's epochs, plus the refit's (1000 images);
    None without a depth search (its best epoch is not reported)."""
    if not rep.get("k_search"):
        return None
    search = sum(int(v) for v in rep["epochs_run"].values())
    return search + 1.25 * max(1, int(rep["k_search"][str(rep["k"])]["best_epoch"]))


def render(results: dict, command: str) -> str:
    """The BENCHMARKS.md section (markdown) from the results JSON."""
    rows = []
    for m in ("vitsplit", "vitsplit-lite", "mist", "linear"):
        r = results.get(m)
        if not r:
            continue
        ms = r.get("edge_ms_1thread", {})
        kt = "n/a" if r["k"] is None or m in ("mist", "linear") else f"{12 - r['k']} (split {r['k']})"
        eq = r.get("epoch_equivalents")
        rows.append([m, f"{100 * r['test_top1']:.2f}", f"{100 * r['int8_channel']['test_top1']:.2f}",
                     f"{100 * r['val_top1']:.2f}" if r.get("val_top1") is not None else "n/a", kt,
                     f"{r['bytes_per_image']:,}", f"{r['int8_channel']['bytes_per_image']:,}",
                     f"{r['edge']['params']:,}", f"{r['edge']['macs_per_image'] / 1e6:.1f}",
                     ms.get("fp32", "n/a"), ms.get("int8", "n/a"),
                     f"{r['train_seconds'] / eq:.1f}" if eq else "n/a", f"{r['train_seconds']:.0f}"])
    head = ["method", "test top-1 % (fp32 tensors)", "test top-1 % (int8-channel, not retrained)", "val top-1 %",
            "K_t", "bytes/img fp32", "bytes/img int8-channel", "edge params", "edge MMAC/img",
            "edge ms fp32 (ORT, 1 thread)", "edge ms int8", "s per cached epoch (800 img)", "train s (search + refit)"]
    table = "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                       ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])
    dev = []
    for m in ("vitsplit", "vitsplit-lite"):
        for name, d in (results.get(m) or {}).get("devices", {}).items():
            dev.append(f"{m} on {name}: " + (f"{'fits' if d['fits'] else 'does not fit'} (measured peak "
                                             f"{d['peak_rss_mb_measured']} MB of {d['budget_mb']} MB)"
                                             if "fits" in d else d.get("error", "?")))
    return (f"Command: `{command}`\n\nLoad: {results.get('uptime_start')} (start), {results.get('uptime_end')} "
            f"(end)\n\n{table}\n\n" + "\n".join(f"- {x}" for x in dev) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="vitsplit-lite,linear")
    ap.add_argument("--epochs", type=int, default=PARAMS["epochs"])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--work", type=Path, default=WORK / "caltech")
    ap.add_argument("--weights", type=Path, default=WORK / "dinov2_vits14.safetensors")
    ap.add_argument("--epoch-timing", default="vitsplit-lite,mist", help="methods whose cached epoch is timed")
    ap.add_argument("--k", type=int, default=None, help="vitsplit: a fixed split instead of the search on val")
    ap.add_argument("--render", action="store_true", help="only print the markdown of an earlier run's results")
    args = ap.parse_args()
    if args.render:
        results = json.loads((args.work / "vitsplit.json").read_text())
        for r in results.values():
            if isinstance(r, dict) and "epochs_run" in r:
                r["epoch_equivalents"] = epoch_equivalents(r)
        print(render(results, results.get("command", "")))
        return
    if not args.weights.is_file():
        subprocess.run([sys.executable, str(ROOT.parent.parent / "shared" / "tools" / "dinov2_small_weights.py"),
                        str(args.weights)], check=True)
    results: dict = {"command": "nice -n 10 .venv/bin/python bench/vitsplit_caltech.py " + " ".join(sys.argv[1:]),
                     "uptime_start": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    reports = {}
    for m in args.methods.split(","):
        rep = reports[m] = train(m, args)
        row = {k: rep.get(k) for k in ("k", "val_top1", "test_top1", "k_search", "epochs_run", "train_seconds",
                                       "trainable_params", "edge", "bytes_per_image", "cache_bytes_per_image")}
        row["int8_channel"] = int8_channel(rep, args)
        if m.startswith("vitsplit"):
            bundle = export(m, rep, args)
            row["edge_ms_1thread"] = edge_ms(bundle)
            row["devices"] = devices(bundle)
            manifest = json.loads((bundle / "manifest.json").read_text())
            row["int8_recipe"] = manifest.get("edge", {}).get("quantization")
            row["edge_top1_agreement"] = manifest.get("parity", {}).get("edge_top1_agreement")
        results[m] = row
        (args.work / "vitsplit.json").write_text(json.dumps(results, indent=1))
        say(f"{m}: {json.dumps(row)}")
    timing = [m for m in args.epoch_timing.split(",") if m]
    if timing:
        results["epoch_seconds"] = epoch_seconds(args, timing, reports)
    results["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    (args.work / "vitsplit.json").write_text(json.dumps(results, indent=1))
    say(json.dumps(results))


if __name__ == "__main__":
    main()
