"""Bundle integrity (issue 15 item 4): paths confined to the bundle, the manifest covered by its own digest,
ed25519 signatures checked by run-edge / serve-cloud --trust, keys from `mist-kit keygen`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mist_kit.cli.app import app
from mist_kit.errors import BundleError, UsageError
from mist_kit.runtime.bundle import open_edge_bundle
from mist_kit.runtime.manifest import open_bundle, read_manifest
from mist_kit.runtime.paths import check_relative
from mist_kit.runtime.signing import write_manifest_digest

runner = CliRunner()


@pytest.fixture
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


def _edit(bundle: Path, change) -> None:
    """Edit the manifest as an attacker who also rewrites manifest.sha256 would (only a signature stops that)."""
    m = json.loads((bundle / "manifest.json").read_text())
    change(m)
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2))
    write_manifest_digest(bundle)


@pytest.mark.parametrize("rel", ["/etc/passwd", "../elsewhere/other.onnx", "a/../../x", "./edge.onnx", "a//b",
                                 "C:\\x.onnx", "~/x", "", 5, None])
def test_relative_paths_only(rel):
    with pytest.raises(BundleError):
        check_relative(rel, "edge.file")


@pytest.mark.parametrize("field", ["edge", "head"])
def test_manifest_paths_outside_the_bundle_are_refused(bundle, tmp_path, field):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    rel = "edge.onnx" if field == "edge" else "head.safetensors"
    shutil.copy(bundle / rel, outside / rel)
    for target in (f"../elsewhere/{rel}", str(outside / rel)):
        def point(m, target=target):
            m[field]["file"] = target
            m["files"][target] = m["files"][rel]
        original = (bundle / "manifest.json").read_text()
        _edit(bundle, point)
        with pytest.raises(BundleError, match=r"not a path inside the bundle|leaves or obscures") as err:
            open_edge_bundle(bundle)
        assert "\n" not in str(err.value)
        (bundle / "manifest.json").write_text(original)
        write_manifest_digest(bundle)
    open_edge_bundle(bundle)


def test_symlink_leading_out_is_refused(bundle, tmp_path):
    outside = tmp_path / "other.onnx"
    shutil.copy(bundle / "edge.onnx", outside)  # same bytes: only the symlink check can catch it
    (bundle / "edge.onnx").unlink()
    (bundle / "edge.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="outside the bundle"):
        open_edge_bundle(bundle)
    (bundle / "edge.onnx").unlink()
    (bundle / "edge.onnx").symlink_to("missing.onnx")  # dangling: refused as missing, never followed out
    with pytest.raises(BundleError):
        open_edge_bundle(bundle)


def test_manifest_digest_catches_a_one_bit_change(bundle):
    write_manifest_digest(bundle)
    read_manifest(bundle)
    raw = bytearray((bundle / "manifest.json").read_bytes())
    pos = raw.index(b'"size"') + 2  # flip one bit inside a key name: still valid JSON, other meaning
    raw[pos] ^= 0x01
    (bundle / "manifest.json").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"does not match manifest\.sha256"):
        read_manifest(bundle)


def test_digest_and_signature_are_not_in_the_files_table(bundle):
    from mist_kit.runtime.manifest import files_table

    write_manifest_digest(bundle)
    (bundle / "manifest.sig").write_text("x")
    assert not {"manifest.sha256", "manifest.sig", "manifest.json"} & set(files_table(bundle))


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("input.size", 0, "field 'input.size': expected an integer in 16..4096"),
    ("input.size", -1, "input.size"),
    ("input.size", 100000, "input.size"),
    ("input.size", "32", "input.size"),
    ("input.mean", [0.5, 0.5], "input.mean"),
    ("input.std", [0.5, 0.0, 0.5], "input.std"),
    ("classes", "abc", "classes"),
    ("edge.file", 7, "edge.file"),
])
def test_typed_fields(bundle, field, value, needle):
    def put(m):
        a, b = field.split(".") if "." in field else (field, None)
        if b is None:
            m[a] = value
        else:
            m[a][b] = value
    _edit(bundle, put)
    with pytest.raises(BundleError) as err:
        open_bundle(bundle)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_tensor_shapes_must_be_positive(bundle):
    _edit(bundle, lambda m: m["edge"]["inputs"][0].update(shape=[-1, 0, 64]))
    with pytest.raises(BundleError, match=r"edge\.inputs"):
        read_manifest(bundle)


# ---- signing ------------------------------------------------------------------------------------------------


def test_keygen_sign_and_trust(bundle, tmp_path, digits_lists):
    pytest.importorskip("nacl")
    from mist_kit.runtime.signing import sign_bundle, verify_signature

    res = runner.invoke(app, ["keygen", "--out", str(tmp_path / "keys" / "pub1"), "--json"])
    assert res.exit_code == 0, res.stderr
    keys = json.loads(res.stdout)
    priv, pub = Path(keys["private_key"]), Path(keys["public_key"])
    assert os.stat(priv).st_mode & 0o077 == 0
    assert runner.invoke(app, ["keygen", "--out", str(priv)]).exit_code == 2  # never overwrites a key
    runner.invoke(app, ["keygen", "--out", str(tmp_path / "keys" / "other")])
    other_pub = tmp_path / "keys" / "other.pub"

    with pytest.raises(BundleError, match="unsigned"):
        verify_signature(bundle, pub)
    kid = sign_bundle(bundle, priv)
    assert verify_signature(bundle, pub) == kid == keys["key_id"]
    open_bundle(bundle)  # the digest written with the signature verifies too
    with pytest.raises(BundleError, match="signed by key"):
        verify_signature(bundle, other_pub)

    features = tmp_path / "f.safetensors"
    from mist_kit.runtime.codec.extract import extract
    extract(bundle, digits_lists["test"], features, batch_size=64)
    args = ["run-edge", "--device", "rpi4", "--bundle", str(bundle), "--features", str(features), "--json",
            "--no-cap", "--batch", "64"]
    assert runner.invoke(app, [*args, "--trust", str(pub)]).exit_code == 0
    res = runner.invoke(app, [*args, "--trust", str(other_pub)])
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1

    # a change after signing (here: a class renamed, files untouched) is refused by --trust
    (bundle / "manifest.sha256").unlink()
    _edit(bundle, lambda m: m["classes"].__setitem__(0, "zero"))
    res = runner.invoke(app, [*args, "--trust", str(pub)])
    assert res.exit_code == 2 and "signature does not verify" in res.stderr
    (bundle / "manifest.sig").unlink()
    res = runner.invoke(app, [*args, "--trust", str(pub)])
    assert res.exit_code == 2 and "unsigned" in res.stderr
    res = runner.invoke(app, ["serve-cloud", str(bundle), "--trust", str(pub)])
    assert res.exit_code == 2 and "unsigned" in res.stderr


def test_bad_key_files(tmp_path):
    pytest.importorskip("nacl")
    from mist_kit.runtime.signing import check_private_key, generate_keypair, read_public_key

    priv, _pub = generate_keypair(tmp_path / "k")
    os.chmod(priv, 0o644)
    with pytest.raises(UsageError, match="chmod 600"):
        check_private_key(priv)
    with pytest.raises(UsageError, match="mist-kit-ed25519-public"):
        read_public_key(priv)
    bad = tmp_path / "bad.pub"
    bad.write_text("mist-kit-ed25519-public !!!\n")
    with pytest.raises(UsageError, match="base64"):
        read_public_key(bad)
    bad.write_text("mist-kit-ed25519-public AAAA\n")
    with pytest.raises(UsageError, match="32-byte"):
        read_public_key(bad)
