"""`mist-kit train`, `evaluate` and `methods`: thin commands over `mist_kit.pipeline`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mist_kit.cli.common import Quiet, cli_errors, console, logger, parse_ints, parse_triple, print_json

TRAIN_DEFAULT_CODEC = "fp32"  # `train --codec` default (what `codec list` marks as train's default)


class Precision(str, Enum):
    """Backbone compute precision while caching features (a closed choice)."""

    fp32 = "fp32"
    bf16 = "bf16"


class BackboneEngine(str, Enum):
    """Engine running the backbone while caching features (a closed choice)."""

    torch = "torch"
    openvino = "openvino"


def register(app: typer.Typer) -> None:
    app.command("train")(train)
    app.command("evaluate")(evaluate)
    app.command("methods")(methods)


@cli_errors
def train(
    train: Annotated[str, typer.Option("--train", help="Training data: ImageFolder dir or list file")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (checkpoint/ and cache/)")],
    backbone: Annotated[str, typer.Option(help="timm ViT name, e.g. vit_small_patch14_dinov2")] = "test_vit",
    weights: Annotated[Path | None, typer.Option(help="Backbone weights (.safetensors, or .pth)")] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Fetch weights from the model hub")] = False,
    val: Annotated[str | None, typer.Option("--val", help="Validation data (chooses k, early stopping)")] = None,
    test: Annotated[str | None, typer.Option("--test", help="Test data, reported as test_top1")] = None,
    img_size: Annotated[int | None, typer.Option(help="Input size (default: the model's)")] = None,
    mean: Annotated[str | None, typer.Option(help="Normalisation mean 'r,g,b' (default: model's)")] = None,
    std: Annotated[str | None, typer.Option(help="Normalisation std 'r,g,b' (default: model's)")] = None,
    method: Annotated[str, typer.Option(help="Edge method: mist | linear")] = "mist",
    k: Annotated[str, typer.Option(help="'auto' (choose on --val) or a fixed gather depth")] = "auto",
    ks: Annotated[str | None, typer.Option(help="Candidate ks for auto, e.g. 4,8,12 (default N/3,2N/3,N)")] = None,
    pool: Annotated[str, typer.Option(help="mist / vitsplit pooling: cls | mean")] = "cls",
    rank: Annotated[int, typer.Option(help="mist attention rank r")] = 16,
    epochs: Annotated[int | None, typer.Option(
        help="Maximum epochs [default: 20, lengthened to >= --min-steps optimiser steps on small data; an explicit "
             "value is used as given unless --min-steps is also passed]")] = None,
    min_steps: Annotated[int | None, typer.Option(
        help="Train for at least this many optimiser steps: epochs, patience and warmup grow by one factor on small "
             "data (0: off) [default: 500, or 0 with an explicit --epochs]")] = None,
    batch_size: Annotated[int, typer.Option(help="Training batch size")] = 32,
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 3e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (matrices only)")] = 0.05,
    patience: Annotated[int, typer.Option(
        help="Early stopping: epochs without val improvement (ties in val top-1 go to the lower val loss)")] = 4,
    label_smoothing: Annotated[float, typer.Option(help="Cross-entropy label smoothing")] = 0.1,
    prune_margin: Annotated[float, typer.Option(
        help="k search: stop a candidate whose val top-1 trails the best by more than this (1: never)")] = 0.1,
    prune_after: Annotated[int, typer.Option(
        help="k search: epochs before --prune-margin applies (scaled with --min-steps)")] = 3,
    halving: Annotated[bool, typer.Option(
        "--halving/--no-halving", help="k search: at --prune-after x 1, 2, 4, ... epochs keep only the better half "
        "of the candidates (successive halving)")] = True,
    ema: Annotated[float, typer.Option(
        help="Keep an exponential moving average of the weights with this decay, and use it (0: off)")]
    = 0.0,
    mixup: Annotated[float, typer.Option(
        help="Mixup on cached features: Beta(a, a) mixtures of two rows and their labels (0: off)")]
    = 0.0,
    refit_min_steps: Annotated[int | None, typer.Option(
        help="The refit on train + val trains at least this many optimiser steps (0: exactly the best val epoch's "
             "count) [default: --min-steps]")] = None,
    cls_token: Annotated[bool, typer.Option(
        "--cls-token/--no-cls-token", help="mist: also send the backbone's final-norm cls token and concatenate it "
        "to the LAE embedding before the head (our extension, not the paper's: D more values per image, 768 B fp16 "
        "for ViT-S; chosen on val, BENCHMARKS.md)")] = True,  # = mist's train_defaults (a test holds them equal)
    probe_init: Annotated[bool, typer.Option(
        "--probe-init/--no-probe-init", help="mist --cls-token: start every head from the linear probe on the cls "
        "token (C chosen on val; the LAE half of the head starts at zero; lost on val in BENCHMARKS.md, so "
        "off)")] = False,
    dropout: Annotated[float | None, typer.Option(
        help="mist / vitsplit dropout on the pooled embedding [default: the method's: mist 0.1, vitsplit 0]")] = None,
    refit: Annotated[bool | None, typer.Option(
        "--refit/--no-refit", help="After choosing k and the epoch count on --val, retrain on train + val for that "
                                   "many epochs [default: on whenever --val is given]")] = None,
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
    seeds: Annotated[str | None, typer.Option(
        help="Several seeds, e.g. 0,1,2: one model each in OUT/seed-N, mean +- sd of val and test top-1; "
             "OUT/checkpoint "
             "is the best-val seed's (never chosen on test). Overrides --seed")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Feature cache root (default OUT/cache)")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip unreadable images (counted)")] = False,
    backbone_batch: Annotated[int, typer.Option(help="Images per backbone batch while caching")] = 32,
    backbone_precision: Annotated[Precision, typer.Option(
        help="Backbone compute precision while caching: fp32 (reference) or bf16 (~10x faster on AMX CPUs, "
             "~0.3% feature error)")] = Precision.fp32,
    train_precision: Annotated[Precision, typer.Option(
        help="Edge training precision: fp32, or bf16 autocast (AVX-512 BF16 / AMX CPUs; ~3x faster for vitsplit, "
             "no gain for mist)")] = Precision.fp32,
    backbone_engine: Annotated[BackboneEngine, typer.Option(
        help="Engine filling the cache: torch (reference) or openvino (faster on x86; its parity vs torch fp32 "
             "is in the report)")] = BackboneEngine.torch,
    codec: Annotated[str, typer.Option(help="Feature codec the device will receive (see `mist-kit codec list`); "
                                            "calibrated on --train, the edge network is trained on its round "
                                            "trip")] = TRAIN_DEFAULT_CODEC,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout")] = False,
    quiet: Quiet = False,
) -> None:
    """Cache backbone features once, choose k on --val, train the edge network, write a checkpoint."""
    k_value: int | None
    if k == "auto":
        k_value = None
    else:
        try:
            k_value = int(k)
        except ValueError:
            raise typer.BadParameter(f"--k: expected 'auto' or an integer, got {k!r}") from None
    from mist_kit.runtime.codec import codec_params, parse_codec_name

    codec_params(parse_codec_name(codec)[0])  # an unknown codec fails now, before any file or backbone work
    _preflight(backbone, weights, pretrained, img_size, k_value, parse_ints(ks, "--ks"), (train, val, test))
    from mist_kit.edge import get_edge_method
    from mist_kit.pipeline import TrainRequest, run_training
    from mist_kit.train import TrainParams

    method_params: dict = {}
    dropped = {} if dropout is None else {"dropout": dropout}  # None: the method's own default
    if get_edge_method(method).method_name == "mist":
        method_params = {"rank": rank, "pool": pool, "cls_token": cls_token, **dropped}
    elif get_edge_method(method).method_name in ("vitsplit", "vitsplit-lite"):
        method_params = {"pool": pool, **dropped}
    defaults = TrainParams()
    if min_steps is None:  # an explicit --epochs means that many epochs, unless --min-steps says otherwise
        min_steps = defaults.min_steps if epochs is None else 0
    req = TrainRequest(
        backbone=backbone, train=train, val=val, test=test, out=out,
        weights=str(weights) if weights else None, pretrained=pretrained, img_size=img_size,
        mean=parse_triple(mean, "--mean"), std=parse_triple(std, "--std"), method=method, k=k_value,
        ks=parse_ints(ks, "--ks"), method_params=method_params,
        params=TrainParams(epochs=defaults.epochs if epochs is None else epochs, min_steps=min_steps,
                           batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                           patience=patience, label_smoothing=label_smoothing, seed=seed,
                           prune_margin=prune_margin, prune_after=prune_after, halving=halving, ema=ema,
                           mixup=mixup, refit_min_steps=refit_min_steps, precision=train_precision.value),
        refit=refit, cache_dir=cache_dir, skip_bad=skip_bad, backbone_batch=backbone_batch,
        seeds=parse_ints(seeds, "--seeds"), probe_init=probe_init,
        backbone_precision=backbone_precision.value, backbone_engine=backbone_engine.value, progress=not quiet,
    )
    report = run_training(req, log=logger(quiet), codec={"name": codec})
    if json_out:
        print_json(report)
        return
    table = Table(title="mist-kit train")
    table.add_column("metric")
    table.add_column("value")
    for key in ("method", "k", "codec", "val_top1", "test_top1", "trainable_params", "cache_seconds", "train_seconds",
                "checkpoint"):
        if key in report:
            value = report[key]
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) and "top1" in key else str(value))
    if "seeds" in report:
        summary = report["seeds"]
        for key in ("val_top1", "test_top1"):
            if summary[key]:
                table.add_row(f"{key} over seeds {summary['seeds']}",
                              f"{summary[key]['mean']:.4f} +- {summary[key]['sd']:.4f} (mean +- sd)")
        table.add_row("checkpoint is seed", f"{summary['chosen_seed']} (best val)")
    console.print(table)


def _preflight(backbone: str, weights: Path | None, pretrained: bool, img_size: int | None, k: int | None,
               ks: tuple[int, ...] | None, data: tuple[str | None, str | None, str | None]) -> None:
    """Torch-free checks before the ~30 s of imports and any backbone work (mist_kit.cli.preflight)."""
    from mist_kit.cli import preflight
    from mist_kit.errors import UsageError

    if weights is None and not pretrained:  # the same rule as load_backbone, said before the imports
        raise UsageError("no backbone weights: pass --weights FILE (safetensors) or --pretrained (needs the hub)")
    preflight.check_file(weights, "--weights")
    for source, flag in zip(data, ("--train", "--val", "--test"), strict=True):
        preflight.check_data(source, flag)
    preflight.check_backbone_args(backbone, img_size, k, ks)
    if pretrained and weights is None:
        preflight.check_pretrained_reachable(backbone)


@cli_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory (or a train --out directory)")],
    data: Annotated[str, typer.Argument(help="Labelled data: ImageFolder dir or list file")],
    weights: Annotated[Path | None, typer.Option(help="Backbone weights if moved since training")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Feature cache root")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip unreadable images (counted)")] = False,
    backbone_precision: Annotated[Precision | None, typer.Option(
        help="Backbone precision for uncached images (default: the one the checkpoint trained with)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout")] = False,
    quiet: Quiet = False,
) -> None:
    """Top-1 accuracy of a checkpoint on labelled data."""
    from mist_kit.cli import preflight

    preflight.check_file(weights, "--weights")
    preflight.check_data(data, "DATA")
    from mist_kit.pipeline import run_evaluation

    report = run_evaluation(checkpoint, data, cache_dir=cache_dir, weights=str(weights) if weights else None,
                            skip_bad=skip_bad, progress=not quiet, log=logger(quiet),
                            precision=backbone_precision.value if backbone_precision else None)
    if json_out:
        print_json(report)
    else:
        console.print(f"top1 {report['top1']:.4f} on {report['images']} images (k={report['k']}, "
                      f"{report['method']})", highlight=False)


@cli_errors
def methods() -> None:
    """List the registered edge methods."""
    from mist_kit.edge import get_edge_method, list_edge_methods

    for name in list_edge_methods():
        cls = get_edge_method(name)
        depth = cls.depth_name if cls.searches_depth() else "-"  # what --k means for it, or "-" when it has none
        typer.echo(f"{name}\t{depth}\t{(cls.__doc__ or '').strip().splitlines()[0]}")
