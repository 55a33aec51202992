"""The train and evaluate workflows: datasets -> feature cache -> k search -> final model -> checkpoint.

The CLI parses flags into `TrainRequest` and renders the returned report; everything with side effects
(caching, checkpoint writing) happens here so library users get the same behaviour without the CLI.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mist_kit import __version__
from mist_kit.backbone import load_backbone, load_backbone_for
from mist_kit.cache import CachedSplit, InputRows
from mist_kit.checkpoint import load_checkpoint, new_method, save_checkpoint
from mist_kit.cloud_engines import check_engine, train_engine_parity
from mist_kit.config import CheckpointConfig, MethodSpec
from mist_kit.data import load_image_list
from mist_kit.edge import EdgeMethod, get_edge_method
from mist_kit.errors import DataError, UsageError
from mist_kit.featurize import cache_features
from mist_kit.runtime.codec.plan_codecs import decoded_shapes, roundtrips
from mist_kit.runtime.plan import CloudPlan, union_sources
from mist_kit.train import TrainParams, fit, fit_candidates, predict_logits, top1

if TYPE_CHECKING:
    from mist_kit.runtime.codec import Codec

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
    k: int | None = None  # the method's depth (MIST's k, ViT-Split's split); None = auto (choose on val)
    ks: tuple[int, ...] | None = None  # candidate depths; default: the method's own (MIST: N/3, 2N/3, N)
    method_params: dict[str, Any] = field(default_factory=dict)
    params: TrainParams = field(default_factory=TrainParams)
    refit: bool | None = None  # None: refit on train + val whenever val is given (the VTAB protocol); see run_training
    cache_dir: Path | None = None
    skip_bad: bool = False
    backbone_batch: int = 32
    backbone_precision: str = "fp32"  # "bf16": faster caching on AMX CPUs, ~0.3% feature error (see run_backbone)
    backbone_engine: str = "torch"  # "openvino": the cache filled by OpenVINO (mist_kit.cloud_engines)
    train_threads: int = 1  # torch threads while training edge networks (see _with_threads)
    progress: bool = True
    seeds: tuple[int, ...] | None = None  # several: one model per seed (OUT/seed-N), mean and sd (run_seeds)
    probe_init: bool = False  # start each head from the linear probe on the final-norm cls token (mist --cls-token)

    def __post_init__(self) -> None:
        if self.weights is not None and self.pretrained:
            raise UsageError("cannot use both --weights and --pretrained; pick one weight source")
        cls = get_edge_method(self.method)
        if self.k is None and self.val is None and (self.ks is None or len(self.ks) > 1) and cls.searches_depth():
            raise UsageError(f"--k auto chooses {cls.depth_name} on validation data: pass --val DATA, or fix it "
                             "with --k INT")
        if self.refit and self.val is None:
            raise UsageError("--refit retrains on train + val: it needs --val DATA")
        if self.refit is None:  # frozen: resolve the default once, so reports and checkpoints record a bool
            object.__setattr__(self, "refit", self.val is not None)
        if self.probe_init and cls.probe_input(self.method_params) is None:
            raise UsageError(f"--probe-init starts the head from a linear probe on the final-norm cls token: method "
                             f"{self.method!r} with these parameters does not read it raw (mist: --cls-token)")
        if self.probe_init and self.val is None:
            raise UsageError("--probe-init chooses the probe's C on validation data: pass --val DATA")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise UsageError(f"--seeds must list distinct integers, got {list(self.seeds)}")
        if self.backbone_precision not in ("fp32", "bf16"):
            raise UsageError(f"--backbone-precision must be fp32 or bf16, got {self.backbone_precision!r}")
        check_engine(self.backbone_engine, self.backbone_precision)


def _labels(split: CachedSplit) -> np.ndarray:
    return np.asarray(split.labels())[split.valid()]


def _with_threads(threads: int, work: Callable[[], Any]) -> Any:
    """Run `work` with `threads` torch threads, then restore the caller's setting.

    Edge networks train on small matrices, where a second thread mostly adds synchronisation: on the shared 2-core
    host one epoch took 3-4 s with 1 thread and 18-48 s with 2 (interleaved runs at load 15, see README). The
    backbone pass that fills the cache keeps torch's default.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        return work()
    finally:
        torch.set_num_threads(before)


def plan_tensors(plan: CloudPlan) -> dict[str, str]:
    """Sent tensor name -> cache source key."""
    return {t.name: str(t.source) for t in plan.tensors}


def _depths(cls: type[EdgeMethod], shape: Any, req: TrainRequest) -> tuple[list[int | None], list[int | None]]:
    """(depths to train, depths to cache), validated before any backbone work.

    A fixed `--k` trains that depth only, but the cache is filled for every candidate too (the same one pass), so
    a later `--k auto` or `compare` on the same data needs no backbone pass.
    """
    searched = list(sorted(set(req.ks))) if req.ks else list(cls.depth_candidates(shape, req.method_params))
    depths: list[int | None] = [req.k] if req.k is not None else searched
    cached = sorted(set(searched) | set(depths), key=lambda d: -1 if d is None else d)
    for d in cached:
        try:
            cls.check_depth(shape, d)
        except ValueError as exc:
            raise UsageError(f"method {req.method!r}: {exc}") from None
    return depths, cached


def _calibrated_codecs(codec: dict[str, Any] | None, tx: dict[Any, InputRows], prefix: int,
                       log: Log) -> dict[Any, dict[str, Codec]]:
    """Per candidate, one codec per sent tensor: a bare name is calibrated on the training split; a full spec
    (recorded by an earlier run) is used as is."""
    from mist_kit.runtime.codec import Codec

    if codec is None or codec.get("name", "fp32") == "fp32":
        return {key: {} for key in tx}
    if "tokens" in codec:
        return {key: {name: Codec.from_spec({**codec, "tensor": name}) for name in rows.names}
                for key, rows in tx.items()}
    from mist_kit.calibration.codec_calib import fit_for_candidates

    fitted = fit_for_candidates(codec["name"], tx, prefix)
    first = next(iter(next(iter(fitted.values())).values()))
    log(f"codec {codec['name']}: calibrated on {min(len(next(iter(tx.values()))), 256)} training images per "
        f"candidate and tensor; the edge network sees {first.out_tokens} tokens per tensor")
    return fitted


def run_seeds(req: TrainRequest, log: Log = print, codec: dict[str, Any] | None = None) -> dict[str, Any]:
    """One full training (search, refit, test) per seed in `req.seeds`, each in OUT/seed-N, on one shared cache.

    The report is the chosen seed's own, plus `seeds`: mean and sample sd of val and test top-1 over the seeds (test
    is scored once per seed, by its own run) and every seed's numbers. The chosen seed is the one with the best val
    top-1 (ties: lower val loss, then the first listed), never test; its checkpoint is copied to OUT/checkpoint so
    `evaluate OUT` and `export OUT` use it.
    """
    import shutil

    from mist_kit.atomic import atomic_dir

    seeds = list(req.seeds or (req.params.seed,))
    cache_dir = req.cache_dir or (req.out / "cache")  # one backbone pass serves every seed
    reports: dict[int, dict[str, Any]] = {}
    for i, seed in enumerate(seeds):
        log(f"seed {seed} ({i + 1}/{len(seeds)}): training into {req.out / f'seed-{seed}'}")
        one = replace(req, out=req.out / f"seed-{seed}", cache_dir=cache_dir, seeds=None,
                      params=replace(req.params, seed=seed))
        reports[seed] = run_training(one, log, codec)
    chosen = choose_seed(reports)
    with atomic_dir(req.out / "checkpoint") as tmp:
        shutil.copytree(reports[chosen]["checkpoint"], tmp, dirs_exist_ok=True)

    def spread(key: str) -> dict[str, float] | None:
        vals = [r[key] for r in reports.values() if r.get(key) is not None]
        if not vals:
            return None
        return {"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                "n": len(vals)}

    summary = {"seeds": seeds, "chosen_seed": chosen, "chosen_by": "val_top1, then val_loss",
               "val_top1": spread("val_top1"), "test_top1": spread("test_top1"),
               "train_seconds": round(sum(r["train_seconds"] for r in reports.values()), 3),
               "per_seed": [{"seed": sd, **{key: reports[sd].get(key) for key in
                                            ("k", "val_top1", "val_loss", "test_top1", "train_seconds", "checkpoint")}}
                            for sd in seeds]}
    log(f"seeds {seeds}: val top-1 {_pm(summary['val_top1'])}" + (f", test top-1 {_pm(summary['test_top1'])}"
        if summary["test_top1"] else "") + f"; top-level checkpoint = seed {chosen} (best val)")
    return {**reports[chosen], "checkpoint": str(req.out / "checkpoint"), "seeds": summary}


def choose_seed(reports: dict[int, dict[str, Any]]) -> int:
    """The seed whose run has the best val top-1 (ties: lower val loss, then the first listed); test never looks."""
    order = list(reports)
    return min(order, key=lambda sd: (-(reports[sd]["val_top1"] or 0.0), reports[sd].get("val_loss") or 0.0,
                                      order.index(sd)))


def _pm(stat: dict[str, float] | None) -> str:
    return "-" if stat is None else f"{100 * stat['mean']:.2f} +- {100 * stat['sd']:.2f}"


def run_training(req: TrainRequest, log: Log = print, codec: dict[str, Any] | None = None) -> dict[str, Any]:
    """Cache features, choose the depth on val (or use the given one), train the final model, save it, report.

    One backbone pass serves every candidate: the cache holds the union of the candidates' plan tensors.
    `codec` ({"name": ...}) is applied to every tensor the method's plan sends, calibrated per tensor; the edge
    network trains on its encode->decode round trip, as the device will receive it.
    """
    if req.seeds is not None:
        return run_seeds(req, log, codec)
    t_start = time.perf_counter()
    cls = get_edge_method(req.method)
    model_bb, spec = load_backbone(req.backbone, img_size=req.img_size, weights=req.weights,
                                   pretrained=req.pretrained, mean=req.mean, std=req.std)
    shape = spec.shape
    depths, cached = _depths(cls, shape, req)
    plans = {d: cls.cloud_plan(shape, d, req.method_params) for d in depths}
    sources = union_sources([cls.cloud_plan(shape, d, req.method_params) for d in cached])
    cache_root = req.cache_dir or (req.out / "cache")
    splits: dict[str, CachedSplit] = {}
    cache_seconds, skipped = 0.0, 0
    datasets = {"train": req.train, "val": req.val, "test": req.test}
    lists = {name: load_image_list(src) for name, src in datasets.items() if src is not None}
    classes = lists["train"].classes
    for name, images in lists.items():
        if name != "train" and len(images.classes) > len(classes):
            raise DataError(f"{images.source}: has {len(images.classes)} classes, train has {len(classes)}")
        split, secs, skip = cache_features(model_bb, spec, images, cache_root, sources,
                                           batch_size=req.backbone_batch, skip_bad=req.skip_bad,
                                           progress=req.progress, log=log, precision=req.backbone_precision,
                                           engine=req.backbone_engine)
        splits[name], cache_seconds, skipped = split, cache_seconds + secs, skipped + skip
    y_train = _labels(splits["train"])
    y_val = _labels(splits["val"]) if "val" in splits else None
    scaled = req.params.for_rows(len(y_train))
    if scaled.epochs != req.params.epochs and not cls.closed_form_head:
        log(f"{len(y_train)} training images: at least {req.params.min_steps} optimiser steps, so epochs "
            f"{req.params.epochs} -> {scaled.epochs}, patience {req.params.patience} -> {scaled.patience}, warmup "
            f"{req.params.warmup_epochs} -> {scaled.warmup_epochs} (--min-steps 0 keeps them as given)")
    t_train = time.perf_counter()
    tx = {d: splits["train"].inputs(plan_tensors(p)) for d, p in plans.items()}
    vx = {d: splits["val"].inputs(plan_tensors(p)) for d, p in plans.items()} if "val" in splits else None
    codecs = _calibrated_codecs(codec, tx, spec.num_prefix_tokens, log)
    transforms = {d: roundtrips(c) for d, c in codecs.items()}
    specs = {d: {name: c.spec() for name, c in cs.items()} for d, cs in codecs.items()}

    def build(d: int | None) -> EdgeMethod:
        method = new_method(req.method, shape, d, len(classes), req.method_params, req.params.seed,
                            decoded_shapes(plans[d], specs[d]))
        if method.needs_backbone_init:
            method.init_from_backbone(model_bb)
        return method

    models = {d: build(d) for d in depths}
    probe_cs = _probe_init(models, tx, vx, y_train, y_val, transforms, req, log) if req.probe_init else None

    def on_epoch(epoch: int, rows: dict) -> None:
        parts = [f"{cls.depth_name}={d}: loss {r['loss']:.3f}" + (f" val {r['val_top1']:.3f}" if "val_top1" in r
                                                                  else "") + (" (pruned)" if r.get("pruned") else "")
                 for d, r in rows.items()]
        log(f"epoch {epoch:3d}  " + "  ".join(parts))

    if cls.closed_form_head and vx is not None and depths == [None]:
        return _finish_probe(req, spec, classes, plans[None], tx[None], vx[None], y_train, y_val, transforms[None],
                             specs[None], splits, lists, build, cache_seconds, skipped, t_start, t_train, codec, log,
                             cache_root)
    results = _with_threads(req.train_threads, lambda: fit_candidates(models, tx, y_train, req.params, vx, y_val,
                                                                       transforms, on_epoch))
    chosen = choose_depth(results, plans)
    search = {} if depths == [None] else {
        str(d): {"val_top1": results[d].best_val_top1, "best_epoch": results[d].best_epoch,
                 "epochs_run": results[d].epochs_run} for d in depths}
    final, best = models[chosen], results[chosen]
    val_top1 = best.best_val_top1
    if req.refit:
        epochs = refit_epochs(best.best_epoch, len(y_train) + len(y_val), req.params)  # type: ignore[arg-type]
        if epochs > best.best_epoch:
            log(f"refit: best val epoch {best.best_epoch} is under --refit-min-steps {req.params.refit_floor} "
                f"optimiser steps on {len(y_train) + len(y_val)} rows")  # type: ignore[arg-type]
        log(f"refit on train + val for {epochs} epochs ({cls.depth_name}={chosen})")
        final = build(chosen)
        if probe_cs is not None:
            _refit_probe_init(final, tx[chosen] + vx[chosen], np.concatenate([y_train, y_val]),  # type: ignore[index, list-item]
                              transforms[chosen], probe_cs[chosen], req)
        # the search's schedule (min_steps applied for the train rows, warmup included), cut at the best epoch
        refit_params = replace(req.params.for_rows(len(y_train)), epochs=epochs)
        _with_threads(req.train_threads, lambda: fit(final, tx[chosen] + vx[chosen],  # type: ignore[index]
                                                     np.concatenate([y_train, y_val]),  # type: ignore[list-item]
                                                     refit_params, transform=transforms[chosen]))
    return _report_and_save(req, spec, classes, final, chosen, plans[chosen], specs[chosen], transforms[chosen],
                            splits, lists, cache_seconds, skipped, t_start, t_train, codec, cache_root,
                            {"val_top1": val_top1, "val_loss": best.best_val_loss,
                             "epochs_run": {str(d): r.epochs_run for d, r in results.items()}, "k_search": search,
                             "refit_epochs": epochs if req.refit else None,
                             **({"probe_init": {"C": probe_cs[chosen]}} if probe_cs is not None else {})},
                            {"probe_init": req.probe_init})


def choose_depth(results: Mapping[int | None, Any], plans: Mapping[int | None, CloudPlan]) -> int | None:
    """The searched depth that wins: best val top-1; ties go to the plan whose cloud runs fewer blocks (less cloud
    compute per image), then to the lower val loss, then to the shallower depth.

    Why cost before loss, and loss before depth: with `--no-cls-token` MIST's k = 4 plan runs 4 blocks and k = 12
    runs 12, so a tie is settled by what the cloud pays. With the default cls token every plan runs all N blocks
    (the final-norm cls token needs them), the bytes sent are equal too, and "the smaller k" saves nothing; a tiny
    val set (faces2: 27 images) then ties at 100% for every k, and the val loss is the one signal left that has not
    saturated, as it already is for the best epoch, the halving and the seed choice.
    """
    def key(d: int | None) -> tuple[float, int, float, int]:
        r = results[d]
        return (-(r.best_val_top1 or 0.0), plans[d].blocks,
                math.inf if r.best_val_loss is None else r.best_val_loss, -1 if d is None else d)

    return min(results, key=key)


def first_rows(x: InputRows, name: str, transforms: Any) -> np.ndarray:
    """Row 0 of tensor `name` for every image, after the codec's round trip: (N, D), what a linear probe reads."""
    return x.batch(np.arange(len(x)), transforms)[name][:, 0]


def _probe_init(models: dict[int | None, EdgeMethod], tx: dict[Any, InputRows], vx: dict[Any, InputRows] | None,
                y_train: np.ndarray, y_val: np.ndarray | None, transforms: dict[Any, Any], req: TrainRequest,
                log: Log) -> dict[int | None, float]:
    """`--probe-init` for the search: the linear probe (C chosen on val, fitted on train only) becomes every
    candidate's starting head. One probe per distinct round trip of the cls tensor (fp32: one for all k; a codec
    is calibrated per candidate). Returns each candidate's C; the refit's probe reuses the chosen one's."""
    from mist_kit.linear_probe import fit_linear_probe

    fitted: dict[int, Any] = {}
    users: dict[int, list[str]] = {}
    cs: dict[int | None, float] = {}
    for d, model in models.items():
        name = model.probe_input(model.hparams())
        assert name is not None and vx is not None and y_val is not None  # TrainRequest checked both
        key = id(transforms[d].get(name))
        if key not in fitted:
            fitted[key] = fit_linear_probe(first_rows(tx[d], name, transforms[d]), y_train,
                                           first_rows(vx[d], name, transforms[d]), y_val, seed=req.params.seed,
                                           refit=False, num_classes=model.num_classes)
        model.init_head_from_probe(fitted[key].weight, fitted[key].bias)
        users.setdefault(key, []).append(str(d))
        cs[d] = fitted[key].C
    depth_name = next(iter(models.values())).depth_name
    for key, res in fitted.items():
        log(f"probe init ({depth_name}={', '.join(users[key])}): the head starts from the linear probe, C={res.C:g} "
            f"chosen on val (val top-1 {res.val_top1_by_C[res.C]:.3f})")
    return cs


def _refit_probe_init(final: EdgeMethod, x: InputRows, y: np.ndarray, transforms: Any, c: float,
                      req: TrainRequest) -> None:
    """`--probe-init` for the refit: the probe with the search's C, fitted on the refit's rows (train + val),
    starts the head."""
    from mist_kit.linear_probe import fit_probe_head

    name = final.probe_input(final.hparams())
    assert name is not None
    final.init_head_from_probe(*fit_probe_head(first_rows(x, name, transforms), y, c,
                                               num_classes=final.num_classes, seed=req.params.seed))


def refit_epochs(best_epoch: int, rows: int, params: TrainParams) -> int:
    """Epochs of the refit on train + val: the best val epoch, but at least `params.refit_floor` optimiser steps
    (default: `min_steps`) over `rows` rows. Why a floor: on a tiny val set (faces2: 27 images) val top-1 saturates
    early, the best epoch says little, and a refit of 30-100 steps from scratch under-trains; val cannot judge a
    refit (it is in the refit's data), so the floor is the search's own rule, not a value chosen on val."""
    steps = max(1, math.ceil(rows / params.batch_size))
    return max(1, best_epoch, math.ceil(params.refit_floor / steps))


def _report_and_save(req: TrainRequest, spec: Any, classes: tuple[str, ...], final: EdgeMethod, depth: int | None,
                     plan: CloudPlan, codec_specs: dict[str, Any], transforms: Any, splits: dict[str, CachedSplit],
                     lists: dict[str, Any], cache_seconds: float, skipped: int, t_start: float, t_train: float,
                     codec: dict[str, Any] | None, cache_root: Path, fit_report: dict[str, Any],
                     fit_training: dict[str, Any]) -> dict[str, Any]:
    """The train report (the fit's own fields merged in), test top-1 when a test split is given, and the
    checkpoint, written the same way for every training path."""
    report: dict[str, Any] = {
        "method": req.method,
        "k": depth,
        "val_top1": fit_report.pop("val_top1"),
        "trainable_params": final.trainable_params(),
        "edge": final.cost().to_dict(),
        "cache_seconds": round(cache_seconds, 3),
        "cache_bytes_per_image": splits["train"].bytes_per_image(),
        "train_seconds": round(time.perf_counter() - t_train, 3),
        **fit_report,
        "images": {name: len(splits[name].valid()) for name in lists},
        "skipped_images": skipped,
        "refit": req.refit,
        "codec": (codec or {}).get("name", "fp32"),
        "bytes_per_image": wire_bytes(plan, codec_specs, spec.num_prefix_tokens),
    }
    if "test" in splits:
        x_test = splits["test"].inputs(plan_tensors(plan))
        report["test_top1"] = top1(predict_logits(final, x_test, transforms), _labels(splits["test"]))
    if req.backbone_engine != "torch":  # what the faster engine cost: gather error and edge agreement vs torch fp32
        report["backbone_engine"] = train_engine_parity(req, spec, final, plan, transforms,
                                                        lists["val"] if "val" in lists else lists["train"])
    config = CheckpointConfig(
        backbone=spec,
        method=MethodSpec(name=req.method, k=depth, params=final.hparams()),
        classes=classes,
        codecs=codec_specs,
        training={**req.params.__dict__, "refit": req.refit, "train": str(Path(req.train).resolve()),
                  "val": str(Path(req.val).resolve()) if req.val else None, **fit_training,
                  "cache_dir": str(Path(cache_root).resolve()), "backbone_precision": req.backbone_precision,
                  "backbone_engine": req.backbone_engine},
        metrics={k: report[k] for k in ("val_top1", "test_top1") if k in report},
        version=__version__,
    )
    report["checkpoint"] = str(save_checkpoint(req.out / "checkpoint", config, final))
    report["total_seconds"] = round(time.perf_counter() - t_start, 3)
    return report


def _finish_probe(req: TrainRequest, spec: Any, classes: tuple[str, ...], plan: CloudPlan,
                  tx: InputRows, vx: InputRows, y_train: np.ndarray, y_val: np.ndarray, transforms: Any,
                  codec_specs: dict[str, Any], splits: dict[str, CachedSplit], lists: dict[str, Any], build: Any,
                  cache_seconds: float, skipped: int, t_start: float, t_train: float, codec: dict[str, Any] | None,
                  log: Log, cache_root: Path) -> dict[str, Any]:
    """The linear probe: a standardised logistic regression whose C is chosen on val (never test), folded into the
    head on raw features, refit on train + val with `--refit`. A strong baseline, not an under-trained layer."""
    from mist_kit.linear_probe import fit_linear_probe

    (name,) = plan.names
    res = fit_linear_probe(first_rows(tx, name, transforms), y_train, first_rows(vx, name, transforms), y_val,
                           seed=req.params.seed, refit=req.refit, num_classes=len(classes))
    log(f"linear probe: C={res.C:g} chosen on val (val top-1 {res.val_top1_by_C[res.C]:.3f})"
        + ("; refit on train + val" if req.refit else ""))
    final = build(None)
    with torch.no_grad():
        final.head.weight.copy_(torch.from_numpy(res.weight))
        final.head.bias.copy_(torch.from_numpy(res.bias))
    final.eval()
    probe = {"C": res.C, "val_top1_by_C": {f"{c:g}": v for c, v in res.val_top1_by_C.items()}}
    return _report_and_save(req, spec, classes, final, None, plan, codec_specs, transforms, splits, lists,
                            cache_seconds, skipped, t_start, t_train, codec, cache_root,
                            {"val_top1": res.val_top1_by_C[res.C], "val_loss": res.val_loss_by_C[res.C],
                             "epochs_run": {}, "k_search": {}, "probe": probe},
                            {"probe_C": res.C})


def wire_bytes(plan: CloudPlan, specs: dict[str, dict[str, Any]], prefix: int) -> int:
    """Bytes per image the device receives for this plan and these codecs (before zstd)."""
    from mist_kit.runtime.codec.plan_codecs import bytes_per_image, plan_codecs

    return bytes_per_image(plan_codecs(plan, specs, prefix))


def run_evaluation(checkpoint: str | Path, data: str, cache_dir: Path | None = None, weights: str | None = None,
                   skip_bad: bool = False, progress: bool = True, log: Log = print,
                   precision: str | None = None) -> dict[str, Any]:
    """Top-1 of a checkpoint on a labelled dataset (features cached like training's).

    `precision` overrides the backbone precision the checkpoint's features were cached with (e.g. bf16 to
    evaluate a large test set quickly on an AMX CPU); the report records which one was used.
    """
    config, model = load_checkpoint(checkpoint)
    images = load_image_list(data)
    if len(images.classes) > len(config.classes):
        raise DataError(f"{data}: has {len(images.classes)} classes, the checkpoint knows {len(config.classes)}")
    plan = model.plan
    used_precision = precision or str(config.training.get("backbone_precision", "fp32"))
    if used_precision not in ("fp32", "bf16"):
        raise UsageError(f"backbone precision must be fp32 or bf16, got {used_precision!r}")
    root = cache_dir or Path(config.training.get("cache_dir") or Path(checkpoint) / "cache")
    split, secs, skipped = cache_features(lambda: load_backbone_for(config.backbone, weights), config.backbone,
                                          images, root, plan.sources, skip_bad=skip_bad, progress=progress, log=log,
                                          precision=used_precision)
    from mist_kit.runtime.codec.plan_codecs import plan_codecs

    transforms = roundtrips(plan_codecs(plan, config.codecs, config.backbone.num_prefix_tokens))
    logits = predict_logits(model, split.inputs(plan_tensors(plan)), transforms)
    labels = _labels(split)
    return {"top1": top1(logits, labels), "images": len(labels), "skipped_images": skipped,
            "k": config.method.k, "method": config.method.name, "cache_seconds": round(secs, 3),
            "backbone_precision": used_precision}
