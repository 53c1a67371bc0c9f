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

import binascii
import json
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from service.crypto.keyring import Key, KeyProvider, Purpose, version_number

FORMAT = "v1"
NONCE_BYTES = 12
DATA_KEY_BYTES = 32
DATA_KEY_VERSION = 0  # a data key is not versioned; the slot in the format is kept uniform
WRAP_UNDER = "wrap_under"  # the purpose in the associated data of a data key under a data key
AadValue = str | int | None
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
# The same encoder without ``JSONEncoder.encode``'s per-call set-up: the C one-shot encoder that
# ``encode`` itself builds for these options (sorted keys, ``,``/``:``, no ASCII escaping), made
# once. Identical bytes (tested); the pure-Python path stands in where the C module is missing.
_c_make_encoder: Callable[..., Callable[[object, int], Iterable[str]]] | None = getattr(
    json.encoder, "c_make_encoder", None
)
_C_CANONICAL = (
    _c_make_encoder(
        None, _CANONICAL.default, json.encoder.encode_basestring, None, ":", ",", True, False, True
    )
    if _c_make_encoder is not None
    else None
)


class DecryptionFailed(Exception):
    """A ciphertext or wrap is malformed, tampered with, misplaced, or under the wrong key."""


@dataclass(frozen=True, repr=False, eq=False)
class DataKey:
    """A random 256-bit data key (a subject's DEK, a packet key). Its repr is ``***``."""

    material: bytes = field(repr=False)
    version: int = DATA_KEY_VERSION
    # Built with the key: most data keys open one ciphertext, so a lazy one saves nothing.
    aead: AESGCM = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.material) != DATA_KEY_BYTES:
            raise ValueError("a data key is 32 bytes")
        object.__setattr__(self, "aead", AESGCM(self.material))

    @classmethod
    def generate(cls) -> DataKey:
        return cls(secrets.token_bytes(DATA_KEY_BYTES))

    def __repr__(self) -> str:
        return "DataKey(***)"


@dataclass(frozen=True, repr=False, eq=False)
class Plaintext:
    """Decrypted bytes on their way to a caller that is allowed to see them. Repr ``***``."""

    value: bytes = field(repr=False)

    def __repr__(self) -> str:
        return "Plaintext(***)"


def _aad_bytes(aad: Mapping[str, AadValue], key_version: int, purpose: str | None) -> bytes:
    """Canonical JSON of ``aad`` (with ``purpose`` set when given) plus the key version, built
    with one dict merge and the prebuilt encoder."""
    if "key_version" in aad:
        raise ValueError("'key_version' is added by the envelope itself")
    document: dict[str, AadValue] = (
        {**aad, "key_version": key_version}
        if purpose is None
        else {**aad, "purpose": purpose, "key_version": key_version}
    )
    if _C_CANONICAL is None:
        return _CANONICAL.encode(document).encode("utf-8")
    return "".join(_C_CANONICAL(document, 0)).encode("utf-8")


def canonical_aad(aad: Mapping[str, AadValue], *, key_version: int) -> bytes:
    """The associated data bytes: canonical JSON of the placement plus the key version."""
    return _aad_bytes(aad, key_version, None)


def _encoded_value(value: AadValue) -> bytes:
    """One value as the canonical encoder writes it inside a placement (the encoder's own
    functions for text and whole numbers, called directly)."""
    if type(value) is str:
        return json.encoder.encode_basestring(value).encode("utf-8")
    if type(value) is int:
        return int.__repr__(value).encode("ascii")
    if _C_CANONICAL is None:
        return _CANONICAL.encode(value).encode("utf-8")
    return "".join(_C_CANONICAL(value, 0)).encode("utf-8")


class EncodedAad(NamedTuple):
    """Associated data already encoded (by an ``AadTemplate``) for one purpose and key version."""

    data: bytes
    purpose: str | None
    key_version: int


class AadTemplate:
    """The associated data of ciphertexts under data keys whose placements differ in one field
    only (say the row), encoded once.

    ``fill(value)`` gives, byte for byte, what the placement with ``field`` set to ``value``
    encodes to, at the cost of encoding that one value: keys are sorted, so the field sits at
    the same place whatever its value. (Re-identifying a packet needs forty of these.) For
    ``open_`` under a data key, or with ``wrapped_key`` for ``unwrap_under``.
    """

    _MARKER = "\x00aad-template\x00"

    def __init__(
        self, aad: Mapping[str, AadValue], *, field: str, wrapped_key: bool = False
    ) -> None:
        self.purpose = WRAP_UNDER if wrapped_key else None
        encoded = _aad_bytes({**aad, field: self._MARKER}, DATA_KEY_VERSION, self.purpose)
        marker = _encoded_value(self._MARKER)
        if encoded.count(marker) != 1:
            raise ValueError("the template's field must be a placement field, and only it varies")
        self._head, _, self._tail = encoded.partition(marker)

    def fill(self, value: AadValue) -> EncodedAad:
        return EncodedAad(
            self._head + _encoded_value(value) + self._tail, self.purpose, DATA_KEY_VERSION
        )


def _aad_for(
    aad: Mapping[str, AadValue] | EncodedAad, key_version: int, purpose: str | None
) -> bytes:
    if not isinstance(aad, EncodedAad):
        return _aad_bytes(aad, key_version, purpose)
    if aad.purpose != purpose or aad.key_version != key_version:
        raise ValueError("the associated data was encoded for another purpose or key version")
    return aad.data


# The one spelling of each version a keyring reaches in practice, looked up rather than checked.
_VERSION_SPELLINGS = {str(number): number for number in range(1024)}


def _split(token: str) -> tuple[int, str]:
    """``(key version, base64 body)`` of a ``v1.<version>.<base64>`` string. The version is
    written one way only (no leading zero), as ``keys retire`` counts dependents by that text."""
    parts = token.split(".")
    if len(parts) == 3 and parts[0] == FORMAT:
        version = _VERSION_SPELLINGS.get(parts[1])
        if version is None:
            version = version_number(parts[1])
        if version is not None:
            return version, parts[2]
    raise DecryptionFailed("not a v1 envelope")


def token_version(token: str) -> int:
    """The key version a ``v1.<version>.<base64>`` string was made with."""
    return _split(token)[0]


def _seal(
    key: Key | DataKey, plaintext: bytes, aad: Mapping[str, AadValue], purpose: str | None
) -> str:
    nonce = secrets.token_bytes(NONCE_BYTES)  # fresh from the OS CSPRNG for every message
    sealed = key.aead.encrypt(nonce, plaintext, _aad_bytes(aad, key.version, purpose))
    body = binascii.b2a_base64(nonce + sealed, newline=False).decode("ascii")
    return f"{FORMAT}.{key.version}.{body}"


def _open(
    aead: AESGCM,
    key_version: int,
    version: int,
    body: str,
    aad: Mapping[str, AadValue] | EncodedAad,
    purpose: str | None,
) -> bytes:
    """The plaintext of a ``v1.<version>.<body>`` string under the key whose cipher is ``aead``
    and whose version is ``key_version``."""
    if version != key_version:
        raise DecryptionFailed("envelope was sealed under another key version")
    try:
        raw = binascii.a2b_base64(body, strict_mode=True)
    except (binascii.Error, ValueError):
        raise DecryptionFailed("envelope body is not base64") from None
    if len(raw) < NONCE_BYTES + 16:
        raise DecryptionFailed("envelope is truncated")
    try:
        return aead.decrypt(
            raw[:NONCE_BYTES], raw[NONCE_BYTES:], _aad_for(aad, key_version, purpose)
        )
    except InvalidTag:
        raise DecryptionFailed("envelope does not authenticate for this place and key") from None


def seal(key: Key | DataKey, plaintext: bytes, *, aad: Mapping[str, AadValue]) -> str:
    """Encrypt ``plaintext`` under ``key`` bound to ``aad``; returns ``v1.<version>.<base64>``."""
    return _seal(key, plaintext, aad, None)


def open_(key: Key | DataKey, token: str, *, aad: Mapping[str, AadValue] | EncodedAad) -> bytes:
    """Decrypt a ``seal`` result; raises ``DecryptionFailed`` on any mismatch or tampering."""
    version, body = _split(token)
    return _open(key.aead, key.version, version, body, aad, None)


def wrap_key(
    keyring: KeyProvider, purpose: Purpose, data_key: DataKey, *, aad: Mapping[str, AadValue]
) -> str:
    """Wrap ``data_key`` under the current KEK of ``purpose`` (the version is in the string)."""
    return _seal(keyring.current(purpose), data_key.material, aad, purpose)


def unwrap_key(
    keyring: KeyProvider, purpose: Purpose, wrapped: str, *, aad: Mapping[str, AadValue]
) -> DataKey:
    """Unwrap a ``wrap_key`` result with the KEK version it names."""
    version, body = _split(wrapped)
    kek = keyring.get(purpose, version)
    return DataKey(_open(kek.aead, kek.version, version, body, aad, purpose))


def rewrap_key(
    keyring: KeyProvider, purpose: Purpose, wrapped: str, *, aad: Mapping[str, AadValue]
) -> str:
    """Move a wrap to the current KEK version. Only the data key passes through memory."""
    return wrap_key(keyring, purpose, unwrap_key(keyring, purpose, wrapped, aad=aad), aad=aad)


def wrap_under(data_key_kek: DataKey, data_key: DataKey, *, aad: Mapping[str, AadValue]) -> str:
    """Wrap ``data_key`` under another data key (a member's DEK under its packet key)."""
    return _seal(data_key_kek, data_key.material, aad, WRAP_UNDER)


def unwrap_under(
    data_key_kek: DataKey, wrapped: str, *, aad: Mapping[str, AadValue] | EncodedAad
) -> DataKey:
    version, body = _split(wrapped)
    return DataKey(_open(data_key_kek.aead, data_key_kek.version, version, body, aad, WRAP_UNDER))


class UnderWrappedKey(NamedTuple):
    """A ciphertext under its own data key, and that key wrapped under another data key
    (``wrap_under``), each with its associated data already encoded (``AadTemplate``)."""

    wrapped_key: str
    wrapped_key_aad: EncodedAad
    ciphertext: str
    ciphertext_aad: EncodedAad


def open_under_wrapped_keys(
    data_key_kek: DataKey, sealed: Iterable[UnderWrappedKey]
) -> list[bytes]:
    """Each ciphertext's plaintext, in order: its data key unwrapped under ``data_key_kek``
    (as ``unwrap_under``), the ciphertext opened under that key (as ``open_``), with the same
    checks and the same ``DecryptionFailed``. For many at once (a packet's identities): the
    data keys stay bytes inside this function instead of becoming ``DataKey`` objects."""
    opened = []
    for wrapped_key, wrapped_key_aad, ciphertext, ciphertext_aad in sealed:
        key = _open(
            data_key_kek.aead,
            data_key_kek.version,
            *_split(wrapped_key),
            wrapped_key_aad,
            WRAP_UNDER,
        )
        if len(key) != DATA_KEY_BYTES:
            raise DecryptionFailed("a wrapped data key is not 32 bytes")
        opened.append(
            _open(AESGCM(key), DATA_KEY_VERSION, *_split(ciphertext), ciphertext_aad, None)
        )
    return opened
