"""The ingest fast paths give exactly what the straightforward code gives.

Validation runs over TypedDicts (no model objects), the BSN check has a shortcut, pseudonyms
reuse one HMAC state, and the response is written as JSON directly: each must stay equal to
the reference it replaces, and the request/response contract must not move.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from pydantic_core import ErrorDetails
from sqlalchemy.exc import DataError, IntegrityError
from sqlmodel import Session

from service.crypto.keyring import Keyring
from service.crypto.pseudonym import InvalidBsn, normalize_bsn, pseudonymize
from service.records import models as records_models
from service.records.models import (
    MAX_SUBJECT_EVENTS,
    RECORD_BATCH,
    SUBJECT_RECORD,
    RecordBatchPublic,
    _valid_bsn,
)
from service.records.service import (
    BATCHES,
    IngestResult,
    _bind,
    _bulk_insert,
    batch_errors,
    decrypt_identity,
    get_subject,
    identity_plaintext,
    pseudonymizer,
    subject_dek,
)
from tests.records.conftest import Record

URL = "/v1/records/batch"
Make = Callable[..., Record]
NINE_DIGITS = st.text(alphabet="0123456789", min_size=9, max_size=9)
BSN_LIKE = st.text(alphabet="0123456789 .-x٣", min_size=0, max_size=12)


def reference_bsn(value: str) -> str | None:
    try:
        return normalize_bsn(value)
    except InvalidBsn:
        return None


def fast_bsn(value: str) -> str | None:
    try:
        return _valid_bsn(value)
    except ValueError:
        return None


@settings(max_examples=2000, deadline=None)
@given(NINE_DIGITS | BSN_LIKE)
def test_bsn_shortcut_agrees_with_normalize_bsn(value: str) -> None:
    assert fast_bsn(value) == reference_bsn(value)


def test_bsn_shortcut_rejects_all_zeros_and_checks_the_last_digit() -> None:
    assert fast_bsn("000000000") is None
    assert fast_bsn("111222333") == "111222333"
    assert fast_bsn("111222334") is None


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=32, max_size=32), NINE_DIGITS)
def test_pseudonymizer_equals_pseudonymize(key: bytes, digits: str) -> None:
    assert pseudonymizer(key)(digits) == pseudonymize(key, digits)


def test_validated_records_carry_every_key_with_defaults(make: Make) -> None:
    record = make(0)
    for name in ("street", "postcode", "city", "phone", "email"):
        del record["identity"][name]
    del record["characteristics"]["household_type"]
    del record["events"]
    checked = SUBJECT_RECORD.validate_python(record)
    assert checked["events"] == []
    assert checked["characteristics"]["birth_year"] is None
    assert checked["characteristics"]["household_type"] is None
    plaintext = json.loads(identity_plaintext(checked["identity"]))
    assert list(plaintext) == [
        "bsn",
        "given_name",
        "family_name",
        "birth_date",
        "street",
        "postcode",
        "city",
        "phone",
        "email",
    ]
    assert plaintext["birth_date"] == "1990-04-17"
    assert plaintext["email"] is None


def test_strings_are_stripped_and_postcodes_upper_cased(make: Make) -> None:
    record = make(0)
    record["identity"]["given_name"] = "  Gerritje  "
    record["identity"]["postcode"] = "3074 lk"
    checked = SUBJECT_RECORD.validate_python(record)
    assert checked["identity"]["given_name"] == "Gerritje"
    assert checked["identity"]["postcode"] == "3074 LK"


@pytest.mark.parametrize("postcode", ["3074 \u0131\u0131", "3074\u00df", "3074 \ufb00"])
def test_a_postcode_whose_letters_upper_case_to_latin_ones_is_refused(
    make: Make, postcode: str
) -> None:
    """``str.upper`` makes Latin capitals of other letters (the dotless i is I, sharp s is SS,
    the ligature ff is FF): such a postcode is refused, not stored as one nobody sent."""
    record = make(0)
    record["identity"]["postcode"] = postcode
    error = the_one_error(record)
    assert error["loc"][-1] == "postcode"


@pytest.mark.parametrize(
    ("place", "loc"),
    [
        (lambda r: r, ("subjects", 0, "surprise")),
        (lambda r: r["identity"], ("subjects", 0, "identity", "surprise")),
        (lambda r: r["characteristics"], ("subjects", 0, "characteristics", "surprise")),
        (lambda r: r["events"][1], ("subjects", 0, "events", 1, "surprise")),
    ],
)
def test_unknown_fields_are_rejected_at_every_level(
    make: Make, place: Callable[[Record], dict[str, Any]], loc: tuple[Any, ...]
) -> None:
    record = make(0)
    place(record)["surprise"] = "Zwanenburg"
    with pytest.raises(ValidationError) as caught:
        RECORD_BATCH.validate_python({"subjects": [record]})
    errors = caught.value.errors(include_input=False)
    assert [(e["loc"], e["type"]) for e in errors] == [(loc, "extra_forbidden")]


def test_every_failing_field_of_a_row_is_named_without_values(
    client: TestClient, source_headers: dict[str, str], make: Make
) -> None:
    bad = make(1)
    bad["identity"]["postcode"] = "Tarwewijk"
    bad["identity"]["bsn"] = "123456789"
    bad["events"][2]["date"] = "2999-01-01"
    bad["characteristics"]["birth_year"] = 1991
    response = client.post(URL, json={"subjects": [make(0), bad]}, headers=source_headers)
    assert response.status_code == 422, response.text
    fields = {(e["row"], tuple(e["loc"][2:])) for e in response.json()["errors"]}
    assert fields == {
        (1, ("identity", "postcode")),
        (1, ("identity", "bsn")),
        (1, ("events", 2, "date")),
    }
    assert "Tarwewijk" not in response.text
    assert "123456789" not in response.text


def test_birth_year_disagreeing_with_the_birth_date_names_the_row(
    client: TestClient, source_headers: dict[str, str], make: Make
) -> None:
    bad = make(1)
    bad["characteristics"]["birth_year"] = 1991
    response = client.post(URL, json={"subjects": [make(0), bad]}, headers=source_headers)
    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert error["row"] == 1
    assert "birth_year" in error["msg"]


def test_batch_errors_lists_every_problem_when_the_shortcut_does_not_apply(make: Make) -> None:
    rows = [make(0), make(1), make(0)]
    rows[1]["events"][0]["type"] = "moon_landing"
    subjects = RECORD_BATCH.validate_python({"subjects": rows})["subjects"]
    errors = batch_errors(subjects=subjects, event_types=frozenset({"welfare_start"}), max_rows=9)
    locs = {tuple(e["loc"]) for e in errors}
    assert ("subjects", 2, "identity", "bsn") in locs
    assert ("subjects", 1, "events", 0, "type") in locs
    assert ("subjects", 0, "events", 0, "source_event_id") in locs
    assert ("subjects", 2, "events", 2, "source_event_id") in locs
    clean = RECORD_BATCH.validate_python({"subjects": [make(0), make(1)]})["subjects"]
    types = frozenset({"welfare_start", "employment_start", "helpdesk_visit"})
    assert batch_errors(subjects=clean, event_types=types, max_rows=9) == []


def test_response_body_is_the_declared_model(
    client: TestClient, source_headers: dict[str, str], make: Make
) -> None:
    body = {"subjects": [make(0), make(1)]}
    first = client.post(URL, json=body, headers={**source_headers, "Idempotency-Key": "k1"})
    assert first.status_code == 200, first.text
    parsed = RecordBatchPublic.model_validate_json(first.content)
    assert json.loads(parsed.model_dump_json()) == first.json()
    again = client.post(URL, json=body, headers={**source_headers, "Idempotency-Key": "k1"})
    replayed = RecordBatchPublic.model_validate_json(again.content)
    assert replayed.replayed is True
    assert replayed.rows == parsed.rows


def test_ingest_result_json_matches_the_model_dump() -> None:
    result = IngestResult(
        batch_id="b" * 32,
        source="source-welfare",
        events_stored=5,
        events_already_known=1,
        replayed=False,
        pseudonyms=["a" * 32, "c" * 32],
        statuses=["created", "erased"],
    )
    assert json.loads(result.to_json()) == json.loads(result.public().model_dump_json())
    assert list(json.loads(result.to_json())) == list(RecordBatchPublic.model_fields)


def test_identity_without_optional_fields_round_trips(
    app: FastAPI,
    client: TestClient,
    session: Session,
    source_headers: dict[str, str],
    make: Make,
) -> None:
    keyring: Keyring = app.state.keyring
    record = make(0)
    for name in ("street", "postcode", "city", "phone", "email"):
        del record["identity"][name]
    response = client.post(URL, json={"subjects": [record]}, headers=source_headers)
    assert response.status_code == 200, response.text
    again = client.post(URL, json={"subjects": [record]}, headers=source_headers)
    assert again.json()["rows"][0]["status"] == "unchanged"
    subject = get_subject(session=session, pseudonym=response.json()["rows"][0]["pseudonym"])
    identity = decrypt_identity(
        keyring=keyring, subject=subject, dek=subject_dek(keyring=keyring, subject=subject)
    )
    assert identity.bsn == record["identity"]["bsn"]
    assert identity.email is None


def test_the_bulk_insert_fails_as_sqlalchemy_fails(session: Session, backend: str) -> None:
    """COPY runs on the driver's own connection, yet its failures are SQLAlchemy's, so the
    handlers for a plain insert (409 on a duplicate, 422 on an unstorable value) apply."""
    columns = (
        "id",
        "source",
        "idempotency_key",
        "request_digest",
        "subject_count",
        "response",
        "created_at",
    )

    def batch(batch_id: str, response: str = "{}") -> tuple[Any, ...]:
        created_at = _bind(session.connection(), BATCHES.c.created_at, datetime.now(UTC))
        return (batch_id, "source-welfare", "key-1", "digest", 0, response, created_at)

    with pytest.raises(IntegrityError):
        _bulk_insert(session.connection(), BATCHES, columns, [batch("a" * 32), batch("b" * 32)])
    session.rollback()
    if backend == "postgres":  # SQLite stores a NUL
        with pytest.raises(DataError):
            _bulk_insert(session.connection(), BATCHES, columns, [batch("c" * 32, "{\u0000}")])
        session.rollback()


def the_one_error(record: Record) -> ErrorDetails:
    """The one error a batch of ``record`` alone is refused with (its input left out)."""
    with pytest.raises(ValidationError) as caught:
        RECORD_BATCH.validate_python({"subjects": [record]})
    [error] = caught.value.errors(include_input=False)
    return error


@pytest.mark.parametrize(
    ("place", "field", "value"),
    [
        (lambda r: r["identity"], "given_name", "\u200b"),
        (lambda r: r["identity"], "given_name", "-"),
        (lambda r: r["identity"], "family_name", "\u202e\u200d"),
        (lambda r: r["characteristics"], "district", "\u0301"),
        (lambda r: r["events"][0], "office", "\u2063"),
        (lambda r: r["identity"], "given_name", "\u3164"),  # Hangul fillers: blank "letters"
        (lambda r: r["identity"], "family_name", "\u115f\u1160"),
        (lambda r: r["characteristics"], "neighbourhood", "\uffa0 \u3164"),
        (lambda r: r["identity"], "birth_date", 0),
        (lambda r: r["events"][0], "date", 1_700_000_000.0),
        (lambda r: r["events"][0], "date", "1704067200"),
        (lambda r: r["events"][0], "date", "17280000"),  # 200 days after 1970-01-01, in seconds
        (lambda r: r["identity"], "birth_date", "1990-01-01T00:00:00Z"),
        (lambda r: r["identity"], "birth_date", "1990-01-01 00:00"),
    ],
)
def test_invisible_names_and_dates_as_numbers_are_refused(
    make: Make, place: Callable[[Record], dict[str, Any]], field: str, value: Any
) -> None:
    """A name of zero-width characters or Hangul fillers reads as nothing, and a number (or
    digits in a string) where a date belongs would be taken as seconds since 1970, a midnight
    datetime as its day: all are refused, by field, without the value."""
    record = make(0)
    place(record)[field] = value
    error = the_one_error(record)
    assert error["loc"][-1] == field


def test_the_registers_mark_for_an_unknown_name_and_names_of_any_script_are_taken(
    make: Make,
) -> None:
    record = make(0)
    record["identity"]["family_name"] = "."  # not known to the population register
    record["identity"]["given_name"] = "Zoë-Ölçay d'Hondt 李"
    record["events"][0]["office"] = "UWV – Werkplein"
    assert RECORD_BATCH.validate_python({"subjects": [record]})


@pytest.mark.parametrize(
    ("place", "field", "name"),
    [
        (
            lambda r: r["identity"],
            "given_name",
            "\u0645\u0647\u0631\u200c\u0627\u0646\u06af\u06cc\u0632",
        ),
        (lambda r: r["identity"], "family_name", "\u0915\u094d\u200d\u0937\u093e"),
        (lambda r: r["identity"], "city", "\u0d05\u0d35\u0d28\u0d4d\u200d"),
        (lambda r: r["events"][0], "office", "\u0dc1\u0dca\u200d\u0dbb\u0dd3 Lanka desk"),
    ],
    ids=["persian-zwnj", "devanagari-zwj", "malayalam-chillu", "sinhala-zwj"],
)
def test_a_joiner_between_letters_is_kept_as_some_scripts_spell_names_with_it(
    make: Make, place: Callable[[Record], dict[str, Any]], field: str, name: str
) -> None:
    record = make(0)
    place(record)[field] = name

    [checked] = RECORD_BATCH.validate_python({"subjects": [record]})["subjects"]

    assert place(checked)[field] == name  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("place", "field", "value"),
    [
        (lambda r: r["identity"], "given_name", "Jan\x1b[31m\u202e"),
        (lambda r: r["identity"], "family_name", "\u202eJansen"),
        (lambda r: r["identity"], "family_name", "de\u00adVries"),
        (lambda r: r["identity"], "given_name", "\u200dJan"),
        (lambda r: r["identity"], "given_name", "Jan\u200c"),
        (lambda r: r["identity"], "given_name", "Jan 1\u200d2"),
        (lambda r: r["identity"], "given_name", "Jan\u200c Smit"),
        (lambda r: r["identity"], "street", "Putselaan\u20282"),
        (lambda r: r["identity"], "city", "Rotter\u200bdam"),
        (lambda r: r["characteristics"], "district", "Fei\njenoord"),
        (lambda r: r["characteristics"], "household_type", "single\x7f"),
        (lambda r: r["events"][0], "office", "Wijkteam\u2066Zuid"),
        (lambda r: r["events"][0], "source_event_id", "ev-\ufeff1"),
    ],
)
def test_control_and_format_characters_are_refused_by_field(
    make: Make, place: Callable[[Record], dict[str, Any]], field: str, value: str
) -> None:
    """ANSI escapes, bidi overrides, line breaks, soft hyphens and zero-width characters would
    change how a name reads on a screen or in an export; a joiner is kept only between letters."""
    record = make(0)
    place(record)[field] = value
    error = the_one_error(record)
    assert error["loc"][-1] == field
    assert "control or format characters" in error["msg"]


@pytest.mark.parametrize(
    ("place", "field"),
    [
        (lambda r: r["characteristics"], "district"),
        (lambda r: r["characteristics"], "neighbourhood"),
        (lambda r: r["events"][0], "office"),
    ],
)
def test_the_registers_mark_for_an_unknown_name_is_no_district_or_office(
    make: Make, place: Callable[[Record], dict[str, Any]], field: str
) -> None:
    record = make(0)
    place(record)[field] = "."
    error = the_one_error(record)
    assert error["loc"][-1] == field


def test_a_blank_optional_text_is_taken_as_not_given(make: Make) -> None:
    record = make(0)
    blanks = ("street", "postcode", "city", "phone", "email")
    for field in blanks:
        record["identity"][field] = " " if field == "street" else ""
    record["characteristics"]["household_type"] = ""

    [checked] = RECORD_BATCH.validate_python({"subjects": [record]})["subjects"]

    assert {field: checked["identity"][field] for field in blanks} == dict.fromkeys(blanks)  # type: ignore[literal-required]
    assert checked["characteristics"]["household_type"] is None


def test_a_subject_holds_at_most_1000_events(make: Make) -> None:
    record = make(0, events=MAX_SUBJECT_EVENTS)
    assert RECORD_BATCH.validate_python({"subjects": [record]})
    record = make(0, events=MAX_SUBJECT_EVENTS + 1)
    error = the_one_error(record)
    assert (error["loc"], error["type"]) == (("subjects", 0, "events"), "too_long")


def test_an_event_or_birth_date_after_today_where_the_municipality_is_is_refused(
    make: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Today is the last day a record may be dated: not tomorrow, however near."""
    today = datetime.now(UTC).date() + timedelta(days=5)  # past the check's "surely past" days
    monkeypatch.setattr(records_models, "today", lambda: today)
    record = make(0)
    record["events"][0]["date"] = today.isoformat()
    record["identity"]["birth_date"] = today.isoformat()
    assert RECORD_BATCH.validate_python({"subjects": [record]})
    for place, field in ((record["events"][0], "date"), (record["identity"], "birth_date")):
        place[field] = (today + timedelta(days=1)).isoformat()
        error = the_one_error(record)
        assert error["loc"][-1] == field
        assert "between 1900-01-01 and today" in error["msg"]
        place[field] = today.isoformat()
