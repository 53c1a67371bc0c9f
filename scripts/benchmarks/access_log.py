"""Access log: append throughput, offline verification speed, proof latency at 1M entries."""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import psycopg
from _common import postgres_database
from sqlalchemy import insert, text
from sqlalchemy.engine import make_url

from service.access_log import merkle
from service.access_log import service as log
from service.access_log.checkpoint import Checkpoint, checkpoint_text
from service.access_log.verify import verify_files
from service.config import PROJECT_ROOT, Settings
from service.crypto.signing import NoteSigner
from service.db import Database, migrate

MIGRATIONS = PROJECT_ROOT / "alembic"
ORIGIN = "casepackets/bench"


def sample_entry(number: int) -> log.LogEntry:
    return log.LogEntry(
        actor=f"prof-{number % 500:03d}",
        role="professional",
        action="packet.open",
        object_type="packet",
        object_id=str(number // 20),
        pseudonyms=tuple(f"{hashlib.sha256(str(number + i).encode()).hexdigest()}" for i in (0, 1)),
        request_id=uuid.uuid4().hex,
    )


def sample_bytes(count: int) -> Iterator[bytes]:
    now = datetime.now(UTC)
    for number in range(count):
        yield sample_entry(number).canonical_bytes(time=now)


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds else float("inf")


def bench_appends(url: str, label: str, count: int) -> None:
    migrate(url, MIGRATIONS)
    settings = Settings(env="test", home=Path(tempfile.gettempdir()), database_url=url)
    database = Database(settings)
    with database.transaction() as session:
        session.execute(
            text(
                "CREATE TABLE bench_plain (leaf_index BIGINT PRIMARY KEY, "
                + (
                    "leaf_hash BYTEA NOT NULL, entry BYTEA NOT NULL)"
                    if "postgres" in url
                    else "leaf_hash BLOB NOT NULL, entry BLOB NOT NULL)"
                )
            )
        )
    entries = [sample_entry(n) for n in range(count)]
    plain = appended = batched = 0.0
    # Alternate blocks of all three, so warm-up and file growth weigh on each alike.
    for block in range(0, count, 50):
        started = time.perf_counter()
        for number in range(block, min(count, block + 50)):
            with database.transaction() as session:
                data = entries[number].canonical_bytes(time=datetime.now(UTC))
                session.execute(
                    text("INSERT INTO bench_plain VALUES (:i, :h, :e)"),
                    {"i": number, "h": merkle.leaf_hash(data), "e": data},
                )
        plain += time.perf_counter() - started
        started = time.perf_counter()
        for number in range(block, min(count, block + 50)):
            with database.transaction() as session:
                log.append(session=session, entry=entries[number])
        appended += time.perf_counter() - started
        # Packet building: two entries per transaction through append_many.
        started = time.perf_counter()
        for number in range(block, min(count, block + 50), 2):
            with database.transaction() as session:
                log.append_many(session=session, entries=entries[number : number + 2])
        batched += time.perf_counter() - started
    database.dispose()
    print(
        f"append {label:10s} {rate(count, appended):9.0f}/s   plain insert+commit "
        f"{rate(count, plain):9.0f}/s   ratio {plain / appended:.2f}x (target >= 0.5x)"
    )
    print(
        f"append_many {label:10s} 2 entries per commit: {rate(count, batched):9.0f} entries/s "
        f"({batched / count * 1000:.2f} ms per entry, {plain / batched:.2f}x the plain row rate)"
    )


def bench_verification(count: int, folder: Path) -> None:
    lines = list(sample_bytes(count))
    entries_file = folder / "entries.ndjson"
    entries_file.write_bytes(b"".join(line + b"\n" for line in lines))
    tree = merkle.CompactRange()
    for line in lines:
        tree.append(merkle.leaf_hash(line))
    signer = NoteSigner(name=ORIGIN, seed=os.urandom(32))
    (folder / "checkpoint").write_text(
        signer.sign(checkpoint_text(Checkpoint(origin=ORIGIN, size=count, root=tree.root())))
    )
    (folder / "public-key").write_text(str(signer.verifier))

    sha256 = hashlib.sha256
    started = time.perf_counter()
    for line in lines:
        sha256(sha256(line).digest()).digest()
    raw = time.perf_counter() - started
    started = time.perf_counter()
    verify_files(
        entries=entries_file, checkpoint=folder / "checkpoint", public_key=folder / "public-key"
    )
    verified = time.perf_counter() - started
    print(
        f"verify {count} entries from file: {rate(count, verified):9.0f}/s   raw SHA-256 "
        f"double-hash {rate(count, raw):9.0f}/s   ratio {raw / verified:.2f}x (target >= 0.5x)"
    )


def bulk_load(url: str, count: int) -> None:
    """Write ``count`` entries and their complete subtrees directly (no per-append locking)."""
    migrate(url, MIGRATIONS)
    tree = merkle.MemoryTree()
    entries: list[tuple[int, bytes, bytes]] = []
    for number, data in enumerate(sample_bytes(count)):
        leaf = merkle.leaf_hash(data)
        tree.append(leaf)
        entries.append((number, leaf, data))
    subtrees = [
        (level, position, hash_)
        for level, hashes in enumerate(tree.levels)
        for position, hash_ in enumerate(hashes)
    ]
    if url.startswith("postgresql"):
        libpq = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(libpq) as connection, connection.cursor() as cursor:
            with cursor.copy(
                "COPY access_log_entries (leaf_index, leaf_hash, entry) FROM STDIN"
            ) as copy:
                for row in entries:
                    copy.write_row(row)
            with cursor.copy("COPY access_log_subtrees (level, position, hash) FROM STDIN") as copy:
                for subtree_row in subtrees:
                    copy.write_row(subtree_row)
            connection.commit()
    else:
        database = Database(
            Settings(env="test", home=Path(tempfile.gettempdir()), database_url=url)
        )
        entries_table = log.AccessLogEntry.__table__  # type: ignore[attr-defined]
        subtrees_table = log.AccessLogSubtree.__table__  # type: ignore[attr-defined]
        with database.transaction() as session:
            for start in range(0, len(entries), 50_000):
                session.execute(
                    insert(entries_table),
                    [
                        {"leaf_index": i, "leaf_hash": h, "entry": d}
                        for i, h, d in entries[start : start + 50_000]
                    ],
                )
            for start in range(0, len(subtrees), 50_000):
                session.execute(
                    insert(subtrees_table),
                    [
                        {"level": lv, "position": p, "hash": h}
                        for lv, p, h in subtrees[start : start + 50_000]
                    ],
                )
        database.dispose()


def bench_proofs(url: str, label: str, count: int, samples: int) -> None:
    started = time.perf_counter()
    bulk_load(url, count)
    loaded = time.perf_counter() - started
    database = Database(Settings(env="test", home=Path(tempfile.gettempdir()), database_url=url))
    randomness = random.Random(7)
    inclusion: list[float] = []
    consistency: list[float] = []
    with database.session() as session:
        assert log.tree_size(session=session) == count
        root = log.root(session=session, size=count)
        for _ in range(samples):
            index = randomness.randrange(count)
            started = time.perf_counter()
            proof = log.inclusion_proof(session=session, index=index, size=count)
            inclusion.append(time.perf_counter() - started)
            leaf = next(iter(log.iter_leaf_hashes(session=session, start=index, end=index + 1)))
            merkle.verify_inclusion(leaf=leaf, index=index, size=count, proof=proof, root=root)
            first = randomness.randrange(1, count)
            started = time.perf_counter()
            log.consistency_proof(session=session, first=first, second=count)
            consistency.append(time.perf_counter() - started)
    database.dispose()

    def describe(values: list[float]) -> str:
        values.sort()
        p95 = values[int(len(values) * 0.95) - 1]
        return f"median {statistics.median(values) * 1000:.2f} ms, p95 {p95 * 1000:.2f} ms"

    print(f"proofs {label:10s} at {count} entries (bulk load {loaded:.0f}s):")
    print(f"   inclusion   {describe(inclusion)} (target <= 5 ms)")
    print(f"   consistency {describe(consistency)} (target <= 5 ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    arguments = parser.parse_args()
    appends = 200 if arguments.quick else 2000
    size = 20_000 if arguments.quick else 1_000_000
    samples = 50 if arguments.quick else 500
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        postgres = postgres_database()
        try:
            bench_appends(f"sqlite:///{folder / 'appends.db'}", "SQLite", appends)
            if postgres:
                bench_appends(postgres[0], "PostgreSQL", appends)
        finally:
            if postgres:
                postgres[1]()
        bench_verification(size, folder)
        bench_proofs(f"sqlite:///{folder / 'proofs.db'}", "SQLite", size, samples)
        postgres = postgres_database()
        if postgres:
            try:
                bench_proofs(postgres[0], "PostgreSQL", size, samples)
            finally:
                postgres[1]()


if __name__ == "__main__":
    main()
