"""`mist-kit compare` on Caltech-101 VTAB-1k with DINOv2 ViT-S/14, for several device profiles, into BENCHMARKS.md.

One work directory serves every device: the first device trains, exports and measures every (method, codec) row;
each further device resumes the same rows (nothing retrained: the rows' settings are equal), re-judges them against
its own memory budget and re-times their edge graphs if its thread count differs. Each device gets its table, its
chosen row with the commands that rebuild it, and a committed Pareto plot (bench/results/compare-DEVICE.png).

Rows may come from several runs into the same work directory (for example a slow method run on its own while the
others run): `rows.jsonl` is the union, and every row records the settings it was made under.

    nice -n 10 .venv/bin/python bench/compare_caltech.py --devices rpi4,rpi-zero-2w \
        --methods linear,mist,vitsplit-lite,vitsplit,losa --codecs fp32,int8-channel,pool2-int4,cls-int8
    .venv/bin/python bench/compare_caltech.py --render    # the BENCHMARKS.md section from the kept rows only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import markdown_table, update_section

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MIST_KIT_SHARED", ROOT.parent / "shared")) / "data" / "caltech101-vtab1k"
RESULTS = ROOT / "bench" / "results"
WORK = ROOT / "bench" / "work" / "compare"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", default="rpi4,rpi-zero-2w")
    p.add_argument("--methods", default="linear,mist,vitsplit-lite,vitsplit,losa")
    p.add_argument("--codecs", default="fp32,int8-channel,pool2-int4,cls-int8")
    p.add_argument("--weights", default=str(ROOT / "bench" / "work" / "dinov2_vits14.safetensors"))
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--cache-dir", type=Path, default=None, help="feature cache root (default WORK/cache)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--train-precision", default="fp32")
    p.add_argument("--k", default=None, help="fixed depths, METHOD=INT,... (default: each method searches on val)")
    p.add_argument("--render", action="store_true", help="only write the BENCHMARKS.md section from kept rows")
    p.add_argument("--merge", default=None, help="with --render: comma-separated work dirs whose rows.jsonl are "
                   "joined into --work first (a slow method run on its own)")
    p.add_argument("--run-only", action="store_true", help="run the rows, do not write BENCHMARKS.md")
    return p.parse_args()


def _request(a: argparse.Namespace, device: str, methods: str) -> object:
    from mist_kit.compare import CompareRequest, parse_depths

    return CompareRequest(
        backbone="vit_small_patch14_dinov2", weights=a.weights, img_size=224, train=str(DATA / "train800.txt"),
        val=str(DATA / "val200.txt"), test=str(DATA / "test.txt"), out=a.work, methods=tuple(methods.split(",")),
        codecs=tuple(a.codecs.split(",")), device=device, epochs=a.epochs, cache_dir=a.cache_dir,
        train_precision=a.train_precision, depths=parse_depths(a.k), kept_only=a.render, progress=False)


def _fmt_row(r: dict, best: dict | None) -> list[object]:
    if r.get("error"):
        why = r["error"].split(";")[0][:100]  # the error's first clause: the reason, not the advice
        return [r["method"], r["codec"], "-", "-", "-", "-", "-", "-", "-", "-", "-", f"skipped: {why}"]
    mark = "**BEST**" if best is not None and r is best else ("yes" if r["fits"] else f"no ({r['why_not']})")
    return [r["method"], r["codec"], "-" if r["k"] is None else r["k"], f"{100 * r['val_top1']:.2f}",
            "-" if r.get("test_top1") is None else f"{100 * r['test_top1']:.2f}", f"{r['bytes_per_image']:,}",
            f"{r['bytes_per_image_zstd']:,.0f}", f"{r['edge_params']:,}", f"{r['edge_macs_per_image'] / 1e6:.1f}",
            f"{r['edge_ms']:.2f} ({r['edge_ms_threads']} thr)",
            f"{r['inference_rss_mb']:.0f} / {r['finetune_rss_mb']:.0f}", mark]


def _section(a: argparse.Namespace, results: dict[str, object], seconds: dict[str, float], load: str) -> str:
    head = ["method", "codec", "depth", "val %", "test %", "B/image", "zstd B/image", "edge params", "edge MMAC/img",
            "edge ms/img (host)", "peak RSS MB run-edge / finetune", "fits"]
    first = next(iter(results.values()))
    trained = [r for r in first.rows if not r.get("error")]
    settings = trained[0].get("settings", {}) if trained else {}
    parts = [
        "Protocol: one fp32 feature cache (train800, val200, test: every method's candidate tensors in one backbone "
        "pass); each method searches its own depth on train800 -> val200 with fp32 features (MIST k in {4, 8, 12}, "
        "vitsplit's split in {9, 10, 11}; vitsplit-lite, losa and linear have one candidate); every (method, codec) "
        "pair is then trained at that depth on the codec's round trip with `train`'s defaults except the refit "
        "(compare keeps val held out: it chooses the rows and gates the int8 export, so test numbers here are "
        "without refit), exported (`export --split --quantize int8`, the exporter's agreement gate), and "
        "measured. Val top-1 chooses; test (2,000 images) is reported and never used to choose. Edge ms: the "
        "bundle's int8 edge graph at batch 1 on this x86 host with the profile's threads capped at this host's 2 "
        "cores: a host timing that ranks rows, not the device's latency. Peak RSS: `run-edge` and `finetune-edge` "
        "(5 epochs) on 256 val rows, each in a fresh torch-free process. Bytes: per image on the wire, plain and "
        "zstd-3; the input image as JPEG q90 at 224 px is marked on the plots.",
        f"Settings recorded in the rows: epochs {settings.get('epochs')}, seed {settings.get('seed')}, training "
        f"precision {settings.get('train_precision', 'fp32')}, backbone precision "
        f"{settings.get('backbone_precision')}. Load: {load}. Seconds per row (training + export + measurement, "
        f"`seconds` in rows.jsonl) sum to {sum(r.get('seconds') or 0 for r in first.rows):,.0f} s for the first "
        "device; a further device re-judges the kept rows in " + ", ".join(
            f"{d}: {s:.0f} s" for d, s in list(seconds.items())[1:]) + ".",
    ]
    for device, res in results.items():
        parts.append(f"### {device} ({res.budget_mb} MB budget)\n\n" + markdown_table(
            head, [_fmt_row(r, res.best) for r in res.rows]))
        if res.best is not None:
            b = res.best
            parts.append(f"Chosen for {device} (best val top-1 that fits; ties to fewer bytes): **{b['method']}"
                         f"{'' if b['k'] is None else ' at depth ' + str(b['k'])} with {b['codec']}** "
                         f"(val {100 * b['val_top1']:.2f}%, test {100 * (b.get('test_top1') or 0):.2f}%, "
                         f"{b['bytes_per_image']:,} B/image). Reproduce:\n\n```bash\n" + "\n".join(res.reproduce)
                         + "\n```")
        else:
            parts.append(f"Nothing fits {device}.")
        parts.append(f"![compare {device}](bench/results/compare-{device}.png)")
    parts += [f"- {n}" for n in first.notes]
    return "\n\n".join(parts)


def main() -> None:
    a = _args()
    if not DATA.is_dir():
        raise SystemExit(f"error: {DATA} not found (needs ../shared/data/caltech101-vtab1k)")
    from mist_kit.compare import run_compare, write_plot

    RESULTS.mkdir(parents=True, exist_ok=True)
    if a.render and a.merge:
        from mist_kit.atomic import write_text

        a.work.mkdir(parents=True, exist_ok=True)
        lines = [ln for d in a.merge.split(",") if (Path(d) / "rows.jsonl").is_file()
                 for ln in (Path(d) / "rows.jsonl").read_text().splitlines()]
        write_text(a.work / "rows.jsonl", "\n".join(lines) + "\n")
    results, seconds = {}, {}
    for device in a.devices.split(","):
        t0 = time.perf_counter()
        res = run_compare(_request(a, device, a.methods), log=lambda m: print(m, flush=True))
        seconds[device] = time.perf_counter() - t0
        write_plot(res, RESULTS / f"compare-{device}.png")
        (a.work / f"result-{device}.json").write_text(json.dumps(res.to_dict(), indent=1))
        results[device] = res
    if a.run_only:
        return
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) + " (1/5/15-min load average at the end)"
    cmd = ("nice -n 10 .venv/bin/python bench/compare_caltech.py " + " ".join(sys.argv[1:])).strip()
    update_section("compare", "compare: which method, depth and codec for rpi4 and rpi-zero-2w (Caltech-101, "
                   "DINOv2 ViT-S/14)", _section(a, results, seconds, load), cmd)


if __name__ == "__main__":
    main()
