"""Signing keys for the built-in development token issuer.

Invariant: the private key is written once, with mode 0600, whole or not at all (a kill
half-way leaves no truncated key for the next start to trip over), and never printed; a key file
that is readable by group or others is refused.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from service.durable import sync_folder


class KeyFileTooOpen(PermissionError):
    """A private key file is readable by group or others."""


def generate_private_pem(algorithm: str) -> bytes:
    if algorithm == "RS256":
        private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = rsa.generate_private_key(
            public_exponent=65537, key_size=3072
        )
    elif algorithm == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(f"unsupported algorithm {algorithm}")
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(private_pem: bytes) -> bytes:
    """The SubjectPublicKeyInfo PEM of a private key (safe to publish)."""
    private = serialization.load_pem_private_key(private_pem, password=None)
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write_secret_file(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 (never world-readable, not even for a moment) holding
    ``data``: written to a hidden file beside it and on disk before the name appears, so the
    name never shows a part of it. ``FileExistsError`` if ``path`` exists (nothing replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    partial = Path(name)  # mkstemp makes it 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(partial, path)  # never replaces a file, unlike a rename
    finally:
        partial.unlink(missing_ok=True)
    sync_folder(path.parent)


def read_secret_file(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileTooOpen(
            f"{path} is readable by group or others (mode {oct(mode & 0o777)}); "
            f"run chmod 600 {path}"
        )
    return path.read_bytes()


def load_or_create_private_pem(path: Path, algorithm: str) -> bytes:
    """The issuer key at ``path``, generated on first use."""
    if not path.exists():
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            write_secret_file(path, generate_private_pem(algorithm))
    return read_secret_file(path)
