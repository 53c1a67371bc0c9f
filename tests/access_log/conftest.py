"""Access-log fixtures: a signer with a throwaway key, entries, and a way to tamper behind the
triggers' back."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

from service.access_log.service import LogEntry, append
from service.crypto.signing import NoteSigner
from service.db import Database, make_engine

ORIGIN = "casepackets/test"


@pytest.fixture
def signer() -> NoteSigner:
    return NoteSigner(name=ORIGIN, seed=os.urandom(32))


def entry(number: int, *, outcome: str = "allowed") -> LogEntry:
    return LogEntry(
        actor="prof-001",
        role="professional",
        action="packet.open",
        object_type="packet",
        object_id=str(number),
        outcome="denied" if outcome == "denied" else "allowed",
        pseudonyms=(f"ps-{number:04d}",),
        request_id=f"req-{number}",
    )


def append_each(database: Database, count: int) -> list[int]:
    indexes = []
    for number in range(count):
        with database.transaction() as session:
            indexes.append(append(session=session, entry=entry(number)))
    return indexes


TABLES = ("access_log_entries", "access_log_subtrees", "access_log_checkpoints")


def without_triggers_sql(backend: str, table: str, statements: list[str]) -> list[str]:
    """Wrap ``statements`` so they run with the append-only triggers of ``table`` off."""
    if backend == "postgres":
        return [
            f"ALTER TABLE {table} DISABLE TRIGGER USER",
            *statements,
            f"ALTER TABLE {table} ENABLE TRIGGER USER",
        ]
    return [
        f"DROP TRIGGER {table}_no_update",
        f"DROP TRIGGER {table}_no_delete",
        *statements,
    ]


@pytest.fixture
def raw_engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def run_sql(engine: Engine, statements: list[str], params: dict[str, object] | None = None) -> None:
    with engine.begin() as connection:
        for statement in statements:
            connection.execute(text(statement), params or {})
