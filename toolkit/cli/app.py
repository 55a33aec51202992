"""The `mist-kit` command: one typer app; each area registers its commands from its own module.

Importing this module must stay torch-free (run-edge on a Pi); command bodies import what they need.
"""

from __future__ import annotations

import importlib

import typer

from mist_kit import __version__

app = typer.Typer(
    name="mist-kit",
    help="Deploy separated-tuning (MIST) vision models: frozen ViT in the cloud, tiny edge network on the device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module exposes register(app). Listed here so the command set is visible in one place.
COMMAND_MODULES = (
    "mist_kit.cli.train_cmds",
    "mist_kit.cli.demo_cmd",
    "mist_kit.cli.export_cmd",
    "mist_kit.cli.codec_cmds",
    "mist_kit.cli.serve_cmd",
    "mist_kit.cli.edge_cmds",
    "mist_kit.cli.devices_cmds",
    "mist_kit.cli.compare_cmd",
    "mist_kit.cli.sign_cmds",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mist-kit {__version__}")
        raise typer.Exit()


@app.callback()
def root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit")) -> None:
    """mist-kit: train, export, compress, serve and run MIST edge models."""


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    app()
