"""Professionals, packet building with keys, visibility and reassignment (SQLite and PostgreSQL)."""

from __future__ import annotations

import base64
import uuid
from datetime import timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select, text, update
from sqlmodel import Session

from service.crypto.envelope import DecryptionFailed, unwrap_key, unwrap_under
from service.flagging.models import Flag
from service.flagging.service import ERASED_EXPLANATION
from service.packets.models import Packet, PacketMember, Professional, utcnow
from service.packets.service import member_dek_aad, packet_key_aad
from tests.conftest import TokenFactory, bearer
from tests.flagging.seed import AS_OF, RELAPSING, add_subject, log_entries
from tests.packets.scenario import COORDINATOR, MEMBERS, SUBJECTS, build_world, ingest


def professional(
    client: TestClient, coordinator: dict[str, str], sub: str, **changes: Any
) -> dict[str, Any]:
    body = {
        "id": sub,
        "display_name": f"Caseworker {sub}",
        "team": "Zuid-1",
        "districts": ["Charlois"],
        "capacity": 40,
        **changes,
    }
    response = client.post("/v1/professionals", json=body, headers=coordinator)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


def flagged_run(
    app: FastAPI, client: TestClient, session: Session, coordinator: dict[str, str], count: int
) -> tuple[str, dict[str, Any]]:
    deks = {}
    for i in range(count):
        pseudonym = f"ps-{i:03d}"
        _, deks[pseudonym] = add_subject(
            session, app.state.keyring, pseudonym=pseudonym, events=RELAPSING
        )
    session.commit()
    run = client.post(
        "/v1/flagging/runs", json={"as_of": AS_OF.isoformat()}, headers=coordinator
    ).json()
    return str(run["id"]), deks


def test_professionals_are_listed_in_pages(client: TestClient, token: TokenFactory) -> None:
    coordinator = bearer(token("coord-001", "coordinator"))
    for number in (5, 1, 4, 2, 3):
        professional(
            client, coordinator, f"prof-{number:03d}", team="Zuid-2" if number % 2 else "Zuid-1"
        )

    def walk(**query: Any) -> list[list[str]]:
        pages, after = [], None
        while True:
            params = {**query, **({"after": after} if after else {})}
            page = client.get("/v1/professionals", params=params, headers=coordinator)
            assert page.status_code == 200, page.text
            pages.append([p["id"] for p in page.json()["items"]])
            if (after := page.json()["next_after"]) is None:
                return pages

    assert walk() == [["prof-001", "prof-002", "prof-003", "prof-004", "prof-005"]]
    assert walk(limit=2) == [["prof-001", "prof-002"], ["prof-003", "prof-004"], ["prof-005"]]
    assert walk(limit=2, team="Zuid-2") == [["prof-001", "prof-003"], ["prof-005"]]
    for bad in ({"limit": 0}, {"limit": 1001}, {"after": ""}):
        refused = client.get("/v1/professionals", params=bad, headers=coordinator)
        assert refused.status_code == 422, bad


def test_professionals_are_listed_in_the_same_id_order_on_either_database(
    client: TestClient, token: TokenFactory, session: Session, backend: str
) -> None:
    """The ids' characters in code point order, as SQLite compares text, whatever collation
    the PostgreSQL cluster was made with: under en_US (a common default, here set on the
    column) "Prof-d" came between "prof-a" and "prof-b", and "prof_c" before "prof-d"."""
    if backend == "postgres":
        session.execute(
            text(
                'ALTER TABLE professionals ALTER COLUMN id TYPE VARCHAR(128) COLLATE "en-US-x-icu"'
            )
        )
        session.commit()
    coordinator = bearer(token("coord-001", "coordinator"))
    ids = ["prof-b", "Prof-d", "prof_c", "prof-a", "PROF-2", "prof-10", "prof-9", "prof.e"]
    for sub in ids:
        professional(client, coordinator, sub)
    walked, after = [], None
    while True:
        params: dict[str, Any] = {"limit": 1, **({"after": after} if after else {})}
        page = client.get("/v1/professionals", params=params, headers=coordinator)
        assert page.status_code == 200, page.text
        walked += [p["id"] for p in page.json()["items"]]
        if (after := page.json()["next_after"]) is None:
            break
    assert walked == sorted(ids)


def test_times_read_back_are_utc_whatever_time_zone_the_database_server_keeps(
    app: FastAPI, client: TestClient, token: TokenFactory, session: Session, backend: str
) -> None:
    """A PostgreSQL server hands timestamps back in its own ``TimeZone`` (initdb takes the
    host's, say Europe/Amsterdam): a professional registered at ...Z was listed at ...-05:00."""
    if backend == "postgres":
        name = session.execute(text("SELECT current_database()")).scalar_one()
        session.execute(text(f"ALTER DATABASE {name} SET timezone TO 'America/New_York'"))
        session.commit()
        app.state.database.engine.dispose()  # new connections take the database's setting
    coordinator = bearer(token("coord-001", "coordinator"))
    created = professional(client, coordinator, "prof-001")
    [listed] = client.get("/v1/professionals", headers=coordinator).json()["items"]
    assert created["created_at"].endswith("Z"), created
    assert (listed["created_at"], listed["updated_at"]) == (
        created["created_at"],
        created["updated_at"],
    )


def test_professionals_are_registered_listed_updated_and_deactivated(
    client: TestClient, token: TokenFactory, session: Session
) -> None:
    coordinator = bearer(token("coord-001", "coordinator"))
    created = professional(client, coordinator, "prof-001", districts=["Feijenoord", "Charlois"])
    assert created["districts"] == ["Charlois", "Feijenoord"]
    assert created["open_load"] == 0
    assert created["active"] is True
    again = client.post(
        "/v1/professionals",
        json={
            "id": "prof-001",
            "display_name": "x",
            "team": "t",
            "districts": ["a"],
            "capacity": 1,
        },
        headers=coordinator,
    )
    assert again.status_code == 409
    patched = client.patch(
        "/v1/professionals/prof-001", json={"capacity": 10}, headers=coordinator
    ).json()
    assert patched["capacity"] == 10
    assert (
        client.patch(
            "/v1/professionals/prof-001", json={"colour": "red"}, headers=coordinator
        ).status_code
        == 422
    )
    deactivated = client.post("/v1/professionals/prof-001/deactivate", headers=coordinator)
    assert deactivated.json()["active"] is False
    listed = client.get("/v1/professionals", headers=coordinator).json()["items"]
    assert [p["id"] for p in listed] == ["prof-001"]
    assert (
        client.get(
            "/v1/professionals", headers=bearer(token("prof-001", "professional"))
        ).status_code
        == 403
    )
    assert (
        client.post("/v1/professionals/nobody/deactivate", headers=coordinator).status_code == 404
    )
    # Who gave whom districts and room is in the access log: ids, field names and numbers only,
    # never the names, team or districts a coordinator typed.
    managed = [e for e in log_entries(session) if e["object_type"] == "professional"]
    assert [(e["action"], e["actor"], e["object_id"], e["reason"]) for e in managed] == [
        ("professional.create", "coord-001", "prof-001", "2 districts; capacity 40"),
        ("professional.update", "coord-001", "prof-001", "changed: capacity 10"),
        ("professional.deactivate", "coord-001", "prof-001", "changed: active false"),
    ]
    assert not any(word in str(managed) for word in ("Caseworker", "Zuid-1", "Feijenoord"))


def test_partitioning_builds_packets_whose_keys_unwrap_to_the_vault_dek(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    coordinator = bearer(token("coord-001", "coordinator"))
    professional(client, coordinator, "prof-001", capacity=30)
    professional(client, coordinator, "prof-002", capacity=30)
    run_id, deks = flagged_run(app, client, session, coordinator, 25)

    response = client.post("/v1/packets/partition", json={"run_id": run_id}, headers=coordinator)
    assert response.status_code == 201, response.text
    result = response.json()
    assert sorted(p["member_count"] for p in result["packets"]) == [5, 20]
    assert result["unplaced"] == []
    assert "wrapped" not in response.text

    keyring = app.state.keyring
    packets = list(session.execute(select(Packet)).scalars())
    assert {p.id for p in packets} == {p["id"] for p in result["packets"]}
    for packet in packets:
        assert packet.status == "assigned"
        assert packet.wrapped_key is not None
        assert packet.expires_at > packet.created_at
        packet_key = unwrap_key(
            keyring, "packet", packet.wrapped_key, aad=packet_key_aad(packet.id)
        )
        members = session.execute(
            select(PacketMember).where(PacketMember.packet_id == packet.id)
        ).scalars()
        for member in members:
            assert member.wrapped_dek is not None
            dek = unwrap_under(
                packet_key,
                member.wrapped_dek,
                aad=member_dek_aad(packet.id, member.subject_id),
            )
            assert dek.material == deks[member.pseudonym].material

    packet_ids = sorted(p.id for p in packets)
    built = log_entries(session, "packet.build")
    assigned = log_entries(session, "packet.assign")
    assert sorted(e["object_id"] for e in built) == packet_ids
    assert sorted(e["object_id"] for e in assigned) == packet_ids
    assert sorted(p for e in built for p in e["pseudonyms"]) == sorted(deks)

    again = client.post("/v1/packets/partition", json={"run_id": run_id}, headers=coordinator)
    assert (again.json()["packets"], again.json()["unplaced"]) == ([], [])  # each flag placed once
    # A later run flags the same clients while their packets are open: not placed beside them.
    later = client.post(
        "/v1/flagging/runs", json={"as_of": AS_OF.isoformat()}, headers=coordinator
    ).json()
    beside = client.post(
        "/v1/packets/partition", json={"run_id": later["id"]}, headers=coordinator
    ).json()
    assert beside["packets"] == []
    assert {u["reason"] for u in beside["unplaced"]} == {"already in an open packet"}
    assert len(beside["unplaced"]) == len(deks)


def test_a_member_wrap_moved_to_another_packet_does_not_open(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    coordinator = bearer(token("coord-001", "coordinator"))
    professional(client, coordinator, "prof-001", capacity=1)
    professional(client, coordinator, "prof-002", capacity=1)
    run_id, _ = flagged_run(app, client, session, coordinator, 2)
    client.post("/v1/packets/partition", json={"run_id": run_id}, headers=coordinator)
    first, second = session.execute(select(Packet)).scalars()
    member = session.execute(
        select(PacketMember).where(PacketMember.packet_id == first.id)
    ).scalar_one()
    assert second.wrapped_key is not None
    assert member.wrapped_dek is not None
    keyring = app.state.keyring
    other_key = unwrap_key(keyring, "packet", second.wrapped_key, aad=packet_key_aad(second.id))
    with pytest.raises(DecryptionFailed):
        unwrap_under(
            other_key, member.wrapped_dek, aad=member_dek_aad(second.id, member.subject_id)
        )


def test_unplaceable_cases_come_back_with_a_reason(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    coordinator = bearer(token("coord-001", "coordinator"))
    professional(client, coordinator, "prof-001", capacity=3)
    run_id, _ = flagged_run(app, client, session, coordinator, 5)
    result = client.post(
        "/v1/packets/partition", json={"run_id": run_id}, headers=coordinator
    ).json()
    assert [p["member_count"] for p in result["packets"]] == [3]
    assert [u["pseudonym"] for u in result["unplaced"]] == ["ps-003", "ps-004"]
    assert {u["reason"] for u in result["unplaced"]} == {
        "every professional serving district Charlois is at capacity"
    }
    # The answer showed the coordinator whom the run flagged and nobody took: logged, as a page
    # of the run's flags is.
    (unplaced,) = log_entries(session, "packet.unplaced")
    assert (unplaced["actor"], unplaced["object_type"], unplaced["object_id"]) == (
        "coord-001",
        "flagging_run",
        run_id,
    )
    assert unplaced["pseudonyms"] == ["ps-003", "ps-004"]
    assert unplaced["reason"] == f"run {run_id}; 2 cases unplaced"
    # Partitioned again, the two still find no room: shown, and so logged, again.
    again = client.post("/v1/packets/partition", json={"run_id": run_id}, headers=coordinator)
    assert [u["pseudonym"] for u in again.json()["unplaced"]] == ["ps-003", "ps-004"]
    assert [e["pseudonyms"] for e in log_entries(session, "packet.unplaced")] == [
        ["ps-003", "ps-004"],
        ["ps-003", "ps-004"],
    ]
    assert (
        client.post(
            "/v1/packets/partition", json={"run_id": "0" * 32}, headers=coordinator
        ).status_code
        == 404
    )


@pytest.mark.parametrize(
    "pasted",
    [
        "123456782",
        "Jan Jansen",
        "1984-02-29 Rotterdam",
        # a run id with more around it is not one
        "0" * 33,
        f"{'0' * 32} 123456782",
        f"123456782 {'0' * 32}",
    ],
)
def test_a_run_id_of_another_shape_is_refused_naming_the_field_not_echoed(
    client: TestClient, token: TokenFactory, pasted: str
) -> None:
    # A BSN or a name pasted into run_id names no run: refused (422) as the run routes' path
    # refuses it, rather than quoted back in a 404 ("no flagging run 123456782").
    coordinator = bearer(token("coord-001", "coordinator"))
    refused = client.post("/v1/packets/partition", json={"run_id": pasted}, headers=coordinator)
    assert refused.status_code == 422, refused.text
    assert refused.json()["errors"][0]["loc"] == ["run_id"]
    assert pasted not in refused.text


def test_a_case_whose_key_fails_its_check_is_left_unplaced_and_the_rest_are_placed(
    app: FastAPI,
    client: TestClient,
    session: Session,
    token: TokenFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    coordinator = bearer(token("coord-001", "coordinator"))
    professional(client, coordinator, "prof-001", capacity=4)
    run_id, deks = flagged_run(app, client, session, coordinator, 5)
    # ps-001's wrap copied onto ps-000's row: a restore gone wrong, or tampering.
    moved = session.execute(
        select(SUBJECTS.c.wrapped_dek).where(SUBJECTS.c.pseudonym == "ps-001")
    ).scalar_one()
    session.execute(
        update(SUBJECTS).where(SUBJECTS.c.pseudonym == "ps-000").values(wrapped_dek=moved)
    )
    session.commit()

    damaged = [
        {
            "pseudonym": "ps-000",
            "district": "Charlois",
            "reason": "the subject's key failed its integrity check",
        }
    ]
    first = client.post("/v1/packets/partition", json={"run_id": run_id}, headers=coordinator)
    assert first.status_code == 201, first.text
    assert first.json()["unplaced"] == damaged
    # The room ps-000 would have taken went to the next case (ps-004), not left empty.
    assert [p["member_count"] for p in first.json()["packets"]] == [4]
    # Nor does it stop a later partitioning.
    client.patch("/v1/professionals/prof-001", json={"capacity": 40}, headers=coordinator)
    again = client.post("/v1/packets/partition", json={"run_id": run_id}, headers=coordinator)
    assert again.status_code == 201, again.text
    assert (again.json()["packets"], again.json()["unplaced"]) == ([], damaged)
    members = session.execute(select(MEMBERS.c.pseudonym)).scalars().all()
    assert sorted(members) == ["ps-001", "ps-002", "ps-003", "ps-004"]
    (built,) = log_entries(session, "packet.build")
    assert sorted(built["pseudonyms"]) == sorted(members)
    assert "the vault key of subject ps-000 failed its integrity check" in caplog.text
    assert all(dek.material.hex() not in caplog.text for dek in deks.values())


EXTERNAL = "e7" * 16  # a pseudonym of the shape ingest hands out


CONCERN = (EXTERNAL, "school-absence", "Long school absence of a child in the household.")


def run_beside_a_pushed_concern(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> tuple[dict[str, str], str]:
    """prof-001, a run that flags one client (ps-000), and a source's pending concern about
    another (EXTERNAL); the coordinator's headers and the run's id."""
    coordinator = bearer(token("coord-001", "coordinator"))
    professional(client, coordinator, "prof-001")
    run_id, _ = flagged_run(app, client, session, coordinator, 1)
    add_subject(session, app.state.keyring, pseudonym=EXTERNAL)
    session.commit()
    assert push(client, token, CONCERN).status_code == 201
    return coordinator, run_id


def test_external_flags_join_the_next_partitioning(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    coordinator, run_id = run_beside_a_pushed_concern(app, client, session, token)
    result = client.post(
        "/v1/packets/partition", json={"run_id": run_id}, headers=coordinator
    ).json()
    [packet] = result["packets"]
    detail = client.get(f"/v1/packets/{packet['id']}", headers=coordinator).json()
    assert {(m["pseudonym"], m["flag_kind"]) for m in detail["members"]} == {
        ("ps-000", "algorithm"),
        (EXTERNAL, "external"),
    }


def push(client: TestClient, token: TokenFactory, *flags: tuple[str, str, str]) -> Any:
    body = {
        "flags": [
            {"pseudonym": pseudonym, "reason_code": code, "explanation": explanation}
            for pseudonym, code, explanation in flags
        ]
    }
    return client.post("/v1/flags", json=body, headers=bearer(token("source-1", "source")))


def partition(client: TestClient, coordinator: dict[str, str], run_id: str) -> dict[str, Any]:
    response = client.post("/v1/packets/partition", json={"run_id": run_id}, headers=coordinator)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def placements_per_flag(session: Session) -> dict[int, int]:
    counts: dict[int, int] = {}
    for (flag_id,) in session.execute(select(PacketMember.__table__.c.flag_id)):  # type: ignore[attr-defined]
        counts[flag_id] = counts.get(flag_id, 0) + 1
    return counts


def test_partitioning_a_run_again_places_only_its_flags_not_yet_placed(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    coordinator = bearer(token("coord-001", "coordinator"))
    professional(client, coordinator, "prof-001", capacity=3)
    run_id, _ = flagged_run(app, client, session, coordinator, 5)
    first = partition(client, coordinator, run_id)
    [packet] = first["packets"]
    assert [u["pseudonym"] for u in first["unplaced"]] == ["ps-003", "ps-004"]
    closed = client.post(f"/v1/packets/{packet['id']}/close", headers=coordinator)
    assert closed.status_code == 200, closed.text

    second = partition(client, coordinator, run_id)
    [rest] = second["packets"]
    detail = client.get(f"/v1/packets/{rest['id']}", headers=coordinator).json()
    assert [m["pseudonym"] for m in detail["members"]] == ["ps-003", "ps-004"]
    assert second["unplaced"] == []
    assert partition(client, coordinator, run_id) == {**second, "packets": [], "unplaced": []}
    session.expire_all()
    assert sorted(placements_per_flag(session).values()) == [1] * 5


def test_a_pushed_flag_beside_the_run_flag_goes_with_it_and_the_professional_sees_both(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    coordinator = bearer(token("coord-001", "coordinator"))
    professional(client, coordinator, "prof-001")
    add_subject(session, app.state.keyring, pseudonym=EXTERNAL, events=RELAPSING)
    session.commit()
    run_id = client.post(
        "/v1/flagging/runs", json={"as_of": AS_OF.isoformat()}, headers=coordinator
    ).json()["id"]
    rent = (EXTERNAL, "rent-arrears", "Three months of rent arrears reported by the landlord.")
    school = (EXTERNAL, "school-absence", "Long school absence of a child in the household.")
    assert push(client, token, rent).status_code == 201
    assert push(client, token, school).status_code == 201

    [packet] = partition(client, coordinator, run_id)["packets"]
    assert packet["member_count"] == 1
    opened = client.get(
        f"/v1/packets/{packet['id']}/clients", headers=bearer(token("prof-001", "professional"))
    )
    assert opened.status_code == 200, opened.text
    [member] = opened.json()["clients"]
    assert member["flag"]["kind"] == "algorithm"
    assert [(f["kind"], f["reason_code"], f["explanation"]) for f in member["further_flags"]] == [
        ("external", rent[1], rent[2]),
        ("external", school[1], school[2]),
    ]
    closed = client.post(f"/v1/packets/{packet['id']}/close", headers=coordinator)
    assert closed.status_code == 200, closed.text
    # Every flag was placed once: nothing comes back, neither with this run nor with a later one.
    again = partition(client, coordinator, run_id)
    assert (again["packets"], again["unplaced"]) == ([], [])
    empty_run = client.post(
        "/v1/flagging/runs", json={"as_of": "1990-01-01"}, headers=coordinator
    ).json()
    later = partition(client, coordinator, empty_run["id"])
    assert (later["packets"], later["unplaced"]) == ([], [])


def test_a_pushed_flags_free_text_goes_with_its_subjects_erasure(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    """A source writes the explanation freely, so it may name the person or where they live; it
    is stored in clear, so erasure must remove it, from the open packet and from the table."""
    coordinator = bearer(token("coord-001", "coordinator"))
    professional(client, coordinator, "prof-001")
    add_subject(session, app.state.keyring, pseudonym=EXTERNAL, events=RELAPSING)
    session.commit()
    run_id = client.post(
        "/v1/flagging/runs", json={"as_of": AS_OF.isoformat()}, headers=coordinator
    ).json()["id"]
    written = "Mevrouw Zwanenburg, Slaghekstraat 1, reported rent arrears at the desk herself."
    assert push(client, token, (EXTERNAL, "rent-arrears", written)).status_code == 201
    [packet] = partition(client, coordinator, run_id)["packets"]
    erased = client.post(
        f"/v1/subjects/{EXTERNAL}/erase", headers=bearer(token("admin-001", "admin"))
    )
    assert erased.status_code == 200, erased.text

    opened = client.get(
        f"/v1/packets/{packet['id']}/clients", headers=bearer(token("prof-001", "professional"))
    )
    assert opened.status_code == 200, opened.text
    [member] = opened.json()["clients"]
    assert (member["identity"], member["note"]) == (None, "erased")
    assert [(f["reason_code"], f["explanation"]) for f in member["further_flags"]] == [
        ("rent-arrears", ERASED_EXPLANATION)
    ]
    session.expire_all()
    stored = session.execute(select(Flag.__table__.c.explanation)).scalars().all()  # type: ignore[attr-defined]
    assert written not in stored
    assert ERASED_EXPLANATION in stored


def test_a_pending_pushed_flag_of_an_erased_subject_is_dropped_not_reported_forever(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    coordinator, run_id = run_beside_a_pushed_concern(app, client, session, token)
    erased = client.post(
        f"/v1/subjects/{EXTERNAL}/erase", headers=bearer(token("admin-001", "admin"))
    )
    assert erased.status_code == 200, erased.text
    result = partition(client, coordinator, run_id)
    assert [m for p in result["packets"] for m in [p["member_count"]]] == [1]
    assert EXTERNAL not in {u["pseudonym"] for u in result["unplaced"]}


def test_a_professional_sees_only_their_own_packets(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    coordinator = bearer(token("coord-001", "coordinator"))
    professional(client, coordinator, "prof-001", capacity=2)
    professional(client, coordinator, "prof-002", capacity=2)
    run_id, _ = flagged_run(app, client, session, coordinator, 4)
    client.post("/v1/packets/partition", json={"run_id": run_id}, headers=coordinator)

    mine = client.get("/v1/packets", headers=bearer(token("prof-001", "professional"))).json()
    theirs = client.get("/v1/packets", headers=bearer(token("prof-002", "professional"))).json()
    everything = client.get("/v1/packets", headers=coordinator).json()
    source_view = client.get("/v1/packets", headers=bearer(token("src", "source"))).json()
    assert {p["professional_id"] for p in mine["items"]} == {"prof-001"}
    assert {p["professional_id"] for p in theirs["items"]} == {"prof-002"}
    assert len(everything["items"]) == len(source_view["items"]) == 2

    their_packet = theirs["items"][0]["id"]
    denied = client.get(
        f"/v1/packets/{their_packet}", headers=bearer(token("prof-001", "professional"))
    )
    assert denied.status_code == 404
    [logged] = log_entries(session, "packet.read")
    assert logged["outcome"] == "denied"
    assert logged["actor"] == "prof-001"
    own = client.get(
        f"/v1/packets/{their_packet}", headers=bearer(token("prof-002", "professional"))
    )
    assert own.status_code == 200
    assert len(own.json()["members"]) == 2
    # Allowed reads are logged too, with the members' pseudonyms the metadata named.
    sourced = client.get(f"/v1/packets/{their_packet}", headers=bearer(token("src", "source")))
    assert sourced.status_code == 200
    reads = log_entries(session, "packet.read")
    assert [(e["actor"], e["outcome"]) for e in reads] == [
        ("prof-001", "denied"),
        ("prof-002", "allowed"),
        ("src", "allowed"),
    ]
    named = sorted(m["pseudonym"] for m in own.json()["members"])
    assert reads[1]["pseudonyms"] == reads[2]["pseudonyms"] == named
    assert reads[0]["pseudonyms"] == named


def test_reassignment_moves_access_at_once(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    coordinator = bearer(token("coord-001", "coordinator"))
    professional(client, coordinator, "prof-001", capacity=5)
    run_id, _ = flagged_run(app, client, session, coordinator, 3)
    [packet] = client.post(
        "/v1/packets/partition", json={"run_id": run_id}, headers=coordinator
    ).json()["packets"]
    professional(client, coordinator, "prof-002", capacity=5)
    former = bearer(token("prof-001", "professional"))
    new = bearer(token("prof-002", "professional"))
    assert client.get(f"/v1/packets/{packet['id']}", headers=former).status_code == 200

    moved = client.post(
        f"/v1/packets/{packet['id']}/reassign",
        json={"professional_id": "prof-002"},
        headers=coordinator,
    )
    assert moved.status_code == 200, moved.text
    assert moved.json()["professional_id"] == "prof-002"
    assert client.get(f"/v1/packets/{packet['id']}", headers=former).status_code == 404
    assert client.get(f"/v1/packets/{packet['id']}", headers=new).status_code == 200
    assert client.get("/v1/packets", headers=former).json()["items"] == []
    # Asking for another's packets finds nothing, not one's own under their name.
    for asked, found in (("prof-001", []), ("prof-002", [packet["id"]])):
        page = client.get(f"/v1/packets?professional_id={asked}", headers=new).json()
        assert [p["id"] for p in page["items"]] == found, asked
    [logged] = log_entries(session, "packet.reassign")
    assert logged["reason"] == "from prof-001 to prof-002"
    assert len(logged["pseudonyms"]) == 3

    professional(client, coordinator, "prof-003", capacity=1)
    too_small = client.post(
        f"/v1/packets/{packet['id']}/reassign",
        json={"professional_id": "prof-003"},
        headers=coordinator,
    )
    assert too_small.status_code == 409
    pasted = "Jan Jansen 123456782"
    nobody = client.post(
        f"/v1/packets/{packet['id']}/reassign",
        json={"professional_id": pasted},
        headers=coordinator,
    )
    assert nobody.status_code == 404, nobody.text
    # The owner may not give their packet away: the same 404 as anyone else, logged as denied.
    refused = client.post(
        f"/v1/packets/{packet['id']}/reassign",
        json={"professional_id": "prof-001"},
        headers=new,
    )
    assert refused.status_code == 404, refused.text
    # Every refusal is logged as denied, with the packet's members; an id that is no registered
    # professional's stays out of the log (it may be any text).
    denied = [e for e in log_entries(session, "packet.reassign") if e["outcome"] == "denied"]
    assert [(e["actor"], e["reason"]) for e in denied] == [
        ("coord-001", "professional 'prof-003' has room for 1 more clients; this packet has 3"),
        ("coord-001", "no such professional"),
        ("prof-002", "lacks packets.reassign"),
    ]
    assert all(len(e["pseudonyms"]) == 3 for e in denied)
    assert "123456782" not in str(log_entries(session))
    assert client.get(f"/v1/packets/{packet['id']}", headers=new).json()["professional_id"] == (
        "prof-002"
    )


def test_a_packet_moves_only_to_an_active_professional_of_its_district_with_room_for_it(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    """Reassigning hands over the clients' identities: never to someone who no longer works
    here, nor outside the packet's district, nor past anyone's capacity (room for exactly the
    packet is room enough). Each refusal is logged as denied and leaves the packet where it
    was."""
    coordinator = bearer(token("coord-001", "coordinator"))
    professional(client, coordinator, "prof-001", capacity=5)
    run_id, _ = flagged_run(app, client, session, coordinator, 3)
    [packet] = client.post(
        "/v1/packets/partition", json={"run_id": run_id}, headers=coordinator
    ).json()["packets"]
    professional(client, coordinator, "prof-left")
    assert client.post("/v1/professionals/prof-left/deactivate", headers=coordinator).is_success
    professional(client, coordinator, "prof-north", districts=["Feijenoord"])
    professional(client, coordinator, "prof-small", capacity=2)
    professional(client, coordinator, "prof-fits", capacity=3)

    def reassign(to: str) -> Any:
        return client.post(
            f"/v1/packets/{packet['id']}/reassign",
            json={"professional_id": to},
            headers=coordinator,
        )

    for refused_to in ("prof-left", "prof-north", "prof-small"):
        refused = reassign(refused_to)
        assert refused.status_code == 409, (refused_to, refused.text)
        shown = client.get(f"/v1/packets/{packet['id']}", headers=coordinator).json()
        assert shown["professional_id"] == "prof-001"
        denied = client.get(
            f"/v1/packets/{packet['id']}/clients",
            headers=bearer(token(refused_to, "professional")),
        )
        assert denied.status_code == 404
    moved = reassign("prof-fits")
    assert moved.status_code == 200, moved.text
    assert moved.json()["professional_id"] == "prof-fits"
    entries = log_entries(session, "packet.reassign")
    assert [(e["outcome"], e["reason"]) for e in entries] == [
        ("denied", "professional 'prof-left' is not active"),
        ("denied", "professional 'prof-north' does not serve district Charlois"),
        ("denied", "professional 'prof-small' has room for 2 more clients; this packet has 3"),
        ("allowed", "from prof-001 to prof-fits"),
    ]
    assert all(len(e["pseudonyms"]) == 3 for e in entries)


def test_an_erased_client_no_longer_takes_up_their_professionals_capacity(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    """An erased client cannot be re-identified nor followed up: nobody works with them any
    more, so they leave the open load, and the room they took goes to new clients and to
    packets reassigned (a packet needs room for the clients left in it)."""
    coordinator = bearer(token("coord-001", "coordinator"))
    professional(client, coordinator, "prof-001", capacity=3)
    add_subject(session, app.state.keyring, pseudonym=EXTERNAL, events=RELAPSING)
    run_id, _ = flagged_run(app, client, session, coordinator, 2)
    [packet] = partition(client, coordinator, run_id)["packets"]
    assert packet["member_count"] == 3
    erased = client.post(
        f"/v1/subjects/{EXTERNAL}/erase", headers=bearer(token("admin-001", "admin"))
    )
    assert erased.status_code == 200, erased.text

    [listed] = client.get("/v1/professionals", headers=coordinator).json()["items"]
    assert (listed["capacity"], listed["open_load"]) == (3, 2)

    add_subject(session, app.state.keyring, pseudonym="ps-new", events=RELAPSING)
    session.commit()
    later = client.post(
        "/v1/flagging/runs", json={"as_of": AS_OF.isoformat()}, headers=coordinator
    ).json()["id"]
    result = partition(client, coordinator, later)
    assert [(p["professional_id"], p["member_count"]) for p in result["packets"]] == [
        ("prof-001", 1)
    ]
    assert "ps-new" not in {u["pseudonym"] for u in result["unplaced"]}

    professional(client, coordinator, "prof-002", capacity=2)
    moved = client.post(
        f"/v1/packets/{packet['id']}/reassign",
        json={"professional_id": "prof-002"},
        headers=coordinator,
    )
    assert moved.status_code == 200, moved.text
    [_, second] = client.get("/v1/professionals", headers=coordinator).json()["items"]
    assert (second["id"], second["open_load"]) == ("prof-002", 2)


def test_paging_through_packets_neither_repeats_nor_skips_while_packets_change(
    client: TestClient, token: TokenFactory
) -> None:
    districts = {"prof-001": ["Charlois"], "prof-002": ["Feijenoord"], "prof-003": ["IJsselmonde"]}
    world = build_world(client, token, professionals=districts)
    coordinator = bearer(token(COORDINATOR, "coordinator"))
    before = {p["id"] for served in world.packets.values() for p in served.values()}
    assert len(before) == 3

    def walk(query: str, between_pages: Any = None) -> list[str]:
        seen: list[str] = []
        after = ""
        for _ in range(10):  # bounded: a cursor that goes nowhere fails, not hangs
            page = client.get(f"/v1/packets?limit=1&{query}{after}", headers=coordinator)
            assert page.status_code == 200, page.text
            seen += [p["id"] for p in page.json()["items"]]
            if page.json()["next_after"] is None:
                return seen
            if between_pages is not None and len(seen) == 1:
                between_pages(page.json()["items"][0])
            after = f"&after={page.json()['next_after']}"
        raise AssertionError(f"the walk did not end: {seen}")

    def a_new_partitioning(_: dict[str, Any]) -> None:
        ingest(client, token, ["Charlois"] * 2, start=100)
        run = client.post(
            "/v1/flagging/runs", json={"as_of": AS_OF.isoformat()}, headers=coordinator
        ).json()
        parted = client.post(
            "/v1/packets/partition", json={"run_id": run["id"]}, headers=coordinator
        )
        assert len(parted.json()["packets"]) == 1

    # Newer packets land in front of the walk: nothing it has shown comes again.
    seen = walk("", a_new_partitioning)
    assert len(seen) == len(set(seen)) == 3
    assert set(seen) == before

    def opened(packet: dict[str, Any]) -> None:
        owner = bearer(token(packet["professional_id"], "professional"))
        assert client.get(f"/v1/packets/{packet['id']}/clients", headers=owner).status_code == 200

    # A packet shown leaves the filter: none of the others is skipped.
    still_assigned = walk("status=assigned&", opened)
    assert len(still_assigned) == len(set(still_assigned)) == 4
    assert before <= set(still_assigned)

    # Shaped as a cursor, but its time lies before year 1 in UTC.
    overflow = base64.urlsafe_b64encode(f"0001-01-01T00:00:00+01:00|{uuid.UUID(int=0)}".encode())
    for cursor in ("123", "bm90IGEgY3Vyc29y", "x" * 200, overflow.decode().rstrip("=")):
        refused = client.get(f"/v1/packets?after={cursor}", headers=coordinator)
        assert refused.status_code == 422, refused.text
        assert "next_after" in refused.json()["detail"]
        assert cursor not in refused.text


def test_a_reassigned_packet_is_newly_assigned_and_one_given_to_its_owner_stays_as_it_was(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    """Status and opened_at tell what the current owner did: a packet the former owner opened
    is not 'opened' by a professional who has never seen it. A reassign to the owner (a retry)
    moves nothing and is not logged as a move, even once the owner can take no more."""
    coordinator = bearer(token("coord-001", "coordinator"))
    professional(client, coordinator, "prof-001", capacity=5)
    run_id, _ = flagged_run(app, client, session, coordinator, 3)
    [packet] = client.post(
        "/v1/packets/partition", json={"run_id": run_id}, headers=coordinator
    ).json()["packets"]
    professional(client, coordinator, "prof-002", capacity=5)
    opened = client.get(
        f"/v1/packets/{packet['id']}/clients", headers=bearer(token("prof-001", "professional"))
    )
    assert opened.status_code == 200, opened.text

    def reassign(to: str) -> dict[str, Any]:
        moved = client.post(
            f"/v1/packets/{packet['id']}/reassign",
            json={"professional_id": to},
            headers=coordinator,
        )
        assert moved.status_code == 200, moved.text
        shown: dict[str, Any] = client.get(
            f"/v1/packets/{packet['id']}", headers=coordinator
        ).json()
        assert {k: moved.json()[k] for k in ("status", "opened_at")} == {
            k: shown[k] for k in ("status", "opened_at")
        }
        return shown

    moved = reassign("prof-002")
    assert (moved["status"], moved["opened_at"]) == ("assigned", None)
    waiting = client.get("/v1/packets?status=assigned", headers=coordinator).json()["items"]
    assert [p["id"] for p in waiting] == [packet["id"]]
    new = bearer(token("prof-002", "professional"))
    assert client.get(f"/v1/packets/{packet['id']}/clients", headers=new).status_code == 200
    reopened = client.get(f"/v1/packets/{packet['id']}", headers=coordinator).json()
    assert reopened["status"] == "opened"
    assert reopened["opened_at"] is not None

    deactivated = client.post("/v1/professionals/prof-002/deactivate", headers=coordinator)
    assert deactivated.status_code == 200, deactivated.text
    again = reassign("prof-002")
    assert {k: again[k] for k in ("professional_id", "status", "opened_at")} == {
        k: reopened[k] for k in ("professional_id", "status", "opened_at")
    }
    reasons = [e["reason"] for e in log_entries(session, "packet.reassign")]
    assert reasons == ["from prof-001 to prof-002", "already with prof-002; unchanged"]


def test_a_packet_past_its_expiry_is_not_reassigned_even_before_it_is_shredded(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    coordinator = bearer(token("coord-001", "coordinator"))
    professional(client, coordinator, "prof-001")
    professional(client, coordinator, "prof-002")
    run_id, _ = flagged_run(app, client, session, coordinator, 3)
    [packet] = client.post(
        "/v1/packets/partition", json={"run_id": run_id}, headers=coordinator
    ).json()["packets"]
    table = Packet.__table__  # type: ignore[attr-defined]
    session.execute(
        update(table)
        .where(table.c.id == packet["id"])
        .values(expires_at=utcnow() - timedelta(minutes=1))
    )
    session.commit()
    other = "prof-002" if packet["professional_id"] == "prof-001" else "prof-001"

    refused = client.post(
        f"/v1/packets/{packet['id']}/reassign", json={"professional_id": other}, headers=coordinator
    )
    assert refused.status_code == 409, refused.text
    assert "expired" in refused.json()["detail"]
    [entry] = log_entries(session, "packet.reassign")
    assert (entry["outcome"], entry["actor"]) == ("denied", "coord-001")
    detail = client.get(f"/v1/packets/{packet['id']}", headers=coordinator).json()
    assert detail["professional_id"] == packet["professional_id"]


def test_a_professional_id_longer_than_any_registered_is_refused_without_echo(
    client: TestClient, token: TokenFactory, session: Session
) -> None:
    coordinator = bearer(token("coord-001", "coordinator"))
    long_id = "p" * 129
    for refused in (
        client.patch(f"/v1/professionals/{long_id}", json={"capacity": 3}, headers=coordinator),
        client.post(f"/v1/professionals/{long_id}/deactivate", headers=coordinator),
    ):
        assert refused.status_code == 422, refused.text
        assert long_id not in refused.text
    # someone without the permission still gets the logged 403, whatever the path holds
    professional_headers = bearer(token("prof-001", "professional"))
    denied = client.post(f"/v1/professionals/{long_id}/deactivate", headers=professional_headers)
    assert denied.status_code == 403, denied.text
    [entry] = log_entries(session, "professionals.manage")
    assert entry["object_id"] == "POST /v1/professionals/{professional_id}/deactivate"


@pytest.mark.parametrize(
    ("method", "url", "named"),
    [
        ("GET", "/v1/professionals?team=Zuid%001", "query.team"),
        ("GET", "/v1/professionals?after=prof%00", "query.after"),
        ("GET", "/v1/packets?professional_id=prof%00001", "query.professional_id"),
        ("PATCH", "/v1/professionals/prof%00001", "path.professional_id"),
        ("POST", "/v1/professionals/prof%00001/deactivate", "path.professional_id"),
    ],
)
def test_a_nul_in_a_professional_id_team_or_cursor_is_a_422_naming_it_on_either_database(
    client: TestClient, token: TokenFactory, method: str, url: str, named: str
) -> None:
    """PostgreSQL cannot compare a text holding NUL: it answered 422 "a value cannot be stored
    … nothing was changed" (on a GET), where SQLite answered 200 or 404 (quoting the id)."""
    coordinator = bearer(token("coord-001", "coordinator"))
    professional(client, coordinator, "prof-001")
    body = {"capacity": 3} if method == "PATCH" else None
    refused = client.request(method, url, json=body, headers=coordinator)
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"] == f"request is invalid: {named}"
    assert refused.json()["errors"][0]["msg"].endswith("must not contain NUL characters")


def test_a_professional_is_found_by_the_team_and_id_as_typed_at_registration(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    """Registration strips the spaces around an id and a team ("Zuid-2 " is stored "Zuid-2"):
    the filters and the path read what a coordinator types the same way. ``?team= Zuid-2``
    found nobody, and ``PATCH /v1/professionals/prof-002%20`` answered 404."""
    coordinator = bearer(token("coord-001", "coordinator"))
    professional(client, coordinator, " prof-001", team="Zuid-1 ")
    professional(client, coordinator, "prof-002 ", team=" Zuid-2")
    run_id, _ = flagged_run(app, client, session, coordinator, 2)
    client.post("/v1/packets/partition", json={"run_id": run_id}, headers=coordinator)

    for team, found in ((" Zuid-2", ["prof-002"]), ("Zuid-1\u00a0", ["prof-001"])):
        listed = client.get("/v1/professionals", params={"team": team}, headers=coordinator)
        assert listed.status_code == 200, listed.text
        assert [p["id"] for p in listed.json()["items"]] == found, team
    packets = client.get(
        "/v1/packets", params={"professional_id": "prof-001 "}, headers=coordinator
    )
    assert packets.status_code == 200, packets.text
    assert {p["professional_id"] for p in packets.json()["items"]} == {"prof-001"}
    patched = client.patch(
        "/v1/professionals/prof-002%20", json={"capacity": 3}, headers=coordinator
    )
    assert patched.status_code == 200, patched.text
    assert (patched.json()["id"], patched.json()["capacity"]) == ("prof-002", 3)
    deactivated = client.post("/v1/professionals/%20prof-001/deactivate", headers=coordinator)
    assert deactivated.status_code == 200, deactivated.text
    assert deactivated.json()["id"] == "prof-001"


def test_a_professional_id_with_a_slash_is_refused_at_registration(
    client: TestClient, token: TokenFactory
) -> None:
    coordinator = bearer(token("coord-001", "coordinator"))
    body = {"display_name": "X", "team": "Zuid-1", "districts": ["Charlois"], "capacity": 5}
    refused = client.post(
        "/v1/professionals", json={"id": "idp/user-7", **body}, headers=coordinator
    )
    assert refused.status_code == 422, refused.text
    assert "'/'" in refused.text
    assert client.get("/v1/professionals", headers=coordinator).json()["items"] == []
    assert (
        client.post("/v1/professionals", json={"id": "idp|user-7", **body}, headers=coordinator)
    ).status_code == 201


@pytest.mark.parametrize("typed", ["prof\u00a0001", "prof\u200b", "prof\x01001", "prof\t001"])
def test_a_professional_id_no_token_could_carry_is_refused_at_registration(
    client: TestClient, token: TokenFactory, typed: str
) -> None:
    """Sign-in refuses a ``sub`` with characters that are not printable (a no-break or
    zero-width space copied along, a control character): such a professional would be given
    packets that nobody could ever open. (Spaces around the id are stripped, as for every
    text field.)"""
    coordinator = bearer(token("coord-001", "coordinator"))
    body = {"display_name": "X", "team": "Zuid-1", "districts": ["Charlois"], "capacity": 5}
    refused = client.post("/v1/professionals", json={"id": typed, **body}, headers=coordinator)
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"] == "request is invalid: id"
    assert "token 'sub' must be printable text" in refused.text
    assert client.get("/v1/professionals", headers=coordinator).json()["items"] == []


def test_a_professional_registered_twice_at_once_is_a_409_not_a_500(
    client: TestClient, token: TokenFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    coordinator = bearer(token("coord-001", "coordinator"))
    professional(client, coordinator, "prof-001")
    # The other request's insert lands between this one's check and its insert: the check
    # sees nothing, the insert meets the row.
    real_get = Session.get

    def sees_nothing_yet(self: Session, entity: Any, ident: Any, **kwargs: Any) -> Any:
        return None if entity is Professional else real_get(self, entity, ident, **kwargs)

    monkeypatch.setattr(Session, "get", sees_nothing_yet)
    again = client.post(
        "/v1/professionals",
        json={
            "id": "prof-001",
            "display_name": "Twice",
            "team": "Zuid-1",
            "districts": ["Charlois"],
            "capacity": 5,
        },
        headers=coordinator,
    )
    assert again.status_code == 409, again.text
    assert "already exists" in again.json()["detail"]
    monkeypatch.undo()
    [kept] = client.get("/v1/professionals", headers=coordinator).json()["items"]
    assert kept["display_name"] == "Caseworker prof-001"


# A registration every field check below spoils one field of.
REGISTRATION = {
    "id": "prof-001",
    "display_name": "Caseworker",
    "team": "Zuid-1",
    "districts": ["Charlois"],
    "capacity": 5,
}


@pytest.mark.parametrize("unreadable", ["\u200b", "\u0301", " \u200b\u200c ", "-"])
def test_professional_text_without_a_letter_or_digit_is_refused_naming_the_field(
    client: TestClient, token: TokenFactory, unreadable: str
) -> None:
    """The rule a subject's district follows: a zero-width space is no district, name or team."""
    coordinator = bearer(token("coord-001", "coordinator"))
    body = REGISTRATION
    for field_name, value, loc in (
        ("display_name", unreadable, ["display_name"]),
        ("team", unreadable, ["team"]),
        ("districts", ["Charlois", unreadable], ["districts", 1]),
    ):
        refused = client.post(
            "/v1/professionals", json={**body, field_name: value}, headers=coordinator
        )
        assert refused.status_code == 422, (field_name, refused.text)
        assert refused.headers["content-type"] == "application/problem+json"
        assert [e["loc"] for e in refused.json()["errors"]] == [loc]
        assert "letter or digit" in refused.json()["errors"][0]["msg"]
    assert client.get("/v1/professionals", headers=coordinator).json()["items"] == []

    professional(client, coordinator, "prof-001")
    for field_name, value, loc in (
        ("display_name", unreadable, ["display_name"]),
        ("team", unreadable, ["team"]),
        ("districts", [unreadable], ["districts", 0]),
    ):
        refused = client.patch(
            "/v1/professionals/prof-001", json={field_name: value}, headers=coordinator
        )
        assert refused.status_code == 422, (field_name, refused.text)
        assert [e["loc"] for e in refused.json()["errors"]] == [loc]
    [kept] = client.get("/v1/professionals", headers=coordinator).json()["items"]
    assert (kept["display_name"], kept["team"], kept["districts"]) == (
        "Caseworker prof-001",
        "Zuid-1",
        ["Charlois"],
    )


@pytest.mark.parametrize("hidden", ["\u200b", "\n", "\u202e", "\x1b"])
def test_professional_text_with_a_control_or_format_character_is_refused_naming_the_field(
    client: TestClient, token: TokenFactory, hidden: str
) -> None:
    """The rule every text of a subject follows: a district with a zero-width space in it would
    never match a subject's district, so its professional would silently get no packets."""
    coordinator = bearer(token("coord-001", "coordinator"))
    body = REGISTRATION
    cases = (
        ("display_name", f"Case{hidden}worker", ["display_name"]),
        ("team", f"Zuid{hidden}1", ["team"]),
        ("districts", ["Feijenoord", f"Char{hidden}lois"], ["districts", 1]),
    )
    for field_name, value, loc in cases:
        refused = client.post(
            "/v1/professionals", json={**body, field_name: value}, headers=coordinator
        )
        assert refused.status_code == 422, (field_name, refused.text)
        assert [e["loc"] for e in refused.json()["errors"]] == [loc]
        assert "control or format characters" in refused.json()["errors"][0]["msg"]
    assert client.get("/v1/professionals", headers=coordinator).json()["items"] == []
    professional(client, coordinator, "prof-001")
    for field_name, value, loc in cases:
        refused = client.patch(
            "/v1/professionals/prof-001", json={field_name: value}, headers=coordinator
        )
        assert refused.status_code == 422, (field_name, refused.text)
        assert [e["loc"] for e in refused.json()["errors"]] == [loc]


def test_a_page_that_holds_the_last_packet_says_so_even_when_it_is_exactly_full(
    client: TestClient, token: TokenFactory
) -> None:
    districts = {"prof-001": ["Charlois"], "prof-002": ["Feijenoord"]}
    world = build_world(client, token, professionals=districts)
    count = sum(len(served) for served in world.packets.values())
    coordinator = bearer(token(COORDINATOR, "coordinator"))
    short = client.get(f"/v1/packets?limit={count - 1}", headers=coordinator).json()
    assert (len(short["items"]), short["next_after"] is None) == (count - 1, False)
    whole = client.get(f"/v1/packets?limit={count}", headers=coordinator).json()
    assert (len(whole["items"]), whole["next_after"]) == (count, None)
