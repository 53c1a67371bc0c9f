"""Record store tables and the ingest request/response schemas.

Invariants:
- nothing identifying is stored in clear: a subject row holds its pseudonym, non-identifying
  characteristics (district, neighbourhood, birth year, household type) and the identity only as
  ciphertext under the subject's own DEK, which is stored wrapped by the vault KEK;
- erasure sets ``identity_ciphertext`` and ``wrapped_dek`` to NULL; events stay, pseudonymized;
- an event is unique per (source, source event id), so re-sending it is harmless;
- request schemas reject unknown fields and any text holding a NUL character, and their error
  messages never contain the value; they are TypedDicts (see below) so a 10,000-subject batch is
  validated without model objects.
"""

from __future__ import annotations

import datetime as dt
import re
from datetime import UTC, datetime
from typing import Annotated, Literal, NotRequired

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    with_config,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from sqlalchemy import Column, DateTime, ForeignKey, Index, Integer, Text, UniqueConstraint
from sqlmodel import Field as SQLField
from sqlmodel import SQLModel
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from service.clock import today
from service.crypto.pseudonym import InvalidBsn, normalize_bsn
from service.errors import LISTED_ERRORS
from service.schemas import NO_NUL, CalendarDate, UtcDatetime

POSTCODE = re.compile(r"^[1-9][0-9]{3} ?[A-Z]{2}$")
PHONE = re.compile(r"^\+?[0-9][0-9 ()-]{5,19}$")
EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}\.[A-Za-z]{2,}$")
EARLIEST = dt.date(1900, 1, 1)


def utcnow() -> datetime:
    return datetime.now(UTC)


# Two days before today in UTC is before today in every time zone.
_SURELY_PAST = datetime.now(UTC).date() - dt.timedelta(days=2)


def not_after_today(value: dt.date) -> bool:
    """``value <= today`` where the municipality is (``service.clock``), asking the clock only
    for recent dates: it is slow per call."""
    return value <= _SURELY_PAST or value <= today()


# -- tables -----------------------------------------------------------------------------------


class SubjectBase(SQLModel):
    district: str = SQLField(max_length=64)
    neighbourhood: str = SQLField(max_length=64)
    birth_year: int | None = None
    household_type: str | None = SQLField(default=None, max_length=32)


class Subject(SubjectBase, table=True):
    """One person in the identity vault, known by pseudonym."""

    __tablename__ = "subjects"

    id: int | None = SQLField(default=None, primary_key=True)
    pseudonym: str = SQLField(max_length=64, unique=True, index=True)
    pseudonym_key_version: int
    identity_ciphertext: str | None = SQLField(default=None, sa_type=Text)
    wrapped_dek: str | None = SQLField(default=None, max_length=255)
    erased_at: datetime | None = SQLField(default=None, sa_type=DateTime(timezone=True))
    created_at: datetime = SQLField(default_factory=utcnow, sa_type=DateTime(timezone=True))
    updated_at: datetime = SQLField(default_factory=utcnow, sa_type=DateTime(timezone=True))


# A source's name: the events' and ingest batches' ``source`` column. Through the API it is the
# caller's token subject, which the token check already holds to printable UTF-8 text.
SOURCE_MAX = 64

# The most subjects a batch may hold whatever CASEPACKETS_MAX_BATCH_ROWS says (it may not be set
# higher): a longer list is refused before any row of it is checked.
MAX_BATCH_ROWS = 100_000
# The most events one subject of a batch may hold.
MAX_SUBJECT_EVENTS = 1000


def usable_source(name: str) -> bool:
    """Printable text of 1 to ``SOURCE_MAX`` characters that encodes as UTF-8 (a command-line
    argument with bytes that are not UTF-8 arrives holding lone surrogates)."""
    if not 0 < len(name) <= SOURCE_MAX or not name.isprintable():
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Event(SQLModel, table=True):
    """Something that happened to a subject, as one source reported it."""

    __tablename__ = "events"
    __table_args__ = (
        UniqueConstraint("source", "source_event_id", name="uq_events_source_event"),
        Index("ix_events_subject_date", "subject_id", "date"),
    )

    id: int | None = SQLField(default=None, primary_key=True)
    subject_id: int = SQLField(sa_column=Column(Integer, ForeignKey("subjects.id"), nullable=False))
    source: str = SQLField(max_length=SOURCE_MAX)
    source_event_id: str = SQLField(max_length=128)
    type: str = SQLField(max_length=64)
    date: dt.date
    office: str = SQLField(max_length=128)


class IngestBatch(SQLModel, table=True):
    """One accepted batch and the response it got, so an ``Idempotency-Key`` replays it."""

    __tablename__ = "ingest_batches"
    __table_args__ = (
        UniqueConstraint("source", "idempotency_key", name="uq_ingest_batches_source_key"),
    )

    id: str = SQLField(primary_key=True, max_length=32)
    source: str = SQLField(max_length=SOURCE_MAX)
    idempotency_key: str | None = SQLField(default=None, max_length=128)
    # keyed digest of the batch (HMAC under the pseudonym key): same key + other body = 409
    request_digest: str = SQLField(max_length=96)
    subject_count: int
    response: str = SQLField(sa_type=Text)
    created_at: datetime = SQLField(default_factory=utcnow, sa_type=DateTime(timezone=True))


# -- ingest request ---------------------------------------------------------------------------
#
# TypedDicts validated by pydantic (``__pydantic_config__``: strict about unknown fields, strings
# stripped; every text field carries ``NO_NUL``): the same checks, messages, error locations and
# OpenAPI schema as ``StrictModel`` classes, without building five model objects per subject
# (10,000 subjects per batch). Optional fields get their default, so a validated value always
# carries every key.

_STRICT = ConfigDict(extra="forbid", str_strip_whitespace=True)


_BSN_DIGITS_OFFSET = ord("0") * (9 + 8 + 7 + 6 + 5 + 4 + 3 + 2 - 1)


def _valid_bsn(value: str) -> str:
    """``normalize_bsn``, with a fast path for the common case: nine digits passing the 11-check
    are already normalized (anything else takes ``normalize_bsn`` and its messages)."""
    if len(value) == 9 and value.isascii() and value.isdigit() and value != "000000000":
        d = value.encode("ascii")
        total = 9 * d[0] + 8 * d[1] + 7 * d[2] + 6 * d[3] + 5 * d[4] + 4 * d[5] + 3 * d[6]
        if (total + 2 * d[7] - d[8] - _BSN_DIGITS_OFFSET) % 11 == 0:
            return value
    try:
        return normalize_bsn(value)
    except InvalidBsn as exc:
        raise ValueError(str(exc)) from None


def _plausible_birth_date(value: dt.date) -> dt.date:
    if value < EARLIEST or not not_after_today(value):
        raise ValueError("birth date must lie between 1900-01-01 and today")
    return value


def _postcode(value: str | None) -> str | None:
    if value is not None:
        value = value.upper()
        if not POSTCODE.match(value):
            raise ValueError("a Dutch postcode looks like 1234 AB")
    return value


def _phone(value: str | None) -> str | None:
    if value is not None and not PHONE.match(value):
        raise ValueError("a phone number has 6 to 20 digits, spaces, dashes or brackets")
    return value


def _email(value: str | None) -> str | None:
    if value is not None and not EMAIL.match(value):
        raise ValueError("not an e-mail address")
    return value


def _event_date(value: dt.date) -> dt.date:
    if value < EARLIEST or not not_after_today(value):
        raise ValueError("event date must lie between 1900-01-01 and today")
    return value


# The population register's mark for a name that is not known.
UNKNOWN_NAME = "."


def _readable(value: str) -> str:
    if value != UNKNOWN_NAME and not any(character.isalnum() for character in value):
        raise ValueError(
            "must hold a letter or digit, not only spaces, marks or invisible characters"
        )
    return value


# A name, a district or an office someone can read: "\u200b" is no name.
READABLE = AfterValidator(_readable)


@with_config(_STRICT)
class IdentityIn(TypedDict):
    """Who the subject is. Encrypted before it reaches the database; never echoed in errors."""

    bsn: Annotated[
        str,
        Field(min_length=8, max_length=11, description="BSN, 9 digits passing the 11-check"),
        NO_NUL,
        AfterValidator(_valid_bsn),
    ]
    given_name: Annotated[str, Field(min_length=1, max_length=100), NO_NUL, READABLE]
    family_name: Annotated[str, Field(min_length=1, max_length=100), NO_NUL, READABLE]
    birth_date: Annotated[CalendarDate, AfterValidator(_plausible_birth_date)]
    street: NotRequired[
        Annotated[
            str | None,
            Field(default=None, max_length=150, description="street and number"),
            NO_NUL,
        ]
    ]
    postcode: NotRequired[
        Annotated[str | None, Field(default=None, max_length=7), NO_NUL, AfterValidator(_postcode)]
    ]
    city: NotRequired[Annotated[str | None, Field(default=None, max_length=80), NO_NUL]]
    phone: NotRequired[
        Annotated[str | None, Field(default=None, max_length=20), NO_NUL, AfterValidator(_phone)]
    ]
    email: NotRequired[
        Annotated[str | None, Field(default=None, max_length=254), NO_NUL, AfterValidator(_email)]
    ]


@with_config(_STRICT)
class CharacteristicsIn(TypedDict):
    """Not identifying on their own; stored in clear beside the pseudonym for analysis."""

    district: Annotated[str, Field(min_length=1, max_length=64), NO_NUL, READABLE]
    neighbourhood: Annotated[str, Field(min_length=1, max_length=64), NO_NUL, READABLE]
    birth_year: NotRequired[
        Annotated[
            int | None,
            Field(default=None, ge=1900, le=2100, description="default: from birth date"),
        ]
    ]
    household_type: NotRequired[Annotated[str | None, Field(default=None, max_length=32), NO_NUL]]


@with_config(_STRICT)
class EventIn(TypedDict):
    type: Annotated[
        str, Field(min_length=1, max_length=64, description="from policies/events.yaml"), NO_NUL
    ]
    date: Annotated[CalendarDate, AfterValidator(_event_date)]
    office: Annotated[
        str,
        Field(min_length=1, max_length=128, description="helpdesk or office"),
        NO_NUL,
        READABLE,
    ]
    source_event_id: Annotated[
        str,
        Field(
            min_length=1, max_length=128, description="unique per source; re-sending is harmless"
        ),
        NO_NUL,
    ]


@with_config(_STRICT)
class SubjectRecordIn(TypedDict):
    identity: IdentityIn
    characteristics: CharacteristicsIn
    events: NotRequired[
        Annotated[list[EventIn], Field(default_factory=list, max_length=MAX_SUBJECT_EVENTS)]
    ]


def _birth_year_matches(record: SubjectRecordIn) -> SubjectRecordIn:
    given = record["characteristics"].get("birth_year")
    if given is not None and given != record["identity"]["birth_date"].year:
        raise ValueError("characteristics.birth_year differs from identity.birth_date")
    return record


CheckedSubjectRecordIn = Annotated[SubjectRecordIn, AfterValidator(_birth_year_matches)]


def _rows_until_enough_errors(rows: object, validate: ValidatorFunctionWrapHandler) -> object:
    """The rows, checked one at a time until ``LISTED_ERRORS`` errors are found (as many as a 422
    lists). Then the first of them are kept, after one that says how many were found and which
    rows were not checked.

    Checking all rows at once would collect every error before any could be dropped: a megabyte
    of empty rows or events holds over a million errors, which take seconds and a gigabyte.
    """
    if not isinstance(rows, list) or not 0 < len(rows) <= MAX_BATCH_ROWS:
        return validate(rows)  # one error, about the list itself
    checked: list[object] = []
    listed: list[InitErrorDetails] = []
    found = 0
    for row, record in enumerate(rows):
        try:
            checked.extend(validate([record]))
        except ValidationError as exc:
            found += exc.error_count()
            room = LISTED_ERRORS - 1 - len(listed)  # and one for the count
            listed.extend(
                InitErrorDetails(
                    type=PydanticCustomError(error["type"], error["msg"]),
                    loc=(row, *error["loc"][1:]),  # past the index in the one-row list
                    input=error["input"],
                )
                for error in exc.errors(include_url=False)[:room]
            )
            if found >= LISTED_ERRORS:
                unchecked = (
                    f"; rows {row + 1} to {len(rows) - 1} were not checked"
                    if row + 1 < len(rows)
                    else ""
                )
                count = PydanticCustomError(
                    "too_many_errors",
                    f"{found} errors found, the first {len(listed)} are listed{unchecked}",
                )
                listed.insert(0, InitErrorDetails(type=count, loc=(), input=len(rows)))
                break
    if listed:
        raise ValidationError.from_exception_data("RecordBatchCreate", listed)
    return checked


@with_config(_STRICT)
class RecordBatchCreate(TypedDict):
    """A batch of subjects; all-or-nothing."""

    subjects: Annotated[
        list[CheckedSubjectRecordIn],
        Field(min_length=1, max_length=MAX_BATCH_ROWS),
        WrapValidator(_rows_until_enough_errors),
    ]


SUBJECT_RECORD = TypeAdapter(CheckedSubjectRecordIn)
RECORD_BATCH = TypeAdapter(RecordBatchCreate)
IDENTITY = TypeAdapter(IdentityIn)


# -- ingest response --------------------------------------------------------------------------

RowStatus = Literal["created", "updated", "unchanged", "erased"]


class RowResultPublic(BaseModel):
    row: int
    pseudonym: str
    status: RowStatus = Field(
        description="created: new subject; updated: identity or characteristics changed; "
        "unchanged; erased: the subject was erased and its identity is not stored again"
    )


class RecordBatchPublic(BaseModel):
    batch_id: str
    source: str
    subjects: int
    events_stored: int
    events_already_known: int
    replayed: bool = Field(description="true when this is the stored answer to an earlier request")
    rows: list[RowResultPublic]


class SubjectErasurePublic(BaseModel):
    pseudonym: str
    erased_at: UtcDatetime
    already_erased: bool
    events_kept: int
