"""Checkpoint-mode codec bench: real cached gathers, accuracy with the checkpoint's or a retrained edge network.

Why retrain: a codec that changes what the device sees (pooled tokens) needs an edge network trained on it, and
from the feature cache that takes seconds to minutes, never a backbone pass. Retraining follows the checkpoint's
own recipe (method hyperparameters and TrainParams from config.json), on its training split, with the codec's
round trip as the training transform; with `retrain="all"` the fp32 baseline is retrained the same way, so every
delta compares networks trained by one protocol.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from mist_kit.codec_bench import (
    MEASURE_IMAGES,
    BenchResult,
    Log,
    OnCodec,
    _agreement_row,
    _fit_all,
    collect_rows,
    jpeg_q90_bytes,
    measure_row,
)
from mist_kit.errors import CheckpointError, UsageError


def _gathers(config: Any, source: str, plan: Any, root: Path, backbone: Any, log: Log
             ) -> tuple[np.ndarray, np.ndarray]:
    """Valid rows of the plan's one cached tensor and labels for dataset `source` (cached now if needed)."""
    from mist_kit.calibration.features import find_cached_split
    from mist_kit.data import load_image_list
    from mist_kit.featurize import cache_features

    split = find_cached_split(config, source, plan, root)
    if split is None:  # a bf16-backbone cache of the same images serves too (~0.3% feature error), said in the log
        split = find_cached_split(config, source, plan, root, precision="bf16")
        if split is not None:
            log(f"using the bf16-backbone feature cache {split.path} for {source}")
    if split is None:
        split, _, _ = cache_features(backbone, config.backbone, load_image_list(source), root, plan.sources,
                                     progress=False, log=log)
    valid = split.valid()
    return np.asarray(split.array(str(plan.tensors[0].source)))[valid], np.asarray(split.labels())[valid]


def bench_checkpoint(names: list[str], checkpoint: str | Path, data: str, cache_dir: Path | None,
                     weights: str | None, retrain: str, on_codec: OnCodec | None, log: Log,
                     skip_unfit: bool = False) -> BenchResult:
    """See module docstring; `data` is the labelled evaluation set (e.g. the test split)."""
    from mist_kit.backbone import load_backbone_for
    from mist_kit.checkpoint import load_checkpoint, new_method, resolve_checkpoint_dir
    from mist_kit.data import load_image_list
    from mist_kit.runtime.codec import create_codec
    from mist_kit.train import TrainParams, fit, predict_logits

    config, model = load_checkpoint(checkpoint)
    k = config.method.k
    plan = model.plan
    if len(plan.tensors) != 1 or plan.tensors[0].shape[0] < 2:
        raise UsageError(f"checkpoint {checkpoint}: method {config.method.name!r} sends {list(plan.names)}; codec "
                         "bench compares codecs on one token tensor (e.g. mist's gather)")
    tensor = plan.tensors[0].name
    if not config.training.get("train"):
        raise CheckpointError(f"checkpoint {checkpoint}: config.json training.train is missing (needed to "
                              "calibrate codecs and retrain on the training cache)")
    root = cache_dir or Path(config.training.get("cache_dir") or resolve_checkpoint_dir(checkpoint) / "cache")
    bb_cache: dict[str, Any] = {}

    def backbone() -> Any:
        if "m" not in bb_cache:
            bb_cache["m"] = load_backbone_for(config.backbone, weights)
        return bb_cache["m"]

    x_test, y_test = _gathers(config, data, plan, root, backbone, log)
    train_src, val_src = config.training.get("train"), config.training.get("val")
    x_tr, y_tr = _gathers(config, train_src, plan, root, backbone, log)
    x_val, y_val = _gathers(config, val_src, plan, root, backbone, log) if val_src else (None, None)
    prefix = config.backbone.num_prefix_tokens
    fields = {f.name for f in dataclasses.fields(TrainParams)}
    params = TrainParams(**{key: v for key, v in config.training.items() if key in fields})
    refit = bool(config.training.get("refit"))
    own_spec = config.codecs.get(tensor) or {"name": "fp32"}
    own = create_codec(own_spec) if own_spec.get("tokens") else None
    notes = [f"checkpoint {checkpoint} (k={k}, trained for codec {own_spec.get('name', 'fp32')}); "
             f"{len(y_test)} evaluation images from {data}; codecs calibrated on {min(len(x_tr), 256)} training "
             f"gathers; retrained edge networks follow the checkpoint's recipe"
             f"{' (val early stopping, then refit on train + val)' if refit and val_src else ''}"]

    def retrained(codec: Any) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        tf = None if codec is None or codec.lossless else codec.roundtrip
        tokens = codec.out_tokens if codec is not None else plan.tensors[0].shape[0]

        def fresh() -> Any:
            return new_method(config.method.name, config.backbone.shape, k, len(config.classes),
                              config.method.params, params.seed, {tensor: (tokens, plan.tensors[0].shape[1])})

        net = fresh()
        res = fit(net, x_tr, y_tr, params, x_val, y_val, transform=tf)
        if refit and x_val is not None:  # the checkpoint's own protocol: retrain on train + val for the best epochs
            net = fresh()
            fit(net, np.concatenate([x_tr, x_val]), np.concatenate([y_tr, y_val]),
                dataclasses.replace(params, epochs=max(1, res.best_epoch)), transform=tf)
        return predict_logits(net, x_test, tf), time.perf_counter() - t0

    own_is_fp32 = own is None or own.lossless
    retrain_all = retrain == "all" or not own_is_fp32  # a codec-trained checkpoint: every row needs its own net
    fitted = _fit_all(names, x_tr[np.unique(np.linspace(0, len(x_tr) - 1, min(256, len(x_tr))).astype(int))],
                      prefix, skip_unfit, log)
    to_retrain = retrain_plan(fitted, config.backbone.num_tokens, retrain, own_is_fp32)
    if retrain != "none":
        announce_plan(to_retrain, retrain_all, len(x_tr), params.epochs, log)
    base_secs = None
    if retrain_all and retrain != "none":
        log("retraining the fp32 baseline edge network from the cache")
        base_logits, base_secs = retrained(None)
    else:
        base_logits = predict_logits(model, x_test)
    base_pred = base_logits.argmax(1)
    base_top1 = float(np.mean(base_pred == y_test))
    jpeg = jpeg_q90_bytes(list(load_image_list(data).paths), config.backbone.img_size)
    sample = np.asarray(x_test[:MEASURE_IMAGES], dtype=np.float32)
    timing = {"done": 0, "seconds": 0.0}
    if retrain == "none" and not own_is_fp32:
        notes.append(f"--no-retrain: the checkpoint was trained for {own_spec.get('name', 'fp32')}; rows use its edge "
                     "network as it is")

    def make_row(name: str, codec: Any) -> dict[str, Any]:
        row = {**measure_row(codec, sample), "retrained": False, "train_seconds": None, "jpeg_q90_bytes": jpeg,
               "source": "checkpoint"}
        if name in to_retrain and retrain == "none":
            row.update(top1=None, top1_delta=None, agreement=None,
                       note="changes the token layout: accuracy needs a retrained edge network (drop --no-retrain)")
            return row
        if codec.lossless and not retrain_all:
            logits = base_logits
        elif name in to_retrain or retrain_all:
            if codec.lossless:  # the baseline itself, retrained above
                logits, secs = base_logits, base_secs
            else:
                log(f"{name}: retraining the edge network on the codec's round trip")
                logits, secs = retrained(codec)
                timing["done"] += 1
                timing["seconds"] += secs
                left = len(to_retrain) - timing["done"]
                if left > 0:
                    each = timing["seconds"] / timing["done"]
                    log(f"{name}: retrained in {secs:.0f} s; {left} more to retrain, about {each * left:.0f} s")
            row.update(retrained=True, train_seconds=None if secs is None else round(secs, 1))
        else:
            logits = predict_logits(model, x_test, codec.roundtrip)
        row.update(_agreement_row(logits, base_pred, y_test, base_top1))
        return row

    rows, stopped = collect_rows(fitted, make_row, on_codec, notes)
    return BenchResult(rows, "checkpoint", (int(x_test.shape[1]), int(x_test.shape[2])), jpeg, notes, stopped)


def retrain_plan(fitted: dict[str, Any], num_tokens: int, retrain: str, own_is_fp32: bool) -> list[str]:
    """The codecs whose row retrains an edge network (auto: token-changing ones; all: every lossy one)."""
    if retrain == "all" or not own_is_fp32:
        return [n for n, c in fitted.items() if not c.lossless]
    return [n for n, c in fitted.items() if c.out_tokens != num_tokens]


def announce_plan(plan: list[str], baseline: bool, n_train: int, epochs: int, log: Log) -> None:
    """Say before any work which rows retrain and what one retrain is, so a long bench is never a surprise."""
    total = len(plan) + int(baseline)
    if not total:
        return
    who = ", ".join(plan) + (" and the fp32 baseline" if baseline else "")
    log(f"codec bench will retrain {total} edge network(s) ({who}), each up to {epochs} epochs on {n_train} cached "
        "training gathers (about as long as one k candidate of `train`); --no-retrain skips them "
        "(bytes/SNR only for those rows), --codecs picks fewer")
