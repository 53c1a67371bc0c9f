"""Record store tables and the ingest request/response schemas.

Invariants:
- nothing identifying is stored in clear: a subject row holds its pseudonym, non-identifying
  characteristics (district, neighbourhood, birth year, household type) and the identity only as
  ciphertext under the subject's own DEK, which is stored wrapped by the vault KEK;
- erasure sets ``identity_ciphertext`` and ``wrapped_dek`` to NULL; events stay, pseudonymized;
- an event is unique per (source, source event id), so re-sending it is harmless;
- request schemas reject unknown fields and any text holding a NUL, control or format character
  (save a joiner between letters), take a blank optional text as null, and allow the register's
  "." only as a person's name; their error messages never contain the value; they are TypedDicts
  (see below) so a 10,000-subject batch is validated without model objects.
"""

from __future__ import annotations

import datetime as dt
import re
import unicodedata
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

from service.auth.tokens import usable_subject
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
# The source of ``casepackets demo``'s batches: demo-seed-<seed>. ``serve`` builds demo packets,
# and prints a curl line that re-identifies their clients, only while every batch stored has
# such a source: no other source may take a name that begins so.
DEMO_SOURCE_PREFIX = "demo-seed-"
DEMO_SOURCE_REFUSAL = f"names beginning with {DEMO_SOURCE_PREFIX!r} are `casepackets demo`'s"

# The most subjects a batch may hold whatever CASEPACKETS_MAX_BATCH_ROWS says (it may not be set
# higher): a longer list is refused before any row of it is checked.
MAX_BATCH_ROWS = 100_000
# The most events one subject of a batch may hold.
MAX_SUBJECT_EVENTS = 1000


def usable_source(name: str) -> bool:
    """A name a token subject could carry (``usable_subject``: printable UTF-8 without spaces
    around it), of at most ``SOURCE_MAX`` characters: through the API a source is its token's
    subject, and ``" welfare"`` would be another source than ``welfare``, whose event ids it
    would repeat unnoticed. (A command-line argument with bytes that are not UTF-8 arrives
    holding lone surrogates, which that rule refuses.)"""
    return usable_subject(name) and len(name) <= SOURCE_MAX


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
# stripped; every text field carries ``NO_NUL`` and ``PLAIN_TEXT``): the same checks, messages,
# error locations and OpenAPI schema as ``StrictModel`` classes, without building five model
# objects per subject (10,000 subjects per batch). Optional fields get their default, so a
# validated value always carries every key.

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


def postcode_as_stored(value: str) -> str:
    """A postcode as it is stored: its letters in capitals."""
    # Only ASCII is upper-cased: str.upper makes Latin capitals of other letters (a sharp s is
    # "SS", a dotless i is "I"), a postcode nobody sent.
    return value.upper() if value.isascii() else value


def _postcode(value: str | None) -> str | None:
    if value is not None:
        value = postcode_as_stored(value)
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


# The population register's mark for a name that is not known: in a given or family name only.
UNKNOWN_NAME = "."


# The Hangul fillers are letters (Lo) to ``str.isalnum`` but default-ignorable code points, drawn
# as blank space: a name of them alone reads as nothing, as one of zero-width spaces does.
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0")


def _readable(value: str) -> str:
    if not any(character.isalnum() and character not in _BLANK_LETTERS for character in value):
        raise ValueError(
            "must hold a letter or digit, not only spaces, marks or invisible characters"
        )
    return value


def _readable_name(value: str) -> str:
    return value if value == UNKNOWN_NAME else _readable(value)


# A district, an office or a team someone can read: "\u200b" is none, nor is ".".
READABLE = AfterValidator(_readable)
# A person's given or family name: readable, or the register's mark for an unknown one.
PERSON_NAME = AfterValidator(_readable_name)

# Control characters (line breaks, ANSI escapes), format characters (bidi overrides, zero-width
# spaces, soft hyphens), line and paragraph separators and lone surrogates: invisible or
# rearranging on a screen or in a CSV export, never part of a name or an address.
REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
# Except the zero-width (non-)joiner where a script needs one to choose a letter's form, as
# IDNA's CONTEXTJ rules have it (RFC 5892, appendix A.1-A.2): after a virama (Devanagari,
# Malayalam, Sinhala), or between two letters or marks (Persian, Arabic, Kurdish names).
_JOINERS = frozenset("\u200c\u200d")
_VIRAMA = 9  # the canonical combining class of a virama


def _joins_letters(value: str, position: int) -> bool:
    if position == 0:
        return False
    before = value[position - 1]
    if unicodedata.combining(before) == _VIRAMA:
        return True
    return (
        position < len(value) - 1
        and unicodedata.category(before)[0] in "LM"
        and unicodedata.category(value[position + 1])[0] in "LM"
    )


def _plain_text(value: str | None) -> str | None:
    if value is None or value.isprintable():  # the common case: nothing to look at
        return value
    for position, character in enumerate(value):
        if unicodedata.category(character) in REFUSED_CATEGORIES and not (
            character in _JOINERS and _joins_letters(value, position)
        ):
            raise ValueError(
                "must not contain control or format characters (line breaks, escapes, "
                "direction or invisible marks)"
            )
    return value


# Every text field of a subject and its events carries it, after ``NO_NUL``.
PLAIN_TEXT = AfterValidator(_plain_text)


def _none_if_blank(value: str | None) -> str | None:
    return value or None


# An optional text left blank (after stripping) is not given: null, as the CSV import reads an
# empty value, so the same person sent either way stores the same identity.
BLANK_IS_NONE = AfterValidator(_none_if_blank)


@with_config(_STRICT)
class IdentityIn(TypedDict):
    """Who the subject is. Encrypted before it reaches the database; never echoed in errors."""

    bsn: Annotated[
        str,
        Field(min_length=8, max_length=11, description="BSN, 9 digits passing the 11-check"),
        NO_NUL,
        PLAIN_TEXT,
        AfterValidator(_valid_bsn),
    ]
    given_name: Annotated[str, Field(min_length=1, max_length=100), NO_NUL, PLAIN_TEXT, PERSON_NAME]
    family_name: Annotated[
        str, Field(min_length=1, max_length=100), NO_NUL, PLAIN_TEXT, PERSON_NAME
    ]
    birth_date: Annotated[CalendarDate, AfterValidator(_plausible_birth_date)]
    street: NotRequired[
        Annotated[
            str | None,
            Field(default=None, max_length=150, description="street and number"),
            NO_NUL,
            PLAIN_TEXT,
            BLANK_IS_NONE,
        ]
    ]
    postcode: NotRequired[
        Annotated[
            str | None,
            Field(default=None, max_length=7),
            NO_NUL,
            PLAIN_TEXT,
            BLANK_IS_NONE,
            AfterValidator(_postcode),
        ]
    ]
    city: NotRequired[
        Annotated[str | None, Field(default=None, max_length=80), NO_NUL, PLAIN_TEXT, BLANK_IS_NONE]
    ]
    phone: NotRequired[
        Annotated[
            str | None,
            Field(default=None, max_length=20),
            NO_NUL,
            PLAIN_TEXT,
            BLANK_IS_NONE,
            AfterValidator(_phone),
        ]
    ]
    email: NotRequired[
        Annotated[
            str | None,
            Field(default=None, max_length=254),
            NO_NUL,
            PLAIN_TEXT,
            BLANK_IS_NONE,
            AfterValidator(_email),
        ]
    ]


@with_config(_STRICT)
class CharacteristicsIn(TypedDict):
    """Not identifying on their own; stored in clear beside the pseudonym for analysis."""

    district: Annotated[str, Field(min_length=1, max_length=64), NO_NUL, PLAIN_TEXT, READABLE]
    neighbourhood: Annotated[str, Field(min_length=1, max_length=64), NO_NUL, PLAIN_TEXT, READABLE]
    birth_year: NotRequired[
        Annotated[
            int | None,
            Field(default=None, ge=1900, le=2100, description="default: from birth date"),
        ]
    ]
    household_type: NotRequired[
        Annotated[str | None, Field(default=None, max_length=32), NO_NUL, PLAIN_TEXT, BLANK_IS_NONE]
    ]


@with_config(_STRICT)
class EventIn(TypedDict):
    type: Annotated[
        str,
        Field(min_length=1, max_length=64, description="from policies/events.yaml"),
        NO_NUL,
        PLAIN_TEXT,
    ]
    date: Annotated[CalendarDate, AfterValidator(_event_date)]
    office: Annotated[
        str,
        Field(min_length=1, max_length=128, description="helpdesk or office"),
        NO_NUL,
        PLAIN_TEXT,
        READABLE,
    ]
    source_event_id: Annotated[
        str,
        Field(
            min_length=1, max_length=128, description="unique per source; re-sending is harmless"
        ),
        NO_NUL,
        PLAIN_TEXT,
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
