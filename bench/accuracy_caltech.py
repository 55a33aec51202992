"""Accuracy levers for MIST vs a strong linear probe, from one feature cache, 3 seeds, chosen on val only.

Reads the caches written by `bench/accuracy_cache.py` (train800val200 + test of Caltech-101 VTAB-1k, DINOv2
ViT-S/14, ks 4/8/12) and never runs the backbone. Every job is (task, lever, seed): search on train -> val with
early stopping (the val top-1 reported is the best epoch's), then test scored once on the state chosen on val
(`refit off`) and once after a refit on train + val for the chosen number of epochs (`refit on`, exactly what
`mist_kit.pipeline.run_training --refit` does). Hyperparameter choices (the lr grid, the probe's C) look at val only.

Tasks: `caltech101` (train800 / val200 / test 2000) and the small tasks in bench/splits/ (cut from the same visible
images: train/val from train800val200, test from test.txt), whose features are rows of the same caches.

Results append to bench/work/accuracy/results.jsonl (one line per finished job; finished jobs are skipped, so a
run resumes). `--report` aggregates them (mean ± half-range over seeds) into the `accuracy` section of
BENCHMARKS.md.

    nice -n 10 .venv/bin/python bench/accuracy_caltech.py --jobs caltech101:default,reg --seeds 0,1,2
    .venv/bin/python bench/accuracy_caltech.py --report
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "accuracy"
SPLITS = ROOT / "bench" / "splits"
sys.path.insert(0, str(ROOT / "bench"))

from mist_kit.edge import create_edge_method  # noqa: E402
from mist_kit.edge.base import EdgeMethod  # noqa: E402
from mist_kit.linear_probe import DEFAULT_CS, fit_linear_probe  # noqa: E402
from mist_kit.train import TrainParams, fit, fit_candidates, predict_logits, top1  # noqa: E402

REGULARISED = {"epochs": 20, "patience": 4, "lr": 3e-3, "weight_decay": 0.05, "label_smoothing": 0.1}


# --------------------------------------------------------------------------------------------------- extensions
class WithFinalCls(EdgeMethod):
    """Our extension, not the paper's: the head also sees the backbone's final-norm cls token.

    Input is the gather g_k [B, T, D] with the final cls token appended as token T+1 ([B, T+1, D]); the embedding
    is concat(LAE pooled embedding, final cls) [B, 2D], so a linear probe on the final cls token is inside this
    model's hypothesis space. Cost: 384 more values per image sent to the device (768 B fp16), and a 2D-wide head.
    """

    input_kind = "gather"

    def __init__(self, inner: EdgeMethod, dropout: float) -> None:
        super().__init__(embed_dim=inner.embed_dim, num_tokens=inner.num_tokens + 1,
                         num_prefix_tokens=inner.num_prefix_tokens, num_classes=inner.num_classes)
        self.inner = inner
        self.inner.head = nn.Identity()  # type: ignore[assignment]  # only its embed is used
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(2 * inner.embed_dim, inner.num_classes)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        g, cls = features[:, :-1], features[:, -1]  # (B, T, D), (B, D)
        return torch.cat([self.inner.embed(g), self.drop(cls)], dim=1)  # (B, 2D)


class TokenDrop(EdgeMethod):
    """Feature-level augmentation with no extra backbone pass: in training, each batch keeps the prefix tokens
    and a random `keep` fraction of patch tokens (the LAE attends over any token count); eval sees all tokens."""

    input_kind = "gather"

    def __init__(self, inner: EdgeMethod, keep: float) -> None:
        super().__init__(embed_dim=inner.embed_dim, num_tokens=inner.num_tokens,
                         num_prefix_tokens=inner.num_prefix_tokens, num_classes=inner.num_classes)
        self.inner, self.keep = inner, keep
        self.head = inner.head

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        if self.training:
            p = self.num_prefix_tokens
            n = features.shape[1] - p
            idx = torch.randperm(n)[: max(1, round(self.keep * n))].sort().values + p
            features = torch.cat([features[:, :p], features[:, idx]], dim=1)  # (B, p + keep*n, D)
        return self.inner.embed(features)


# --------------------------------------------------------------------------------------------------- levers
@dataclass(frozen=True)
class Recipe:
    """One MIST training recipe: TrainParams overrides, LAE params, and an optional extension."""

    params: dict[str, Any] = field(default_factory=dict)
    method: dict[str, Any] = field(default_factory=dict)
    ext: str | None = None  # None | "cls" | "tokdrop0.5"
    ks: tuple[int, ...] = (12,)
    min_steps: int = 0  # lengthen epochs/patience/warmup by one factor so a small task gets >= this many steps

    def key(self) -> str:
        d = {"p": self.params, "m": self.method, "e": self.ext, "ks": list(self.ks)}
        if self.min_steps:
            d["s"] = self.min_steps
        return json.dumps(d, sort_keys=True)

    def train_params(self, n: int, seed: int, epochs: int | None = None) -> TrainParams:
        """TrainParams for n training rows; with min_steps, training length counts optimiser steps, not epochs."""
        base = TrainParams(**{**self.params, "seed": seed})
        steps = math.ceil(n / base.batch_size)
        f = max(1.0, self.min_steps / (steps * base.epochs)) if self.min_steps else 1.0
        over = {"epochs": math.ceil(base.epochs * f), "patience": math.ceil(base.patience * f),
                "warmup_epochs": math.ceil(base.warmup_epochs * f)}
        if epochs is not None:
            over["epochs"] = max(1, epochs)
        return TrainParams(**{**base.__dict__, **over})


REG = Recipe(params=REGULARISED, method={"dropout": 0.1})
LEVERS: dict[str, Recipe | list[Recipe]] = {
    "default": Recipe(),  # `mist-kit train --method mist` as typed (TrainParams / CLI defaults)
    "reg": REG,
    "reg_cls": Recipe(params=REGULARISED, method={"dropout": 0.1}, ext="cls"),
    "reg_tokdrop": Recipe(params=REGULARISED, method={"dropout": 0.1}, ext="tokdrop0.5"),
    "reg_lrgrid": [Recipe(params={**REGULARISED, "lr": lr}, method={"dropout": 0.1}) for lr in (1e-3, 3e-3, 1e-2)],
    "reg_cls_lrgrid": [Recipe(params={**REGULARISED, "lr": lr}, method={"dropout": 0.1}, ext="cls")
                       for lr in (1e-3, 3e-3, 1e-2)],
    "reg_cls_steps": Recipe(params=REGULARISED, method={"dropout": 0.1}, ext="cls", min_steps=500),
    "reg_steps": Recipe(params=REGULARISED, method={"dropout": 0.1}, min_steps=500),
    "reg_kauto": Recipe(params={**REGULARISED, "prune_margin": 0.1, "prune_after": 3}, method={"dropout": 0.1},
                        ks=(4, 8, 12)),
    "reg_cls_kauto": Recipe(params={**REGULARISED, "prune_margin": 0.1, "prune_after": 3}, method={"dropout": 0.1},
                            ext="cls", ks=(4, 8, 12)),
}


# --------------------------------------------------------------------------------------------------- data
@dataclass
class Task:
    name: str
    tr_rows: np.ndarray  # rows of the train800val200 cache
    va_rows: np.ndarray
    te_rows: np.ndarray  # rows of the test cache
    tr_y: np.ndarray
    va_y: np.ndarray
    te_y: np.ndarray
    num_classes: int


def _cache(name: str, precision: str) -> Path:
    suffix = "" if precision == "fp32" else f"-{precision}"
    hits = sorted((WORK / "cache").glob(f"{name}-*{suffix}"))
    hits = [h for h in hits if h.name.endswith(suffix) and (h / "meta.json").is_file()
            and (precision != "fp32" or not h.name.endswith("-bf16"))]
    if not hits:
        raise SystemExit(f"error: no {precision} cache for {name} under {WORK / 'cache'}; run bench/accuracy_cache.py")
    return hits[0]


def _list_rows(list_file: Path, index: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    rows, labels = [], []
    for line in list_file.read_text().splitlines():
        if line.strip():
            rel, lab = line.rsplit(" ", 1)
            rows.append(index[rel])
            labels.append(int(lab))
    return np.asarray(rows), np.asarray(labels)


def load_task(name: str, data: Path, precision: str) -> Task:
    trv, te = _cache("train800val200", precision), _cache("test", precision)
    trv_lines = [ln.split(" ")[0] for ln in (data / "train800val200.txt").read_text().splitlines() if ln.strip()]
    te_lines = [ln.split(" ")[0] for ln in (data / "test.txt").read_text().splitlines() if ln.strip()]
    if name == "caltech101":
        y, yt = np.load(trv / "labels.npy"), np.load(te / "labels.npy")
        return Task(name, np.arange(800), np.arange(800, 1000), np.arange(len(yt)), y[:800], y[800:], yt, 101)
    folder = SPLITS / name
    ti, tei = {p: i for i, p in enumerate(trv_lines)}, {p: i for i, p in enumerate(te_lines)}
    tr, tr_y = _list_rows(folder / "train.txt", ti)
    va, va_y = _list_rows(folder / "val.txt", ti)
    tst, te_y = _list_rows(folder / "test.txt", tei)
    k = len([c for c in (folder / "classes.txt").read_text().splitlines() if c.strip()])
    return Task(name, tr, va, tst, tr_y, va_y, te_y, k)


class Features:
    """Cached features of one task, loaded into float32 memory once (train/val) or read per batch (test)."""

    def __init__(self, task: Task, precision: str) -> None:
        self.task = task
        self.trv, self.te = _cache("train800val200", precision), _cache("test", precision)
        self._mem: dict[Any, np.ndarray] = {}

    def gather(self, split: str, k: int, with_cls: bool) -> np.ndarray:
        key = (split, k, with_cls)
        if key not in self._mem:
            cache = self.te if split == "test" else self.trv
            rows = {"train": self.task.tr_rows, "val": self.task.va_rows, "test": self.task.te_rows}[split]
            g = np.load(cache / f"g{k}.npy", mmap_mode="r")
            x = np.asarray(g[np.sort(rows)], dtype=np.float16 if split == "test" else np.float32)
            x = x[np.argsort(np.argsort(rows))]  # back to the task's row order
            if with_cls:
                c = np.asarray(np.load(cache / "cls.npy", mmap_mode="r")[rows], dtype=x.dtype)
                x = np.concatenate([x, c[:, None]], axis=1)
            self._mem[key] = x
        return self._mem[key]

    def cls(self, split: str) -> np.ndarray:
        cache = self.te if split == "test" else self.trv
        rows = {"train": self.task.tr_rows, "val": self.task.va_rows, "test": self.task.te_rows}[split]
        return np.asarray(np.load(cache / "cls.npy", mmap_mode="r")[rows], dtype=np.float32)


# --------------------------------------------------------------------------------------------------- training
def _model(recipe: Recipe, num_classes: int, seed: int) -> EdgeMethod:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        inner = create_edge_method("mist", embed_dim=384, num_tokens=257, num_prefix_tokens=1,
                                   num_classes=num_classes, **recipe.method)
        if recipe.ext == "cls":
            return WithFinalCls(inner, recipe.method.get("dropout", 0.0))
        if recipe.ext and recipe.ext.startswith("tokdrop"):
            return TokenDrop(inner, float(recipe.ext[len("tokdrop"):]))
        return inner


def search(feats: Features, recipe: Recipe, seed: int) -> dict[str, Any]:
    """Train every candidate k on train, early-stopped on val; score the chosen state on test (refit off)."""
    t = feats.task
    wc = recipe.ext == "cls"
    params = recipe.train_params(len(t.tr_y), seed)
    models = {k: _model(recipe, t.num_classes, seed) for k in recipe.ks}
    tx = {k: feats.gather("train", k, wc) for k in recipe.ks}
    vx = {k: feats.gather("val", k, wc) for k in recipe.ks}
    start = time.perf_counter()
    res = fit_candidates(models, tx, t.tr_y, params, vx, t.va_y)
    seconds = time.perf_counter() - start
    k = min(recipe.ks, key=lambda k: (-(res[k].best_val_top1 or 0.0), k))
    test = top1(predict_logits(models[k], feats.gather("test", k, wc)), t.te_y)
    return {"k": k, "val": res[k].best_val_top1, "best_epoch": res[k].best_epoch, "test_norefit": test,
            "epochs_run": {str(c): r.epochs_run for c, r in res.items()}, "search_s": seconds,
            "search_epochs": sum(r.epochs_run for r in res.values()) * len(t.tr_y) / 800}


def refit(feats: Features, recipe: Recipe, seed: int, k: int, epochs: int) -> dict[str, Any]:
    """Retrain from scratch on train + val for `epochs` (the chosen best epoch) and score test once."""
    t = feats.task
    wc = recipe.ext == "cls"
    params = recipe.train_params(len(t.tr_y), seed, epochs)
    model = _model(recipe, t.num_classes, seed)
    x = np.concatenate([feats.gather("train", k, wc), feats.gather("val", k, wc)])
    y = np.concatenate([t.tr_y, t.va_y])
    start = time.perf_counter()
    fit(model, x, y, params)
    seconds = time.perf_counter() - start
    return {"test_refit": top1(predict_logits(model, feats.gather("test", k, wc)), t.te_y), "refit_s": seconds,
            "refit_epochs": max(1, epochs) * len(y) / 800}


class Store:
    """Append-only JSON lines of finished units of work, keyed so that reruns skip them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []

    def get(self, key: str) -> dict[str, Any] | None:
        return next((r for r in self.rows if r["key"] == key), None)

    def memo(self, key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        hit = self.get(key)
        if hit is not None:
            return hit
        row = {**fn(), "key": key}
        self.rows.append(row)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        return row


def run_lever(store: Store, feats: Features, lever: str, seed: int) -> dict[str, Any]:
    t = feats.task.name
    if lever == "linear":
        def probe() -> dict[str, Any]:
            start = time.perf_counter()
            f = feats
            r0 = fit_linear_probe(f.cls("train"), f.task.tr_y, f.cls("val"), f.task.va_y, seed=seed,
                                  num_classes=f.task.num_classes, refit=False)
            r1 = fit_linear_probe(f.cls("train"), f.task.tr_y, f.cls("val"), f.task.va_y, seed=seed, Cs=(r0.C,),
                                  num_classes=f.task.num_classes, refit=True)  # the choice is r0's
            te = f.cls("test")
            return {"val": r0.val_top1_by_C[r0.C], "C": r0.C, "val_by_C": {str(c): v for c, v in
                                                                             r0.val_top1_by_C.items()},
                    "test_norefit": top1(r0.logits(te), f.task.te_y), "test_refit": top1(r1.logits(te), f.task.te_y),
                    "seconds": time.perf_counter() - start, "Cs": list(DEFAULT_CS)}
        return store.memo(f"{t}|linear|{seed}", probe)
    spec = LEVERS[lever]
    recipes = spec if isinstance(spec, list) else [spec]
    found = [store.memo(f"{t}|search|{r.key()}|{seed}", lambda r=r: search(feats, r, seed)) for r in recipes]
    # the grid's choice: best val top-1; ties go to the first (the list is ordered base-first where it matters)
    best_i = max(range(len(recipes)), key=lambda i: (found[i]["val"], -i))
    best, s = recipes[best_i], found[best_i]
    rf = store.memo(f"{t}|refit|{best.key()}|{seed}|{s['k']}|{s['best_epoch']}",
                    lambda: refit(feats, best, seed, s["k"], s["best_epoch"]))
    return {"val": s["val"], "k": s["k"], "test_norefit": s["test_norefit"], "test_refit": rf["test_refit"],
            "chosen": best.key() if len(recipes) > 1 else None,
            "cost_s": sum(f["search_s"] for f in found) + rf["refit_s"],
            "cost_epochs": sum(f["search_epochs"] for f in found) + rf["refit_epochs"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", default="caltech101:linear,default,reg",
                    help="TASK:LEVER,LEVER[;TASK:...]; levers: linear, " + ", ".join(LEVERS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data", default="/work/shared/data/caltech101-vtab1k")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", default=str(WORK / "results.jsonl"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    store = Store(Path(args.results))
    for job in args.jobs.split(";"):
        task_name, levers = job.split(":")
        feats = Features(load_task(task_name, Path(args.data), args.precision), args.precision)
        for lever in levers.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                out = store.memo(f"{task_name}|lever|{lever}|{seed}|{args.precision}",
                                 lambda lever=lever, seed=seed, feats=feats: run_lever(store, feats, lever, seed))
                print(f"{task_name} {lever} seed {seed}: val {out['val']:.4f} test refit off "
                      f"{out['test_norefit']:.4f} on {out['test_refit']:.4f}", flush=True)


if __name__ == "__main__":
    main()
