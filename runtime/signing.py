"""Bundle integrity beyond the files table: the manifest's own digest, and optional ed25519 signatures.

The manifest pins every file by sha256 and size, so it is the one thing to protect:
- `manifest.sha256` (sidecar, `sha256sum -c` format) detects a corrupted or hand-edited manifest, e.g. one flipped
  bit in a codec scale, which no file hash would catch. It is not a defence against an attacker, who can rewrite
  both files; chosen as a sidecar rather than a field so the manifest's field list (and its bundle format) stays
  the exporter's, and third parties can check it with coreutils.
- `manifest.sig` is an ed25519 signature over `manifest.json`'s exact bytes (domain-separated). With the
  publisher's public key (`run-edge` / `serve-cloud --trust KEY.pub`) a device or server refuses a bundle whose
  manifest, or any file the manifest lists, was changed by anyone without the private key.

Library: PyNaCl (libsodium bindings, pyca), the `sign` extra. Measured peak RSS of `python -c 'import X'` over a
10 MB interpreter: +2 MB for nacl.signing, +8 MB for cryptography's ed25519 module; both are well kept, PyNaCl is
the lighter one on a Pi. Imported only when signing or verifying.

Key files are one text line: `mist-kit-ed25519-private <base64 seed>` (mode 600) and
`mist-kit-ed25519-public <base64 key>`. Torch-free.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from mist_kit.atomic import write_text
from mist_kit.errors import BundleError, DependencyError, UsageError

MANIFEST_FILE = "manifest.json"
DIGEST_FILE = "manifest.sha256"
SIGNATURE_FILE = "manifest.sig"
PRIVATE_TAG = "mist-kit-ed25519-private"
PUBLIC_TAG = "mist-kit-ed25519-public"
SIG_TAG = "mist-kit-ed25519-sig"
_DOMAIN = b"mist-kit/bundle-signature/1\n"  # a signature over a bundle can never be replayed as another message


def _nacl() -> Any:
    try:
        import nacl.exceptions
        import nacl.signing
    except ImportError:
        raise DependencyError("bundle signing needs PyNaCl: pip install 'mist-kit[sign]' (or pynacl)") from None
    return nacl


# ---- the manifest's own digest ------------------------------------------------------------------------------


def write_manifest_digest(bundle_dir: str | os.PathLike[str]) -> str:
    """Write `manifest.sha256` for the bundle's current manifest.json (atomic). Returns the hex digest."""
    root = Path(bundle_dir)
    digest = hashlib.sha256((root / MANIFEST_FILE).read_bytes()).hexdigest()
    write_text(root / DIGEST_FILE, f"{digest}  {MANIFEST_FILE}\n")
    return digest


def check_manifest_digest(bundle_dir: str | os.PathLike[str], raw: bytes, required: bool = False) -> None:
    """Compare manifest.json's bytes with `manifest.sha256`; absent is accepted unless `required`."""
    path = Path(bundle_dir) / DIGEST_FILE
    if not path.is_file():
        if required:
            raise BundleError(f"{path}: missing; this bundle's manifest has no digest (re-export it)")
        return
    try:
        want = path.read_text(encoding="ascii").split()[0].lower()
    except (OSError, UnicodeDecodeError, IndexError):
        raise BundleError(f"{path}: unreadable; expected '<sha256>  {MANIFEST_FILE}'") from None
    if hashlib.sha256(raw).hexdigest() != want:
        raise BundleError(f"{Path(bundle_dir) / MANIFEST_FILE}: sha256 does not match {DIGEST_FILE} (the manifest "
                          "was edited or corrupted)")


# ---- keys ---------------------------------------------------------------------------------------------------


def _read_key_line(path: Path, tag: str, flag: str) -> bytes:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{flag} {path}: cannot read ({exc})") from None
    parts = text.split()
    if len(parts) != 2 or parts[0] != tag:
        raise UsageError(f"{flag} {path}: expected one line '{tag} <base64>' (made by `mist-kit keygen`)")
    try:
        key = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{flag} {path}: the key is not valid base64") from None
    if len(key) != 32:
        raise UsageError(f"{flag} {path}: expected a 32-byte ed25519 key, got {len(key)} bytes")
    return key


def read_public_key(path: str | os.PathLike[str], flag: str = "--trust") -> bytes:
    """The 32 raw bytes of a public key file."""
    return _read_key_line(Path(path), PUBLIC_TAG, flag)


def check_private_key(path: str | os.PathLike[str], flag: str = "--sign") -> bytes:
    """The 32-byte seed of a private key file, refusing one readable by group/others."""
    kp = Path(path)
    if os.name == "posix" and kp.is_file() and kp.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(f"{flag} {kp}: private key readable by group/others; run `chmod 600 {kp}`")
    return _read_key_line(kp, PRIVATE_TAG, flag)


def key_id(public: bytes) -> str:
    """A short fingerprint of a public key, for messages and the signature file."""
    return hashlib.sha256(public).hexdigest()[:16]


def generate_keypair(private_path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write a new private key (mode 600) and `<private>.pub`; refuses to overwrite. Returns both paths."""
    nacl = _nacl()
    priv, pub = Path(private_path), Path(f"{private_path}.pub")
    for p in (priv, pub):
        if p.exists():
            raise UsageError(f"{p}: exists; refusing to overwrite a key (choose another --out)")
    key = nacl.signing.SigningKey.generate()
    priv.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(f"{PRIVATE_TAG} {base64.b64encode(bytes(key)).decode()}\n")
    write_text(pub, f"{PUBLIC_TAG} {base64.b64encode(bytes(key.verify_key)).decode()}\n")
    return priv, pub


# ---- signing and verification -------------------------------------------------------------------------------


def sign_bundle(bundle_dir: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> str:
    """Sign the bundle's manifest.json with the private key at `key_path`; writes `manifest.sig` (and the digest).

    Call after the bundle is complete: the manifest must already list every file. Returns the key id.
    """
    nacl = _nacl()
    key = nacl.signing.SigningKey(check_private_key(key_path))
    root = Path(bundle_dir)
    raw = (root / MANIFEST_FILE).read_bytes()
    sig = key.sign(_DOMAIN + raw).signature
    kid = key_id(bytes(key.verify_key))
    write_manifest_digest(root)
    write_text(root / SIGNATURE_FILE, f"{SIG_TAG} {base64.b64encode(sig).decode()} {kid}\n")
    return kid


def verify_signature(bundle_dir: str | os.PathLike[str], pubkey_path: str | os.PathLike[str]) -> str:
    """Refuse the bundle unless manifest.sig is a valid signature of manifest.json by `pubkey_path`'s key.

    Only the manifest is checked here; every consumer then verifies the files it uses against the manifest's
    sha256 table, which the signature covers. Returns the key id.
    """
    nacl = _nacl()
    public = read_public_key(pubkey_path)
    root = Path(bundle_dir)
    sig_path = root / SIGNATURE_FILE
    if not sig_path.is_file():
        raise BundleError(f"{sig_path}: missing; the bundle is unsigned and --trust requires a signature "
                          "(export --sign KEY)")
    parts = sig_path.read_text(encoding="ascii", errors="replace").split()
    try:
        if len(parts) != 3 or parts[0] != SIG_TAG:
            raise ValueError
        sig = base64.b64decode(parts[1], validate=True)
        if len(sig) != 64:
            raise ValueError
    except (binascii.Error, ValueError):
        raise BundleError(f"{sig_path}: malformed; expected '{SIG_TAG} <base64 signature> <key id>'") from None
    kid = key_id(public)
    try:
        raw = (root / MANIFEST_FILE).read_bytes()
    except OSError as exc:
        raise BundleError(f"{root / MANIFEST_FILE}: cannot read ({exc})") from None
    try:
        nacl.signing.VerifyKey(public).verify(_DOMAIN + raw, sig)
    except nacl.exceptions.BadSignatureError:
        other = "" if parts[2] == kid else f" (signed by key {parts[2]}, trusted key is {kid})"
        raise BundleError(f"{sig_path}: signature does not verify with {pubkey_path}{other}; the manifest was "
                          "changed after signing or signed by another key") from None
    return kid
