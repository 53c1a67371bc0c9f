"""Envelope AEAD: bound to its place, tamper-evident, never reusing a nonce."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.crypto import envelope
from service.crypto.envelope import (
    WRAP_UNDER,
    AadTemplate,
    AadValue,
    DataKey,
    DecryptionFailed,
    Plaintext,
    UnderWrappedKey,
    canonical_aad,
    open_,
    open_under_wrapped_keys,
    seal,
    token_version,
    unwrap_key,
    unwrap_under,
    wrap_key,
    wrap_under,
)
from service.crypto.keyring import Keyring

PLACE = {"table": "subjects", "column": "identity_ciphertext", "row": "abc"}


@pytest.fixture
def keyring(tmp_path: Path) -> Keyring:
    return Keyring.init(tmp_path / "keyring.json")


def flip_bit(token: str, byte_index: int) -> str:
    head, version, body = token.split(".")
    raw = bytearray(base64.b64decode(body))
    raw[byte_index] ^= 0x01
    return f"{head}.{version}.{base64.b64encode(bytes(raw)).decode()}"


def test_round_trip_and_format() -> None:
    key = DataKey.generate()
    token = seal(key, b"secret identity", aad=PLACE)
    assert token.startswith("v1.0.")
    assert b"secret identity" not in base64.b64decode(token.split(".")[2])
    assert open_(key, token, aad=PLACE) == b"secret identity"


def test_wrong_associated_data_is_rejected() -> None:
    key = DataKey.generate()
    token = seal(key, b"x", aad=PLACE)
    with pytest.raises(DecryptionFailed):
        open_(key, token, aad={**PLACE, "column": "wrapped_dek"})


def test_ciphertext_moved_to_another_row_is_rejected() -> None:
    key = DataKey.generate()
    token = seal(key, b"x", aad=PLACE)
    with pytest.raises(DecryptionFailed):
        open_(key, token, aad={**PLACE, "row": "def"})


@pytest.mark.parametrize(
    ("part", "index"),
    [
        ("nonce", 0),
        ("nonce", 11),
        ("ciphertext", 12),
        ("ciphertext", 20),
        ("tag", -1),
        ("tag", -16),
    ],
)
def test_flipped_bit_is_rejected(part: str, index: int) -> None:
    key = DataKey.generate()
    token = seal(key, b"twenty bytes of data", aad=PLACE)
    with pytest.raises(DecryptionFailed):
        open_(key, flip_bit(token, index), aad=PLACE)


def test_flipped_bit_in_a_wrapped_key_is_rejected(keyring: Keyring) -> None:
    wrapped = wrap_key(keyring, "vault", DataKey.generate(), aad=PLACE)
    for index in (0, 12, 30, -1):
        with pytest.raises(DecryptionFailed):
            unwrap_key(keyring, "vault", flip_bit(wrapped, index), aad=PLACE)


def test_wrap_names_the_kek_version_and_survives_rotation(keyring: Keyring) -> None:
    data_key = DataKey.generate()
    wrapped = wrap_key(keyring, "vault", data_key, aad=PLACE)
    assert wrapped.startswith("v1.1.")
    with Keyring.edit(keyring.path) as rotated:
        rotated.rotate("vault")
    assert wrap_key(rotated, "vault", data_key, aad=PLACE).startswith("v1.2.")
    assert unwrap_key(rotated, "vault", wrapped, aad=PLACE).material == data_key.material


def test_wrap_under_another_purpose_is_rejected(keyring: Keyring) -> None:
    wrapped = wrap_key(keyring, "vault", DataKey.generate(), aad=PLACE)
    with pytest.raises(DecryptionFailed):
        unwrap_key(keyring, "packet", wrapped, aad=PLACE)


def test_wrap_under_a_packet_key() -> None:
    packet_key, member_dek = DataKey.generate(), DataKey.generate()
    place = {"table": "packet_members", "row": "p1/7"}
    wrapped = wrap_under(packet_key, member_dek, aad=place)
    assert unwrap_under(packet_key, wrapped, aad=place).material == member_dek.material
    with pytest.raises(DecryptionFailed):
        unwrap_under(DataKey.generate(), wrapped, aad=place)
    with pytest.raises(DecryptionFailed):
        unwrap_under(packet_key, wrapped, aad={**place, "row": "p1/8"})


def test_a_key_version_is_written_one_way_only(keyring: Keyring) -> None:
    wrapped = wrap_key(keyring, "vault", DataKey.generate(), aad=PLACE)
    assert wrapped.startswith("v1.1.")
    for padded in ("v1.01.", "v1.001."):
        with pytest.raises(DecryptionFailed, match="not a v1 envelope"):
            unwrap_key(keyring, "vault", wrapped.replace("v1.1.", padded, 1), aad=PLACE)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "v2.0.AAAA",
        "v1.x.AAAA",
        "v1.0.!!!!",
        "v1.0.AAAA",
        # More digits than ``int`` reads (an altered row): refused like any other bad version,
        # so a caller that withholds what fails to open (one note, one identity) still can.
        f"v1.{'1' * 5000}.AAAA",
    ],
)
def test_malformed_envelopes_are_rejected(token: str) -> None:
    with pytest.raises(DecryptionFailed):
        open_(DataKey.generate(), token, aad=PLACE)


def test_a_hundred_thousand_encryptions_never_repeat_a_nonce() -> None:
    key = DataKey.generate()
    nonces = {
        base64.b64decode(seal(key, b"", aad=PLACE).split(".")[2])[:12] for _ in range(100_000)
    }
    assert len(nonces) == 100_000


def test_reprs_hide_secrets(keyring: Keyring) -> None:
    data_key = DataKey.generate()
    assert repr(data_key) == "DataKey(***)"
    assert repr(Plaintext(b"Jansen")) == "Plaintext(***)"
    current = keyring.current("vault")
    assert "***" in repr(current)
    assert current.material.hex() not in repr(current)
    assert "***" in repr(keyring)


@pytest.mark.parametrize(
    "aad",
    [
        {},
        PLACE,
        {"table": "packet_members", "row": "0f1e-2d3c", "subject": 12345, "extra": None},
        {"z": -1, "a": 'Ĳsselmonde ☃ "quoted" \\ \n', "m": 0},
    ],
)
def test_associated_data_is_exactly_the_canonical_json(aad: dict[str, AadValue]) -> None:
    """The prebuilt encoder gives the same bytes as the documented canonical JSON."""
    expected = json.dumps(
        {**aad, "key_version": 3}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
    assert canonical_aad(aad, key_version=3) == expected
    with pytest.raises(ValueError, match="added by the envelope"):
        canonical_aad({"key_version": 1}, key_version=1)


def test_a_wrap_is_bound_to_purpose_and_version_as_documented(keyring: Keyring) -> None:
    """A wrap authenticates under the placement plus purpose and KEK version, nothing else."""
    data_key = DataKey.generate()
    wrapped = wrap_key(keyring, "packet", data_key, aad=PLACE)
    kek = keyring.current("packet")
    manual = {**PLACE, "purpose": "packet"}
    assert open_(kek, wrapped, aad=manual) == data_key.material
    under = wrap_under(kek_as_data_key := DataKey.generate(), data_key, aad=PLACE)
    assert open_(kek_as_data_key, under, aad={**PLACE, "purpose": "wrap_under"}) == (
        data_key.material
    )


def test_ciphers_are_built_once_per_key_and_nonces_stay_fresh(keyring: Keyring) -> None:
    kek = keyring.current("vault")
    assert keyring.current("vault").aead is kek.aead
    data_key = DataKey.generate()
    assert data_key.aead is data_key.aead
    first = wrap_key(keyring, "vault", data_key, aad=PLACE)
    second = wrap_key(keyring, "vault", data_key, aad=PLACE)
    assert first != second
    assert base64.b64decode(first.split(".")[2])[:12] != base64.b64decode(second.split(".")[2])[:12]
    assert repr(data_key) == "DataKey(***)"


def test_a_version_that_is_not_ascii_digits_is_rejected() -> None:
    key = DataKey.generate()
    token = seal(key, b"x", aad=PLACE)
    with pytest.raises(DecryptionFailed):
        open_(key, token.replace("v1.0.", "v1.\u00b2.", 1), aad=PLACE)


def test_versions_past_the_lookup_table_still_parse_and_stay_one_spelling() -> None:
    key = DataKey.generate()
    body = seal(key, b"x", aad=PLACE).split(".", 2)[2]
    for version in (0, 7, 1023, 1024, 123456):
        assert token_version(f"v1.{version}.{body}") == version
    for spelling in ("01", "00", "+1", " 1", "1 ", "1_000", "-1", ""):
        with pytest.raises(DecryptionFailed, match="not a v1 envelope"):
            token_version(f"v1.{spelling}.{body}")
    for token in (f"v1.0.{body}.x", f"v2.0.{body}", f"v1.0{body}"):
        with pytest.raises(DecryptionFailed, match="not a v1 envelope"):
            token_version(token)


aad_values = st.one_of(st.none(), st.integers(), st.text())


@given(
    placement=st.dictionaries(
        st.sampled_from(["table", "column", "row", "subject", "packet", "z", "\u00e9"]),
        aad_values,
        max_size=5,
    ),
    field=st.sampled_from(["row", "subject", "packet", "a", "\u2603"]),
    value=aad_values,
    wrapped_key=st.booleans(),
)
def test_a_template_fills_in_exactly_the_canonical_associated_data(
    placement: dict[str, AadValue], field: str, value: AadValue, wrapped_key: bool
) -> None:
    """Byte for byte what the placement with that value encodes to, whatever the value (quotes,
    backslashes, control characters, non-ASCII, large numbers) and wherever the field sorts."""
    filled = AadTemplate(placement, field=field, wrapped_key=wrapped_key).fill(value)
    document = {**placement, field: value, "key_version": 0}
    if wrapped_key:
        document["purpose"] = "wrap_under"
    assert filled.data == json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


def test_template_filled_associated_data_opens_what_a_placement_sealed() -> None:
    packet_key, member_key = DataKey.generate(), DataKey.generate()
    place: dict[str, AadValue] = {
        "table": "packet_members",
        "column": "wrapped_dek",
        "row": "p-1",
        "subject": 41,
    }
    wrapped = wrap_under(packet_key, member_key, aad=place)
    sealed = seal(member_key, b"identity", aad=PLACE)
    members = AadTemplate({**place, "subject": 0}, field="subject", wrapped_key=True)
    identities = AadTemplate({**PLACE, "row": ""}, field="row")
    unwrapped = unwrap_under(packet_key, wrapped, aad=members.fill(41))
    assert open_(unwrapped, sealed, aad=identities.fill("abc")) == b"identity"
    # another row's value does not open it: the template binds as the placement does
    with pytest.raises(DecryptionFailed):
        unwrap_under(packet_key, wrapped, aad=members.fill(42))
    with pytest.raises(DecryptionFailed):
        open_(unwrapped, sealed, aad=identities.fill("abd"))


def test_template_associated_data_is_refused_for_another_purpose() -> None:
    key = DataKey.generate()
    sealed = seal(key, b"x", aad=PLACE)
    for_wraps = AadTemplate(PLACE, field="row", wrapped_key=True)
    with pytest.raises(ValueError, match="another purpose"):
        open_(key, sealed, aad=for_wraps.fill("abc"))
    with pytest.raises(ValueError, match="another purpose"):
        unwrap_under(
            key, wrap_under(key, key, aad=PLACE), aad=AadTemplate(PLACE, field="row").fill("abc")
        )


def test_a_template_whose_marker_stands_in_another_field_too_is_refused() -> None:
    """Were the marker found twice, the value would be filled in at the wrong place."""
    with pytest.raises(ValueError, match="only it varies"):
        AadTemplate({**PLACE, "column": AadTemplate._MARKER}, field="row")


@pytest.mark.parametrize("field", ["key_version", "purpose"])
def test_a_template_cannot_vary_what_the_envelope_sets_itself(field: str) -> None:
    with pytest.raises(ValueError, match=r"key_version|placement field"):
        AadTemplate(PLACE, field=field, wrapped_key=True)


MEMBER_PLACE: dict[str, AadValue] = {
    "table": "packet_members",
    "column": "wrapped_dek",
    "row": "p-1",
    "subject": 0,
}


def sealed_members(packet_key: DataKey, count: int) -> list[UnderWrappedKey]:
    """``count`` identities, each under its own key wrapped under ``packet_key``."""
    members = AadTemplate(MEMBER_PLACE, field="subject", wrapped_key=True)
    identities = AadTemplate({**PLACE, "row": ""}, field="row")
    sealed = []
    for number in range(count):
        member_key = DataKey.generate()
        sealed.append(
            UnderWrappedKey(
                wrap_under(packet_key, member_key, aad={**MEMBER_PLACE, "subject": number}),
                members.fill(number),
                seal(member_key, b"identity %d" % number, aad={**PLACE, "row": f"ps-{number}"}),
                identities.fill(f"ps-{number}"),
            )
        )
    return sealed


def test_many_under_wrapped_keys_open_as_one_at_a_time_does() -> None:
    packet_key = DataKey.generate()
    sealed = sealed_members(packet_key, 5)
    opened = open_under_wrapped_keys(packet_key, sealed)
    assert opened == [b"identity %d" % number for number in range(5)]
    one_by_one = [
        open_(
            unwrap_under(packet_key, s.wrapped_key, aad=s.wrapped_key_aad),
            s.ciphertext,
            aad=s.ciphertext_aad,
        )
        for s in sealed
    ]
    assert opened == one_by_one
    assert open_under_wrapped_keys(packet_key, []) == []


def test_many_under_wrapped_keys_refuse_what_one_at_a_time_refuses() -> None:
    packet_key = DataKey.generate()
    first, second = sealed_members(packet_key, 2)
    refused = [
        # under another packet key
        (DataKey.generate(), first),
        # a wrap or a ciphertext moved to another member's place
        (packet_key, first._replace(wrapped_key_aad=second.wrapped_key_aad)),
        (packet_key, first._replace(ciphertext_aad=second.ciphertext_aad)),
        # another member's ciphertext under this member's key
        (packet_key, first._replace(ciphertext=second.ciphertext)),
        # a flipped bit, in the wrap or in the ciphertext
        (packet_key, first._replace(wrapped_key=flip_bit(first.wrapped_key, 20))),
        (packet_key, first._replace(ciphertext=flip_bit(first.ciphertext, 20))),
        # a key version that a data key never has, and a malformed envelope
        (packet_key, first._replace(wrapped_key=first.wrapped_key.replace("v1.0.", "v1.1.", 1))),
        (packet_key, first._replace(ciphertext="v1.0.!!!!")),
    ]
    for key, member in refused:
        with pytest.raises(DecryptionFailed):
            open_under_wrapped_keys(key, [second, member])
    # a wrap that authenticates but holds no 32-byte key (sealed as ``wrap_under`` seals)
    short = envelope._seal(packet_key, b"short", {**MEMBER_PLACE, "subject": 0}, WRAP_UNDER)
    with pytest.raises(DecryptionFailed, match="not 32 bytes"):
        open_under_wrapped_keys(packet_key, [first._replace(wrapped_key=short)])


def test_many_under_wrapped_keys_refuse_associated_data_encoded_for_another_purpose() -> None:
    packet_key = DataKey.generate()
    (member,) = sealed_members(packet_key, 1)
    with pytest.raises(ValueError, match="another purpose"):
        open_under_wrapped_keys(
            packet_key, [member._replace(wrapped_key_aad=member.ciphertext_aad)]
        )
    with pytest.raises(ValueError, match="another purpose"):
        open_under_wrapped_keys(
            packet_key, [member._replace(ciphertext_aad=member.wrapped_key_aad)]
        )
