"""The auditor API: NDJSON entries, checkpoints, proofs, the key — all logged, fail-closed."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from service.access_log import merkle
from service.access_log import service as log
from service.access_log.checkpoint import parse_checkpoint
from service.config import Settings
from service.crypto.signing import VerifierKey, open_note
from service.db import Database, make_engine
from service.main import create_app
from tests.access_log.conftest import append_each, entry
from tests.conftest import TokenFactory, bearer

AUDIT_REQUEST = "5b0c6a3e4f1d4b2a9c8e7d6f5a4b3c2d"


@pytest.fixture
def auditor(token: TokenFactory) -> dict[str, str]:
    return bearer(token("auditor-001", "auditor"))


def test_checkpoint_covers_every_committed_entry_and_verifies(
    client: TestClient, database: Database, auditor: dict[str, str]
) -> None:
    append_each(database, 10)
    key = VerifierKey.parse(client.get("/v1/audit/public-key", headers=auditor).text)
    response = client.get("/v1/audit/checkpoint", headers=auditor)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    checkpoint = parse_checkpoint(open_note(response.text, key))
    assert checkpoint.origin == client.app.state.settings.checkpoint_origin  # type: ignore[attr-defined]
    with database.session() as session:
        committed = log.tree_size(session=session)
        assert checkpoint.size == committed == 12  # 10 + the two audit reads
        assert checkpoint.root == log.root(session=session, size=committed)


def test_entries_stream_in_full_beside_a_write_held_past_the_lock_bound(
    client: TestClient,
    database: Database,
    auditor: dict[str, str],
    backend: str,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The 200 goes out before the entries are read: a chunk that waited for a writer and gave
    up would cut the body short with nothing to tell the auditor. Reads wait for no writer."""
    with database.transaction() as session:
        log.append_many(session=session, entries=[entry(n) for n in range(2500)])
    real_iter = log.iter_entries
    chunks: list[int] = []
    release = threading.Event()

    def hold_the_write_lock() -> None:
        with database.engine.connect() as holder:
            if backend == "postgres":
                holder.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": log.LOG_LOCK_KEY})
            holder.execute(text("DELETE FROM professionals WHERE id = ''"))
            held.set()
            release.wait(10)
            holder.rollback()

    held = threading.Event()

    def iter_entries(**kwargs: Any) -> Iterator[bytes]:
        chunks.append(kwargs["start"])
        if len(chunks) == 2:  # a writer takes the lock between the first chunk and the second
            holder.start()
            assert held.wait(10)
            release_later = threading.Timer(settings.log_lock_timeout_seconds + 1, release.set)
            release_later.start()
        return real_iter(**kwargs)

    holder = threading.Thread(target=hold_the_write_lock)
    monkeypatch.setattr(log, "iter_entries", iter_entries)
    try:
        response = client.get("/v1/audit/entries?start=0&end=2500", headers=auditor)
    finally:
        release.set()
        holder.join(10)
    assert response.status_code == 200
    assert response.content.count(b"\n") == 2500
    assert chunks == [0, 1000, 2000]


def test_entries_stream_exactly_the_leaf_bytes(
    client: TestClient, database: Database, auditor: dict[str, str]
) -> None:
    append_each(database, 25)
    response = client.get("/v1/audit/entries?start=3&end=25", headers=auditor)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    lines = response.content.split(b"\n")
    assert lines[-1] == b""
    with database.session() as session:
        stored = list(log.iter_entries(session=session, start=3, end=25))
        subtrees = list(log.iter_leaf_hashes(session=session, start=3, end=25))
    assert lines[:-1] == stored
    assert [merkle.leaf_hash(line) for line in lines[:-1]] == subtrees
    assert json.loads(lines[0])["object_id"] == "3"


def test_proof_endpoints_return_verifiable_proofs(
    client: TestClient, database: Database, auditor: dict[str, str]
) -> None:
    append_each(database, 13)
    with database.session() as session:
        leaves = [merkle.leaf_hash(d) for d in log.iter_entries(session=session, start=0, end=13)]
    tree = merkle.MemoryTree(leaves)
    inclusion = client.get("/v1/audit/proofs/inclusion?index=5&tree_size=13", headers=auditor)
    assert inclusion.status_code == 200
    body = inclusion.json()
    assert (body["leaf_index"], body["tree_size"]) == (5, 13)
    merkle.verify_inclusion(
        leaf=leaves[5],
        index=5,
        size=13,
        root=tree.root(13),
        proof=[base64.b64decode(h) for h in body["hashes"]],
    )
    consistency = client.get("/v1/audit/proofs/consistency?first=6&second=13", headers=auditor)
    assert consistency.status_code == 200
    body = consistency.json()
    assert (body["first"], body["second"]) == (6, 13)
    merkle.verify_consistency(
        first=6,
        second=13,
        first_root=tree.root(6),
        second_root=tree.root(13),
        proof=[base64.b64decode(h) for h in body["hashes"]],
    )


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v1/audit/proofs/inclusion?index=4&tree_size=4", 400),
        ("/v1/audit/proofs/inclusion?index=0&tree_size=99", 400),
        ("/v1/audit/proofs/consistency?first=3&second=2", 400),
        ("/v1/audit/proofs/consistency?first=1&second=99", 400),
        ("/v1/audit/entries?start=2&end=2", 400),
        ("/v1/audit/entries?start=0&end=99", 400),
        ("/v1/audit/entries?start=0&end=10001", 400),
        ("/v1/audit/entries?start=-1&end=2", 422),
        ("/v1/audit/entries?start=a&end=2", 422),
        ("/v1/audit/entries?end=2", 422),
        ("/v1/audit/proofs/inclusion?index=x&tree_size=4", 422),
    ],
)
def test_bad_parameters_are_problems_and_only_the_refusal_is_logged(
    client: TestClient, database: Database, auditor: dict[str, str], path: str, status: int
) -> None:
    append_each(database, 4)
    response = client.get(path, headers=auditor)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    with database.session() as session:
        entries = [json.loads(e) for e in log.iter_entries(session=session, start=4, end=10)]
    if status == 422:  # refused by validation, before the route: nothing was read
        assert entries == []
    else:  # a range the log does not have: the attempt is logged as denied, with the reason
        [refused] = entries
        assert (refused["action"], refused["outcome"]) == ("audit.read", "denied")
        assert refused["reason"] == response.json()["detail"]


def test_only_auditors_read_the_log_and_every_refusal_is_logged(
    client: TestClient, database: Database, token: TokenFactory
) -> None:
    paths = ("/v1/audit/checkpoint", "/v1/audit/public-key", "/v1/audit/entries?start=0&end=1")
    for path in paths:
        assert client.get(path).status_code == 401
        response = client.get(path, headers=bearer(token("prof-001", "professional")))
        assert response.status_code == 403
    with database.session() as session:
        logged = [json.loads(e) for e in log.iter_entries(session=session, start=0, end=3)]
        assert log.tree_size(session=session) == 3
    assert [(e["actor"], e["action"], e["outcome"], e["object_id"]) for e in logged] == [
        ("prof-001", "audit.read", "denied", "checkpoint"),
        ("prof-001", "audit.read", "denied", "public-key"),
        ("prof-001", "audit.read", "denied", "entries"),
    ]
    assert {e["reason"] for e in logged} == {"lacks audit.read"}


def test_audit_reads_are_logged(
    client: TestClient, database: Database, auditor: dict[str, str]
) -> None:
    append_each(database, 2)
    response = client.get(
        "/v1/audit/public-key",
        headers={**auditor, "X-Request-ID": AUDIT_REQUEST},
    )
    assert response.status_code == 200
    with database.session() as session:
        last = json.loads(next(iter(log.iter_entries(session=session, start=2, end=3))))
    assert last["action"] == "audit.read"
    assert last["actor"] == "auditor-001"
    assert last["role"] == "auditor"
    assert last["object_id"] == "public-key"
    assert last["request_id"] == AUDIT_REQUEST


def test_readiness_reports_the_access_log(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"]["access_log"] == "ok"


@pytest.fixture
def impatient_client(home: Path, db_url: str) -> Iterator[TestClient]:
    settings = Settings(env="test", home=home, database_url=db_url, log_lock_timeout_seconds=0.2)
    database = Database(settings)
    with TestClient(create_app(settings, database=database), raise_server_exceptions=False) as c:
        yield c
    database.dispose()


def test_a_held_log_lock_fails_the_request_closed(
    impatient_client: TestClient, db_url: str, backend: str, token: TokenFactory
) -> None:
    headers = bearer(token("auditor-001", "auditor"))
    assert impatient_client.get("/v1/audit/public-key", headers=headers).status_code == 200
    holder = make_engine(db_url)
    try:
        with holder.connect() as connection:
            if backend == "postgres":
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": log.LOG_LOCK_KEY}
                )
            else:
                connection.execute(text("SELECT 1"))  # the engine began BEGIN IMMEDIATE
            for path in ("/v1/audit/public-key", "/v1/audit/checkpoint"):
                response = impatient_client.get(path, headers=headers)
                assert response.status_code == 503
                assert response.headers["content-type"] == "application/problem+json"
                assert "Retry-After" in response.headers
            connection.rollback()
    finally:
        holder.dispose()
    checker = make_engine(db_url)
    try:
        with checker.connect() as connection:
            entries = connection.execute(text("SELECT count(*) FROM access_log_entries")).scalar()
            signed = connection.execute(
                text("SELECT count(*) FROM access_log_checkpoints")
            ).scalar()
    finally:
        checker.dispose()
    assert (entries, signed) == (1, 0)
