"""Build the feature caches the accuracy benches read (the backbone runs once per image, never again).

Caches train800val200 (1,000 images) and test (2,000) of Caltech-101 VTAB-1k with DINOv2 ViT-S/14 at ks (4, 8, 12),
through the library's own `cache_features` (so these are exactly the files `mist-kit train` would write), at
`--precision` (bf16 by default: bfloat16 matrix products, ~2.4x faster on this CPU). With `--check-fp32`, val200 is
also cached in fp32 so `accuracy_caltech.py --precision-check` can measure what bf16 features do to accuracy.
Train800 and val200 are the first 800 and last 200 rows of train800val200 (checked by path), so they need no pass
of their own.

    nice -n 10 .venv/bin/python bench/accuracy_cache.py [--precision bf16] [--check-fp32]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_CANDIDATES = [p / "shared" / "data" / "caltech101-vtab1k" for p in (ROOT.parent, ROOT.parent.parent)]
DATA = next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])
BACKBONE = "vit_small_patch14_dinov2"
KS = (4, 8, 12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--work", default=str(ROOT / "bench" / "work" / "accuracy"))
    ap.add_argument("--weights", default=str(ROOT / "bench" / "work" / "dinov2_vits14.safetensors"))
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    ap.add_argument("--check-fp32", action="store_true", help="also cache val200 in fp32 (precision check)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from mist_kit.backbone import load_backbone
    from mist_kit.data import load_image_list
    from mist_kit.featurize import cache_features

    if not Path(args.weights).is_file():
        raise SystemExit(f"error: {args.weights}: no weights; build them with "
                         "python ../shared/tools/dinov2_small_weights.py OUT.safetensors")
    model, spec = load_backbone(BACKBONE, img_size=224, weights=args.weights)
    data, root = Path(args.data), Path(args.work) / "cache"
    jobs = [("train800val200.txt", args.precision), ("test.txt", args.precision)]
    if args.check_fp32:
        jobs.append(("val200.txt", "fp32"))
    timings = {}
    for name, precision in jobs:
        images = load_image_list(data / name)
        start = time.perf_counter()
        split, secs, skipped = cache_features(model, spec, images, root, KS, progress=False, precision=precision,
                                              log=lambda m: print(m, flush=True))
        timings[f"{name}:{precision}"] = {"path": str(split.path), "images": len(images), "compute_s": secs,
                                          "wall_s": time.perf_counter() - start, "skipped": skipped}
        print(f"{name} {precision}: {len(images)} images, {secs:.0f} s computing -> {split.path}", flush=True)
    out = Path(args.work) / "caches.json"
    prev = json.loads(out.read_text()) if out.is_file() else {}
    prev.update(timings)
    out.write_text(json.dumps(prev, indent=1))


if __name__ == "__main__":
    sys.exit(main())
