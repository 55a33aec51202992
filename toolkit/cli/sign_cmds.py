"""`mist-kit keygen`: make the ed25519 key pair that `export --sign` and `run-edge` / `serve-cloud --trust` use."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mist_kit.cli.common import cli_errors, print_json


def register(app: typer.Typer) -> None:
    app.command("keygen")(keygen)


@cli_errors
def keygen(
    out: Annotated[Path, typer.Option("--out", help="Private key file to write (mode 600); OUT.pub is the public key")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
) -> None:
    """Make a signing key pair: keep OUT secret, give OUT.pub to devices and servers (--trust OUT.pub)."""
    from mist_kit.runtime.signing import generate_keypair, key_id, read_public_key

    priv, pub = generate_keypair(out)
    report = {"private_key": str(priv), "public_key": str(pub), "key_id": key_id(read_public_key(pub))}
    if json_out:
        print_json(report)
    else:
        typer.echo(f"private key  {priv}  (keep it secret; export --sign {priv})")
        typer.echo(f"public key   {pub}  (run-edge / serve-cloud --trust {pub})")
        typer.echo(f"key id       {report['key_id']}")
