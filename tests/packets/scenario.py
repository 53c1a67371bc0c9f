"""A small world built through the API: subjects ingested by a source, a flagging run,
professionals and their packets. Shared by the re-identification, lifecycle and authorization
tests; every identity it ingests is distinctive, so a response can be scanned for leaks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

import psycopg
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.engine import make_url

from service.access_log.service import LOG_LOCK_KEY
from service.db import make_engine
from service.packets.models import Followup, Packet, PacketMember, utcnow
from service.records.demo import synthetic_bsn
from service.records.models import Subject
from tests.conftest import TokenFactory, bearer
from tests.flagging.seed import AS_OF, RELAPSING

PACKETS = Packet.__table__  # type: ignore[attr-defined]
MEMBERS = PacketMember.__table__  # type: ignore[attr-defined]
FOLLOWUPS = Followup.__table__  # type: ignore[attr-defined]
SUBJECTS = Subject.__table__  # type: ignore[attr-defined]
SOURCE = "source-welfare"
COORDINATOR = "coord-001"
NOTE = "Spoke with Mrs Quaedvlieg-Oostindie about the rent arrears"
# Follow-up dates, oldest first, within the year before today (a follow-up's date must lie
# between a year before its packet was made and two years ahead).
DAY_A, DAY_B, DAY_C, DAY_D = (
    (utcnow().date() - timedelta(days=days)).isoformat() for days in (70, 40, 39, 10)
)


@dataclass(frozen=True)
class Person:
    """What a source sent for one subject (the identity the owner must get back)."""

    pseudonym: str
    identity: dict[str, Any]
    characteristics: dict[str, Any]

    @property
    def secrets(self) -> tuple[str, ...]:
        """Strings that identify this person and must never reach a non-owner: every identity
        field (each one distinct per person, see ``record``)."""
        return tuple(str(value) for value in self.identity.values())


@dataclass
class World:
    run_id: str
    people: dict[str, Person]
    # professional id -> district -> packet (as returned by partitioning)
    packets: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def packet(self, professional_id: str, district: str) -> dict[str, Any]:
        return self.packets[professional_id][district]

    def members(self, packet: Mapping[str, Any]) -> list[Person]:
        return [self.people[p] for p in packet["pseudonyms"]]

    @property
    def secrets(self) -> set[str]:
        return {s for person in self.people.values() for s in person.secrets} | {NOTE}


def record(index: int, district: str) -> dict[str, Any]:
    """One subject of the batch, with a relapsing history the shipped policy flags."""
    return {
        "identity": {
            "bsn": synthetic_bsn(index, seed=77),
            "given_name": f"Ymkje{index:03d}x",
            "family_name": f"Quaedvlieg{index:03d}z",
            "birth_date": (date(1941, 1, 1) + timedelta(days=97 * (index % 200))).isoformat(),
            "street": f"Wolphaertsbocht {100 + index}q",
            "postcode": f"{3100 + index} QX",
            "city": f"Heinenoord{index:03d}w",
            "phone": f"+31 77 {index:03d} 9{index:03d}",
            "email": f"ymkje{index:03d}@example.org",
        },
        "characteristics": {
            "district": district,
            "neighbourhood": "Tarwewijk",
            "household_type": "single",
        },
        "events": [
            {
                "type": kind,
                "date": day.isoformat(),
                "office": office,
                "source_event_id": f"ev-{index}-{n}",
            }
            for n, (kind, day, office) in enumerate(RELAPSING)
        ],
    }


def ingest(
    client: TestClient, token: TokenFactory, districts: Sequence[str], *, start: int = 0
) -> dict[str, Person]:
    records = [record(start + i, district) for i, district in enumerate(districts)]
    response = client.post(
        "/v1/records/batch",
        json={"subjects": records},
        headers=bearer(token(SOURCE, "source")),
    )
    assert response.status_code == 200, response.text
    people = {}
    for row, sent in zip(response.json()["rows"], records, strict=True):
        people[row["pseudonym"]] = Person(
            pseudonym=row["pseudonym"],
            identity=sent["identity"],
            characteristics=sent["characteristics"],
        )
    return people


def build_world(
    client: TestClient,
    token: TokenFactory,
    *,
    professionals: Mapping[str, Sequence[str]],
    per_district: int = 2,
    spare_professionals: Sequence[str] = (),
) -> World:
    """Ingest ``per_district`` subjects in every district served, flag them, register the
    professionals and partition: one packet per district, for the professional serving it."""
    coordinator = bearer(token(COORDINATOR, "coordinator"))
    districts = [d for served in professionals.values() for d in served]
    people = ingest(client, token, [d for d in districts for _ in range(per_district)])
    for professional_id, served in professionals.items():
        register(client, coordinator, professional_id, list(served))
    for professional_id in spare_professionals:
        register(client, coordinator, professional_id, ["Nowhere"])
    run = client.post("/v1/flagging/runs", json={"as_of": AS_OF.isoformat()}, headers=coordinator)
    assert run.status_code == 201, run.text
    assert run.json()["flagged"] == len(people)
    world = World(run_id=run.json()["id"], people=people)
    parted = client.post(
        "/v1/packets/partition", json={"run_id": world.run_id}, headers=coordinator
    )
    assert parted.status_code == 201, parted.text
    assert parted.json()["unplaced"] == []
    for packet in parted.json()["packets"]:
        detail = client.get(f"/v1/packets/{packet['id']}", headers=coordinator).json()
        packet["pseudonyms"] = [m["pseudonym"] for m in detail["members"]]
        world.packets.setdefault(packet["professional_id"], {})[packet["district"]] = packet
    return world


def register(
    client: TestClient, coordinator: dict[str, str], professional_id: str, districts: list[str]
) -> None:
    response = client.post(
        "/v1/professionals",
        json={
            "id": professional_id,
            "display_name": f"Caseworker {professional_id}",
            "team": "Zuid-1",
            "districts": districts,
            "capacity": 40,
        },
        headers=coordinator,
    )
    assert response.status_code == 201, response.text


def _letters_and_digits(text: str) -> str:
    return "".join(character for character in text.casefold() if character.isalnum())


def leaked(text: str, secrets: set[str]) -> list[str]:
    """The secrets found in ``text``, in any letter case and spacing: a name upper-cased, a
    postcode without its space or a phone number without its dashes is still the secret."""
    folded = text.casefold()
    compact = _letters_and_digits(text)
    return sorted(
        secret
        for secret in secrets
        if secret.casefold() in folded or _letters_and_digits(secret) in compact
    )


class HeldLogLock:
    """Holds a lock an open needs from another connection, as a busy worker or job would.

    SQLite has one write lock for everything; on PostgreSQL ``what`` picks the access log's
    advisory lock, the packet's row (``FOR UPDATE``, as a reassign or shred holds it) or the
    log's entry table (``LOCK TABLE``, as a migration might).
    """

    def __init__(self, db_url: str, what: str = "log", packet_id: str = "") -> None:
        self.db_url = db_url
        self.what = what
        self.packet_id = packet_id
        self.postgres: psycopg.Connection[Any] | None = None
        self.engine = (
            make_engine(db_url) if make_url(db_url).get_backend_name() == "sqlite" else None
        )

    def __enter__(self) -> HeldLogLock:
        if self.engine is not None:
            self.connection = self.engine.connect()
            self.transaction = self.connection.begin()  # BEGIN IMMEDIATE: the write lock
            self.connection.execute(text("SELECT 1"))
            return self
        libpq = make_url(self.db_url).set(drivername="postgresql").render_as_string(False)
        self.postgres = psycopg.connect(libpq, autocommit=self.what == "log")
        if self.what == "log":
            self.postgres.execute("SELECT pg_advisory_lock(%s)", (LOG_LOCK_KEY,))
        elif self.what == "packet-row":
            self.postgres.execute(
                "SELECT 1 FROM packets WHERE id = %s FOR UPDATE", (self.packet_id,)
            )
        else:
            self.postgres.execute("LOCK TABLE access_log_entries IN EXCLUSIVE MODE")
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.engine is not None:
            self.transaction.rollback()
            self.connection.close()
            self.engine.dispose()
        elif self.postgres is not None:
            if self.what == "log":
                self.postgres.execute("SELECT pg_advisory_unlock(%s)", (LOG_LOCK_KEY,))
            else:
                self.postgres.rollback()
            self.postgres.close()
