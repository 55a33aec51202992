"""Aggregate bench/work/accuracy/results.jsonl (written by accuracy_caltech.py) into BENCHMARKS.md's `accuracy` section.

Mean ± sample standard deviation over the seeds found (3 unless a row says otherwise); val is the search's best-epoch
top-1 on val, test is scored once per seed. `--notes FILE` appends a hand-written markdown paragraph (the verdict).

    .venv/bin/python bench/accuracy_report.py [--notes bench/work/accuracy/notes.md] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "accuracy"
sys.path.insert(0, str(ROOT / "bench"))

DESCRIBE = {
    "linear": "linear probe (new `fit_linear_probe`): standardised multinomial logistic regression on the final-norm "
              "cls token, C chosen on val from 1e-3..10 (9 values)",
    "default": "MIST, current defaults as typed (k=12, epochs 30, lr 3e-3, wd 1e-2, patience 8, no dropout/smoothing)",
    "reg": "MIST regularised: dropout 0.1, label smoothing 0.1, wd 0.05, patience 4, epochs 20, lr 3e-3",
    "reg_cls": "reg + final-norm cls token concatenated to the pooled embedding (our extension, not the paper's)",
    "reg_tokdrop": "reg + token dropout (train only: keep cls + a random 50% of patch tokens per batch)",
    "reg_lrgrid": "reg with lr chosen on val per seed from {1e-3, 3e-3, 1e-2} (3 searches + 1 refit)",
    "reg_cls_lrgrid": "reg_cls with lr chosen on val per seed from {1e-3, 3e-3, 1e-2}",
    "reg_cls_steps": "reg_cls with training length >= 500 optimiser steps (epochs, patience, warmup scaled by one "
                     "factor; identical to reg_cls on Caltech-101)",
    "reg_steps": "reg with training length >= 500 optimiser steps",
    "reg_kauto": "reg with k searched in {4, 8, 12} (pruned at margin 0.1 after 3 epochs)",
    "reg_cls_kauto": "reg_cls with k searched in {4, 8, 12} (pruned at margin 0.1 after 3 epochs)",
}
TASKS = {
    "caltech101": "Caltech-101 VTAB-1k: train800 -> val200, refit train800val200, test 2,000 (101 classes)",
    "faces2": "faces2 (bench/splits/faces2): Faces vs Faces_easy, train 80 / val 27 / test 192",
    "few10": "few10 (bench/splits/few10): 10 classes, ~10 train images each: train 94 / val 64 / test 268",
}


def _ms(values: list[float]) -> str:
    v = 100 * np.asarray(values, dtype=float)
    return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}"


def collect(rows: list[dict]) -> dict[str, dict[str, list[dict]]]:
    by_key = {r["key"]: r for r in rows}
    out: dict[str, dict[str, list[dict]]] = {}
    for key, r in by_key.items():
        parts = key.split("|")
        if parts[1] == "linear":
            out.setdefault(parts[0], {}).setdefault("linear", []).append(r)
        elif parts[1] == "lever" and parts[2] != "linear":
            out.setdefault(parts[0], {}).setdefault(parts[2], []).append(r)
    return out


def body(rows: list[dict], epoch_in_passes: float | None) -> str:
    data = collect(rows)
    parts = []
    for task, title in TASKS.items():
        if task not in data:
            continue
        table = ["| lever | seeds | val top-1 % | test top-1 %, refit off | test top-1 %, refit on | "
                 "training cost per seed |", "|---|---|---|---|---|---|"]
        for lever in ["linear", *[k for k in DESCRIBE if k != "linear"]]:
            rs = data[task].get(lever)
            if not rs:
                continue
            if lever == "linear":
                cost = f"{np.mean([r['seconds'] for r in rs]):.0f} s (C search + refit)"
            else:
                secs, ep = np.mean([r["cost_s"] for r in rs]), np.mean([r["cost_epochs"] for r in rs])
                cost = f"{ep:.1f} LAE epochs (x800 images), {secs:.0f} s"
                if epoch_in_passes and task == "caltech101":
                    cost += f" = {ep * epoch_in_passes:.2f} backbone passes"
            extra = ""
            if lever == "linear":
                extra = " (C: " + ", ".join(f"{r['C']:g}" for r in rs) + ")"
            elif rs[0].get("chosen"):
                extra = " (lr: " + ", ".join(f"{json.loads(r['chosen'])['p']['lr']:g}" for r in rs) + ")"
            elif "kauto" in lever:
                extra = " (k: " + ", ".join(str(r["k"]) for r in rs) + ")"
            table.append(f"| `{lever}`{extra} | {len(rs)} | {_ms([r['val'] for r in rs])} | "
                         f"{_ms([r['test_norefit'] for r in rs])} | {_ms([r['test_refit'] for r in rs])} | {cost} |")
        parts.append(f"**{title}**\n\n" + "\n".join(table))
    legend = "\n".join(f"- `{k}`: {v}" for k, v in DESCRIBE.items())
    return "\n\n".join(parts) + "\n\nLevers:\n" + legend


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(WORK / "results.jsonl"))
    ap.add_argument("--notes", help="markdown appended after the tables")
    ap.add_argument("--dry-run", action="store_true", help="print instead of writing BENCHMARKS.md")
    args = ap.parse_args()
    rows = [json.loads(ln) for ln in Path(args.results).read_text().splitlines() if ln.strip()]
    cost = WORK / "cost.json"  # written by accuracy_cost.py
    text = body(rows, json.loads(cost.read_text())["epoch_in_passes"] if cost.is_file() else None)
    if args.notes:
        text += "\n\n" + Path(args.notes).read_text()
    if args.dry_run:
        print(text)
        return
    from _report import update_section

    update_section("accuracy", "Accuracy levers: MIST vs a strong linear probe, 3 seeds (DINOv2 ViT-S/14)", text,
                   "nice -n 10 .venv/bin/python bench/accuracy_caltech.py --jobs ...; "
                   ".venv/bin/python bench/accuracy_report.py --notes ...")


if __name__ == "__main__":
    main()
