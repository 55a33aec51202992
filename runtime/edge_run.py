"""The device-side jobs as library calls returning report dicts: run the edge model, fine-tune the head, roll back.

Why a library layer: `mist-kit run-edge` / `finetune-edge`, `mist-kit demo` and the benchmarks all call these,
so the reported numbers (latency percentiles, peak RSS, top-1) are computed in one place. Every job runs under
the device profile's caps (threads, memory cap) and turns an allocation failure under the cap into one
ResourceLimitError line. Nothing is written unless fine-tuning succeeds. Torch-free.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mist_kit.devices.budget import edge_cost
from mist_kit.devices.caps import Emulation, device_caps, looks_like_oom, memory_exceeded, peak_rss_mb
from mist_kit.devices.profiles import DeviceProfile, get_device
from mist_kit.errors import InputError, MistError
from mist_kit.runtime.bundle import Head, open_edge_bundle
from mist_kit.runtime.edge_session import EdgeSession, SessionSettings
from mist_kit.runtime.features_file import FeaturesFile, read_features
from mist_kit.runtime.head import HeadTrainParams, softmax, top1, train_head
from mist_kit.runtime.head_store import HeadStore

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Batch:
    """One unit of device input: sample ids, encoded tensors (cloud outputs), labels (-1 = unknown) or None."""

    ids: list[str]
    tensors: dict[str, np.ndarray]
    labels: np.ndarray | None


def features_batches(path: PathLike, manifest: dict[str, Any], batch: int) -> tuple[int, Iterator[Batch]]:
    """(N, batches) from a features file validated against the bundle's manifest."""
    ff = read_features(path, manifest)

    def gen() -> Iterator[Batch]:
        for start, tensors in ff.batches(batch):
            stop = start + len(next(iter(tensors.values())))
            labels = None if ff.labels is None else ff.labels[start:stop]
            yield Batch(list(ff.ids[start:stop]), tensors, labels)

    return ff.n, gen()


def _profile(device: str | DeviceProfile, memory_mb: int | None) -> DeviceProfile:
    profile = get_device(device) if isinstance(device, str) else device
    return profile.with_memory(memory_mb) if memory_mb is not None else profile


def _guard(emu: Emulation, what: str, exc: BaseException) -> MistError:
    if emu.memory_cap_mb and looks_like_oom(exc):
        return memory_exceeded(emu, what)
    if isinstance(exc, MistError):
        return exc
    return MistError(f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def run_edge_batches(session: EdgeSession, head: Head, batches: Iterable[Batch]) -> dict[str, Any]:
    """Inference over a stream of batches: predictions, per-batch latency percentiles, throughput, top-1."""
    latencies, predictions = [], []
    correct = labelled = 0
    t_all = time.perf_counter()
    for b in batches:
        t0 = time.perf_counter()
        logits = head.logits(session.embed(b.tensors))  # (B, C)
        latencies.append((time.perf_counter() - t0) * 1000.0)
        probs = softmax(logits)
        idx = probs.argmax(axis=1)
        for i, sid in enumerate(b.ids):
            pred = {"id": sid, "index": int(idx[i]), "class": head.classes[idx[i]],
                    "prob": round(float(probs[i, idx[i]]), 5)}
            if b.labels is not None and b.labels[i] >= 0:
                pred["label"] = int(b.labels[i])
                labelled += 1
                correct += int(idx[i] == b.labels[i])
            predictions.append(pred)
    wall = time.perf_counter() - t_all
    report: dict[str, Any] = {
        "images": len(predictions), "batches": len(latencies),
        "latency_ms_p50": _percentile(latencies, 50), "latency_ms_p95": _percentile(latencies, 95),
        "images_per_s": round(len(predictions) / wall, 2) if wall > 0 else None, "predictions": predictions}
    if labelled:
        report["top1"] = round(correct / labelled, 6)
        report["labelled"] = labelled
    return report


def run_edge(bundle: PathLike, features: PathLike | None = None, *, device: str | DeviceProfile = "rpi4",
             batch: int = 1, memory_mb: int | None = None, memory_cap_mb: int | None = None,
             state_dir: PathLike | None = None, variant: str = "int8", threads: int | None = None,
             apply_caps: bool = True, batches: Iterable[Batch] | None = None) -> dict[str, Any]:
    """Run the edge model of `bundle` on a features file (or a stream of `batches`) as `device` would.

    Returns the run-edge report: device, images, latency_ms_p50/p95 (per batch of `batch`), images_per_s,
    peak_rss_mb, predictions, top1 (when labels are known), the backend and the emulation note.
    """
    if batch < 1:
        raise InputError(f"--batch: expected >= 1, got {batch}")
    profile = _profile(device, memory_mb)
    edge_bundle = open_edge_bundle(bundle, variant=variant)
    head = HeadStore(edge_bundle, state_dir).load()
    if features is not None:
        _, batches = features_batches(features, edge_bundle.manifest, batch)
    elif batches is None:
        raise InputError("give a features file (--features) or a cloud endpoint (--cloud/--images)")
    with device_caps(profile, memory_cap_mb, apply_cap=apply_caps) as emu:
        try:
            session = EdgeSession(edge_bundle, SessionSettings.from_profile(profile, threads))
            report = run_edge_batches(session, head, batches)
        except Exception as exc:  # MemoryError too: _guard makes it one line
            raise _guard(emu, "run-edge", exc) from None
    return {"device": profile.name, "bundle": str(Path(bundle)), "batch": batch, "head_version": head.version,
            **session.describe(), "emulation": emu.note(), "memory_cap_mb": emu.memory_cap_mb,
            "peak_rss_mb": peak_rss_mb(), **report}


# encoded features read per edge call while fine-tuning: bounds memory whatever N and codec (a 32-row int8 chunk,
# 3 MB, measured +6.5 MB peak RSS over 1,000 samples; 8 rows +0.8 MB, at the same embedding time). The same budget
# bounds the edge graph's own activations per call: a static-QDQ MIST graph (2.6 MB of activations per image) fed
# 10 rows per call peaked at 107-112 MB against 91 MB one row at a time, and embedded 1.5x slower.
CHUNK_BYTES = 1 << 20


def chunk_rows(ff: FeaturesFile, batch: int, budget: int = CHUNK_BYTES, activation_bytes: int = 0) -> int:
    """Rows per read while embedding a features file: at most `batch`, at most `budget` bytes of features, and at
    most `budget` bytes of the edge graph's activations (`activation_bytes` per row, the manifest's figure).

    An fp32-codec ViT-S/14 row is 395 KB, an int8 one 99 KB: a fixed row count would let the codec decide the
    peak memory. Per-row graphs (dynamic int8) still run one row per call; batched graphs get the chunk.
    """
    row = sum(i.row_bytes for i in ff.tensors)
    rows = min(batch, budget // max(row, 1))
    if activation_bytes > 0:
        rows = min(rows, budget // activation_bytes)
    return max(1, rows)


def embed_labelled(session: EdgeSession, ff: FeaturesFile, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings (N, E) float32 and labels (N,) of a features file's labelled rows (unlabelled rows skipped).

    Streams the file in chunks (`chunk_rows`) into one preallocated [N, E] array: memory is one chunk of
    features plus the embeddings (E * 4 bytes per sample), never the features of all samples, and nothing is
    concatenated at the end.
    """
    e = session.bundle.head.embedding_dim
    labels = ff.labels if ff.labels is not None else np.full(ff.n, -1, np.int64)
    keep = labels >= 0
    y = labels[keep].astype(np.int64)
    x = np.empty((len(y), e), np.float32)
    pos, step = 0, chunk_rows(ff, batch, activation_bytes=edge_cost(session.bundle.manifest)[2])
    for start in range(0, ff.n, step):
        k = keep[start:start + step]
        if not k.any():
            continue  # no read for chunks without a label
        tensors = ff.read(start, start + step)
        if not k.all():
            tensors = {name: v[k] for name, v in tensors.items()}
        out = session.embed(tensors)
        if out.shape != (len(out), e) or len(out) != int(k.sum()):
            raise MistError(f"{session.bundle.edge_path}: edge graph returned {list(out.shape)} for "
                            f"{int(k.sum())} rows, expected [{int(k.sum())}, {e}] (manifest head embedding_dim)")
        x[pos:pos + len(out)] = out
        pos += len(out)
        del tensors, out  # the next chunk is read into freed memory, not next to this one
    return x, y


def one_blas_thread() -> Any:
    """Head training's products ([64, E] x [E, C]) are far too small for BLAS threads: on a 2-core host, 10 epochs
    on 1,000 ViT-S embeddings took 0.53-1.97 s with OpenBLAS's 2 threads and 0.07-0.18 s with 1 (spin-waiting
    workers). threadpoolctl limits the already-loaded BLAS for the duration only."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def finetune_edge(bundle: PathLike, features: PathLike, *, device: str | DeviceProfile = "rpi4",
                  params: HeadTrainParams | None = None, new_classes: tuple[str, ...] = (),
                  eval_features: PathLike | None = None, state_dir: PathLike | None = None,
                  memory_mb: int | None = None, memory_cap_mb: int | None = None, batch: int = 32,
                  threads: int | None = None, apply_caps: bool = True, save: bool = True,
                  force: bool = False) -> dict[str, Any]:
    """Embed the labelled samples with the int8 edge graph, train the head in numpy, save it as a new version.

    Top-1 before/after is reported on the held-out part (and on `eval_features` when given). The new head is
    written only after training succeeded (atomic, versioned; `rollback_head` undoes it). Non-finite embeddings
    are refused before training. A head worse than the current one on the held-out split is stored but not
    activated unless `force` (`activated` / `activation` in the report say which and why).
    """
    profile = _profile(device, memory_mb)
    edge_bundle = open_edge_bundle(bundle, variant="int8")
    store = HeadStore(edge_bundle, state_dir)
    head = store.load()
    ff = read_features(features, edge_bundle.manifest)
    eval_ff = None if eval_features is None else read_features(eval_features, edge_bundle.manifest)
    n = ff.n
    with device_caps(profile, memory_cap_mb, apply_cap=apply_caps) as emu:
        try:
            session = EdgeSession(edge_bundle, SessionSettings.from_profile(profile, threads))
            t0 = time.perf_counter()
            x, y = embed_labelled(session, ff, batch)
            embed_s = time.perf_counter() - t0
            if len(y) == 0:
                raise InputError(f"{features}: no labelled samples (labels missing or all -1); nothing written")
            bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
            if len(bad):
                raise InputError(f"{features}: {len(bad)} labelled samples embed to non-finite values (first "
                                 f"rows {bad[:5].tolist()}); degenerate input, nothing written")
            t0 = time.perf_counter()
            with one_blas_thread():
                result = train_head(x, y, head, params, new_classes)
            train_s = time.perf_counter() - t0
            evaluation: dict[str, Any] = {}
            if eval_ff is not None:
                xe, ye = embed_labelled(session, eval_ff, batch)
                evaluation = {"eval_samples": len(ye), "eval_top1_before": top1(head, xe, ye),
                              "eval_top1_after": top1(result.head, xe, ye)}
        except Exception as exc:  # MemoryError too: _guard makes it one line
            raise _guard(emu, "finetune-edge", exc) from None
    report: dict[str, Any] = {
        "device": profile.name, "bundle": str(Path(bundle)), "samples": int(n), "labelled": len(y),
        "classes": len(result.head.classes), "new_classes": list(new_classes),
        "top1_before": result.val_top1_before, "top1_after": result.val_top1_after, **evaluation,
        **result.to_dict(), "embed_s": round(embed_s, 3), "train_s": round(train_s, 3),
        "from_version": head.version, **session.describe(), "emulation": emu.note(),
        "memory_cap_mb": emu.memory_cap_mb}
    if save:
        activate, why = activation_decision(result.val_top1_before, result.val_top1_after, force)
        version = store.save(result.head, {k: report[k] for k in ("top1_before", "top1_after", "labelled",
                                                                  "epochs_run")}, activate=activate)
        report["head_version"] = version if activate else head.version
        report.update(stored_version=version, activated=activate,
                      activation=why if activate else f"not activated: {why}; stored as version {version}")
        report["state_dir"] = str(store.dir)
    report["peak_rss_mb"] = peak_rss_mb()
    return report


def activation_decision(before: float | None, after: float | None, force: bool) -> tuple[bool, str]:
    """(activate?, why): a head worse than the current one on the held-out split waits for --force."""
    if before is None or after is None:
        return True, "activated (no held-out split to compare on: fewer than 10 labelled samples or --val-fraction 0)"
    if after >= before:
        return True, f"activated (held-out top-1 {before:.4f} -> {after:.4f})"
    if force:
        return True, f"activated by --force although held-out top-1 dropped {before:.4f} -> {after:.4f}"
    return False, f"held-out top-1 {after:.4f} is below the current head's {before:.4f} (use --force to activate)"


def rollback_head(bundle: PathLike, state_dir: PathLike | None = None) -> dict[str, Any]:
    """Re-activate the previous head version (0 = the bundle's head)."""
    edge_bundle = open_edge_bundle(bundle, variant="int8")
    store = HeadStore(edge_bundle, state_dir)
    before, after = store.rollback()
    return {"bundle": str(Path(bundle)), "state_dir": str(store.dir), "from_version": before,
            "head_version": after, "classes": len(store.load().classes)}
