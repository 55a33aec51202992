"""Training-loop speed (issue 14 item 4): the LAE step, `fit()` epochs from the real cache, and backbone passes.

Three modes, each interleaved where it compares variants, 1 torch thread everywhere:

    nice -n 10 .venv/bin/python bench/speed_train.py forward [--epochs 3]
        formula forward vs restructured forward (random Caltech-shaped features, model step only)
    nice -n 10 .venv/bin/python bench/speed_train.py fit [--rounds 2 --epochs 3]
        `toolkit/train.fit` epochs on the cached ViT-S/14 gathers of train800 (k = 12, eval on val200), the
        previous loop (float16 gather + float32 scatter in `InputRows.batch`, glibc's default mmap/trim) vs the
        current one, each run in its own fresh process (A, B, A, B); wall and CPU seconds per epoch, final weights
        compared
    nice -n 10 .venv/bin/python bench/speed_train.py ratio
        in ONE run: one fp32 backbone pass over 48 of train800+val200 (decode + preprocess + blocks, scaled to
        1,000 images), then `mist-kit train --k auto` with the default recipe from the shared cache, then the
        backbone timing again; ratio = train_seconds / backbone-pass seconds, same threads (1); and the same
        ratio in CPU seconds (the whole train command's user + sys against the pass's process time), which the
        host's load does not inflate

--cache ROOT defaults to /work/cache/caltech (the shared fp32 cache), --weights to
/work/cache/dinov2_vits14.safetensors.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "caltech101-vtab1k"
if not DATA.is_dir():
    DATA = Path("/work/shared/data/caltech101-vtab1k")


def forward_mode(args: argparse.Namespace) -> None:
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


def _old_batch(self, idx, transforms=None):  # the previous InputRows.batch, verbatim
    idx = np.asarray(idx, dtype=np.int64)
    seg = np.searchsorted(self._starts, idx, side="right") - 1
    out = {}
    for name in self.names:
        parts = np.empty((len(idx), *self.shape(name)), dtype=np.float32)
        for s in np.unique(seg):
            arrays, rows = self.segments[s]
            where = np.flatnonzero(seg == s)
            local = rows[idx[where] - self._starts[s]]
            order = np.argsort(local, kind="stable")
            parts[where[order]] = np.asarray(arrays[name][local[order]], dtype=np.float32)
        fn = (transforms or {}).get(name)
        out[name] = np.asarray(fn(parts), dtype=np.float32) if fn is not None else parts
    return out


def fit_child(variant: str, cache: Path, epochs: int) -> None:
    """One `fit` run in this (fresh) process; prints a JSON line."""
    torch.set_num_threads(1)
    import mist_kit.cache as cache_mod
    import mist_kit.train as train_mod
    from mist_kit.cache import CachedSplit
    from mist_kit.edge import create_edge_method
    from mist_kit.runtime.plan import BackboneShape

    if variant == "old":
        cache_mod.InputRows.batch = _old_batch
        train_mod.reuse_freed_memory = contextlib.nullcontext
    splits = {}
    for stem in ("train800", "val200"):
        path = next(cache.glob(f"{stem}-*[0-9a-f]"))
        splits[stem] = CachedSplit(path, json.loads((path / "meta.json").read_text()))
    tx, vx = (splits[s].inputs({"gather": "gather:12"}) for s in ("train800", "val200"))
    ytr, yva = (np.asarray(splits[s].labels())[splits[s].valid()] for s in ("train800", "val200"))
    torch.manual_seed(0)
    model = create_edge_method("mist", backbone=BackboneShape(384, 257, 1, 12), depth=12, num_classes=102,
                               params={})
    marks = [(time.perf_counter(), time.process_time())]
    train_mod.fit(model, tx, ytr, train_mod.TrainParams(epochs=epochs), vx, yva,
                  on_epoch=lambda e, rows: marks.append((time.perf_counter(), time.process_time())))
    wall = [round(b[0] - a[0], 3) for a, b in itertools.pairwise(marks)]
    cpu = [round(b[1] - a[1], 3) for a, b in itertools.pairwise(marks)]
    checksum = float(sum(v.double().abs().sum() for v in model.state_dict().values()))
    print(json.dumps({"variant": variant, "wall": wall, "cpu": cpu, "checksum": checksum}))


def fit_mode(args: argparse.Namespace) -> None:
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    print(f"uptime: {os.popen('uptime').read().strip()}")
    for _ in range(args.rounds):
        for variant in runs:
            out = subprocess.run([sys.executable, __file__, "fit-child", "--variant", variant, "--cache",
                                  str(args.cache), "--epochs", str(args.epochs)], capture_output=True, text=True,
                                 check=True).stdout
            runs[variant].append(json.loads(out.strip().splitlines()[-1]))
            print(runs[variant][-1], flush=True)
    print(f"uptime: {os.popen('uptime').read().strip()}")
    for variant, rs in runs.items():  # epochs 2.. (epoch 1 also pays torch's one-time imports)
        wall = [w for r in rs for w in r["wall"][1:]]
        cpu = [c for r in rs for c in r["cpu"][1:]]
        print(f"{variant}: median epoch (2..) wall {np.median(wall):.2f} s, cpu {np.median(cpu):.2f} s; "
              f"epoch 1 wall {np.median([r['wall'][0] for r in rs]):.2f} s; checksums "
              f"{sorted({r['checksum'] for r in rs})}")


def time_backbone(weights: Path, images: list[Path]) -> tuple[float, float]:
    """(wall, CPU) seconds per image of one cached-style fp32 backbone pass (decode + preprocess + every block the
    k candidates need), as bench/train_caltech.time_backbone measures it, with the CPU clock beside the wall one."""
    sys.path.insert(0, str(ROOT / "bench"))
    import train_caltech as tc

    from mist_kit.backbone import load_backbone
    from mist_kit.backbone_run import run_backbone
    from mist_kit.data import load_pixels

    model, spec = load_backbone("vit_small_patch14_dinov2", img_size=224, weights=weights)
    sources = tc.mist_sources(spec)
    run_backbone(model, torch.from_numpy(np.stack([load_pixels(images[0], 224, spec.mean, spec.std)])), sources,
                 "fp32")  # warm-up
    w0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(images), 16):
        px = np.stack([load_pixels(p, 224, spec.mean, spec.std) for p in images[i: i + 16]])
        run_backbone(model, torch.from_numpy(px), sources, "fp32")
    return (time.perf_counter() - w0) / len(images), (time.process_time() - c0) / len(images)


def ratio_mode(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "bench"))

    from mist_kit.data import load_image_list

    images = list(load_image_list(DATA / "train800val200.txt").paths)
    subset = images[:args.subset]
    print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)
    before, cpu_before = time_backbone(args.weights, subset)
    print(f"backbone fp32 {before * 1e3:.1f} ms/image (1 thread, {len(subset)} images)", flush=True)
    runs = []
    for i, variant in enumerate(args.variant_flags or [""]):
        flags = variant.split()
        cmd = [str(Path(sys.executable).parent / "mist-kit"), "train", "--backbone", "vit_small_patch14_dinov2",
               "--weights", str(args.weights), "--img-size", "224", "--train", str(DATA / "train800.txt"), "--val",
               str(DATA / "val200.txt"), "--k", "auto", "--cache-dir", str(args.cache), "--out",
               str(args.out / f"variant-{i}"), "--json", *flags]
        print(" ".join(cmd), flush=True)
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the whole command: imports and cache checks included
        runs.append((variant, json.loads(proc.stdout.strip().splitlines()[-1]), wall,
                     cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime))
    after, cpu_after = time_backbone(args.weights, subset)
    print(f"backbone fp32 {after * 1e3:.1f} ms/image after training", flush=True)
    print(f"uptime: {os.popen('uptime').read().strip()}")
    per_image = float(np.mean([before, after]))
    cpu_per_image = float(np.mean([cpu_before, cpu_after]))
    for variant, rep, wall, train_cpu_s in runs:
        print(json.dumps({"flags": variant, "train_seconds": rep["train_seconds"],
                          "cache_seconds": rep["cache_seconds"], "command_wall_s": round(wall, 1), "k": rep["k"],
                          "val_top1": rep["val_top1"], "refit": rep.get("refit"),
                          "refit_epochs": rep.get("refit_epochs"), "epochs_run": rep.get("epochs_run"),
                          "k_search": rep.get("k_search"),
                          "backbone_ms_per_image": [round(before * 1e3, 2), round(after * 1e3, 2)],
                          "images": len(images), "backbone_pass_s": round(per_image * len(images), 1),
                          "passes": round(rep["train_seconds"] / (per_image * len(images)), 3),
                          "command_cpu_s": round(train_cpu_s, 1),
                          "backbone_cpu_ms_per_image": [round(cpu_before * 1e3, 2), round(cpu_after * 1e3, 2)],
                          "passes_cpu": round(train_cpu_s / (cpu_per_image * len(images)), 3)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("forward", "fit", "fit-child", "ratio"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--n", type=int, default=800)
    ap.add_argument("--variant", choices=("old", "new"), default="new")
    ap.add_argument("--cache", type=Path, default=Path("/work/cache/caltech"))
    ap.add_argument("--weights", type=Path, default=Path("/work/cache/dinov2_vits14.safetensors"))
    ap.add_argument("--subset", type=int, default=48)
    ap.add_argument("--variant-flags", action="append",
                    help="ratio: extra `mist-kit train` flags of one variant (repeat: each variant runs in turn "
                         "between the two backbone timings; default: one run with the defaults)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "work" / "speed_ratio")
    args = ap.parse_args()
    if args.mode == "forward":
        torch.set_num_threads(1)
        forward_mode(args)
    elif args.mode == "fit":
        fit_mode(args)
    elif args.mode == "fit-child":
        fit_child(args.variant, args.cache, args.epochs)
    else:
        ratio_mode(args)


if __name__ == "__main__":
    main()
