"""Concurrent appends from several processes form one gap-free log with consistent checkpoints."""

from __future__ import annotations

import multiprocessing
import os
import threading
from itertools import combinations
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from service.access_log import merkle
from service.access_log import service as log
from service.access_log.checkpoint import Checkpoint, parse_checkpoint
from service.config import Settings
from service.crypto.signing import NoteSigner, open_note
from service.db import Database
from tests.access_log.conftest import ORIGIN, entry
from tests.conftest import PostgresServer, Template

PROCESSES = 4
APPENDS_PER_PROCESS = 500
CHECKPOINT_EVERY = 100


def append_and_checkpoint(
    url: str, home: str, seed: bytes, worker: int, batched: bool = False
) -> tuple[list[int], list[str]]:
    """One worker process: its own engine, one transaction per append (or per batch of 1–4
    entries with ``append_many``), a checkpoint now and then."""
    settings = Settings(env="test", home=Path(home), database_url=url, log_lock_timeout_seconds=60)
    database = Database(settings)
    signer = NoteSigner(name=ORIGIN, seed=seed)
    indexes: list[int] = []
    notes: list[str] = []
    try:
        for number in range(APPENDS_PER_PROCESS):
            with database.transaction() as session:
                first = worker * 10_000 + number * 4
                if batched:
                    batch = [entry(first + n) for n in range(1 + number % 4)]
                    got = log.append_many(session=session, entries=batch)
                    assert got == list(range(got[0], got[0] + len(batch)))
                    indexes.extend(got)
                else:
                    indexes.append(log.append(session=session, entry=entry(first)))
            if number % CHECKPOINT_EVERY == CHECKPOINT_EVERY - 1:
                with database.transaction() as session:
                    notes.append(
                        log.signed_checkpoint(session=session, signer=signer, origin=ORIGIN)
                    )
    finally:
        database.dispose()
    return indexes, notes


@pytest.mark.slow
@pytest.mark.parametrize("batched", [False, True], ids=["append", "append_many"])
def test_processes_append_one_gap_free_log_with_consistent_checkpoints(
    db_url: str, database: Database, home: Path, batched: bool
) -> None:
    seed = os.urandom(32)
    signer = NoteSigner(name=ORIGIN, seed=seed)
    context = multiprocessing.get_context("spawn")
    with context.Pool(PROCESSES) as pool:
        results = pool.starmap(
            append_and_checkpoint,
            [(db_url, str(home), seed, w, batched) for w in range(PROCESSES)],
        )
    # Batches hold 1, 2, 3, 4, 1, 2, ... entries: 2.5 per batch on average.
    total = PROCESSES * (APPENDS_PER_PROCESS * 5 // 2 if batched else APPENDS_PER_PROCESS)
    every_index = sorted(i for indexes, _ in results for i in indexes)
    assert every_index == list(range(total))
    for indexes, _ in results:
        assert indexes == sorted(indexes)

    with database.transaction() as session:
        final_note = log.signed_checkpoint(session=session, signer=signer, origin=ORIGIN)
        entries = list(log.iter_entries(session=session, start=0, end=total))
    assert len({bytes(e) for e in entries}) == total
    tree = merkle.MemoryTree(merkle.leaf_hash(e) for e in entries)
    final = parse_checkpoint(open_note(final_note, signer.verifier))
    assert (final.size, final.root) == (total, tree.root())

    checkpoints: list[Checkpoint] = [final]
    for _, notes in results:
        checkpoints.extend(parse_checkpoint(open_note(note, signer.verifier)) for note in notes)
    assert len(checkpoints) == 1 + PROCESSES * (APPENDS_PER_PROCESS // CHECKPOINT_EVERY)
    for older, newer in combinations(sorted(checkpoints, key=lambda c: c.size), 2):
        merkle.verify_consistency(
            first=older.size,
            second=newer.size,
            first_root=older.root,
            second_root=newer.root,
            proof=merkle.consistency_proof(older.size, newer.size, tree.lookup),
        )


@pytest.mark.postgres
def test_appends_stay_serialized_where_the_database_defaults_to_repeatable_read(
    postgres: PostgresServer, postgres_template: Template, home: Path
) -> None:
    """The log's frontier is read after its lock is granted, which sees the appends committed
    before only under READ COMMITTED. A database whose default is REPEATABLE READ (an
    operator's ``ALTER DATABASE``) must not change that: the engine asks for READ COMMITTED."""
    url = postgres.create(template=make_url(postgres_template.url).database)
    with psycopg.connect(make_url(url).set(drivername="postgresql").render_as_string(False)) as c:
        c.execute(
            f"ALTER DATABASE {make_url(url).database} "
            "SET default_transaction_isolation = 'repeatable read'"
        )
        c.commit()
    database = Database(Settings(env="test", home=home, database_url=url))
    both_read, first_committed = threading.Barrier(2), threading.Event()
    indexes: dict[int, int] = {}
    failures: list[BaseException] = []

    def append_after_reading(number: int) -> None:
        try:
            with database.transaction() as session:
                session.execute(text("SELECT count(*) FROM access_log_entries")).one()
                both_read.wait(10)  # both snapshots taken before either appends
                if number == 1:
                    assert first_committed.wait(10)
                indexes[number] = log.append(session=session, entry=entry(number))
            if number == 0:
                first_committed.set()
        except BaseException as exc:  # reported below, from the test's thread
            failures.append(exc)
            first_committed.set()

    try:
        threads = [threading.Thread(target=append_after_reading, args=(n,)) for n in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        with database.reading() as session:
            isolation = session.execute(text("SHOW transaction_isolation")).scalar()
            size = log.tree_size(session=session)
    finally:
        database.dispose()
    assert failures == []
    assert indexes == {0: 0, 1: 1}
    assert (isolation, size) == ("read committed", 2)
