"""Pseudonyms: a keyed, domain-separated HMAC-SHA256 of a normalized national id (BSN).

Invariants (pure: no database, clock or settings):
- a BSN is accepted only as 9 digits (8 digits get their dropped leading zero back; spaces, dots
  and dashes are ignored) that pass the 11-check and are not all zeros;
- the same BSN always yields the same pseudonym under the same key version, whatever source sent
  it and however it was written, so records link without the id ever being stored in clear;
- the HMAC input carries a domain prefix, so a pseudonym can never collide with another use of
  the same key; without the key a pseudonym reveals nothing (the BSN space is small, so the key,
  not the hash, is what protects it);
- error messages never quote the value.
"""

from __future__ import annotations

import hashlib
import hmac

DOMAIN = b"casepackets/pseudonym/v1/nl-bsn\x00"
PSEUDONYM_BYTES = 16  # 128 bits: collision-free for any population this service will see
_SEPARATORS = str.maketrans("", "", " .-")
_WEIGHTS = (9, 8, 7, 6, 5, 4, 3, 2, -1)


class InvalidBsn(ValueError):
    """The value is not a valid BSN (the message never contains the value)."""


def bsn_checksum_ok(digits: str) -> bool:
    """The 11-check (elfproef) on exactly nine digits."""
    if len(digits) != 9 or not digits.isascii() or not digits.isdigit():
        return False
    return sum(w * int(d) for w, d in zip(_WEIGHTS, digits, strict=True)) % 11 == 0


def normalize_bsn(value: str) -> str:
    """Nine digits with leading zeros, or ``InvalidBsn``."""
    digits = value.strip().translate(_SEPARATORS)
    if not digits.isascii() or not digits.isdigit():
        raise InvalidBsn("a BSN consists of digits only")
    if len(digits) == 8:
        digits = "0" + digits
    if len(digits) != 9:
        raise InvalidBsn("a BSN has 9 digits")
    if digits == "000000000" or not bsn_checksum_ok(digits):
        raise InvalidBsn("not a valid BSN (fails the 11-check)")
    return digits


def pseudonymize(key: bytes, normalized_bsn: str) -> str:
    """The pseudonym (32 lowercase hex characters) of an already normalized BSN."""
    mac = hmac.new(key, DOMAIN + normalized_bsn.encode("ascii"), hashlib.sha256)
    return mac.digest()[:PSEUDONYM_BYTES].hex()


def bsn_from_prefix(prefix8: str) -> str | None:
    """Complete eight digits to a valid BSN with the check digit, or None when impossible.

    Used by the demo generator to make valid synthetic BSNs.
    """
    total = sum(w * int(d) for w, d in zip(_WEIGHTS[:8], prefix8, strict=True))
    check = total % 11
    if check == 10:
        return None
    candidate = prefix8 + str(check)
    return candidate if candidate != "000000000" else None
