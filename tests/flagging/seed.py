"""Test data: subjects with real vault-wrapped DEKs and hand-built event histories.

Rows are inserted directly (not through ingest) so these tests depend only on the record store's
tables and key helpers, the same ones packet building uses.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import insert, select
from sqlmodel import Session

from service.access_log.models import AccessLogEntry
from service.crypto.envelope import DataKey, wrap_key
from service.crypto.keyring import KeyProvider
from service.flagging.rules import EVENT_TYPES, FlaggingPolicy, Rule
from service.records.models import Event, Subject
from service.records.service import Identity, dek_aad, encrypt_identity

SUBJECTS = Subject.__table__  # type: ignore[attr-defined]
EVENTS = Event.__table__  # type: ignore[attr-defined]
LOG = AccessLogEntry.__table__  # type: ignore[attr-defined]
AS_OF = date(2026, 3, 15)

# A history the shipped policy's relapse rule flags (3 returns within 24 months of AS_OF): on
# welfare, left it for a job, and back on welfare after each of three jobs ended.
RELAPSING: list[tuple[str, date, str]] = [
    ("welfare_start", date(2023, 1, 2), "Werkplein Zuid"),
    ("welfare_end", date(2024, 3, 1), "Werkplein Zuid"),
    ("employment_end", date(2024, 6, 30), "Werkplein Zuid"),
    ("welfare_start", date(2024, 7, 1), "Werkplein Zuid"),
    ("welfare_end", date(2024, 9, 1), "Werkplein Zuid"),
    ("employment_end", date(2025, 1, 31), "Werkplein Zuid"),
    ("welfare_start", date(2025, 2, 3), "Werkplein Zuid"),
    ("welfare_end", date(2025, 4, 1), "Werkplein Zuid"),
    ("employment_end", date(2025, 9, 30), "Werkplein Zuid"),
    ("welfare_start", date(2025, 10, 1), "Werkplein Zuid"),
]
QUIET: list[tuple[str, date, str]] = [("helpdesk_visit", date(2026, 1, 5), "Wijkteam Bloemhof")]


def add_subject(
    session: Session,
    keyring: KeyProvider,
    *,
    pseudonym: str,
    district: str = "Charlois",
    events: Sequence[tuple[str, date, str]] = (),
) -> tuple[int, DataKey]:
    """Insert one subject with an encrypted identity and its events; returns (id, vault DEK)."""
    dek = DataKey.generate()
    now = datetime.now(UTC)
    identity = Identity(
        bsn="111222333", given_name="Test", family_name="Person", birth_date=date(1980, 1, 1)
    )
    subject_id = int(
        session.connection()
        .execute(
            insert(SUBJECTS)
            .values(
                pseudonym=pseudonym,
                pseudonym_key_version=1,
                district=district,
                neighbourhood="Tarwewijk",
                birth_year=1980,
                household_type=None,
                identity_ciphertext=encrypt_identity(
                    dek=dek, pseudonym=pseudonym, identity=identity
                ),
                wrapped_dek=wrap_key(keyring, "vault", dek, aad=dek_aad(pseudonym)),
                erased_at=None,
                created_at=now,
                updated_at=now,
            )
            .returning(SUBJECTS.c.id)
        )
        .scalar_one()
    )
    if events:
        session.connection().execute(
            insert(EVENTS),
            [
                {
                    "subject_id": subject_id,
                    "source": "test",
                    "source_event_id": f"{pseudonym}-{i}",
                    "type": kind,
                    "date": day,
                    "office": office,
                }
                for i, (kind, day, office) in enumerate(events)
            ],
        )
    return subject_id, dek


def log_entries(session: Session, action: str | None = None) -> list[dict[str, Any]]:
    rows = session.execute(select(LOG.c.entry).order_by(LOG.c.leaf_index)).scalars()
    entries = [json.loads(bytes(row)) for row in rows]
    session.rollback()  # end the read (on SQLite every transaction holds the write lock)
    return [e for e in entries if action is None or e["action"] == action]


def policy(*rules: Rule) -> FlaggingPolicy:
    """A policy of ``rules`` alone, free to use every event type and the office."""
    return FlaggingPolicy(
        name="test",
        declared_version="1",
        version="1+000000000000",
        characteristics=(*EVENT_TYPES, "office"),
        rules=rules,
        content=b"",
    )
