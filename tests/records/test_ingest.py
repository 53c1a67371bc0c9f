"""POST /v1/records/batch: all-or-nothing, idempotent, linking, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import json
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from httpx2 import Response
from sqlalchemy import select, text, update
from sqlmodel import Session

from service.config import Settings
from service.crypto.keyring import Keyring
from service.db import Database
from service.packets.models import utcnow
from service.packets.service import forget_old_replays
from service.records import bulk
from service.records import service as records_service
from service.records.bulk import CSV_COLUMNS
from service.records.models import MAX_BATCH_ROWS, Subject
from service.records.service import decrypt_identity, get_subject, subject_dek
from service.records.vocabulary import load_event_types
from tests.conftest import Interleaving, TokenFactory, bearer, waiting_on_a_lock
from tests.records.conftest import Record, count_rows

URL = "/v1/records/batch"
Make = Callable[..., Record]


def assert_nothing_stored(session: Session) -> None:
    assert count_rows(session, "subjects") == 0
    assert count_rows(session, "events") == 0
    assert count_rows(session, "ingest_batches") == 0


def test_batch_stores_subjects_and_events_and_returns_pseudonyms(
    client: TestClient, app: FastAPI, session: Session, source_headers: dict[str, str], make: Make
) -> None:
    response = client.post(URL, json={"subjects": [make(0), make(1)]}, headers=source_headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [row["status"] for row in body["rows"]] == ["created", "created"]
    assert body["events_stored"] == 6
    assert count_rows(session, "subjects") == 2
    assert count_rows(session, "events") == 6
    subject = get_subject(session=session, pseudonym=body["rows"][0]["pseudonym"])
    keyring = app.state.keyring
    identity = decrypt_identity(
        keyring=keyring, subject=subject, dek=subject_dek(keyring=keyring, subject=subject)
    )
    assert identity.family_name == "Zwanenburg0"
    assert subject.birth_year == 1990
    assert subject.district == "Feijenoord"
    assert repr(identity) == "Identity(***)"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r["identity"].update(bsn="123456789"), "bsn"),
        (lambda r: r["identity"].update(birth_date="1990-02-30"), "birth_date"),
        (lambda r: r["identity"].update(birth_date="2999-01-01"), "birth_date"),
        (lambda r: r["events"][0].update(date="2999-01-01"), "date"),
        (lambda r: r["events"][1].update(type="alien_abduction"), "type"),
        (lambda r: r["identity"].update(nickname="Gerrie"), "(unknown field)"),
        (lambda r: r["identity"].update(postcode="ABC"), "postcode"),
    ],
)
def test_one_bad_row_rejects_the_whole_batch(
    client: TestClient,
    session: Session,
    source_headers: dict[str, str],
    make: Make,
    mutate: Callable[[Record], Any],
    field: str,
) -> None:
    bad = make(1)
    mutate(bad)
    response = client.post(URL, json={"subjects": [make(0), bad, make(2)]}, headers=source_headers)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    errors = response.json()["errors"]
    assert {e["row"] for e in errors} == {1}
    assert any(e["loc"][-1] == field for e in errors)
    assert "Zwanenburg" not in response.text
    assert "Gerrie" not in response.text
    assert_nothing_stored(session)


def test_every_failing_row_is_listed(
    client: TestClient, session: Session, source_headers: dict[str, str], make: Make
) -> None:
    rows = [make(i) for i in range(5)]
    rows[1]["identity"]["bsn"] = "111222334"
    rows[3]["identity"]["bsn"] = "999999999"
    response = client.post(URL, json={"subjects": rows}, headers=source_headers)
    assert response.status_code == 422
    assert {e["row"] for e in response.json()["errors"]} == {1, 3}
    assert "111222334" not in response.text
    assert_nothing_stored(session)


def test_duplicate_rows_in_a_batch_are_rejected(
    client: TestClient, session: Session, source_headers: dict[str, str], make: Make
) -> None:
    response = client.post(URL, json={"subjects": [make(0), make(0)]}, headers=source_headers)
    assert response.status_code == 422
    assert {e["row"] for e in response.json()["errors"]} == {0, 1}
    assert_nothing_stored(session)


def test_one_subject_sent_twice_with_other_events_is_rejected_naming_the_row_it_repeats(
    client: TestClient, session: Session, source_headers: dict[str, str], make: Make
) -> None:
    """The same person in two rows, each with events of its own: refused as a duplicate with the
    row it repeats, not stored as two subjects nor left to the database to refuse (409)."""
    again = make(0, prefix="other")
    response = client.post(
        URL, json={"subjects": [make(0), make(1), again]}, headers=source_headers
    )
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["detail"] == "batch rejected, nothing was stored; failing rows: 2"
    assert {"row": 2, "loc": ["subjects", 2, "identity", "bsn"]}.items() <= next(
        e for e in body["errors"] if e["row"] == 2
    ).items()
    assert [e["msg"] for e in body["errors"] if e["row"] == 2] == [
        "same subject as row 0; send each subject once per batch"
    ]
    assert_nothing_stored(session)


def test_malformed_json_is_rejected(
    client: TestClient, session: Session, source_headers: dict[str, str]
) -> None:
    response = client.post(
        URL,
        content=b'{"subjects": [ {"identity": ',
        headers={**source_headers, "content-type": "application/json"},
    )
    assert response.status_code == 422
    assert_nothing_stored(session)


def test_too_many_rows_are_rejected(
    client: TestClient,
    app: FastAPI,
    session: Session,
    source_headers: dict[str, str],
    make: Make,
) -> None:
    app.state.settings = app.state.settings.model_copy(update={"max_batch_rows": 3})
    response = client.post(
        URL, json={"subjects": [make(i) for i in range(4)]}, headers=source_headers
    )
    assert response.status_code == 422
    assert "at most 3" in response.json()["detail"]
    assert_nothing_stored(session)


@pytest.mark.parametrize(
    ("rows", "first_error"),
    [
        (
            [{}] * 20_000,
            "100 errors found, the first 99 are listed; rows 50 to 19999 were not checked",
        ),
        (
            [{"events": [{}] * 1000}] * 30,
            "4002 errors found, the first 99 are listed; rows 1 to 29 were not checked",
        ),
    ],
    ids=["empty rows", "empty events"],
)
def test_a_large_bad_batch_gets_a_short_422_naming_the_count_and_stores_nothing(
    client: TestClient,
    session: Session,
    source_headers: dict[str, str],
    rows: list[dict[str, Any]],
    first_error: str,
) -> None:
    """Checking stops at the row where the 100th error is found: a body of empty rows or
    events would otherwise hold an error per few bytes, and a megabyte of them took 17 s, a
    gigabyte and a 66 MB answer."""
    response = client.post(URL, json={"subjects": rows}, headers=source_headers)

    assert response.status_code == 422
    errors = response.json()["errors"]
    assert len(errors) == 100
    assert errors[0] == {"loc": ["subjects"], "msg": errors[0]["msg"], "type": "too_many_errors"}
    assert errors[0]["msg"] == first_error
    assert [error["row"] for error in errors[1:3]] == [0, 0]
    assert len(response.content) < 20_000
    assert_nothing_stored(session)


def test_a_batch_above_the_ceiling_of_any_setting_is_refused_before_its_rows_are_checked(
    client: TestClient, session: Session, source_headers: dict[str, str]
) -> None:
    response = client.post(
        URL, json={"subjects": [{}] * (MAX_BATCH_ROWS + 1)}, headers=source_headers
    )

    assert response.status_code == 422
    assert response.json()["errors"] == [
        {
            "loc": ["subjects"],
            "msg": f"List should have at most {MAX_BATCH_ROWS} items after validation, "
            f"not {MAX_BATCH_ROWS + 1}",
            "type": "too_long",
        }
    ]
    assert_nothing_stored(session)


def test_a_422_lists_the_first_100_errors_and_says_how_many_there_were(
    client: TestClient, session: Session, source_headers: dict[str, str], make: Make
) -> None:
    """Errors found beyond the schema (here an unknown event type in each of 150 rows) are
    listed up to 100, as the schema's are."""
    rows = [make(i, events=1) for i in range(150)]
    for row in rows:
        row["events"][0]["type"] = "no_such_type"

    response = client.post(URL, json={"subjects": rows}, headers=source_headers)

    assert response.status_code == 422
    body = response.json()
    assert [error["row"] for error in body["errors"]] == list(range(100))
    first_rows = ", ".join(str(row) for row in range(20))
    assert body["detail"] == (
        f"batch rejected, nothing was stored; failing rows: {first_rows} … "
        "(150 errors; the first 100 are listed)"
    )
    assert_nothing_stored(session)


def test_body_too_large_is_413(
    client: TestClient, app: FastAPI, session: Session, source_headers: dict[str, str], make: Make
) -> None:
    limit = app.state.settings.max_body_bytes
    body = json.dumps({"subjects": [make(0)], "padding": "x" * limit})
    response = client.post(
        URL, content=body, headers={**source_headers, "content-type": "application/json"}
    )
    assert response.status_code == 413
    assert_nothing_stored(session)


def test_only_sources_may_ingest(
    client: TestClient, session: Session, token: TokenFactory, make: Make
) -> None:
    response = client.post(
        URL, json={"subjects": [make(0)]}, headers=bearer(token("prof-001", "professional"))
    )
    assert response.status_code == 403
    assert client.post(URL, json={"subjects": [make(0)]}).status_code == 401
    assert_nothing_stored(session)


def test_a_source_named_as_the_demo_names_its_batches_is_refused_and_stores_nothing(
    client: TestClient, session: Session, token: TokenFactory, make: Make
) -> None:
    """``serve`` takes a database whose batches all come from demo-seed-<seed> for the demo's,
    and builds packets of them for the demo team: real records must never pass for those."""
    headers = bearer(token("demo-seed-1", "source"))
    response = client.post(URL, json={"subjects": [make(0)]}, headers=headers)
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == (
        "the token subject (the source name): names beginning with 'demo-seed-' are "
        "`casepackets demo`'s"
    )
    assert_nothing_stored(session)


def test_replayed_batch_never_duplicates(
    client: TestClient, session: Session, source_headers: dict[str, str], make: Make
) -> None:
    body = {"subjects": [make(i) for i in range(3)]}
    first = client.post(URL, json=body, headers=source_headers).json()
    again = client.post(URL, json=body, headers=source_headers).json()
    assert [r["pseudonym"] for r in again["rows"]] == [r["pseudonym"] for r in first["rows"]]
    assert [r["status"] for r in again["rows"]] == ["unchanged"] * 3
    assert again["events_stored"] == 0
    assert again["events_already_known"] == 9
    assert count_rows(session, "subjects") == 3
    assert count_rows(session, "events") == 9


def test_idempotency_key_returns_the_first_answer(
    client: TestClient,
    session: Session,
    source_headers: dict[str, str],
    make: Make,
    token: TokenFactory,
) -> None:
    headers = {**source_headers, "Idempotency-Key": "batch-2025-001"}
    body = {"subjects": [make(0), make(1)]}
    first = client.post(URL, json=body, headers=headers)
    second = client.post(URL, json=body, headers=headers)
    assert second.status_code == 200
    assert second.json()["replayed"] is True
    assert second.json()["batch_id"] == first.json()["batch_id"]
    assert second.json()["rows"] == first.json()["rows"]
    assert count_rows(session, "ingest_batches") == 1
    other = client.post(URL, json={"subjects": [make(5)]}, headers=headers)
    assert other.status_code == 409
    assert count_rows(session, "subjects") == 2
    # Keys are per source: another source's batch under the same key is its own.
    elsewhere = {**bearer(token("source-uwv", "source")), "Idempotency-Key": "batch-2025-001"}
    own = client.post(URL, json={"subjects": [make(5)]}, headers=elsewhere)
    assert own.status_code == 200, own.text
    assert own.json()["replayed"] is False
    assert count_rows(session, "subjects") == 3


@pytest.mark.parametrize(
    "key",
    [b"", b"k" * 129, "Zwanenburg-\u00e9".encode("latin-1"), b"batch\x7f1"],
    ids=["empty", "129-characters", "latin-1", "delete-character"],
)
def test_an_idempotency_key_of_another_shape_is_422_and_stores_nothing(
    client: TestClient, session: Session, source_headers: dict[str, str], make: Make, key: bytes
) -> None:
    """1 to 128 printable ASCII characters: anything else would be stored garbled (a header
    arrives as Latin-1) or could carry a name; it is refused, not echoed."""
    headers = {name.encode(): value.encode() for name, value in source_headers.items()}
    response = client.post(
        URL, json={"subjects": [make(0)]}, headers={**headers, b"Idempotency-Key": key}
    )
    assert response.status_code == 422, response.text
    assert [e["loc"] for e in response.json()["errors"]] == [["header", "Idempotency-Key"]]
    assert "Zwanenburg" not in response.text
    assert_nothing_stored(session)


def test_a_batch_replayed_under_its_idempotency_key_is_logged_again_without_identities(
    client: TestClient, session: Session, source_headers: dict[str, str], make: Make
) -> None:
    """The replay hands out the batch's pseudonyms again, so it leaves an entry of its own, as a
    push of flags sent again does."""
    headers = {**source_headers, "Idempotency-Key": "batch-logged"}
    sent = [make(0), make(1)]
    first = client.post(URL, json={"subjects": sent}, headers=headers)
    logged_before = count_rows(session, "access_log_entries")

    replayed = client.post(URL, json={"subjects": sent}, headers=headers)

    assert replayed.json()["replayed"] is True
    rows = session.connection().execute(
        text("SELECT entry FROM access_log_entries ORDER BY leaf_index")
    )
    entries = [bytes(entry) for entry in rows.scalars()]
    session.rollback()
    assert len(entries) == logged_before + 1
    entry = json.loads(entries[-1])
    assert {key: entry[key] for key in ("actor", "role", "action", "object_type")} == {
        "actor": "source-welfare",
        "role": "source",
        "action": "records.ingest",
        "object_type": "batch",
    }
    assert entry["object_id"] == first.json()["batch_id"]
    assert entry["outcome"] == "allowed"
    assert entry["reason"] == "sent again, not stored twice"
    assert entry["request_id"] == replayed.headers["x-request-id"]
    assert entry["pseudonyms"] == []
    shown = entries[-1].decode()
    assert [v for record in sent for v in record["identity"].values() if str(v) in shown] == []


def test_what_an_idempotency_key_kept_is_forgotten_after_the_retention_period(
    app: FastAPI,
    client: TestClient,
    session: Session,
    database: Database,
    source_headers: dict[str, str],
    make: Make,
) -> None:
    """A retry comes within minutes; kept for ever, a batch's digest would confirm a guessed
    identity and its answer would list its pseudonyms."""
    aged = {**source_headers, "Idempotency-Key": "batch-aged"}
    recent = {**source_headers, "Idempotency-Key": "batch-recent"}
    old_body = {"subjects": [make(0)]}
    recent_body = {"subjects": [make(2)]}
    assert client.post(URL, json=old_body, headers=aged).status_code == 200
    assert client.post(URL, json={"subjects": [make(1)]}, headers=source_headers).status_code == 200
    assert client.post(URL, json=recent_body, headers=recent).status_code == 200
    retention = app.state.retention_policy
    batches = records_service.BATCHES
    session.execute(
        update(batches)
        .where(batches.c.idempotency_key.is_distinct_from("batch-recent"))
        .values(created_at=utcnow() - timedelta(days=retention.idempotency_days, minutes=1))
    )
    session.commit()

    assert forget_old_replays(database=database, retention=retention) == 2
    assert forget_old_replays(database=database, retention=retention) == 0
    kept = {
        row.idempotency_key: (row.request_digest, row.response)
        for row in session.execute(select(batches)).all()
    }
    session.rollback()
    assert kept["batch-aged"] == ("expired", "{}")
    assert kept[None] == ("", "{}")
    assert kept["batch-recent"][0] not in ("", "expired", "erased")
    assert json.loads(kept["batch-recent"][1])["rows"]  # its answer is kept for a retry
    refused = client.post(URL, json=old_body, headers=aged)
    assert refused.status_code == 409, refused.text
    assert "older than the service keeps answers for" in refused.json()["detail"]
    replayed = client.post(URL, json=recent_body, headers=recent)
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["replayed"] is True
    assert count_rows(session, "subjects") == 3


def test_an_idempotency_key_past_the_retention_period_is_refused_before_it_is_forgotten(
    app: FastAPI,
    client: TestClient,
    session: Session,
    source_headers: dict[str, str],
    make: Make,
) -> None:
    """idempotency_days bounds the replay itself, not only the shredder's round that forgets
    the answer: until then (minutes, or for ever with CASEPACKETS_SHRED_INTERVAL_SECONDS=0) a
    retry would still be handed the batch's pseudonyms. A key just younger still replays."""
    days = app.state.retention_policy.idempotency_days
    aged = {**source_headers, "Idempotency-Key": "batch-aged"}
    edge = {**source_headers, "Idempotency-Key": "batch-edge"}
    aged_body, edge_body = {"subjects": [make(0)]}, {"subjects": [make(1)]}
    assert client.post(URL, json=aged_body, headers=aged).status_code == 200
    assert client.post(URL, json=edge_body, headers=edge).status_code == 200
    batches = records_service.BATCHES
    now = utcnow()
    for key, age in (
        ("batch-aged", timedelta(days=days, minutes=1)),
        ("batch-edge", timedelta(days=days, minutes=-1)),
    ):
        session.execute(
            update(batches).where(batches.c.idempotency_key == key).values(created_at=now - age)
        )
    session.commit()

    refused = client.post(URL, json=aged_body, headers=aged)
    assert refused.status_code == 409, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert "older than the service keeps answers for" in refused.json()["detail"]
    assert "rows" not in refused.json()
    replayed = client.post(URL, json=edge_body, headers=edge)
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["replayed"] is True
    assert count_rows(session, "subjects") == 2
    assert count_rows(session, "ingest_batches") == 2


def test_a_subject_from_another_source_links_and_a_changed_identity_is_reencrypted(
    client: TestClient,
    app: FastAPI,
    session: Session,
    source_headers: dict[str, str],
    token: TokenFactory,
    make: Make,
) -> None:
    first = client.post(URL, json={"subjects": [make(0)]}, headers=source_headers).json()
    pseudonym = first["rows"][0]["pseudonym"]
    before = get_subject(session=session, pseudonym=pseudonym).identity_ciphertext
    session.rollback()
    moved = make(0, prefix="uwv")
    moved["identity"]["street"] = "Putselaan 12"
    other = bearer(token("source-uwv", "source"))
    second = client.post(URL, json={"subjects": [moved]}, headers=other).json()
    assert second["rows"][0] == {"row": 0, "pseudonym": pseudonym, "status": "updated"}
    session.rollback()
    subject = get_subject(session=session, pseudonym=pseudonym)
    assert subject.identity_ciphertext != before
    keyring = app.state.keyring
    dek = subject_dek(keyring=keyring, subject=subject)
    assert decrypt_identity(keyring=keyring, subject=subject, dek=dek).street == "Putselaan 12"
    assert count_rows(session, "subjects") == 1
    assert count_rows(session, "events") == 6


def test_pseudonym_key_rotation_keeps_linking(
    client: TestClient,
    app: FastAPI,
    session: Session,
    source_headers: dict[str, str],
    make: Make,
    tmp_path: Path,
) -> None:
    app.state.keyring = Keyring.init(tmp_path / "own-keyring.json")
    pseudonym = client.post(URL, json={"subjects": [make(0)]}, headers=source_headers).json()[
        "rows"
    ][0]["pseudonym"]
    with Keyring.edit(tmp_path / "own-keyring.json") as keyring:
        keyring.rotate("pseudonym")
    app.state.keyring = keyring
    rows = client.post(URL, json={"subjects": [make(0), make(1)]}, headers=source_headers).json()[
        "rows"
    ]
    assert rows[0]["pseudonym"] == pseudonym
    session.rollback()
    assert get_subject(session=session, pseudonym=rows[1]["pseudonym"]).pseudonym_key_version == 2
    assert count_rows(session, "subjects") == 2


def test_a_worker_behind_a_pseudonym_rotation_refuses_its_batch_instead_of_splitting_a_person(
    client: TestClient,
    app: FastAPI,
    session: Session,
    source_headers: dict[str, str],
    make: Make,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two workers on one keyring file; this one has not looked at the file since the rotation
    (its interval has not passed). The other stores a new person under the new version first."""
    monkeypatch.setattr("service.crypto.keyring.RELOAD_CHECK_SECONDS", 3600.0)
    path = tmp_path / "shared-keyring.json"
    app.state.keyring = Keyring.init(path)
    assert client.post(URL, json={"subjects": [make(1)]}, headers=source_headers).status_code == 200
    with Keyring.edit(path) as rotating:
        rotating.rotate("pseudonym")
    up_to_date = Keyring.load(path)
    behind = app.state.keyring
    assert behind.current("pseudonym").version == 1, "the worker has not seen the rotation yet"

    app.state.keyring = up_to_date  # the other worker stores the person under v2
    first = client.post(URL, json={"subjects": [make(0)]}, headers=source_headers).json()
    pseudonym = first["rows"][0]["pseudonym"]
    app.state.keyring = behind  # the same person, from the worker a moment behind
    refused = client.post(URL, json={"subjects": [make(0, prefix="uwv")]}, headers=source_headers)
    assert refused.status_code == 409, refused.text
    assert "pseudonym key was rotated" in refused.json()["detail"]
    session.rollback()
    assert count_rows(session, "subjects") == 2
    again = client.post(URL, json={"subjects": [make(0, prefix="uwv")]}, headers=source_headers)
    assert again.status_code == 200, again.text
    assert again.json()["rows"][0]["pseudonym"] == pseudonym
    session.rollback()
    assert count_rows(session, "subjects") == 2, "one person, one subject"


def test_ingest_is_written_to_the_access_log_without_identities(
    client: TestClient, session: Session, source_headers: dict[str, str], make: Make
) -> None:
    before = count_rows(session, "access_log_entries")
    sent = make(0)
    client.post(URL, json={"subjects": [sent]}, headers=source_headers)
    assert count_rows(session, "access_log_entries") == before + 1
    session.rollback()
    from sqlalchemy import text

    entry = (
        session.connection()
        .execute(text("SELECT entry FROM access_log_entries ORDER BY leaf_index DESC LIMIT 1"))
        .scalar_one()
    )
    logged = json.loads(bytes(entry))
    assert logged["action"] == "records.ingest"
    assert logged["object_type"] == "batch"
    text_logged = bytes(entry).decode()
    assert [v for v in sent["identity"].values() if str(v) in text_logged] == []


def test_subject_model_has_no_clear_identity_columns() -> None:
    columns = set(Subject.model_fields)
    assert not columns & {"bsn", "given_name", "family_name", "street", "phone", "email"}


@pytest.mark.parametrize("retry", [False, True], ids=["another-source", "the-same-source-retrying"])
def test_a_batch_racing_another_for_the_same_new_subject_gets_409_and_stores_nothing(
    client: TestClient,
    session: Session,
    backend: str,
    source_headers: dict[str, str],
    token: TokenFactory,
    make: Make,
    monkeypatch: pytest.MonkeyPatch,
    retry: bool,
) -> None:
    """On PostgreSQL the second batch waits on the first one's uncommitted subject and then
    collides with it: a retryable 409. On SQLite it waits for the write lock and then finds the
    subject known, so both succeed."""
    interleaving = Interleaving()
    # stopped once the first batch's rows are written, not yet committed
    interleaving.stop_after(monkeypatch, records_service, "_refresh_statistics")
    first_body = {"subjects": [make(0)]}
    second_body = first_body if retry else {"subjects": [make(0, prefix="uwv")]}
    second_headers = source_headers if retry else bearer(token("source-uwv", "source"))
    second_answers: list[Response] = []

    def second() -> Response:
        second_answers.append(client.post(URL, json=second_body, headers=second_headers))
        return second_answers[0]

    logged = count_rows(session, "access_log_entries")

    statuses = interleaving.run(
        lambda: client.post(URL, json=first_body, headers=source_headers),
        second,
        second_waits=waiting_on_a_lock(session) if backend == "postgres" else None,
    )

    if backend == "postgres":
        assert statuses == (200, 409)
    assert set(statuses) <= {200, 409}
    if statuses[1] == 409:
        assert second_answers[0].headers["content-type"].startswith("application/problem+json")
        assert second_answers[0].json()["title"] == "Concurrent ingest"
        assert count_rows(session, "subjects") == 1
        assert count_rows(session, "events") == 3
        assert count_rows(session, "ingest_batches") == 1
        assert count_rows(session, "access_log_entries") == logged + 1
        again = client.post(URL, json=second_body, headers=second_headers)
        assert again.status_code == 200, again.text
        assert again.json()["rows"][0]["status"] == "unchanged"
    assert count_rows(session, "subjects") == 1
    assert count_rows(session, "events") == (3 if retry else 6)
    assert count_rows(session, "ingest_batches") == 2


def put(record: Record, path: tuple[str | int, ...], value: str) -> None:
    place: Any = record
    for step in path[:-1]:
        place = place[step]
    place[path[-1]] = value


@pytest.mark.parametrize("known", [False, True], ids=["new-subject", "known-subject"])
@pytest.mark.parametrize(
    "path",
    [
        ("characteristics", "district"),
        ("characteristics", "household_type"),
        ("events", 1, "office"),
        ("events", 1, "source_event_id"),
        ("identity", "family_name"),
        ("identity", "street"),
    ],
    ids=lambda path: ".".join(map(str, path)),
)
def test_nul_in_a_text_field_is_422_naming_the_field_and_stores_nothing(
    client: TestClient,
    session: Session,
    source_headers: dict[str, str],
    make: Make,
    path: tuple[str | int, ...],
    known: bool,
) -> None:
    if known:
        stored = client.post(URL, json={"subjects": [make(0)]}, headers=source_headers)
        assert stored.status_code == 200, stored.text
    tables = ("subjects", "events", "ingest_batches", "access_log_entries")
    before = {table: count_rows(session, table) for table in tables}
    bad = make(0 if known else 2, prefix="resent")
    put(bad, path, "Zwanen\u0000burg")

    response = client.post(URL, json={"subjects": [make(1), bad]}, headers=source_headers)

    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["errors"] == [
        {
            "loc": ["subjects", 1, *path],
            "msg": "Value error, must not contain NUL characters",
            "type": "value_error",
            "row": 1,
        }
    ]
    assert "Zwanen" not in response.text
    assert "\\u0000" not in response.text
    assert {table: count_rows(session, table) for table in tables} == before


@pytest.mark.parametrize(
    ("encode", "reason"),
    [
        (
            lambda body: body.replace(
                '"family_name": ', '"family_name": "Jansen", "family_name": ', 1
            ).encode(),
            "a field name appears twice in one object",
        ),
        (lambda body: body.encode("utf-16"), "it is not UTF-8 text"),
        (lambda body: body.encode("utf-8-sig"), "Unexpected UTF-8 BOM (decode using utf-8-sig)"),
    ],
    ids=["repeated field name", "UTF-16", "UTF-8 with a byte order mark"],
)
def test_a_batch_two_readers_could_read_differently_is_422_and_stores_nothing(
    client: TestClient,
    session: Session,
    source_headers: dict[str, str],
    make: Make,
    encode: Callable[[str], bytes],
    reason: str,
) -> None:
    """JSON with one field name twice in an object is read last-wins by Python and first-wins
    by other parsers, and UTF-16 is read by some and not others: a source's own checks could
    pass one identity while the service stored another. Such a batch is refused whole."""
    body = json.dumps({"subjects": [make(0), make(1)]})
    assert '"family_name": ' in body

    response = client.post(
        URL, content=encode(body), headers={**source_headers, "content-type": "application/json"}
    )

    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["detail"].startswith("the body is not valid JSON")
    assert response.json()["detail"].endswith(reason)
    assert "Jansen" not in response.text
    assert "Zwanenburg" not in response.text
    assert_nothing_stored(session)


def test_a_replay_whose_digest_key_was_retired_is_told_so_not_that_the_batch_differs(
    client: TestClient,
    app: FastAPI,
    source_headers: dict[str, str],
    make: Make,
    tmp_path: Path,
    rotations_settled: None,
    keyring_followed_at_once: None,
) -> None:
    """An Idempotency-Key's digest is keyed by the pseudonym key version current when its batch
    arrived. Once that version is retired (no subject's pseudonym needs it), a resend can no
    longer be matched: it is refused as such, not as a different batch."""
    path = tmp_path / "own-keyring.json"
    app.state.keyring = Keyring.init(path)
    batch = {"subjects": [make(0)]}
    assert client.post(URL, json=batch, headers=source_headers).status_code == 200
    with Keyring.edit(path) as keyring:
        keyring.rotate("pseudonym")  # v2: the next batch's digest is made under it
    keyed = {**source_headers, "Idempotency-Key": "batch-42"}
    first = client.post(URL, json=batch, headers=keyed)
    assert first.status_code == 200, first.text
    assert client.post(URL, json=batch, headers=keyed).json()["replayed"] is True
    different = client.post(URL, json={"subjects": [make(1)]}, headers=keyed)
    assert different.status_code == 409
    assert "used for a different batch" in different.json()["detail"]
    with Keyring.edit(path) as keyring:
        keyring.rotate("pseudonym")
        keyring.retire("pseudonym", 2)  # no subject carries a v2 pseudonym
    replay = client.post(URL, json=batch, headers=keyed)
    assert replay.status_code == 409, replay.text
    assert "retired" in replay.json()["detail"]
    assert "different batch" not in replay.json()["detail"]


@pytest.mark.parametrize("version", ["²", "١", "9" * 5000, "", "v1"])
def test_a_stored_digest_under_no_version_a_key_can_have_matches_nothing(
    app: FastAPI, version: str
) -> None:
    """A digest row altered in the database names a version no key has: the resend is refused
    as a different batch, not answered with a 500."""
    assert (
        records_service.keyed_digest_matches(
            keyring=app.state.keyring, message=b"a batch", stored=f"{version}:{'0' * 64}"
        )
        is False
    )


def test_an_event_sent_again_with_the_same_content_is_already_known(
    client: TestClient, session: Session, source_headers: dict[str, str], make: Make
) -> None:
    assert client.post(URL, json={"subjects": [make(0)]}, headers=source_headers).status_code == 200
    resent = make(0)
    resent["events"][1]["office"] = "  Wijkteam Afrikaanderwijk  "  # stripped on validation

    response = client.post(URL, json={"subjects": [make(1), resent]}, headers=source_headers)

    assert response.status_code == 200, response.text
    assert response.json()["events_stored"] == 3
    assert response.json()["events_already_known"] == 3
    assert count_rows(session, "events") == 6


def _reuse_event_id_of_subject_0(record: Record) -> None:
    record["events"][1]["source_event_id"] = "ev-0-1"


@pytest.mark.parametrize("subject_known", [False, True], ids=["new-subject", "known-subject"])
@pytest.mark.parametrize(
    ("change", "differs"),
    [
        (lambda r: r["events"][1].update(type="welfare_start"), "type"),
        (lambda r: r["events"][1].update(date="2023-02-16"), "date"),
        (lambda r: r["events"][1].update(office="Wijkteam Bloemhof"), "office"),
        (_reuse_event_id_of_subject_0, "subject"),
    ],
    ids=["type", "date", "office", "subject"],
)
def test_an_event_id_already_stored_with_other_content_refuses_the_batch(
    client: TestClient,
    session: Session,
    source_headers: dict[str, str],
    make: Make,
    change: Callable[[Record], Any],
    differs: str,
    subject_known: bool,
) -> None:
    """Sending a stored event id again must not silently keep the old event and drop the new
    one: the batch is refused whole, naming the row and field, never the id's value."""
    stored = [make(0), make(1)] if subject_known else [make(0)]
    assert client.post(URL, json={"subjects": stored}, headers=source_headers).status_code == 200
    tables = ("subjects", "events", "ingest_batches", "access_log_entries")
    before = {table: count_rows(session, table) for table in tables}
    changed = make(0) if differs != "subject" else make(1)
    change(changed)
    keyed = {**source_headers, "Idempotency-Key": "batch-resent"}

    response = client.post(URL, json={"subjects": [make(2), changed]}, headers=keyed)

    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "failing rows: 1" in response.json()["detail"]
    [error] = response.json()["errors"]
    assert error["row"] == 1
    assert error["loc"] == ["subjects", 1, "events", 1, "source_event_id"]
    assert differs in error["msg"]
    assert "ev-0-1" not in response.text
    assert "Zwanenburg" not in response.text
    assert {table: count_rows(session, table) for table in tables} == before
    corrected = client.post(URL, json={"subjects": [make(2)]}, headers=keyed)
    assert corrected.status_code == 200, corrected.text
    assert corrected.json()["replayed"] is False, "the refusal stored no idempotency record"


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("identity", "given_name"), "Gerrit\u001b[31m\u202eje"),
        (("characteristics", "district"), "Feije\nnoord"),
        (("events", 1, "office"), "Wijkteam\u2066Zuid"),
    ],
    ids=["ansi-and-bidi-in-a-name", "newline-in-a-district", "bidi-isolate-in-an-office"],
)
def test_a_control_or_format_character_is_422_naming_the_field_without_its_value(
    client: TestClient,
    session: Session,
    source_headers: dict[str, str],
    make: Make,
    path: tuple[str | int, ...],
    value: str,
) -> None:
    bad = make(2)
    put(bad, path, value)

    response = client.post(URL, json={"subjects": [make(1), bad]}, headers=source_headers)

    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert error["loc"] == ["subjects", 1, *path]
    assert error["row"] == 1
    assert "control or format characters" in error["msg"]
    assert "Gerrit" not in response.text
    assert "noord" not in response.text
    assert "Zuid" not in response.text
    assert_nothing_stored(session)


def test_the_same_person_with_blank_optional_fields_sent_by_csv_and_by_api_is_unchanged(
    client: TestClient,
    app: FastAPI,
    database: Database,
    settings: Settings,
    session: Session,
    source_headers: dict[str, str],
    make: Make,
    tmp_path: Path,
) -> None:
    """The import reads an empty CSV value as not given; so does the API a blank text, so the
    identity stored either way is the same and is not re-encrypted when sent the other way."""
    record = make(0, events=1)
    blanks = {"street": "  ", "postcode": "", "city": "", "phone": "", "email": ""}
    record["identity"].update(blanks)
    record["characteristics"]["household_type"] = ""
    [event] = record["events"]
    line = {**record["identity"], **record["characteristics"], "birth_year": ""}
    line |= {
        "event_type": event["type"],
        "event_date": event["date"],
        "office": event["office"],
        "source_event_id": event["source_event_id"],
    }
    path = tmp_path / "records.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerow(line)
    imported = bulk.import_csv(
        database=database,
        keyring=app.state.keyring,
        event_types=load_event_types(settings.policies_dir / "events.yaml"),
        path=path,
        source="source-welfare",
        actor="source-welfare",
        batch_size=10,
    )
    assert (imported.subjects, imported.rejected) == (1, [])

    response = client.post(URL, json={"subjects": [record]}, headers=source_headers)

    assert response.status_code == 200, response.text
    assert response.json()["rows"][0]["status"] == "unchanged"
    assert response.json()["events_already_known"] == 1
    subject = get_subject(session=session, pseudonym=response.json()["rows"][0]["pseudonym"])
    assert subject.household_type is None
    keyring = app.state.keyring
    dek = subject_dek(keyring=keyring, subject=subject)
    identity = decrypt_identity(keyring=keyring, subject=subject, dek=dek)
    assert (identity.street, identity.city, identity.postcode) == (None, None, None)


def test_retries_racing_under_one_idempotency_key_all_get_the_first_batchs_answer(
    client: TestClient,
    session: Session,
    source_headers: dict[str, str],
    make: Make,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Five retries sent while the first batch is still being stored: on PostgreSQL each waits
    on the first one's row under the key and then gets its answer (not a 409 to send it once
    more), as a retried push of flags does; on SQLite each waits for the write lock."""
    interleaving = Interleaving()
    # stopped once the first batch's rows are written, not yet committed
    interleaving.stop_after(monkeypatch, records_service, "_refresh_statistics")
    body = {"subjects": [make(0), make(1)]}
    headers = {**source_headers, "Idempotency-Key": "retry-after-timeout"}
    answers: list[Response] = []
    retries: list[Response] = []

    def first() -> Response:
        answers.append(client.post(URL, json=body, headers=headers))
        return answers[0]

    def five_retries() -> Response:
        threads = [
            threading.Thread(
                target=lambda: retries.append(client.post(URL, json=body, headers=headers))
            )
            for _ in range(5)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        return retries[0]

    assert interleaving.run(first, five_retries) == (200, 200)

    assert answers[0].json()["replayed"] is False
    assert [retry.status_code for retry in retries] == [200] * 5, [r.text for r in retries]
    assert {retry.json()["batch_id"] for retry in retries} == {answers[0].json()["batch_id"]}
    assert all(retry.json()["replayed"] for retry in retries)
    assert {retry.json()["rows"] == answers[0].json()["rows"] for retry in retries} == {True}
    assert count_rows(session, "subjects") == 2
    assert count_rows(session, "events") == 6
    assert count_rows(session, "ingest_batches") == 1
