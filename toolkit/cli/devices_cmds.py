"""`mist-kit devices list | show NAME | check BUNDLE --device NAME`: device profiles and budget checks.

Module-level imports stay torch-free (and numpy/onnxruntime-free): this runs on the device itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mist_kit.cli.common import cli_errors, print_json

devices_app = typer.Typer(help="Device profiles (rpi4, rpi5, rpi-zero-2w, ...) and bundle budget checks.",
                          no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(devices_app, name="devices")


@devices_app.command("list")
@cli_errors
def list_cmd(json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout")] = False) -> None:
    """List registered device profiles (memory variants included)."""
    from mist_kit.devices import list_devices

    profiles = list_devices()
    if json_out:
        print_json([p.to_dict() for p in profiles])
        return
    row = "{:20s} {:8s} {:11s} {:>5s} {:>5s} {:>9s} {:>9s} {:12s} {:>7s}"
    typer.echo(row.format("name", "arch", "cpu", "cores", "GHz", "memory_MB", "budget_MB", "backend", "threads"))
    for p in profiles:
        typer.echo(row.format(p.name, p.arch, p.cpu, str(p.cores), str(p.clock_ghz), str(p.memory_mb),
                              str(p.budget_mb), p.backend, str(p.threads)))


@devices_app.command("show")
@cli_errors
def show_cmd(name: Annotated[str, typer.Argument(help="Device name, e.g. rpi4, rpi4-8gb")],
             memory: Annotated[int | None, typer.Option("--memory", help="RAM in MB (another variant)")] = None,
             json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout")] = False) -> None:
    """Show one profile."""
    from mist_kit.devices import get_device

    profile = get_device(name, memory)
    if json_out:
        print_json(profile.to_dict())
        return
    for key, value in profile.to_dict().items():
        typer.echo(f"{key:20s} {value}")


@devices_app.command("check")
@cli_errors
def check_cmd(bundle: Annotated[Path, typer.Argument(help="Bundle directory (mist-kit export output)")],
              device: Annotated[str, typer.Option("--device", help="Device name")],
              batch: Annotated[int, typer.Option("--batch", help="Images per edge call")] = 1,
              memory: Annotated[int | None, typer.Option("--memory", help="RAM in MB (another variant)")] = None,
              no_measure: Annotated[bool, typer.Option("--no-measure", help="Estimate only; do not run a batch")]
              = False,
              json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout")] = False) -> None:
    """Model + activation memory vs the device budget at a batch size, edge MACs per image, backend, verdict.

    Exit code 1 when the bundle does not fit.
    """
    from mist_kit.devices import get_device
    from mist_kit.runtime.device_check import check_bundle

    profile = get_device(device, memory)
    report = check_bundle(bundle, profile, batch=batch, measure=not no_measure)
    if json_out:
        print_json(report)
    else:
        for key, value in report.items():
            typer.echo(f"{key:26s} {value}")
    if not report["fits"]:
        raise typer.Exit(1)


@devices_app.command("tune")
@cli_errors
def tune_cmd(bundle: Annotated[Path, typer.Argument(help="Bundle directory (mist-kit export output)")],
             device: Annotated[str, typer.Option("--device", help="Device name (this machine's profile)")],
             features: Annotated[Path | None, typer.Option(
                 "--features", help="Features file (extract output) to time on and to measure agreement with; "
                                    "else seeded inputs and the agreement export recorded")] = None,
             rounds: Annotated[int, typer.Option("--rounds", help="Interleaved timing rounds", min=1)] = 9,
             agreement_rows: Annotated[int, typer.Option(
                 "--agreement-rows", min=1, help="With --features: rows the agreement gate reads (all if fewer)")]
             = 500,
             memory: Annotated[int | None, typer.Option("--memory", help="RAM in MB (another variant)")] = None,
             json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout")] = False) -> None:
    """Time the bundle's edge graphs (int8, fp32, LiteRT) here with the profile's threads; record the fastest that
    passes the agreement gate in `<bundle>.tune.json`, which run-edge and finetune-edge then use."""
    from mist_kit.devices import get_device
    from mist_kit.devices.tune import tune

    report = tune(bundle, get_device(device, memory), features=features, rounds=rounds,
                  agreement_rows=agreement_rows)
    if json_out:
        print_json(report)
        return
    for variant, ms in report["ms_per_image"].items():
        mark = "  <- chosen" if variant == report["chosen"] else ""
        typer.echo(f"{variant:8s} {ms:8.3f} ms/image  agreement {report['agreement'][variant]:.4f}{mark}")
    for variant, why in report["skipped"].items():
        typer.echo(f"{variant:8s} skipped: {why}")
    if report.get("threads_note"):
        typer.echo(report["threads_note"])
    typer.echo(f"recorded {report['file']} for {report['device']} in {report['record']}")
