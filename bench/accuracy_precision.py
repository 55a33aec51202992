"""What bf16 backbone features do to accuracy: the linear probe (C=3) trained and scored on fp32 vs bf16 caches.

Reads the caches of `accuracy_cache.py` run at both precisions (`--precision bf16 --check-fp32`, then
`--precision fp32`); prints the relative error of the final cls tokens and test top-1 / agreement of each cross.

    nice -n 10 .venv/bin/python bench/accuracy_precision.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mist_kit.linear_probe import fit_linear_probe

CACHE = Path(__file__).resolve().parents[1] / "bench" / "work" / "accuracy" / "cache"


def _one(pattern: str) -> Path:
    bf16 = pattern.endswith("-bf16")
    hits = sorted(p for p in CACHE.glob(pattern) if p.is_dir() and p.name.endswith("-bf16") == bf16)
    if not hits:
        raise SystemExit(f"error: no cache {CACHE / pattern}; run bench/accuracy_cache.py first")
    return hits[0]


def _cls(path: Path) -> np.ndarray:
    return np.load(path / "cls.npy").astype(np.float32)


def main() -> None:
    trv32, trv16 = _one("train800val200-*"), _one("train800val200-*-bf16")
    te32, te16 = _one("test-*"), _one("test-*-bf16")
    y, yt = np.load(trv32 / "labels.npy"), np.load(te32 / "labels.npy")
    f32, b16, t32, t16 = _cls(trv32), _cls(trv16), _cls(te32), _cls(te16)
    print(f"cls relative error bf16 vs fp32 (train800val200): {np.linalg.norm(b16 - f32) / np.linalg.norm(f32):.4f}")
    for name, feats in (("fp32-trained", f32), ("bf16-trained", b16)):
        r = fit_linear_probe(feats[:800], y[:800], feats[800:], y[800:], Cs=(3.0,), refit=True, num_classes=101)
        p32, p16 = r.logits(t32).argmax(1), r.logits(t16).argmax(1)
        print(f"{name}: test top-1 on fp32 features {(p32 == yt).mean():.4f}, on bf16 features "
              f"{(p16 == yt).mean():.4f}, agreement {(p32 == p16).mean():.4f}")


if __name__ == "__main__":
    main()
