"""`mist-kit compare`: a thin command over `mist_kit.compare` (parse, run, render the table and the choice)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mist_kit.cli.common import cli_errors, console, logger, print_json


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)


def _split(text: str, flag: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    if not items:
        raise typer.BadParameter(f"{flag}: expected a comma-separated list, got {text!r}")
    return items


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def render(result: Any) -> Table:
    table = Table(title=f"mist-kit compare: {result.device} ({result.budget_mb} MB budget)")
    for col in ("method", "codec", "k", "val %", "test %", "B/image", "zstd B", "params", "MMACs", "edge ms",
                "RSS inf/ft MB", "fits"):
        table.add_column(col, justify="left" if col in ("method", "codec", "fits") else "right", no_wrap=True)
    for r in result.rows:
        if r.get("error"):
            table.add_row(r["method"], r["codec"], *["-"] * 9, "skipped")
            continue
        mark = "yes" if r["fits"] else "no"
        if result.best is r:
            mark = "BEST"
        depth = "-" if r["k"] is None else str(r["k"])
        table.add_row(r["method"], r["codec"], depth, _pct(r["val_top1"]), _pct(r["test_top1"]),
                      f"{r['bytes_per_image']:,}", f"{r['bytes_per_image_zstd']:,.0f}", f"{r['edge_params']:,}",
                      f"{r['edge_macs_per_image'] / 1e6:.2f}", f"{r['edge_ms']:.3f}",
                      f"{r['inference_rss_mb']:.0f}/{r['finetune_rss_mb']:.0f}", mark)
    return table


@cli_errors
def compare(
    train: Annotated[str, typer.Option("--train", help="Training data: ImageFolder dir or list file")],
    val: Annotated[str, typer.Option("--val", help="Validation data: chooses depths, codecs and the best row")],
    out: Annotated[Path, typer.Option("--out", help="Work directory (cache, checkpoints, bundles, rows.jsonl)")]
    = Path("compare-out"),
    backbone: Annotated[str, typer.Option(help="timm ViT name, e.g. vit_small_patch14_dinov2")] = "test_vit",
    weights: Annotated[Path | None, typer.Option(help="Backbone weights (.safetensors)")] = None,
    img_size: Annotated[int | None, typer.Option(help="Input size (default: the model's)")] = None,
    test: Annotated[str | None, typer.Option("--test", help="Test data: reported, never used to choose")] = None,
    methods: Annotated[str, typer.Option(help="Edge methods, comma-separated (see `mist-kit methods`)")]
    = "linear,mist",
    codecs: Annotated[str, typer.Option(help="Codecs, comma-separated (see `mist-kit codec list`)")]
    = "fp32,int8-channel,pool2-int4,cls-int8",
    device: Annotated[str, typer.Option(help="Device profile (see `mist-kit devices list`)")] = "rpi4",
    max_bytes: Annotated[str | None, typer.Option(help="Link budget per image, e.g. 16KB")] = None,
    max_latency_ms: Annotated[float | None, typer.Option(help="Edge latency budget per image (host timing)")]
    = None,
    k: Annotated[str | None, typer.Option("--k", help="Fix a method's depth instead of searching it on val, "
                                          "e.g. mist=4,vitsplit=9")] = None,
    epochs: Annotated[int, typer.Option(help="Maximum epochs per training (early stopping on val)")] = 30,
    backbone_precision: Annotated[str, typer.Option(help="Backbone precision while caching: fp32 | bf16")] = "fp32",
    train_precision: Annotated[str, typer.Option(help="Edge training precision: fp32 | bf16 (autocast)")] = "fp32",
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
    cache_dir: Annotated[Path | None, typer.Option(help="Feature cache root (default OUT/cache)")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write the Pareto plot (PNG) here")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress lines")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout")] = False,
) -> None:
    """Rank methods x codecs on accuracy, bytes, edge latency and memory for a device and a link; pick the best
    that fits and print the commands that reproduce it. Finished rows are kept: rerun to resume."""
    from mist_kit.compare import CompareRequest, parse_bytes, parse_depths, run_compare, write_plot

    req = CompareRequest(backbone=backbone, weights=str(weights) if weights else None, img_size=img_size,
                         train=train, val=val, test=test, out=out, methods=_split(methods, "--methods"),
                         codecs=_split(codecs, "--codecs"), device=device, max_bytes=parse_bytes(max_bytes),
                         max_latency_ms=max_latency_ms, epochs=epochs, seed=seed, cache_dir=cache_dir,
                         depths=parse_depths(k), backbone_precision=backbone_precision,
                         train_precision=train_precision,
                         progress=not (json_out or quiet))
    log = logger(quiet)
    result = run_compare(req, log=log)
    if plot is not None:
        write_plot(result, plot)
        log(f"plot: {plot}")
    if json_out:
        print_json(result.to_dict())
    else:
        from rich.console import Console

        wide = console if console.is_terminal and console.width >= 150 else Console(stderr=True, width=160)
        wide.print(render(result))
        for r in result.rows:
            if r.get("error") or r.get("why_not"):
                console.print(f"  {r['method']}/{r['codec']}: {r.get('error') or r['why_not']}", highlight=False,
                              soft_wrap=True)
        if result.best is not None:
            b = result.best
            depth = "" if b["k"] is None else f" at k={b['k']}"
            console.print(f"best that fits {result.device}: {b['method']}{depth} with {b['codec']} "
                          f"(val {100 * b['val_top1']:.2f}%, {b['bytes_per_image']:,} B/image). Reproduce:",
                          highlight=False)
            for cmd in result.reproduce:
                console.print(f"  {cmd}", highlight=False, soft_wrap=True)
    if result.interrupted:
        raise typer.Exit(130)
    if result.best is None:
        ok = [r for r in result.rows if not r.get("error")]
        why = "; ".join(sorted({str(r["why_not"]) for r in ok if r.get("why_not")}))[:300] or "every row failed"
        typer.echo(f"error: no (method, codec) fits {result.device} and the given limits ({why})", err=True)
        raise typer.Exit(1)
