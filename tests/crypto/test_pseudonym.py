"""Pseudonyms: BSN validation (11-check) and stable keyed HMAC."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.crypto.pseudonym import (
    InvalidBsn,
    bsn_checksum_ok,
    bsn_from_prefix,
    normalize_bsn,
    pseudonymize,
)

KEY = bytes(range(32))


@pytest.mark.parametrize("written", ["111222333", "111 222 333", "111.222.333", " 111-222-333 "])
def test_spellings_normalize_to_the_same_bsn(written: str) -> None:
    assert normalize_bsn(written) == "111222333"


def test_eight_digits_get_their_leading_zero_back() -> None:
    assert normalize_bsn("12345672") == "012345672"


@pytest.mark.parametrize("bad", ["111222334", "000000000", "12345", "1112223333", "11122233a", ""])
def test_invalid_bsns_are_refused_without_echoing(bad: str) -> None:
    with pytest.raises(InvalidBsn) as caught:
        normalize_bsn(bad)
    assert bad.strip() == "" or bad not in str(caught.value)


@given(st.text(alphabet="0123456789", min_size=8, max_size=8))
def test_completed_prefixes_pass_the_eleven_check(prefix: str) -> None:
    bsn = bsn_from_prefix(prefix)
    if bsn is not None:
        assert bsn_checksum_ok(bsn)
        assert normalize_bsn(bsn) == bsn


def test_pseudonyms_are_stable_keyed_and_opaque() -> None:
    first = pseudonymize(KEY, "111222333")
    assert first == pseudonymize(KEY, normalize_bsn("111 222 333"))
    assert len(first) == 32
    assert "111222333" not in first
    assert first != pseudonymize(bytes(32), "111222333")
    assert first != pseudonymize(KEY, "123456782")
