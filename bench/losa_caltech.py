"""LoSA-style edge method (`losa`) on Caltech-101 VTAB-1k with DINOv2 ViT-S/14, MIST's protocol.

Phases (each resumable: its JSON result in --work is reused when present):
    cache   one backbone pass over train800, val200 and test caching every block output z_1..z_12 (the union of
            every `blocks` candidate, so the val sweep and the test run need no further pass)
    sweep   each candidate (blocks, ranks, pool) trained on train800, early stopping on val200; the best val wins
    final   the chosen candidate refit on train800 + val200 (the pipeline's --refit) and scored once on test
    codecs  the final model on each codec's round trip of the test tensors (calibrated per tensor on train800):
            bytes per image and top-1; the best codec within 0.5 pt of fp32
    export  edge ONNX fp32 + int8 (onnxruntime dynamic, agreement gate), ms / image at 1 thread in onnxruntime
Writes the `losa` section of BENCHMARKS.md (append-only section, markers <!-- BEGIN losa --> ... END).

    nice -n 10 python bench/losa_caltech.py [--precision bf16] [--phases cache,sweep,final,codecs,export]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
BACKBONE = "vit_small_patch14_dinov2"
DATA = ROOT.parent.parent / "shared" / "data" / "caltech101-vtab1k"
# Training settings: MIST's regularised follow-up run's (BENCHMARKS.md `train`), fixed before any losa run.
TRAIN = {"epochs": 14, "patience": 4, "lr": 3e-3, "weight_decay": 0.05, "label_smoothing": 0.1, "batch_size": 32,
         "seed": 0}
CANDIDATES: list[dict[str, Any]] = [  # in run order; --candidates N runs the first N
    {"blocks": "every3", "token_rank": 8, "channel_rank": 16, "pool": "cls", "dropout": 0.1},
    {"blocks": "every6", "token_rank": 8, "channel_rank": 16, "pool": "cls", "dropout": 0.1},
    {"blocks": "every3", "token_rank": 8, "channel_rank": 16, "pool": "mean", "dropout": 0.1},
    {"blocks": "every6", "token_rank": 16, "channel_rank": 32, "pool": "cls", "dropout": 0.1},
    {"blocks": "last2", "token_rank": 8, "channel_rank": 16, "pool": "cls", "dropout": 0.1},
    {"blocks": "every3", "token_rank": 16, "channel_rank": 32, "pool": "cls", "dropout": 0.1},
    {"blocks": "last4", "token_rank": 8, "channel_rank": 16, "pool": "cls", "dropout": 0.1},
]
ALL_CANDIDATES: list[dict[str, Any]] = []
CODECS = ("int8-channel", "int8-token", "int4-channel")


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def ensure_weights(path: Path) -> Path:
    if not path.is_file():
        subprocess.run([sys.executable, str(ROOT.parent.parent / "shared" / "tools" / "dinov2_small_weights.py"),
                        str(path)], check=True)
    return path


def cached(path: Path, fn: Any) -> dict[str, Any]:
    """Run `fn` once: its JSON result is kept at `path` and reused on a rerun."""
    if path.is_file():
        return json.loads(path.read_text())
    out = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    return out


def phase_cache(args: argparse.Namespace, _done: dict[str, Any]) -> dict[str, Any]:
    from mist_kit.backbone import load_backbone
    from mist_kit.data import load_image_list
    from mist_kit.featurize import cache_features
    from mist_kit.runtime.plan import block

    model, spec = load_backbone(args.backbone, img_size=args.img_size, weights=args.weights)
    sources = [block(i) for i in range(1, spec.shape.num_blocks + 1)]
    out: dict[str, Any] = {}
    for split in ("train800", "val200", "test"):
        images = load_image_list(str(args.data / f"{split}.txt"))
        cs, secs, _skipped = cache_features(model, spec, images, args.cache, sources, batch_size=16, progress=False,
                                           log=log, precision=args.precision)
        out[split] = {"seconds": secs, "images": len(images), "bytes_per_image": cs.bytes_per_image()}
        log(f"cached {split}: {len(images)} images in {secs:.0f} s")
    return out


def _name(cand: dict[str, Any]) -> str:
    return f"{cand['blocks']}-t{cand['token_rank']}-c{cand['channel_rank']}-{cand['pool']}"


def _request(args: argparse.Namespace, cand: dict[str, Any], out: Path, **extra: Any) -> Any:
    from mist_kit.pipeline import TrainRequest
    from mist_kit.train import TrainParams

    return TrainRequest(backbone=args.backbone, weights=str(args.weights), img_size=args.img_size,
                        train=str(args.data / "train800.txt"), val=str(args.data / "val200.txt"), out=out,
                        method="losa", method_params=dict(cand), params=TrainParams(**TRAIN), progress=False,
                        cache_dir=args.cache, backbone_precision=args.precision, **extra)


def _train_row(report: dict[str, Any]) -> dict[str, Any]:
    epochs = sum(report["epochs_run"].values())
    return {"val_top1": report["val_top1"], "epochs_run": epochs, "train_seconds": report["train_seconds"],
            "s_per_epoch": report["train_seconds"] / max(1, epochs), "params": report["edge"]["params"],
            "macs": report["edge"]["macs_per_image"], "bytes_fp32": report["bytes_per_image"],
            "checkpoint": report["checkpoint"], "test_top1": report.get("test_top1")}


def phase_sweep(args: argparse.Namespace, _done: dict[str, Any]) -> dict[str, Any]:
    """Every candidate on train800, early stopping on val200 (test never read)."""
    from mist_kit.pipeline import run_training

    rows = {}
    for cand in CANDIDATES:
        name = _name(cand)
        rows[name] = cached(args.work / "sweep" / f"{name}.json", lambda c=cand, n=name: {
            **c, **_train_row(run_training(_request(args, c, args.work / "sweep" / n), log=log))})
        log(f"sweep {name}: val {rows[name]['val_top1']:.4f} ({rows[name]['s_per_epoch']:.1f} s / epoch)")
    return rows


def _chosen(sweep: dict[str, Any]) -> dict[str, Any]:
    """Best val top-1; ties go to fewer bytes, then fewer MACs."""
    name = min(sweep, key=lambda n: (-sweep[n]["val_top1"], sweep[n]["bytes_fp32"], sweep[n]["macs"]))
    return {k: sweep[name][k] for k in ("blocks", "token_rank", "channel_rank", "pool", "dropout")}


def phase_final(args: argparse.Namespace, done: dict[str, Any]) -> dict[str, Any]:
    """The chosen candidate refit on train800 + val200 for its best val epochs (scored on test by `codecs`, so
    the refit can run while the test split is still being cached)."""
    from mist_kit.pipeline import run_training

    cand = _chosen(done["sweep"])
    req = _request(args, cand, args.work / "final", refit=True)
    return {**cand, **_train_row(run_training(req, log=log))}


def phase_codecs(args: argparse.Namespace, done: dict[str, Any]) -> dict[str, Any]:
    """Test top-1 of the final model (the fp32 row: the one test score), then the model on each layout-preserving
    codec's round trip of every test tensor, each
    codec calibrated per tensor on 256 train800 images; no retraining (token pooling would need one: skipped)."""
    from mist_kit.cache import CachedSplit
    from mist_kit.calibration.codec_calib import fit_for_inputs
    from mist_kit.checkpoint import load_checkpoint
    from mist_kit.data import load_image_list
    from mist_kit.featurize import cache_features
    from mist_kit.pipeline import plan_tensors
    from mist_kit.runtime.codec.plan_codecs import bytes_per_image, roundtrips
    from mist_kit.train import predict_logits, top1

    config, model = load_checkpoint(done["final"]["checkpoint"])
    model.eval()
    tensors = plan_tensors(model.plan)

    def split(name: str) -> CachedSplit:
        images = load_image_list(str(args.data / f"{name}.txt"))
        return cache_features(lambda: None, config.backbone, images, args.cache, model.plan.sources,
                              progress=False, log=log, precision=args.precision)[0]

    train, test = split("train800"), split("test")
    y = np.asarray(test.labels())[test.valid()]
    x_train, x_test = train.inputs(tensors), test.inputs(tensors)
    base = predict_logits(model, x_test)
    rows = {"fp32": {"bytes": model.plan.fp32_bytes, "top1": top1(base, y), "agreement": 1.0}}
    for name in CODECS:
        codecs = fit_for_inputs(name, x_train, config.backbone.num_prefix_tokens)
        logits = predict_logits(model, x_test, roundtrips(codecs))
        rows[name] = {"bytes": bytes_per_image(codecs), "top1": top1(logits, y),
                      "agreement": float(np.mean(logits.argmax(1) == base.argmax(1)))}
        log(f"codec {name}: {rows[name]}")
    return rows


def phase_export(args: argparse.Namespace, done: dict[str, Any]) -> dict[str, Any]:
    """Export (int8-channel codec on every tensor, int8 edge graph with the agreement gate on test), then
    edge ms / image at 1 onnxruntime thread, fp32 and int8 graphs interleaved A, B, A, B (medians)."""
    from mist_kit.exporters.export import export_bundle
    from mist_kit.runtime.manifest import EDGE_FILE, EDGE_FP32_FILE
    from mist_kit.runtime.metrics import median_ms
    from mist_kit.runtime.ort_session import cpu_session

    bundle = args.work / "bundle"
    rep = export_bundle(done["final"]["checkpoint"], bundle, log=log, eval_data=str(args.data / "test.txt"),
                        cache_dir=args.cache)
    if not rep.ok:
        raise SystemExit(f"export failed: {rep.problems}")
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {EDGE_FP32_FILE: [], EDGE_FILE: []}
    sessions = {f: cpu_session(bundle / f, threads=1) for f in times}
    feeds = {}
    for f, sess in sessions.items():
        feed = {}
        for i in sess.get_inputs():
            shape = [1 if not isinstance(d, int) else d for d in i.shape]
            dtype = {"tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(float16)": np.float16}.get(
                i.type, np.float32)
            feed[i.name] = (rng.integers(0, 255, shape) if dtype != np.float32 else rng.standard_normal(shape)
                            ).astype(dtype)
        feeds[f] = feed
    for _ in range(4):
        for f, sess in sessions.items():
            times[f].append(median_ms(lambda s=sess, x=feeds[f]: s.run(None, x), repeats=25, warmup=3))
    m = rep.manifest
    check = subprocess.run([str(Path(sys.executable).parent / "mist-kit"), "devices", "check", str(bundle), "--device",
                            "rpi4", "--json"], capture_output=True, text=True)
    return {"ms_fp32": float(np.median(times[EDGE_FP32_FILE])), "ms_int8": float(np.median(times[EDGE_FILE])),
            "kib_fp32": (bundle / EDGE_FP32_FILE).stat().st_size / 1024,
            "kib_int8": (bundle / EDGE_FILE).stat().st_size / 1024, "quantization": rep.quantization,
            "parity": m.get("parity"), "edge": m.get("edge"), "devices_check": _json_or(check), "times": dict(times),
            "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}

def _json_or(proc: subprocess.CompletedProcess) -> Any:
    try:
        return json.loads(proc.stdout)
    except ValueError:
        return {"rc": proc.returncode, "stderr": proc.stderr.strip()[-300:]}


# MIST and linear on the same data and protocol: BENCHMARKS.md `train` (test top-1, params), `codec` (bytes),
# `export` (edge ms / image at 1 thread, fp32 / int8 dynamic). MIST's MACs: LowRankAttentionEdge.macs_per_image.
MIST_ROW = {"test": "73.70", "fp32": 394_752, "int8": 98_688, "best": "int8-token 99,716 (+0.20)",
            "params": 142_757, "ms": "2.102 / 2.182", "epoch": "16.75 (earlier run, lighter load)"}
LINEAR_ROW = {"test": "71.25", "fp32": 1_536, "params": 38_885}


def _memory(check: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in check.items() if "byte" in k or "mem" in k or "fits" in k or "rss" in k}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def phase_write(args: argparse.Namespace, done: dict[str, Any]) -> None:
    """The `losa` section of BENCHMARKS.md from the phases' JSON results."""
    from _report import markdown_table, update_section

    from mist_kit.edge import create_edge_method
    from mist_kit.runtime.plan import BackboneShape

    sweep, final, codecs, export = done["sweep"], done["final"], done["codecs"], done["export"]
    chosen = _chosen(sweep)
    rows = [[f"**{n}**" if n == _name(chosen) else n, r["blocks"],
             r["token_rank"], r["channel_rank"], r["pool"], _pct(r["val_top1"]), f"{r['params']:,}",
             f"{r['macs'] / 1e6:.1f} M", f"{r['bytes_fp32']:,}", f"{r['s_per_epoch']:.1f}", r["epochs_run"]]
            for n, r in sweep.items()]
    sweep_table = markdown_table(["candidate", "blocks", "r_t", "r_c", "pool", "val top-1 %", "params", "MACs",
                                  "fp32 bytes / img", "s / epoch (incl. val)", "epochs"], rows)
    base = codecs["fp32"]["top1"]
    ok = [n for n, r in codecs.items() if r["top1"] >= base - 0.005]
    best = min(ok, key=lambda n: codecs[n]["bytes"])
    codec_rows = [[f"`{n}`", f"{r['bytes']:,}", _pct(r["top1"]), f"{100 * (r['top1'] - base):+.2f}",
                   f"{r['agreement']:.4f}"] for n, r in sorted(codecs.items(), key=lambda kv: -kv[1]["bytes"])]
    codec_table = markdown_table(["codec (every tensor)", "bytes / img", "test top-1 %", "Δ pt", "agreement"],
                                 codec_rows)
    mist_macs = create_edge_method("mist", backbone=BackboneShape(384, 257, 1, 12), depth=12,
                                   num_classes=102).macs_per_image()
    m = MIST_ROW
    main = markdown_table(
        ["method", "test top-1 %", "bytes / img fp32", "int8-channel", "best codec within 0.5 pt", "params",
         "MACs / img", "edge ms fp32 / int8 (1 thread)", "s / epoch from cache"],
        [[f"losa ({chosen['blocks']}, r_t {chosen['token_rank']}, r_c {chosen['channel_rank']}, {chosen['pool']})",
          _pct(codecs["fp32"]["top1"]), f"{codecs['fp32']['bytes']:,}", f"{codecs['int8-channel']['bytes']:,}",
          f"`{best}` {codecs[best]['bytes']:,} ({100 * (codecs[best]['top1'] - base):+.2f})",
          f"{final['params']:,}", f"{final['macs'] / 1e6:.1f} M",
          f"{export['ms_fp32']:.3f} / {export['ms_int8']:.3f}", f"{final['s_per_epoch']:.1f}"],
         ["mist (k=12, reg)", m["test"], f"{m['fp32']:,}", f"{m['int8']:,}", m["best"], f"{m['params']:,}",
          f"{mist_macs / 1e6:.1f} M", m["ms"], m["epoch"]],
         ["linear", LINEAR_ROW["test"], f"{LINEAR_ROW['fp32']:,}", "-", "-", f"{LINEAR_ROW['params']:,}",
          f"{384 * 102 / 1e6:.2f} M", "-", "-"]])
    q = (export.get("quantization") or {}).get("chosen") or {}
    quant = {"mode": (q.get("mode") or {}).get("name"), "excluded": (q.get("mode") or {}).get("excluded_nodes"),
             "agreement": q.get("agreement"), "int8_ops": q.get("runtime_int8_ops")}
    dc = export.get("devices_check") or {}
    body = f"""
LoSA-style side network (`--method losa`, toolkit/edge/losa.py: built from the paper's description, no public
code) on Caltech-101 VTAB-1k with DINOv2 ViT-S/14 at 224 px (257 tokens x 384, 12 blocks). MIST's protocol:
candidates trained on train800 with early stopping on val200, the best val candidate refit on train800 + val200
for its best epoch count, test (2000 images) scored once. Backbone features for every split cached once with
`--backbone-precision {args.precision}` (all 12 block outputs, {done['cache']['train800']['bytes_per_image']:,}
bytes / image in the float16 cache; the MIST rows used fp32 train/val and bf16 test features). Training recipe
fixed before any losa run (MIST's regularised recipe, epochs / patience / lr as passed on the command line to fit
the shared machine): {json.dumps(TRAIN)}, dropout 0.1 on the pooled embedding.

Choice of the defaults on val200 (test never read here):

{sweep_table}

Why these candidates: `every3` and `every6` ask how many blocks the side network needs (4 vs 2 tensors: bytes
and edge MACs halve), `last2` whether 2 late blocks beat 2 spread ones at the same bytes, `mean` vs `cls` is
MIST's own pooling question, and r 16 / 32 vs 8 / 16 the ranks (8 / 16 keeps one epoch affordable here).
This run trained {len(sweep)} candidates for at most {TRAIN['epochs']} epochs each (the script's
list has {len(ALL_CANDIDATES)}; `--candidates` and `--epochs` cut it to fit a 2-core machine at load ~15-18, where one
epoch took the s / epoch above); candidates not in the table were not run: the method's defaults are the best of
what ran. Chosen: {_name(chosen)} (best val top-1; ties to fewer bytes, then fewer MACs). Final: val
{_pct(final['val_top1'])} (train800 run), refit for its best epochs, **test {_pct(codecs['fp32']['top1'])}**;
{final['train_seconds']:.0f} s
training ({final['epochs_run']} epochs with per-epoch val on train800, then the refit on train800 + val200).

Next to MIST and linear (their numbers from the `train`, `codec` and `export` sections above; bytes before zstd):

{main}

Codecs on the final model's test tensors (each tensor its own codec, calibrated on 256 train800 images; the
fp32-trained model on the round trip, not retrained; token-pooling codecs need a retrain and were not run):

{codec_table}

Export (`int8-channel` codec on every tensor, int8 edge graph with the agreement gate on the test images):
edge.fp32.onnx {export['kib_fp32']:.0f} KiB, edge.onnx {export['kib_int8']:.0f} KiB; quantization
{json.dumps(quant)}; parity
{json.dumps(export.get('parity'))}. `devices check --device rpi4`: edge MACs {dc.get('edge_macs_per_image')}
(= the method's hand count {final['macs']}), activation bytes {(export.get('edge') or {}).get('activation_bytes')},
memory {json.dumps(_memory(dc))}.
Edge latency: onnxruntime CPU, 1 intra-op thread, batch 1, fp32 and int8 graphs interleaved 4 x (median of 25),
median of medians; load at the end: {export['uptime']}.
"""
    cmd = "nice -n 10 .venv/bin/python bench/losa_caltech.py " + " ".join(sys.argv[1:])
    update_section("losa", "LoSA-style side network (losa) on Caltech-101, DINOv2 ViT-S/14", body, cmd)


PHASES: dict[str, Any] = {"cache": phase_cache, "sweep": phase_sweep, "final": phase_final,
                          "codecs": phase_codecs, "export": phase_export}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "losa")
    ap.add_argument("--weights", type=Path, default=ROOT / "bench" / "work" / "dinov2_vits14.safetensors")
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"), help="backbone precision while caching")
    ap.add_argument("--backbone", default=BACKBONE, help="(test_vit + --img-size 32: a smoke run of the script)")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--write", action="store_true", help="write the losa section of BENCHMARKS.md at the end")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--epochs", type=int, default=TRAIN["epochs"], help="maximum epochs (fewer: a smoke run)")
    ap.add_argument("--patience", type=int, default=TRAIN["patience"])
    ap.add_argument("--lr", type=float, default=TRAIN["lr"])
    ap.add_argument("--candidates", type=int, default=len(CANDIDATES), help="first N sweep candidates")
    args = ap.parse_args()
    TRAIN["epochs"] = args.epochs
    TRAIN["patience"] = min(TRAIN["patience"], args.patience)
    TRAIN["lr"] = args.lr
    ALL_CANDIDATES.extend(CANDIDATES)
    del CANDIDATES[args.candidates:]
    args.cache = args.work / "cache"
    ensure_weights(args.weights)
    results: dict[str, Any] = {}
    for name in args.phases.split(","):
        log(f"phase {name}")
        results[name] = cached(args.work / f"{name}.json", lambda n=name: PHASES[n](args, results))
    if args.write:
        phase_write(args, {**{n: json.loads((args.work / f"{n}.json").read_text()) for n in PHASES}, **results})


if __name__ == "__main__":
    main()
