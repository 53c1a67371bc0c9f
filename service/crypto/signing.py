"""Ed25519 signing of access-log checkpoints as C2SP signed notes.

Invariants:
- the signing key is derived from the keyring's 32-byte "log_signing" seed and never leaves this
  module (its repr is ``***``); only the public key and signatures are exposed;
- a note's key id is the first 4 bytes of SHA-256(name ‖ 0x0A ‖ 0x01 ‖ public key) (C2SP
  signed-note, Ed25519), so a signature line can only be matched to the key it names;
- ``open_note`` raises ``NoteError`` unless a signature line by the given verifier key verifies
  over the note's exact text; it never returns an unverified text.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from service.crypto.keyring import KeyProvider

ED25519_ALGORITHM = b"\x01"
SIGNATURE_PREFIX = "\u2014 "  # "— " (em dash, space) starts every signature line
# The most signature lines a note may carry: C2SP asks verifiers for a limit, of at least 16. The
# service's notes carry one, or two at a handover; an auditor's copy may gain witnesses' lines.
MAX_SIGNATURES = 100


class NoteError(ValueError):
    """A signed note or verifier key is malformed, or no trusted signature verifies."""


class NotSignedBy(NoteError):
    """A well-formed note carries no signature line by the given key (it may be signed by another
    key, such as an earlier version of the same one)."""


def key_id(name: str, public_key: bytes) -> bytes:
    return hashlib.sha256(name.encode("utf-8") + b"\n" + ED25519_ALGORITHM + public_key).digest()[
        :4
    ]


def _check_name(name: str) -> None:
    if not name or any(c.isspace() or c == "+" for c in name):
        raise NoteError("a key name must be non-empty without spaces or '+'")


@dataclass(frozen=True)
class VerifierKey:
    """A public key with its note name: ``<name>+<hex key id>+<base64(0x01 ‖ key)>``."""

    name: str
    public_key: bytes

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.public_key)

    def __str__(self) -> str:
        encoded = base64.b64encode(ED25519_ALGORITHM + self.public_key).decode("ascii")
        return f"{self.name}+{self.key_id.hex()}+{encoded}"

    @classmethod
    def parse(cls, text: str) -> VerifierKey:
        parts = text.strip().split("+", 2)
        if len(parts) != 3:
            raise NoteError("a verifier key reads <name>+<hex key id>+<base64 key>")
        name, hex_id, encoded = parts
        _check_name(name)
        try:
            raw = base64.b64decode(encoded, validate=True)
            claimed_id = bytes.fromhex(hex_id)
        except ValueError:
            raise NoteError("the verifier key is not valid hex/base64") from None
        if len(raw) != 33 or raw[:1] != ED25519_ALGORITHM:
            raise NoteError("the verifier key is not an Ed25519 key")
        key = cls(name=name, public_key=raw[1:])
        if claimed_id != key.key_id:
            raise NoteError("the verifier key's id does not match its name and key")
        return key

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public_key).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True


class NoteSigner:
    """Signs note texts under one name with an Ed25519 key."""

    def __init__(self, *, name: str, seed: bytes) -> None:
        _check_name(name)
        if len(seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")
        self.name = name
        self._private = Ed25519PrivateKey.from_private_bytes(seed)
        self.verifier = VerifierKey(
            name=name,
            public_key=self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
        )

    def __repr__(self) -> str:
        return f"NoteSigner(name={self.name!r}, key=***)"

    @classmethod
    def from_keyring(cls, keys: KeyProvider, *, name: str) -> NoteSigner:
        return cls(name=name, seed=keys.current("log_signing").material)

    def sign(self, text: str) -> str:
        """The signed note: ``text`` (ending in a newline), a blank line, one signature line."""
        if not text.endswith("\n"):
            raise NoteError("a note's text must end with a newline")
        return f"{text}\n{self._signature_line(text)}"

    def cosign(self, note: str) -> str:
        """``note`` (signed by another key) with this key's signature line added over its text."""
        text, separator, _ = note.rpartition("\n\n")
        if not separator:
            raise NoteError("not a signed note (no blank line before the signatures)")
        return note + self._signature_line(text + "\n")

    def _signature_line(self, text: str) -> str:
        signature = self._private.sign(text.encode("utf-8"))
        blob = base64.b64encode(self.verifier.key_id + signature).decode("ascii")
        return f"{SIGNATURE_PREFIX}{self.name} {blob}\n"


def open_note(note: str, verifier: VerifierKey) -> str:
    """The text of ``note`` if ``verifier`` signed it; raises ``NoteError`` otherwise.

    As the C2SP signed-note format asks: no control character but the newline anywhere (so no
    CR either), every signature line well-formed, and every signature by ``verifier``'s name and
    key id valid. Signatures by other keys are ignored."""
    if any(ord(char) < 0x20 and char != "\n" for char in note):
        raise NoteError("a note holds no control character but the newline")
    text, separator, signatures = note.rpartition("\n\n")
    if not separator or not signatures.endswith("\n"):
        raise NoteError("not a signed note (no blank line before the signatures)")
    text += "\n"
    lines = signatures[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"a note carries at most {MAX_SIGNATURES} signatures")
    ours = []
    for line in lines:
        name, blob = _signature(line)
        if name == verifier.name and blob[:4] == verifier.key_id:
            ours.append(blob[4:])
    if not ours:
        raise NotSignedBy(
            f"the note carries no signature by {verifier.name} key {verifier.key_id.hex()}"
        )
    if not all(verifier.verify(text.encode("utf-8"), signature) for signature in ours):
        raise NoteError(f"the signature by {verifier.name} does not verify")
    return text


def last_signer_key_id(note: str) -> bytes:
    """The key id the note's last signature line names (not verified here: ``open_note`` is)."""
    _text, separator, signatures = note.rpartition("\n\n")
    if not separator or not signatures.endswith("\n"):
        raise NoteError("not a signed note (no blank line before the signatures)")
    return _signature(signatures[:-1].split("\n")[-1])[1][:4]


def _signature(line: str) -> tuple[str, bytes]:
    """A signature line's key name and its decoded key id and signature."""
    name, _, encoded = line.removeprefix(SIGNATURE_PREFIX).partition(" ")
    try:
        blob = base64.b64decode(encoded, validate=True)
    except ValueError:
        blob = b""
    if not line.startswith(SIGNATURE_PREFIX) or len(blob) <= 4:
        raise NoteError("malformed signature line")
    _check_name(name)
    return name, blob
