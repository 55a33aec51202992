"""The price of one cached LAE training epoch in backbone passes, timed interleaved (A, B, A, B) on this machine.

A = the fp32 backbone (decode + preprocess + 12 blocks of DINOv2 ViT-S/14) over 32 real images, per image.
B = LAE training (k=12, batch 32, forward + backward + AdamW) from cached fp32 gathers, per image.
Reports medians and the ratio (800 x B) / (1000 x A): one LAE epoch over train800 as a fraction of one backbone pass
over the 1,000 training images, which turns `accuracy_caltech.py`'s epoch counts into backbone passes.

    nice -n 10 .venv/bin/python bench/accuracy_cost.py [--rounds 3] [--threads 1]
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
WORK = ROOT / "bench" / "work"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data/caltech101-vtab1k")
    ap.add_argument("--weights", default=str(WORK / "dinov2_vits14.safetensors"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from mist_kit.backbone import load_backbone, run_backbone
    from mist_kit.data import load_image_list, load_pixels
    from mist_kit.edge import create_edge_method

    model, spec = load_backbone("vit_small_patch14_dinov2", img_size=224, weights=args.weights)
    images = load_image_list(Path(args.data) / "train800.txt").paths[:32]
    cache = sorted(p for p in (WORK / "accuracy" / "cache").glob("train800val200-*")
                   if p.is_dir() and not p.name.endswith("-bf16"))[0]
    g = np.asarray(np.load(cache / "g12.npy", mmap_mode="r")[:256], dtype=np.float32)
    y = torch.as_tensor(np.load(cache / "labels.npy")[:256], dtype=torch.long)
    torch.manual_seed(0)
    edge = create_edge_method("mist", embed_dim=384, num_tokens=257, num_prefix_tokens=1, num_classes=101)
    opt = torch.optim.AdamW(edge.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def backbone() -> float:
        start = time.perf_counter()
        for i in range(0, len(images), 16):
            px = np.stack([load_pixels(p, 224, spec.mean, spec.std) for p in images[i: i + 16]])
            run_backbone(model, torch.from_numpy(px), (4, 8, 12), "fp32")
        return (time.perf_counter() - start) / len(images)

    def lae() -> float:
        edge.train()
        start = time.perf_counter()
        for i in range(0, len(g), 32):
            loss = loss_fn(edge(torch.from_numpy(g[i: i + 32])), y[i: i + 32])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (time.perf_counter() - start) / len(g)

    backbone(), lae()  # warm-up
    a, b = [], []
    for _ in range(args.rounds):
        a.append(backbone())
        b.append(lae())
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"backbone fp32 {ma * 1000:.1f} ms/image (pass over 1,000 images {ma * 1000:.0f} s); LAE train "
          f"{mb * 1000:.2f} ms/image (epoch over 800 {mb * 800:.1f} s); one LAE epoch = {mb * 800 / (ma * 1000):.4f} "
          f"backbone passes; threads {args.threads}; rounds {args.rounds}")
    out = {"backbone_s_per_image": ma, "lae_s_per_image": mb, "epoch_in_passes": mb * 800 / (ma * 1000),
           "threads": args.threads, "rounds": args.rounds, "backbone_all": a, "lae_all": b}
    (WORK / "accuracy" / "cost.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
