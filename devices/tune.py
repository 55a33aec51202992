"""`devices tune`: time the bundle's candidate edge graphs on this device and record the fastest that passes the gate.

Why measured, not assumed: whether int8 beats fp32 depends on the CPU (x86 VNNI, ARM dot-product, neither) and on
the graph (issue 14: the int8 graph export used to ship was 1.9x slower than its fp32 graph). So the device times
`edge.onnx` (int8), `edge.fp32.onnx` and `edge.tflite` (when LiteRT is installed) with the profile's (capped)
threads, interleaved, and keeps the fastest whose top-1 agreement with the fp32 graph is at least the bundle's
`min_agreement`: measured on a features file when one is given, else the agreement export measured on real
held-out data (manifest `parity.edge_top1_agreement`).

The choice is device-local state, like fine-tuned heads: it lives in `<bundle>.tune.json` beside the bundle
(never inside it: bundle files are hashed in the manifest), keyed by device profile name and bound to the chosen
file's sha256, so a re-exported bundle invalidates it. `EdgeSession` reads it and says so. Torch-free.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from mist_kit.atomic import write_json
from mist_kit.devices.caps import capped_threads
from mist_kit.errors import InputError

TUNE_FORMAT = "mist-kit/tune/1"
VARIANTS = ("int8", "fp32", "tflite")


def tune_path(bundle_root: str | os.PathLike[str]) -> Path:
    root = Path(bundle_root).resolve()
    return root.parent / f"{root.name}.tune.json"


def read_tune(bundle_root: str | os.PathLike[str]) -> dict[str, Any]:
    """The device-local tune records ({} when none); a corrupt file is one clear error, not a traceback."""
    path = tune_path(bundle_root)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a tune record ({exc}); delete it or rerun `mist-kit devices tune`") from None
    if not isinstance(data, dict) or data.get("format") != TUNE_FORMAT or not isinstance(data.get("devices"), dict):
        raise InputError(f"{path}: expected format {TUNE_FORMAT!r} with a 'devices' table")
    return data


def tuned_choice(bundle_root: str | os.PathLike[str], manifest: dict[str, Any], device: str) -> dict[str, Any] | None:
    """This device's recorded choice, if it still matches the bundle's files (else None: stale or absent)."""
    rec = read_tune(bundle_root).get("devices", {}).get(device)
    if not isinstance(rec, dict) or rec.get("variant") not in VARIANTS:
        return None
    files = manifest.get("files", {})
    if files.get(rec.get("file"), {}).get("sha256") != rec.get("sha256"):
        return None  # the bundle was re-exported since: the timing no longer describes these graphs
    return rec


def _variant_files(manifest: dict[str, Any]) -> dict[str, str]:
    edge = manifest["edge"]
    out = {"int8": str(edge.get("file") or "edge.onnx"), "fp32": str(edge.get("reference") or "edge.fp32.onnx")}
    if edge.get("tflite"):
        out["tflite"] = str(edge["tflite"])
    return out


def _single_rows(data: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Batch-1 inputs, one per row of a features read."""
    return [{k: v[i:i + 1] for k, v in data.items()} for i in range(len(next(iter(data.values()))))]


def _timing_inputs(bundle: Any, features: str | os.PathLike[str] | None, rows: int) -> list[dict[str, np.ndarray]]:
    """Batch-1 inputs: rows of a features file, else seeded values of the graph's input dtypes (timing only)."""
    if features is not None:
        from mist_kit.runtime.features_file import read_features

        return _single_rows(read_features(features, bundle.manifest).read(0, rows))
    rng = np.random.default_rng(0)
    out = []
    for _ in range(rows):
        row = {}
        for i in bundle.inputs:
            shape, dt = [1, *i["shape"][1:]], np.dtype(i["dtype"])
            row[i["name"]] = (rng.integers(0, 255, shape).astype(dt) if dt.kind in "ui"
                              else rng.standard_normal(shape).astype(dt))
        out.append(row)
    return out


AGREEMENT_ROWS = 500  # rows of a features file the agreement gate reads: on 32 rows one flip is 96.9% < 0.99


def tune(bundle_dir: str | os.PathLike[str], profile: Any, features: str | os.PathLike[str] | None = None,
         rounds: int = 9, rows: int = 32, save: bool = True,
         agreement_rows: int = AGREEMENT_ROWS) -> dict[str, Any]:
    """Time every candidate edge graph at batch 1 with the profile's threads; record and return the choice."""
    from mist_kit.runtime.bundle import open_edge_bundle
    from mist_kit.runtime.edge_session import EdgeSession, SessionSettings, litert_available

    base = open_edge_bundle(bundle_dir, variant="fp32")
    manifest = base.manifest
    files = _variant_files(manifest)
    threads, threads_note = capped_threads(profile.threads)
    sessions: dict[str, EdgeSession] = {}
    skipped: dict[str, str] = {}
    for variant in files:
        if variant == "tflite" and not litert_available():
            skipped[variant] = "ai-edge-litert is not installed"
            continue
        backend = "litert" if variant == "tflite" else "onnxruntime"
        settings = SessionSettings(threads=threads, graph_optimization=profile.ort.graph_optimization,
                                   cpu_mem_arena=profile.ort.cpu_mem_arena, backend=backend, use_tune=False)
        sessions[variant] = EdgeSession(open_edge_bundle(bundle_dir, variant=variant), settings)
    inputs = _timing_inputs(base, features, rows)
    ms = _interleaved(sessions, inputs, rounds)
    min_agreement = float((manifest["edge"].get("quantization") or {}).get("min_agreement", 0.99))
    if features is not None:
        agreement, n_agree = _measured_agreement(sessions, features, manifest, agreement_rows)
    else:
        agreement, n_agree = _recorded_agreement(sessions, manifest), None
    passing = {v: t for v, t in ms.items() if agreement[v] >= min_agreement}
    best = min(passing, key=passing.__getitem__) if passing else "fp32"
    record = {"variant": best, "file": files[best], "sha256": manifest["files"][files[best]]["sha256"],
              "threads": threads, "ms_per_image": {v: round(t, 4) for v, t in ms.items()},
              "agreement": agreement, "agreement_source": "features" if features is not None else "manifest",
              "agreement_rows": n_agree,
              "min_agreement": min_agreement, "skipped": skipped,
              "tuned_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if threads_note:
        record["threads_note"] = threads_note
    path = tune_path(bundle_dir)
    if save:
        data = read_tune(bundle_dir) or {"format": TUNE_FORMAT, "devices": {}}
        data["devices"][profile.name] = record
        write_json(path, data)
    return {"device": profile.name, "bundle": str(Path(bundle_dir)), "chosen": best, "record": str(path),
            **record}


def _interleaved(sessions: dict[str, Any], inputs: list[dict[str, np.ndarray]], rounds: int) -> dict[str, float]:
    for s in sessions.values():
        s.embed(inputs[0])
    times: dict[str, list[float]] = {v: [] for v in sessions}
    for _ in range(rounds):
        for v, s in sessions.items():
            t0 = time.perf_counter()
            for x in inputs:
                s.embed(x)
            times[v].append((time.perf_counter() - t0) / len(inputs) * 1000)
    return {v: float(np.median(t)) for v, t in times.items()}


def _measured_agreement(sessions: dict[str, Any], features: str | os.PathLike[str], manifest: dict[str, Any],
                        limit: int, chunk: int = 8) -> tuple[dict[str, float], int]:
    """Top-1 agreement of each variant with the fp32 graph on the first `limit` rows of a features file, read
    `chunk` rows at a time (a ViT-Split fp32 row is 2 MB: memory stays a few rows whatever `limit` is). Why not the
    timing rows: 32 of them cannot pass a 0.99 gate with a single flipped prediction."""
    from mist_kit.runtime.features_file import read_features

    f = read_features(features, manifest)
    n = min(f.n, limit)
    same = dict.fromkeys(sessions, 0)
    for start in range(0, n, chunk):
        rows = _single_rows(f.read(start, min(n, start + chunk)))
        logits = {v: np.concatenate([s.logits(x) for x in rows]).argmax(1) for v, s in sessions.items()}
        for v in sessions:
            same[v] += int(np.sum(logits[v] == logits["fp32"]))
    return {v: same[v] / max(n, 1) for v in sessions}, n


def _recorded_agreement(sessions: dict[str, Any], manifest: dict[str, Any]) -> dict[str, float]:
    """Top-1 agreement of each variant with the fp32 graph as export measured it on real held-out data (fp32 is
    the reference; edge.tflite carries its own report): the gate when no features file is given."""
    parity = manifest.get("parity", {})
    tfl = (manifest["edge"].get("tflite_report") or {}).get("agreement")
    out = {"fp32": 1.0, "int8": float(parity.get("edge_top1_agreement", 0.0))}
    if "tflite" in sessions:
        out["tflite"] = float(tfl) if tfl is not None else 0.0
    return out
