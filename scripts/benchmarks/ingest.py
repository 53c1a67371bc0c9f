"""Ingest: subjects/s through POST /v1/records/batch and `casepackets import` vs a plain insert.

What is measured, per database (SQLite file, PostgreSQL), each on a fresh migrated database:
- api:      POST /v1/records/batch, in-process ASGI (Starlette TestClient, no network), batches of
            10,000 subjects with 3 events each; JSON bodies are built before the clock starts;
- import:   the real `casepackets import FILE --source bench` command in a child process
            (CSV, one line per event, 3 lines per subject), including process start-up;
- baseline: a plain insert of the same rows without any cryptography (identity JSON in clear,
            BSN as the key, no HMAC/AES), same batch size, same bulk path (executemany / COPY),
            one transaction per batch.
Memory: peak RSS of `casepackets import` on a small and a 10x larger file (beyond one batch it
grows only by a digest per subject and per event of the file).

    scripts/bench ingest            # 50,000 subjects per run; memory at 100k and 1M CSV lines
    scripts/bench ingest --quick    # 5,000 subjects; memory at 3k and 30k lines
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from _common import create_postgres_database, drop_postgres_database
from fastapi.testclient import TestClient

from service.config import Settings
from service.db import Database, migrate
from service.main import create_app
from service.records.bulk import CSV_COLUMNS
from service.records.demo import synthetic_bsn
from service.records.service import (
    EVENT_COLUMNS,
    EVENTS,
    SUBJECT_COLUMNS,
    SUBJECTS,
    _allocate_subject_ids,
    _bind,
    _binder,
    _bulk_insert,
)

ROOT = Path(__file__).resolve().parents[2]
BATCH = 10_000
TYPES = ("welfare_start", "employment_start", "helpdesk_visit")


def record(index: int, seed: int) -> dict[str, Any]:
    return {
        "identity": {
            "bsn": synthetic_bsn(index, seed),
            "given_name": "Gerritje",
            "family_name": f"Zwanenburg{index}",
            "birth_date": "1990-04-17",
            "street": f"Slaghekstraat {index % 300 + 1}",
            "postcode": "3074 LK",
            "city": "Rotterdam",
            "phone": f"06-{10_000_000 + index}",
            "email": None,
        },
        "characteristics": {
            "district": "Charlois",
            "neighbourhood": "Tarwewijk",
            "household_type": "single",
        },
        "events": [
            {
                "type": TYPES[k],
                "date": f"2023-0{k + 1}-15",
                "office": "Werk en Inkomen Rotterdam Zuid",
                "source_event_id": f"b{seed}-{index}-{k}",
            }
            for k in range(3)
        ],
    }


def records(count: int, seed: int) -> list[dict[str, Any]]:
    return [record(i, seed) for i in range(count)]


class Engine:
    """A fresh, migrated database per measurement (SQLite file or a PostgreSQL database)."""

    def __init__(self, backend: str, tmp: Path) -> None:
        self.backend, self.tmp = backend, tmp
        self.created: list[str] = []

    def fresh(self) -> str:
        if self.backend == "sqlite":
            url = f"sqlite:///{self.tmp / f'bench-{uuid.uuid4().hex[:8]}.db'}"
        else:
            url = create_postgres_database()
            self.created.append(url)
        migrate(url, ROOT / "alembic")
        return url

    def cleanup(self) -> None:
        for url in self.created:
            drop_postgres_database(url)


def bench_api(url: str, home: Path, rows: list[dict[str, Any]]) -> float:
    settings = Settings(env="test", home=home, database_url=url)
    app = create_app(settings)
    token = app.state.dev_issuer.mint(subject="bench-api", roles=["source"], ttl_seconds=3600)
    headers = {"Authorization": f"Bearer {token}", "content-type": "application/json"}
    bodies = [
        json.dumps({"subjects": rows[i : i + BATCH]}).encode() for i in range(0, len(rows), BATCH)
    ]
    with TestClient(app) as client:
        started = time.perf_counter()
        for body in bodies:
            response = client.post("/v1/records/batch", content=body, headers=headers)
            if response.status_code != 200:
                raise SystemExit(f"api batch failed: {response.status_code} {response.text[:300]}")
        elapsed = time.perf_counter() - started
    app.state.database.dispose()
    return len(rows) / elapsed


def bench_plain(url: str, home: Path, rows: list[dict[str, Any]]) -> float:
    database = Database(Settings(env="test", home=home, database_url=url))
    started = time.perf_counter()
    for start in range(0, len(rows), BATCH):
        chunk = rows[start : start + BATCH]
        with database.transaction() as session:
            connection = session.connection()
            now = _bind(connection, SUBJECTS.c.created_at, datetime.now(UTC))
            to_date = _binder(connection, EVENTS.c.date)
            ids = _allocate_subject_ids(connection, len(chunk))
            subject_rows = []
            event_rows = []
            for subject_id, item in zip(ids, chunk, strict=True):
                c = item["characteristics"]
                subject_rows.append(
                    (
                        subject_id,
                        item["identity"]["bsn"],
                        1,
                        c["district"],
                        c["neighbourhood"],
                        1990,
                        c["household_type"],
                        json.dumps(item["identity"]),
                        None,
                        now,
                        now,
                    )
                )
                for e in item["events"]:
                    event_rows.append(
                        (
                            subject_id,
                            "plain",
                            e["source_event_id"],
                            e["type"],
                            to_date(datetime.fromisoformat(e["date"]).date()),
                            e["office"],
                        )
                    )
            _bulk_insert(connection, SUBJECTS, SUBJECT_COLUMNS, subject_rows)
            _bulk_insert(connection, EVENTS, EVENT_COLUMNS, event_rows)
    elapsed = time.perf_counter() - started
    database.dispose()
    return len(rows) / elapsed


def csv_lines(count: int, seed: int) -> Iterator[list[str]]:
    for index in range(count):
        item = record(index, seed)
        identity, c = item["identity"], item["characteristics"]
        for e in item["events"]:
            yield [
                *(identity[k] or "" for k in CSV_COLUMNS[:9]),
                c["district"],
                c["neighbourhood"],
                "",
                c["household_type"],
                e["type"],
                e["date"],
                e["office"],
                e["source_event_id"],
            ]


def write_csv(path: Path, subjects: int, seed: int) -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(csv_lines(subjects, seed))
    return path


def run_import(url: str, home: Path, path: Path) -> tuple[float, float]:
    """Run `casepackets import` in a child; returns (seconds, peak RSS in MiB of that child)."""
    env = {
        **os.environ,
        "CASEPACKETS_HOME": str(home),
        "CASEPACKETS_DATABASE_URL": url,
        "CASEPACKETS_ENV": "test",
    }
    probe = (
        "import resource, sys\n"
        "from service.cli import main\n"
        "sys.argv = ['casepackets', 'import', sys.argv[1], '--source', 'bench', "
        "'--batch-size', '10000']\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    code = exit.code\nelse:\n    code = 0\n"
        "print('maxrss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", probe, str(path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"import failed ({done.returncode}): {done.stderr[-800:]}")
    kib = next(
        int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("maxrss_kib")
    )
    return elapsed, kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--subjects", type=int, help="subjects per measurement")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    subjects = args.subjects or (5_000 if args.quick else 50_000)
    memory_lines = (3_000, 30_000) if args.quick else (100_000, 1_000_000)
    rows = records(subjects, seed=1)
    print(f"ingest benchmark: {subjects} subjects x 3 events, batches of {BATCH}", flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        home = tmp / "home"
        home.mkdir()
        csv_path = write_csv(tmp / "bench.csv", subjects, seed=2)
        for backend in args.backends.split(","):
            engine = Engine(backend, tmp)
            try:
                plain = bench_plain(engine.fresh(), home, rows)
                api = bench_api(engine.fresh(), home, rows)
                seconds, _rss = run_import(engine.fresh(), home, csv_path)
                imported = subjects / seconds
            finally:
                if backend == "postgres":
                    engine.cleanup()
            print(
                f"{backend:8} plain insert {plain:9.0f} subjects/s | "
                f"api {api:8.0f} subjects/s ({api / plain:.2f}x plain) | "
                f"import {imported:8.0f} subjects/s ({imported / plain:.2f}x plain, "
                "incl. process start)",
                flush=True,
            )
        if not args.skip_memory:
            peaks = []
            for lines in memory_lines:
                path = write_csv(tmp / f"mem-{lines}.csv", lines // 3, seed=3)
                engine = Engine("sqlite", tmp)
                _seconds, rss = run_import(engine.fresh(), home, path)
                peaks.append(rss)
                print(f"memory   import of {lines:>9} CSV lines (sqlite): peak RSS {rss:6.1f} MiB")
                path.unlink()
            print(f"memory   ratio large/small peak RSS: {peaks[1] / peaks[0]:.2f}x")


if __name__ == "__main__":
    main()
