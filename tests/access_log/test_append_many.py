"""Batched appends: one lock, one frontier read, one write — and the same log as single appends."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, event, text

from service.access_log import merkle
from service.access_log import service as log
from service.config import Settings
from service.db import LOG_LOCK_TIMEOUT_OPTION, Database, make_engine
from tests.access_log.conftest import append_each, entry
from tests.conftest import Databases

FIXED_TIME = datetime(2026, 3, 4, 5, 6, 7, 890_000, tzinfo=UTC)


def stored_rows(
    database: Database,
) -> tuple[list[tuple[int, bytes, bytes]], dict[tuple[int, int], bytes]]:
    with database.engine.connect() as connection:
        entries = [
            (int(i), bytes(h), bytes(d))
            for i, h, d in connection.execute(
                text(
                    "SELECT leaf_index, leaf_hash, entry FROM access_log_entries "
                    "ORDER BY leaf_index"
                )
            )
        ]
        subtrees = {
            (int(level), int(position)): bytes(hash_)
            for level, position, hash_ in connection.execute(
                text("SELECT level, position, hash FROM access_log_subtrees")
            )
        }
    return entries, subtrees


def every_subtree(tree: merkle.MemoryTree) -> dict[tuple[int, int], bytes]:
    return {
        (level, position): hash_
        for level, hashes in enumerate(tree.levels)
        for position, hash_ in enumerate(hashes)
    }


def test_batches_get_consecutive_indexes_and_store_every_complete_subtree(
    database: Database,
) -> None:
    assert append_each(database, 3) == [0, 1, 2]
    number = 3
    for batch in (1, 4, 7, 2, 16, 5, 25):
        with database.transaction() as session:
            indexes = log.append_many(
                session=session, entries=[entry(n) for n in range(number, number + batch)]
            )
        assert indexes == list(range(number, number + batch))
        number += batch
    with database.transaction() as session:
        assert log.append(session=session, entry=entry(number)) == number
    size = number + 1

    entries, subtrees = stored_rows(database)
    assert [i for i, _, _ in entries] == list(range(size))
    assert [json_id(d) for _, _, d in entries] == [str(n) for n in range(size)]
    tree = merkle.MemoryTree(merkle.leaf_hash(d) for _, _, d in entries)
    assert subtrees == every_subtree(tree)
    with database.session() as session:
        assert log.tree_size(session=session) == size
        for tree_size in (1, 17, 32, size):
            assert log.root(session=session, size=tree_size) == tree.root(tree_size)
            for index in range(tree_size):
                merkle.verify_inclusion(
                    leaf=tree.levels[0][index],
                    index=index,
                    size=tree_size,
                    proof=log.inclusion_proof(session=session, index=index, size=tree_size),
                    root=tree.root(tree_size),
                )
        for first in range(size + 1):
            merkle.verify_consistency(
                first=first,
                second=size,
                first_root=tree.root(first),
                second_root=tree.root(size),
                proof=log.consistency_proof(session=session, first=first, second=size),
            )


def json_id(data: bytes) -> str:
    object_id: str = json.loads(data)["object_id"]
    return object_id


def test_a_batch_writes_exactly_what_single_appends_write(
    databases: Databases, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(log, "clock", lambda: FIXED_TIME)
    batched, single = (
        Database(Settings(env="test", home=home, database_url=databases.fresh())) for _ in range(2)
    )
    try:
        with batched.transaction() as session:
            assert log.append_many(session=session, entries=[entry(n) for n in range(5)]) == [
                0,
                1,
                2,
                3,
                4,
            ]
        with batched.transaction() as session:
            log.append_many(session=session, entries=[entry(n) for n in range(5, 37)])
        append_each(single, 37)
        assert stored_rows(batched) == stored_rows(single)
    finally:
        batched.dispose()
        single.dispose()


def test_an_empty_batch_writes_nothing(database: Database) -> None:
    append_each(database, 2)
    with database.transaction() as session:
        assert log.append_many(session=session, entries=[]) == []
    with database.session() as session:
        assert log.tree_size(session=session) == 2


def test_a_batch_rolls_back_with_the_callers_transaction(database: Database) -> None:
    append_each(database, 2)
    with database.session() as session:
        assert log.append_many(session=session, entries=[entry(2), entry(3)]) == [2, 3]
        session.rollback()
    with database.transaction() as session:
        assert log.append_many(session=session, entries=[entry(4), entry(5), entry(6)]) == [
            2,
            3,
            4,
        ]
    entries, subtrees = stored_rows(database)
    assert [json_id(d) for _, _, d in entries] == ["0", "1", "4", "5", "6"]
    assert subtrees == every_subtree(merkle.MemoryTree(merkle.leaf_hash(d) for _, _, d in entries))


def record_statements(engine: Engine) -> list[tuple[str, object]]:
    statements: list[tuple[str, object]] = []

    def record(
        _conn: object, _cursor: object, statement: str, parameters: object, *_: object
    ) -> None:
        statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    return statements


def test_a_batch_runs_the_same_few_statements_as_one_append(
    database: Database, backend: str
) -> None:
    append_each(database, 63)
    statements = record_statements(database.engine)
    with database.transaction() as session:
        assert log.append_many(
            session=session, entries=[entry(n) for n in range(63, 63 + 65)]
        ) == list(range(63, 128))
    batch = len(statements)
    statements.clear()
    with database.transaction() as session:
        assert log.append(session=session, entry=entry(128)) == 128
    # PostgreSQL: lock-and-read-frontier, one write. SQLite: BEGIN IMMEDIATE, frontier, 2 inserts.
    assert batch == len(statements) == (2 if backend == "postgres" else 4)
    _entries, subtrees = stored_rows(database)
    assert len(subtrees) == sum(129 >> level for level in range(8))


def test_every_database_built_from_settings_bounds_the_log_wait(
    home: Path, db_url: str, backend: str
) -> None:
    settings = Settings(env="test", home=home, database_url=db_url, log_lock_timeout_seconds=0.25)
    database = Database(settings)  # as a CLI command or job builds it: no app, no install()
    holder = make_engine(db_url)
    try:
        assert database.engine.get_execution_options()[LOG_LOCK_TIMEOUT_OPTION] == 0.25
        statements = record_statements(database.engine)
        with database.transaction() as session:
            assert log.append(session=session, entry=entry(0)) == 0
            if backend == "sqlite":
                assert session.connection().exec_driver_sql("PRAGMA busy_timeout").scalar() == 250
        if backend == "postgres":
            assert any(
                isinstance(parameters, dict) and parameters.get("timeout") == "250ms"
                for _statement, parameters in statements
            )
        with holder.connect() as connection:
            if backend == "postgres":
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": log.LOG_LOCK_KEY}
                )
            else:
                connection.execute(text("SELECT 1"))  # the engine began BEGIN IMMEDIATE
            with pytest.raises(log.LogUnavailable), database.transaction() as session:
                log.append_many(session=session, entries=[entry(1), entry(2)])
            connection.rollback()
        with database.session() as session:
            assert log.tree_size(session=session) == 1
    finally:
        holder.dispose()
        database.dispose()
