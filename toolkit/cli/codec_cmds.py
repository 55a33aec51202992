"""`mist-kit codec list|bench` and `mist-kit extract`: thin commands over the codec library."""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mist_kit.cli.common import Quiet, cli_errors, console, logger, print_json

codec_app = typer.Typer(help="Feature codecs: what crosses the network (list, bench).", no_args_is_help=True)


class Retrain(str, Enum):
    auto = "auto"  # retrain only for codecs that change the token layout (pooling)
    all = "all"  # retrain every codec and the fp32 baseline the same way (protocol-fair deltas)
    none = "none"  # never retrain: token-changing codecs get bytes/SNR only


def default_marks() -> dict[str, str]:
    """Which codec each command uses when --codec is not given, by name (read from the commands themselves)."""
    from mist_kit.cli.train_cmds import TRAIN_DEFAULT_CODEC
    from mist_kit.runtime.codec import DEFAULT_LAYOUT_PRESERVING_CODEC

    marks: dict[str, list[str]] = {}
    marks.setdefault(TRAIN_DEFAULT_CODEC, []).append("train default")
    marks.setdefault(DEFAULT_LAYOUT_PRESERVING_CODEC, []).append("export default for an fp32-trained checkpoint")
    return {name: "; ".join(m) for name, m in marks.items()}


def register(app: typer.Typer) -> None:
    app.add_typer(codec_app, name="codec")
    app.command("extract")(extract)


@codec_app.command("list")
@cli_errors
def list_cmd(json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout")] = False) -> None:
    """The registered codecs and what each sends per image (ViT-S/14 at 224: 257 x 384 gather)."""
    from mist_kit.runtime.codec import codec_params, fit_codec, list_codecs
    from mist_kit.runtime.codec.bench import synthetic_features

    x = synthetic_features(2, 257, 384, prefix=1)
    marks = default_marks()
    rows = []
    for name in list_codecs():
        p = codec_params(name)
        c = fit_codec(name, x, 1)
        rows.append({"codec": name, "quant": p.quant.value, "pool": p.pool, "tokens": c.out_tokens,
                     "bytes_per_image_vit_s": c.bytes_per_image(), "default": marks.get(name)})
    if json_out:
        print_json(rows)
        return
    table = Table(title="mist-kit codecs (bytes for a 257x384 gather; add +zstd[LEVEL] for a lossless stage)")
    for col in ("codec", "quant", "pool", "tokens", "bytes/img"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["codec"] + (f" ({r['default']})" if r["default"] else ""), r["quant"], str(r["pool"]),
                      str(r["tokens"]), f"{r['bytes_per_image_vit_s']:,}")
    console.print(table)


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value * scale, spec)


def write_plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Bytes/image (log x) vs top-1 (or SNR when accuracy was not measured) as a PNG, written atomically."""
    from mist_kit.errors import DependencyError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DependencyError("--plot needs matplotlib: pip install 'mist-kit[plot]'") from None
    from mist_kit.atomic import atomic_path

    acc = any(r.get("top1") is not None for r in rows)
    key = "top1" if acc else "snr_db"
    pts = [(r["bytes_per_image"], r[key] * (100 if acc else 1), r["codec"]) for r in rows if r.get(key) is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts])
    for x, y, name in pts:
        ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per image")
    ax.set_ylabel("top-1 (%)" if acc else "SNR (dB)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


@codec_app.command("bench")
@cli_errors
def bench(
    bundle: Annotated[Path | None, typer.Option(help="Bundle: features from cloud.onnx, accuracy via edge.onnx")]
    = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint: cached features, retrains for pooling codecs")]
    = None,
    data: Annotated[str | None, typer.Option(help="Labelled data (ImageFolder or list file) for accuracy")] = None,
    codecs: Annotated[str | None, typer.Option(help="Comma-separated codec names (default: all registered)")] = None,
    retrain: Annotated[Retrain, typer.Option(
        help="auto: retrain for token-changing codecs; all: every codec; none: never (bytes/SNR for those)")]
    = Retrain.auto,
    no_retrain: Annotated[bool, typer.Option("--no-retrain", help="Same as --retrain none")] = False,
    cache_dir: Annotated[Path | None, typer.Option(help="Feature cache root (checkpoint mode)")] = None,
    weights: Annotated[Path | None, typer.Option(help="Backbone weights if moved since training")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a bytes vs top-1 PNG (needs the plot extra)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the rows as a JSON list on stdout")] = False,
    quiet: Quiet = False,
) -> None:
    """Per codec: bytes/image (raw, zstd), ratio vs fp32, SNR, cosine, MB/s, and top-1/agreement with a model.

    With --checkpoint, codecs that change the token layout (pooling) retrain an edge network each (said up front,
    with the count); --no-retrain skips that. Ctrl-C prints the rows finished so far.
    """
    from mist_kit.codec_bench import bench_codecs
    from mist_kit.progress import Progress
    from mist_kit.runtime.codec import list_codecs

    names = [c.strip() for c in codecs.split(",") if c.strip()] if codecs else list_codecs()
    if plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            from mist_kit.errors import DependencyError

            raise DependencyError("--plot needs matplotlib: pip install 'mist-kit[plot]'") from None
    mode = Retrain.none if no_retrain else retrain
    with Progress(len(names), "codec bench", enabled=not quiet, unit="codec") as bar:
        started: list[str] = []

        def on_codec(name: str) -> None:
            if started:
                bar.advance(1)  # the previous codec's row is done
            started.append(name)
            bar.describe(f"codec {name}")

        result = bench_codecs(names if codecs else None, checkpoint=checkpoint, bundle=bundle, data=data,
                              cache_dir=cache_dir, weights=str(weights) if weights else None, retrain=mode.value,
                              on_codec=on_codec, log=logger(quiet))
        if started and not result.interrupted:
            bar.advance(1)
        bar.describe("codec bench")
    if plot is not None and result.rows:
        write_plot(result.rows, plot, f"mist-kit codec bench ({result.source} features)")
    if json_out:
        print_json(result.rows)
    else:
        _render_bench(result, plot)
    if result.interrupted:
        raise typer.Exit(130)


def _render_bench(result: Any, plot: Path | None) -> None:
    for note in result.notes:
        console.print(note, highlight=False, markup=False)
    table = Table(title=f"codec bench ({result.source} features, T x D = {result.features_shape[0]} x "
                        f"{result.features_shape[1]})")
    for col in ("codec", "bytes/img", "+zstd", "ratio", "SNR dB", "cosine", "enc MB/s", "dec MB/s", "top-1",
                "Δ pt", "agree", "retrained"):
        table.add_column(col)
    for r in result.rows:
        table.add_row(r["codec"], f"{r['bytes_per_image']:,}", f"{r['bytes_per_image_zstd']:,.0f}",
                      f"{r['ratio_vs_fp32']:.1f}x", _fmt(r["snr_db"], ".1f") if r["snr_db"] is not None else "lossless",
                      _fmt(r["cosine"], ".4f"), _fmt(r["encode_mb_s"], ".0f"), _fmt(r["decode_mb_s"], ".0f"),
                      _fmt(r["top1"], ".2f", 100), _fmt(r["top1_delta"], "+.2f", 100), _fmt(r["agreement"], ".3f"),
                      "yes" if r.get("retrained") else "")
    noops = [r["codec"] for r in result.rows if r.get("encode_note")]
    if noops:
        table.caption = f"enc MB/s '-' for {', '.join(noops)}: its encode hands the features over as they are"
    console.print(table)  # off a terminal the console is wide (cli.common), so the table is not squeezed
    if result.jpeg_q90_bytes is not None:
        console.print(f"input as JPEG q90 at the model's input size: {result.jpeg_q90_bytes:,.0f} bytes/image",
                      highlight=False)
    if plot is not None:
        console.print(f"plot written to {plot}", highlight=False)


@cli_errors
def extract(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (from mist-kit export)")],
    data: Annotated[str, typer.Argument(help="Images: ImageFolder dir or list file")],
    out: Annotated[Path, typer.Option("--out", help="Features file to write (.safetensors)")],
    batch_size: Annotated[int, typer.Option(help="Images per cloud.onnx batch")] = 16,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON report on stdout")] = False,
    quiet: Quiet = False,
) -> None:
    """Run the bundle's cloud graph over a dataset; write the encoded features, labels and ids (safetensors)."""
    from mist_kit.data import load_image_list
    from mist_kit.errors import UsageError
    from mist_kit.progress import Progress
    from mist_kit.runtime.codec.extract import extract as run_extract

    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    total = len(load_image_list(data))
    with Progress(total, f"extract {Path(data).name}", enabled=not quiet) as bar:
        report = run_extract(bundle, data, out, batch_size, progress=bar.advance)
    if json_out:
        print_json(report)
    else:
        console.print(f"wrote {report['images']} images ({report['codec']}, {report['bytes_per_image']:,} bytes/image) "
                      f"to {report['out']} in {report['seconds']:.1f}s", highlight=False)
