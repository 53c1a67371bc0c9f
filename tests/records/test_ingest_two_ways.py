"""The same person sent by ``POST /v1/records/batch`` and by ``casepackets import`` is one subject.

Whichever way comes first, the other finds the person ``unchanged``: the identity it stores
decrypts to the same value, the characteristics and events agree, and nothing new is stored.
Once erased, the person stays erased whichever way they are sent again.
"""

from __future__ import annotations

import csv
import itertools
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlmodel import Session

from service.config import Settings
from service.db import Database
from service.records import bulk
from service.records.bulk import CSV_COLUMNS
from service.records.demo import synthetic_bsn
from service.records.service import decrypt_identity, get_subject, subject_dek
from service.records.vocabulary import load_event_types
from tests.records.conftest import Record, count_rows

URL = "/v1/records/batch"
SOURCE = "source-welfare"  # the token subject of ``source_headers``

# What a source may write around a value, or instead of one; an empty CSV value is "not given",
# which the API spells as a missing field, null or a blank text.
AROUND = st.sampled_from(["", " ", "\t", "\xa0", "\u3000"])
NAME = st.sampled_from([".", "Gerritje", "Ayşe", "José", "De Vries", "O'Neill"])
NOT_GIVEN = st.sampled_from([None, "missing", "", "  "])


def padded(values: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.tuples(AROUND, values, AROUND).map("".join)


def optional(values: st.SearchStrategy[str]) -> st.SearchStrategy[str | None]:
    return st.one_of(NOT_GIVEN, padded(values))


people = st.fixed_dictionaries(
    {
        "identity": st.fixed_dictionaries(
            {
                "given_name": padded(NAME),
                "family_name": padded(NAME),
                "birth_date": st.sampled_from(["1958-02-28", "1990-04-17", "2004-12-31"]),
                "street": optional(st.sampled_from(["Slaghekstraat 12", "Hillevliet 3b"])),
                "postcode": optional(st.sampled_from(["3074 LK", "3074 lk", "3074LK", "3081Aa"])),
                "city": optional(st.sampled_from(["Rotterdam", "'s-Gravenhage"])),
                "phone": optional(
                    st.sampled_from(["06-12345678", "+31 6 1234 5678", "010-123 45 67"])
                ),
                "email": optional(st.sampled_from(["a.b@example.nl", "A.B@Example.NL"])),
            }
        ),
        "characteristics": st.fixed_dictionaries(
            {
                "district": padded(st.sampled_from(["Feijenoord", "Charlois"])),
                "neighbourhood": padded(st.sampled_from(["Afrikaanderwijk", "Tarwewijk"])),
                "birth_year": st.sampled_from([None, "missing", "derived"]),
                "household_type": optional(st.sampled_from(["single", "couple with children"])),
            }
        ),
        "events": st.lists(
            st.fixed_dictionaries(
                {
                    "type": padded(st.sampled_from(["welfare_start", "helpdesk_visit"])),
                    "date": st.sampled_from(["2023-01-15", "2024-02-29"]),
                    "office": padded(st.sampled_from(["Wijkteam Feijenoord", "Zuidplein 1"])),
                }
            ),
            max_size=3,
        ),
        "csv_first": st.booleans(),
    }
)


def as_json(person: dict[str, Any], *, bsn: str, event_prefix: str) -> Record:
    """The person as one row of a batch: "missing" fields left out, the rest as generated."""

    def fields(values: dict[str, Any]) -> dict[str, Any]:
        return {name: value for name, value in values.items() if value != "missing"}

    characteristics = fields(person["characteristics"])
    if characteristics.get("birth_year") == "derived":
        characteristics["birth_year"] = int(person["identity"]["birth_date"][:4])
    return {
        "identity": {"bsn": bsn, **fields(person["identity"])},
        "characteristics": characteristics,
        "events": [
            {**event, "source_event_id": f"{event_prefix}-{number}"}
            for number, event in enumerate(person["events"])
        ],
    }


def write_csv(path: Path, record: Record) -> Path:
    """The row as CSV lines, one per event (one without event columns when it has none)."""

    def cell(value: Any) -> str:
        return "" if value is None else str(value)

    subject = {name: cell(value) for name, value in record["identity"].items()}
    subject |= {name: cell(value) for name, value in record["characteristics"].items()}
    events = [
        {
            "event_type": event["type"],
            "event_date": event["date"],
            "office": event["office"],
            "source_event_id": event["source_event_id"],
        }
        for event in record["events"]
    ] or [{}]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({**subject, **event} for event in events)
    return path


def test_the_same_person_sent_either_way_is_one_subject_unchanged_and_stays_erased(
    client: TestClient,
    app: FastAPI,
    database: Database,
    settings: Settings,
    session: Session,
    source_headers: dict[str, str],
    admin_headers: dict[str, str],
    tmp_path: Path,
) -> None:
    keyring = app.state.keyring
    event_types = load_event_types(settings.policies_dir / "events.yaml")
    numbers = itertools.count()

    def import_(record: Record) -> bulk.BulkResult:
        return bulk.import_csv(
            database=database,
            keyring=keyring,
            event_types=event_types,
            path=write_csv(tmp_path / "records.csv", record),
            source=SOURCE,
            actor=SOURCE,
            batch_size=10,
        )

    def post(record: Record) -> dict[str, Any]:
        response = client.post(URL, json={"subjects": [record]}, headers=source_headers)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def stored(pseudonym: str) -> tuple[Any, ...]:
        session.rollback()
        subject = get_subject(session=session, pseudonym=pseudonym)
        row = (
            subject.identity_ciphertext,
            subject.wrapped_dek,
            subject.updated_at,
            subject.district,
            subject.neighbourhood,
            subject.birth_year,
            subject.household_type,
        )
        session.rollback()
        return row

    @hypothesis_settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(person=people)
    def check(person: dict[str, Any]) -> None:
        number = next(numbers)
        record = as_json(person, bsn=synthetic_bsn(number, 11), event_prefix=f"two-ways-{number}")
        sent_events = len(record["events"])
        subjects_before = count_rows(session, "subjects")
        events_before = count_rows(session, "events")

        if person["csv_first"]:
            first = import_(record)
            assert (first.subjects, first.rejected, first.stopped) == (1, [], None)
            assert first.events_stored == sent_events
            answer = post(record)
            [row] = answer["rows"]
            assert row["status"] == "unchanged"
            assert answer["events_already_known"] == sent_events
            pseudonym = row["pseudonym"]
            after_first = after_second = stored(pseudonym)
        else:
            [row] = post(record)["rows"]
            assert row["status"] == "created"
            pseudonym = row["pseudonym"]
            after_first = stored(pseudonym)
            second = import_(record)
            assert (second.rejected, second.stopped) == ([], None)
            assert (second.events_stored, second.events_already_known) == (0, sent_events)
            after_second = stored(pseudonym)
        # Unchanged: not even re-encrypted, and no subject or event added.
        assert after_second == after_first
        assert count_rows(session, "subjects") == subjects_before + 1
        assert count_rows(session, "events") == events_before + sent_events

        subject = get_subject(session=session, pseudonym=pseudonym)
        identity = decrypt_identity(
            keyring=keyring, subject=subject, dek=subject_dek(keyring=keyring, subject=subject)
        )
        birth_year, household_type = subject.birth_year, subject.household_type
        session.rollback()  # an open read would hold SQLite's lock against the erasure
        given_identity = person["identity"]

        def as_given(name: str) -> str | None:
            value = given_identity[name]
            return None if value in (None, "missing") else value.strip() or None

        assert identity.given_name == given_identity["given_name"].strip()
        assert identity.family_name == given_identity["family_name"].strip()
        assert identity.street == as_given("street")
        assert identity.city == as_given("city")
        assert identity.phone == as_given("phone")
        assert identity.email == as_given("email")
        postcode = as_given("postcode")
        assert identity.postcode == (None if postcode is None else postcode.upper())
        assert birth_year == int(given_identity["birth_date"][:4])
        given_household_type = person["characteristics"]["household_type"]
        assert household_type == (
            None
            if given_household_type in (None, "missing")
            else given_household_type.strip() or None
        )

        erased = client.post(f"/v1/subjects/{pseudonym}/erase", headers=admin_headers)
        assert erased.status_code == 200, erased.text
        [again] = post(record)["rows"]
        assert again == {"row": 0, "pseudonym": pseudonym, "status": "erased"}
        assert import_(record).rejected == []
        ciphertext, wrapped_dek, *_ = stored(pseudonym)
        assert (ciphertext, wrapped_dek) == (None, None)
        assert count_rows(session, "subjects") == subjects_before + 1

    check()


def test_lines_of_one_person_that_differ_only_as_the_api_stores_alike_are_all_imported(
    app: FastAPI, database: Database, settings: Settings, session: Session, tmp_path: Path
) -> None:
    """A postcode's case and a birth year left to the birth date change nothing the service
    stores (the API finds such a resend unchanged), so the import takes each such line of one
    BSN as the same person instead of rejecting it as another identity."""
    record = as_json(
        {
            "identity": {"given_name": "Gerritje", "family_name": "Zwanenburg"}
            | {"birth_date": "1990-04-17", "postcode": "3074 lk"},
            "characteristics": {"district": "Feijenoord", "neighbourhood": "Tarwewijk"},
            "events": [{"type": "helpdesk_visit", "date": "2023-01-15", "office": "Zuidplein 1"}],
        },
        bsn=synthetic_bsn(1, 11),
        event_prefix="spelled",
    )
    respelled = as_json(
        {
            "identity": record["identity"] | {"postcode": "3074 LK"},
            "characteristics": record["characteristics"] | {"birth_year": 1990},
            "events": [{"type": "welfare_start", "date": "2023-02-01", "office": "Zuidplein 1"}],
        },
        bsn=synthetic_bsn(1, 11),
        event_prefix="respelled",
    )
    path = tmp_path / "records.csv"
    write_csv(path, record)
    with path.open("a", newline="", encoding="utf-8") as handle:
        lines = write_csv(tmp_path / "respelled.csv", respelled).read_text("utf-8").splitlines()
        handle.write(lines[1] + "\r\n")

    imported = bulk.import_csv(
        database=database,
        keyring=app.state.keyring,
        event_types=load_event_types(settings.policies_dir / "events.yaml"),
        path=path,
        source=SOURCE,
        actor=SOURCE,
        batch_size=1,
    )

    assert imported.rejected == []
    assert (imported.subjects, imported.events_stored) == (1, 2)
    assert count_rows(session, "events") == 2


def test_a_date_with_spaces_around_it_is_refused_by_the_import_as_by_the_api(
    client: TestClient,
    app: FastAPI,
    database: Database,
    settings: Settings,
    session: Session,
    source_headers: dict[str, str],
    tmp_path: Path,
) -> None:
    """Every date is the text YYYY-MM-DD: the API refuses " 1990-04-17" (it strips text fields,
    not dates), so the import rejects the line rather than store what the API would not."""
    person = {
        "identity": {"given_name": "Gerritje", "family_name": "Zwanenburg"}
        | {"birth_date": " 1990-04-17"},
        "characteristics": {"district": "Feijenoord", "neighbourhood": "Tarwewijk"},
        "events": [{"type": "helpdesk_visit", "date": "2023-01-15\t", "office": "Zuidplein 1"}],
    }
    record = as_json(person, bsn=synthetic_bsn(2, 11), event_prefix="padded")

    response = client.post(URL, json={"subjects": [record]}, headers=source_headers)
    imported = bulk.import_csv(
        database=database,
        keyring=app.state.keyring,
        event_types=load_event_types(settings.policies_dir / "events.yaml"),
        path=write_csv(tmp_path / "records.csv", record),
        source=SOURCE,
        actor=SOURCE,
        batch_size=10,
    )

    assert response.status_code == 422, response.text
    refused = {tuple(error["loc"][2:]) for error in response.json()["errors"]}
    assert refused == {("identity", "birth_date"), ("events", 0, "date")}
    assert [(r.line, r.fields) for r in imported.rejected] == [(2, ("birth_date", "event_date"))]
    assert imported.subjects == 0
    assert count_rows(session, "subjects") == 0
