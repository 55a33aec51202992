"""The train and evaluate workflows: datasets -> feature cache -> k search -> final model -> checkpoint.

The CLI parses flags into `TrainRequest` and renders the returned report; everything with side effects
(caching, checkpoint writing) happens here so library users get the same behaviour without the CLI.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mist_kit import __version__
from mist_kit.backbone import load_backbone, load_backbone_for
from mist_kit.cache import CachedSplit
from mist_kit.checkpoint import load_checkpoint, save_checkpoint
from mist_kit.config import BackboneSpec, CheckpointConfig, MethodSpec
from mist_kit.data import load_image_list
from mist_kit.edge import EdgeMethod, create_edge_method, get_edge_method
from mist_kit.errors import DataError, UsageError
from mist_kit.featurize import cache_features
from mist_kit.train import FeatureTransform, TrainParams, fit, fit_candidates, predict_logits, top1

Log = Callable[[str], None]


@dataclass(frozen=True)
class TrainRequest:
    """Everything `mist-kit train` needs; contradictory settings are rejected at construction."""

    backbone: str
    train: str
    val: str | None
    out: Path
    weights: str | None = None
    pretrained: bool = False
    img_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    test: str | None = None
    method: str = "mist"
    k: int | None = None  # None = auto (choose on val)
    ks: tuple[int, ...] | None = None  # candidate ks; default N/3, 2N/3, N
    method_params: dict[str, Any] = field(default_factory=dict)
    params: TrainParams = field(default_factory=TrainParams)
    refit: bool = False
    cache_dir: Path | None = None
    skip_bad: bool = False
    backbone_batch: int = 32
    backbone_precision: str = "fp32"  # "bf16": faster caching on AMX CPUs, ~0.3% feature error (see run_backbone)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.weights is not None and self.pretrained:
            raise UsageError("cannot use both --weights and --pretrained; pick one weight source")
        if self.k is None and self.val is None and get_edge_method(self.method).input_kind == "gather":
            raise UsageError("--k auto chooses k on validation data: pass --val DATA, or fix k with --k INT")
        if self.refit and self.val is None:
            raise UsageError("--refit retrains on train + val: it needs --val DATA")
        if self.backbone_precision not in ("fp32", "bf16"):
            raise UsageError(f"--backbone-precision must be fp32 or bf16, got {self.backbone_precision!r}")


def _labels(split: CachedSplit) -> np.ndarray:
    return np.asarray(split.labels())[split.valid()]


def _features(split: CachedSplit, kind: str, k: int | None) -> np.ndarray:
    """Valid rows of a cached split, loaded into memory as float16 (training touches every row every epoch)."""
    return np.asarray(split.features(kind, k))[split.valid()]


def _new_method(name: str, spec: BackboneSpec, num_classes: int, params: dict[str, Any], seed: int,
                num_tokens: int | None = None) -> EdgeMethod:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        try:
            return create_edge_method(name, embed_dim=spec.embed_dim, num_tokens=num_tokens or spec.num_tokens,
                                      num_prefix_tokens=spec.num_prefix_tokens, num_classes=num_classes, **params)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"method {name!r}: {exc}") from None


def run_training(req: TrainRequest, log: Log = print, transform: FeatureTransform | None = None,
                 codec: dict[str, Any] | None = None) -> dict[str, Any]:
    """Cache features, choose k on val (or use the given k), train the final model, save it, and report.

    `transform` maps cached float32 gathers [B, T, D] to what the device will receive (a codec's
    encode->decode round trip, token pooling); `codec` is its spec, recorded in the checkpoint.
    """
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t_start = time.perf_counter()
    model_bb, spec = load_backbone(req.backbone, img_size=req.img_size, weights=req.weights,
                                   pretrained=req.pretrained, mean=req.mean, std=req.std)
    kind = get_edge_method(req.method).input_kind
    ks = tuple(sorted(set(req.ks or spec.candidate_ks())))
    if req.k is not None:
        ks = tuple(sorted(set(ks) | {req.k}))
    bad = [k for k in ks if not 0 <= k <= spec.num_blocks]
    if bad:
        raise UsageError(f"k values {bad} are outside 0..{spec.num_blocks} for {spec.name}")
    cache_root = req.cache_dir or (req.out / "cache")
    splits: dict[str, CachedSplit] = {}
    cache_seconds, skipped = 0.0, 0
    datasets = {"train": req.train, "val": req.val, "test": req.test}
    lists = {name: load_image_list(src) for name, src in datasets.items() if src is not None}
    classes = lists["train"].classes
    for name, images in lists.items():
        if name != "train" and len(images.classes) > len(classes):
            raise DataError(f"{images.source}: has {len(images.classes)} classes, train has {len(classes)}")
        split, secs, skip = cache_features(model_bb, spec, images, cache_root, ks, batch_size=req.backbone_batch,
                                           skip_bad=req.skip_bad, progress=req.progress, log=log,
                                           precision=req.backbone_precision)
        splits[name], cache_seconds, skipped = split, cache_seconds + secs, skipped + skip
    del model_bb
    y_train = _labels(splits["train"])
    y_val = _labels(splits["val"]) if "val" in splits else None
    num_tokens = (codec or {}).get("num_tokens")
    t_train = time.perf_counter()
    search: dict[str, Any] = {}
    if kind == "final_cls":
        chosen_k = None
        candidates = [None]
    else:
        candidates = [req.k] if req.k is not None else list(ks)
    tx = {k: _features(splits["train"], kind, k) for k in candidates}
    vx = {k: _features(splits["val"], kind, k) for k in candidates} if "val" in splits else None
    transforms: dict[Any, FeatureTransform | None] = {k: transform for k in candidates}
    codec_specs: dict[Any, dict[str, Any]] = {}
    if codec is not None and codec.get("name", "fp32") != "fp32":
        if kind != "gather":
            raise UsageError(f"--codec applies to methods that consume the gather; {req.method!r} does not")
        if "tokens" not in codec:  # a bare name: calibrate it on this training split, per candidate k
            from mist_kit.calibration.codec_calib import fit_for_candidates

            fitted = fit_for_candidates(codec["name"], tx, spec.num_prefix_tokens)
            codec_specs = {k: c.spec() for k, c in fitted.items()}
            transforms = {k: None if c.lossless else c.roundtrip for k, c in fitted.items()}
            num_tokens = next(iter(fitted.values())).out_tokens
            log(f"codec {codec['name']}: calibrated on {min(len(y_train), 256)} training images per k; "
                f"the edge network sees {num_tokens} tokens")
        elif transform is None:
            transforms = {k: codec_transform(codec) for k in candidates}
    models = {k: _new_method(req.method, spec, len(classes), req.method_params, req.params.seed, num_tokens)
              for k in candidates}

    def on_epoch(epoch: int, rows: dict) -> None:
        parts = [f"k={k}: loss {r['loss']:.3f}" + (f" val {r['val_top1']:.3f}" if "val_top1" in r else "")
                 + (" (pruned)" if r.get("pruned") else "")
                 for k, r in rows.items()]
        log(f"epoch {epoch:3d}  " + "  ".join(parts))

    results = fit_candidates(models, tx, y_train, req.params, vx, y_val, transforms, on_epoch)
    if kind == "final_cls":
        chosen_k = None
    else:
        # best val top-1; ties go to the smaller k (fewer cloud blocks, less cloud compute per image)
        chosen_k = min(candidates, key=lambda k: (-(results[k].best_val_top1 or 0.0), k))
        search = {str(k): {"val_top1": results[k].best_val_top1, "best_epoch": results[k].best_epoch,
                           "epochs_run": results[k].epochs_run} for k in candidates}
    final = models[chosen_k]
    best = results[chosen_k]
    transform = transforms[chosen_k]
    val_top1 = best.best_val_top1
    if req.refit:
        epochs = max(1, best.best_epoch)
        log(f"refit on train + val for {epochs} epochs (k={chosen_k})")
        final = _new_method(req.method, spec, len(classes), req.method_params, req.params.seed, num_tokens)
        x_all = np.concatenate([tx[chosen_k], vx[chosen_k]])  # type: ignore[index]
        y_all = np.concatenate([y_train, y_val])  # type: ignore[list-item]
        refit_params = TrainParams(**{**req.params.__dict__, "epochs": epochs})
        fit(final, x_all, y_all, refit_params, transform=transform)
    train_seconds = time.perf_counter() - t_train
    report: dict[str, Any] = {
        "method": req.method,
        "k": chosen_k,
        "val_top1": val_top1,
        "trainable_params": final.trainable_params(),
        "cache_seconds": round(cache_seconds, 3),
        "train_seconds": round(train_seconds, 3),
        "epochs_run": {str(k): r.epochs_run for k, r in results.items()},
        "k_search": search,
        "images": {name: len(images) for name, images in lists.items()},
        "skipped_images": skipped,
        "refit": req.refit,
        "codec": (codec or {}).get("name", "fp32"),
    }
    if "test" in splits:
        x_test = _features(splits["test"], kind, chosen_k)
        report["test_top1"] = top1(predict_logits(final, x_test, transform), _labels(splits["test"]))
    config = CheckpointConfig(
        backbone=spec,
        method=MethodSpec(name=req.method, k=chosen_k, params=final.hparams()),
        classes=classes,
        codec=codec_specs.get(chosen_k) or codec or {"name": "fp32"},
        training={**req.params.__dict__, "refit": req.refit, "train": str(Path(req.train).resolve()),
                  "val": str(Path(req.val).resolve()) if req.val else None,
                  "cache_dir": str(Path(cache_root).resolve()), "backbone_precision": req.backbone_precision},
        metrics={k: report[k] for k in ("val_top1", "test_top1") if k in report},
        version=__version__,
    )
    ckpt_dir = save_checkpoint(req.out / "checkpoint", config, final)
    report["checkpoint"] = str(ckpt_dir)
    report["total_seconds"] = round(time.perf_counter() - t_start, 3)
    return report


def run_evaluation(checkpoint: str | Path, data: str, cache_dir: Path | None = None, weights: str | None = None,
                   skip_bad: bool = False, progress: bool = True, log: Log = print,
                   transform: FeatureTransform | None = None, precision: str | None = None) -> dict[str, Any]:
    """Top-1 of a checkpoint on a labelled dataset (features cached like training's).

    `precision` overrides the backbone precision the checkpoint's features were cached with (e.g. bf16 to
    evaluate a large test set quickly on an AMX CPU); the report records which one was used.
    """
    config, model = load_checkpoint(checkpoint)
    images = load_image_list(data)
    if len(images.classes) > len(config.classes):
        raise DataError(f"{data}: has {len(images.classes)} classes, the checkpoint knows {len(config.classes)}")
    backbone = load_backbone_for(config.backbone, weights)
    k = config.method.k
    kind = model.input_kind
    ks = (k,) if k is not None else (config.backbone.num_blocks,)
    used_precision = precision or str(config.training.get("backbone_precision", "fp32"))
    if used_precision not in ("fp32", "bf16"):
        raise UsageError(f"backbone precision must be fp32 or bf16, got {used_precision!r}")
    root = cache_dir or Path(config.training.get("cache_dir") or Path(checkpoint) / "cache")
    split, secs, skipped = cache_features(backbone, config.backbone, images, root, ks, skip_bad=skip_bad,
                                          progress=progress, log=log, precision=used_precision)
    if transform is None and config.codec.get("name", "fp32") != "fp32":
        transform = codec_transform(config.codec)
    logits = predict_logits(model, _features(split, kind, k), transform)
    labels = _labels(split)
    return {"top1": top1(logits, labels), "images": len(labels), "skipped_images": skipped,
            "k": k, "method": config.method.name, "cache_seconds": round(secs, 3),
            "backbone_precision": used_precision}


def codec_transform(codec: dict[str, Any]) -> FeatureTransform | None:
    """The encode->decode round trip a checkpoint's codec applies to features (None for lossless fp32)."""
    from mist_kit.runtime.codec import transform_for

    return transform_for(codec)
