"""Markdown rows for BENCHMARKS.md from `bench/accuracy_defaults.sh`'s reports (bench/work/defaults/*/report.json).

Per task and method: val and test top-1 as mean ± sample sd over the seeds (every seed's own number listed), the
chosen k per seed, the top-level seed (best val), and train seconds (k search + refit, from the cache) per seed,
also in backbone passes when bench/accuracy_cost.py has written cost.json.

    .venv/bin/python bench/accuracy_defaults_report.py [--work bench/work/levers]   # lever runs: TASK-METHOD-TAG
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

WORK = Path(__file__).resolve().parents[1] / "bench" / "work" / "defaults"


def _pm(stat: dict | None) -> str:
    return "-" if not stat else f"{100 * stat['mean']:.2f} ± {100 * stat['sd']:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=WORK, help="the accuracy_defaults.sh WORK folder")
    work = ap.parse_args().work
    cost = json.loads((work / "cost.json").read_text()) if (work / "cost.json").is_file() else None
    print("| task | method | seeds | val top-1 % | test top-1 % | test per seed | k per seed | checkpoint seed | "
          "train s per seed | backbone passes per seed | wall | load (start / end) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for rep in sorted(work.glob("*/report.json")):
        text = rep.read_text().strip()
        if not text:
            continue
        r = json.loads(text)
        s = r["seeds"]
        per = s["per_seed"]
        secs = [p["train_seconds"] for p in per]
        passes = "-" if cost is None else ", ".join(f"{x / cost['pass_1000_s']:.2f}" for x in secs)
        up = (rep.parent / "uptime.txt").read_text().splitlines()
        loads = [ln.split("load average: ")[1].split(",")[0] for ln in up if "load average" in ln]
        wall = next((ln for ln in up if ln.endswith("s wall")), "-")
        task, method = rep.parent.name.rsplit("-", 1)
        tests = ", ".join(f"{100 * p['test_top1']:.2f}" for p in per)
        ks = ", ".join(str(p["k"]) for p in per)
        print(f"| {task} | `{method}` | {len(per)} | {_pm(s['val_top1'])} | {_pm(s['test_top1'])} | {tests} | {ks} | "
              f"{s['chosen_seed']} | {', '.join(f'{x:.0f}' for x in secs)} | {passes} | {wall} | {' / '.join(loads)} |")
    if cost:
        print(f"\nBackbone pass unit: {cost['pass_1000_s']:.0f} s for 1,000 images fp32, {cost['threads']} thread "
              f"({cost['images']} images x {cost['rounds']} rounds, median)")


if __name__ == "__main__":
    main()
