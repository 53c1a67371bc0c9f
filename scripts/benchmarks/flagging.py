"""Flagging and partitioning: pure-core evaluation, a DB flagging run, packets with keys."""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from _common import create_postgres_database, drop_postgres_database
from sqlalchemy import func, insert, select

from service.access_log.models import AccessLogEntry
from service.config import PROJECT_ROOT, Settings
from service.crypto.envelope import DataKey, seal, wrap_key
from service.crypto.keyring import Keyring
from service.db import Database, migrate
from service.flagging.models import Flag, FlaggingRun
from service.flagging.policy import load_flagging_policy
from service.flagging.rules import EVENT_TYPES, Evaluator, SubjectEvent, order_events
from service.flagging.service import run_flagging, system_caller
from service.packets.models import Packet, PacketMember, Professional
from service.packets.policy import load_retention_policy
from service.packets.service import partition_run
from service.records.models import Event, Subject
from service.records.service import dek_aad, identity_aad

AS_OF = date(2026, 3, 15)
DISTRICTS = ["Charlois", "Feijenoord", "IJsselmonde", "Hillegersberg", "Delfshaven", "Noord"]
OFFICES = [f"helpdesk-{i}" for i in range(10)]
WEIGHTED_TYPES = [*EVENT_TYPES, "helpdesk_visit", "helpdesk_visit", "welfare_start"]

SUBJECTS = Subject.__table__  # type: ignore[attr-defined]
EVENTS = Event.__table__  # type: ignore[attr-defined]
FLAGS = Flag.__table__  # type: ignore[attr-defined]
RUNS = FlaggingRun.__table__  # type: ignore[attr-defined]
PACKETS = Packet.__table__  # type: ignore[attr-defined]
MEMBERS = PacketMember.__table__  # type: ignore[attr-defined]
PROFESSIONALS = Professional.__table__  # type: ignore[attr-defined]
LOG = AccessLogEntry.__table__  # type: ignore[attr-defined]


def timed(work: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


def history(rng: random.Random) -> list[SubjectEvent]:
    end = AS_OF.toordinal()
    return order_events(
        (rng.choice(WEIGHTED_TYPES), end - rng.randrange(1800), rng.choice(OFFICES))
        for _ in range(rng.randrange(2, 15))
    )


# -- 1. pure core -----------------------------------------------------------------------------


def bench_pure(subjects: int) -> None:
    policy = load_flagging_policy(PROJECT_ROOT / "policies" / "flagging.yaml")
    rng = random.Random(7)
    histories = [history(rng) for _ in range(subjects)]
    events = sum(len(h) for h in histories)
    evaluator = Evaluator(policy, AS_OF)

    def baseline() -> int:
        # Touch every event once, doing nothing: the floor any evaluator pays in Python.
        count = 0
        for h in histories:
            for _kind, day, _office in h:
                if day > 0:
                    count += 1
        return count

    def evaluate_sorted() -> int:
        return sum(1 for h in histories if evaluator.evaluate_sorted(h))

    def evaluate_unsorted() -> int:
        return sum(1 for h in histories if evaluator.evaluate(h))

    base_s, _ = timed(baseline)
    sorted_s, flagged = timed(evaluate_sorted)
    unsorted_s, _ = timed(evaluate_unsorted)
    print(f"\n== pure-core evaluation: {subjects:,} subjects, {events:,} events, 3 rules")
    print(f"baseline (iterate every event)     {base_s:7.2f} s  {subjects / base_s:>12,.0f} subj/s")
    print(
        f"evaluate_sorted (DB order)         {sorted_s:7.2f} s  {subjects / sorted_s:>12,.0f} "
        f"subj/s  ({sorted_s / base_s:.1f}x baseline; target >= 100,000/s)"
    )
    print(
        f"evaluate (sorts each history)      {unsorted_s:7.2f} s  "
        f"{subjects / unsorted_s:>12,.0f} subj/s  ({unsorted_s / base_s:.1f}x baseline)"
    )
    print(f"flagged: {flagged:,} ({flagged / subjects:.1%})")


# -- databases --------------------------------------------------------------------------------


@contextmanager
def scratch_database(backend: str, folder: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{folder / f'bench-{uuid.uuid4().hex[:8]}.db'}"
        return
    url = create_postgres_database()
    try:
        yield url
    finally:
        drop_postgres_database(url)


def seed_subjects(database: Database, keyring: Keyring, subjects: int) -> None:
    """Bulk-insert subjects with real vault-wrapped DEKs and sealed identities, and events."""
    rng = random.Random(11)
    now = datetime.now(UTC)
    with database.transaction() as session:
        connection = session.connection()
        for start in range(0, subjects, 5000):
            rows = []
            for i in range(start, min(start + 5000, subjects)):
                pseudonym = f"{i:064x}"
                dek = DataKey.generate()
                rows.append(
                    {
                        "id": i + 1,
                        "pseudonym": pseudonym,
                        "pseudonym_key_version": 1,
                        "district": DISTRICTS[i % len(DISTRICTS)],
                        "neighbourhood": "bench",
                        "birth_year": 1980,
                        "household_type": None,
                        "identity_ciphertext": seal(
                            dek, b'{"bench":true}', aad=identity_aad(pseudonym)
                        ),
                        "wrapped_dek": wrap_key(keyring, "vault", dek, aad=dek_aad(pseudonym)),
                        "erased_at": None,
                        "created_at": now,
                        "updated_at": now,
                    }
                )
            connection.execute(insert(SUBJECTS), rows)
            events = [
                {
                    "subject_id": row["id"],
                    "source": "bench",
                    "source_event_id": f"{row['id']}-{n}",
                    "type": kind,
                    "date": date.fromordinal(day),
                    "office": office,
                }
                for row in rows
                for n, (kind, day, office) in enumerate(history(rng))
            ]
            connection.execute(insert(EVENTS), events)


def bench_database(backend: str, *, subjects: int, cases: int, folder: Path) -> None:
    keyring = Keyring.init(folder / f"keyring-{uuid.uuid4().hex[:6]}.json")
    policy = load_flagging_policy(PROJECT_ROOT / "policies" / "flagging.yaml")
    retention = load_retention_policy(PROJECT_ROOT / "policies" / "retention.yaml")
    total = max(subjects, cases)
    with scratch_database(backend, folder) as url:
        migrate(url, PROJECT_ROOT / "alembic")
        database = Database(
            Settings(env="development", home=folder, database_url=url, log_lock_timeout_seconds=30)
        )
        try:
            seed_s, _ = timed(lambda: seed_subjects(database, keyring, total))
            print(f"\n== {backend}: {total:,} subjects with wrapped DEKs and events")
            print(f"seeding (bulk insert, real wraps)  {seed_s:7.2f} s")

            # 2. a full flagging run over the database
            def read_everything() -> int:
                with database.transaction() as session:
                    rows = session.connection().execute(
                        select(
                            EVENTS.c.subject_id, EVENTS.c.type, EVENTS.c.date, EVENTS.c.office
                        ).order_by(EVENTS.c.subject_id, EVENTS.c.date)
                    )
                    return sum(1 for _ in rows)

            read_s, _ = timed(read_everything)

            def flag() -> FlaggingRun:
                with database.transaction() as session:
                    return run_flagging(
                        session=session, policy=policy, as_of=AS_OF, caller=system_caller("bench")
                    )

            run_s, run = timed(flag)
            print(
                f"baseline: read all events         {read_s:7.2f} s\n"
                f"flagging run ({run.evaluated:,} evaluated, {run.flagged:,} flagged) "
                f"{run_s:7.2f} s  {run.evaluated / run_s:,.0f} subj/s "
                f"({run_s / read_s:.1f}x the plain read)"
            )

            # 3. partitioning `cases` flagged cases into packets with keys
            bench_partition(database, keyring, retention, cases)
        finally:
            database.dispose()


def bench_partition(database: Database, keyring: Keyring, retention: Any, cases: int) -> None:
    run_id = uuid.uuid4().hex
    now = datetime.now(UTC)
    per_district = cases // len(DISTRICTS) + 1
    with database.transaction() as session:
        connection = session.connection()
        connection.execute(
            insert(RUNS).values(
                id=run_id,
                policy_name="bench",
                policy_version="bench+0",
                as_of=AS_OF,
                started_by="bench",
                evaluated=cases,
                flagged=cases,
                created_at=now,
                finished_at=now,
            )
        )
        for start in range(0, cases, 10_000):
            connection.execute(
                insert(FLAGS),
                [
                    {
                        "run_id": run_id,
                        "subject_id": i + 1,
                        "kind": "algorithm",
                        "policy_version": "bench+0",
                        "reason_code": None,
                        "pushed_by": None,
                        "hits": [],
                        "explanation": "benchmark flag",
                        "created_at": now,
                    }
                    for i in range(start, min(start + 10_000, cases))
                ],
            )
        professionals = [
            {
                "id": f"prof-{district}-{n:03d}",
                "display_name": "bench",
                "team": district,
                "capacity": 120,
                "districts": [district],
                "active": True,
                "created_at": now,
                "updated_at": now,
            }
            for district in DISTRICTS
            for n in range(per_district // 100 + 1)
        ]
        connection.execute(insert(PROFESSIONALS), professionals)

    # Baseline: insert the same number of packet and member rows, no keys, no log; rolled back.
    def plain_insert() -> None:
        with database.session() as session:
            connection = session.connection()
            subject_pseudonyms = list(
                connection.execute(
                    select(SUBJECTS.c.id, SUBJECTS.c.pseudonym, FLAGS.c.id)
                    .join(FLAGS, FLAGS.c.subject_id == SUBJECTS.c.id)
                    .where(FLAGS.c.run_id == run_id)
                )
            )
            packets: list[dict[str, Any]] = []
            members: list[dict[str, Any]] = []
            for start in range(0, len(subject_pseudonyms), 20):
                packet_id = str(uuid.uuid4())
                packets.append(
                    {
                        "id": packet_id,
                        "run_id": run_id,
                        "professional_id": professionals[0]["id"],
                        "district": "x",
                        "status": "assigned",
                        "created_at": now,
                        "expires_at": now,
                        "closed_at": None,
                        "shredded_at": None,
                        "wrapped_key": None,
                    }
                )
                members.extend(
                    {
                        "packet_id": packet_id,
                        "subject_id": subject_id,
                        "pseudonym": pseudonym,
                        "flag_id": flag_id,
                        "wrapped_dek": None,
                    }
                    for subject_id, pseudonym, flag_id in subject_pseudonyms[start : start + 20]
                )
            connection.execute(insert(PACKETS), packets)
            for start in range(0, len(members), 5000):
                connection.execute(insert(MEMBERS), members[start : start + 5000])
            session.rollback()

    base_s, _ = timed(plain_insert)

    def build() -> Any:
        with database.transaction() as session:
            return partition_run(
                session=session,
                keyring=keyring,
                run_id=run_id,
                packet_size=20,
                retention=retention,
                caller=system_caller("bench"),
            )

    build_s, result = timed(build)
    with database.transaction() as session:
        members = session.connection().execute(select(func.count()).select_from(MEMBERS)).scalar()
        logged = session.connection().execute(select(func.count()).select_from(LOG)).scalar()
    print(
        f"baseline: plain insert of {cases:,} member rows in {cases // 20:,} packets "
        f"{base_s:7.2f} s\n"
        f"partition {cases:,} cases → {len(result.packets):,} packets with keys "
        f"{build_s:7.2f} s  ({build_s / base_s:.1f}x the plain insert; target <= 10 s)\n"
        f"  members stored {members:,}, unplaced {len(result.unplaced):,}, "
        f"log entries now {logged:,}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--pure-subjects", type=int, default=None)
    parser.add_argument("--cases", type=int, default=None, help="flagged cases to partition")
    args = parser.parse_args()
    pure = args.pure_subjects or (50_000 if args.quick else 1_000_000)
    cases = args.cases or (5_000 if args.quick else 100_000)
    bench_pure(pure)
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    with tempfile.TemporaryDirectory() as folder:
        for backend in backends:
            bench_database(backend, subjects=cases, cases=cases, folder=Path(folder))


if __name__ == "__main__":
    main()
