"""Erasure shreds one subject; rewrap moves every wrap forward; everyone else stays readable."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text, update
from sqlmodel import Session

from service.crypto import envelope
from service.crypto.envelope import DecryptionFailed
from service.crypto.keyring import Keyring, UnknownKey
from service.db import Database
from service.records import service as records_service
from service.records.service import (
    ERASED_DIGEST,
    SUBJECTS,
    WRAPPED_KEY_COLUMNS,
    SubjectErased,
    count_key_dependents,
    decrypt_identity,
    get_subject,
    pending_rewraps,
    rewrap_chunk,
    subject_dek,
)
from tests.conftest import Interleaving, TokenFactory, bearer
from tests.flagging.seed import log_entries
from tests.records.conftest import Record, count_rows

Make = Callable[..., Record]


@pytest.fixture
def own_keyring(app: FastAPI, tmp_path: Path) -> Keyring:
    keyring = Keyring.init(tmp_path / "keyring.json")
    app.state.keyring = keyring
    return keyring


def ingest(client: TestClient, headers: dict[str, str], records: list[Record]) -> list[str]:
    response = client.post("/v1/records/batch", json={"subjects": records}, headers=headers)
    assert response.status_code == 200, response.text
    return [row["pseudonym"] for row in response.json()["rows"]]


def family_name(session: Session, keyring: Keyring, pseudonym: str) -> str:
    subject = get_subject(session=session, pseudonym=pseudonym)
    try:
        dek = subject_dek(keyring=keyring, subject=subject)
        return decrypt_identity(keyring=keyring, subject=subject, dek=dek).family_name
    finally:
        session.rollback()


def test_erasure_shreds_one_subject_and_keeps_events_and_everyone_else(
    client: TestClient,
    session: Session,
    own_keyring: Keyring,
    source_headers: dict[str, str],
    admin_headers: dict[str, str],
    make: Make,
) -> None:
    pseudonyms = ingest(client, source_headers, [make(i) for i in range(4)])
    response = client.post(f"/v1/subjects/{pseudonyms[1]}/erase", headers=admin_headers)
    assert response.status_code == 200, response.text
    assert response.json()["already_erased"] is False
    assert response.json()["events_kept"] == 3

    erased = get_subject(session=session, pseudonym=pseudonyms[1])
    assert erased.wrapped_dek is None
    assert erased.identity_ciphertext is None
    assert erased.erased_at is not None
    with pytest.raises(SubjectErased):
        subject_dek(keyring=own_keyring, subject=erased)
    session.rollback()
    for index in (0, 2, 3):
        assert family_name(session, own_keyring, pseudonyms[index]) == f"Zwanenburg{index}"
    assert count_rows(session, "events") == 12

    again = client.post(f"/v1/subjects/{pseudonyms[1]}/erase", headers=admin_headers)
    assert again.json()["already_erased"] is True
    # The same moment both times, with its time zone (SQLite reads it back without one).
    first, repeated = (
        datetime.fromisoformat(r.json()["erased_at"].replace("Z", "+00:00"))
        for r in (response, again)
    )
    assert repeated == first
    assert repeated.utcoffset() == timedelta(0)
    # A source sending the person again does not bring the identity back.
    rows = client.post(
        "/v1/records/batch", json={"subjects": [make(1, prefix="later")]}, headers=source_headers
    ).json()["rows"]
    assert rows[0]["status"] == "erased"
    assert rows[0]["pseudonym"] == pseudonyms[1]
    assert get_subject(session=session, pseudonym=pseudonyms[1]).wrapped_dek is None
    assert count_rows(session, "events") == 15, "its new events are stored, pseudonymized"
    session.rollback()
    # Each erasure is in the access log under the pseudonym it erased, the second as such.
    logged = [
        (entry["actor"], entry["object_id"], entry["pseudonyms"], entry["reason"])
        for entry in log_entries(session, "subject.erase")
    ]
    assert logged == [
        ("admin-001", pseudonyms[1], [pseudonyms[1]], "packet_wraps_removed=0"),
        ("admin-001", pseudonyms[1], [pseudonyms[1]], "already erased"),
    ]


def test_erasure_needs_the_admin_role_and_an_existing_subject(
    client: TestClient, token: TokenFactory, admin_headers: dict[str, str]
) -> None:
    professional = bearer(token("prof-001", "professional"))
    assert client.post(f"/v1/subjects/{'a' * 32}/erase", headers=professional).status_code == 403
    assert client.post(f"/v1/subjects/{'a' * 32}/erase", headers=admin_headers).status_code == 404
    assert (
        client.post("/v1/subjects/not-a-pseudonym/erase", headers=admin_headers).status_code == 422
    )


def test_erasure_is_logged(
    client: TestClient,
    session: Session,
    source_headers: dict[str, str],
    admin_headers: dict[str, str],
    make: Make,
) -> None:
    (pseudonym,) = ingest(client, source_headers, [make(0)])
    before = count_rows(session, "access_log_entries")
    client.post(f"/v1/subjects/{pseudonym}/erase", headers=admin_headers)
    assert count_rows(session, "access_log_entries") == before + 1


def test_rewrap_moves_every_wrap_and_unblocks_retirement(
    client: TestClient,
    session: Session,
    database: Database,
    own_keyring: Keyring,
    source_headers: dict[str, str],
    admin_headers: dict[str, str],
    make: Make,
    rotations_settled: None,
    keyring_followed_at_once: None,
) -> None:
    pseudonyms = ingest(client, source_headers, [make(i) for i in range(7)])
    client.post(f"/v1/subjects/{pseudonyms[3]}/erase", headers=admin_headers)
    with Keyring.edit(own_keyring.path) as command:
        command.rotate("vault")
    vault = next(c for c in WRAPPED_KEY_COLUMNS if c.purpose == "vault")
    with database.transaction() as tx:
        assert count_key_dependents(session=tx, purpose="vault", version=1) == 6
        assert pending_rewraps(session=tx, keyring=own_keyring, wrapped=vault) == 6

    after, moved_total = 0, 0
    while True:  # small chunks, one transaction each: the command's resumable loop
        with database.transaction() as tx:
            last, moved = rewrap_chunk(
                session=tx, keyring=own_keyring, wrapped=vault, after_id=after, limit=2
            )
        if last == after:
            break
        after, moved_total = last, moved_total + moved
    assert moved_total == 6

    with database.transaction() as tx:
        assert count_key_dependents(session=tx, purpose="vault", version=1) == 0
    with Keyring.edit(own_keyring.path) as command:
        command.retire("vault", 1)
    with pytest.raises(UnknownKey):
        own_keyring.get("vault", 1)
    for index, pseudonym in enumerate(pseudonyms):
        if index == 3:
            with pytest.raises(SubjectErased):
                family_name(session, own_keyring, pseudonym)
        else:
            assert family_name(session, own_keyring, pseudonym) == f"Zwanenburg{index}"


def test_a_wrapped_dek_moved_to_another_subject_does_not_open(
    client: TestClient,
    session: Session,
    own_keyring: Keyring,
    source_headers: dict[str, str],
    make: Make,
) -> None:
    first, second = ingest(client, source_headers, [make(0), make(1)])
    victim = get_subject(session=session, pseudonym=second)
    victim.wrapped_dek = get_subject(session=session, pseudonym=first).wrapped_dek
    with pytest.raises(DecryptionFailed):
        subject_dek(keyring=own_keyring, subject=victim)
    session.rollback()


def test_rewrap_counts_only_the_wraps_it_wrote(
    client: TestClient,
    database: Database,
    own_keyring: Keyring,
    source_headers: dict[str, str],
    make: Make,
    monkeypatch: pytest.MonkeyPatch,
    keyring_followed_at_once: None,
) -> None:
    """A wrap erased between rewrap's read and its write is left alone and not counted."""
    pseudonyms = ingest(client, source_headers, [make(i) for i in range(3)])
    with Keyring.edit(own_keyring.path) as command:
        command.rotate("vault")
    vault = next(c for c in WRAPPED_KEY_COLUMNS if c.purpose == "vault")
    rewrap = envelope.rewrap_key

    with database.transaction() as tx:

        def rewrap_while_one_is_erased(*args: Any, **kwargs: Any) -> str:
            # As an erasure between the read and the write (here in the same transaction: on
            # SQLite no other one could write meanwhile).
            tx.connection().execute(
                update(SUBJECTS)
                .where(SUBJECTS.c.pseudonym == pseudonyms[1])
                .values(wrapped_dek=None)
            )
            return rewrap(*args, **kwargs)

        monkeypatch.setattr(records_service, "rewrap_key", rewrap_while_one_is_erased)
        _, moved = rewrap_chunk(session=tx, keyring=own_keyring, wrapped=vault, limit=10)
    assert moved == 2
    with database.transaction() as tx:
        assert pending_rewraps(session=tx, keyring=own_keyring, wrapped=vault) == 0


def stored_digests(session: Session) -> dict[str, str]:
    session.rollback()
    try:
        rows = session.connection().execute(
            text("SELECT idempotency_key, request_digest FROM ingest_batches")
        )
        return {str(key): str(digest) for key, digest in rows}
    finally:
        session.rollback()


def test_erasure_forgets_the_digest_of_every_batch_that_held_the_subject(
    client: TestClient,
    session: Session,
    source_headers: dict[str, str],
    admin_headers: dict[str, str],
    make: Make,
) -> None:
    """A batch's digest is an HMAC of its identities under the pseudonym key, which outlives the
    erasure: kept, it would confirm a guessed name or address of the erased person (offline,
    and through a replay answered 200 or 409)."""

    def send(key: str, records: list[Record]) -> Any:
        headers = {**source_headers, "Idempotency-Key": key}
        return client.post("/v1/records/batch", json={"subjects": records}, headers=headers)

    people = [make(i) for i in range(3)]
    held = send("held-them", people[:2]).json()["rows"][1]["pseudonym"]
    assert send("others-only", people[2:]).status_code == 200
    kept = stored_digests(session)["others-only"]

    assert client.post(f"/v1/subjects/{held}/erase", headers=admin_headers).status_code == 200
    assert stored_digests(session) == {"held-them": ERASED_DIGEST, "others-only": kept}
    replay = send("held-them", people[:2])
    assert replay.status_code == 409, replay.text
    assert "held a subject who is erased" in replay.json()["detail"]
    assert send("others-only", people[2:]).json()["replayed"] is True

    # A batch that sends the erased person again keeps no digest of them either.
    again = send("sent-again", people[1:2])
    assert again.json()["rows"][0]["status"] == "erased"
    assert stored_digests(session)["sent-again"] == ERASED_DIGEST
    retried = send("sent-again", people[1:2])
    assert retried.status_code == 409
    assert "erased (when it was stored, or since)" in retried.json()["detail"]


def test_an_erasure_waits_for_an_ingest_that_read_the_subject_so_its_answer_stays_true(
    client: TestClient,
    session: Session,
    source_headers: dict[str, str],
    admin_headers: dict[str, str],
    make: Make,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Otherwise (PostgreSQL) the ingest answers "updated" for a subject the erasure wiped
    meanwhile, stores that answer for replays, and updates nothing."""
    people = [make(i) for i in range(2)]
    pseudonym = ingest(client, source_headers, people)[1]
    people[1]["characteristics"]["district"] = "Charlois"
    interleaving = Interleaving()
    interleaving.stop_after(monkeypatch, records_service, "_find_known")
    finished: list[str] = []
    answers: dict[str, Any] = {}

    def send() -> Any:
        response = client.post(
            "/v1/records/batch", json={"subjects": people}, headers=source_headers
        )
        finished.append("ingest")
        answers["ingest"] = response.json()
        return response

    def erase() -> Any:
        response = client.post(f"/v1/subjects/{pseudonym}/erase", headers=admin_headers)
        finished.append("erase")
        return response

    assert interleaving.run(send, erase) == (200, 200)
    assert finished == ["ingest", "erase"]
    assert answers["ingest"]["rows"][1]["status"] == "updated"
    subject = get_subject(session=session, pseudonym=pseudonym)
    assert (subject.district, subject.identity_ciphertext, subject.wrapped_dek) == (
        "Charlois",
        None,
        None,
    )
    session.rollback()
