"""Base classes for request and response schemas."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Annotated, Any, TypeVar

from fastapi import Header, Path
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    StringConstraints,
    field_validator,
)


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; every time this service stores is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]

_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _date_as_text(value: object) -> object:
    # Pydantic would also read a number, or digits in a string, as seconds since 1970
    # ("1704067200" is 2024-01-01), and a midnight datetime ("2024-01-01T00:00:00Z") as its day:
    # a source sending either has another field in mind, and is told so.
    if type(value) is date:  # from Python (commands, the demo), never from a JSON body
        return value
    if not isinstance(value, str) or _ISO_DATE.fullmatch(value) is None:
        raise ValueError("a date is written as text, YYYY-MM-DD")
    return value


# Every date a caller sends: the text YYYY-MM-DD, and nothing else.
CalendarDate = Annotated[date, BeforeValidator(_date_as_text)]


def parse_calendar_date(text: str) -> date:
    """``text`` read as a ``CalendarDate`` is (a command-line option); ValueError if it is not."""
    return date.fromisoformat(str(_date_as_text(text)))


_DIGITS = re.compile(r"[0-9]+")


def _written_in_digits(value: object) -> object:
    # Pydantic would also read Python's own spellings of a number in a query ("+5", " 5", "5.0",
    # "1_000"): a proxy, a log or a person reading the URL would see another number, or none,
    # than the one answered (and, for an audit read, logged).
    if isinstance(value, str) and _DIGITS.fullmatch(value) is None:
        raise ValueError("a whole number is written in the digits 0-9 alone")
    return value


# Every integer a query takes: the digits 0-9, and nothing else. Put after the ``Query(...)``:
# constraints after a validator would leave the OpenAPI document as unknown keywords.
DIGITS_ONLY = BeforeValidator(_written_in_digits)

# Largest integer both SQLite and PostgreSQL store (64-bit signed). Query parameters that reach
# SQL (offsets, indexes, cursors) are bounded by it: an oversized number is a 422, not a 500.
MAX_INT64 = 2**63 - 1

# Path parameters that can reach the access log as object ids. Anything but the shape the service
# itself hands out is refused (422) before a route runs: the log can never be erased, so no caller
# may write free text (a name, a BSN pasted by mistake, kilobytes of junk) into it.
PACKET_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
PacketIdPath = Annotated[
    str,
    Path(
        pattern=f"^{PACKET_ID.pattern}$",
        description="the packet's id, a lowercase UUID as returned by partitioning",
    ),
]
PseudonymPath = Annotated[
    str,
    Path(pattern=r"^[0-9a-f]{32}$", description="a pseudonym (32 lowercase hex characters)"),
]

# A caller's Idempotency-Key: printable ASCII (an HTTP header arrives as Latin-1, so anything
# else would be stored garbled and counted in bytes), 1 to 128 characters, never echoed.
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=128,
        pattern=r"^[\x20-\x7e]+$",
        description="send a request again with the same key to get its first answer instead "
        "of a second effect (per caller; 1 to 128 printable ASCII characters)",
    ),
]


T = TypeVar("T")


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list | tuple | set | frozenset):
        return any(_holds_nul(item) for item in value)
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    return False


def refuse_nul(value: T) -> T:
    """``value`` itself, unless it (or any text inside it) holds a NUL character: PostgreSQL
    cannot store one and SQLite would, so both refuse it. The message never quotes the value."""
    if _holds_nul(value):
        raise ValueError("must not contain NUL characters")
    return value


# The same refusal for request schemas that are not ``StrictModel`` classes (the ingest
# TypedDicts): every text field carries it, before any check of its own; and for text query and
# path parameters that reach SQL (a 422 naming the parameter, not the database's refusal).
NO_NUL = AfterValidator(refuse_nul)


# A query or path text that names what a ``StrictModel`` stored (a professional's id, a team):
# read as that model reads it, without the spaces around it ("Zuid-2 " was registered as
# "Zuid-2", and a filter typed the same way must find it).
AS_STORED = StringConstraints(strip_whitespace=True)


class StrictModel(BaseModel):
    """Request bodies: unknown fields are rejected (a typo must not be silently ignored), and no
    text may hold a NUL character (``refuse_nul``)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    @field_validator("*", mode="after")
    @classmethod
    def _refuse_nul(cls, value: Any) -> Any:
        return refuse_nul(value)
