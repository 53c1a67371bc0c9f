"""``reveal`` writes the open's body as JSON piece by piece: whatever text a client's fields
hold, the body must still parse as the documented ``PacketClientsPublic``, with the same values.
No database: a sealed packet is built here as an open would read it."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.crypto.envelope import DataKey, seal, wrap_key, wrap_under
from service.crypto.keyring import Keyring
from service.packets import service as packets_service
from service.packets.models import PacketClientsPublic, PacketPublic
from service.records.service import Identity, identity_aad

PACKET_ID = "pk-1"
texts = st.text(max_size=30)
maybe_texts = st.none() | texts
hits = st.lists(
    st.fixed_dictionaries(
        {
            "rule_id": texts,
            "rule_type": texts,
            "evidence": st.dictionaries(texts, st.integers() | texts | st.lists(texts), max_size=3),
            "explanation": texts,
        }
    ),
    max_size=3,
)
flags = st.builds(
    packets_service._FlagRow,
    kind=st.sampled_from(["algorithm", "external"]),
    run_id=maybe_texts,
    policy_version=maybe_texts,
    reason_code=maybe_texts,
    hits_json=hits.map(json.dumps),
    explanation=texts,
)
identities = st.builds(
    Identity,
    bsn=texts,
    given_name=texts,
    family_name=texts,
    birth_date=st.dates(min_value=date(1900, 1, 1), max_value=date(2026, 12, 31)),
    street=maybe_texts,
    postcode=maybe_texts,
    city=maybe_texts,
    phone=maybe_texts,
    email=maybe_texts,
)
members = st.fixed_dictionaries(
    {
        "pseudonym": texts,
        "identity": st.none() | identities,  # None: erased
        "district": texts,
        "neighbourhood": texts,
        "birth_year": st.none() | st.integers(min_value=1900, max_value=2026),
        "household_type": maybe_texts,
        "flag": flags,
        "further_flags": st.lists(flags, max_size=2),
    }
)


@pytest.fixture(scope="module")
def keyring(tmp_path_factory: pytest.TempPathFactory) -> Keyring:
    home: Path = tmp_path_factory.mktemp("reveal")
    return Keyring.init(home / "keyring.json")


def sealed_packet(keyring: Keyring, clients: list[dict[str, Any]]) -> packets_service.SealedPacket:
    """A packet as an open reads it: its key wrapped under the packet KEK, each identity under
    its own key, that key wrapped under the packet key."""
    packet_key = DataKey.generate()
    sealed_members = []
    for subject_id, client in enumerate(clients):
        wrapped_dek = ciphertext = None
        if client["identity"] is not None:
            dek = DataKey.generate()
            wrapped_dek = wrap_under(
                packet_key, dek, aad=packets_service.member_dek_aad(PACKET_ID, subject_id)
            )
            ciphertext = seal(
                dek, client["identity"].to_bytes(), aad=identity_aad(client["pseudonym"])
            )
        sealed_members.append(
            packets_service._SealedMember(
                packet_id=PACKET_ID,
                pseudonym=client["pseudonym"],
                subject_id=subject_id,
                wrapped_dek=wrapped_dek,
                identity_ciphertext=ciphertext,
                district=client["district"],
                neighbourhood=client["neighbourhood"],
                birth_year=client["birth_year"],
                household_type=client["household_type"],
                flag=client["flag"],
            )
        )
    now = datetime(2026, 3, 15, 9, 30, tzinfo=UTC)
    return packets_service.SealedPacket(
        packet=PacketPublic(
            id=PACKET_ID,
            run_id="run-1",
            professional_id="prof-001",
            district="Charlois",
            status="opened",
            member_count=len(clients),
            created_at=now,
            expires_at=now,
            closed_at=None,
            opened_at=now,
        ),
        wrapped_key=wrap_key(
            keyring, "packet", packet_key, aad=packets_service.packet_key_aad(PACKET_ID)
        ),
        members=sealed_members,
        followups={},
        further_flags={
            subject_id: client["further_flags"] for subject_id, client in enumerate(clients)
        },
    )


def flag_as_documented(flag: packets_service._FlagRow) -> dict[str, Any]:
    return {
        "kind": flag.kind,
        "run_id": flag.run_id,
        "policy_version": flag.policy_version,
        "reason_code": flag.reason_code,
        "hits": json.loads(flag.hits_json),
        "explanation": flag.explanation,
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clients=st.lists(members, max_size=4))
def test_any_text_in_a_client_comes_back_as_the_documented_schema_reads_it(
    keyring: Keyring, clients: list[dict[str, Any]]
) -> None:
    body = packets_service.reveal(keyring=keyring, sealed=sealed_packet(keyring, clients))
    parsed = PacketClientsPublic.model_validate_json(body)
    assert json.loads(body) == json.loads(parsed.model_dump_json())
    assert parsed.packet.id == PACKET_ID
    assert len(parsed.clients) == len(clients)
    for shown, client in zip(parsed.clients, clients, strict=True):
        assert shown.pseudonym == client["pseudonym"]
        if client["identity"] is None:
            assert (shown.identity, shown.note) == (None, "erased")
        else:
            assert shown.identity is not None
            assert shown.note is None
            assert shown.identity.model_dump() == vars(client["identity"])
        assert shown.characteristics.model_dump() == {
            name: client[name]
            for name in ("district", "neighbourhood", "birth_year", "household_type")
        }
        assert shown.flag.model_dump(mode="json") == flag_as_documented(client["flag"])
        assert [f.model_dump(mode="json") for f in shown.further_flags] == [
            flag_as_documented(f) for f in client["further_flags"]
        ]
        assert shown.followups == []
