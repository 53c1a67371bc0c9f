"""Envelope encryption: AES-256-GCM ciphertexts and key wraps bound to where they belong.

Invariants:
- every message gets a fresh 96-bit nonce from the operating system's CSPRNG; a key is never
  asked to encrypt under a nonce it chose before (no counters, no state to lose);
- the associated data is the canonical JSON (sorted keys, no whitespace) of the caller's
  placement (table, column, row id, purpose) plus the key version; it says where a ciphertext
  belongs, never who it is about. A ciphertext copied to another row, column or purpose, or
  presented under another key version, fails to open;
- the text format is ``v1.<key version>.<base64(nonce ‖ ciphertext ‖ tag)>``; anything else, and
  any flipped bit, raises ``DecryptionFailed`` whose message names no secret and no plaintext;
- ``DataKey`` and ``Plaintext`` print ``***``.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from service.crypto.keyring import Key, KeyProvider, Purpose

FORMAT = "v1"
NONCE_BYTES = 12
DATA_KEY_BYTES = 32
DATA_KEY_VERSION = 0  # a data key is not versioned; the slot in the format is kept uniform
AadValue = str | int | None
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class DecryptionFailed(Exception):
    """A ciphertext or wrap is malformed, tampered with, misplaced, or under the wrong key."""


@dataclass(frozen=True, repr=False, eq=False)
class DataKey:
    """A random 256-bit data key (a subject's DEK, a packet key). Its repr is ``***``."""

    material: bytes = field(repr=False)
    version: int = DATA_KEY_VERSION

    def __post_init__(self) -> None:
        if len(self.material) != DATA_KEY_BYTES:
            raise ValueError("a data key is 32 bytes")

    @classmethod
    def generate(cls) -> DataKey:
        return cls(secrets.token_bytes(DATA_KEY_BYTES))

    def __repr__(self) -> str:
        return "DataKey(***)"

    @cached_property
    def aead(self) -> AESGCM:
        return AESGCM(self.material)


@dataclass(frozen=True, repr=False, eq=False)
class Plaintext:
    """Decrypted bytes on their way to a caller that is allowed to see them. Repr ``***``."""

    value: bytes = field(repr=False)

    def __repr__(self) -> str:
        return "Plaintext(***)"


def canonical_aad(aad: Mapping[str, AadValue], *, key_version: int) -> bytes:
    """The associated data bytes: canonical JSON of the placement plus the key version."""
    if "key_version" in aad:
        raise ValueError("'key_version' is added by the envelope itself")
    return _CANONICAL.encode({**aad, "key_version": key_version}).encode("utf-8")


def token_version(token: str) -> int:
    """The key version a ``v1.<version>.<base64>`` string was made with."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != FORMAT or not parts[1].isdigit():
        raise DecryptionFailed("not a v1 envelope")
    return int(parts[1])


def seal(key: Key | DataKey, plaintext: bytes, *, aad: Mapping[str, AadValue]) -> str:
    """Encrypt ``plaintext`` under ``key`` bound to ``aad``; returns ``v1.<version>.<base64>``."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    sealed = key.aead.encrypt(nonce, plaintext, canonical_aad(aad, key_version=key.version))
    return f"{FORMAT}.{key.version}.{base64.b64encode(nonce + sealed).decode('ascii')}"


def open_(key: Key | DataKey, token: str, *, aad: Mapping[str, AadValue]) -> bytes:
    """Decrypt a ``seal`` result; raises ``DecryptionFailed`` on any mismatch or tampering."""
    if token_version(token) != key.version:
        raise DecryptionFailed("envelope was sealed under another key version")
    try:
        raw = base64.b64decode(token.split(".", 2)[2], validate=True)
    except (binascii.Error, ValueError):
        raise DecryptionFailed("envelope body is not base64") from None
    if len(raw) < NONCE_BYTES + 16:
        raise DecryptionFailed("envelope is truncated")
    try:
        return key.aead.decrypt(
            raw[:NONCE_BYTES], raw[NONCE_BYTES:], canonical_aad(aad, key_version=key.version)
        )
    except InvalidTag:
        raise DecryptionFailed("envelope does not authenticate for this place and key") from None


def wrap_key(
    keyring: KeyProvider, purpose: Purpose, data_key: DataKey, *, aad: Mapping[str, AadValue]
) -> str:
    """Wrap ``data_key`` under the current KEK of ``purpose`` (the version is in the string)."""
    return seal(keyring.current(purpose), data_key.material, aad={**aad, "purpose": purpose})


def unwrap_key(
    keyring: KeyProvider, purpose: Purpose, wrapped: str, *, aad: Mapping[str, AadValue]
) -> DataKey:
    """Unwrap a ``wrap_key`` result with the KEK version it names."""
    kek = keyring.get(purpose, token_version(wrapped))
    return DataKey(open_(kek, wrapped, aad={**aad, "purpose": purpose}))


def rewrap_key(
    keyring: KeyProvider, purpose: Purpose, wrapped: str, *, aad: Mapping[str, AadValue]
) -> str:
    """Move a wrap to the current KEK version. Only the data key passes through memory."""
    return wrap_key(keyring, purpose, unwrap_key(keyring, purpose, wrapped, aad=aad), aad=aad)


def wrap_under(data_key_kek: DataKey, data_key: DataKey, *, aad: Mapping[str, AadValue]) -> str:
    """Wrap ``data_key`` under another data key (a member's DEK under its packet key)."""
    return seal(data_key_kek, data_key.material, aad={**aad, "purpose": "wrap_under"})


def unwrap_under(data_key_kek: DataKey, wrapped: str, *, aad: Mapping[str, AadValue]) -> DataKey:
    return DataKey(open_(data_key_kek, wrapped, aad={**aad, "purpose": "wrap_under"}))
