"""On-device fine-tuning cost (issue 14 item 5): `mist-kit finetune-edge` on 1,000 samples, before/after.

What it measures, every job in its own fresh process (peak RSS = the CLI's `peak_rss_mb`, VmHWM of that process):
- `finetune-edge --json` with the CLI of a BEFORE checkout (default /work/main) and of this checkout, interleaved
  A, B, A, B, ... on the same features file and bundle; embed_s, train_s, wall and peak RSS per run;
- the batch-1 latency of the same edge graph with the same session settings (1,000 single-sample calls, median),
  so the embedding time can be compared with 1,000 batch-1 latencies.

The 1,000-sample features file is written from the shared feature cache (train800 + val200) through the bundle's
own codecs (`encode_all`), i.e. exactly what `mist-kit extract` would send, without 1,000 ViT passes.

Command: `python bench/finetune_edge.py --bundle B --cache /work/cache/caltech/train800-* --cache .../val200-*`
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

LATENCY = """
import json, sys, time
import numpy as np
from mist_kit.devices.profiles import get_device
from mist_kit.runtime.bundle import open_edge_bundle
from mist_kit.runtime.edge_session import EdgeSession, SessionSettings
from mist_kit.runtime.features_file import read_features
b = open_edge_bundle(sys.argv[1], variant="int8")
s = EdgeSession(b, SessionSettings.from_profile(get_device(sys.argv[3]), int(sys.argv[4]) or None))
ff = read_features(sys.argv[2], b.manifest)
rows = ff.read(0, ff.n)
ms = []
for i in range(ff.n):
    one = {k: v[i:i + 1] for k, v in rows.items()}
    t0 = time.perf_counter(); s.embed(one); ms.append((time.perf_counter() - t0) * 1e3)
print(json.dumps({"median_ms": float(np.median(ms)), "mean_ms": float(np.mean(ms)), "n": len(ms),
                  "threads": s.threads}))
"""


def features_from_cache(bundle: Path, caches: list[Path], out: Path) -> Path:
    """A labelled features file of every valid cached row, encoded with the bundle's codecs (any codec)."""
    from mist_kit.cache import CachedSplit
    from mist_kit.runtime.codec.plan_codecs import encode_all, plan_codecs
    from mist_kit.runtime.features_file import FeaturesWriter
    from mist_kit.runtime.manifest import manifest_codecs, manifest_plan, read_manifest

    man = read_manifest(bundle)
    plan = manifest_plan(man)
    codecs = plan_codecs(plan, manifest_codecs(man), int(man["backbone"]["num_prefix_tokens"]))
    sources = {t.name: str(t.source) for t in plan.tensors}
    splits = [CachedSplit(c, json.loads((c / "meta.json").read_text())) for c in caches]
    ids = [f"{sp.path.name}/{i}" for sp in splits for i in sp.valid()]
    with FeaturesWriter(out, man, ids, with_labels=True) as writer:
        for sp in splits:
            arrays, labels = {n: sp.array(src) for n, src in sources.items()}, np.asarray(sp.labels())
            valid = sp.valid()
            for start in range(0, len(valid), 64):
                idx = valid[start:start + 64]
                sent = {n: np.asarray(a[idx], dtype=np.float32) for n, a in arrays.items()}
                writer.write(encode_all(codecs, sent), labels[idx])
    return out


def run_json(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    rep["wall_s"] = round(wall, 3)
    return rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--cache", type=Path, action="append", required=True, help="cache split dirs (in order)")
    ap.add_argument("--features", type=Path, help="reuse this features file instead of writing one")
    ap.add_argument("--before", type=Path, default=Path("/work/main"), help="checkout whose CLI is 'before'")
    ap.add_argument("--device", default="rpi4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=1000, help="samples (first N valid cached rows)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ft-bench-"))
    feats = args.features or features_from_cache(args.bundle, args.cache, work / "ft.safetensors")
    cli = {"before": [str(args.before / ".venv/bin/mist-kit")], "after": [str(Path(PY).parent / "mist-kit")]}
    variants = {"before": cli["before"], "after": cli["after"], "after, 1 thread": [*cli["after"], "--threads", "1"]}
    runs: dict[str, list[dict]] = {**{v: [] for v in variants}, "latency": [], "latency, 1 thread": []}
    print(f"uptime: {os.popen('uptime').read().strip()}", file=sys.stderr)
    for r in range(args.rounds):
        for name, cmd in variants.items():
            rep = run_json([cmd[0], "finetune-edge", *cmd[1:], "--device", args.device, "--bundle", str(args.bundle),
                            "--features", str(feats), "--state", str(work / f"{name}{r}"), "--json"])
            runs[name].append({k: rep.get(k) for k in ("embed_s", "train_s", "wall_s", "peak_rss_mb", "labelled",
                                                        "epochs_run", "top1_before", "top1_after", "threads",
                                                        "graph", "head_version")})
            print(name, runs[name][-1], file=sys.stderr)
        for name, threads in (("latency", "0"), ("latency, 1 thread", "1")):
            runs[name].append(run_json([PY, "-c", LATENCY, str(args.bundle), str(feats), args.device, threads]))
            print(name, runs[name][-1], file=sys.stderr)
    print(f"uptime: {os.popen('uptime').read().strip()}", file=sys.stderr)
    keys = ("embed_s", "train_s", "wall_s", "peak_rss_mb")
    med = {name: {k: float(np.median([r[k] for r in runs[name]])) for k in keys} for name in variants}
    lat = {name: {k: float(np.median([r[k] for r in runs[name]])) for k in ("median_ms", "mean_ms")}
           for name in ("latency", "latency, 1 thread")}
    n = runs["after"][0]["labelled"]
    ratio = {}
    for name in variants:
        ref = lat["latency, 1 thread" if "1 thread" in name else "latency"]
        ratio[name] = {f"vs {n} x {k}": round(med[name]["embed_s"] / (n * v / 1e3), 3) for k, v in ref.items()}
    summary = {"samples": n, "median": med, "batch1": lat, "embed_vs_batch1": ratio, "runs": runs}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
