"""Flagging runs and flags: tables, request bodies and public schemas.

Invariants:
- a flag names its subject by id and is shown by pseudonym only; it never holds an identity;
- an algorithm flag records the run and the exact policy version (declared version, file hash and
  evaluator version) that produced it, with the rule hits (evidence) and the sentence a
  professional reads aloud;
- an external flag (``kind="external"``) has no run; it records who pushed it, a reason code and
  an explanation. It waits until a partitioning places it in a packet (see
  ``service.packets.service.partition_run``).
"""

from __future__ import annotations

import datetime as dt
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlmodel import Field as SQLField
from sqlmodel import SQLModel

from service.clock import today
from service.records.models import EARLIEST, PLAIN_TEXT, READABLE
from service.schemas import CalendarDate, StrictModel, UtcDatetime

FlagKind = Literal["algorithm", "external"]
RUN_ID = re.compile(r"[0-9a-f]{32}")  # as a run is given it
MAX_PUSHED_FLAGS = 1000


def utcnow() -> datetime:
    return datetime.now(UTC)


class FlaggingRun(SQLModel, table=True):
    """One evaluation of the flagging policy over every subject."""

    __tablename__ = "flagging_runs"

    id: str = SQLField(primary_key=True, max_length=32)
    policy_name: str = SQLField(max_length=128)
    policy_version: str = SQLField(max_length=64)
    as_of: dt.date
    started_by: str = SQLField(max_length=128)
    evaluated: int = 0
    flagged: int = 0
    created_at: datetime = SQLField(default_factory=utcnow, sa_type=DateTime(timezone=True))
    finished_at: datetime | None = SQLField(default=None, sa_type=DateTime(timezone=True))


class ArchivedPolicy(SQLModel, table=True):
    """A flagging policy file as a run evaluated it, kept under its version from its first run
    on: what every flag of that version was decided by, whatever ``policies/`` holds today."""

    __tablename__ = "flagging_policies"

    version: str = SQLField(primary_key=True, max_length=64)
    name: str = SQLField(max_length=128)
    sha256: str = SQLField(max_length=64)  # of ``content``, hex
    content: bytes = SQLField(sa_type=LargeBinary)
    archived_at: datetime = SQLField(default_factory=utcnow, sa_type=DateTime(timezone=True))


class Flag(SQLModel, table=True):
    """Why one subject was surfaced: by a run of the policy, or pushed by a source."""

    __tablename__ = "flags"
    __table_args__ = (
        Index("ix_flags_run_id_id", "run_id", "id"),
        Index("ix_flags_subject_id", "subject_id"),
        Index("ix_flags_kind", "kind"),
        Index("ix_flags_push_id", "push_id"),
    )

    id: int | None = SQLField(default=None, primary_key=True)
    run_id: str | None = SQLField(
        default=None, sa_column=Column(String(32), ForeignKey("flagging_runs.id"), nullable=True)
    )
    subject_id: int = SQLField(sa_column=Column(Integer, ForeignKey("subjects.id"), nullable=False))
    kind: str = SQLField(max_length=16)
    policy_version: str | None = SQLField(default=None, max_length=64)
    reason_code: str | None = SQLField(default=None, max_length=64)
    pushed_by: str | None = SQLField(default=None, max_length=128)
    hits: list[dict[str, Any]] = SQLField(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )
    explanation: str = SQLField(sa_type=Text)
    created_at: datetime = SQLField(default_factory=utcnow, sa_type=DateTime(timezone=True))
    # the ``FlagPush`` a source sent it in, when it sent an Idempotency-Key
    push_id: str | None = SQLField(default=None, max_length=32)


class FlagPush(SQLModel, table=True):
    """A push of flags a source sent with an ``Idempotency-Key``: the same push sent again gets
    the flags it stored (``Flag.push_id``) instead of storing them twice."""

    __tablename__ = "flag_pushes"
    __table_args__ = (
        UniqueConstraint("pushed_by", "idempotency_key", name="uq_flag_pushes_source_key"),
    )

    id: str = SQLField(primary_key=True, max_length=32)
    pushed_by: str = SQLField(max_length=128)
    idempotency_key: str = SQLField(max_length=128)
    # keyed digest of the push (HMAC under the pseudonym key), or "erased" once a subject in it
    # was erased: same key + other flags = 409
    request_digest: str = SQLField(max_length=96)
    created_at: datetime = SQLField(default_factory=utcnow, sa_type=DateTime(timezone=True))


# -- requests ---------------------------------------------------------------------------------


def not_in_the_future(as_of: dt.date) -> dt.date:
    """A run as of a later day would count months that have not passed (its explanations would
    be untrue), so ``as_of`` is at most today where the municipality is."""
    now = today()
    if as_of > now:
        raise ValueError(f"as_of may not be after today ({now.isoformat()})")
    return as_of


class FlaggingRunCreate(StrictModel):
    as_of: Annotated[CalendarDate, AfterValidator(not_in_the_future)] | None = Field(
        default=None,
        ge=EARLIEST,
        description="evaluate as on this date, from 1900-01-01 up to today (the default); events "
        "after it are ignored",
    )


class PushedFlag(StrictModel):
    # The shape ingest hands out, and nothing else: the value is named in errors and written to
    # the access log, so a name or a BSN pasted here by mistake is refused unseen (422).
    pseudonym: str = Field(
        pattern=r"^[0-9a-f]{32}$", description="as returned by ingest (32 lowercase hex)"
    )
    reason_code: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[a-z0-9][a-z0-9_.-]*$",
        description="e.g. 'debt-signal'",
    )
    # Read aloud, shown on screens and exported: refused like ingest's text fields (line breaks,
    # escapes, direction or invisible marks; nothing readable), never echoed.
    explanation: Annotated[
        str,
        Field(
            min_length=10,
            max_length=1000,
            description="one plain-language sentence for the professional and the person "
            "concerned; no line breaks, control or format characters",
        ),
        PLAIN_TEXT,
        READABLE,
    ]


class FlagsPush(StrictModel):
    flags: list[PushedFlag] = Field(min_length=1, max_length=MAX_PUSHED_FLAGS)


# -- responses --------------------------------------------------------------------------------


class FlaggingRunPublic(BaseModel):
    id: str
    policy_name: str
    policy_version: str = Field(
        description="<declared version>+<hash of the policy file>/e<evaluator version>, "
        "e.g. 2026.2+3f9a0c1b2d4e/e8"
    )
    as_of: dt.date
    started_by: str
    evaluated: int
    flagged: int
    created_at: UtcDatetime
    finished_at: UtcDatetime | None


class FlaggingRunPagePublic(BaseModel):
    items: list[FlaggingRunPublic]
    next_after: str | None = Field(
        description="pass as after for the next page; null on the last page"
    )


class ArchivedPolicyPublic(BaseModel):
    version: str = Field(description="as the run and its flags store it")
    name: str
    sha256: str = Field(
        description="SHA-256 of the file's bytes (hex); its first 12 digits are the hash in the "
        "version"
    )
    content: str = Field(description="the policy file, exactly as the run read it (UTF-8 YAML)")
    archived_at: UtcDatetime = Field(description="when the first run of this version began")


class RuleHitPublic(BaseModel):
    rule_id: str
    rule_type: str
    evidence: dict[str, Any]
    explanation: str


class FlagPublic(BaseModel):
    id: int
    pseudonym: str
    kind: FlagKind
    run_id: str | None
    policy_version: str | None
    reason_code: str | None
    hits: list[RuleHitPublic]
    explanation: str
    created_at: UtcDatetime


class FlagPagePublic(BaseModel):
    items: list[FlagPublic]
    next_after: int | None = Field(description="pass as ?after= for the next page; null at the end")


class FlagsPushedPublic(BaseModel):
    flags: list[FlagPublic]
