"""Training-loop speed of the LAE (issue 14): seconds per epoch, formula forward vs restructured forward.

Caltech-shaped random features [800, 257, 384], batch 32, AdamW, 1 thread; epochs interleaved (old, new, old,
new...), medians reported. Only the model's forward/backward/step is timed: toolkit/train.py's own overheads
(data loading from the cache, evaluation) are not in it.

    nice -n 10 .venv/bin/python bench/speed_train.py [--epochs 2]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--n", type=int, default=800)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from mist_kit.edge import create_edge_method
    from mist_kit.edge.lae import reference_embed
    from mist_kit.runtime.plan import BackboneShape

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, 257, 384, generator=gen)
    y = torch.randint(0, 102, (args.n,), generator=gen)
    torch.manual_seed(0)
    model = create_edge_method("mist", backbone=BackboneShape(384, 257, 1, 12), depth=4, num_classes=102, params={})
    forwards = {"formula (old)": lambda b: model.head(reference_embed(model, {"gather": b})),
                "restructured (SDPA, fused qkv, cls-only last block)": lambda b: model({"gather": b})}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times: dict[str, list[float]] = {k: [] for k in forwards}
    load = os.getloadavg()
    for _ in range(args.epochs):
        for name, fwd in forwards.items():
            perm = torch.randperm(args.n, generator=gen)
            t0 = time.perf_counter()
            for i in range(0, args.n, 32):
                idx = perm[i:i + 32]
                loss = torch.nn.functional.cross_entropy(fwd(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            times[name].append(time.perf_counter() - t0)
    for name, t in times.items():
        print(f"{name:55s} {np.median(t):6.2f} s/epoch  (epochs: {', '.join(f'{v:.2f}' for v in t)})")
    print(f"load avg before {load}, after {os.getloadavg()}")


if __name__ == "__main__":
    main()
