"""Re-identification by the owner, follow-ups, failing closed (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text, update
from sqlmodel import Session

from service import clock
from service.access_log import service as log
from service.access_log.router import current_signer
from service.access_log.verify import verify_export
from service.auth.dependencies import Caller
from service.config import Settings
from service.crypto.envelope import seal, unwrap_key
from service.db import LOCK_WAIT_SLACK_SECONDS, Database
from service.main import create_app
from service.packets import service as packets_service
from service.packets.models import PacketClientsPublic, utcnow
from tests.conftest import TokenFactory, bearer
from tests.flagging.seed import log_entries
from tests.packets.scenario import (
    COORDINATOR,
    DAY_A,
    DAY_B,
    DAY_C,
    DAY_D,
    FOLLOWUPS,
    MEMBERS,
    NOTE,
    PACKETS,
    HeldLogLock,
    World,
    build_world,
    leaked,
)

OWNER = "prof-001"
OTHER = "prof-002"


def small_world(client: TestClient, token: TokenFactory, per_district: int = 3) -> World:
    return build_world(
        client,
        token,
        professionals={OWNER: ["Charlois"], OTHER: ["Feijenoord"]},
        per_district=per_district,
    )


def test_owner_gets_back_exactly_the_identities_that_were_ingested(
    client: TestClient, token: TokenFactory, session: Session
) -> None:
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    response = client.get(
        f"/v1/packets/{packet['id']}/clients", headers=bearer(token(OWNER, "professional"))
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["packet"]["status"] == "opened"
    assert body["packet"]["opened_at"] is not None
    clients = {c["pseudonym"]: c for c in body["clients"]}
    assert sorted(clients) == sorted(packet["pseudonyms"])
    for person in world.members(packet):
        client_view = clients[person.pseudonym]
        assert client_view["identity"] == person.identity
        assert client_view["note"] is None
        birth_year = int(person.identity["birth_date"][:4])
        assert client_view["characteristics"] == {
            **person.characteristics,
            "birth_year": birth_year,
        }
        assert client_view["flag"]["kind"] == "algorithm"
        assert client_view["flag"]["run_id"] == world.run_id
        assert [hit["rule_id"] for hit in client_view["flag"]["hits"]] == ["relapse"]
        assert "came back to welfare" in client_view["flag"]["explanation"]
        assert client_view["followups"] == []
    # nobody else's client is in it
    other = world.packet(OTHER, "Feijenoord")
    assert leaked(response.text, {s for p in world.members(other) for s in p.secrets}) == []

    opened = log_entries(session, "packet.open")
    assert len(opened) == 1
    assert opened[0]["outcome"] == "allowed"
    assert opened[0]["actor"] == OWNER
    assert sorted(opened[0]["pseudonyms"]) == sorted(packet["pseudonyms"])
    assert leaked(str(log_entries(session)), world.secrets) == []


def test_opened_at_is_the_first_open_and_later_opens_leave_it(
    client: TestClient, token: TokenFactory, session: Session
) -> None:
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    owner = bearer(token(OWNER, "professional"))
    url = f"/v1/packets/{packet['id']}/clients"
    first, again = (client.get(url, headers=owner).json()["packet"] for _ in range(2))
    assert first["status"] == again["status"] == "opened"
    assert again["opened_at"] == first["opened_at"]
    metadata = client.get(f"/v1/packets/{packet['id']}", headers=owner).json()
    assert metadata["opened_at"] == first["opened_at"]
    assert [e["outcome"] for e in log_entries(session, "packet.open")] == ["allowed"] * 2


def test_non_owners_get_404_and_each_attempt_is_logged_as_denied(
    client: TestClient, token: TokenFactory, session: Session
) -> None:
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    callers = [
        (OTHER, "professional"),
        (COORDINATOR, "coordinator"),
        ("auditor-001", "auditor"),
        ("source-welfare", "source"),
        ("analyst-001", "analyst"),
        ("admin-001", "admin"),
    ]
    for sub, role in callers:
        response = client.get(
            f"/v1/packets/{packet['id']}/clients", headers=bearer(token(sub, role))
        )
        assert response.status_code == 404, (role, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert leaked(response.text, world.secrets) == []
    missing = client.get(
        f"/v1/packets/{uuid.uuid4()}/clients", headers=bearer(token(OWNER, "professional"))
    )
    assert missing.status_code == 404

    denied = log_entries(session, "packet.open")
    assert [(e["actor"], e["outcome"]) for e in denied] == [
        *((sub, "denied") for sub, _ in callers),
        (OWNER, "denied"),
    ]
    assert {e["reason"] for e in denied[:-1]} == {"not the packet's owner"}
    assert denied[-1]["reason"] == "no such packet"
    status = session.execute(select(PACKETS.c.status).where(PACKETS.c.id == packet["id"])).scalar()
    session.rollback()
    assert status == "assigned"


# A request each packet route cannot take as sent: (action, method, path under the packet,
# what is wrong with it, the body). ``{member}`` is a client of the packet.
CANNOT_TAKE = [
    ("packet.open", "GET", "/clients?stray=1", None),
    ("packet.read", "GET", "?status=open&status=closed", None),
    ("followup.create", "POST", "/clients/{member}/followups", {"kind": "contact", "x": 1}),
    ("followup.create", "POST", "/clients/{member}/followups", b'{"kind": '),
    ("followup.create", "POST", "/clients/{member}/followups", {"kind": "contact"}),
    ("followup.create", "POST", "/clients/{member}/followups?stray=1", {"kind": "contact"}),
    ("packet.close", "POST", "/close", {"force": True}),
    ("packet.reassign", "POST", "/reassign", {"professional_id": OTHER, "force": True}),
    ("packet.reassign", "POST", "/reassign", b"\xff\xfe"),
]


@pytest.mark.parametrize(
    ("action", "method", "path", "body"),
    CANNOT_TAKE,
    ids=[
        "open-unknown-query",
        "read-repeated-query",
        "followup-unknown-field",
        "followup-not-json",
        "followup-missing-field",
        "followup-unknown-query",
        "close-with-a-body",
        "reassign-unknown-field",
        "reassign-not-utf8",
    ],
)
def test_a_request_a_packet_route_cannot_take_is_the_logged_404_for_whom_it_hides_the_packet(
    client: TestClient,
    token: TokenFactory,
    session: Session,
    action: str,
    method: str,
    path: str,
    body: dict[str, Any] | bytes | None,
) -> None:
    """Whoever may not act on a packet gets its logged 404 whatever else is wrong with the
    request (a 422 would say nothing of the packet, but kept the attempt out of the log);
    whoever may gets the 422, and no entry is written for it."""
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    url = f"/v1/packets/{packet['id']}" + path.format(member=packet["pseudonyms"][0])
    raw = isinstance(body, bytes)
    payload: dict[str, Any] = {"content": body} if raw else {"json": body}
    json_type = {"Content-Type": "application/json"} if raw else {}

    def send(sub: str, role: str) -> Any:
        headers = bearer(token(sub, role)) | json_type
        return client.request(method, url, headers=headers, **payload)

    hidden_from = [(OTHER, "professional"), ("auditor-001", "auditor")]
    before = len(log_entries(session))
    for sub, role in hidden_from:
        response = send(sub, role)
        assert response.status_code == 404, (sub, response.text)
        assert response.json()["detail"] == f"no packet {packet['id']} for this caller"
    entries = log_entries(session)[before:]
    # the auditor, not the owner either, is refused metadata before ownership is looked at
    auditors_reason = "lacks packets.read" if action == "packet.read" else "not the packet's owner"
    assert [(e["actor"], e["action"], e["outcome"], e["reason"]) for e in entries] == [
        (OTHER, action, "denied", "not the packet's owner"),
        ("auditor-001", action, "denied", auditors_reason),
    ]
    assert all(e["object_id"] == packet["id"] for e in entries)
    assert all(sorted(e["pseudonyms"]) == sorted(packet["pseudonyms"]) for e in entries)

    admitted = (
        (COORDINATOR, "coordinator") if action == "packet.reassign" else (OWNER, "professional")
    )
    response = send(*admitted)
    assert response.status_code == 422, response.text
    assert len(log_entries(session)) == before + len(hidden_from)


def test_a_packet_that_does_not_exist_is_the_logged_404_before_the_input_is_judged(
    client: TestClient, token: TokenFactory, session: Session
) -> None:
    small_world(client, token)
    missing = str(uuid.uuid4())
    for sub, role in ((OWNER, "professional"), (COORDINATOR, "coordinator")):
        response = client.get(f"/v1/packets/{missing}?stray=1", headers=bearer(token(sub, role)))
        assert response.status_code == 404, response.text
    denied = [e for e in log_entries(session, "packet.read") if e["outcome"] == "denied"]
    assert [(e["actor"], e["object_id"], e["reason"]) for e in denied] == [
        (OWNER, missing, "no such packet"),
        (COORDINATOR, missing, "no such packet"),
    ]
    assert all(e["pseudonyms"] == [] for e in denied)


def test_a_hidden_packets_404_the_log_cannot_take_is_a_503_and_writes_nothing(
    token: TokenFactory, db_url: str, home: Path, session: Session
) -> None:
    bounded = Settings(env="test", home=home, database_url=db_url, log_lock_timeout_seconds=0.5)
    database = Database(bounded)
    try:
        with TestClient(create_app(bounded, database=database)) as client:
            world = small_world(client, token)
            url = f"/v1/packets/{world.packet(OWNER, 'Charlois')['id']}/clients?stray=1"
            other = bearer(token(OTHER, "professional"))
            before = len(log_entries(session))
            with HeldLogLock(db_url):
                response = client.get(url, headers=other)
            assert response.status_code == 503, response.text
            assert len(log_entries(session)) == before
            assert client.get(url, headers=other).status_code == 404
            assert len(log_entries(session)) == before + 1
    finally:
        database.dispose()


@pytest.mark.parametrize("role", ["analyst", None])
def test_the_owners_id_under_a_role_without_the_permission_gets_the_logged_404(
    client: TestClient, token: TokenFactory, session: Session, role: str | None
) -> None:
    # A packet is its owner's by the token's `sub`, but what the caller may do with it comes
    # from their roles: the same id under a role that grants nothing on packets (an identity
    # provider's account reused for analysis, or one whose roles were withdrawn) is refused
    # like anyone else, and every refusal is logged with why.
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    member = packet["pseudonyms"][0]
    headers = bearer(token(OWNER, *([role] if role else [])))
    before = len(log_entries(session))
    attempts = {
        "packet.read": client.get(f"/v1/packets/{packet['id']}", headers=headers),
        "packet.open": client.get(f"/v1/packets/{packet['id']}/clients", headers=headers),
        "followup.create": client.post(
            f"/v1/packets/{packet['id']}/clients/{member}/followups",
            json={"kind": "contact", "date": DAY_A},
            headers=headers,
        ),
        "packet.close": client.post(f"/v1/packets/{packet['id']}/close", headers=headers),
    }
    for action, response in attempts.items():
        assert response.status_code == 404, (action, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert leaked(response.text, world.secrets) == []
    entries = log_entries(session)[before:]
    assert [(e["action"], e["actor"], e["outcome"], e["reason"]) for e in entries] == [
        ("packet.read", OWNER, "denied", "lacks packets.read"),
        ("packet.open", OWNER, "denied", "lacks packets.open"),
        ("followup.create", OWNER, "denied", "lacks followups.write"),
        ("packet.close", OWNER, "denied", "lacks packets.close"),
    ]
    assert all(sorted(e["pseudonyms"]) == sorted(packet["pseudonyms"]) for e in entries)
    state = session.execute(
        select(PACKETS.c.status, PACKETS.c.opened_at).where(PACKETS.c.id == packet["id"])
    ).one()
    followups = session.execute(
        select(func.count()).select_from(FOLLOWUPS).where(FOLLOWUPS.c.packet_id == packet["id"])
    ).scalar()
    session.rollback()
    assert (state.status, state.opened_at, followups) == ("assigned", None, 0)


def test_ids_of_another_shape_are_refused_before_anything_reaches_the_log(
    client: TestClient, token: TokenFactory, session: Session
) -> None:
    # The log can never be erased: a path parameter it would record as an object id must not
    # carry free text, such as a name and BSN pasted into the URL by mistake.
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    member = packet["pseudonyms"][0]
    pasted = "Jan Jansen 123456782"
    owner = bearer(token(OWNER, "professional"))
    coordinator = bearer(token(COORDINATOR, "coordinator"))
    admin = bearer(token("admin-001", "admin"))
    followup = {"kind": "contact", "date": DAY_A}
    before = len(log_entries(session))
    attempts = [
        client.get(f"/v1/packets/{pasted}/clients", headers=owner),
        client.get(f"/v1/packets/{packet['id'].upper()}", headers=coordinator),
        client.get(f"/v1/packets/{'a' * 20_000}", headers=coordinator),
        client.post(f"/v1/packets/{pasted}/close", headers=owner),
        client.post(
            f"/v1/packets/{pasted}/reassign", json={"professional_id": OTHER}, headers=coordinator
        ),
        client.post(
            f"/v1/packets/{packet['id']}/clients/{pasted}/followups", json=followup, headers=owner
        ),
        client.post(
            f"/v1/packets/{pasted}/clients/{member}/followups", json=followup, headers=owner
        ),
        client.post(f"/v1/subjects/{pasted}/erase", headers=admin),
    ]
    for response in attempts:
        assert response.status_code == 422, (response.request.url, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert "123456782" not in response.json()["detail"]
    assert len(log_entries(session)) == before


def test_followups_are_recorded_with_a_note_only_the_owner_reads(
    app: Any, client: TestClient, token: TokenFactory, session: Session
) -> None:
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    pseudonym = packet["pseudonyms"][0]
    owner = bearer(token(OWNER, "professional"))
    url = f"/v1/packets/{packet['id']}/clients/{pseudonym}/followups"

    created = client.post(
        url,
        json={"kind": "appointment", "date": DAY_C, "outcome_code": "planned", "note": NOTE},
        headers=owner,
    )
    assert created.status_code == 201, created.text
    assert created.json()["note"] == NOTE
    outcome = client.post(
        url,
        json={"kind": "outcome", "date": DAY_D, "outcome_code": "support_accepted"},
        headers=owner,
    )
    assert outcome.status_code == 201, outcome.text

    pasted = "Jan Jansen 123456782"
    for wrong, field in (
        ({"kind": "outcome", "date": DAY_D}, "outcome_code"),
        ({"kind": "contact", "date": DAY_D, "outcome_code": pasted}, "outcome_code"),
        ({"kind": "contact", "date": DAY_D, "outcome_code": "attended"}, "outcome_code"),
        ({"kind": "visit", "date": DAY_D}, "kind"),
        ({"kind": "contact", "date": DAY_D, "extra": 1}, "unknown field"),
    ):
        refused = client.post(url, json=wrong, headers=owner)
        assert refused.status_code == 422, (wrong, refused.text)
        assert field in refused.text
        assert "123456782" not in refused.text
    not_a_member = client.post(
        f"/v1/packets/{packet['id']}/clients/{'0' * 32}/followups",
        json={"kind": "contact", "date": DAY_D},
        headers=owner,
    )
    assert not_a_member.status_code == 404
    intruder = client.post(
        url,
        json={"kind": "contact", "date": DAY_D, "note": "x"},
        headers=bearer(token(OTHER, "professional")),
    )
    assert intruder.status_code == 404

    # the note is stored sealed, bound to its row
    sealed = [
        str(ciphertext)
        for ciphertext in session.execute(select(FOLLOWUPS.c.note_ciphertext)).scalars()
        if ciphertext is not None
    ]
    session.rollback()
    assert len(sealed) == 1
    assert sealed[0].startswith("v1.")
    assert NOTE not in sealed[0]

    opened = client.get(f"/v1/packets/{packet['id']}/clients", headers=owner).json()
    followups = {c["pseudonym"]: c["followups"] for c in opened["clients"]}[pseudonym]
    assert [(f["kind"], f["outcome_code"], f["note"]) for f in followups] == [
        ("appointment", "planned", NOTE),
        ("outcome", "support_accepted", None),
    ]

    # case-management systems read kinds, dates and outcome codes, never the note
    for sub, role in (
        (COORDINATOR, "coordinator"),
        ("source-welfare", "source"),
        (OWNER, "professional"),
    ):
        metadata = client.get(f"/v1/packets/{packet['id']}", headers=bearer(token(sub, role)))
        assert metadata.status_code == 200
        member = {m["pseudonym"]: m for m in metadata.json()["members"]}[pseudonym]
        assert [(f["kind"], f["date"], f["outcome_code"]) for f in member["followups"]] == [
            ("appointment", DAY_C, "planned"),
            ("outcome", DAY_D, "support_accepted"),
        ]
        assert "note" not in member["followups"][0]
        assert leaked(metadata.text, world.secrets) == []

    entries = log_entries(session, "followup.create")
    # The outcome codes the policy refuses are refusals on the packet, logged as denied with the
    # vocabulary's words only (a malformed body never reaches the packet, nor the log).
    assert [(e["actor"], e["outcome"], e["reason"]) for e in entries] == [
        (OWNER, "allowed", entries[0]["reason"]),
        (OWNER, "allowed", entries[1]["reason"]),
        (OWNER, "denied", "a follow-up of kind 'outcome' needs an outcome_code"),
        (
            OWNER,
            "denied",
            "outcome_code is not in the vocabulary (policies/followups.yaml); for kind "
            "'contact' use one of: moved_away, not_reached, reached",
        ),
        (OWNER, "denied", "outcome_code 'attended' is for appointment, not 'contact'"),
        (OWNER, "denied", "not a client of the packet"),
        (OTHER, "denied", "not the packet's owner"),
    ]
    assert all(e["pseudonyms"] == [pseudonym] for e in entries[:5])
    assert entries[5]["pseudonyms"] == ["0" * 32]
    assert "123456782" not in str(entries)
    assert leaked(str(log_entries(session)), world.secrets) == []


def test_a_followup_for_a_client_of_another_packet_is_refused_as_not_a_client(
    client: TestClient, token: TokenFactory, session: Session
) -> None:
    # A pseudonym is found in the caller's own packet or not at all: one of another packet's
    # clients is no client of theirs (and its answer must not tell that the pseudonym exists).
    world = small_world(client, token)
    mine, theirs = world.packet(OWNER, "Charlois"), world.packet(OTHER, "Feijenoord")
    owner = bearer(token(OWNER, "professional"))
    answers = [
        client.post(
            f"/v1/packets/{mine['id']}/clients/{pseudonym}/followups",
            json={"kind": "contact", "date": DAY_B, "note": NOTE},
            headers=owner,
        )
        for pseudonym in (theirs["pseudonyms"][0], "0" * 32)
    ]
    assert [a.status_code for a in answers] == [404, 404], answers[0].text
    assert answers[0].json()["detail"] == answers[1].json()["detail"]
    stored = session.execute(select(func.count()).select_from(FOLLOWUPS)).scalar_one()
    session.rollback()
    assert stored == 0
    entries = log_entries(session, "followup.create")
    assert [(e["outcome"], e["reason"], e["pseudonyms"]) for e in entries] == [
        ("denied", "not a client of the packet", [theirs["pseudonyms"][0]]),
        ("denied", "not a client of the packet", ["0" * 32]),
    ]


def test_an_erased_member_comes_back_as_erased_without_failing_the_packet(
    client: TestClient, token: TokenFactory, session: Session
) -> None:
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    erased, *kept = packet["pseudonyms"]
    owner = bearer(token(OWNER, "professional"))
    client.post(
        f"/v1/packets/{packet['id']}/clients/{erased}/followups",
        json={"kind": "contact", "date": DAY_B, "outcome_code": "reached", "note": NOTE},
        headers=owner,
    )
    response = client.post(
        f"/v1/subjects/{erased}/erase", headers=bearer(token("admin-001", "admin"))
    )
    assert response.status_code == 200, response.text

    wrapped_dek = session.execute(
        select(MEMBERS.c.wrapped_dek).where(MEMBERS.c.pseudonym == erased)
    ).scalar_one()
    note = session.execute(select(FOLLOWUPS.c.note_ciphertext, FOLLOWUPS.c.outcome_code)).one()
    session.rollback()
    assert wrapped_dek is None
    assert tuple(note) == (None, "reached")

    opened = client.get(f"/v1/packets/{packet['id']}/clients", headers=owner)
    assert opened.status_code == 200, opened.text
    clients = {c["pseudonym"]: c for c in opened.json()["clients"]}
    assert clients[erased]["identity"] is None
    assert clients[erased]["note"] == "erased"
    assert clients[erased]["followups"][0]["note"] is None
    assert clients[erased]["followups"][0]["outcome_code"] == "reached"
    for pseudonym in kept:
        assert clients[pseudonym]["identity"] == world.people[pseudonym].identity
    assert leaked(opened.text, set(world.people[erased].secrets) | {NOTE}) == []
    assert sorted(log_entries(session, "packet.open")[-1]["pseudonyms"]) == sorted(kept)
    assert (
        client.post(
            f"/v1/packets/{packet['id']}/clients/{erased}/followups",
            json={"kind": "contact", "date": DAY_B},
            headers=owner,
        ).status_code
        == 410
    )
    refusal = log_entries(session, "followup.create")[-1]
    assert (refusal["actor"], refusal["outcome"], refusal["reason"]) == (
        OWNER,
        "denied",
        "client was erased",
    )
    assert refusal["pseudonyms"] == [erased]


def _swap(session: Session, table: Any, columns: tuple[str, ...], key: str, a: Any, b: Any) -> None:
    """Swap ``columns`` between the rows whose ``key`` is ``a`` and ``b``, as someone with write
    access to the database could."""
    rows = {
        row[0]: row[1:]
        for row in session.execute(
            select(table.c[key], *(table.c[c] for c in columns)).where(table.c[key].in_([a, b]))
        ).all()
    }
    for this, that in ((a, b), (b, a)):
        session.execute(
            update(table)
            .where(table.c[key] == this)
            .values(dict(zip(columns, rows[that], strict=True)))
        )
    session.commit()


def test_a_note_moved_to_another_client_is_withheld_not_shown_under_them(
    client: TestClient, token: TokenFactory, session: Session, caplog: pytest.LogCaptureFixture
) -> None:
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    one, two, *_rest = packet["pseudonyms"]
    owner = bearer(token(OWNER, "professional"))
    notes = {one: "about ONE: debts with the landlord", two: "about TWO: a new job"}
    for pseudonym, note in notes.items():
        created = client.post(
            f"/v1/packets/{packet['id']}/clients/{pseudonym}/followups",
            json={"kind": "contact", "date": DAY_B, "outcome_code": "reached", "note": note},
            headers=owner,
        )
        assert created.status_code == 201, created.text
    ids = {
        pseudonym: session.execute(
            select(FOLLOWUPS.c.id).where(FOLLOWUPS.c.pseudonym == pseudonym)
        ).scalar_one()
        for pseudonym in notes
    }
    # The rows' clients swapped, each ciphertext left where it was written.
    _swap(session, FOLLOWUPS, ("pseudonym", "subject_id"), "id", ids[one], ids[two])

    opened = client.get(f"/v1/packets/{packet['id']}/clients", headers=owner)
    assert opened.status_code == 200, opened.text
    clients = {c["pseudonym"]: c for c in opened.json()["clients"]}
    for pseudonym in notes:
        (followup,) = clients[pseudonym]["followups"]
        assert (followup["note"], followup["note_unreadable"]) == (None, True)
        assert followup["outcome_code"] == "reached"
    for pseudonym in packet["pseudonyms"]:
        assert clients[pseudonym]["identity"] == world.people[pseudonym].identity
    assert all(note not in opened.text for note in notes.values())
    assert f"follow-up {ids[one]}" in caplog.text
    assert all(note not in caplog.text for note in notes.values())

    # Put back where they were written, both read again.
    _swap(session, FOLLOWUPS, ("pseudonym", "subject_id"), "id", ids[one], ids[two])
    opened = client.get(f"/v1/packets/{packet['id']}/clients", headers=owner).json()
    shown = {c["pseudonym"]: c["followups"][0] for c in opened["clients"] if c["followups"]}
    assert {p: (f["note"], f["note_unreadable"]) for p, f in shown.items()} == {
        p: (note, False) for p, note in notes.items()
    }


def test_a_note_written_before_notes_named_their_client_still_opens(
    app: Any, client: TestClient, token: TokenFactory, session: Session
) -> None:
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    pseudonym = packet["pseudonyms"][0]
    owner = bearer(token(OWNER, "professional"))
    created = client.post(
        f"/v1/packets/{packet['id']}/clients/{pseudonym}/followups",
        json={"kind": "contact", "date": DAY_B, "note": NOTE},
        headers=owner,
    ).json()
    sealed_key = session.execute(
        select(PACKETS.c.wrapped_key).where(PACKETS.c.id == packet["id"])
    ).scalar_one()
    packet_key = unwrap_key(
        app.state.keyring, "packet", sealed_key, aad=packets_service.packet_key_aad(packet["id"])
    )
    row = FOLLOWUPS.c.id == created["id"]

    def shown() -> tuple[str | None, bool]:
        opened = client.get(f"/v1/packets/{packet['id']}/clients", headers=owner).json()
        (followup,) = next(c for c in opened["clients"] if c["pseudonym"] == pseudonym)["followups"]
        return followup["note"], followup["note_unreadable"]

    # As written before the upgrade: bound to its follow-up and packet, no binding recorded.
    old_placement = {
        "table": "packet_followups",
        "column": "note_ciphertext",
        "row": created["id"],
        "packet": packet["id"],
    }
    old = seal(packet_key, b"written before the upgrade", aad=old_placement)
    session.execute(update(FOLLOWUPS).where(row).values(note_ciphertext=old, note_binding=None))
    session.commit()
    assert shown() == ("written before the upgrade", False)

    # A note bound to its client is not loosened by erasing its binding, nor by an unknown one.
    bound = seal(
        packet_key,
        b"bound",
        aad=packets_service.note_aad(
            created["id"],
            packet["id"],
            session.execute(select(FOLLOWUPS.c.subject_id).where(row)).scalar_one(),
            pseudonym,
            binding=packets_service.NOTE_BOUND_TO_CLIENT,
        ),
    )
    for binding, expected in ((None, (None, True)), (7, (None, True)), (2, ("bound", False))):
        session.execute(
            update(FOLLOWUPS).where(row).values(note_ciphertext=bound, note_binding=binding)
        )
        session.commit()
        assert shown() == expected, binding


def test_a_member_wrap_moved_to_another_member_withholds_those_identities_alone(
    client: TestClient, token: TokenFactory, session: Session, caplog: pytest.LogCaptureFixture
) -> None:
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    one, two, *rest = packet["pseudonyms"]
    assert rest
    owner = bearer(token(OWNER, "professional"))
    _swap(session, MEMBERS, ("wrapped_dek",), "pseudonym", one, two)

    opened = client.get(f"/v1/packets/{packet['id']}/clients", headers=owner)
    assert opened.status_code == 200, opened.text
    clients = {c["pseudonym"]: c for c in opened.json()["clients"]}
    for pseudonym in (one, two):
        assert (clients[pseudonym]["identity"], clients[pseudonym]["note"]) == (None, "unreadable")
    for pseudonym in rest:
        assert clients[pseudonym]["identity"] == world.people[pseudonym].identity
        assert clients[pseudonym]["note"] is None
    assert (
        leaked(opened.text, set(world.people[one].secrets) | set(world.people[two].secrets)) == []
    )
    assert f"an identity in packet {packet['id']} failed its integrity check" in caplog.text
    PacketClientsPublic.model_validate_json(opened.text)


def test_a_packet_whose_key_is_gone_is_refused_and_logged_whatever_its_status_says(
    client: TestClient, token: TokenFactory, session: Session
) -> None:
    # The key wrap is what makes a packet usable: a row that lost it (a shred cut short by hand,
    # a restore that left it out) is as gone as a shredded packet, even though its status still
    # says assigned. Every use is a logged 410, and nothing is recorded under it.
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    member = packet["pseudonyms"][0]
    session.execute(update(PACKETS).where(PACKETS.c.id == packet["id"]).values(wrapped_key=None))
    session.commit()
    owner = bearer(token(OWNER, "professional"))
    before = len(log_entries(session))

    answers = {
        "packet.open": client.get(f"/v1/packets/{packet['id']}/clients", headers=owner),
        "followup.create": client.post(
            f"/v1/packets/{packet['id']}/clients/{member}/followups",
            json={"kind": "contact", "date": DAY_B},
            headers=owner,
        ),
        "packet.close": client.post(f"/v1/packets/{packet['id']}/close", headers=owner),
    }
    for action, response in answers.items():
        assert response.status_code == 410, (action, response.text)
        assert leaked(response.text, world.secrets) == []
    entries = log_entries(session)[before:]
    assert [(e["action"], e["outcome"], e["reason"]) for e in entries] == [
        (action, "denied", "packet is expired") for action in answers
    ]
    state = session.execute(
        select(PACKETS.c.status, PACKETS.c.opened_at).where(PACKETS.c.id == packet["id"])
    ).one()
    followups = session.execute(
        select(func.count()).select_from(FOLLOWUPS).where(FOLLOWUPS.c.packet_id == packet["id"])
    ).scalar()
    session.rollback()
    assert (state.status, state.opened_at, followups) == ("assigned", None, 0)


def with_a_damaged_key(session: Session, world: World) -> dict[str, Any]:
    """The owner's packet, with the other packet's key wrap copied onto its row: a restore
    gone wrong, or tampering."""
    packet, other = world.packet(OWNER, "Charlois"), world.packet(OTHER, "Feijenoord")
    moved = session.execute(
        select(PACKETS.c.wrapped_key).where(PACKETS.c.id == other["id"])
    ).scalar_one()
    session.execute(update(PACKETS).where(PACKETS.c.id == packet["id"]).values(wrapped_key=moved))
    session.commit()
    return packet


def test_a_packet_key_that_fails_its_check_is_a_clear_problem_for_whatever_needs_it(
    client: TestClient, token: TokenFactory, session: Session, caplog: pytest.LogCaptureFixture
) -> None:
    world = small_world(client, token)
    packet = with_a_damaged_key(session, world)
    owner = bearer(token(OWNER, "professional"))
    followups = f"/v1/packets/{packet['id']}/clients/{packet['pseudonyms'][0]}/followups"
    damaged = f"the key of packet {packet['id']} failed its integrity check"
    secrets = {secret for p in packet["pseudonyms"] for secret in world.people[p].secrets}

    answers = [
        client.post(
            followups, json={"kind": "contact", "date": DAY_B, "note": NOTE}, headers=owner
        ),
        client.post(
            followups,
            json={"kind": "contact", "date": DAY_B},
            headers={**owner, "Idempotency-Key": "retry-1"},
        ),
        client.get(f"/v1/packets/{packet['id']}/clients", headers=owner),
    ]
    for answer in answers:
        assert answer.status_code == 500, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.json()["detail"].startswith(damaged)
        assert leaked(answer.text, secrets) == []
    assert session.execute(select(func.count()).select_from(FOLLOWUPS)).scalar_one() == 0
    session.rollback()
    assert caplog.text.count(damaged) == 3
    # The open was logged as allowed before its key was tried; a second entry says that
    # nothing was shown (the follow-ups rolled back with their entries).
    opens = log_entries(session, "packet.open")
    assert [(e["actor"], e["outcome"], e["reason"]) for e in opens] == [
        (OWNER, "allowed", None),
        (OWNER, "denied", "the packet key failed its integrity check; nothing was shown"),
    ]
    assert opens[0]["request_id"] == opens[1]["request_id"]
    assert sorted(opens[1]["pseudonyms"]) == sorted(packet["pseudonyms"])
    assert log_entries(session, "followup.create") == []
    # A follow-up without a note needs no key: it is recorded.
    plain = client.post(followups, json={"kind": "contact", "date": DAY_B}, headers=owner)
    assert plain.status_code == 201, plain.text


def test_an_unrevealed_open_the_log_cannot_take_stays_a_500_and_the_server_log_says_so(
    client: TestClient,
    token: TokenFactory,
    session: Session,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world = small_world(client, token)
    packet = with_a_damaged_key(session, world)

    def busy(*_args: object, **_kwargs: object) -> None:
        raise log.LogUnavailable("the access log is busy")

    monkeypatch.setattr(packets_service, "_deny", busy)
    opened = client.get(
        f"/v1/packets/{packet['id']}/clients", headers=bearer(token(OWNER, "professional"))
    )
    # still the damaged key's 500, not a 503 inviting a retry that cannot succeed
    assert opened.status_code == 500, opened.text
    assert opened.json()["detail"].startswith(f"the key of packet {packet['id']}")
    assert f"could not log that the open of packet {packet['id']} showed nothing" in caplog.text
    assert [e["outcome"] for e in log_entries(session, "packet.open")] == ["allowed"]


def test_a_note_is_kept_as_written_and_a_blank_one_is_no_note(
    client: TestClient, token: TokenFactory
) -> None:
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    pseudonym = packet["pseudonyms"][0]
    owner = bearer(token(OWNER, "professional"))
    url = f"/v1/packets/{packet['id']}/clients/{pseudonym}/followups"
    written = "  - rent arrears\n  - debt counselling\n"
    for note, kept in ((written, written), (" \n\t ", None)):
        created = client.post(
            url, json={"kind": "contact", "date": DAY_B, "note": note}, headers=owner
        )
        assert created.status_code == 201, created.text
        assert created.json()["note"] == kept
    opened = client.get(f"/v1/packets/{packet['id']}/clients", headers=owner).json()
    (client_view,) = [c for c in opened["clients"] if c["pseudonym"] == pseudonym]
    assert [f["note"] for f in client_view["followups"]] == [written, None]


def test_a_followup_sent_again_under_its_idempotency_key_is_recorded_once(
    client: TestClient, token: TokenFactory, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    one, two, *_ = packet["pseudonyms"]
    owner = bearer(token(OWNER, "professional"))

    def url(pseudonym: str) -> str:
        return f"/v1/packets/{packet['id']}/clients/{pseudonym}/followups"

    body = {"kind": "outcome", "date": DAY_D, "outcome_code": "support_accepted", "note": NOTE}
    keyed = {**owner, "Idempotency-Key": "retry-7f3a"}
    first = client.post(url(one), json=body, headers=keyed)
    again = client.post(url(one), json=body, headers=keyed)
    assert (first.status_code, again.status_code) == (201, 201), again.text
    assert again.json() == first.json()
    stored = session.execute(
        select(FOLLOWUPS.c.id, FOLLOWUPS.c.request_digest, FOLLOWUPS.c.idempotency_key)
    ).all()
    session.rollback()
    assert [(r.id, r.idempotency_key) for r in stored] == [(first.json()["id"], "retry-7f3a")]
    assert NOTE not in str(stored)

    # The key with another request: refused, logged, nothing stored.
    for pseudonym, changed in (
        (one, {**body, "note": "another note"}),
        (one, {**body, "outcome_code": "support_declined"}),
        (two, body),
    ):
        refused = client.post(url(pseudonym), json=changed, headers=keyed)
        assert refused.status_code == 409, refused.text
        assert "different follow-up" in refused.json()["detail"]
    # Without a key, a request sent again records a second follow-up.
    assert client.post(url(two), json=body, headers=owner).status_code == 201
    assert client.post(url(two), json=body, headers=owner).status_code == 201
    entries = log_entries(session, "followup.create")
    assert [(e["outcome"], e["reason"]) for e in entries[:2]] == [
        ("allowed", f"followup {first.json()['id']}; kind outcome; outcome support_accepted"),
        ("allowed", f"followup {first.json()['id']}; sent again, not recorded twice"),
    ]
    assert [e["outcome"] for e in entries[2:5]] == ["denied"] * 3
    assert "retry-7f3a" not in str(log_entries(session))
    opened = client.get(f"/v1/packets/{packet['id']}/clients", headers=owner).json()
    counts = {c["pseudonym"]: len(c["followups"]) for c in opened["clients"]}
    assert (counts[one], counts[two]) == (1, 2)

    # Two requests with one new key at once (for two packets: those for one packet take its
    # lock in turn): the one whose look-up came before the other's commit meets it at the unique
    # key, and is refused as any request under a key used for another follow-up.
    session.execute(
        FOLLOWUPS.insert().values(
            id=uuid.uuid4().hex,
            packet_id=packet["id"],
            subject_id=session.execute(
                select(FOLLOWUPS.c.subject_id).where(FOLLOWUPS.c.pseudonym == one)
            ).scalar(),
            pseudonym=one,
            kind="contact",
            date=date.fromisoformat(DAY_D),
            created_by=OWNER,
            created_at=utcnow(),
            idempotency_key="race-1",
            request_digest="0" * 64,
        )
    )
    session.commit()
    real_execute = Session.execute

    class _NotYetThere:
        def first(self) -> None:
            return None

    looked_up: list[str] = []

    def before_the_other_commits(self: Session, statement: Any, *args: Any, **kwargs: Any) -> Any:
        sql = str(statement)
        if sql.startswith("SELECT") and "request_digest" in sql and not looked_up:
            looked_up.append(sql)  # the first look-up, before the other request committed
            return _NotYetThere()
        return real_execute(self, statement, *args, **kwargs)

    monkeypatch.setattr(Session, "execute", before_the_other_commits)
    raced = client.post(url(one), json=body, headers={**owner, "Idempotency-Key": "race-1"})
    monkeypatch.undo()
    assert looked_up
    assert raced.status_code == 409, raced.text
    assert "different follow-up" in raced.json()["detail"]
    assert session.execute(select(func.count()).select_from(FOLLOWUPS)).scalar() == 4
    refusal = log_entries(session, "followup.create")[-1]
    assert (refusal["outcome"], refusal["reason"]) == (
        "denied",
        "Idempotency-Key used for another follow-up",
    )
    # Non-ASCII is refused rather than stored garbled (a header arrives as Latin-1).
    for key in ("é" * 10, "", "x" * 129):
        headers: dict[str, Any] = {**owner, "Idempotency-Key": key.encode()}
        refused = client.post(url(one), json=body, headers=headers)
        assert refused.status_code == 422, (key, refused.text)
        assert "Idempotency-Key" in refused.text


def test_an_idempotency_key_is_the_callers_own_another_professionals_same_key_is_theirs(
    client: TestClient, token: TokenFactory, session: Session
) -> None:
    # Keys are chosen by clients ("retry-1"): two professionals picking the same one must not
    # meet each other's follow-ups, neither refused because of the other's nor answered with it.
    world = small_world(client, token)
    mine, theirs = world.packet(OWNER, "Charlois"), world.packet(OTHER, "Feijenoord")
    body = {"kind": "contact", "date": DAY_B, "outcome_code": "reached", "note": NOTE}
    answers: dict[str, set[str]] = {}
    for sub, packet in ((OWNER, mine), (OTHER, theirs), (OWNER, mine), (OTHER, theirs)):
        answer = client.post(
            f"/v1/packets/{packet['id']}/clients/{packet['pseudonyms'][0]}/followups",
            json=body,
            headers={**bearer(token(sub, "professional")), "Idempotency-Key": "retry-1"},
        )
        assert answer.status_code == 201, (sub, answer.text)
        assert answer.json()["created_by"] == sub
        answers.setdefault(sub, set()).add(answer.json()["id"])
    # One follow-up each, answered again under the same key, none shared.
    assert [len(ids) for ids in answers.values()] == [1, 1]
    assert answers[OWNER].isdisjoint(answers[OTHER])
    stored = session.execute(
        select(FOLLOWUPS.c.packet_id, FOLLOWUPS.c.created_by).order_by(FOLLOWUPS.c.created_by)
    ).all()
    session.rollback()
    assert [tuple(row) for row in stored] == [(mine["id"], OWNER), (theirs["id"], OTHER)]
    entries = log_entries(session, "followup.create")
    assert [(e["actor"], e["outcome"]) for e in entries] == [
        (OWNER, "allowed"),
        (OTHER, "allowed"),
        (OWNER, "allowed"),
        (OTHER, "allowed"),
    ]


def test_a_key_whose_request_was_forgotten_with_an_erasure_answers_nothing_but_a_409(
    client: TestClient, token: TokenFactory, session: Session
) -> None:
    # An erasure removes what a keyed follow-up about its subject asked for (its digest): the
    # key is then used, and what it was used for can no longer be told. A request under it
    # for another client is refused (logged), never answered with the erased client's
    # follow-up as if it had been recorded.
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    erased, other, *_ = packet["pseudonyms"]
    keyed = {**bearer(token(OWNER, "professional")), "Idempotency-Key": "retry-9"}
    body = {"kind": "contact", "date": DAY_B, "outcome_code": "reached"}

    def url(pseudonym: str) -> str:
        return f"/v1/packets/{packet['id']}/clients/{pseudonym}/followups"

    assert client.post(url(erased), json=body, headers=keyed).status_code == 201
    erasure = client.post(
        f"/v1/subjects/{erased}/erase", headers=bearer(token("admin-001", "admin"))
    )
    assert erasure.status_code == 200, erasure.text
    digest = session.execute(select(FOLLOWUPS.c.request_digest)).scalar_one()
    session.rollback()
    assert digest is None

    refused = client.post(url(other), json=body, headers=keyed)
    assert refused.status_code == 409, refused.text
    assert "different follow-up" in refused.json()["detail"]
    stored = session.execute(select(FOLLOWUPS.c.pseudonym)).scalars().all()
    session.rollback()
    assert stored == [erased]
    last = log_entries(session, "followup.create")[-1]
    assert (last["outcome"], last["pseudonyms"]) == ("denied", [other])


def test_a_followup_dated_outside_the_packets_time_is_refused_and_logged(
    client: TestClient, token: TokenFactory, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    pseudonym = packet["pseudonyms"][0]
    owner = bearer(token(OWNER, "professional"))
    url = f"/v1/packets/{packet['id']}/clients/{pseudonym}/followups"
    # Days as the municipality counts them: in a zone far ahead of UTC and in one far behind,
    # at least one of which is on another date than UTC whenever the test runs.
    for zone_name in ("Pacific/Kiritimati", "Pacific/Pago_Pago"):
        monkeypatch.setenv(clock.TIMEZONE_VARIABLE, zone_name)
        clock.zone.cache_clear()
        zone = ZoneInfo(zone_name)
        made = datetime.fromisoformat(packet["created_at"]).astimezone(zone).date()
        earliest = made - timedelta(days=packets_service.FOLLOWUP_DAYS_BEFORE_PACKET)
        latest = datetime.now(zone).date() + timedelta(days=packets_service.FOLLOWUP_DAYS_AHEAD)
        for day in (earliest, latest):
            created = client.post(
                url, json={"kind": "appointment", "date": day.isoformat()}, headers=owner
            )
            assert created.status_code == 201, (zone_name, day, created.text)
        for day in (
            date(1, 1, 1),
            earliest - timedelta(days=1),
            latest + timedelta(days=1),
            date(9999, 12, 31),
        ):
            refused = client.post(
                url, json={"kind": "appointment", "date": day.isoformat()}, headers=owner
            )
            assert refused.status_code == 422, (zone_name, day, refused.text)
            problem = refused.json()
            assert problem["errors"][0]["loc"] == ["date"]
            assert earliest.isoformat() in problem["detail"]
            assert latest.isoformat() in problem["detail"]
    clock.zone.cache_clear()
    entries = log_entries(session, "followup.create")
    assert [e["outcome"] for e in entries] == (["allowed"] * 2 + ["denied"] * 4) * 2


def test_a_followup_date_not_written_yyyy_mm_dd_is_refused_and_nothing_is_stored(
    client: TestClient, token: TokenFactory, session: Session
) -> None:
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    owner = bearer(token(OWNER, "professional"))
    url = f"/v1/packets/{packet['id']}/clients/{packet['pseudonyms'][0]}/followups"
    today_utc = datetime.now(UTC).date()
    midnight = datetime(today_utc.year, today_utc.month, today_utc.day, tzinfo=UTC)
    for day in (
        f"{today_utc.isoformat()}T00:00:00",
        f"{today_utc.isoformat()} 00:00",
        str(int(midnight.timestamp())),
        int(midnight.timestamp()),
    ):
        refused = client.post(url, json={"kind": "contact", "date": day}, headers=owner)
        assert refused.status_code == 422, (day, refused.text)
        assert refused.json()["errors"][0]["loc"] == ["date"]
        assert refused.json()["errors"][0]["msg"].endswith("a date is written as text, YYYY-MM-DD")
    session.rollback()
    assert session.execute(text("SELECT count(*) FROM packet_followups")).scalar_one() == 0
    assert log_entries(session, "followup.create") == []


# -- failing closed ---------------------------------------------------------------------------

LOCK_BOUND_SECONDS = 0.5


def test_the_open_body_is_exactly_what_the_documented_schema_serializes(
    client: TestClient, token: TokenFactory
) -> None:
    """The body is built from plain values for speed; it must still be the documented
    ``PacketClientsPublic``, field for field, with a note, an erased member and every hit."""
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    erased, noted, *_ = packet["pseudonyms"]
    owner = bearer(token(OWNER, "professional"))
    admin = bearer(token("admin-001", "admin"))
    for pseudonym in (erased, noted):
        response = client.post(
            f"/v1/packets/{packet['id']}/clients/{pseudonym}/followups",
            json={"kind": "contact", "date": DAY_B, "outcome_code": "reached", "note": NOTE},
            headers=owner,
        )
        assert response.status_code == 201, response.text
    assert client.post(f"/v1/subjects/{erased}/erase", headers=admin).status_code == 200

    opened = client.get(f"/v1/packets/{packet['id']}/clients", headers=owner)
    assert opened.status_code == 200, opened.text
    assert opened.headers["content-type"] == "application/json"
    parsed = PacketClientsPublic.model_validate_json(opened.content)
    assert json.loads(parsed.model_dump_json()) == opened.json()
    clients = {c.pseudonym: c for c in parsed.clients}
    assert clients[erased].identity is None
    assert clients[noted].followups[0].note == NOTE
    identity = clients[noted].identity
    assert identity is not None
    assert identity.model_dump(mode="json") == world.people[noted].identity
    assert all(c.flag.hits for c in parsed.clients)


@pytest.mark.parametrize("held", ["log", "packet-row", "log-table"])
@pytest.mark.usefixtures("no_collector_pauses")
def test_open_fails_closed_with_503_and_no_identity_while_a_lock_it_needs_is_held(
    client: TestClient, token: TokenFactory, db_url: str, home: Path, session: Session, held: str
) -> None:
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    bounded = Settings(
        env="test", home=home, database_url=db_url, log_lock_timeout_seconds=LOCK_BOUND_SECONDS
    )
    database = Database(bounded)
    try:
        with TestClient(create_app(bounded, database=database), raise_server_exceptions=False) as c:
            owner = bearer(token(OWNER, "professional"))
            with HeldLogLock(db_url, held, packet["id"]):
                started = time.monotonic()
                response = c.get(f"/v1/packets/{packet['id']}/clients", headers=owner)
                waited = time.monotonic() - started
            assert response.status_code == 503, response.text
            assert response.headers["content-type"] == "application/problem+json"
            assert response.headers["retry-after"] == "1"
            assert leaked(response.text, world.secrets) == []
            # The request gave up at its bound, not at some multiple of it: the slack covers the
            # request's own work on a loaded 2-core machine (measured: under 0.3 s), while a
            # wait several times the bound does not fit.
            assert waited < LOCK_BOUND_SECONDS + 2.5, waited
            assert log_entries(session, "packet.open") == []
            status = session.execute(
                select(PACKETS.c.status).where(PACKETS.c.id == packet["id"])
            ).scalar()
            session.rollback()
            assert status == "assigned"
            # once the lock is free the same request succeeds
            again = c.get(f"/v1/packets/{packet['id']}/clients", headers=owner)
            assert again.status_code == 200
    finally:
        database.dispose()


@pytest.mark.usefixtures("no_collector_pauses")
def test_a_packet_held_elsewhere_is_as_hidden_from_others_as_a_missing_one(
    client: TestClient, token: TokenFactory, db_url: str, home: Path, session: Session, backend: str
) -> None:
    """While a close, reassign, shred or erasure holds a packet past the bound, someone else's
    open, close or follow-up gets what they get for a packet that does not exist: on PostgreSQL
    the same 404 with its denied entry once the wait runs out (judged by the committed row),
    never a 503 that would say the packet exists; on SQLite, where one write lock covers
    everything, the same 503 for both."""
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    missing = str(uuid.uuid4())
    bounded = Settings(
        env="test", home=home, database_url=db_url, log_lock_timeout_seconds=LOCK_BOUND_SECONDS
    )
    attempts = [
        ("GET", "/v1/packets/{}/clients", None),
        ("POST", "/v1/packets/{}/close", None),
        (
            "POST",
            "/v1/packets/{}/clients/" + packet["pseudonyms"][0] + "/followups",
            {"kind": "contact", "date": DAY_A},
        ),
    ]
    answers: dict[str, list[tuple[int, str, float]]] = {packet["id"]: [], missing: []}
    database = Database(bounded)
    try:
        with TestClient(create_app(bounded, database=database), raise_server_exceptions=False) as c:
            other = bearer(token(OTHER, "professional"))
            with HeldLogLock(db_url, "packet-row", packet["id"]):
                for method, path, body in attempts:
                    for packet_id in answers:
                        started = time.monotonic()
                        response = c.request(
                            method, path.format(packet_id), headers=other, json=body
                        )
                        detail = response.json()["detail"].replace(packet_id, "<id>")
                        waited = time.monotonic() - started
                        answers[packet_id].append((response.status_code, detail, waited))
                        assert leaked(response.text, world.secrets) == []
    finally:
        database.dispose()
    held, absent = answers[packet["id"]], answers[missing]
    assert [a[:2] for a in held] == [a[:2] for a in absent], answers
    denied = [
        (e["object_id"], e["action"]) for e in log_entries(session) if e["outcome"] == "denied"
    ]
    if backend == "postgres":
        assert {status for status, _, _ in held} == {404}, answers
        # each waited for the holder, at most its bound (the slack covers a loaded machine)
        assert all(waited < LOCK_BOUND_SECONDS + 1.5 for _, _, waited in held), answers
        actions = ["packet.open", "packet.close", "followup.create"]
        assert [a for p, a in denied if p == packet["id"]] == actions, denied
        assert [a for p, a in denied if p == missing] == actions, denied
    else:
        assert {status for status, _, _ in held} == {503}, answers
        assert denied == []


def test_a_professional_a_packet_is_being_reassigned_to_is_let_in_once_it_commits(
    client: TestClient, token: TokenFactory, db_url: str, home: Path, session: Session, backend: str
) -> None:
    """Someone the committed row does not admit waits for a packet held by another transaction
    rather than being refused at once: the change may be a reassignment to them. Once it
    commits, their open and their follow-up go through (on SQLite the write lock serializes the
    two anyway)."""
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    pseudonym = packet["pseudonyms"][0]
    bounded = Settings(env="test", home=home, database_url=db_url, log_lock_timeout_seconds=2.0)
    answers: dict[str, int] = {}
    database = Database(bounded)
    try:
        with TestClient(create_app(bounded, database=database), raise_server_exceptions=False) as c:
            other = bearer(token(OTHER, "professional"))
            reassigning = database.engine.raw_connection()
            try:
                # A reassignment to OTHER in progress, as a coordinator's request would hold it.
                if backend == "sqlite":
                    reassigning.driver_connection.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]
                marker = "?" if backend == "sqlite" else "%s"
                cursor = reassigning.cursor()
                cursor.execute(
                    f"UPDATE packets SET professional_id = {marker} WHERE id = {marker}",
                    (OTHER, packet["id"]),
                )

                def open_and_note() -> None:
                    url = f"/v1/packets/{packet['id']}"
                    answers["open"] = c.get(f"{url}/clients", headers=other).status_code
                    followup = {"kind": "contact", "date": DAY_A}
                    answers["followup"] = c.post(
                        f"{url}/clients/{pseudonym}/followups", json=followup, headers=other
                    ).status_code

                asking = threading.Thread(target=open_and_note)
                asking.start()
                time.sleep(0.3)  # they arrive while the reassignment holds the packet
                reassigning.commit()
                asking.join(20)
            finally:
                reassigning.close()
    finally:
        database.dispose()
    assert answers == {"open": 200, "followup": 201}, answers
    denied = [e for e in log_entries(session) if e["outcome"] == "denied"]
    assert denied == []


def test_open_fails_closed_with_503_and_no_identity_when_its_log_entry_cannot_be_appended(
    client: TestClient, token: TokenFactory, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failure is the ``packet.open`` append itself, not an earlier lock wait: on SQLite a
    held write lock already stops the request at ``BEGIN IMMEDIATE``, before the open reaches
    the log, so only this variant shows that a failed append is never passed over."""
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    owner = bearer(token(OWNER, "professional"))
    appends: list[str] = []

    def log_unavailable(session: Session) -> Any:
        appends.append("attempted")
        raise log.LogUnavailable("the access log is busy; the request was not carried out")

    with monkeypatch.context() as patched:
        patched.setattr(log, "_lock_frontier", log_unavailable)
        response = client.get(f"/v1/packets/{packet['id']}/clients", headers=owner)
    assert appends == ["attempted"]
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "1"
    assert "clients" not in response.json()
    assert "identity" not in response.text
    assert leaked(response.text, world.secrets) == []
    assert log_entries(session, "packet.open") == []
    status = session.execute(select(PACKETS.c.status).where(PACKETS.c.id == packet["id"])).scalar()
    session.rollback()
    assert status == "assigned"
    # with the log writable again the same request succeeds, and is logged once
    again = client.get(f"/v1/packets/{packet['id']}/clients", headers=owner)
    assert again.status_code == 200, again.text
    assert [e["outcome"] for e in log_entries(session, "packet.open")] == ["allowed"]


# -- many workers -----------------------------------------------------------------------------

# One professional per worker process, each opening a packet of their own: no two opens share a
# packet row (an open holds it FOR UPDATE), so on PostgreSQL only the log's lock orders them, and
# the workers start their opens together. Were the lock not one lock for every process, two
# appends would read the same tree size and collide on a leaf index (500): with 12 opens each,
# every trial had several such collisions (with 6, some had only one). SQLite serializes every
# writer anyway (BEGIN IMMEDIATE); there the test shows entries and proofs hold up across
# processes.
WORKERS = {"prof-001": "Charlois", "prof-002": "Feijenoord", "prof-003": "IJsselmonde"}
OPENS_PER_PROCESS = 12

Opened = tuple[str, int, str]  # request id, status, body of a failed open


def open_own_packet_repeatedly(
    db_url: str,
    home: str,
    professional_id: str,
    packet_id: str,
    worker: int,
    start: Barrier,
    results: Queue[list[Opened]],
) -> None:
    """One worker process with its own app and engine: once every worker is ready, opens its
    professional's packet ``OPENS_PER_PROCESS`` times and reports each request id and status."""
    settings = Settings(
        env="test", home=Path(home), database_url=db_url, log_lock_timeout_seconds=30
    )
    database = Database(settings)
    opened: list[Opened] = []
    try:
        app = create_app(settings, database=database)
        owner = bearer(app.state.dev_issuer.mint(subject=professional_id, roles=["professional"]))
        with TestClient(app, raise_server_exceptions=False) as client:
            start.wait(60)
            for number in range(OPENS_PER_PROCESS):
                request_id = f"{worker:08x}-0000-4000-8000-{number:012x}"
                response = client.get(
                    f"/v1/packets/{packet_id}/clients",
                    headers={**owner, "X-Request-ID": request_id},
                )
                failure = "" if response.status_code == 200 else response.text
                opened.append((request_id, response.status_code, failure))
    finally:
        database.dispose()
        results.put(opened)


@pytest.mark.slow
def test_concurrent_opens_from_several_processes_each_leave_one_entry_and_the_log_verifies(
    app: Any, client: TestClient, token: TokenFactory, db_url: str, home: Path, database: Database
) -> None:
    world = build_world(
        client, token, professionals={p: [d] for p, d in WORKERS.items()}, per_district=3
    )
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(len(WORKERS))
    results: Queue[list[Opened]] = context.Queue()
    processes = [
        context.Process(
            target=open_own_packet_repeatedly,
            args=(
                db_url,
                str(home),
                professional,
                world.packet(professional, district)["id"],
                worker,
                start,
                results,
            ),
        )
        for worker, (professional, district) in enumerate(WORKERS.items())
    ]
    for process in processes:
        process.start()
    outcomes = [outcome for _ in processes for outcome in results.get(timeout=120)]
    for process in processes:
        process.join(60)
    assert [process.exitcode for process in processes] == [0] * len(processes)
    assert [(r, status, body) for r, status, body in outcomes if status != 200] == []
    sent = sorted(request_id for request_id, _, _ in outcomes)
    assert len(sent) == len(WORKERS) * OPENS_PER_PROCESS

    signer = current_signer(app.state)
    assert signer is not None
    with database.transaction() as session:
        note = log.signed_checkpoint(
            session=session, signer=signer, origin=app.state.settings.checkpoint_origin
        )
        size = log.tree_size(session=session)
        entries = list(log.iter_entries(session=session, start=0, end=size))
    opened = [e for e in (json.loads(raw) for raw in entries) if e["action"] == "packet.open"]
    assert sorted(e["request_id"] for e in opened) == sent
    assert {e["outcome"] for e in opened} == {"allowed"}
    verified = verify_export(
        entries=[raw + b"\n" for raw in entries], checkpoint_note=note, verifier=signer.verifier
    )
    assert verified.checkpoint.size == size


def test_identities_are_decrypted_only_after_the_open_is_committed_to_the_log(
    client: TestClient,
    token: TokenFactory,
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    committed_before_reveal: list[int] = []
    real_reveal = packets_service.reveal

    def observed_reveal(**kwargs: Any) -> Any:
        # another connection sees the entry only if the request's transaction committed
        with database.session() as other:
            committed_before_reveal.append(len(log_entries(other, "packet.open")))
        return real_reveal(**kwargs)

    monkeypatch.setattr(packets_service, "reveal", observed_reveal)
    response = client.get(
        f"/v1/packets/{packet['id']}/clients", headers=bearer(token(OWNER, "professional"))
    )
    assert response.status_code == 200
    assert committed_before_reveal == [1]


# -- opens logged together (group commit) -----------------------------------------------------


def caller(token: TokenFactory, app: Any, sub: str, role: str) -> Caller:
    """The ``Caller`` a request with this role would be, without the HTTP layer."""
    permissions = app.state.access_policy.permissions_for(frozenset({role}))
    return Caller(sub=sub, roles=frozenset({role}), permissions=permissions, request_id=None)


def test_a_packet_expiring_just_after_an_opens_deadline_is_judged_expired(
    app: Any, client: TestClient, token: TokenFactory, database: Database, session: Session
) -> None:
    """When little time went on the packets' rows, the log's wait is not shortened and may end
    up to LOCK_WAIT_SLACK_SECONDS past the deadline: expiry is judged that far ahead too, or an
    entry could still be stamped after the packet expired."""
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    deadline = time.monotonic() + 0.5
    expires = utcnow() + timedelta(seconds=0.5 + LOCK_WAIT_SLACK_SECONDS / 2)
    session.execute(update(PACKETS).where(PACKETS.c.id == packet["id"]).values(expires_at=expires))
    session.commit()
    request = packets_service.OpenRequest(packet["id"], caller(token, app, OWNER, "professional"))
    with database.transaction() as batch:
        [outcome] = packets_service.open_packets(
            session=batch, requests=[request], deadline=deadline
        )
    assert isinstance(outcome, packets_service.PacketGone), outcome


def test_an_app_served_again_after_shutting_down_still_opens_packets(
    client: TestClient, token: TokenFactory, db_url: str, home: Path
) -> None:
    """Shutting the app down ends its opens' batch thread; serving it again (a test, an embedding
    server) must start a new one, not fail every open with 500."""
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    settings = Settings(env="test", home=home, database_url=db_url)
    database = Database(settings)
    app = create_app(settings, database=database)
    owner = bearer(token(OWNER, "professional"))
    statuses = []
    try:
        for _ in range(2):
            with TestClient(app, raise_server_exceptions=False) as served:
                statuses.append(
                    served.get(f"/v1/packets/{packet['id']}/clients", headers=owner).status_code
                )
    finally:
        database.dispose()
    assert statuses == [200, 200]


def test_opens_logged_together_each_get_their_own_outcome_and_entry(
    app: Any, client: TestClient, token: TokenFactory, database: Database, session: Session
) -> None:
    """One batch: two owners, a non-owner, a missing packet, a closed packet and an owner twice.
    Each gets what it would alone, and the log holds one entry per open, in the batch's order."""
    world = build_world(
        client, token, professionals={OWNER: ["Charlois", "IJsselmonde"], OTHER: ["Feijenoord"]}
    )
    own, other, closed = (
        world.packet(OWNER, "Charlois"),
        world.packet(OTHER, "Feijenoord"),
        world.packet(OWNER, "IJsselmonde"),
    )
    owner = bearer(token(OWNER, "professional"))
    assert client.post(f"/v1/packets/{closed['id']}/close", headers=owner).status_code == 200
    missing = str(uuid.uuid4())
    asked = [
        (own["id"], OWNER),
        (own["id"], OTHER),
        (other["id"], OTHER),
        (missing, OWNER),
        (closed["id"], OWNER),
        (own["id"], OWNER),
    ]
    requests = [
        packets_service.OpenRequest(packet_id, caller(token, app, sub, "professional"))
        for packet_id, sub in asked
    ]
    with database.transaction() as batch:
        outcomes = packets_service.open_packets(session=batch, requests=requests)

    kinds = [type(o).__name__ for o in outcomes]
    assert kinds == [
        "SealedPacket",
        "PacketNotFound",
        "SealedPacket",
        "PacketNotFound",
        "PacketGone",
        "SealedPacket",
    ]
    keyring = app.state.keyring
    for outcome, (packet_id, _) in zip(outcomes, asked, strict=True):
        if isinstance(outcome, packets_service.SealedPacket):
            body = json.loads(packets_service.reveal(keyring=keyring, sealed=outcome))
            assert body["packet"]["id"] == packet_id
            assert body["packet"]["status"] == "opened"
            packet = own if packet_id == own["id"] else other
            assert {c["pseudonym"]: c["identity"] for c in body["clients"]} == {
                p.pseudonym: p.identity for p in world.members(packet)
            }
    entries = log_entries(session, "packet.open")
    assert [(e["object_id"], e["actor"], e["outcome"], e["reason"]) for e in entries] == [
        (own["id"], OWNER, "allowed", None),
        (own["id"], OTHER, "denied", "not the packet's owner"),
        (other["id"], OTHER, "allowed", None),
        (missing, OWNER, "denied", "no such packet"),
        (closed["id"], OWNER, "denied", "packet is closed"),
        (own["id"], OWNER, "allowed", None),
    ]
    # a denial names the pseudonyms it would have revealed, when the packet exists
    assert [sorted(e["pseudonyms"]) for e in entries] == [
        sorted(own["pseudonyms"]),
        sorted(own["pseudonyms"]),
        sorted(other["pseudonyms"]),
        [],
        sorted(closed["pseudonyms"]),
        sorted(own["pseudonyms"]),
    ]
    assert leaked(str(entries), world.secrets) == []


def test_concurrent_opens_in_one_worker_share_a_transaction(
    client: TestClient, token: TokenFactory, db_url: str, session: Session, monkeypatch: Any
) -> None:
    """While the log is busy, the opens that arrive wait together and then go as one batch;
    every one is answered and logged once."""
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    owner = bearer(token(OWNER, "professional"))
    batch_sizes: list[int] = []
    real_open_packets = packets_service.open_packets

    def recorded(**kwargs: Any) -> Any:
        batch_sizes.append(len(kwargs["requests"]))
        return real_open_packets(**kwargs)

    monkeypatch.setattr(packets_service, "open_packets", recorded)
    statuses: list[int] = []

    def open_once() -> None:
        response = client.get(f"/v1/packets/{packet['id']}/clients", headers=owner)
        statuses.append(response.status_code)

    threads = [threading.Thread(target=open_once) for _ in range(5)]
    with HeldLogLock(db_url, "log", packet["id"]):
        for thread in threads:
            thread.start()
        time.sleep(0.5)  # all five arrive while the first waits for the lock (bound: 2 s)
    for thread in threads:
        thread.join(20)
    assert statuses == [200] * 5
    # the first batch, and the rest together: whatever arrived while it waited for the lock
    assert sum(batch_sizes) == 5
    assert len(batch_sizes) <= 2, batch_sizes
    assert [e["outcome"] for e in log_entries(session, "packet.open")] == ["allowed"] * 5


@pytest.mark.usefixtures("no_collector_pauses")
def test_an_open_queued_behind_a_batch_still_gives_up_at_its_own_bound(
    client: TestClient, token: TokenFactory, db_url: str, home: Path, session: Session
) -> None:
    """The bound counts from each open's arrival: one that first waited for the batch ahead of
    it (itself waiting for a held lock) does not get a second full bound."""
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    bound = 1.0
    bounded = Settings(env="test", home=home, database_url=db_url, log_lock_timeout_seconds=bound)
    database = Database(bounded)
    waited: dict[str, float] = {}
    try:
        with TestClient(create_app(bounded, database=database), raise_server_exceptions=False) as c:
            owner = bearer(token(OWNER, "professional"))

            def open_timed(name: str) -> None:
                started = time.monotonic()
                response = c.get(f"/v1/packets/{packet['id']}/clients", headers=owner)
                assert response.status_code == 503, response.text
                waited[name] = time.monotonic() - started

            with HeldLogLock(db_url, "log", packet["id"]):
                first = threading.Thread(target=open_timed, args=("first",))
                first.start()
                time.sleep(0.1 * bound)  # the second arrives while the first's batch waits
                second = threading.Thread(target=open_timed, args=("second",))
                second.start()
                first.join(10)
                second.join(10)
    finally:
        database.dispose()
    # Its own bound is 1.0 s; a full bound of its own batch, after the first gave up, would be
    # 1.9 s. The slack covers a loaded machine.
    assert waited["second"] < bound + 0.6, waited
    assert log_entries(session, "packet.open") == []


@pytest.mark.usefixtures("no_collector_pauses")
def test_a_packet_that_expires_while_its_open_waits_for_the_log_is_not_opened(
    client: TestClient, token: TokenFactory, db_url: str, session: Session
) -> None:
    """The entry is stamped under the log's lock, after the wait: on PostgreSQL the packet was
    judged before it, and an open could be logged as allowed, with identities, after expiry."""
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    owner = bearer(token(OWNER, "professional"))
    expires = utcnow() + timedelta(seconds=0.6)
    session.execute(update(PACKETS).where(PACKETS.c.id == packet["id"]).values(expires_at=expires))
    session.commit()
    answers: list[Any] = []
    with HeldLogLock(db_url, "log", packet["id"]):
        waiting = threading.Thread(
            target=lambda: answers.append(
                client.get(f"/v1/packets/{packet['id']}/clients", headers=owner)
            )
        )
        waiting.start()
        time.sleep(1.2)  # the packet expires meanwhile, within the open's bound (2 s)
    waiting.join(10)
    [answer] = answers
    assert answer.status_code == 410, answer.text
    assert leaked(answer.text, world.secrets) == []
    [entry] = log_entries(session, "packet.open")
    assert (entry["outcome"], entry["reason"]) == ("denied", "packet is expired")


@pytest.mark.usefixtures("no_collector_pauses")
def test_an_open_that_waited_for_its_packet_waits_only_the_rest_of_its_bound_for_the_log(
    client: TestClient,
    token: TokenFactory,
    db_url: str,
    home: Path,
    session: Session,
    backend: str,
) -> None:
    """Its packet held (a close or shred in progress), then the log: the two waits together stay
    within the bound from its arrival, then 503 and no identity (PostgreSQL waited for each
    in full, twice the bound, and answered with identities). SQLite has one lock for both,
    held here for as long."""
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    bound = 2.0
    bounded = Settings(env="test", home=home, database_url=db_url, log_lock_timeout_seconds=bound)
    database = Database(bounded)
    answers: list[Any] = []
    try:
        with TestClient(create_app(bounded, database=database), raise_server_exceptions=False) as c:
            owner = bearer(token(OWNER, "professional"))
            row = HeldLogLock(db_url, "packet-row", packet["id"])
            row.__enter__()
            waiting = threading.Thread(
                target=lambda: answers.append(
                    c.get(f"/v1/packets/{packet['id']}/clients", headers=owner)
                )
            )
            waiting.start()
            time.sleep(0.2)
            if backend == "sqlite":
                time.sleep(3.3)
                row.__exit__()
            else:
                with HeldLogLock(db_url, "log", packet["id"]):
                    time.sleep(1.4)
                    row.__exit__()  # the packet is free 1.6 s after the open arrived
                    time.sleep(1.9)  # the log, 3.5 s after: past the bound
            waiting.join(10)
    finally:
        database.dispose()
    [answer] = answers
    assert answer.status_code == 503, answer.text
    assert leaked(answer.text, world.secrets) == []
    assert [e["outcome"] for e in log_entries(session, "packet.open")] == []


@pytest.mark.usefixtures("no_collector_pauses")
def test_a_held_write_lock_does_not_stall_the_worker_for_other_requests(
    client: TestClient, token: TokenFactory, db_url: str
) -> None:
    """While the log's lock is held elsewhere, an open waiting for it does not stall its worker:
    on SQLite a batch of opens runs on the event loop only once the write lock is free (and
    otherwise waits for it off the loop); on PostgreSQL a batch runs in a thread."""
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    owner = bearer(token(OWNER, "professional"))
    outcome: list[int] = []
    with HeldLogLock(db_url, "log", packet["id"]):
        waiting = threading.Thread(
            target=lambda: outcome.append(
                client.get(f"/v1/packets/{packet['id']}/clients", headers=owner).status_code
            )
        )
        waiting.start()
        time.sleep(0.2)
        started = time.monotonic()
        assert client.get("/healthz").status_code == 200
        answered_in = time.monotonic() - started
        assert waiting.is_alive()  # the open still waits for the lock
    waiting.join(10)
    assert outcome == [200]
    assert answered_in < 0.5, answered_in


@pytest.mark.usefixtures("no_collector_pauses")
def test_many_opens_waiting_for_a_held_packet_leave_other_opens_their_batches(
    client: TestClient, token: TokenFactory, db_url: str, home: Path, backend: str
) -> None:
    """On PostgreSQL each open of a packet being changed waits for it in a thread of its own.
    Eight such waits took every thread the batches used too (the loop's default executor has
    six here), so an unrelated open waited nearly the bound; and a caller who may open no
    packet at all waited like an owner for an answer that was 404 anyway."""
    world = small_world(client, token)
    held, other = world.packet(OWNER, "Charlois"), world.packet(OTHER, "Feijenoord")
    bound = 3.0
    bounded = Settings(env="test", home=home, database_url=db_url, log_lock_timeout_seconds=bound)
    database = Database(bounded)
    answers: dict[str, list[tuple[int, float]]] = {"waiting": [], "analyst": [], "unrelated": []}
    try:
        with TestClient(create_app(bounded, database=database), raise_server_exceptions=False) as c:

            def open_timed(name: str, packet_id: str, sub: str, role: str) -> None:
                started = time.monotonic()
                response = c.get(
                    f"/v1/packets/{packet_id}/clients", headers=bearer(token(sub, role))
                )
                answers[name].append((response.status_code, time.monotonic() - started))

            waiting = [
                threading.Thread(
                    target=open_timed, args=("waiting", held["id"], OTHER, "professional")
                )
                for _ in range(8)
            ]
            analysts = [
                threading.Thread(target=open_timed, args=("analyst", held["id"], "an-1", "analyst"))
                for _ in range(2)
            ]
            with HeldLogLock(db_url, "packet-row", held["id"]):
                for thread in waiting + analysts:
                    thread.start()
                time.sleep(0.3)
                if backend == "postgres":
                    open_timed("unrelated", other["id"], OTHER, "professional")
                    for thread in analysts:
                        thread.join(2)
                    assert all(thread.is_alive() for thread in waiting)  # still waiting
                else:
                    time.sleep(0.7)  # SQLite: one lock for everything; all wait for it
            if backend == "sqlite":
                open_timed("unrelated", other["id"], OTHER, "professional")
            for thread in waiting + analysts:
                thread.join(10)
    finally:
        database.dispose()
    assert [status for status, _ in answers["unrelated"]] == [200], answers
    assert [status for status, _ in answers["analyst"]] == [404, 404], answers
    assert [status for status, _ in answers["waiting"]] == [404] * 8, answers
    if backend == "postgres":
        assert answers["unrelated"][0][1] < 1.0, answers  # the bound is 3 s
        assert all(waited < 1.0 for _, waited in answers["analyst"]), answers


@pytest.mark.usefixtures("no_collector_pauses")
def test_a_packet_being_changed_holds_up_no_other_open_and_each_gives_up_at_its_own_bound(
    client: TestClient, token: TokenFactory, db_url: str, home: Path, backend: str, session: Session
) -> None:
    """Another transaction holds the owner's packet (a close, reassign, shred or erasure in
    progress) past the bound. On PostgreSQL that packet's opens leave their batch and wait for it
    on their own, so another professional's open in the same worker goes through at once; each
    of the waiting opens gives up at its own bound. On SQLite one write lock covers everything:
    every open waits, and each gives up at its own bound."""
    world = small_world(client, token)
    held, other = world.packet(OWNER, "Charlois"), world.packet(OTHER, "Feijenoord")
    bound = 2.0  # long enough that a loaded machine's delays stay well inside the slack
    bounded = Settings(env="test", home=home, database_url=db_url, log_lock_timeout_seconds=bound)
    database = Database(bounded)
    answers: dict[str, tuple[int, float]] = {}
    try:
        with TestClient(create_app(bounded, database=database), raise_server_exceptions=False) as c:

            def open_timed(name: str, packet_id: str, sub: str) -> None:
                started = time.monotonic()
                response = c.get(
                    f"/v1/packets/{packet_id}/clients", headers=bearer(token(sub, "professional"))
                )
                answers[name] = (response.status_code, time.monotonic() - started)

            opens = [
                threading.Thread(target=open_timed, args=("first", held["id"], OWNER)),
                threading.Thread(target=open_timed, args=("again", held["id"], OWNER)),
                threading.Thread(target=open_timed, args=("unrelated", other["id"], OTHER)),
            ]
            with HeldLogLock(db_url, "packet-row", held["id"]):
                opens[0].start()
                time.sleep(0.3 * bound)  # the others arrive while the first waits
                opens[1].start()
                opens[2].start()
                for thread in opens:
                    thread.join(10)
    finally:
        database.dispose()
    assert answers["first"][0] == answers["again"][0] == 503, answers
    # each at its own bound, counted from its own arrival (the slack covers a loaded machine)
    assert answers["first"][1] < bound + 1.0, answers
    assert answers["again"][1] < bound + 1.0, answers
    # and not at the first one's, which ran out 0.7 bound after the second arrived
    assert answers["again"][1] > bound - 0.1, answers
    opened = log_entries(session, "packet.open")
    if backend == "postgres":
        assert answers["unrelated"][0] == 200, answers
        assert answers["unrelated"][1] < 0.5 * bound, answers
        assert [(e["object_id"], e["outcome"]) for e in opened] == [(other["id"], "allowed")]
    else:
        assert answers["unrelated"][0] == 503, answers
        assert answers["unrelated"][1] < bound + 1.0, answers
        assert opened == []


def test_an_id_that_only_begins_as_a_packet_id_is_refused_before_anything_reaches_the_log(
    client: TestClient, token: TokenFactory, session: Session
) -> None:
    # The judge of a request a route cannot take writes the packet id to the log: all of it
    # must be a packet id's shape, not just its first 36 characters.
    world = small_world(client, token)
    packet = world.packet(OWNER, "Charlois")
    before = len(log_entries(session))
    for sub in (OWNER, OTHER):
        response = client.get(
            f"/v1/packets/{packet['id']}-123456782/clients",
            headers=bearer(token(sub, "professional")),
        )
        assert response.status_code == 422, response.text
        assert "123456782" not in response.json()["detail"]
    assert len(log_entries(session)) == before
