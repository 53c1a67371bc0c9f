"""Closing, expiry, crypto-shredding and erasure: afterwards no route and no reader of the database
holding the keyring can recover an identity through a packet (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text, update
from sqlmodel import Session
from typer.testing import CliRunner

from service import db as db_module
from service.access_log.service import LogUnavailable
from service.cli import app as cli
from service.config import Settings, get_settings
from service.crypto.envelope import DataKey, unwrap_key
from service.crypto.keyring import KeyProvider
from service.db import WRAP_TABLES, Database
from service.main import create_app
from service.packets import service as packets_service
from service.packets.models import utcnow
from service.packets.policy import RetentionPolicy, load_retention_policy
from service.packets.service import packet_key_aad, shred_expired
from service.records import service as records_service
from service.schemas import as_utc
from tests.conftest import (
    MIGRATIONS,
    Answer,
    Databases,
    Interleaving,
    Request,
    TokenFactory,
    bearer,
)
from tests.flagging.seed import AS_OF, log_entries
from tests.packets.scenario import (
    COORDINATOR,
    DAY_B,
    FOLLOWUPS,
    MEMBERS,
    NOTE,
    PACKETS,
    SUBJECTS,
    HeldLogLock,
    World,
    build_world,
    leaked,
)

OWNER = "prof-001"
OTHER = "prof-002"


def world_of(client: TestClient, token: TokenFactory) -> World:
    return build_world(
        client,
        token,
        professionals={OWNER: ["Charlois"], OTHER: ["Feijenoord"]},
        per_district=3,
    )


def packet_state(session: Session, packet_id: str) -> dict[str, Any]:
    """Everything stored about one packet that could lead to an identity."""
    packet = session.execute(
        select(PACKETS.c.status, PACKETS.c.wrapped_key, PACKETS.c.shredded_at).where(
            PACKETS.c.id == packet_id
        )
    ).one()
    wraps = list(
        session.execute(
            select(MEMBERS.c.wrapped_dek).where(MEMBERS.c.packet_id == packet_id)
        ).scalars()
    )
    notes = session.execute(
        select(FOLLOWUPS.c.note_ciphertext, FOLLOWUPS.c.outcome_code).where(
            FOLLOWUPS.c.packet_id == packet_id
        )
    ).all()
    session.rollback()
    return {
        "status": packet.status,
        "wrapped_key": packet.wrapped_key,
        "shredded_at": packet.shredded_at,
        "member_wraps": wraps,
        "notes": [n for n, _ in notes],
        "outcome_codes": [c for _, c in notes],
    }


def recoverable_packet_key(
    session: Session, keyring: KeyProvider, packet_id: str
) -> DataKey | None:
    """What an operator with the keyring and the database could do: unwrap the packet key."""
    wrapped = session.execute(
        select(PACKETS.c.wrapped_key).where(PACKETS.c.id == packet_id)
    ).scalar()
    session.rollback()
    if wrapped is None:
        return None
    return unwrap_key(keyring, "packet", wrapped, aad=packet_key_aad(packet_id))


def assert_shredded(state: dict[str, Any], status: str, *, notes: int) -> None:
    """Shredded: no packet key wrap, no member wrap, and each of its ``notes`` follow-up notes
    removed (a count, so that "every note is gone" is never checked over no notes at all)."""
    assert state["status"] == status
    assert state["shredded_at"] is not None
    assert state["wrapped_key"] is None
    assert state["member_wraps"]
    assert all(w is None for w in state["member_wraps"])
    assert state["notes"] == [None] * notes


def sealed_bodies(state: dict[str, Any]) -> list[bytes]:
    """The base64 body (after "v1.<version>.") of the packet key wrap, each member's wrap and
    each sealed note, as the database files hold them."""
    return [
        value.split(".", 2)[2].encode()
        for value in (state["wrapped_key"], *state["member_wraps"], *state["notes"])
    ]


def note_every_client(client: TestClient, token: TokenFactory, packet: dict[str, Any]) -> None:
    """A follow-up with a sealed note for each of the packet's clients."""
    for pseudonym in packet["pseudonyms"]:
        response = client.post(
            f"/v1/packets/{packet['id']}/clients/{pseudonym}/followups",
            json={"kind": "contact", "date": DAY_B, "outcome_code": "reached", "note": NOTE},
            headers=bearer(token(OWNER, "professional")),
        )
        assert response.status_code == 201, response.text


def assert_gone_everywhere(
    client: TestClient, token: TokenFactory, world: World, packet: dict[str, Any]
) -> None:
    owner = bearer(token(OWNER, "professional"))
    opened = client.get(f"/v1/packets/{packet['id']}/clients", headers=owner)
    assert opened.status_code == 410
    assert leaked(opened.text, world.secrets) == []
    followup = client.post(
        f"/v1/packets/{packet['id']}/clients/{packet['pseudonyms'][0]}/followups",
        json={"kind": "contact", "date": DAY_B},
        headers=owner,
    )
    assert followup.status_code == 410
    for sub, role in ((OWNER, "professional"), (COORDINATOR, "coordinator")):
        metadata = client.get(f"/v1/packets/{packet['id']}", headers=bearer(token(sub, role)))
        assert metadata.status_code == 200
        assert leaked(metadata.text, world.secrets) == []


def test_closed_packet_is_refused_then_shredded_after_the_grace_period(
    app: Any, client: TestClient, token: TokenFactory, session: Session, database: Database
) -> None:
    world = world_of(client, token)
    packet = world.packet(OWNER, "Charlois")
    owner = bearer(token(OWNER, "professional"))
    first = packet["pseudonyms"][0]
    client.post(
        f"/v1/packets/{packet['id']}/clients/{first}/followups",
        json={
            "kind": "outcome",
            "date": DAY_B,
            "outcome_code": "support_accepted",
            "note": NOTE,
        },
        headers=owner,
    )
    assert client.get(f"/v1/packets/{packet['id']}/clients", headers=owner).status_code == 200

    closed = client.post(f"/v1/packets/{packet['id']}/close", headers=owner)
    assert closed.status_code == 200, closed.text
    assert closed.json()["status"] == "closed"
    assert client.post(f"/v1/packets/{packet['id']}/close", headers=owner).status_code == 409
    refused = client.get(f"/v1/packets/{packet['id']}/clients", headers=owner)
    assert refused.status_code == 410
    assert "closed" in refused.json()["detail"]
    assert log_entries(session, "packet.open")[-1]["outcome"] == "denied"
    assert log_entries(session, "packet.open")[-1]["reason"] == "packet is closed"

    # within the grace period the key still exists; after it, the shredder destroys it
    retention = app.state.retention_policy
    closed_at = utcnow()
    within = closed_at + timedelta(days=retention.closed_grace_days) - timedelta(hours=1)
    after = closed_at + timedelta(days=retention.closed_grace_days, hours=1)
    assert (
        shred_expired(database=database, retention=retention, actor="system:test", now=within) == 0
    )
    assert recoverable_packet_key(session, app.state.keyring, packet["id"]) is not None
    before = packet_state(session, packet["id"])
    secrets = sealed_bodies(before)
    assert len(secrets) == 1 + len(packet["pseudonyms"]) + 1
    assert all(secret in raw_storage(session) for secret in secrets)
    assert (
        shred_expired(database=database, retention=retention, actor="system:test", now=after) == 1
    )
    # the job ends by purging the overwritten row versions: the files no longer hold them
    leftovers = raw_storage(session)
    assert [s for s in secrets if s in leftovers] == []

    state = packet_state(session, packet["id"])
    assert_shredded(state, "shredded", notes=1)
    assert state["outcome_codes"] == ["support_accepted"]
    assert recoverable_packet_key(session, app.state.keyring, packet["id"]) is None
    assert_gone_everywhere(client, token, world, packet)
    metadata = client.get(f"/v1/packets/{packet['id']}", headers=owner).json()
    assert metadata["status"] == "shredded"
    assert metadata["shredded_at"] is not None
    member = {m["pseudonym"]: m for m in metadata["members"]}[first]
    assert [f["outcome_code"] for f in member["followups"]] == ["support_accepted"]
    # the other professional's packet is untouched
    other = packet_state(session, world.packet(OTHER, "Feijenoord")["id"])
    assert other["status"] == "assigned"
    assert other["wrapped_key"] is not None

    closes = log_entries(session, "packet.close")
    shreds = log_entries(session, "packet.shred")
    assert [(e["actor"], e["object_id"], e["outcome"], e["reason"]) for e in closes] == [
        (OWNER, packet["id"], "allowed", None),
        (OWNER, packet["id"], "denied", "packet is closed"),  # the second close, 409
    ]
    assert [(e["actor"], e["object_id"]) for e in shreds] == [("system:test", packet["id"])]
    assert sorted(shreds[0]["pseudonyms"]) == sorted(packet["pseudonyms"])


def test_a_closed_packet_that_expires_before_its_grace_ends_is_logged_as_expired(
    app: Any, client: TestClient, token: TokenFactory, session: Session, database: Database
) -> None:
    world = world_of(client, token)
    packet, other = world.packet(OWNER, "Charlois"), world.packet(OTHER, "Feijenoord")
    expires = utcnow() + timedelta(days=1)
    session.execute(update(PACKETS).where(PACKETS.c.id == packet["id"]).values(expires_at=expires))
    session.commit()
    for owner, closing in ((OWNER, packet), (OTHER, other)):
        closed = client.post(
            f"/v1/packets/{closing['id']}/close", headers=bearer(token(owner, "professional"))
        )
        assert closed.status_code == 200, closed.text
    retention = app.state.retention_policy
    assert retention.closed_grace_days > 2
    # Two days on: the first is past its expiry, though within its grace; the second neither.
    shredded = shred_expired(
        database=database,
        retention=retention,
        actor="system:test",
        now=utcnow() + timedelta(days=2),
    )
    assert shredded == 1
    [entry] = log_entries(session, "packet.shred")
    assert (entry["object_id"], entry["reason"]) == (
        packet["id"],
        f"expired {expires.isoformat()}",
    )
    # Past the grace period, the second is shredded for its grace.
    later = utcnow() + timedelta(days=retention.closed_grace_days, minutes=1)
    assert shred_expired(database=database, retention=retention, actor="system:test", now=later)
    [_, entry] = log_entries(session, "packet.shred")
    assert entry["object_id"] == other["id"]
    assert entry["reason"].startswith("closed ")
    assert entry["reason"].endswith(f"; grace {retention.closed_grace_days} days")


@pytest.fixture
def cli_env(db_url: str, home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("CASEPACKETS_HOME", str(home))
    monkeypatch.setenv("CASEPACKETS_DATABASE_URL", db_url)
    monkeypatch.setenv("CASEPACKETS_ENV", "test")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_expired_packets_are_refused_and_the_expire_command_shreds_them(
    app: Any, client: TestClient, token: TokenFactory, session: Session, cli_env: None
) -> None:
    world = world_of(client, token)
    packet = world.packet(OWNER, "Charlois")
    note_every_client(client, token, packet)
    secrets = sealed_bodies(packet_state(session, packet["id"]))
    assert len(secrets) == 1 + 2 * len(packet["pseudonyms"])
    assert all(secret in raw_storage(session) for secret in secrets)
    session.execute(
        update(PACKETS)
        .where(PACKETS.c.id == packet["id"])
        .values(expires_at=utcnow() - timedelta(minutes=1))
    )
    session.commit()
    owner = bearer(token(OWNER, "professional"))
    refused = client.get(f"/v1/packets/{packet['id']}/clients", headers=owner)
    assert refused.status_code == 410
    assert "expired" in refused.json()["detail"]

    runner = CliRunner()
    result = runner.invoke(cli, ["expire"])
    assert result.exit_code == 0, result.output
    assert "crypto-shredded 1 packets" in " ".join(result.output.split())
    again = runner.invoke(cli, ["expire"])
    assert "crypto-shredded 0 packets" in " ".join(again.output.split())

    state = packet_state(session, packet["id"])
    assert_shredded(state, "expired", notes=len(packet["pseudonyms"]))
    assert state["outcome_codes"] == ["reached"] * len(packet["pseudonyms"])
    # the command ends by purging the overwritten row versions: the files no longer hold them
    leftovers = raw_storage(session)
    assert [s for s in secrets if s in leftovers] == []
    assert recoverable_packet_key(session, app.state.keyring, packet["id"]) is None
    assert_gone_everywhere(client, token, world, packet)
    shreds = log_entries(session, "packet.shred")
    assert [(e["actor"], e["object_id"]) for e in shreds] == [("system:expire", packet["id"])]
    assert shreds[0]["reason"].startswith("expired")


def test_a_packet_past_its_expiry_reads_as_expired_before_the_shredder_runs(
    client: TestClient, token: TokenFactory, session: Session
) -> None:
    """The shredder runs every few minutes; until then the row still says ``assigned``, but no
    reader may be told the packet is in use, nor its clients counted against the owner."""
    world = world_of(client, token)
    packet = world.packet(OWNER, "Charlois")
    session.execute(
        update(PACKETS)
        .where(PACKETS.c.id == packet["id"])
        .values(expires_at=utcnow() - timedelta(seconds=1))
    )
    session.commit()
    coordinator = bearer(token(COORDINATOR, "coordinator"))
    owner = bearer(token(OWNER, "professional"))

    def listed(headers: dict[str, str], **query: str) -> list[str]:
        page = client.get("/v1/packets", params=query, headers=headers)
        assert page.status_code == 200, page.text
        return [p["id"] for p in page.json()["items"]]

    for headers in (coordinator, owner):
        shown = {
            p["id"]: p["status"] for p in client.get("/v1/packets", headers=headers).json()["items"]
        }
        assert shown[packet["id"]] == "expired"
        assert packet["id"] in listed(headers, status="expired")
        assert packet["id"] not in listed(headers, status="assigned")
    detail = client.get(f"/v1/packets/{packet['id']}", headers=coordinator)
    assert detail.json()["status"] == "expired"
    loads = {
        p["id"]: p["open_load"]
        for p in client.get("/v1/professionals", headers=coordinator).json()["items"]
    }
    assert loads[OWNER] == 0
    assert loads[OTHER] == len(world.packet(OTHER, "Feijenoord")["pseudonyms"])
    # the stored status is the shredder's to change
    assert packet_state(session, packet["id"])["status"] == "assigned"


def test_a_packet_is_expired_from_the_instant_of_its_expiry_for_readers_and_the_shredder(
    app: Any, client: TestClient, token: TokenFactory, session: Session, database: Database
) -> None:
    """``expires_at`` is the first instant the packet is no longer in use: readers see it
    expired then, and the shredder takes it then, not a moment later."""
    world = world_of(client, token)
    packet = world.packet(OWNER, "Charlois")
    at = utcnow() + timedelta(hours=1)
    session.execute(update(PACKETS).where(PACKETS.c.id == packet["id"]).values(expires_at=at))
    session.commit()
    moment = timedelta(microseconds=1)
    for status in ("assigned", "opened"):
        assert packets_service.shown_status(status, at, at - moment) == status
        assert packets_service.shown_status(status, at, at) == "expired"
    retention = app.state.retention_policy
    assert shred_expired(database=database, retention=retention, actor="t", now=at - moment) == 0
    assert packet_state(session, packet["id"])["status"] == "assigned"
    assert shred_expired(database=database, retention=retention, actor="t", now=at) == 1
    assert_shredded(packet_state(session, packet["id"]), "expired", notes=0)
    [entry] = log_entries(session, "packet.shred")
    assert entry["object_id"] == packet["id"]


def test_the_expire_command_forgets_what_old_idempotency_keys_kept(
    app: Any, client: TestClient, token: TokenFactory, session: Session, cli_env: None
) -> None:
    world_of(client, token)
    batches = records_service.BATCHES
    days = app.state.retention_policy.idempotency_days
    session.execute(update(batches).values(created_at=utcnow() - timedelta(days=days, minutes=1)))
    session.commit()
    aged = len(session.execute(select(batches.c.id)).all())
    session.rollback()
    assert aged > 0
    result = CliRunner().invoke(cli, ["expire"])
    said = " ".join(result.output.split())
    assert result.exit_code == 0, said
    assert (
        f"forgot what Idempotency-Keys kept of {aged} batches and pushes of flags older "
        f"than {days} days" in said
    )
    assert set(session.execute(select(batches.c.response)).scalars()) == {"{}"}
    session.rollback()
    again = CliRunner().invoke(cli, ["expire"])
    assert "forgot" not in again.output


@pytest.mark.parametrize("action", ["followup", "close"])
def test_a_change_that_waited_for_its_packet_waits_only_the_rest_of_its_bound_for_the_log(
    client: TestClient,
    token: TokenFactory,
    db_url: str,
    home: Path,
    session: Session,
    backend: str,
    action: str,
) -> None:
    """As for an open: its packet held (a reassign or shred in progress), then the log, the two
    waits together stay within the bound, then 503 and nothing changed (PostgreSQL waited for
    each in full, and recorded it once the log came free past the bound). SQLite has one lock
    for both, held here for as long."""
    world = world_of(client, token)
    packet = world.packet(OWNER, "Charlois")
    bound = 2.0
    bounded = Settings(env="test", home=home, database_url=db_url, log_lock_timeout_seconds=bound)
    database = Database(bounded)
    path, body = (
        (
            f"/v1/packets/{packet['id']}/clients/{packet['pseudonyms'][0]}/followups",
            {"kind": "contact", "date": DAY_B, "outcome_code": "reached"},
        )
        if action == "followup"
        else (f"/v1/packets/{packet['id']}/close", None)
    )
    answers: list[Any] = []
    try:
        with TestClient(create_app(bounded, database=database), raise_server_exceptions=False) as c:
            owner = bearer(token(OWNER, "professional"))
            row = HeldLogLock(db_url, "packet-row", packet["id"])
            row.__enter__()
            waiting = threading.Thread(
                target=lambda: answers.append(c.post(path, json=body, headers=owner))
            )
            waiting.start()
            time.sleep(0.2)
            if backend == "sqlite":
                time.sleep(3.3)
                row.__exit__()
            else:
                with HeldLogLock(db_url, "log", packet["id"]):
                    time.sleep(1.4)
                    row.__exit__()  # the packet is free 1.6 s after the request arrived
                    time.sleep(1.9)  # the log, 3.5 s after: past the bound
            waiting.join(10)
    finally:
        database.dispose()
    [answer] = answers
    assert answer.status_code == 503, answer.text
    assert (
        log_entries(session, f"{action}.create" if action == "followup" else "packet.close") == []
    )
    assert session.execute(select(FOLLOWUPS.c.id)).all() == []
    assert session.execute(
        select(PACKETS.c.status).where(PACKETS.c.id == packet["id"])
    ).scalar_one() in ("assigned", "opened")


# PostgreSQL alone locks a packet's row apart from the log (SQLite has one lock for both).
@pytest.mark.parametrize(
    "databases", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
@pytest.mark.parametrize("action", ["followup", "close"])
def test_someone_else_waiting_for_a_held_packet_still_gets_the_logged_404(
    client: TestClient,
    token: TokenFactory,
    db_url: str,
    home: Path,
    session: Session,
    action: str,
) -> None:
    """The wait for the packet runs out for a caller it does not admit: their denied entry then
    waits for the log as long as one for a packet that does not exist (a busy log for a moment
    is no 503 that would say the packet exists)."""
    world = world_of(client, token)
    packet = world.packet(OWNER, "Charlois")
    bounded = Settings(env="test", home=home, database_url=db_url, log_lock_timeout_seconds=1.0)
    database = Database(bounded)
    path, body = (
        (
            f"/v1/packets/{packet['id']}/clients/{packet['pseudonyms'][0]}/followups",
            {"kind": "contact", "date": DAY_B, "outcome_code": "reached"},
        )
        if action == "followup"
        else (f"/v1/packets/{packet['id']}/close", None)
    )
    answers: list[Any] = []
    try:
        with TestClient(create_app(bounded, database=database), raise_server_exceptions=False) as c:
            other = bearer(token(OTHER, "professional"))
            with HeldLogLock(db_url, "packet-row", packet["id"]):
                waiting = threading.Thread(
                    target=lambda: answers.append(c.post(path, json=body, headers=other))
                )
                waiting.start()
                time.sleep(0.8)
                with HeldLogLock(db_url, "log"):  # another request's append as the wait runs out
                    time.sleep(0.4)
                waiting.join(10)
    finally:
        database.dispose()
    [answer] = answers
    assert answer.status_code == 404, answer.text
    denied = log_entries(session, "followup.create" if action == "followup" else "packet.close")
    assert [(e["actor"], e["outcome"]) for e in denied] == [(OTHER, "denied")]


def test_a_followup_within_the_log_bound_of_expiry_is_refused_as_expired(
    client: TestClient, token: TokenFactory, session: Session
) -> None:
    """As for an open: the follow-up's entry is stamped once it has the log's lock, up to the
    bound (2 s) later, and no entry may show the packet still in use after it expired."""
    world = world_of(client, token)
    packet = world.packet(OWNER, "Charlois")
    session.execute(
        update(PACKETS)
        .where(PACKETS.c.id == packet["id"])
        .values(expires_at=utcnow() + timedelta(seconds=1))
    )
    session.commit()
    pseudonym = packet["pseudonyms"][0]
    refused = client.post(
        f"/v1/packets/{packet['id']}/clients/{pseudonym}/followups",
        json={"kind": "contact", "date": DAY_B, "outcome_code": "reached"},
        headers=bearer(token(OWNER, "professional")),
    )
    assert refused.status_code == 410, refused.text
    assert "expired" in refused.json()["detail"]
    [entry] = log_entries(session, "followup.create")
    assert (entry["outcome"], entry["reason"]) == ("denied", "packet is expired")


def test_expire_reports_a_due_packet_it_could_not_take_and_exits_1(
    client: TestClient,
    token: TokenFactory,
    session: Session,
    cli_env: None,
    db_url: str,
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PostgreSQL: a due packet a request holds is skipped, tried again a few times, then
    reported (exit 1), and the next run shreds it. SQLite: the held write lock stops the whole
    run, also with exit 1."""
    world = world_of(client, token)
    held = world.packet(OWNER, "Charlois")
    free = world.packet(OTHER, "Feijenoord")
    session.execute(update(PACKETS).values(expires_at=utcnow() - timedelta(minutes=1)))
    session.commit()
    monkeypatch.setenv("CASEPACKETS_LOG_LOCK_TIMEOUT_SECONDS", "0.3")
    monkeypatch.setattr("service.cli.EXPIRE_RETRY_SECONDS", 0.05)
    get_settings.cache_clear()
    runner = CliRunner()
    with HeldLogLock(db_url, "packet-row", held["id"]):
        result = runner.invoke(cli, ["expire"])
    output = " ".join(result.output.split())
    assert result.exit_code == 1, output
    if backend == "postgres":
        assert "crypto-shredded 1 packets" in output
        assert "1 due packets stayed in use by a request or another shredder" in output
        assert packet_state(session, free["id"])["status"] == "expired"
    else:
        assert "busy" in output
    assert packet_state(session, held["id"])["status"] == "assigned"

    again = runner.invoke(cli, ["expire"])
    assert again.exit_code == 0, again.output
    assert_shredded(packet_state(session, held["id"]), "expired", notes=0)
    assert_shredded(packet_state(session, free["id"]), "expired", notes=0)


def reader_with_a_snapshot(database: Database, backend: str) -> Any:
    """A raw connection in a transaction that has read the packets, as pg_dump or a report would
    hold it: SQLite keeps the -wal frames it needs, PostgreSQL the row versions its snapshot sees.
    The caller ends it with ROLLBACK and closes it."""
    reader = database.engine.raw_connection()
    begin = "BEGIN" if backend == "sqlite" else "BEGIN ISOLATION LEVEL REPEATABLE READ"
    reader.driver_connection.execute(begin)  # type: ignore[union-attr]
    reader.driver_connection.execute("SELECT count(*) FROM packets").fetchone()  # type: ignore[union-attr]
    return reader


def run_the_shredder_a_moment(database: Database, retention: RetentionPolicy) -> None:
    """The service's periodic job, every 0.05 s for half a second (a few rounds)."""

    async def a_few_rounds() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                packets_service.shred_periodically(
                    database=database, retention=retention, interval_seconds=0.05
                ),
                timeout=0.5,
            )

    asyncio.run(a_few_rounds())


def test_a_purge_a_reader_holds_up_stays_pending_until_the_periodic_job_finishes_it(
    app: Any,
    client: TestClient,
    token: TokenFactory,
    db_url: str,
    home: Path,
    backend: str,
    session: Session,
) -> None:
    """A reader that started before a shred keeps what the shred overwrote: SQLite's TRUNCATE
    checkpoint cannot empty the -wal file of frames the reader needs, and PostgreSQL's VACUUM
    cannot remove row versions an older snapshot (pg_dump, a report) may still see. The purge
    says so and stays pending, rather than counting as done, and the periodic job finishes it
    once the reader is gone: then nothing that was sealed is left in the database's storage."""
    world = world_of(client, token)
    packet = world.packet(OWNER, "Charlois")
    note_every_client(client, token, packet)
    secrets = sealed_bodies(packet_state(session, packet["id"]))
    settings = Settings(env="test", home=home, database_url=db_url, log_lock_timeout_seconds=0.3)
    database = Database(settings)
    reader = reader_with_a_snapshot(database, backend)
    retention = app.state.retention_policy
    try:
        later = utcnow() + timedelta(days=retention.packet_ttl_days + 1)
        shredded = shred_expired(
            database=database, retention=retention, actor="system:test", now=later
        )
        assert shredded == 2
        assert database.purge_pending
        assert database.purge_replaced_rows() is False
        assert database.purge_pending
        reader.driver_connection.execute("ROLLBACK")

        run_the_shredder_a_moment(database, retention)
        assert not database.purge_pending
        assert_shredded(packet_state(session, packet["id"]), "expired", notes=len(secrets) // 2)
        left = raw_storage(session)
        assert [secret for secret in secrets if secret in left] == []
    finally:
        reader.close()
        database.dispose()


def test_a_restarted_worker_finishes_a_purge_the_stopped_one_left_pending(
    app: Any,
    client: TestClient,
    token: TokenFactory,
    db_url: str,
    home: Path,
    backend: str,
    session: Session,
) -> None:
    """A purge is asked for in the overwrite's own transaction, not kept in the memory of the
    worker that overwrote: when that worker stops (a deploy, the OOM killer, a scale-down)
    before the purge could finish, another worker that overwrote nothing finishes it on its
    next periodic run, so the shredded wraps do not wait in the storage for autovacuum or a
    checkpoint that may not come."""
    world = world_of(client, token)
    packet = world.packet(OWNER, "Charlois")
    note_every_client(client, token, packet)
    secrets = sealed_bodies(packet_state(session, packet["id"]))
    settings = Settings(env="test", home=home, database_url=db_url, log_lock_timeout_seconds=0.3)
    retention = app.state.retention_policy
    stopped = Database(settings)
    reader = reader_with_a_snapshot(stopped, backend)
    try:
        later = utcnow() + timedelta(days=retention.packet_ttl_days + 1)
        assert shred_expired(database=stopped, retention=retention, actor="t", now=later) == 2
        assert stopped.purge_pending
    finally:
        reader.driver_connection.execute("ROLLBACK")
        reader.close()
        stopped.dispose()
    assert [secret for secret in secrets if secret in raw_storage(session)] != []

    restarted = Database(settings)
    try:
        run_the_shredder_a_moment(restarted, retention)
        assert not restarted.purge_pending
        assert [secret for secret in secrets if secret in raw_storage(session)] == []
    finally:
        restarted.dispose()


def test_with_no_purge_asked_for_a_round_neither_vacuums_nor_checkpoints(
    app: Any, db_url: str, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every worker's every round asks whether a purge is pending; only one asked for by an
    overwrite runs VACUUM or the checkpoint (and can warn of rows it could not remove)."""
    database = Database(Settings(env="test", home=home, database_url=db_url))
    purges: list[int | None] = []

    def purge(*, horizon: int | None) -> bool:
        purges.append(horizon)
        return True

    monkeypatch.setattr(database, "_purge", purge)
    try:
        assert not database.purge_pending
        assert database.purge_replaced_rows() is True
        assert purges == []
        with database.transaction() as session:
            db_module.request_purge(session)
        assert database.purge_pending
        assert database.purge_replaced_rows() is True
        assert len(purges) == 1
        assert not database.purge_pending
    finally:
        database.dispose()


def test_a_purge_waits_for_another_process_s_purge_and_then_looks_again(
    app: Any, db_url: str, home: Path, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Workers finding the same purge pending would VACUUM side by side, each skipping the
    tables the other holds and warning that rows were left, and `casepackets expire` would exit
    1: one purges, the others wait for it and find it done."""
    database = Database(Settings(env="test", home=home, database_url=db_url))
    other = Database(Settings(env="test", home=home, database_url=db_url))
    with database.transaction() as session:
        db_module.request_purge(session)
    purged: list[bool] = []
    try:
        with (
            caplog.at_level(logging.WARNING, logger="casepackets"),
            db_module._one_process_at_a_time(db_url, name="purge", key=db_module.PURGE_LOCK_KEY),
        ):
            waiting = threading.Thread(target=lambda: purged.append(other.purge_replaced_rows()))
            waiting.start()
            waiting.join(0.5)
            assert waiting.is_alive()  # waits for the purge holding the lock
            assert database.purge_pending
        waiting.join(10)
        assert purged == [True]
        assert not database.purge_pending
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    finally:
        database.dispose()
        other.dispose()


@pytest.mark.parametrize("databases", ["postgres"], indirect=True)
def test_a_purge_asked_for_by_a_transaction_still_open_during_vacuum_stays_pending(
    app: Any, db_url: str, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Request ids come in insert order, transactions commit in any order: an overwrite with a
    lower id that commits while VACUUM runs was not covered by it, so a purge that deleted every
    request up to the largest id it read would forget it (its rows left in the pages)."""
    database = Database(Settings(env="test", home=home, database_url=db_url))
    early, late = database.session(), database.session()
    try:
        late.execute(text("SELECT pg_current_xact_id()"))  # the older transaction id
        db_module.request_purge(early)  # the lower request id, the younger transaction
        db_module.request_purge(late)
        late.commit()
        early.execute(text("SELECT 1"))  # its snapshot now sees the late one committed
        real_purge = database._purge

        def purge_then_commit_the_early_one(*, horizon: int | None) -> bool:
            done = real_purge(horizon=horizon)
            early.commit()  # after VACUUM, before the requests it covered are deleted
            return done

        monkeypatch.setattr(database, "_purge", purge_then_commit_the_early_one)
        assert database.purge_replaced_rows() is True
        assert database.purge_pending  # the early transaction's request is still there
        monkeypatch.undo()
        assert database.purge_replaced_rows() is True
        assert not database.purge_pending
    finally:
        early.close()
        late.close()
        database.dispose()


def test_the_upgrade_that_stores_purges_asks_for_one_where_subjects_are_stored(
    client: TestClient, token: TokenFactory, db_url: str, home: Path, databases: Databases
) -> None:
    """Before migration 0011 a pending purge lived in a worker's memory, which the upgrade's
    restart forgets: a database holding subjects starts with one purge asked for, a new one
    with none."""
    world_of(client, token)
    db_module.downgrade(db_url, MIGRATIONS, "0010")
    db_module.migrate(db_url, MIGRATIONS)
    upgraded = Database(Settings(env="test", home=home, database_url=db_url))
    new = databases.empty()
    db_module.migrate(new, MIGRATIONS)
    created = Database(Settings(env="test", home=home, database_url=new))
    try:
        assert upgraded.purge_pending
        assert not created.purge_pending
        assert upgraded.purge_replaced_rows() is True
        assert not upgraded.purge_pending
    finally:
        upgraded.dispose()
        created.dispose()


def test_expire_run_again_finishes_the_purge_its_last_run_left_pending(
    client: TestClient,
    token: TokenFactory,
    session: Session,
    cli_env: None,
    database: Database,
    backend: str,
) -> None:
    """`expire` says to run it again when a reader held the purge up; the run after it has
    nothing left to shred, and must still purge (before, it did nothing and exited 0, and the
    shredded keys stayed in the database's files)."""
    world = world_of(client, token)
    packet = world.packet(OWNER, "Charlois")
    note_every_client(client, token, packet)
    secrets = sealed_bodies(packet_state(session, packet["id"]))
    session.execute(
        update(PACKETS)
        .where(PACKETS.c.id == packet["id"])
        .values(expires_at=utcnow() - timedelta(minutes=1))
    )
    session.commit()
    runner = CliRunner()
    reader = reader_with_a_snapshot(database, backend)
    try:
        first = runner.invoke(cli, ["expire"])
    finally:
        reader.driver_connection.execute("ROLLBACK")
        reader.close()
    output = " ".join(first.output.split())
    assert first.exit_code == 1, output
    assert "crypto-shredded 1 packets" in output
    assert "could not be purged" in output

    again = runner.invoke(cli, ["expire"])
    assert again.exit_code == 0, again.output
    assert "crypto-shredded 0 packets" in " ".join(again.output.split())
    left = raw_storage(session)
    assert [secret for secret in secrets if secret in left] == []

    # With no purge pending, a run with nothing to shred is not failed by a reader it never
    # needed to wait for (a backup running while expire runs from cron), whatever was written
    # before that reader began.
    other = world.packet(OTHER, "Feijenoord")
    opened = client.get(
        f"/v1/packets/{other['id']}/clients", headers=bearer(token(OTHER, "professional"))
    )
    assert opened.status_code == 200, opened.text
    reader = reader_with_a_snapshot(database, backend)
    try:
        quiet = runner.invoke(cli, ["expire"])
    finally:
        reader.driver_connection.execute("ROLLBACK")
        reader.close()
    assert quiet.exit_code == 0, quiet.output
    assert "could not be purged" not in quiet.output


@pytest.mark.usefixtures("no_collector_pauses")
def test_a_purge_held_up_by_a_reader_does_not_hold_up_opens_meanwhile(
    app: Any,
    client: TestClient,
    token: TokenFactory,
    db_url: str,
    home: Path,
    backend: str,
    session: Session,
) -> None:
    """SQLite's TRUNCATE checkpoint holds the write lock while it waits for readers of the old
    frames: with the usual busy timeout, every retry of a pending purge (each shred interval, in
    each worker) stopped every open for the whole bound while a report or backup read."""
    world = build_world(
        client, token, professionals={OWNER: ["Charlois", "Feijenoord"]}, per_district=2
    )
    shredded, opened = world.packet(OWNER, "Charlois"), world.packet(OWNER, "Feijenoord")
    settings = Settings(env="test", home=home, database_url=db_url)
    database = Database(settings)
    reader = reader_with_a_snapshot(database, backend)
    try:
        session.execute(
            update(PACKETS)
            .where(PACKETS.c.id == shredded["id"])
            .values(expires_at=utcnow() - timedelta(minutes=1))
        )
        session.commit()
        retention = app.state.retention_policy
        assert shred_expired(database=database, retention=retention, actor="system:test") == 1
        assert database.purge_pending
        purging = threading.Thread(target=database.purge_replaced_rows)
        purging.start()
        time.sleep(0.01)
        started = time.monotonic()
        answer = client.get(
            f"/v1/packets/{opened['id']}/clients", headers=bearer(token(OWNER, "professional"))
        )
        waited = time.monotonic() - started
        purging.join(10)
        assert answer.status_code == 200, answer.text
        assert database.purge_pending  # the reader still needs what the shred overwrote
        # The bound is 2 s; the purge now waits at most a tenth of a second for its lock.
        assert waited < 1.0, waited
    finally:
        reader.driver_connection.execute("ROLLBACK")
        reader.close()
        database.dispose()


def test_a_reader_that_ends_a_moment_after_the_shred_does_not_leave_the_purge_pending(
    app: Any,
    client: TestClient,
    token: TokenFactory,
    db_url: str,
    home: Path,
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request's transaction that began just before a shred holds PostgreSQL's removable
    cutoff back for a moment: the purge tries VACUUM again shortly, and SQLite's checkpoint waits
    for the reader, so neither reports a purge pending that a moment later is not."""
    world = world_of(client, token)
    note_every_client(client, token, world.packet(OWNER, "Charlois"))
    settings = Settings(env="test", home=home, database_url=db_url, log_lock_timeout_seconds=0.5)
    database = Database(settings)
    reader = reader_with_a_snapshot(database, backend)

    def end_reader() -> None:
        reader.driver_connection.execute("ROLLBACK")

    vacuums: list[list[str] | None] = []
    if backend == "sqlite":
        threading.Timer(0.1, end_reader).start()  # while the checkpoint waits for it
    else:
        real_vacuum = db_module._vacuum_wrap_tables

        def vacuum_then_end_reader(connection: Any, *, horizon: int) -> list[str] | None:
            vacuums.append(real_vacuum(connection, horizon=horizon))
            if len(vacuums) == 1:
                end_reader()  # just after the first VACUUM, which it held back
            return vacuums[-1]

        monkeypatch.setattr(db_module, "_vacuum_wrap_tables", vacuum_then_end_reader)
    try:
        retention = app.state.retention_policy
        later = utcnow() + timedelta(days=retention.packet_ttl_days + 1)
        assert shred_expired(database=database, retention=retention, actor="t", now=later) == 2
        assert not database.purge_pending
        if backend == "postgres":
            assert [bool(held_back) for held_back in vacuums] == [True, False]
    finally:
        reader.close()
        database.dispose()


def test_a_purge_another_job_holds_up_stays_pending(db_url: str, home: Path, backend: str) -> None:
    """A purge that cannot get at the storage does not count as done: PostgreSQL's VACUUM
    (``SKIP_LOCKED``) skips a table that an autovacuum, ANALYZE or index build holds, and
    SQLite's checkpoint cannot empty the -wal file while a writer holds the database."""
    settings = Settings(env="test", home=home, database_url=db_url, log_lock_timeout_seconds=0.3)
    database = Database(settings)
    with database.transaction() as session:
        db_module.request_purge(session)  # as a shred or an erasure does
    holder = database.engine.raw_connection()
    try:
        if backend == "sqlite":
            holder.driver_connection.execute("BEGIN IMMEDIATE")  # type: ignore[union-attr]
        else:
            holder.driver_connection.execute(  # type: ignore[union-attr]
                "LOCK TABLE subjects IN SHARE UPDATE EXCLUSIVE MODE"
            )
        assert database.purge_replaced_rows() is False
        assert database.purge_pending
        holder.driver_connection.execute("ROLLBACK")  # type: ignore[union-attr]
        assert database.purge_replaced_rows() is True
        assert not database.purge_pending
    finally:
        holder.close()
        database.dispose()


def test_a_coordinator_may_close_any_packet_another_professional_may_not(
    client: TestClient, token: TokenFactory, session: Session
) -> None:
    world = world_of(client, token)
    packet = world.packet(OWNER, "Charlois")
    for sub, role in (
        (OTHER, "professional"),
        ("source-welfare", "source"),
        ("admin-001", "admin"),
    ):
        response = client.post(
            f"/v1/packets/{packet['id']}/close", headers=bearer(token(sub, role))
        )
        assert response.status_code == 404, (role, response.text)
    closed = client.post(
        f"/v1/packets/{packet['id']}/close", headers=bearer(token(COORDINATOR, "coordinator"))
    )
    assert closed.status_code == 200
    entries = log_entries(session, "packet.close")
    assert [(e["actor"], e["outcome"]) for e in entries] == [
        (OTHER, "denied"),
        ("source-welfare", "denied"),
        ("admin-001", "denied"),
        (COORDINATOR, "allowed"),
    ]


def raw_storage(session: Session) -> bytes:
    """What the database keeps for the tables with wraps, as a reader of its files would find it.

    SQLite: the file and its ``-wal``, byte for byte (freed space is zeroed). PostgreSQL: every
    row version in the heap pages, live or dead (pageinspect). PostgreSQL does not zero the
    space a removed version leaves, so a raw page may hold those bytes until the space is
    reused; that remnant, like WAL archives and backups, is closed by retiring the key version
    (README, "Keys, pseudonyms and crypto-shredding").
    """
    connection = session.connection()
    if connection.dialect.name == "sqlite":
        session.rollback()
        path = Path(str(connection.engine.url.database))
        wal = path.with_name(path.name + "-wal")
        return path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    connection.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pageinspect")
    versions = []
    for table in WRAP_TABLES:
        blocks = connection.exec_driver_sql(
            "SELECT pg_relation_size(%(t)s) / current_setting('block_size')::int", {"t": table}
        ).scalar_one()
        versions += [
            bytes(data)
            for data in connection.exec_driver_sql(
                "SELECT item.t_data FROM generate_series(0, %(last)s) AS n, "
                "heap_page_items(get_raw_page(%(t)s, n::int)) AS item "
                "WHERE item.t_data IS NOT NULL",
                {"t": table, "last": blocks - 1},
            ).scalars()
        ]
    session.commit()
    return b"\x00".join(versions)


def test_erasure_removes_the_subject_from_every_packet_and_from_the_vault(
    app: Any, client: TestClient, token: TokenFactory, session: Session
) -> None:
    world = world_of(client, token)
    first_packet = world.packet(OWNER, "Charlois")
    owner = bearer(token(OWNER, "professional"))
    coordinator = bearer(token(COORDINATOR, "coordinator"))
    assert client.post(f"/v1/packets/{first_packet['id']}/close", headers=owner).status_code == 200
    # a later run flags the closed packet's clients again: a new packet for the same professional
    later = client.post("/v1/flagging/runs", json={"as_of": AS_OF.isoformat()}, headers=coordinator)
    again = client.post(
        "/v1/packets/partition", json={"run_id": later.json()["id"]}, headers=coordinator
    )
    assert again.status_code == 201
    [second_packet] = again.json()["packets"]
    assert second_packet["professional_id"] == OWNER
    erased = first_packet["pseudonyms"][0]
    client.post(
        f"/v1/packets/{second_packet['id']}/clients/{erased}/followups",
        json={"kind": "contact", "date": DAY_B, "outcome_code": "reached", "note": NOTE},
        headers={**owner, "Idempotency-Key": "erasure-test"},
    )

    # What a source wrote about them, and what two Idempotency-Keys kept of their requests.
    source = bearer(token("source-welfare", "source"))
    written = "Buurvrouw meldt dat mevrouw Quaedvlieg haar post niet meer opent."
    pushed = client.post(
        "/v1/flags",
        json={"flags": [{"pseudonym": erased, "reason_code": "neighbour", "explanation": written}]},
        headers={**source, "Idempotency-Key": "push-erasure-test"},
    )
    assert pushed.status_code == 201, pushed.text
    person = world.people[erased]
    sent_again = {
        "identity": person.identity,
        "characteristics": person.characteristics,
        "events": [],
    }
    resent = client.post(
        "/v1/records/batch",
        json={"subjects": [sent_again]},
        headers={**source, "Idempotency-Key": "batch-erasure-test"},
    )
    assert resent.json()["rows"][0]["status"] == "unchanged", resent.text
    request_digests = [
        session.execute(text("SELECT request_digest FROM flag_pushes")).scalar_one(),
        session.execute(
            text("SELECT request_digest FROM ingest_batches WHERE idempotency_key IS NOT NULL")
        ).scalar_one(),
    ]

    stored = [
        *session.execute(
            select(SUBJECTS.c.wrapped_dek, SUBJECTS.c.identity_ciphertext).where(
                SUBJECTS.c.pseudonym == erased
            )
        ).one(),
        *session.execute(
            select(MEMBERS.c.wrapped_dek).where(MEMBERS.c.pseudonym == erased)
        ).scalars(),
        *session.execute(
            select(FOLLOWUPS.c.note_ciphertext).where(FOLLOWUPS.c.pseudonym == erased)
        ).scalars(),
    ]
    # The HMAC of the request under the packet key, against which a guessed note could be tried.
    digest = session.execute(
        select(FOLLOWUPS.c.request_digest).where(FOLLOWUPS.c.pseudonym == erased)
    ).scalar_one()
    session.rollback()
    assert len(stored) == 5
    assert all(stored)
    assert digest
    # The base64 body of each ciphertext (after "v1.<version>."), as the files hold it.
    secrets = [value.split(".", 2)[2].encode() for value in stored] + [digest.encode()]
    secrets += [written.encode()] + [d.split(":", 1)[1].encode() for d in request_digests]
    assert all(secret in raw_storage(session) for secret in secrets)

    response = client.post(
        f"/v1/subjects/{erased}/erase", headers=bearer(token("admin-001", "admin"))
    )
    assert response.status_code == 200, response.text
    # Not even an old row version or page image keeps them (PostgreSQL: VACUUM after the
    # erasure; SQLite: freed space zeroed and the -wal emptied).
    leftovers = raw_storage(session)
    assert [secret in leftovers for secret in secrets] == [False] * 9
    erasures = log_entries(session, "subject.erase")
    assert erasures[-1]["reason"] == "packet_wraps_removed=2"

    subject = session.execute(
        select(SUBJECTS.c.wrapped_dek, SUBJECTS.c.identity_ciphertext).where(
            SUBJECTS.c.pseudonym == erased
        )
    ).one()
    wraps = session.execute(
        select(MEMBERS.c.packet_id, MEMBERS.c.wrapped_dek).where(MEMBERS.c.pseudonym == erased)
    ).all()
    notes = list(
        session.execute(
            select(FOLLOWUPS.c.note_ciphertext).where(FOLLOWUPS.c.pseudonym == erased)
        ).scalars()
    )
    session.rollback()
    assert tuple(subject) == (None, None)
    assert sorted(p for p, _ in wraps) == sorted([first_packet["id"], second_packet["id"]])
    assert all(w is None for _, w in wraps)
    assert notes == [None]
    # with the keyring in hand the packet keys still unwrap, but no wrap of this DEK is left
    for packet_id in (first_packet["id"], second_packet["id"]):
        assert recoverable_packet_key(session, app.state.keyring, packet_id) is not None

    opened = client.get(f"/v1/packets/{second_packet['id']}/clients", headers=owner)
    assert opened.status_code == 200
    assert {c["pseudonym"]: c["note"] for c in opened.json()["clients"]}[erased] == "erased"
    assert leaked(opened.text, set(world.people[erased].secrets) | {NOTE}) == []


def test_concurrent_shredders_shred_each_packet_exactly_once(
    app: Any, client: TestClient, token: TokenFactory, session: Session, database: Database
) -> None:
    build_world(
        client,
        token,
        professionals={OWNER: ["Charlois", "Feijenoord", "IJsselmonde"], OTHER: ["Delfshaven"]},
        per_district=2,
    )
    retention = app.state.retention_policy
    later = utcnow() + timedelta(days=retention.packet_ttl_days + 1)
    totals: list[int] = []

    def shred() -> None:
        totals.append(
            shred_expired(
                database=database, retention=retention, actor="system:test", now=later, batch_size=1
            )
        )

    threads = [threading.Thread(target=shred) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(totals) == 4
    shreds = log_entries(session, "packet.shred")
    assert len(shreds) == 4
    assert len({e["object_id"] for e in shreds}) == 4
    statuses = set(session.execute(select(PACKETS.c.status)).scalars())
    session.rollback()
    assert statuses == {"expired"}


def test_a_stopped_shredder_returns_only_once_its_round_in_flight_has_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A round runs in a thread, which cancelling cannot stop: the service disposed of the
    database while a round still used it (a connection left open, found by a ResourceWarning).
    Cancelling now waits for the round."""
    ended: list[str] = []

    def slow_round(**_: Any) -> tuple[int, bool]:
        time.sleep(0.3)
        ended.append("round")
        return 0, False

    monkeypatch.setattr(packets_service, "_shredding_round", slow_round)

    async def stop_during_a_round() -> None:
        unused: Any = None  # the round that would use them is replaced
        shredder = asyncio.create_task(
            packets_service.shred_periodically(
                database=unused, retention=unused, interval_seconds=0.01
            )
        )
        await asyncio.sleep(0.1)  # the first round is in its thread now
        shredder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await shredder
        ended.append("stopped")

    asyncio.run(stop_during_a_round())
    assert ended == ["round", "stopped"]


def test_the_service_shreds_due_packets_periodically(
    client: TestClient,
    token: TokenFactory,
    session: Session,
    db_url: str,
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world = world_of(client, token)
    packet = world.packet(OWNER, "Charlois")
    note_every_client(client, token, packet)
    secrets = sealed_bodies(packet_state(session, packet["id"]))
    assert len(secrets) == 1 + 2 * len(packet["pseudonyms"])
    assert all(secret in raw_storage(session) for secret in secrets)
    session.execute(
        update(PACKETS)
        .where(PACKETS.c.id == packet["id"])
        .values(expires_at=utcnow() - timedelta(minutes=1))
    )
    session.commit()
    periodic = Settings(env="test", home=home, database_url=db_url, shred_interval_seconds=0.05)
    database = Database(periodic)
    purges: list[bool] = []
    real_purge = database.purge_replaced_rows

    def observed_purge() -> bool:
        purged = real_purge()
        purges.append(purged)
        return purged

    monkeypatch.setattr(database, "purge_replaced_rows", observed_purge)
    try:
        with TestClient(create_app(periodic, database=database)):
            # Wait for the job's purge, which follows its shred, without reading the database
            # meanwhile: a reader could keep the overwritten rows from being purged.
            deadline = time.monotonic() + 30
            while True not in purges:
                assert time.monotonic() < deadline, (
                    "the periodic shredder never shredded and purged"
                )
                time.sleep(0.05)
    finally:
        database.dispose()
    state = packet_state(session, packet["id"])
    assert_shredded(state, "expired", notes=len(packet["pseudonyms"]))
    assert state["outcome_codes"] == ["reached"] * len(packet["pseudonyms"])
    leftovers = raw_storage(session)
    assert [s for s in secrets if s in leftovers] == []
    assert [e["actor"] for e in log_entries(session, "packet.shred")] == ["system:shredder"]


# -- a retention policy changed after packets were built ---------------------------------------

SHIPPED_TTL_DAYS = 90


def with_ttl(settings: Settings, folder: Path, days: int) -> Settings:
    """``settings`` with the shipped policies but ``packet_ttl_days: days``, as a municipality
    edits ``policies/retention.yaml`` (say after a DPIA) and restarts the service."""
    policies = folder / f"policies-ttl-{days}"
    shutil.copytree(settings.policies_dir, policies)
    retention = policies / "retention.yaml"
    shipped = retention.read_text()
    assert f"\npacket_ttl_days: {SHIPPED_TTL_DAYS}\n" in shipped
    retention.write_text(
        shipped.replace(f"\npacket_ttl_days: {SHIPPED_TTL_DAYS}\n", f"\npacket_ttl_days: {days}\n")
    )
    return settings.model_copy(update={"policies_dir": policies})


def built_days_ago(session: Session, packet_id: str, days: int) -> datetime:
    """Make the packet one built ``days`` ago under the shipped TTL; returns its build time."""
    built = utcnow() - timedelta(days=days)
    session.execute(
        update(PACKETS)
        .where(PACKETS.c.id == packet_id)
        .values(created_at=built, expires_at=built + timedelta(days=SHIPPED_TTL_DAYS))
    )
    session.commit()
    return built


def stored_expiry(session: Session, packet_id: str) -> datetime:
    expires_at = session.execute(
        select(PACKETS.c.expires_at).where(PACKETS.c.id == packet_id)
    ).scalar_one()
    session.rollback()
    return as_utc(expires_at)


def shown(client: TestClient, token: TokenFactory, packet_id: str) -> dict[str, Any]:
    """The packet's metadata, as its owner's coordinator reads it."""
    response = client.get(
        f"/v1/packets/{packet_id}", headers=bearer(token(COORDINATOR, "coordinator"))
    )
    assert response.status_code == 200, response.text
    metadata: dict[str, Any] = response.json()
    return metadata


def test_a_lowered_ttl_binds_the_packets_already_built_from_start_up(
    client: TestClient,
    token: TokenFactory,
    session: Session,
    settings: Settings,
    database: Database,
    tmp_path: Path,
) -> None:
    world = world_of(client, token)
    older, younger = world.packet(OWNER, "Charlois"), world.packet(OTHER, "Feijenoord")
    older_built = built_days_ago(session, older["id"], 60)
    younger_built = built_days_ago(session, younger["id"], 10)
    lowered = with_ttl(settings, tmp_path, 30)

    with TestClient(create_app(lowered, database=database), raise_server_exceptions=False) as c:
        # The first request after start-up: the 60-day-old packet is past the 30 days.
        owner = bearer(token(OWNER, "professional"))
        opened = c.get(f"/v1/packets/{older['id']}/clients", headers=owner)
        assert opened.status_code == 410
        assert "expired" in opened.json()["detail"]
        assert leaked(opened.text, world.secrets) == []
        followup = c.post(
            f"/v1/packets/{older['id']}/clients/{older['pseudonyms'][0]}/followups",
            json={"kind": "contact", "date": DAY_B},
            headers=owner,
        )
        assert followup.status_code == 410, followup.text
        metadata = shown(c, token, older["id"])
        assert metadata["status"] == "expired"
        assert datetime.fromisoformat(metadata["expires_at"]) == older_built + timedelta(days=30)
        # The 10-day-old one stays in use, for 20 more days rather than 80.
        metadata = shown(c, token, younger["id"])
        assert metadata["status"] == "assigned"
        assert datetime.fromisoformat(metadata["expires_at"]) == younger_built + timedelta(days=30)
        other = bearer(token(OTHER, "professional"))
        assert c.get(f"/v1/packets/{younger['id']}/clients", headers=other).status_code == 200

    denied = [e for e in log_entries(session, "packet.open") if e["outcome"] == "denied"]
    assert [(e["object_id"], e["reason"]) for e in denied] == [(older["id"], "packet is expired")]
    moved = log_entries(session, "packet.expiry")
    assert sorted((e["actor"], e["role"], e["object_id"], e["outcome"]) for e in moved) == sorted(
        ("system:startup", "system", packet["id"], "allowed") for packet in (older, younger)
    )
    by_packet = {e["object_id"]: e for e in moved}
    assert by_packet[older["id"]]["reason"] == (
        f"expires {(older_built + timedelta(days=30)).isoformat()}, "
        f"not {(older_built + timedelta(days=90)).isoformat()}: "
        "packet_ttl_days 30 (retention policy version 1)"
    )
    # ids and times only: nobody's pseudonym, and no identity
    assert all(e["pseudonyms"] == [] for e in moved)
    assert leaked(json.dumps(moved), world.secrets) == []


def test_a_lowered_ttl_binds_a_closed_packet_still_in_its_grace_too(
    client: TestClient,
    token: TokenFactory,
    session: Session,
    settings: Settings,
    database: Database,
    tmp_path: Path,
) -> None:
    """A closed packet keeps its key through the grace period, but never past the TTL: one
    built 60 days ago and closed yesterday is shredded at once under a TTL lowered to 30."""
    world = world_of(client, token)
    packet = world.packet(OWNER, "Charlois")
    closed = client.post(
        f"/v1/packets/{packet['id']}/close", headers=bearer(token(OWNER, "professional"))
    )
    assert closed.status_code == 200, closed.text
    built = built_days_ago(session, packet["id"], 60)
    lowered = with_ttl(settings, tmp_path, 30)
    retention = load_retention_policy(lowered.policies_dir / "retention.yaml")
    assert retention.closed_grace_days > 1

    brought = packets_service.bring_expiries_forward(
        database=database, retention=retention, actor="system:test"
    )
    # this one, and the other professional's (built today, for 90 days)
    assert (brought.moved, brought.left) == (2, 0)
    assert stored_expiry(session, packet["id"]) == built + timedelta(days=30)
    assert shred_expired(database=database, retention=retention, actor="system:test") == 1
    assert_shredded(packet_state(session, packet["id"]), "shredded", notes=0)
    [entry] = log_entries(session, "packet.shred")
    assert entry["reason"] == f"expired {(built + timedelta(days=30)).isoformat()}"


def test_expire_under_a_lowered_ttl_shreds_the_packets_past_it(
    client: TestClient,
    token: TokenFactory,
    session: Session,
    settings: Settings,
    tmp_path: Path,
    cli_env: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The service still runs with the policy it read at start-up; the command reads the file."""
    world = world_of(client, token)
    older, younger = world.packet(OWNER, "Charlois"), world.packet(OTHER, "Feijenoord")
    older_built = built_days_ago(session, older["id"], 60)
    younger_built = built_days_ago(session, younger["id"], 10)
    monkeypatch.setenv(
        "CASEPACKETS_POLICIES_DIR", str(with_ttl(settings, tmp_path, 30).policies_dir)
    )
    get_settings.cache_clear()

    result = CliRunner().invoke(cli, ["expire"])
    said = " ".join(result.output.split())
    assert result.exit_code == 0, said
    assert "brought the expiry of 2 packets forward to 30 days after they were built" in said
    assert "crypto-shredded 1 packets" in said

    assert_shredded(packet_state(session, older["id"]), "expired", notes=0)
    assert_gone_everywhere(client, token, world, older)
    assert stored_expiry(session, older["id"]) == older_built + timedelta(days=30)
    assert packet_state(session, younger["id"])["wrapped_key"] is not None
    assert stored_expiry(session, younger["id"]) == younger_built + timedelta(days=30)
    moved = log_entries(session, "packet.expiry")
    assert sorted((e["actor"], e["object_id"]) for e in moved) == sorted(
        ("system:expire", packet["id"]) for packet in (older, younger)
    )
    [shred] = log_entries(session, "packet.shred")
    assert (shred["actor"], shred["object_id"], shred["reason"]) == (
        "system:expire",
        older["id"],
        f"expired {(older_built + timedelta(days=30)).isoformat()}",
    )
    # run again: nothing left to move, nothing logged twice
    again = CliRunner().invoke(cli, ["expire"])
    assert again.exit_code == 0, again.output
    assert "brought" not in again.output
    assert len(log_entries(session, "packet.expiry")) == 2


def test_a_raised_ttl_extends_no_packet_not_even_one_a_lowering_shortened(
    client: TestClient,
    token: TokenFactory,
    session: Session,
    settings: Settings,
    database: Database,
    tmp_path: Path,
) -> None:
    world = world_of(client, token)
    older, newest = world.packet(OWNER, "Charlois"), world.packet(OTHER, "Feijenoord")
    built = built_days_ago(session, older["id"], 10)
    as_built = stored_expiry(session, newest["id"])
    with TestClient(create_app(with_ttl(settings, tmp_path, 30), database=database)):
        pass
    assert stored_expiry(session, older["id"]) == built + timedelta(days=30)
    assert len(log_entries(session, "packet.expiry")) == 2

    raised = with_ttl(settings, tmp_path, 120)
    with TestClient(create_app(raised, database=database), raise_server_exceptions=False) as c:
        assert datetime.fromisoformat(shown(c, token, older["id"])["expires_at"]) == (
            built + timedelta(days=30)
        )
    retention = load_retention_policy(raised.policies_dir / "retention.yaml")
    assert retention.packet_ttl_days == 120
    assert shred_expired(database=database, retention=retention, actor="system:test") == 0
    assert stored_expiry(session, older["id"]) == built + timedelta(days=30)
    assert stored_expiry(session, newest["id"]) == as_built - timedelta(days=60)
    assert len(log_entries(session, "packet.expiry")) == 2


def test_shredders_at_once_under_a_lowered_ttl_move_and_log_each_expiry_once(
    app: Any, client: TestClient, token: TokenFactory, session: Session, database: Database
) -> None:
    build_world(
        client,
        token,
        professionals={OWNER: ["Charlois", "Feijenoord", "IJsselmonde"], OTHER: ["Delfshaven"]},
        per_district=2,
    )
    packet_ids = list(session.execute(select(PACKETS.c.id)).scalars())
    session.rollback()
    assert len(packet_ids) == 4
    built = {packet_id: built_days_ago(session, packet_id, 60) for packet_id in packet_ids}
    lowered = replace(app.state.retention_policy, packet_ttl_days=30)
    totals: list[int] = []

    def shred() -> None:  # as each worker does as it starts, then in its first round
        packets_service.bring_expiries_forward(
            database=database, retention=lowered, actor="system:test", batch_size=1
        )
        totals.append(
            shred_expired(database=database, retention=lowered, actor="system:test", batch_size=1)
        )

    threads = [threading.Thread(target=shred) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(totals) == 4
    moved = log_entries(session, "packet.expiry")
    assert sorted(e["object_id"] for e in moved) == sorted(packet_ids)
    assert sorted(e["object_id"] for e in log_entries(session, "packet.shred")) == sorted(
        packet_ids
    )
    for packet_id, when in built.items():
        assert stored_expiry(session, packet_id) == when + timedelta(days=30)


def test_shredding_rounds_leave_expiries_alone_once_start_up_has_applied_the_ttl(
    app: Any, client: TestClient, token: TokenFactory, session: Session, database: Database
) -> None:
    """During a rolling deploy that raises packet_ttl_days, a worker still on the lower one must
    not shorten the packets the new workers build: its rounds bring no expiry forward. Only a
    start-up that could not finish leaves that to the rounds."""
    world = world_of(client, token)
    packet = world.packet(OWNER, "Charlois")
    built = built_days_ago(session, packet["id"], 60)
    lower = replace(app.state.retention_policy, packet_ttl_days=30)
    assert packets_service._shredding_round(
        database=database, retention=lower, expiries_pending=False
    ) == (0, False)
    assert stored_expiry(session, packet["id"]) == built + timedelta(days=90)
    assert log_entries(session, "packet.expiry") == []
    assert packets_service._shredding_round(
        database=database, retention=lower, expiries_pending=True
    ) == (1, False)
    assert stored_expiry(session, packet["id"]) == built + timedelta(days=30)
    moved = log_entries(session, "packet.expiry")
    assert packet["id"] in [e["object_id"] for e in moved]
    assert {e["actor"] for e in moved} == {"system:shredder"}


def test_a_round_whose_expiry_pass_fails_still_shreds_and_tries_again_next_time(
    app: Any,
    client: TestClient,
    token: TokenFactory,
    session: Session,
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world = world_of(client, token)
    packet = world.packet(OWNER, "Charlois")
    built_days_ago(session, packet["id"], 120)  # due under the shipped 90 days already
    retention = app.state.retention_policy

    def busy(**_: Any) -> packets_service.BroughtForward:
        raise LogUnavailable("the access log is busy")

    monkeypatch.setattr(packets_service, "bring_expiries_forward", busy)
    assert packets_service._shredding_round(
        database=database, retention=retention, expiries_pending=True
    ) == (1, True)
    assert_shredded(packet_state(session, packet["id"]), "expired", notes=0)


def test_expire_tries_again_for_packets_a_request_held(
    cli_env: None, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    passes: list[packets_service.BroughtForward] = [
        packets_service.BroughtForward(moved=2, left=1),
        packets_service.BroughtForward(moved=1, left=0),
    ]
    monkeypatch.setattr(packets_service, "bring_expiries_forward", lambda **_: passes.pop(0))
    monkeypatch.setattr("service.cli.EXPIRE_RETRY_SECONDS", 0)
    result = CliRunner().invoke(cli, ["expire"])
    said = " ".join(result.output.split())
    assert result.exit_code == 0, said
    assert passes == []
    assert "brought the expiry of 3 packets forward" in said
    assert "stayed in use" not in said


@pytest.mark.parametrize(
    "databases", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_a_packet_a_request_holds_is_left_for_the_next_pass_not_waited_for(
    app: Any, client: TestClient, token: TokenFactory, session: Session, database: Database
) -> None:
    world = world_of(client, token)
    held, free = world.packet(OWNER, "Charlois"), world.packet(OTHER, "Feijenoord")
    for packet in (held, free):
        built_days_ago(session, packet["id"], 60)
    lower = replace(app.state.retention_policy, packet_ttl_days=30)
    holder = database.engine.connect()
    try:
        holder.execute(text("SELECT id FROM packets WHERE id = :id FOR UPDATE"), {"id": held["id"]})
        started = time.monotonic()
        brought = packets_service.bring_expiries_forward(
            database=database, retention=lower, actor="system:test"
        )
        assert time.monotonic() - started < 1.5  # not the 2 s lock bound
        assert (brought.moved, brought.left) == (1, 1)
        holder.rollback()
    finally:
        holder.close()
    brought = packets_service.bring_expiries_forward(
        database=database, retention=lower, actor="system:test"
    )
    assert (brought.moved, brought.left) == (1, 0)
    assert sorted(e["object_id"] for e in log_entries(session, "packet.expiry")) == sorted(
        (held["id"], free["id"])
    )


def erasure(client: TestClient, token: TokenFactory, pseudonym: str) -> Request:
    admin = bearer(token("admin-001", "admin"))
    return lambda: client.post(f"/v1/subjects/{pseudonym}/erase", headers=admin)


def partitioning(client: TestClient, token: TokenFactory, run_id: str) -> Request:
    coordinator = bearer(token(COORDINATOR, "coordinator"))
    return lambda: client.post(
        "/v1/packets/partition", json={"run_id": run_id}, headers=coordinator
    )


def world_with_a_closed_packet(
    client: TestClient, token: TokenFactory
) -> tuple[World, dict[str, Any]]:
    """A fresh world whose owner has closed the Charlois packet, and a later run that flags
    everyone again (``world.run_id``): partitioning it places that packet's clients anew."""
    world = world_of(client, token)
    closed = world.packet(OWNER, "Charlois")
    owner = bearer(token(OWNER, "professional"))
    assert client.post(f"/v1/packets/{closed['id']}/close", headers=owner).status_code == 200
    coordinator = bearer(token(COORDINATOR, "coordinator"))
    later = client.post("/v1/flagging/runs", json={"as_of": AS_OF.isoformat()}, headers=coordinator)
    assert later.status_code == 201, later.text
    return replace(world, run_id=later.json()["id"]), closed


def owners_first_client(client: TestClient, token: TokenFactory) -> tuple[dict[str, Any], str]:
    """A fresh world's packet of the owner in Charlois, and the pseudonym of its first client."""
    packet = world_of(client, token).packet(OWNER, "Charlois")
    return packet, packet["pseudonyms"][0]


def test_an_erasure_during_partitioning_removes_the_new_packet_wraps(
    client: TestClient, token: TokenFactory, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    world, closed = world_with_a_closed_packet(client, token)
    erased = closed["pseudonyms"][0]
    interleaving = Interleaving()
    # stopped once every candidate's vault wrap is read
    interleaving.stop_after(monkeypatch, packets_service, "_candidates")

    statuses = interleaving.run(
        partitioning(client, token, world.run_id), erasure(client, token, erased)
    )

    assert statuses == (201, 200)
    wraps = session.execute(
        select(MEMBERS.c.packet_id, MEMBERS.c.wrapped_dek).where(MEMBERS.c.pseudonym == erased)
    ).all()
    session.rollback()
    # the closed packet and the one just built both hold the subject, neither a wrap of its DEK
    assert len(wraps) == 2
    assert [wrap for _, wrap in wraps] == [None, None]


def test_an_erasure_during_a_followup_removes_its_note(
    client: TestClient, token: TokenFactory, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    packet, erased = owners_first_client(client, token)
    interleaving = Interleaving()
    log_packet = packets_service._log_packet

    def pause_then_log(*args: Any, **kwargs: Any) -> None:
        if kwargs["action"] == "followup.create":  # the note row is written, not yet committed
            interleaving.pause()
        log_packet(*args, **kwargs)

    monkeypatch.setattr(packets_service, "_log_packet", pause_then_log)

    def followup() -> Answer:
        return client.post(
            f"/v1/packets/{packet['id']}/clients/{erased}/followups",
            json={"kind": "contact", "date": DAY_B, "outcome_code": "reached", "note": NOTE},
            headers=bearer(token(OWNER, "professional")),
        )

    assert interleaving.run(followup, erasure(client, token, erased)) == (201, 200)
    notes = session.execute(
        select(FOLLOWUPS.c.outcome_code, FOLLOWUPS.c.note_ciphertext).where(
            FOLLOWUPS.c.pseudonym == erased
        )
    ).all()
    session.rollback()
    assert [tuple(note) for note in notes] == [("reached", None)]


def test_an_erasure_during_an_open_waits_so_the_log_shows_the_open_first(
    client: TestClient,
    token: TokenFactory,
    settings: Settings,
    session: Session,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    packet, erased = owners_first_client(client, token)
    interleaving = Interleaving()
    # stopped once the members' wraps and identity ciphertexts are read, before the log entry
    interleaving.stop_after(monkeypatch, packets_service, "_sealed_contents")

    def open_() -> Answer:
        owner = bearer(token(OWNER, "professional"))
        return client.get(f"/v1/packets/{packet['id']}/clients", headers=owner)

    # The erasure goes to another worker, as it would in production: on SQLite a batch of opens
    # runs on its worker's event loop, so that worker takes no request while the open is stopped.
    other_database = Database(settings)
    try:
        with TestClient(create_app(settings, database=other_database)) as other_worker:
            statuses = interleaving.run(open_, erasure(other_worker, token, erased))
    finally:
        other_database.dispose()
    assert statuses == (200, 200)
    entries = [
        (e["action"], e["pseudonyms"])
        for e in log_entries(session)
        if e["action"] in ("packet.open", "subject.erase")
    ]
    # The open came first and revealed the subject while it still existed; the erasure waited
    # for it. Never an erasure confirmed first and the erased identity revealed after it.
    assert entries == [("packet.open", sorted(packet["pseudonyms"])), ("subject.erase", [erased])]
    assert (
        client.get(
            f"/v1/packets/{packet['id']}/clients", headers=bearer(token(OWNER, "professional"))
        ).json()["clients"][0]["identity"]
        is None
    )


def test_two_partitionings_at_once_place_each_client_once(
    client: TestClient, token: TokenFactory, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    world, _closed = world_with_a_closed_packet(client, token)
    interleaving = Interleaving()
    # stopped once the candidates, who is in an open packet and the team's loads are read
    interleaving.stop_after(monkeypatch, packets_service, "_team")

    statuses = interleaving.run(
        partitioning(client, token, world.run_id), partitioning(client, token, world.run_id)
    )

    assert statuses == (201, 201)
    in_open_packets = Counter(
        session.execute(
            select(MEMBERS.c.pseudonym)
            .select_from(MEMBERS.join(PACKETS, PACKETS.c.id == MEMBERS.c.packet_id))
            .where(PACKETS.c.status.in_(["assigned", "opened"]))
        ).scalars()
    )
    session.rollback()
    assert set(in_open_packets) == set(world.people)
    assert set(in_open_packets.values()) == {1}
    assert len(log_entries(session, "packet.build")) == len(world.packets) + 1


def test_two_reassignments_at_once_never_fill_a_professional_beyond_capacity(
    client: TestClient, token: TokenFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    world = world_of(client, token)  # packets of three clients
    coordinator = bearer(token(COORDINATOR, "coordinator"))
    newcomer = {
        "id": "prof-003",
        "display_name": "Caseworker prof-003",
        "team": "Zuid-1",
        "districts": ["Charlois", "Feijenoord"],
        "capacity": 5,  # room for one packet, not two
    }
    assert client.post("/v1/professionals", json=newcomer, headers=coordinator).status_code == 201
    interleaving = Interleaving()
    # stopped once the newcomer's load is read and found to leave room
    interleaving.stop_after(monkeypatch, packets_service, "open_loads")

    def reassign(packet: dict[str, Any]) -> Request:
        return lambda: client.post(
            f"/v1/packets/{packet['id']}/reassign",
            json={"professional_id": "prof-003"},
            headers=coordinator,
        )

    statuses = interleaving.run(
        reassign(world.packet(OWNER, "Charlois")), reassign(world.packet(OTHER, "Feijenoord"))
    )

    assert statuses == (200, 409)
    listed = client.get("/v1/professionals", headers=coordinator).json()["items"]
    assert {p["id"]: p["open_load"] for p in listed}["prof-003"] == 3
