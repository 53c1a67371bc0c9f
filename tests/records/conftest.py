"""Record-store fixtures: valid records, a source's headers, row counts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import text
from sqlmodel import Session

from service.records.demo import synthetic_bsn
from tests.conftest import TokenFactory, bearer

Record = dict[str, Any]


def make_record(index: int, *, seed: int = 7, events: int = 3, prefix: str = "ev") -> Record:
    return {
        "identity": {
            "bsn": synthetic_bsn(index, seed),
            "given_name": f"Gerritje{index}",
            "family_name": f"Zwanenburg{index}",
            "birth_date": "1990-04-17",
            "street": f"Slaghekstraat {index + 1}",
            "postcode": "3074 LK",
            "city": "Rotterdam",
            "phone": f"06-{10_000_000 + index}",
            "email": f"gerritje{index}@example.nl",
        },
        "characteristics": {
            "district": "Feijenoord",
            "neighbourhood": "Afrikaanderwijk",
            "household_type": "single",
        },
        "events": [
            {
                "type": ("welfare_start", "employment_start", "helpdesk_visit")[k % 3],
                "date": f"2023-0{k % 9 + 1}-15",
                "office": "Wijkteam Afrikaanderwijk",
                "source_event_id": f"{prefix}-{index}-{k}",
            }
            for k in range(events)
        ],
    }


@pytest.fixture
def make() -> Callable[..., Record]:
    return make_record


@pytest.fixture
def source_headers(token: TokenFactory) -> dict[str, str]:
    return bearer(token("source-welfare", "source"))


@pytest.fixture
def admin_headers(token: TokenFactory) -> dict[str, str]:
    return bearer(token("admin-001", "admin"))


def count_rows(session: Session, table: str) -> int:
    """Rows in ``table`` now; ends the read so the test's session never holds SQLite's lock."""
    session.rollback()
    try:
        return int(session.connection().execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
    finally:
        session.rollback()
