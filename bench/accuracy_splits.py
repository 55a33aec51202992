"""Cut the small tasks of bench/splits/ from the visible Caltech-101 VTAB-1k images (seeded, written once, committed).

Each task is a folder with `train.txt`, `val.txt`, `test.txt` (lines `images/<class>/<file>.jpg <label>`, the label an
index into the task's own `classes.txt`) in the same format as the VTAB-1k lists. Train and val images come only from
train800val200, test images only from test.txt, so no task ever trains on a Caltech-101 test image.

- `faces2`: Faces vs Faces_easy (the same people; Faces_easy is the tightly cropped version): similar-looking classes.
  Per class 75% of its train800val200 images train, the rest val; test = all their test.txt images.
- `few10`: 10 classes with about 10 training images each (train = min(10, n - 3) per class, val = the rest).

`mist_kit.data.load_image_list` resolves a list line against the list file's own folder, so the committed lists
load once that folder can see `images/`: `--materialize DIR` copies a task's lists to DIR and links DIR/images to the
dataset's images (bench/work/ is git-ignored):

    .venv/bin/python bench/accuracy_splits.py --write            # regenerate bench/splits/ (deterministic)
    .venv/bin/python bench/accuracy_splits.py --materialize bench/work/splits
    mist-kit train ... --train bench/work/splits/faces2/train.txt --val bench/work/splits/faces2/val.txt
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ROOT / "bench" / "splits"
TASKS = {
    "faces2": ("Faces", "Faces_easy"),
    "few10": ("watch", "Leopards", "bonsai", "brain", "scorpion", "cup", "revolver", "llama", "ketch", "crayfish"),
}


def _by_class(list_file: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in list_file.read_text().splitlines():
        if line.strip():
            rel = line.split(" ")[0]
            out.setdefault(rel.split("/")[1], []).append(rel)
    return out


def write(data: Path, seed: int = 0) -> None:
    trv, test = _by_class(data / "train800val200.txt"), _by_class(data / "test.txt")
    for task, classes in TASKS.items():
        rng = np.random.default_rng(seed)
        lines: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        for label, name in enumerate(classes):
            imgs = [trv[name][i] for i in rng.permutation(len(trv[name]))]
            n_train = round(0.75 * len(imgs)) if task == "faces2" else min(10, len(imgs) - 3)
            lines["train"] += [f"{p} {label}" for p in imgs[:n_train]]
            lines["val"] += [f"{p} {label}" for p in imgs[n_train:]]
            lines["test"] += [f"{p} {label}" for p in test[name]]
        folder = SPLITS / task
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "classes.txt").write_text("\n".join(classes) + "\n")
        for split, rows in lines.items():
            (folder / f"{split}.txt").write_text("\n".join(rows) + "\n")
        print(f"{task}: {len(classes)} classes, train {len(lines['train'])}, val {len(lines['val'])}, "
              f"test {len(lines['test'])}")


def materialize(out: Path, data: Path) -> None:
    for task in TASKS:
        dst = out / task
        dst.mkdir(parents=True, exist_ok=True)
        for f in ("classes.txt", "train.txt", "val.txt", "test.txt"):
            shutil.copyfile(SPLITS / task / f, dst / f)
        link = dst / "images"
        if not link.exists():
            link.symlink_to((data / "images").resolve(), target_is_directory=True)
        print(f"{dst}: lists + images -> {(data / 'images').resolve()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data/caltech101-vtab1k")
    ap.add_argument("--write", action="store_true", help="regenerate bench/splits/ from the VTAB-1k lists")
    ap.add_argument("--materialize", metavar="DIR", help="copy the lists to DIR/<task>/ with an images/ link")
    args = ap.parse_args()
    if not (args.write or args.materialize):
        ap.error("pass --write and/or --materialize DIR")
    if args.write:
        write(Path(args.data))
    if args.materialize:
        materialize(Path(args.materialize), Path(args.data))


if __name__ == "__main__":
    main()
