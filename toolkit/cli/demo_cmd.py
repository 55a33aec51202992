"""`mist-kit demo`: the whole pipeline, offline, on bundled data with a small seeded random-init ViT."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mist_kit.cli.common import cli_errors, console

DEMO_BACKBONE = "test_vit"  # timm's tiny registered ViT: width 64, 6 blocks
DEMO_IMG_SIZE = 64


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


@cli_errors
def demo(
    out: Annotated[Path, typer.Option(help="Working directory for data, checkpoint, bundle")] = Path("demo-out"),
    epochs: Annotated[int, typer.Option(help="Maximum training epochs")] = 30,
) -> None:
    """Run cache -> train (k auto) -> evaluate on scikit-learn's digits with a random-init tiny ViT."""
    from mist_kit.backbone import save_random_backbone
    from mist_kit.demo_data import write_digits
    from mist_kit.pipeline import TrainRequest, run_evaluation, run_training
    from mist_kit.train import TrainParams

    say = lambda msg: console.print(msg, highlight=False, markup=False)  # noqa: E731
    say(f"mist-kit demo: backbone {DEMO_BACKBONE} with RANDOM-INIT weights (seed 0), not pretrained: the numbers "
        "show the pipeline works, not what a pretrained ViT reaches.")
    lists = write_digits(out / "data")
    weights = out / "backbone.safetensors"
    if not weights.exists():
        save_random_backbone(DEMO_BACKBONE, weights, img_size=DEMO_IMG_SIZE, seed=0)
    req = TrainRequest(backbone=DEMO_BACKBONE, weights=str(weights), img_size=DEMO_IMG_SIZE,
                       train=str(lists["train"]), val=str(lists["val"]), test=str(lists["test"]),
                       out=out / "train", params=TrainParams(epochs=epochs, lr=3e-3, batch_size=32, patience=6))
    report = run_training(req, log=say)
    ev = run_evaluation(report["checkpoint"], str(lists["test"]), log=say, progress=False)
    table = Table(title="mist-kit demo summary")
    table.add_column("step")
    table.add_column("result")
    search = ", ".join(f"k={k}: {v['val_top1']:.3f}" for k, v in report["k_search"].items())
    table.add_row("feature cache", f"{sum(report['images'].values())} images in {report['cache_seconds']:.1f} s")
    table.add_row("k search (val top-1)", search)
    table.add_row("chosen k", str(report["k"]))
    table.add_row("train", f"{report['train_seconds']:.1f} s, {report['trainable_params']:,} trainable params")
    table.add_row("test top-1 (train)", f"{report['test_top1']:.4f}")
    table.add_row("test top-1 (evaluate)", f"{ev['top1']:.4f}")
    table.add_row("checkpoint", report["checkpoint"])
    console.print(table)
