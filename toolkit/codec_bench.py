"""`codec bench` as a library: one row per codec with bytes, fidelity, speed and (given a model + data) accuracy.

Three sources of features, stated in the result:
  checkpoint + labelled data  real gathers from the feature cache; top-1 and agreement with the checkpoint's edge
                              network, or with one retrained from the training cache when the codec changes what
                              the network sees (token pooling) or when `retrain="all"` (a protocol-fair
                              comparison where the fp32 baseline is retrained the same way too)
  bundle + labelled data      torch-free: cloud.onnx features, edge.onnx + head for accuracy (no retraining, so
                              token-changing codecs get bytes/SNR only); codecs calibrated on every 4th image
  nothing                     synthetic gather-like features: bytes, SNR and speed only
`bench_codecs` returns the rows; the CLI, the demo and bench/codec_caltech.py render them.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mist_kit.errors import CodecError, UsageError
from mist_kit.runtime.codec import Codec, codec_params, fit_codec, list_codecs, parse_codec_name
from mist_kit.runtime.codec.bench import measure, synthetic_features

Log = Callable[[str], None]
OnCodec = Callable[[str], None]
MEASURE_IMAGES = 64  # rows used for bytes / SNR / speed (accuracy uses every image)
RETRAIN_MODES = ("auto", "all", "none")  # none: token-changing codecs get bytes/SNR only (no retraining)
MakeRow = Callable[[str, Codec], dict[str, Any]]


@dataclass
class BenchResult:
    """Rows (see `runtime.codec.bench.ROW_KEYS` plus extras), where the features came from, and notes."""

    rows: list[dict[str, Any]]
    source: str  # "checkpoint" | "bundle" | "synthetic"
    features_shape: tuple[int, int]
    jpeg_q90_bytes: float | None
    notes: list[str] = field(default_factory=list)
    interrupted: bool = False  # Ctrl-C stopped the loop: `rows` holds the codecs finished before it


def measure_row(codec: Codec, x: np.ndarray) -> dict[str, Any]:
    """`measure`, minus a speed that measures nothing.

    fp32's encode hands back the input array itself (no copy, no work), so timing it gives "MB/s" in the
    millions (TB/s): not a speed. Such a row reports no encode speed and says why.
    """
    row = measure(codec, x)
    sample = np.ascontiguousarray(x[:2], dtype=np.float32)
    if any(np.shares_memory(sample, t) for t in codec.encode(sample).values()):
        row["encode_mb_s"] = None
        row["encode_note"] = "encode is a no-op (the features are sent as they are): nothing to time"
    return row


def collect_rows(fitted: dict[str, Codec], make_row: MakeRow, on_codec: OnCodec | None,
                 notes: list[str]) -> tuple[list[dict[str, Any]], bool]:
    """One row per fitted codec, in order; Ctrl-C keeps the finished rows (and says so in `notes`)."""
    rows: list[dict[str, Any]] = []
    try:
        for name, codec in fitted.items():
            if on_codec:
                on_codec(name)
            rows.append(make_row(name, codec))
    except KeyboardInterrupt:
        notes.append(f"interrupted: {len(rows)} of {len(fitted)} codecs finished; the table shows those")
        return rows, True
    return rows, False


def jpeg_q90_bytes(paths: Sequence[Path], size: int, max_images: int = 100) -> float | None:
    """Mean JPEG (quality 90) size of the images resized to the model's input size: what a user would send."""
    from PIL import Image

    from mist_kit.data import decode_image

    sizes = []
    for p in list(paths)[:: max(1, len(paths) // max_images)][:max_images]:
        img = decode_image(Path(p), str(p)).resize((size, size), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        sizes.append(buf.tell())
    return round(float(np.mean(sizes)), 1) if sizes else None


def _agreement_row(logits: np.ndarray, base_pred: np.ndarray, labels: np.ndarray, base_top1: float) -> dict:
    pred = logits.argmax(1)
    top1 = float(np.mean(pred == labels))
    return {"top1": round(top1, 4), "top1_delta": round(top1 - base_top1, 4),
            "agreement": round(float(np.mean(pred == base_pred)), 4)}


def _fit_all(names: Sequence[str], calib: np.ndarray, prefix: int, skip_unfit: bool = False,
             log: Log | None = None) -> dict[str, Codec]:
    """Each codec calibrated on `calib`, in order. A codec the feature geometry cannot take (PCA rank > D,
    a patch grid pooling cannot divide) fails the bench when the user named it, and is skipped with a log line
    when the list is the registry default (`skip_unfit`): a small model should not abort `codec bench`."""
    for name in names:
        codec_params(parse_codec_name(name)[0])  # unknown names fail before any work
    fitted = {}
    for name in names:
        try:
            fitted[name] = fit_codec(name, calib, prefix)
        except CodecError as exc:
            if not skip_unfit:
                raise
            (log or print)(f"{name}: skipped, does not fit these features ({exc})")
    return fitted


def bench_codecs(codecs: Sequence[str] | None = None, *, checkpoint: str | Path | None = None,
                 bundle: str | Path | None = None, data: str | Path | None = None,
                 cache_dir: Path | None = None, weights: str | None = None, retrain: str = "auto",
                 synthetic_shape: tuple[int, int, int] = (32, 257, 384), features: np.ndarray | None = None,
                 num_prefix_tokens: int = 1, on_codec: OnCodec | None = None,
                 log: Log = print) -> BenchResult:
    """Measure `codecs` (default: all registered) on the chosen feature source; see the module docstring."""
    names = list(codecs or list_codecs())
    skip_unfit = codecs is None  # the registry default: skip codecs these features cannot take
    if retrain not in RETRAIN_MODES:
        raise UsageError(f"retrain must be one of {RETRAIN_MODES}, got {retrain!r}")
    if checkpoint is not None and bundle is not None:
        raise UsageError("cannot use both --checkpoint and --bundle; pick the model to measure accuracy with")
    if (checkpoint is not None or bundle is not None) and data is None:
        raise UsageError("--checkpoint/--bundle measure accuracy on labelled data: pass --data DATA")
    if features is not None:  # real features without a model: bytes, fidelity and speed only
        x = np.asarray(features, dtype=np.float32)
        fitted = _fit_all(names, x[::2], num_prefix_tokens, skip_unfit, log)  # calibrate on even rows, measure odd
        notes = [f"given features {list(x.shape)}: codecs calibrated on even rows, measured on odd rows"]
        rows, stopped = collect_rows(fitted, lambda _n, c: {
            **measure_row(c, x[1::2][:MEASURE_IMAGES]), "top1": None, "top1_delta": None, "agreement": None,
            "retrained": False, "jpeg_q90_bytes": None, "source": "features"}, on_codec, notes)
        return BenchResult(rows, "features", (int(x.shape[1]), int(x.shape[2])), None, notes, stopped)
    if checkpoint is not None:
        from mist_kit.codec_bench_model import bench_checkpoint

        return bench_checkpoint(names, checkpoint, str(data), cache_dir, weights, retrain, on_codec, log, skip_unfit)
    if bundle is not None:
        return _bench_bundle(names, bundle, str(data), on_codec, log, skip_unfit)
    n, t, d = synthetic_shape
    x = synthetic_features(n, t, d, prefix=1, seed=0)
    fitted = _fit_all(names, x, 1, skip_unfit, log)
    notes = [f"synthetic gather-like features [{n}, {t}, {d}] (no --checkpoint/--bundle): bytes, SNR and "
             "speed only; accuracy needs a model and labelled data"]
    rows, stopped = collect_rows(fitted, lambda _n, c: {
        **measure_row(c, x), "top1": None, "top1_delta": None, "agreement": None, "retrained": False,
        "jpeg_q90_bytes": None, "source": "synthetic"}, on_codec, notes)
    return BenchResult(rows, "synthetic", (t, d), None, notes, stopped)


def _bench_bundle(names: list[str], bundle: str | Path, data: str, on_codec: OnCodec | None, log: Log,
                  skip_unfit: bool = False) -> BenchResult:
    """Torch-free: features from cloud.onnx, accuracy through edge.onnx + head for layout-preserving codecs."""
    from mist_kit.data import load_image_list
    from mist_kit.runtime.bundle import open_edge_bundle
    from mist_kit.runtime.codec.extract import cloud_batches, cloud_session
    from mist_kit.runtime.codec.plan_codecs import plan_codecs
    from mist_kit.runtime.edge_session import EdgeSession
    from mist_kit.runtime.manifest import manifest_codecs, manifest_plan

    sess, manifest = cloud_session(bundle)
    edge = EdgeSession(open_edge_bundle(bundle))  # verifies edge.onnx + head; runs it as a device does
    images = load_image_list(data)
    log(f"running cloud.onnx over {len(images)} images")
    codecs = manifest_codecs(manifest)
    if len(codecs) != 1:
        raise UsageError(f"{bundle}: the bundle sends {sorted(codecs)}; codec bench compares codecs on one tensor")
    (tensor,) = codecs
    base = plan_codecs(manifest_plan(manifest), codecs, int(manifest["backbone"]["num_prefix_tokens"]))[tensor]
    feats = np.concatenate([base.decode(t) for t in cloud_batches(sess, manifest, list(images.paths))])
    labels = np.asarray(images.labels)
    prefix = int(base.prefix if base.prefix is not None else 1)
    notes = [f"features from {bundle}/cloud.onnx (codec {base.name}); codecs calibrated on every 4th image, "
             "accuracy on the others with edge.onnx + the bundle head (no retraining)"]
    if base.params.pool > 1:
        notes.append(f"the bundle's codec {base.name} pools tokens: other codecs are measured on its output")
    calib_idx = np.arange(0, len(feats), 4)
    eval_idx = np.setdiff1d(np.arange(len(feats)), calib_idx)
    fitted = _fit_all(names, feats[calib_idx], prefix, skip_unfit, log)

    def logits(x: np.ndarray) -> np.ndarray:
        # the bundle's edge graph starts with the bundle codec's decoder: feed it that codec's encoding
        return np.concatenate([edge.logits(base.encode(x[i:i + 64])) for i in range(0, len(x), 64)])

    x_eval, y_eval = feats[eval_idx], labels[eval_idx]
    base_logits = logits(x_eval)
    base_pred, base_top1 = base_logits.argmax(1), float(np.mean(base_logits.argmax(1) == y_eval))
    jpeg = jpeg_q90_bytes([images.paths[i] for i in eval_idx], int(manifest["input"]["size"]))

    def make_row(_name: str, codec: Codec) -> dict[str, Any]:
        row = {**measure_row(codec, x_eval[:MEASURE_IMAGES]), "top1": None, "top1_delta": None, "agreement": None,
               "retrained": False, "jpeg_q90_bytes": jpeg}
        if codec.out_tokens == feats.shape[1]:
            row.update(_agreement_row(logits(np.concatenate([codec.roundtrip(x_eval[i:i + 64])
                                                             for i in range(0, len(x_eval), 64)])),
                                      base_pred, y_eval, base_top1))
        else:
            row["note"] = "changes the token layout: measure accuracy with --checkpoint (retrains the edge net)"
        row["source"] = "bundle"
        return row

    rows, stopped = collect_rows(fitted, make_row, on_codec, notes)
    return BenchResult(rows, "bundle", (int(feats.shape[1]), int(feats.shape[2])), jpeg, notes, stopped)
