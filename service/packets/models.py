"""Professionals, packets and packet members: tables, request bodies and public schemas.

Invariants:
- a packet row holds metadata and its packet key wrapped by the packet KEK (``wrapped_key``); a
  member row holds the member's DEK wrapped under that packet key (``wrapped_dek``). Setting
  ``wrapped_key`` to NULL crypto-shreds every re-identification path through the packet;
- no table here holds an identity in clear, and no public schema carries a key, a wrap or an
  identity: metadata and pseudonyms only;
- packet ids are random UUIDs, so an id reveals neither order nor count;
- a follow-up's kind, date and outcome code are metadata (case-management systems read them);
  its free-text note may hold personal data and is stored only sealed under the packet key,
  bound to (follow-up id, packet id), so crypto-shredding the packet destroys it too.
"""

from __future__ import annotations

import datetime as dt
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints, field_validator
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
)
from sqlmodel import Field as SQLField
from sqlmodel import SQLModel

from service.auth.tokens import SUBJECT_REASON, usable_subject
from service.flagging.models import RUN_ID, FlagKind, RuleHitPublic
from service.records.models import PLAIN_TEXT, READABLE
from service.schemas import CalendarDate, StrictModel, UtcDatetime

PacketStatus = Literal["assigned", "opened", "closed", "expired", "shredded"]
FollowupKind = Literal["appointment", "contact", "intervention", "outcome"]
MAX_NOTE_CHARS = 4000
# Statuses in which a packet's members count against their professional's capacity.
OPEN_STATUSES: tuple[str, ...] = ("assigned", "opened")
MAX_DISTRICTS = 50


def utcnow() -> datetime:
    return datetime.now(UTC)


# -- tables -----------------------------------------------------------------------------------


class ProfessionalBase(SQLModel):
    display_name: str = SQLField(max_length=128)
    team: str = SQLField(max_length=64)
    capacity: int


class Professional(ProfessionalBase, table=True):
    """A caseworker; ``id`` is the ``sub`` their tokens carry."""

    __tablename__ = "professionals"

    id: str = SQLField(primary_key=True, max_length=128)
    districts: list[str] = SQLField(default_factory=list, sa_column=Column(JSON, nullable=False))
    active: bool = True
    created_at: datetime = SQLField(default_factory=utcnow, sa_type=DateTime(timezone=True))
    updated_at: datetime = SQLField(default_factory=utcnow, sa_type=DateTime(timezone=True))


class Packet(SQLModel, table=True):
    """At most ``packet_size`` flagged clients of one district, for one professional."""

    __tablename__ = "packets"
    __table_args__ = (
        Index("ix_packets_professional_status", "professional_id", "status"),
        Index("ix_packets_run_id", "run_id"),
        Index("ix_packets_status_expires_at", "status", "expires_at"),
    )

    id: str = SQLField(primary_key=True, max_length=36)
    run_id: str | None = SQLField(
        default=None, sa_column=Column(String(32), ForeignKey("flagging_runs.id"), nullable=True)
    )
    professional_id: str = SQLField(
        sa_column=Column(String(128), ForeignKey("professionals.id"), nullable=False)
    )
    district: str = SQLField(max_length=64)
    status: str = SQLField(max_length=16)
    created_at: datetime = SQLField(default_factory=utcnow, sa_type=DateTime(timezone=True))
    expires_at: datetime = SQLField(sa_type=DateTime(timezone=True))
    closed_at: datetime | None = SQLField(default=None, sa_type=DateTime(timezone=True))
    shredded_at: datetime | None = SQLField(default=None, sa_type=DateTime(timezone=True))
    opened_at: datetime | None = SQLField(default=None, sa_type=DateTime(timezone=True))
    # packet key under the packet KEK; NULL once crypto-shredded
    wrapped_key: str | None = SQLField(default=None, sa_type=Text)


class PacketMember(SQLModel, table=True):
    """One client in one packet, known by pseudonym, with their DEK under the packet key."""

    __tablename__ = "packet_members"
    __table_args__ = (Index("ix_packet_members_subject_id", "subject_id"),)

    packet_id: str = SQLField(
        sa_column=Column(String(36), ForeignKey("packets.id"), primary_key=True)
    )
    subject_id: int = SQLField(
        sa_column=Column(Integer, ForeignKey("subjects.id"), primary_key=True)
    )
    pseudonym: str = SQLField(max_length=64)
    flag_id: int = SQLField(sa_column=Column(Integer, ForeignKey("flags.id"), nullable=False))
    # member DEK under the packet key; NULL once the subject is erased
    wrapped_dek: str | None = SQLField(default=None, sa_type=Text)


class PacketMemberFlag(SQLModel, table=True):
    """A further flag placed with a packet member, beside the member's own ``flag_id``: say a
    source's pushed concern about a client the run flagged too. A flag is placed once, as a
    member's own flag or here (unique ``flag_id``), and the professional sees every reason."""

    __tablename__ = "packet_member_flags"
    __table_args__ = (Index("ix_packet_member_flags_flag_id", "flag_id", unique=True),)

    packet_id: str = SQLField(
        sa_column=Column(String(36), ForeignKey("packets.id"), primary_key=True)
    )
    subject_id: int = SQLField(
        sa_column=Column(Integer, ForeignKey("subjects.id"), primary_key=True)
    )
    flag_id: int = SQLField(sa_column=Column(Integer, ForeignKey("flags.id"), primary_key=True))


class Followup(SQLModel, table=True):
    """An appointment, contact, intervention or outcome the owner recorded for one client."""

    __tablename__ = "packet_followups"
    __table_args__ = (
        Index("ix_packet_followups_packet_subject", "packet_id", "subject_id"),
        Index("ux_packet_followups_idempotency", "created_by", "idempotency_key", unique=True),
    )

    id: str = SQLField(primary_key=True, max_length=32)
    packet_id: str = SQLField(
        sa_column=Column(String(36), ForeignKey("packets.id"), nullable=False)
    )
    subject_id: int = SQLField(sa_column=Column(Integer, ForeignKey("subjects.id"), nullable=False))
    pseudonym: str = SQLField(max_length=64)
    kind: str = SQLField(max_length=16)
    date: dt.date
    outcome_code: str | None = SQLField(default=None, max_length=64)
    # the note sealed under the packet key; NULL when none was given or once shredded/erased
    note_ciphertext: str | None = SQLField(default=None, sa_type=Text)
    # what the note's associated data names (``service.packets.service.note_aad``): NULL for a
    # note written before notes were bound to their client, NOTE_BOUND_TO_CLIENT since
    note_binding: int | None = SQLField(default=None, sa_type=SmallInteger)
    # The caller's Idempotency-Key, if sent, and the HMAC under the packet key of what was
    # asked with it: the same request sent again gets this follow-up back, not a second one.
    idempotency_key: str | None = SQLField(default=None, max_length=128)
    request_digest: str | None = SQLField(default=None, max_length=64)
    created_by: str = SQLField(max_length=128)
    created_at: datetime = SQLField(default_factory=utcnow, sa_type=DateTime(timezone=True))


# -- requests ---------------------------------------------------------------------------------


def _clean_districts(value: list[str]) -> list[str]:
    cleaned = sorted({district.strip() for district in value})
    if any(not district or len(district) > 64 for district in cleaned):
        raise ValueError("a district is 1 to 64 characters")
    return cleaned


class ProfessionalCreate(StrictModel):
    id: str = Field(
        min_length=1, max_length=128, description="the `sub` claim of the professional's tokens"
    )
    display_name: Annotated[str, READABLE, PLAIN_TEXT] = Field(min_length=1, max_length=128)
    team: Annotated[str, READABLE, PLAIN_TEXT] = Field(min_length=1, max_length=64)
    districts: list[Annotated[str, READABLE, PLAIN_TEXT]] = Field(
        min_length=1, max_length=MAX_DISTRICTS
    )
    capacity: int = Field(ge=0, le=10_000, description="most clients open at once")

    _districts = field_validator("districts")(_clean_districts)

    @field_validator("id")
    @classmethod
    def _nameable_in_a_path(cls, value: str) -> str:
        # /v1/professionals/{id}: a '/' (even sent as %2F) would split the path, and such a
        # professional could never be updated or deactivated.
        if "/" in value:
            raise ValueError("must not contain '/' (it could not be named in a URL path)")
        # A token whose sub is not usable is refused at sign-in: a professional registered with
        # a no-break or zero-width space copied along would be given packets nobody can open.
        if not usable_subject(value):
            raise ValueError(f"is the sub of their tokens, and {SUBJECT_REASON}")
        return value


class ProfessionalUpdate(StrictModel):
    display_name: Annotated[str, READABLE, PLAIN_TEXT] | None = Field(
        default=None, min_length=1, max_length=128
    )
    team: Annotated[str, READABLE, PLAIN_TEXT] | None = Field(
        default=None, min_length=1, max_length=64
    )
    districts: list[Annotated[str, READABLE, PLAIN_TEXT]] | None = Field(
        default=None, min_length=1, max_length=MAX_DISTRICTS
    )
    capacity: int | None = Field(default=None, ge=0, le=10_000)
    active: bool | None = None

    @field_validator("districts")
    @classmethod
    def _districts(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _clean_districts(value)


class PartitionCreate(StrictModel):
    # Only the shape a run is given: anything else names no run, and a BSN or a name pasted
    # here is refused (422, naming the field) rather than quoted back in a 404.
    run_id: str = Field(
        pattern=f"^{RUN_ID.pattern}$", description="as a run was given it (32 lowercase hex)"
    )


class PacketReassign(StrictModel):
    professional_id: str = Field(min_length=1, max_length=128)


class FollowupCreate(StrictModel):
    kind: FollowupKind
    date: CalendarDate = Field(description="when it happened or is planned (YYYY-MM-DD)")
    outcome_code: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="from policies/followups.yaml; required for kind 'outcome'",
    )
    # Kept as written (no trimming: indentation and line breaks are the writer's); a note of
    # only white space is no note.
    note: Annotated[str | None, StringConstraints(strip_whitespace=False)] = Field(
        default=None,
        max_length=MAX_NOTE_CHARS,
        description="free text, kept as written; may hold personal data, so it is encrypted "
        "under the packet key and shown only to the packet's owner",
    )

    @field_validator("note", mode="after")
    @classmethod
    def _blank_is_none(cls, note: str | None) -> str | None:
        return note if note is not None and note.strip() else None


# -- responses --------------------------------------------------------------------------------


class ProfessionalPublic(BaseModel):
    id: str
    display_name: str
    team: str
    districts: list[str]
    capacity: int
    open_load: int = Field(description="clients in this professional's open packets")
    active: bool
    created_at: UtcDatetime
    updated_at: UtcDatetime


class ProfessionalPagePublic(BaseModel):
    items: list[ProfessionalPublic]
    next_after: str | None = Field(
        description="pass as after for the next page; null on the last page"
    )


class PacketPublic(BaseModel):
    id: str
    run_id: str | None
    professional_id: str
    district: str
    status: PacketStatus
    member_count: int
    created_at: UtcDatetime
    expires_at: UtcDatetime
    closed_at: UtcDatetime | None
    opened_at: UtcDatetime | None = None
    shredded_at: UtcDatetime | None = None


class FollowupSummaryPublic(BaseModel):
    """What case-management systems may read: never the note."""

    id: str
    kind: FollowupKind
    date: dt.date
    outcome_code: str | None
    created_at: UtcDatetime


class FollowupPublic(FollowupSummaryPublic):
    """The owner's view, with the decrypted note (null when none, or shredded with the packet)."""

    note: str | None
    note_unreadable: bool = Field(
        default=False,
        description="true when a stored note failed its integrity check and is withheld "
        "(note is then null); the service logs the follow-up's id",
    )
    created_by: str


class PacketMemberPublic(BaseModel):
    pseudonym: str
    flag_kind: str = Field(description="'algorithm' or 'external'")
    followups: list[FollowupSummaryPublic] = Field(default_factory=list)


class PacketDetailPublic(PacketPublic):
    members: list[PacketMemberPublic]


class IdentityPublic(BaseModel):
    bsn: str
    given_name: str
    family_name: str
    birth_date: dt.date
    street: str | None
    postcode: str | None
    city: str | None
    phone: str | None
    email: str | None


class CharacteristicsPublic(BaseModel):
    district: str
    neighbourhood: str
    birth_year: int | None
    household_type: str | None


class FlagReasonPublic(BaseModel):
    """Why the client was surfaced: the policy's rule hits, or the source's reason."""

    kind: FlagKind
    run_id: str | None
    policy_version: str | None
    reason_code: str | None
    hits: list[RuleHitPublic]
    explanation: str


class ClientPublic(BaseModel):
    pseudonym: str
    identity: IdentityPublic | None = Field(description="null when the subject was erased")
    note: Literal["erased", "unreadable"] | None = Field(
        default=None,
        description="'erased' when the identity no longer exists; 'unreadable' when its stored "
        "key or ciphertext failed its integrity check and it is withheld (the service logs it)",
    )
    characteristics: CharacteristicsPublic
    flag: FlagReasonPublic
    further_flags: list[FlagReasonPublic] = Field(
        default_factory=list,
        description="other flags placed with this client in this packet (say a source's concern "
        "beside the run's flag), oldest first",
    )
    followups: list[FollowupPublic]


class PacketClientsPublic(BaseModel):
    packet: PacketPublic
    clients: list[ClientPublic]


class PacketPagePublic(BaseModel):
    items: list[PacketPublic]
    next_after: str | None = Field(
        description="pass as after for the next page; null on the last page"
    )


class UnplacedCasePublic(BaseModel):
    pseudonym: str
    district: str
    reason: str


class PartitionPublic(BaseModel):
    run_id: str
    packet_size: int
    packets: list[PacketPublic]
    unplaced: list[UnplacedCasePublic]
