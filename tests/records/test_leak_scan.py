"""Leak scan: after ingesting a demo population, no identity is in clear anywhere we can look."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlmodel import Session

from service.records.demo import demo_records
from service.schema import metadata


def needles(records: list[dict[str, Any]]) -> set[str]:
    """Strings that would betray a subject: BSN, full name, street and number, phone."""
    found: set[str] = set()
    for record in records:
        identity = record["identity"]
        found.add(identity["bsn"])
        found.add(f"{identity['given_name']} {identity['family_name']}")
        found.add(identity["street"])
        found.add(identity["phone"])
    return found


def database_text(session: Session, backend: str, db_url: str) -> str:
    if backend == "sqlite":
        path = Path(str(make_url(db_url).database))
        files = [path, path.with_name(path.name + "-wal")]
        return "".join(f.read_bytes().decode("latin-1") for f in files if f.exists())
    session.rollback()
    dump: list[str] = []
    for table in metadata.tables:
        rows = session.connection().execute(text(f"SELECT t::text FROM {table} t")).scalars()
        dump.extend(rows)
    session.rollback()
    return "\n".join(dump)


def test_no_identity_in_clear_in_database_logs_or_errors(
    client: TestClient,
    session: Session,
    backend: str,
    db_url: str,
    source_headers: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    records = list(demo_records(subjects=300, seed=11))
    secrets = needles(records)
    for start in range(0, len(records), 100):
        response = client.post(
            "/v1/records/batch",
            json={"subjects": records[start : start + 100]},
            headers=source_headers,
        )
        assert response.status_code == 200, response.text

    error_bodies = []
    broken = [dict(r, identity=dict(r["identity"])) for r in records[:20]]
    for record in broken:
        record["identity"]["birth_date"] = "2999-12-31"
        record["identity"]["bsn"] = record["identity"]["bsn"][:-1] + "x"
    error_bodies.append(
        client.post("/v1/records/batch", json={"subjects": broken}, headers=source_headers).text
    )
    extra = [dict(r, unexpected=r["identity"]["given_name"]) for r in records[:5]]
    error_bodies.append(
        client.post("/v1/records/batch", json={"subjects": extra}, headers=source_headers).text
    )
    error_bodies.append(
        client.post(
            "/v1/records/batch", json={"subjects": records[:2] * 2}, headers=source_headers
        ).text
    )

    stored = database_text(session, backend, db_url)
    logs = caplog.text
    for secret in secrets:
        assert secret not in stored
        assert secret not in logs
        for body in error_bodies:
            assert secret not in body
    # Positive control: the scan does see what is stored in clear on purpose.
    assert records[0]["characteristics"]["neighbourhood"] in stored
    assert len(stored) > 10_000
