"""The bundle manifest (`manifest.json`): schema, file table with sha256, reading and verification.

Torch-free. The exporter writes it; the runtime, the cloud server and third parties read it. A bundle is trusted
only after every file listed has the recorded size and sha256 and no required field is missing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mist_kit.errors import BundleError
from mist_kit.runtime.manifest_schema import validate_manifest
from mist_kit.runtime.paths import confined
from mist_kit.runtime.plan import CloudPlan
from mist_kit.runtime.signing import DIGEST_FILE, SIGNATURE_FILE, check_manifest_digest

BUNDLE_SCHEMA = "mist-kit/bundle/2"
OLD_SCHEMAS = ("mist-kit/bundle/1",)  # one gather, one codec: refused with a re-export hint (see docs/CONTRACTS.md)
MANIFEST_FILE = "manifest.json"
CLOUD_FILE = "cloud.onnx"
EDGE_FILE = "edge.onnx"
EDGE_FP32_FILE = "edge.fp32.onnx"
EDGE_TFLITE_FILE = "edge.tflite"
HEAD_FILE = "head.safetensors"
DEPLOY_DIR = "deploy"

# Top-level fields every manifest has (see exporters/bundle.py for how each is filled).
REQUIRED_FIELDS = ("schema", "mist_kit_version", "model_name", "backbone", "method", "input", "cloud", "edge", "head",
                   "classes", "files", "parity")
INPUT_FIELDS = ("size", "mean", "std", "layout", "resize")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def files_table(bundle_dir: str | Path) -> dict[str, dict[str, Any]]:
    """{relative posix path: {sha256, bytes}} for every file under `bundle_dir` except the manifest, its digest
    and its signature."""
    root = Path(bundle_dir)
    table = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in (MANIFEST_FILE, DIGEST_FILE, SIGNATURE_FILE):  # these cover the manifest, not the reverse
            table[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return table


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """Parse and structurally validate `manifest.json`; one-line BundleError naming the field otherwise."""
    root = Path(bundle_dir)
    path = root / MANIFEST_FILE
    if not root.is_dir():
        raise BundleError(f"{root}: not a bundle directory (expected {MANIFEST_FILE}, {CLOUD_FILE}, {EDGE_FILE})")
    if not path.is_file():
        raise BundleError(f"{path}: missing; is {root} a bundle written by `mist-kit export`?")
    try:
        raw = path.read_bytes()
        manifest = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise BundleError(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: expected a JSON object")
    if manifest.get("schema") in OLD_SCHEMAS:
        raise BundleError(f"{path}: bundle format {manifest['schema']!r} was written by mist-kit 0.1; this version "
                          f"reads {BUNDLE_SCHEMA!r}: re-export it (mist-kit export CHECKPOINT --out DIR)")
    check_manifest_digest(root, raw, required=True)  # every format-2 bundle has manifest.sha256
    if manifest.get("schema") != BUNDLE_SCHEMA:
        raise BundleError(f"{path}: schema {manifest.get('schema')!r}, expected {BUNDLE_SCHEMA!r}")
    for key in REQUIRED_FIELDS:
        if key not in manifest:
            raise BundleError(f"{path}: missing field '{key}'")
    validate_manifest(manifest, path)
    for key in INPUT_FIELDS:
        if key not in manifest["input"]:
            raise BundleError(f"{path}: missing field 'input.{key}'")
    if not isinstance(manifest["files"], dict) or not manifest["files"]:
        raise BundleError(f"{path}: field 'files' must list the bundle's files")
    if not isinstance(manifest["cloud"], dict) or "plan" not in manifest["cloud"]:
        raise BundleError(f"{path}: missing field 'cloud.plan'")
    manifest_plan(manifest, str(path))  # a malformed plan is one line naming its field
    return manifest


def manifest_plan(manifest: dict[str, Any], where: str = MANIFEST_FILE) -> CloudPlan:
    """The bundle's cloud plan (which tensors the cloud sends, from which backbone source)."""
    return CloudPlan.from_dict(manifest["cloud"]["plan"], f"{where}: cloud.plan")


def manifest_codecs(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Sent tensor name -> its codec spec, as recorded in `cloud.plan.tensors[].codec`."""
    return {row["name"]: dict(row.get("codec") or {"name": "fp32"}) for row in manifest["cloud"]["plan"]["tensors"]}


def codec_names(manifest: dict[str, Any]) -> str:
    """A short label of the codecs a bundle speaks ('int8-channel', or 'a: int8-channel, b: fp32')."""
    codecs = manifest_codecs(manifest)
    names = {c.get("name", "fp32") for c in codecs.values()}
    if len(names) == 1:
        return names.pop()
    return ", ".join(f"{t}: {c.get('name', 'fp32')}" for t, c in codecs.items())


def verify_files(bundle_dir: str | Path, manifest: dict[str, Any], only: tuple[str, ...] | None = None) -> None:
    """Check each listed file (or just `only`) exists with the recorded size and sha256."""
    root = Path(bundle_dir)
    for rel, entry in manifest["files"].items():
        if only is not None and rel not in only:
            continue
        path = confined(root, rel, f"{root / MANIFEST_FILE}: files")
        if not path.is_file():
            raise BundleError(f"{path}: listed in {MANIFEST_FILE} but missing (incomplete bundle)")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise BundleError(f"{path}: {size} bytes, {MANIFEST_FILE} says {entry.get('bytes')} (truncated or "
                              "replaced)")
        if sha256_file(path) != entry.get("sha256"):
            raise BundleError(f"{path}: sha256 does not match {MANIFEST_FILE} (tampered or corrupted)")
    if only is not None:
        for rel in only:
            if rel not in manifest["files"]:
                raise BundleError(f"{root / MANIFEST_FILE}: does not list {rel}")


def open_bundle(bundle_dir: str | Path, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Read the manifest and verify the files (all, or the subset a consumer needs)."""
    manifest = read_manifest(bundle_dir)
    verify_files(bundle_dir, manifest, only)
    return manifest
