"""The unit of training cost: seconds of one fp32 backbone pass over train800 + val200 (1,000 images), 1 thread.

Times the backbone (decode + preprocess + 12 blocks of DINOv2 ViT-S/14, every MIST and linear tensor) over `--images`
real train800 images in batches of 16, `--rounds` times, and scales the median to 1,000 images. `train`'s reported
`train_seconds` (k search + refit, from the cache) divided by this is the training cost in backbone passes; run it
on the same machine at the same load as the training it prices.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/accuracy_cost.py --weights W [--images 48 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data/caltech101-vtab1k")
    ap.add_argument("--weights", default="/work/cache/dinov2_vits14.safetensors")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "work" / "defaults" / "cost.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from mist_kit.backbone import load_backbone
    from mist_kit.backbone_run import run_backbone
    from mist_kit.data import load_image_list, load_pixels
    from mist_kit.runtime.plan import TensorSource

    model, spec = load_backbone("vit_small_patch14_dinov2", img_size=224, weights=args.weights)
    images = load_image_list(str(Path(args.data) / "train800.txt")).paths[: args.images]
    sources = [TensorSource("gather", k) for k in (4, 8, 12)] + [TensorSource("final_cls")]

    def once() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(images), 16):
                px = np.stack([load_pixels(p, 224, spec.mean, spec.std) for p in images[i: i + 16]])
                run_backbone(model, torch.from_numpy(px), sources, "fp32")
        return (time.perf_counter() - start) / len(images)

    once()  # warm-up
    per = [once() for _ in range(args.rounds)]
    med = statistics.median(per)
    out = {"backbone_s_per_image": med, "pass_1000_s": med * 1000, "all": per, "threads": args.threads,
           "images": len(images), "rounds": args.rounds}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"backbone fp32 {med * 1000:.1f} ms/image: one pass over 1,000 images = {med * 1000:.0f} s "
          f"(threads {args.threads}, {len(images)} images x {args.rounds} rounds)")


if __name__ == "__main__":
    main()
