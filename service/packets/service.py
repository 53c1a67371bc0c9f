"""Professionals, partitioning a run into packets with their keys, and packet metadata.

Guarantees:
- building packets happens in the caller's transaction: every packet, member, key wrap and log
  entry of one partitioning commits together or not at all;
- each packet gets a fresh random packet key, stored only wrapped by the packet KEK and bound to
  its row (``packets.wrapped_key`` of that packet id). Each member's DEK is unwrapped with the
  vault KEK once, here, and re-wrapped under the packet key bound to (packet id, subject id).
  No identity is decrypted or copied;
- what joins partitioning: all flags of the run, plus every external flag that is not yet in any
  packet (one flag per subject: the run's own flag first). A subject already in an open packet,
  an erased subject, one whose DEK wrap fails its check, or one nobody can take is returned as
  unplaced with the reason;
- a professional sees only packets assigned to them; anyone else without ``packets.read_all``
  gets 404 for a packet (its existence is not revealed) and the attempt is logged as denied;
- reassignment changes the owner in place, so the former owner loses access with the commit;
- re-identification is for the owner only and fails closed: ``open_packets`` appends the
  ``packet.open`` entries of a batch of opens in one transaction and returns ciphertexts only;
  ``reveal`` decrypts, and is called only after that transaction committed. So no identity
  exists in the service before its log entry is durable. Every refusal leaves a ``denied`` entry
  and a 404 (410 for a packet no longer in use);
- a follow-up note is sealed under the packet key, bound to (follow-up id, packet id); it is never
  logged and never shown on a metadata route;
- crypto-shredding (close + grace, expiry) NULLs the packet key wrap, the members' DEK wraps and
  the sealed notes in one transaction with its log entry; metadata, outcome codes and the log stay.
  Due packets are claimed with ``FOR UPDATE SKIP LOCKED`` on PostgreSQL (SQLite serializes writers
  with ``BEGIN IMMEDIATE``), so several workers can run the shredder at once;
- ``expires_at`` is the one expiry that opens, follow-ups, listings and the shredder read. A
  lowered ``packet_ttl_days`` moves it earlier for the packets already built (never later for a
  raised one): ``bring_expiries_forward``, once per start of the service and in
  ``casepackets expire``;
- erasing a subject removes their DEK from every packet and their follow-up notes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from json.encoder import encode_basestring
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, NoReturn, Protocol

from pydantic_core import to_json
from sqlalchemy import (
    Connection,
    Text,
    and_,
    bindparam,
    cast,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlmodel import Session

from service import clock
from service.access_log.service import LogEntry, LogUnavailable, Outcome, append, append_many
from service.auth.dependencies import Caller
from service.auth.permissions import Permission
from service.crypto.envelope import (
    AadTemplate,
    AadValue,
    DataKey,
    DecryptionFailed,
    UnderWrappedKey,
    open_,
    open_under_wrapped_keys,
    seal,
    token_version,
    unwrap_key,
    wrap_key,
    wrap_under,
)
from service.crypto.keyring import KeyProvider, UnknownKey
from service.db import (
    LOCK_WAIT_SLACK_SECONDS,
    LOG_LOCK_TIMEOUT_OPTION,
    limit_lock_waits,
    lock_was_busy,
    request_purge,
    spend_lock_wait,
)
from service.errors import Conflict, Gone, NotFound, ServiceError, Unavailable, Unprocessable
from service.flagging.models import Flag
from service.flagging.service import forget_push_digests, get_run
from service.packets import partition as partitioning
from service.packets.models import (
    OPEN_STATUSES,
    Followup,
    FollowupCreate,
    FollowupPublic,
    FollowupSummaryPublic,
    Packet,
    PacketDetailPublic,
    PacketMember,
    PacketMemberFlag,
    PacketMemberPublic,
    PacketPublic,
    PacketStatus,
    PartitionPublic,
    Professional,
    ProfessionalCreate,
    ProfessionalPublic,
    ProfessionalUpdate,
    UnplacedCasePublic,
    utcnow,
)
from service.packets.policy import FollowupPolicy, RetentionPolicy
from service.paging import after_place, cursor
from service.records.models import Subject
from service.records.service import (
    WrappedKeyColumn,
    dek_aad,
    forget_batch_answers,
    identity_aad,
    lock_subject_keys,
    register_erasure_hook,
    register_wrapped_key_column,
)
from service.schemas import as_utc

ERASED = "the subject was erased"
KEY_DAMAGED = "the subject's key failed its integrity check"
MAX_PAGE = 1000
LOG_BATCH = 2000  # access-log entries per append_many while building packets
UNPLACED_PER_ENTRY = 1000  # pseudonyms per packet.unplaced entry, as a page of a run's flags

_subjects = Subject.__table__  # type: ignore[attr-defined]
_flags = Flag.__table__  # type: ignore[attr-defined]
_packets = Packet.__table__  # type: ignore[attr-defined]
_members = PacketMember.__table__  # type: ignore[attr-defined]
_professionals = Professional.__table__  # type: ignore[attr-defined]
_followups = Followup.__table__  # type: ignore[attr-defined]
_member_flags = PacketMemberFlag.__table__  # type: ignore[attr-defined]
logger = logging.getLogger("casepackets")

if TYPE_CHECKING:
    from service.db import Database


class ProfessionalNotFound(NotFound):
    pass


class ProfessionalExists(Conflict):
    pass


class PacketNotFound(NotFound):
    # A non-owner's attempt is logged as denied; the entry must survive the 404.
    commit_before_raising = True


class PacketNotReassignable(Conflict):
    commit_before_raising = True  # the refusal keeps its ``denied`` entry


class ReassignTargetNotFound(ProfessionalNotFound):
    commit_before_raising = True  # the refusal keeps its ``denied`` entry


# -- keys -------------------------------------------------------------------------------------


def packet_key_aad(packet_id: str) -> dict[str, AadValue]:
    """Where a packet key wrap belongs: that packet's row."""
    return {"table": "packets", "column": "wrapped_key", "row": packet_id}


def member_dek_aad(packet_id: str, subject_id: int) -> dict[str, AadValue]:
    """Where a member's DEK (under the packet key) belongs: that packet and that subject."""
    return {
        "table": "packet_members",
        "column": "wrapped_dek",
        "row": packet_id,
        "subject": subject_id,
    }


# A note's ``note_binding``: bound to its follow-up, packet and client.
NOTE_BOUND_TO_CLIENT = 2


def note_aad(
    followup_id: str, packet_id: str, subject_id: int, pseudonym: str, *, binding: int | None
) -> dict[str, AadValue]:
    """Where a follow-up note (under the packet key) belongs: that follow-up of that packet,
    about that client. A note moved to another client's row, or a row's client changed, fails
    to open: it is never shown under the wrong client, nor left behind by their erasure.

    Notes written before the client was named (``binding`` NULL) still open with follow-up and
    packet alone. Setting a bound note's binding to NULL does not loosen it: it was sealed with
    its client, and opening it without fails."""
    placement: dict[str, AadValue] = {
        "table": "packet_followups",
        "column": "note_ciphertext",
        "row": followup_id,
        "packet": packet_id,
    }
    if binding == NOTE_BOUND_TO_CLIENT:
        placement |= {"subject": subject_id, "client": pseudonym}
    elif binding is not None:
        raise DecryptionFailed("a note under a binding this code does not know")
    return placement


def _erase_member_wraps(session: Session, subject_id: int) -> int:
    """Erasure hook: a subject's DEK under any packet key, and the notes about them, go with the
    subject. Returns the number of DEK wraps removed.

    First every packet holding the subject is locked, in id order (PostgreSQL): an open, a
    follow-up, a close or a shred of one of them in progress commits first, with its log entry,
    and none starts until the erasure has committed. So no open that starts after an erasure
    was confirmed can reveal that identity or log it as revealed. An open that committed just
    before the erasure may still be answered a moment after it: the log shows the open first.
    """
    connection = session.connection()
    packet_ids = list(
        connection.execute(
            select(_packets.c.id)
            .where(
                _packets.c.id.in_(
                    select(_members.c.packet_id).where(_members.c.subject_id == subject_id)
                )
            )
            .order_by(_packets.c.id)
            .with_for_update()
        ).scalars()
    )
    if not packet_ids:
        return 0
    result = connection.execute(
        update(_members)
        .where(_members.c.subject_id == subject_id, _members.c.wrapped_dek.is_not(None))
        .values(wrapped_dek=None)
    )
    # Notes about the subject live only in those packets (found through their packet index),
    # and so do the digests of what was asked with an Idempotency-Key: an HMAC of the note under
    # a packet key that outlives the erasure, against which a guessed note could be checked.
    connection.execute(
        update(_followups)
        .where(
            _followups.c.packet_id.in_(packet_ids),
            _followups.c.subject_id == subject_id,
            or_(
                _followups.c.note_ciphertext.is_not(None), _followups.c.request_digest.is_not(None)
            ),
        )
        .values(note_ciphertext=None, request_digest=None)
    )
    session.flush()
    return int(result.rowcount or 0)


register_erasure_hook(_erase_member_wraps)
# ``keys rewrap`` moves packet key wraps to the newest packet KEK (paging by the UUID id) and
# ``keys retire --purpose packet`` is refused while any packet still needs an older version.
register_wrapped_key_column(
    WrappedKeyColumn(
        purpose="packet",
        table="packets",
        column="wrapped_key",
        aad_columns=("id",),
        aad=lambda row: packet_key_aad(str(row["id"])),
    )
)


# -- professionals ----------------------------------------------------------------------------

# A member whose DEK wrap is gone from an open packet was erased: still listed, never a client.
_STILL_A_CLIENT = _members.c.wrapped_dek.is_not(None)


def open_loads(
    *, session: Session, professional_ids: Sequence[str] | None = None
) -> dict[str, int]:
    """Clients in open packets not yet past their expiry, per professional. An erased member
    is no client of theirs any more (nobody can re-identify or follow them up), so they take
    up no room."""
    query = (
        select(_packets.c.professional_id, func.count())
        .select_from(_members.join(_packets, _packets.c.id == _members.c.packet_id))
        .where(
            _packets.c.status.in_(OPEN_STATUSES),
            _packets.c.expires_at > utcnow(),
            _STILL_A_CLIENT,
        )
        .group_by(_packets.c.professional_id)
    )
    if professional_ids is not None:
        query = query.where(_packets.c.professional_id.in_(list(professional_ids)))
    return {professional_id: int(count) for professional_id, count in session.execute(query)}


def _professional_public(professional: Professional, load: int) -> ProfessionalPublic:
    return ProfessionalPublic(
        id=professional.id,
        display_name=professional.display_name,
        team=professional.team,
        districts=list(professional.districts),
        capacity=professional.capacity,
        open_load=load,
        active=professional.active,
        created_at=professional.created_at,
        updated_at=professional.updated_at,
    )


def get_professional(*, session: Session, professional_id: str, lock: bool = False) -> Professional:
    """The professional, with ``lock`` locked until commit (PostgreSQL ``FOR UPDATE``)."""
    query = select(Professional).where(Professional.id == professional_id)  # type: ignore[arg-type]
    found: Professional | None = session.execute(
        query.with_for_update() if lock else query
    ).scalar_one_or_none()
    if found is None:
        raise ProfessionalNotFound(f"no professional {professional_id!r}")
    return found


def _log_professional(
    session: Session, *, caller: Caller, action: str, professional_id: str, reason: str
) -> None:
    """Who gave whom the districts and room that decide which packets they are assigned: an
    entry with the professional's id and field names or counts only (names, teams and
    districts are text a coordinator typed, which the log never keeps)."""
    append(
        session=session,
        entry=LogEntry.by(
            caller,
            action=action,
            object_type="professional",
            object_id=professional_id,
            reason=reason,
        ),
    )


def create_professional(
    *, session: Session, given: ProfessionalCreate, caller: Caller
) -> ProfessionalPublic:
    if session.get(Professional, given.id) is not None:
        raise ProfessionalExists(f"professional {given.id!r} already exists; use PATCH to change")
    professional = Professional(
        id=given.id,
        display_name=given.display_name,
        team=given.team,
        districts=given.districts,
        capacity=given.capacity,
    )
    try:
        # A savepoint: the same id registered at this moment by another request (a
        # double-click) is a 409, and this transaction stays usable.
        with session.begin_nested():
            session.add(professional)
    except IntegrityError:
        raise ProfessionalExists(
            f"professional {given.id!r} already exists; use PATCH to change"
        ) from None
    _log_professional(
        session,
        caller=caller,
        action="professional.create",
        professional_id=given.id,
        reason=f"{len(given.districts)} districts; capacity {given.capacity}",
    )
    return _professional_public(professional, 0)


def list_professionals(
    *,
    session: Session,
    team: str | None = None,
    active: bool | None = None,
    after: str | None = None,
    limit: int = 100,
) -> tuple[list[ProfessionalPublic], str | None]:
    """Professionals in id order (code point order, on either database), a page of at most
    ``limit`` after the id ``after``; with the id to pass as ``after`` for the next page (None
    on the last)."""
    limit = max(1, min(limit, MAX_PAGE))
    professional_id = _professionals.c.id
    if session.get_bind().dialect.name == "postgresql":
        # In code point order, as SQLite compares text, whatever collation the cluster was made
        # with (en_US sorts "Prof-d" between "prof-a" and "prof-b"). The id index then goes
        # unused for the order: a team's professionals are few.
        professional_id = professional_id.collate("C")
    query = select(Professional).order_by(professional_id)
    if after is not None:
        query = query.where(professional_id > after)
    if team is not None:
        query = query.where(_professionals.c.team == team)
    if active is not None:
        query = query.where(_professionals.c.active == active)
    found = list(session.execute(query.limit(limit + 1)).scalars())
    page = found[:limit]
    loads = open_loads(session=session, professional_ids=[p.id for p in page])
    items = [_professional_public(p, loads.get(p.id, 0)) for p in page]
    return items, (page[-1].id if len(found) > limit else None)


def update_professional(
    *,
    session: Session,
    professional_id: str,
    changes: ProfessionalUpdate,
    caller: Caller,
    action: str = "professional.update",
) -> ProfessionalPublic:
    professional = get_professional(session=session, professional_id=professional_id)
    changed = changes.model_dump(exclude_unset=True)
    for name, value in changed.items():
        if value is None:
            raise Unprocessable(f"{name} may not be null", errors=[{"loc": [name], "msg": "null"}])
        setattr(professional, name, value)
    professional.updated_at = utcnow()
    session.add(professional)
    session.flush()
    told = [
        f"{name} {json.dumps(value)}" if name in ("capacity", "active") else name
        for name, value in sorted(changed.items())
    ]
    _log_professional(
        session,
        caller=caller,
        action=action,
        professional_id=professional.id,
        reason=f"changed: {', '.join(told) or 'nothing'}",
    )
    load = open_loads(session=session, professional_ids=[professional.id]).get(professional.id, 0)
    return _professional_public(professional, load)


def deactivate_professional(
    *, session: Session, professional_id: str, caller: Caller
) -> ProfessionalPublic:
    """No new packets go to them; their open packets stay theirs until reassigned."""
    return update_professional(
        session=session,
        professional_id=professional_id,
        changes=ProfessionalUpdate(active=False),
        caller=caller,
        action="professional.deactivate",
    )


# -- partitioning -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    flag_id: int
    subject_id: int
    pseudonym: str
    district: str
    wrapped_dek: str | None
    further_flag_ids: tuple[int, ...] = ()


def _candidates(session: Session, run_id: str) -> list[_Candidate]:
    """One case per subject from the flags not yet placed: the run's own, and the external flags
    of subjects not erased. The subject's flag is the run's if it has one, else its oldest; any
    other flag goes with it as a further flag, so each flag is placed once."""
    # A run's flag leads its subject, so once placed it is in one of the run's packets; an
    # external flag may be placed in any packet, as a member's own flag or a further one.
    placed_from_run = (
        select(_members.c.flag_id)
        .select_from(_members.join(_packets, _packets.c.id == _members.c.packet_id))
        .where(_packets.c.run_id == run_id)
    )
    external_placed = or_(
        exists().where(
            _members.c.subject_id == _flags.c.subject_id, _members.c.flag_id == _flags.c.id
        ),
        exists().where(_member_flags.c.flag_id == _flags.c.id),
    )
    rows = session.execute(
        select(
            _flags.c.id,
            _flags.c.subject_id,
            _flags.c.run_id,
            _subjects.c.pseudonym,
            _subjects.c.district,
            _subjects.c.wrapped_dek,
        )
        .select_from(_flags.join(_subjects, _subjects.c.id == _flags.c.subject_id))
        .where(
            or_(
                and_(_flags.c.run_id == run_id, _flags.c.id.not_in(placed_from_run)),
                and_(
                    _flags.c.kind == "external",
                    _subjects.c.wrapped_dek.is_not(None),
                    ~external_placed,
                ),
            )
        )
        .order_by(_flags.c.id)
    ).all()
    # One pass in flag id order (a partitioning may hold 100,000 flags): each subject's lead
    # flag, and the ids of its others (rare: a subject flagged by the run and by a source).
    lead: dict[int, Any] = {}
    further: dict[int, list[int]] = {}
    for row in rows:
        subject_id = row[1]
        known = lead.get(subject_id)
        if known is None:
            lead[subject_id] = row
            continue
        if row[2] == run_id and known[2] != run_id:  # the run's own flag leads
            lead[subject_id], row = row, known
        further.setdefault(subject_id, []).append(row[0])
    return [
        _Candidate(
            row[0],
            row[1],
            row[3],
            row[4],
            row[5],
            tuple(sorted(further[row[1]])) if row[1] in further else (),
        )
        for row in lead.values()
    ]


def _member_history(
    session: Session, run_id: str, subject_ids: set[int]
) -> tuple[set[int], dict[int, str]]:
    """Subjects in an open packet now (not past its expiry), and the professional of each
    subject's latest packet."""
    now = utcnow()
    in_open: set[int] = set()
    latest: dict[int, tuple[datetime, str]] = {}
    candidates = select(_flags.c.subject_id).where(
        or_(_flags.c.run_id == run_id, _flags.c.kind == "external")
    )
    rows = session.execute(
        select(
            _members.c.subject_id,
            _packets.c.professional_id,
            _packets.c.status,
            _packets.c.expires_at,
            _packets.c.created_at,
        )
        .select_from(_members.join(_packets, _packets.c.id == _members.c.packet_id))
        .where(_members.c.subject_id.in_(candidates))
    )
    for subject_id, professional_id, status, expires_at, created_at in rows:
        if subject_id not in subject_ids:
            continue
        if shown_status(status, expires_at, now) in OPEN_STATUSES:
            in_open.add(subject_id)
        known = latest.get(subject_id)
        if known is None or (created_at, professional_id) > known:
            latest[subject_id] = (created_at, professional_id)
    return in_open, {subject_id: found[1] for subject_id, found in latest.items()}


def _team(session: Session) -> list[partitioning.Professional]:
    """Every professional, locked until commit (in id order), with their open load."""
    team = (
        session.execute(select(Professional).order_by(Professional.id).with_for_update())
        .scalars()
        .all()
    )
    loads = open_loads(session=session)
    return [
        partitioning.Professional(
            id=p.id,
            districts=frozenset(p.districts),
            capacity=p.capacity,
            open_load=loads.get(p.id, 0),
            active=p.active,
        )
        for p in team
    ]


def shown_status(status: PacketStatus, expires_at: datetime, now: datetime) -> PacketStatus:
    """The status a reader sees: a packet past its expiry is ``expired`` at once, although the
    shredder (every few minutes) has yet to delete its key and store the status."""
    return "expired" if status in OPEN_STATUSES and as_utc(expires_at) <= now else status


def _past_expiry(now: datetime) -> Any:
    return and_(_packets.c.status.in_(OPEN_STATUSES), _packets.c.expires_at <= now)


def _shown_as(status: str, now: datetime) -> Any:
    """Packets whose shown status (:func:`shown_status`) is ``status``."""
    if status == "expired":
        return or_(_packets.c.status == "expired", _past_expiry(now))
    if status in OPEN_STATUSES:
        return and_(_packets.c.status == status, _packets.c.expires_at > now)
    return _packets.c.status == status


def _packet_public(row: Any, member_count: int, now: datetime | None = None) -> PacketPublic:
    return PacketPublic(
        id=row.id,
        run_id=row.run_id,
        professional_id=row.professional_id,
        district=row.district,
        status=shown_status(row.status, row.expires_at, now or utcnow()),
        member_count=member_count,
        created_at=row.created_at,
        expires_at=row.expires_at,
        closed_at=row.closed_at,
        opened_at=row.opened_at,
        shredded_at=row.shredded_at,
    )


@dataclass
class _BuiltPackets:
    """A plan's packets as rows to insert, and the members whose vault DEK could not be used."""

    packets: list[dict[str, Any]] = field(default_factory=list)
    members: list[dict[str, Any]] = field(default_factory=list)
    further: list[dict[str, Any]] = field(default_factory=list)  # flags beside a member's own
    public: list[PacketPublic] = field(default_factory=list)
    damaged: list[_Candidate] = field(default_factory=list)


def _build_packets(
    *,
    keyring: KeyProvider,
    plan: partitioning.Partition,
    placeable: dict[str, tuple[_Candidate, str]],
    run_id: str,
    now: datetime,
    expires_at: datetime,
) -> _BuiltPackets:
    """The rows of ``plan``'s packets, each with a fresh packet key that re-wraps its members'
    vault DEKs, and the members whose DEK wrap failed its check (altered, or moved from another
    subject's row): with any of those, the rows are not to be inserted."""
    built = _BuiltPackets()
    for planned in plan.packets:
        packet_id = str(uuid.uuid4())
        packet_key = DataKey.generate()
        built.packets.append(
            {
                "id": packet_id,
                "run_id": run_id,
                "professional_id": planned.professional_id,
                "district": planned.district,
                "status": "assigned",
                "created_at": now,
                "expires_at": expires_at,
                "closed_at": None,
                "shredded_at": None,
                "opened_at": None,
                "wrapped_key": wrap_key(
                    keyring, "packet", packet_key, aad=packet_key_aad(packet_id)
                ),
            }
        )
        for pseudonym in planned.pseudonyms:
            member, vault_wrapped_dek = placeable[pseudonym]
            try:
                dek = unwrap_key(keyring, "vault", vault_wrapped_dek, aad=dek_aad(pseudonym))
            except DecryptionFailed:
                built.damaged.append(member)
                continue
            built.members.append(
                {
                    "packet_id": packet_id,
                    "subject_id": member.subject_id,
                    "pseudonym": pseudonym,
                    "flag_id": member.flag_id,
                    "wrapped_dek": wrap_under(
                        packet_key, dek, aad=member_dek_aad(packet_id, member.subject_id)
                    ),
                }
            )
            built.further.extend(
                {"packet_id": packet_id, "subject_id": member.subject_id, "flag_id": flag_id}
                for flag_id in member.further_flag_ids
            )
        built.public.append(
            PacketPublic(
                id=packet_id,
                run_id=run_id,
                professional_id=planned.professional_id,
                district=planned.district,
                status="assigned",
                member_count=len(planned.pseudonyms),
                created_at=now,
                expires_at=expires_at,
                closed_at=None,
            )
        )
    return built


def partition_run(
    *,
    session: Session,
    keyring: KeyProvider,
    run_id: str,
    packet_size: int,
    retention: RetentionPolicy,
    caller: Caller,
) -> PartitionPublic:
    """Split a run's flagged cases into packets, build their keys and assign them (one txn).

    One partitioning at a time, and never beside an erasure (``lock_subject_keys``): a second
    one sees the first one's packets, and an erasure sees and removes the packet wraps made here
    from DEKs read before it. The team's rows are locked too, so a reassignment cannot fill a
    professional meanwhile.

    A case whose vault DEK wrap fails its check is left unplaced (``KEY_DAMAGED``, its pseudonym
    in the server log) and the rest are placed as if it were not there: one damaged row never
    stops a partitioning.
    """
    get_run(session=session, run_id=run_id)
    lock_subject_keys(session)
    candidates = _candidates(session, run_id)
    in_open, previous = _member_history(session, run_id, {c.subject_id for c in candidates})
    erased = [c for c in candidates if c.wrapped_dek is None]
    placeable = {c.pseudonym: (c, c.wrapped_dek) for c in candidates if c.wrapped_dek is not None}
    cases = {
        c.pseudonym: partitioning.Case(
            pseudonym=c.pseudonym,
            district=c.district,
            previous_professional=previous.get(c.subject_id),
            in_open_packet=c.subject_id in in_open,
        )
        for c, _wrapped in placeable.values()
    }
    team = _team(session)
    now = utcnow()
    expires_at = now + timedelta(days=retention.packet_ttl_days)
    damaged: list[_Candidate] = []
    while True:
        plan = partitioning.partition(cases.values(), team, packet_size=packet_size)
        built = _build_packets(
            keyring=keyring,
            plan=plan,
            placeable=placeable,
            run_id=run_id,
            now=now,
            expires_at=expires_at,
        )
        if not built.damaged:
            break
        # Rare: planned again without them, so no packet is left short and the room they would
        # have taken goes to whoever was next.
        for member in built.damaged:
            logger.error(
                "the vault key of subject %s failed its integrity check; "
                "left unplaced in partitioning run %s",
                member.pseudonym,
                run_id,
            )
            del cases[member.pseudonym]
        damaged.extend(built.damaged)

    connection = session.connection()
    if built.packets:
        connection.execute(insert(_packets), built.packets)
    for start in range(0, len(built.members), 5000):
        connection.execute(insert(_members), built.members[start : start + 5000])
    if built.further:
        connection.execute(insert(_member_flags), built.further)

    # Every packet's build and assign entries, in order, appended in a few large batches (one
    # log lock and one batched write each) within this transaction.
    entries = [
        LogEntry.by(
            caller,
            action=action,
            object_type="packet",
            object_id=packet.id,
            pseudonyms=planned.pseudonyms,
            reason=reason,
        )
        for packet, planned in zip(built.public, plan.packets, strict=True)
        for action, reason in (
            ("packet.build", f"run {run_id}; district {planned.district}"),
            ("packet.assign", f"run {run_id}; professional {planned.professional_id}"),
        )
    ]
    unplaced = [
        UnplacedCasePublic(pseudonym=u.pseudonym, district=u.district, reason=u.reason)
        for u in plan.unplaced
    ] + [
        UnplacedCasePublic(pseudonym=c.pseudonym, district=c.district, reason=reason)
        for cases_left_out, reason in ((damaged, KEY_DAMAGED), (erased, ERASED))
        for c in cases_left_out
    ]
    # The answer shows the coordinator whom the run (or a source) flagged and nobody took, as a
    # page of the run's flags would (``flagging.read``): the log says who saw which pseudonyms.
    entries += [
        LogEntry.by(
            caller,
            action="packet.unplaced",
            object_type="flagging_run",
            object_id=run_id,
            pseudonyms=[case.pseudonym for case in unplaced[start : start + UNPLACED_PER_ENTRY]],
            reason=f"run {run_id}; {len(unplaced)} cases unplaced",
        )
        for start in range(0, len(unplaced), UNPLACED_PER_ENTRY)
    ]
    for start in range(0, len(entries), LOG_BATCH):
        append_many(session=session, entries=entries[start : start + LOG_BATCH])
    return PartitionPublic(
        run_id=run_id, packet_size=packet_size, packets=built.public, unplaced=unplaced
    )


# -- packet metadata --------------------------------------------------------------------------


def _sees_all(caller: Caller) -> bool:
    return caller.can(Permission.PACKETS_READ_ALL)


def _member_counts(session: Session, packet_ids: Sequence[str]) -> dict[str, int]:
    if not packet_ids:
        return {}
    rows = session.execute(
        select(_members.c.packet_id, func.count())
        .where(_members.c.packet_id.in_(list(packet_ids)))
        .group_by(_members.c.packet_id)
    )
    return {packet_id: int(count) for packet_id, count in rows}


def _packet_id(text: str) -> str:
    return str(uuid.UUID(text))


def list_packets(
    *,
    session: Session,
    caller: Caller,
    status: str | None = None,
    professional_id: str | None = None,
    after: str | None = None,
    limit: int = 100,
) -> tuple[list[PacketPublic], str | None]:
    """Own packets for a professional; all (optionally one professional's) with read_all. Newest
    first, paged by where the previous page ended (``after``), not by a count: packets made or
    changed while a caller pages never shift what the next page holds (nothing repeated, nothing
    skipped); packets made after the walk began belong to a new walk's first page."""
    limit = max(1, min(limit, MAX_PAGE))
    query = select(_packets).order_by(_packets.c.created_at.desc(), _packets.c.id)
    if after is not None:
        query = query.where(
            after_place(after, _packet_id, created_at=_packets.c.created_at, item_id=_packets.c.id)
        )
    if not _sees_all(caller):
        query = query.where(_packets.c.professional_id == caller.sub)
    # Also for a professional: another's id finds nothing, rather than their own packets.
    if professional_id is not None:
        query = query.where(_packets.c.professional_id == professional_id)
    now = utcnow()  # one moment for the filter and the statuses shown
    if status is not None:
        query = query.where(_shown_as(status, now))
    rows = session.execute(query.limit(limit + 1)).all()
    page = rows[:limit]
    counts = _member_counts(session, [row.id for row in page])
    items = [_packet_public(row, counts.get(row.id, 0), now) for row in page]
    more = len(rows) > limit  # so the page is full
    return items, (cursor(items[-1].created_at, items[-1].id) if more else None)


def _hide(
    session: Session, *, caller: Caller, action: str, packet_id: str, reason: str, known: object
) -> NoReturn:
    """Refuse as if there were no such packet: log the denial (with the members' pseudonyms
    when the packet exists, ``known`` not None) and raise the 404."""
    _deny(
        session,
        caller=caller,
        action=action,
        packet_id=packet_id,
        reason=reason,
        pseudonyms=_pseudonyms_of(session, [packet_id])[packet_id] if known is not None else (),
    )
    raise PacketNotFound(f"no packet {packet_id} for this caller")


def _visible_packet(session: Session, *, packet_id: str, caller: Caller, action: str) -> Packet:
    """The packet if ``caller`` may read it (own, or all with ``packets.read_all``); otherwise a
    logged denial and a 404, also for a role without ``packets.read``."""
    packet = session.get(Packet, packet_id)
    reason: str | None
    if packet is None:
        reason = "no such packet"
    elif (reason := _HIDDEN_FROM[action](packet, caller)) is None:
        return packet
    _hide(session, caller=caller, action=action, packet_id=packet_id, reason=reason, known=packet)


def get_packet(*, session: Session, packet_id: str, caller: Caller) -> PacketDetailPublic:
    """One packet's metadata, for whoever may read it; the read is logged (``packet.read``, with
    the members' pseudonyms) in the caller's transaction, allowed or denied."""
    packet = _visible_packet(session, packet_id=packet_id, caller=caller, action="packet.read")
    rows = session.execute(
        select(_members.c.pseudonym, _flags.c.kind)
        .select_from(_members.join(_flags, _flags.c.id == _members.c.flag_id))
        .where(_members.c.packet_id == packet_id)
        .order_by(_members.c.pseudonym)
    ).all()
    _log_packet(
        session,
        caller=caller,
        action="packet.read",
        packet_id=packet_id,
        pseudonyms=[pseudonym for pseudonym, _ in rows],
    )
    summary = _packet_public(packet, len(rows))
    followups = _followups_of(session, [packet_id])[packet_id]
    return PacketDetailPublic(
        **summary.model_dump(),
        members=[
            PacketMemberPublic(
                pseudonym=p,
                flag_kind=kind,
                followups=[
                    FollowupSummaryPublic(
                        id=f.id,
                        kind=f.kind,
                        date=f.date,
                        outcome_code=f.outcome_code,
                        created_at=f.created_at,
                    )
                    for f in followups.get(p, [])
                ],
            )
            for p, kind in rows
        ],
    )


def reassign_packet(
    *, session: Session, packet_id: str, professional_id: str, caller: Caller
) -> PacketPublic:
    """Give an open packet to another active professional who serves its district and has room.

    Only with ``packets.reassign``: anyone else gets a logged denial and a 404, like every
    refusal on a packet. A refused reassignment (no such professional, or one who cannot take
    it, or a packet no longer open) is logged as denied too.
    """
    packet = _owned_packet(
        session,
        packet_id=packet_id,
        caller=caller,
        action="packet.reassign",
    )
    members = _pseudonyms_of(session, [packet_id])[packet_id]

    def refuse(error: ServiceError, reason: str | None = None) -> NoReturn:
        _deny(
            session,
            caller=caller,
            action="packet.reassign",
            packet_id=packet_id,
            reason=reason or error.detail,
            pseudonyms=members,
        )
        raise error

    # Closed, expired or shredded, also one past its expiry still waiting for the shredder:
    # nobody could open it any more.
    if (why := _why_not_in_use(packet, utcnow())) is not None:
        refuse(PacketNotReassignable(f"packet {packet_id} is {why}; only open packets move"))
    former = packet.professional_id
    if former == professional_id:
        # A retried request, or a mistaken one: nothing moves, and the entry says so rather
        # than record a move from someone to themselves.
        _log_packet(
            session,
            caller=caller,
            action="packet.reassign",
            packet_id=packet_id,
            pseudonyms=members,
            reason=f"already with {former}; unchanged",
        )
        return _packet_public(packet, len(members))
    # Locked: two reassignments to one professional cannot both fit into the same room.
    try:
        target = get_professional(session=session, professional_id=professional_id, lock=True)
    except ProfessionalNotFound as missing:
        # The entry leaves out the id asked for: it is no registered id, and may be any text.
        refuse(ReassignTargetNotFound(missing.detail), "no such professional")
    if not target.active:
        refuse(PacketNotReassignable(f"professional {professional_id!r} is not active"))
    if packet.district not in target.districts:
        refuse(
            PacketNotReassignable(
                f"professional {professional_id!r} does not serve district {packet.district}"
            )
        )
    load = open_loads(session=session, professional_ids=[professional_id]).get(professional_id, 0)
    clients = session.execute(
        select(func.count()).where(_members.c.packet_id == packet_id, _STILL_A_CLIENT)
    ).scalar_one()
    if load + clients > target.capacity:
        refuse(
            PacketNotReassignable(
                f"professional {professional_id!r} has room for "
                f"{max(target.capacity - load, 0)} more clients; this packet has {clients}"
            )
        )
    # The new owner has not opened it: it is theirs as newly assigned (the log keeps the
    # former owner's opens), so "opened" and ?status=assigned tell what the new owner did.
    packet = _update_packet(
        session, packet, professional_id=professional_id, status="assigned", opened_at=None
    )
    _log_packet(
        session,
        caller=caller,
        action="packet.reassign",
        packet_id=packet_id,
        pseudonyms=members,
        reason=f"from {former} to {professional_id}",
    )
    return _packet_public(packet, len(members))


# -- re-identification, follow-ups, lifecycle --------------------------------------------------


class PacketGone(Gone):
    """The packet is closed, expired or shredded; the refusal keeps its ``denied`` entry."""

    commit_before_raising = True


class PacketLocked(Unavailable):
    """An owner's open skipped its packet, which another transaction holds (a close, reassign,
    shred or erasure in progress): nothing was logged for it, and it may be tried again on its
    own."""

    def __init__(self, packet_id: str) -> None:
        super().__init__(
            f"packet {packet_id} is being changed by another request; try again",
            headers={"Retry-After": "1"},
        )


class PacketKeyDamaged(ServiceError):
    """The packet's stored key failed its integrity check (altered, or copied from another
    packet's row): nothing that needs it can be done until it is restored."""

    status = 500
    # The reason of the denied entry that follows an open logged as allowed (record_unrevealed).
    nothing_shown = "the packet key failed its integrity check; nothing was shown"


class PacketKeyRetired(Unavailable):
    """An open logged as allowed whose packet key wrap was then moved to a newer packet KEK
    version (``keys rewrap``) and the version it was under retired, before it was decrypted:
    nothing was shown, and the open tried again reads the new wrap."""

    nothing_shown = "the packet key's version was retired before it was read; nothing was shown"

    def __init__(self, packet_id: str) -> None:
        super().__init__(
            f"the key of packet {packet_id} was rewrapped and its old version retired while "
            "this open was logged; nothing was shown, try again",
            headers={"Retry-After": "1"},
        )


class PacketKeyUnheld(Unavailable):
    """The packet's key is wrapped under a packet KEK version the keyring does not hold (retired
    before a backup holding the older wrap was restored, or not yet readable from this worker's
    keyring file): nothing that needs the packet key was done. The open's counterpart, for an
    open already logged, is ``PacketKeyRetired``."""

    def __init__(self, packet_id: str) -> None:
        super().__init__(
            f"the key of packet {packet_id} is under a packet key version the keyring does not "
            "hold; nothing was recorded (a follow-up without a note or Idempotency-Key needs "
            "no key)",
            headers={"Retry-After": "1"},
        )


class PacketNotClosable(Conflict):
    commit_before_raising = True  # the refusal keeps its ``denied`` entry


class FollowupRefused(Unprocessable):
    commit_before_raising = True  # the refusal keeps its ``denied`` entry


class FollowupKeyReused(Conflict):
    title = "Idempotency-Key reused"
    commit_before_raising = True  # the refusal keeps its ``denied`` entry


class ClientNotInPacket(NotFound):
    commit_before_raising = True


class ClientErased(Gone):
    commit_before_raising = True


@dataclass(frozen=True)
class _Followup:
    id: str
    subject_id: int
    kind: Any
    date: Any
    outcome_code: str | None
    note_ciphertext: str | None
    note_binding: int | None
    created_by: str
    created_at: datetime


# The statements of the re-identification path are built once (bound by ``packet_id``), so a
# request neither rebuilds them nor recomputes their cache keys: that was a quarter of an
# open's CPU.
_FOLLOWUPS = (
    select(
        _followups.c.packet_id,
        _followups.c.pseudonym,
        _followups.c.id,
        _followups.c.subject_id,
        _followups.c.kind,
        _followups.c.date,
        _followups.c.outcome_code,
        _followups.c.note_ciphertext,
        _followups.c.note_binding,
        _followups.c.created_by,
        _followups.c.created_at,
    )
    .where(_followups.c.packet_id.in_(bindparam("packet_ids", expanding=True)))
    .order_by(
        _followups.c.packet_id,
        _followups.c.pseudonym,
        _followups.c.date,
        _followups.c.created_at,
    )
)
_MEMBER_PSEUDONYMS = (
    select(_members.c.packet_id, _members.c.pseudonym)
    .where(_members.c.packet_id.in_(bindparam("packet_ids", expanding=True)))
    .order_by(_members.c.packet_id, _members.c.pseudonym)
)


def _followups_of(
    connection: Connection | Session, packet_ids: list[str]
) -> dict[str, dict[str, list[_Followup]]]:
    """Every follow-up of these packets in one query, by packet and client, oldest first."""
    grouped: dict[str, dict[str, list[_Followup]]] = {packet_id: {} for packet_id in packet_ids}
    for packet_id, pseudonym, *fields in connection.execute(
        _FOLLOWUPS, {"packet_ids": packet_ids}
    ).all():
        grouped[packet_id].setdefault(pseudonym, []).append(_Followup(*fields))
    return grouped


def _pseudonyms_of(connection: Connection | Session, packet_ids: list[str]) -> dict[str, list[str]]:
    """The members' pseudonyms of these packets in one query, by packet, in order."""
    grouped: dict[str, list[str]] = {packet_id: [] for packet_id in packet_ids}
    for packet_id, pseudonym in connection.execute(
        _MEMBER_PSEUDONYMS, {"packet_ids": packet_ids}
    ).all():
        grouped[packet_id].append(pseudonym)
    return grouped


def _log_packet(
    session: Session,
    *,
    caller: Caller,
    action: str,
    packet_id: str,
    pseudonyms: Sequence[str] = (),
    reason: str | None = None,
    outcome: Literal["allowed", "denied"] = "allowed",
) -> None:
    """Append one access-log entry about a packet, in the caller's transaction."""
    append(
        session=session,
        entry=LogEntry.by(
            caller,
            action=action,
            object_type="packet",
            object_id=packet_id,
            outcome=outcome,
            pseudonyms=pseudonyms,
            reason=reason,
        ),
    )


def _deny(
    session: Session,
    *,
    caller: Caller,
    action: str,
    packet_id: str,
    reason: str,
    pseudonyms: Sequence[str] = (),
) -> None:
    _log_packet(
        session,
        caller=caller,
        action=action,
        packet_id=packet_id,
        pseudonyms=pseudonyms,
        reason=reason,
        outcome="denied",
    )


@dataclass(frozen=True)
class _PacketRow:
    """A packet row as read under its lock (plain values: no ORM identity map on the hot path)."""

    id: str
    run_id: str | None
    professional_id: str
    district: str
    status: str
    created_at: datetime
    expires_at: datetime
    closed_at: datetime | None
    shredded_at: datetime | None
    opened_at: datetime | None
    wrapped_key: str | None


_PACKET = select(*(_packets.c[name] for name in _PacketRow.__dataclass_fields__)).where(
    _packets.c.id == bindparam("packet_id")
)
_LOCKED_PACKET = _PACKET.with_for_update()
_FREE_PACKET = _PACKET.with_for_update(skip_locked=True)


def _row(session: Session, query: Any, packet_id: str) -> _PacketRow | None:
    """The packet row read by one of the statements above, if there is one."""
    row = session.execute(query, {"packet_id": packet_id}).first()
    return None if row is None else _PacketRow(*row)


def _update_packet(session: Session, packet: _PacketRow, **values: Any) -> _PacketRow:
    """Change the (locked) packet's row, e.g. its ``status`` and ``closed_at``; returns the new
    row."""
    session.execute(update(_packets).where(_packets.c.id == packet.id).values(**values))
    return replace(packet, **values)


def _owned_packet(session: Session, *, packet_id: str, caller: Caller, action: str) -> _PacketRow:
    """The packet, locked, if ``caller`` may do ``action`` on it (``_HIDDEN_FROM``); otherwise a
    logged denial and a 404.

    A packet that another transaction holds (PostgreSQL: a close, reassign, shred or erasure in
    progress) is waited for, as the change may be a reassignment to the caller. If that wait
    runs out, someone its committed row does not admit gets the same logged 404 as for a packet
    that does not exist (never the 503 that would say it exists); its owner gets the 503.
    """
    packet = _row(session, _FREE_PACKET, packet_id)
    if packet is None and (held := _row(session, _PACKET, packet_id)) is not None:
        admitted = _HIDDEN_FROM[action](held, caller) is None
        began = time.monotonic()
        try:
            # Under a savepoint: a wait that runs out leaves the transaction usable for the
            # denied entry. Locked until commit (a shredder skips it meanwhile), and judged
            # again below as it is now.
            with session.begin_nested():
                packet = _row(session, _LOCKED_PACKET, packet_id)
        except OperationalError as exc:
            if admitted or not lock_was_busy(exc):
                raise
            packet = held
        if admitted:
            # Only for whom the row may admit: anyone else's denied entry waits for the log
            # as long as one for a packet that does not exist, never a 503 that says it does.
            spend_lock_wait(session.connection(), time.monotonic() - began)
    reason: str | None
    if packet is None:
        reason = "no such packet"
    elif (reason := _HIDDEN_FROM[action](packet, caller)) is None:
        return packet
    _hide(session, caller=caller, action=action, packet_id=packet_id, reason=reason, known=packet)


class _Owned(Protocol):
    @property
    def professional_id(self) -> str: ...


def _why_hidden(
    packet: _Owned,
    caller: Caller,
    *,
    permission: Permission,
    any_permission: Permission | None = None,
) -> str | None:
    """Why ``caller`` may not act on ``packet`` (the denied entry's reason, answered with the
    same 404 as a packet that does not exist), or None when they may: its owner with
    ``permission``, or anyone with ``any_permission``."""
    if any_permission is not None and caller.can(any_permission):
        return None
    if packet.professional_id != caller.sub:
        return "not the packet's owner"
    if not caller.can(permission):
        return f"lacks {permission.value}"
    return None


def _why_unseen(packet: _Owned, caller: Caller) -> str | None:
    """Why ``caller`` may not read ``packet``'s metadata: ``packets.read`` for their own, and
    ``packets.read_all`` besides for everyone's."""
    if not caller.can(Permission.PACKETS_READ):
        return f"lacks {Permission.PACKETS_READ.value}"
    if not _sees_all(caller) and packet.professional_id != caller.sub:
        return "not the packet's owner"
    return None


# Who may do what to a packet, by the action's log name: why ``caller`` may not (the reason of
# the denied entry that goes with the 404), or None when they may. The routes decide by these,
# and so does ``refuse_if_hidden`` for a request a route cannot take as sent.
_HIDDEN_FROM: dict[str, Callable[[_Owned, Caller], str | None]] = {
    "packet.read": _why_unseen,
    "packet.open": partial(_why_hidden, permission=Permission.PACKETS_OPEN),
    "followup.create": partial(_why_hidden, permission=Permission.FOLLOWUPS_WRITE),
    "packet.close": partial(
        _why_hidden,
        permission=Permission.PACKETS_CLOSE,
        any_permission=Permission.PACKETS_CLOSE_ANY,
    ),
    "packet.reassign": partial(
        _why_hidden,
        permission=Permission.PACKETS_REASSIGN,
        any_permission=Permission.PACKETS_REASSIGN,
    ),
}


def refuse_if_hidden(database: Database, *, packet_id: str, caller: Caller, action: str) -> None:
    """Raise the logged 404 of ``action`` when ``caller`` may not do it to ``packet_id`` (also
    when there is no such packet); return when they may. For a request the route cannot take as
    sent: its 422 would otherwise say nothing of the packet yet keep the attempt out of the log.
    The row is read without its lock: nothing changes but the log."""
    with database.session() as session:
        packet = _row(session, _PACKET, packet_id)
        reason = "no such packet" if packet is None else _HIDDEN_FROM[action](packet, caller)
        if reason is None:
            return
        try:
            _hide(
                session,
                caller=caller,
                action=action,
                packet_id=packet_id,
                reason=reason,
                known=packet,
            )
        except PacketNotFound:
            session.commit()
            raise


def _why_not_in_use(
    packet: _PacketRow, now: datetime, *, ahead: timedelta = timedelta(0)
) -> str | None:
    """Why a packet can no longer be used, or None while it is open for use, and still will be
    ``ahead`` from ``now`` (when the action's log entry may be stamped, at the latest)."""
    if packet.status == "closed":
        return "closed"
    if packet.status in ("expired", "shredded") or packet.wrapped_key is None:
        return "shredded" if packet.status == "shredded" else "expired"
    if as_utc(packet.expires_at) <= now + ahead:
        return "expired"
    return None


def _in_use(session: Session, *, packet: _PacketRow, caller: Caller, action: str) -> None:
    """Refuse (logged, 410) a packet that is closed, expired or crypto-shredded, or that will
    have expired by the time this action's entry may be stamped (the log lock's bound from now,
    as for an open)."""
    bound = session.connection().get_execution_options().get(LOG_LOCK_TIMEOUT_OPTION, 0.0)
    why = _why_not_in_use(packet, utcnow(), ahead=timedelta(seconds=bound))
    if why is None:
        return
    _deny(
        session,
        caller=caller,
        action=action,
        packet_id=packet.id,
        reason=f"packet is {why}",
        pseudonyms=_pseudonyms_of(session, [packet.id])[packet.id],
    )
    raise _gone(packet.id, why)


def _gone(packet_id: str, why: str) -> PacketGone:
    return PacketGone(
        f"packet {packet_id} is {why}; its clients can no longer be re-identified through it"
    )


def _packet_key_wrap(packet: _PacketRow) -> str:
    if packet.wrapped_key is None:
        raise PacketGone(f"packet {packet.id} is crypto-shredded")
    return packet.wrapped_key


def _packet_key(keyring: KeyProvider, packet: _PacketRow) -> DataKey:
    """The packet key of a packet its caller holds locked (no rewrap can move it meanwhile):
    ``PacketKeyDamaged`` for a wrap that fails its check, ``PacketKeyUnheld`` for one under a
    version the keyring does not hold, each logged by the packet's id."""
    wrapped_key = _packet_key_wrap(packet)
    try:
        return _unwrap_packet_key(keyring, packet_id=packet.id, wrapped_key=wrapped_key)
    except UnknownKey:
        _say_version_unheld(packet.id, wrapped_key)
        raise PacketKeyUnheld(packet.id) from None


def _say_version_unheld(packet_id: str, wrapped_key: str) -> None:
    # For the operator: a version gone for good (a restore from before a rewrap and retirement)
    # refuses this packet every time, and only they can put it right.
    logger.error(
        "the key of packet %s is under packet v%d, which the keyring does not hold",
        packet_id,
        token_version(wrapped_key),
    )


def _unwrap_packet_key(keyring: KeyProvider, *, packet_id: str, wrapped_key: str) -> DataKey:
    """Unwrap the packet key with the packet KEK (only after the access is logged). A wrap that
    fails its check is ``PacketKeyDamaged``, logged by the packet's id."""
    try:
        return unwrap_key(keyring, "packet", wrapped_key, aad=packet_key_aad(packet_id))
    except DecryptionFailed:
        logger.error("the key of packet %s failed its integrity check", packet_id)
        raise PacketKeyDamaged(
            f"the key of packet {packet_id} failed its integrity check; its identities and "
            "notes cannot be read, nor a note or Idempotency-Key used, until it is restored"
        ) from None


class _FlagRow(NamedTuple):
    """A flag as the owner reads it, its rule hits still the JSON text the flagging run stored
    (``FlagReasonPublic``'s fields, in order)."""

    kind: str
    run_id: str | None
    policy_version: str | None
    reason_code: str | None
    hits_json: str
    explanation: str


class _SealedMember(NamedTuple):
    """One member of a packet as read for an open: its wraps and ciphertext (None once erased),
    characteristics and why it was flagged.

    A plain tuple rather than SQLAlchemy's ``Row``: reading a ``Row`` attribute by name first
    fails a generic lookup and builds an ``AttributeError``, which cost a tenth of an open.
    """

    packet_id: str
    pseudonym: str
    subject_id: int
    wrapped_dek: str | None
    identity_ciphertext: str | None
    district: str
    neighbourhood: str
    birth_year: int | None
    household_type: str | None
    flag: _FlagRow

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> _SealedMember:
        """From a row of ``_SEALED_MEMBER``'s columns."""
        return cls._make((*row[:_MEMBER_FIELDS], _FlagRow._make(row[_MEMBER_FIELDS:])))


_MEMBER_FIELDS = len(_SealedMember._fields) - 1  # those before the flag's


@dataclass(frozen=True, repr=False)
class SealedPacket:
    """A packet open that is logged but not yet decrypted: ciphertexts and wraps only.

    ``reveal`` turns it into identities; call it only once the transaction that holds the
    ``packet.open`` entry has committed.
    """

    packet: PacketPublic
    wrapped_key: str
    members: Sequence[_SealedMember]
    followups: dict[str, list[_Followup]]
    further_flags: dict[int, list[_FlagRow]]  # by subject id, oldest first

    def __repr__(self) -> str:
        return f"SealedPacket({self.packet.id}, {len(self.members)} members)"


def record_unrevealed(
    database: Database,
    *,
    sealed: SealedPacket,
    caller: Caller,
    refusal: PacketKeyDamaged | PacketKeyRetired,
) -> None:
    """Follow an open logged as allowed whose packet key then could not be opened
    (``PacketKeyDamaged``, ``PacketKeyRetired``) with a denied ``packet.open`` entry saying
    nothing was shown: the log must not leave an auditor believing identities left that never
    did. Best effort: if the log cannot take it, the server log says so and the open's refusal
    stands."""
    try:
        with database.session() as session:
            _deny(
                session,
                caller=caller,
                action="packet.open",
                packet_id=sealed.packet.id,
                reason=refusal.nothing_shown,
                pseudonyms=[member.pseudonym for member in sealed.members],
            )
            session.commit()
    except (ServiceError, SQLAlchemyError) as exc:
        logger.error(
            "could not log that the open of packet %s showed nothing (%s)",
            sealed.packet.id,
            type(exc).__name__,
        )


# A flag as the owner reads it (``_FlagRow``'s fields, in order). The hits are read as the JSON
# text they are stored as, and ``reveal`` passes that text through into the body unparsed.
_FLAG_ROW = (
    _flags.c.kind,
    _flags.c.run_id,
    _flags.c.policy_version,
    _flags.c.reason_code,
    cast(_flags.c.hits, Text),
    _flags.c.explanation,
)

# A member as an open reads it (``_SealedMember``'s fields, in order, its flag's last).
_SEALED_MEMBER = (
    _members.c.packet_id,
    _members.c.pseudonym,
    _members.c.subject_id,
    _members.c.wrapped_dek,
    _subjects.c.identity_ciphertext,
    _subjects.c.district,
    _subjects.c.neighbourhood,
    _subjects.c.birth_year,
    _subjects.c.household_type,
    *_FLAG_ROW,
)


def _json_text(value: str | None) -> bytes:
    """A string, or null, written as JSON."""
    return b"null" if value is None else encode_basestring(value).encode("utf-8")


def _flag_json(flag: _FlagRow) -> bytes:
    """A flag as ``FlagReasonPublic`` shapes it, written as JSON. Its hits are the JSON text
    that the flagging run stored (a JSON column), passed through as they are."""
    return b"".join(
        (
            b'{"kind":',
            _json_text(flag.kind),
            b',"run_id":',
            _json_text(flag.run_id),
            b',"policy_version":',
            _json_text(flag.policy_version),
            b',"reason_code":',
            _json_text(flag.reason_code),
            b',"hits":',
            flag.hits_json.encode("utf-8"),
            b',"explanation":',
            _json_text(flag.explanation),
            b"}",
        )
    )


def _characteristics_json(member: _SealedMember) -> bytes:
    """A member's characteristics as ``CharacteristicsPublic`` shapes them, written as JSON."""
    return b"".join(
        (
            b'{"district":',
            _json_text(member.district),
            b',"neighbourhood":',
            _json_text(member.neighbourhood),
            b',"birth_year":',
            b"null" if member.birth_year is None else b"%d" % member.birth_year,
            b',"household_type":',
            _json_text(member.household_type),
            b"}",
        )
    )


def _note(
    followup: _Followup, *, packet_id: str, pseudonym: str, packet_key: DataKey
) -> tuple[str | None, bool]:
    """A follow-up's decrypted note (None when there is none), and whether it was withheld: a
    stored note that fails its check (tampered with, or not where it was written) is withheld
    alone, logged by its ids, and the owner is told it is unreadable."""
    if followup.note_ciphertext is None:
        return None, False
    try:
        aad = note_aad(
            followup.id, packet_id, followup.subject_id, pseudonym, binding=followup.note_binding
        )
        return open_(packet_key, followup.note_ciphertext, aad=aad).decode("utf-8"), False
    except (DecryptionFailed, UnicodeDecodeError):
        logger.error(
            "the note of follow-up %s in packet %s failed its integrity check; it was withheld",
            followup.id,
            packet_id,
        )
        return None, True


def _followups_json(
    followups: Sequence[_Followup], *, packet_id: str, pseudonym: str, packet_key: DataKey
) -> bytes:
    """One client's follow-ups as ``FollowupPublic`` shapes them, their notes decrypted, written
    as JSON."""
    if not followups:
        return b"[]"
    shown = []
    for f in followups:
        note, unreadable = _note(f, packet_id=packet_id, pseudonym=pseudonym, packet_key=packet_key)
        shown.append(
            {
                "id": f.id,
                "kind": f.kind,
                "date": f.date,
                "outcome_code": f.outcome_code,
                "created_at": as_utc(f.created_at),
                "note": note,
                "note_unreadable": unreadable,
                "created_by": f.created_by,
            }
        )
    return to_json(shown)


# Every identity ciphertext's placement differs from the next in its row alone.
_IDENTITY_AAD = AadTemplate(identity_aad(""), field="row")


def reveal(*, keyring: KeyProvider, sealed: SealedPacket) -> bytes:
    """Decrypt a logged open into the response body, JSON shaped as ``PacketClientsPublic``:
    the packet key (packet KEK), each member's DEK (packet key), the identities and the
    follow-up notes. An erased member comes back with ``identity=None`` and ``note="erased"``;
    the packet as a whole never fails for it, only for a packet key that cannot be opened
    after its open was logged (``PacketKeyDamaged``, or ``PacketKeyRetired`` when the KEK
    version of the wrap the open read was retired since). No database access.

    This is the service's hottest path, so the body is written as JSON piece by piece: each
    identity is its decrypted plaintext, which is the identity's JSON as ingest wrote it
    (``Identity.to_bytes``, authenticated with its placement), and each flag's hits are the JSON
    text stored by the flagging run; neither is parsed and written again. Each kind of
    placement is encoded once per packet (``AadTemplate``).
    """
    packet_id = sealed.packet.id
    try:
        packet_key = _unwrap_packet_key(
            keyring, packet_id=packet_id, wrapped_key=sealed.wrapped_key
        )
    except UnknownKey:
        # Read before a rewrap moved it, its version retired since the open committed (or gone
        # for good: then every open answers so).
        _say_version_unheld(packet_id, sealed.wrapped_key)
        raise PacketKeyRetired(packet_id) from None
    dek_aad = AadTemplate(member_dek_aad(packet_id, 0), field="subject", wrapped_key=True)
    wrapped = {
        m.subject_id: UnderWrappedKey(
            m.wrapped_dek,
            dek_aad.fill(m.subject_id),
            m.identity_ciphertext,
            _IDENTITY_AAD.fill(m.pseudonym),
        )
        for m in sealed.members
        if m.wrapped_dek is not None and m.identity_ciphertext is not None
    }
    identities = _identities(packet_key, wrapped, packet_id=packet_id)
    body = [b'{"packet":', to_json(sealed.packet), b',"clients":[']
    for number, member in enumerate(sealed.members):
        identity = identities.get(member.subject_id)
        # Not among the wraps: erased. Among them but None: its wrap or ciphertext failed.
        status = (
            b"null"
            if identity is not None
            else b'"unreadable"'
            if member.subject_id in identities
            else b'"erased"'
        )
        body += (
            b',{"pseudonym":' if number else b'{"pseudonym":',
            _json_text(member.pseudonym),
            b',"identity":',
            b"null" if identity is None else identity,
            b',"note":',
            status,
            b',"characteristics":',
            _characteristics_json(member),
            b',"flag":',
            _flag_json(member.flag),
            b',"further_flags":[',
            b",".join(_flag_json(f) for f in sealed.further_flags.get(member.subject_id, ())),
            b'],"followups":',
            _followups_json(
                sealed.followups.get(member.pseudonym, ()),
                packet_id=packet_id,
                pseudonym=member.pseudonym,
                packet_key=packet_key,
            ),
            b"}",
        )
    body.append(b"]}")
    return b"".join(body)


def _identities(
    packet_key: DataKey, wrapped: dict[int, UnderWrappedKey], *, packet_id: str
) -> dict[int, bytes | None]:
    """Each member's identity (its JSON), by subject: all in one call, and only if one fails its
    check, one by one, so that one damaged wrap or ciphertext withholds that identity alone
    (None, logged by the packet's id and the member's subject id), not the owner's whole packet."""
    try:
        return dict(
            zip(wrapped, open_under_wrapped_keys(packet_key, wrapped.values()), strict=True)
        )
    except DecryptionFailed:
        pass
    opened: dict[int, bytes | None] = {}
    for subject_id, sealed in wrapped.items():
        try:
            (opened[subject_id],) = open_under_wrapped_keys(packet_key, [sealed])
        except DecryptionFailed:
            opened[subject_id] = None
            logger.error(
                "an identity in packet %s failed its integrity check; it was withheld "
                "(member's subject id %d)",
                packet_id,
                subject_id,
            )
    return opened


@dataclass(frozen=True)
class OpenRequest:
    """One caller asking to re-identify one packet."""

    packet_id: str
    caller: Caller


# The open path's statements for a whole batch of packets, built once.
_PACKETS = (
    select(*(_packets.c[name] for name in _PacketRow.__dataclass_fields__))
    .where(_packets.c.id.in_(bindparam("packet_ids", expanding=True)))
    .order_by(_packets.c.id)
)
_LOCKED_PACKETS = _PACKETS.with_for_update()
# PostgreSQL: a packet whose row another transaction holds is left out rather than waited for.
_FREE_PACKETS = _PACKETS.with_for_update(skip_locked=True)
_BATCH_MEMBERS = (
    select(*_SEALED_MEMBER)
    .select_from(
        _members.join(_subjects, _subjects.c.id == _members.c.subject_id).join(
            _flags, _flags.c.id == _members.c.flag_id
        )
    )
    .where(_members.c.packet_id.in_(bindparam("packet_ids", expanding=True)))
    .order_by(_members.c.packet_id, _members.c.pseudonym)
)
_BATCH_FURTHER_FLAGS = (
    select(_member_flags.c.packet_id, _member_flags.c.subject_id, *_FLAG_ROW)
    .select_from(_member_flags.join(_flags, _flags.c.id == _member_flags.c.flag_id))
    .where(_member_flags.c.packet_id.in_(bindparam("packet_ids", expanding=True)))
    .order_by(_flags.c.id)
)
_MARK_OPENED = (
    update(_packets)
    .where(
        _packets.c.id.in_(bindparam("packet_ids", expanding=True)),
        _packets.c.status == "assigned",
    )
    .values(status="opened", opened_at=bindparam("opened_at"))
)


def _refusal(
    request: OpenRequest, packet: _PacketRow | None, now: datetime, ahead: timedelta
) -> tuple[str, ServiceError] | None:
    """Why ``request`` may not open ``packet`` (the denied entry's reason) and the error it gets:
    the same 404 whoever asks for a packet not theirs, or one that does not exist; 410 for the
    owner of a packet no longer in use. None when it may."""
    reason: str | None
    if packet is None:
        reason = "no such packet"
    elif (reason := _HIDDEN_FROM["packet.open"](packet, request.caller)) is None:
        why = _why_not_in_use(packet, now, ahead=ahead)
        return None if why is None else (f"packet is {why}", _gone(packet.id, why))
    return reason, PacketNotFound(f"no packet {request.packet_id} for this caller")


@dataclass
class _Contents:
    """What an open reveals of one packet, still sealed."""

    members: list[_SealedMember] = field(default_factory=list)
    followups: dict[str, list[_Followup]] = field(default_factory=dict)
    further_flags: dict[int, list[_FlagRow]] = field(default_factory=dict)


def _sealed_contents(connection: Connection, packet_ids: list[str]) -> dict[str, _Contents]:
    """The members (wraps, ciphertexts, characteristics, flags), follow-ups and further flags
    of these packets: three statements for any number of packets."""
    followups = _followups_of(connection, packet_ids)
    contents = {packet_id: _Contents(followups=followups[packet_id]) for packet_id in packet_ids}
    wanted = {"packet_ids": packet_ids}
    for row in connection.execute(_BATCH_MEMBERS, wanted).all():
        member = _SealedMember.from_row(row)
        contents[member.packet_id].members.append(member)
    for packet_id, subject_id, *fields in connection.execute(_BATCH_FURTHER_FLAGS, wanted).all():
        contents[packet_id].further_flags.setdefault(subject_id, []).append(_FlagRow(*fields))
    return contents


def open_packets(
    *,
    session: Session,
    requests: Sequence[OpenRequest],
    skip_locked: bool = False,
    deny_held: bool = False,
    deadline: float | None = None,
) -> list[SealedPacket | ServiceError]:
    """Log the re-identifications asked for; ``reveal`` then decrypts each allowed one.

    One outcome per request, in order, all in the caller's transaction: a packet that is not
    the caller's own (or that does not exist) is a logged denial and a ``PacketNotFound`` (404,
    the same for all); one closed, expired or shredded a logged denial and a ``PacketGone``
    (410); the rest are ``packet.open`` entries with the pseudonyms revealed, and
    ``SealedPacket``s (ciphertexts and wraps only). Every entry goes into the log with one
    append, the last statement: if it cannot be written within its bound, ``LogUnavailable``
    (503) is raised for all. Nothing is decrypted here: the caller commits, and only then calls
    ``reveal``, so no identity exists before its log entry is durable and the log's lock is not
    held while decrypting. A first open moves the packet to ``opened``. The packets are locked
    in id order (``FOR UPDATE`` on PostgreSQL), so a close, reassign, shred or erasure in
    progress commits first and none starts before this commits. With ``skip_locked`` a packet
    that another transaction holds is not waited for: its opens get ``PacketLocked`` and no entry
    (so one packet being changed holds up no other open of a batch; each then waits for it on
    its own, since the change may be a reassignment to the one asking). With ``deny_held`` too,
    for an open whose wait ran out, only its owner's opens get ``PacketLocked``: anyone else's
    are refused by the committed row, as for any packet not theirs (the same 404 as for a
    packet that does not exist, never a 503 that would say it exists).

    With a ``deadline`` (``time.monotonic()``), the locks waited for after the packets' rows wait
    only what is left of it (``LogUnavailable`` if nothing is), and a packet that will have
    expired by then is refused as expired: its entry, stamped under the log's lock, can never
    say it was opened after it expired.
    """
    connection = session.connection()
    asked = sorted({r.packet_id for r in requests})
    packets = {
        row[0]: _PacketRow(*row)
        for row in connection.execute(
            _FREE_PACKETS if skip_locked else _LOCKED_PACKETS, {"packet_ids": asked}
        ).all()
    }
    # Skipped (held elsewhere) or missing: with ``deny_held`` a held packet is judged by its
    # committed row, so whoever may not open it is refused now; otherwise every open of it waits.
    held: dict[str, _PacketRow] = {}
    if skip_locked and (unseen := [packet_id for packet_id in asked if packet_id not in packets]):
        held = {
            row[0]: _PacketRow(*row)
            for row in connection.execute(_PACKETS, {"packet_ids": unseen}).all()
        }
    now = utcnow()
    # By when the entry is stamped at the latest: the deadline, or a little after it when the
    # log's wait is not shortened (LOCK_WAIT_SLACK_SECONDS, below).
    ahead = (
        timedelta(seconds=max(0.0, deadline - time.monotonic()) + LOCK_WAIT_SLACK_SECONDS)
        if deadline
        else timedelta(0)
    )
    refusals = [
        _refusal(r, packets.get(r.packet_id) or held.get(r.packet_id), now, ahead) for r in requests
    ]
    # A caller who may open no packet at all is refused now, whatever the held row says.
    waits = [
        r.packet_id in held
        and r.caller.can(Permission.PACKETS_OPEN)
        and (not deny_held or no is None or not isinstance(no[1], PacketNotFound))
        for r, no in zip(requests, refusals, strict=True)
    ]
    allowed = sorted(
        {
            r.packet_id
            for r, no, wait in zip(requests, refusals, waits, strict=True)
            if not (no or wait)
        }
    )
    contents = _sealed_contents(connection, allowed) if allowed else {}
    # A refusal names the pseudonyms it would have revealed, when the packet exists.
    refused = {
        r.packet_id
        for r, no, wait in zip(requests, refusals, waits, strict=True)
        if no and not wait
    }
    refused_members: dict[str, list[str]] = {}
    if refused_known := sorted(p for p in refused if p in packets or p in held):
        refused_members = _pseudonyms_of(connection, refused_known)
    if assigned := [packet_id for packet_id in allowed if packets[packet_id].status == "assigned"]:
        connection.execute(_MARK_OPENED, {"packet_ids": assigned, "opened_at": now})
        for packet_id in assigned:
            packets[packet_id] = replace(packets[packet_id], status="opened", opened_at=now)

    outcomes: list[SealedPacket | ServiceError] = []
    entries = []
    for request, refusal, wait in zip(requests, refusals, waits, strict=True):
        packet_id = request.packet_id
        outcome: Outcome
        reason: str | None
        if wait:
            outcomes.append(PacketLocked(packet_id))
            continue
        if refusal is not None:
            reason, error = refusal
            outcome, pseudonyms = "denied", refused_members.get(packet_id, [])
            outcomes.append(error)
        else:
            packet, sealed = packets[packet_id], contents[packet_id]
            pseudonyms = [
                m.pseudonym
                for m in sealed.members
                if m.wrapped_dek is not None and m.identity_ciphertext is not None
            ]
            erased = len(sealed.members) - len(pseudonyms)
            outcome, reason = "allowed", f"{erased} erased members not revealed" if erased else None
            outcomes.append(
                SealedPacket(
                    packet=_packet_public(packet, len(sealed.members)),
                    wrapped_key=_packet_key_wrap(packet),
                    members=sealed.members,
                    followups=sealed.followups,
                    further_flags=sealed.further_flags,
                )
            )
        entries.append(
            LogEntry.by(
                request.caller,
                action="packet.open",
                object_type="packet",
                object_id=packet_id,
                outcome=outcome,
                pseudonyms=pseudonyms,
                reason=reason,
            )
        )
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise LogUnavailable(
                "the packet or the access log is busy; the request was not carried out, try again"
            )
        # The transaction began with its waits bounded by what was left then; only a wait for a
        # packet's row since (rare) is worth a round trip to shorten the log's.
        began_with = connection.get_execution_options().get(LOG_LOCK_TIMEOUT_OPTION, left)
        if began_with - left > LOCK_WAIT_SLACK_SECONDS:
            limit_lock_waits(connection, left)
    # Last statement before the commit: the log's lock is held only for the append itself.
    append_many(session=session, entries=entries)
    return outcomes


# A follow-up's date: recorded work may reach back before the packet (a contact the month
# before), a planned appointment lies ahead; a date far outside is a typo (0001, 9999).
FOLLOWUP_DAYS_BEFORE_PACKET = 366
FOLLOWUP_DAYS_AHEAD = 731


def _followup_refusal(
    policy: FollowupPolicy, given: FollowupCreate, packet: _PacketRow
) -> tuple[str, str] | None:
    """The field and the reason a follow-up is refused, or None: an outcome code that does not
    fit its kind, or a date outside the packet's time."""
    problem = policy.check(kind=given.kind, outcome_code=given.outcome_code)
    if problem is not None:
        return "outcome_code", problem
    # Days as the municipality counts them (CASEPACKETS_TIMEZONE), whatever zone the database
    # hands the packet's time back in.
    made = as_utc(packet.created_at).astimezone(clock.zone()).date()
    earliest = made - timedelta(days=FOLLOWUP_DAYS_BEFORE_PACKET)
    latest = clock.today() + timedelta(days=FOLLOWUP_DAYS_AHEAD)
    if not earliest <= given.date <= latest:
        return "date", (
            f"date must lie between {earliest.isoformat()} (a year before the packet was made) "
            f"and {latest.isoformat()} (two years from today)"
        )
    return None


def _followup_digest(
    packet_key: DataKey, *, packet_id: str, pseudonym: str, given: FollowupCreate
) -> str:
    """What a follow-up request asked for, as an HMAC under its packet key: it matches a
    request sent again, and says nothing of the note (nor outlives the packet's key)."""
    asked = json.dumps(
        {
            "packet": packet_id,
            "client": pseudonym,
            "kind": given.kind,
            "date": given.date.isoformat(),
            "outcome_code": given.outcome_code,
            "note": given.note,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    message = b"casepackets/followup-request/v1\x00" + asked.encode("utf-8")
    return hmac.new(packet_key.material, message, hashlib.sha256).hexdigest()


# The follow-up a caller recorded under an Idempotency-Key.
_STORED_FOLLOWUP = select(
    _followups.c.id, _followups.c.request_digest, _followups.c.created_at
).where(
    _followups.c.created_by == bindparam("by"),
    _followups.c.idempotency_key == bindparam("key"),
)


def create_followup(
    *,
    session: Session,
    keyring: KeyProvider,
    policy: FollowupPolicy,
    packet_id: str,
    pseudonym: str,
    given: FollowupCreate,
    caller: Caller,
    idempotency_key: str | None = None,
) -> FollowupPublic:
    """Record a follow-up for one client of the caller's own open packet (logged, note never).

    The note is sealed under the packet key, bound to this follow-up, packet and client. With
    an ``idempotency_key`` (per caller), the same request sent again gets the follow-up it
    recorded the first time (logged again, not recorded twice); another request under that key
    is refused (409, logged as denied).
    """
    packet = _owned_packet(
        session,
        packet_id=packet_id,
        caller=caller,
        action="followup.create",
    )
    _in_use(session, packet=packet, caller=caller, action="followup.create")
    refusal = _followup_refusal(policy, given, packet)
    if refusal is not None:
        field_name, problem = refusal
        _deny(
            session,
            caller=caller,
            action="followup.create",
            packet_id=packet_id,
            reason=problem,
            pseudonyms=[pseudonym],
        )
        raise FollowupRefused(problem, errors=[{"loc": [field_name], "msg": problem}])
    # FOR SHARE (PostgreSQL): an erasure removing this member's wrap waits until the note is
    # committed, so it finds and removes the note too; one that came first leaves no wrap here.
    began = time.monotonic()
    member = session.execute(
        select(_members.c.subject_id, _members.c.wrapped_dek)
        .where(_members.c.packet_id == packet_id, _members.c.pseudonym == pseudonym)
        .with_for_update(read=True)
    ).first()
    spend_lock_wait(session.connection(), time.monotonic() - began)
    if member is None or member.wrapped_dek is None:
        _deny(
            session,
            caller=caller,
            action="followup.create",
            packet_id=packet_id,
            reason="not a client of the packet" if member is None else "client was erased",
            pseudonyms=[pseudonym],
        )
        if member is None:
            raise ClientNotInPacket(f"packet {packet_id} has no client with this pseudonym")
        raise ClientErased("this client was erased; no follow-up can be recorded for them")

    # Unwrapped once, and only for what needs it: the note, and the digest under a key.
    packet_key = _packet_key(keyring, packet) if given.note or idempotency_key is not None else None
    digest = None
    if idempotency_key is not None and packet_key is not None:
        digest = _followup_digest(packet_key, packet_id=packet_id, pseudonym=pseudonym, given=given)
        stored = session.execute(
            _STORED_FOLLOWUP, {"by": caller.sub, "key": idempotency_key}
        ).first()
        if stored is not None:
            return _followup_sent_again(
                session,
                stored=stored,
                digest=digest,
                packet_id=packet_id,
                pseudonym=pseudonym,
                given=given,
                caller=caller,
            )

    followup_id = uuid.uuid4().hex
    note_ciphertext = None
    if given.note and packet_key is not None:
        note_ciphertext = seal(
            packet_key,
            given.note.encode("utf-8"),
            aad=note_aad(
                followup_id, packet_id, member.subject_id, pseudonym, binding=NOTE_BOUND_TO_CLIENT
            ),
        )
    now = utcnow()
    row = insert(_followups).values(
        id=followup_id,
        packet_id=packet_id,
        subject_id=member.subject_id,
        pseudonym=pseudonym,
        kind=given.kind,
        date=given.date,
        outcome_code=given.outcome_code,
        note_ciphertext=note_ciphertext,
        note_binding=NOTE_BOUND_TO_CLIENT if note_ciphertext is not None else None,
        created_by=caller.sub,
        created_at=now,
        idempotency_key=idempotency_key,
        request_digest=digest,
    )
    try:
        # A savepoint: this transaction stays usable if another request with the same key
        # committed since the look-up above. That request was for another packet (requests for
        # one packet take its lock in turn), so it is judged as any stored one: a logged 409.
        with session.begin_nested():
            session.connection().execute(row)
    except IntegrityError:
        if idempotency_key is None or digest is None:
            raise
        return _followup_sent_again(
            session,
            stored=session.execute(
                _STORED_FOLLOWUP, {"by": caller.sub, "key": idempotency_key}
            ).one(),
            digest=digest,
            packet_id=packet_id,
            pseudonym=pseudonym,
            given=given,
            caller=caller,
        )
    _log_packet(
        session,
        caller=caller,
        action="followup.create",
        packet_id=packet_id,
        pseudonyms=[pseudonym],
        reason=f"followup {followup_id}; kind {given.kind}; outcome {given.outcome_code or '-'}",
    )
    return _followup_public(given, followup_id=followup_id, created_at=now, caller=caller)


def _followup_public(
    given: FollowupCreate, *, followup_id: str, created_at: datetime, caller: Caller
) -> FollowupPublic:
    """The owner's view of the follow-up ``given`` recorded (or recorded before, when sent
    again): what was asked, with its id and time."""
    return FollowupPublic(
        id=followup_id,
        kind=given.kind,
        date=given.date,
        outcome_code=given.outcome_code,
        created_at=created_at,
        note=given.note,
        created_by=caller.sub,
    )


def _followup_sent_again(
    session: Session,
    *,
    stored: Any,
    digest: str,
    packet_id: str,
    pseudonym: str,
    given: FollowupCreate,
    caller: Caller,
) -> FollowupPublic:
    """The follow-up a request sent again recorded the first time (logged), or a 409 (logged as
    denied) when the caller's key was used for another request."""
    if stored.request_digest is None or not hmac.compare_digest(stored.request_digest, digest):
        _deny(
            session,
            caller=caller,
            action="followup.create",
            packet_id=packet_id,
            reason="Idempotency-Key used for another follow-up",
            pseudonyms=[pseudonym],
        )
        raise FollowupKeyReused(
            "this Idempotency-Key was used for a different follow-up; use a new key"
        )
    _log_packet(
        session,
        caller=caller,
        action="followup.create",
        packet_id=packet_id,
        pseudonyms=[pseudonym],
        reason=f"followup {stored.id}; sent again, not recorded twice",
    )
    return _followup_public(
        given, followup_id=stored.id, created_at=stored.created_at, caller=caller
    )


def close_packet(*, session: Session, packet_id: str, caller: Caller) -> PacketPublic:
    """Close a packet (its owner, or anyone with ``packets.close_any``); logged.

    It stays readable as metadata and is crypto-shredded after the retention policy's grace.
    """
    packet = _owned_packet(
        session,
        packet_id=packet_id,
        caller=caller,
        action="packet.close",
    )
    why = _why_not_in_use(packet, utcnow())
    members = _pseudonyms_of(session, [packet_id])[packet_id]
    if why is not None:
        _deny(
            session,
            caller=caller,
            action="packet.close",
            packet_id=packet_id,
            reason=f"packet is {why}",
            pseudonyms=members,
        )
        if why == "closed":
            raise PacketNotClosable(f"packet {packet_id} is already closed")
        raise PacketGone(f"packet {packet_id} is {why}")
    packet = _update_packet(session, packet, status="closed", closed_at=utcnow())
    _log_packet(
        session,
        caller=caller,
        action="packet.close",
        packet_id=packet_id,
        pseudonyms=members,
    )
    return _packet_public(packet, len(members))


def _due_condition(*, retention: RetentionPolicy, now: datetime) -> Any:
    grace_cutoff = now - timedelta(days=retention.closed_grace_days)
    return and_(
        _packets.c.shredded_at.is_(None),
        or_(
            _past_expiry(now),
            and_(
                _packets.c.status == "closed",
                or_(_packets.c.closed_at <= grace_cutoff, _packets.c.expires_at <= now),
            ),
        ),
    )


def count_due_for_shredding(*, session: Session, retention: RetentionPolicy, now: datetime) -> int:
    return int(
        session.execute(
            select(func.count())
            .select_from(_packets)
            .where(_due_condition(retention=retention, now=now))
        ).scalar_one()
    )


def shred_due(
    *,
    session: Session,
    retention: RetentionPolicy,
    now: datetime,
    actor: str,
    limit: int = 100,
) -> list[str]:
    """Crypto-shred up to ``limit`` due packets in this transaction; returns their ids.

    Due: open packets past ``expires_at`` (→ ``expired``) and closed packets past the grace
    period or their expiry (→ ``shredded``). The packet key wrap, the members' DEK wraps and the
    follow-up notes become NULL; each shred is logged as ``packet.shred``. Rows another worker
    is handling are skipped (PostgreSQL ``SKIP LOCKED``), so concurrent shredders never collide.
    """
    due = session.execute(
        select(_packets.c.id, _packets.c.status, _packets.c.expires_at, _packets.c.closed_at)
        .where(_due_condition(retention=retention, now=now))
        .order_by(_packets.c.expires_at, _packets.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    ).all()
    if not due:
        return []
    ids = [row.id for row in due]
    connection = session.connection()
    members: dict[str, list[str]] = {}
    for packet_id, pseudonym in connection.execute(
        select(_members.c.packet_id, _members.c.pseudonym)
        .where(_members.c.packet_id.in_(ids))
        .order_by(_members.c.packet_id, _members.c.pseudonym)
    ):
        members.setdefault(packet_id, []).append(pseudonym)
    for new_status, group in (
        ("expired", [r.id for r in due if r.status in OPEN_STATUSES]),
        ("shredded", [r.id for r in due if r.status == "closed"]),
    ):
        if group:
            connection.execute(
                update(_packets)
                .where(_packets.c.id.in_(group))
                .values(status=new_status, wrapped_key=None, shredded_at=now)
            )
    # Same order as the erasure hook (members, then follow-ups): no lock cycle between them.
    connection.execute(
        update(_members).where(_members.c.packet_id.in_(ids)).values(wrapped_dek=None)
    )
    connection.execute(
        update(_followups).where(_followups.c.packet_id.in_(ids)).values(note_ciphertext=None)
    )
    request_purge(session)
    grace_cutoff = now - timedelta(days=retention.closed_grace_days)
    for row in due:
        # A closed packet may come due by its expiry before its grace period ends: the entry
        # names what made it due.
        if row.status == "closed" and as_utc(row.closed_at) <= as_utc(grace_cutoff):
            closed = as_utc(row.closed_at).isoformat()
            reason = f"closed {closed}; grace {retention.closed_grace_days} days"
        else:
            reason = f"expired {as_utc(row.expires_at).isoformat()}"
        append(
            session=session,
            entry=LogEntry(
                actor=actor,
                role="system",
                action="packet.shred",
                object_type="packet",
                object_id=row.id,
                pseudonyms=tuple(members.get(row.id, ())),
                reason=reason,
            ),
        )
    session.flush()
    return ids


def _bring_forward(
    *, session: Session, packet_ids: list[str], retention: RetentionPolicy, actor: str
) -> int:
    """Move the expiry of those of ``packet_ids`` built longer than ``packet_ttl_days`` before it
    to ``created_at + packet_ttl_days``, judged under the packets' locks; one ``packet.expiry``
    entry per packet moved. A packet another transaction holds is skipped (PostgreSQL), not
    waited for. Returns how many were moved."""
    # Locked in id order, as an open, a close or an erasure locks them: no lock cycle. A packet
    # another worker moved or shredded meanwhile is judged as it is now, so it is moved once.
    rows = session.execute(
        select(_packets.c.id, _packets.c.created_at, _packets.c.expires_at)
        .where(_packets.c.id.in_(packet_ids), _packets.c.shredded_at.is_(None))
        .order_by(_packets.c.id)
        .with_for_update(skip_locked=True)  # one a request holds is left for the next pass
    ).all()
    moves = [
        (row.id, as_utc(row.expires_at).astimezone(UTC), due)
        for row in rows
        if (due := _expiry_under(retention, row.created_at, row.expires_at)) is not None
    ]
    if not moves:
        return 0
    session.connection().execute(
        update(_packets)
        .where(_packets.c.id == bindparam("packet_id"))
        .values(expires_at=bindparam("new_expiry")),
        [{"packet_id": packet_id, "new_expiry": new} for packet_id, _old, new in moves],
    )
    append_many(
        session=session,
        entries=[
            LogEntry(
                actor=actor,
                role="system",
                action="packet.expiry",
                object_type="packet",
                object_id=packet_id,
                reason=(
                    f"expires {new.isoformat()}, not {old.isoformat()}: packet_ttl_days "
                    f"{retention.packet_ttl_days} (retention policy version {retention.version})"
                ),
            )
            for packet_id, old, new in moves
        ],
    )
    session.flush()
    return len(moves)


@dataclass(frozen=True)
class BroughtForward:
    moved: int
    left: int  # late packets a request held meanwhile (PostgreSQL): a later pass moves them


def _expiry_under(
    retention: RetentionPolicy, created_at: datetime, expires_at: datetime
) -> datetime | None:
    """The earlier expiry ``packet_ttl_days`` gives a packet built at ``created_at`` (in UTC),
    or None when ``expires_at`` is not later than that."""
    due = as_utc(created_at).astimezone(UTC) + timedelta(days=retention.packet_ttl_days)
    return due if as_utc(expires_at) > due else None


def _late_packet_ids(session: Session, retention: RetentionPolicy) -> list[str]:
    """Packets not yet shredded whose expiry lies more than ``packet_ttl_days`` after they were
    built, in id order."""
    rows = session.execute(
        select(_packets.c.id, _packets.c.created_at, _packets.c.expires_at).where(
            _packets.c.status.in_((*OPEN_STATUSES, "closed")),
            _packets.c.shredded_at.is_(None),
        )
    ).all()
    return sorted(
        row.id
        for row in rows
        if _expiry_under(retention, row.created_at, row.expires_at) is not None
    )


def bring_expiries_forward(
    *, database: Database, retention: RetentionPolicy, actor: str, batch_size: int = 1000
) -> BroughtForward:
    """Apply ``packet_ttl_days`` to the packets already built: a packet not yet shredded whose
    ``expires_at`` lies more than ``packet_ttl_days`` after its ``created_at`` gets
    ``created_at + packet_ttl_days`` as its expiry. Returns how many packets.

    So ``expires_at`` stays the one truth that opens, follow-ups, listings and the shredder read,
    and a lowered TTL (a legal limit) reaches every packet; an expiry only ever moves earlier, so
    a raised TTL extends none. Each move is logged as ``packet.expiry`` (the packet's id, the old
    and new expiry and the policy: no pseudonym, nothing is revealed or destroyed by it).

    A job, run once per start of the service (the policies are read then; until it has run
    through, each shredding round tries again) and by ``casepackets expire``, never in every
    round: during a rolling deploy that raises the TTL, workers still on the old policy would
    otherwise shorten the packets the new ones build. The packets are found by a read, then
    moved ``batch_size`` per committed transaction, locked and judged again under their locks,
    so several workers running it at once move and log each packet once.
    """
    with database.reading() as session:
        late = _late_packet_ids(session, retention)
    moved = 0
    for start in range(0, len(late), batch_size):
        with database.transaction() as session:
            moved += _bring_forward(
                session=session,
                packet_ids=late[start : start + batch_size],
                retention=retention,
                actor=actor,
            )
    if moved == len(late):
        return BroughtForward(moved=moved, left=0)
    with database.reading() as session:
        return BroughtForward(moved=moved, left=len(_late_packet_ids(session, retention)))


def shred_expired(
    *,
    database: Database,
    retention: RetentionPolicy,
    actor: str,
    batch_size: int = 100,
    now: datetime | None = None,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """The shredding job: every due packet, ``batch_size`` per committed transaction.

    A job, not a request: it owns its transactions (one per batch), so an interruption loses at
    most one batch and a rerun continues. When it shredded anything it ends, even when
    interrupted, by purging the overwritten row versions (``Database.purge_replaced_rows``).
    Returns how many packets it shredded. On PostgreSQL a due packet that a request or another
    shredder holds is skipped, not waited for: ``count_due_for_shredding`` afterwards tells.
    """
    moment = now or utcnow()
    if on_start is not None:
        with database.transaction() as session:
            on_start(count_due_for_shredding(session=session, retention=retention, now=moment))
    total = 0
    try:
        while True:
            with database.transaction() as session:
                shredded = shred_due(
                    session=session, retention=retention, now=moment, actor=actor, limit=batch_size
                )
            if not shredded:
                return total
            total += len(shredded)
            if on_progress is not None:
                on_progress(len(shredded))
    finally:
        if total:
            database.purge_replaced_rows()


def forget_old_replays(
    *, database: Database, retention: RetentionPolicy, now: datetime | None = None
) -> int:
    """Forget what Idempotency-Keys kept (digests, and ingest answers listing pseudonyms) of
    batches and pushes older than ``retention.idempotency_days``: a retry comes within minutes,
    and nothing else needs them. Purges the overwritten row versions when it forgot any.
    Returns how many batches and pushes."""
    before = (now or utcnow()) - timedelta(days=retention.idempotency_days)
    with database.transaction() as session:
        forgotten = forget_batch_answers(session=session, before=before)
        forgotten += forget_push_digests(session=session, before=before)
    if forgotten:
        database.purge_replaced_rows()
    return forgotten


def apply_lowered_ttl(*, database: Database, retention: RetentionPolicy, actor: str) -> bool:
    """``bring_expiries_forward`` as the service runs it (at start-up, then in the shredding
    rounds until it has run through): what it did, or why it failed, goes to the server log,
    and no failure escapes. Returns whether it is still pending (it failed, or left packets a
    request held)."""
    try:
        brought = bring_expiries_forward(database=database, retention=retention, actor=actor)
    except Exception as exc:
        logger.warning(
            "could not apply packet_ttl_days to the packets built before start-up (%s); the next "
            "shredding round or `casepackets expire` will",
            type(exc).__name__,
        )
        return True
    if brought.moved:
        logger.info("brought the expiry of %d packets forward (packet_ttl_days)", brought.moved)
    if brought.left:
        logger.warning(
            "%d packets past packet_ttl_days were in use; the next shredding round moves them",
            brought.left,
        )
    return brought.left > 0


def _shredding_round(
    *, database: Database, retention: RetentionPolicy, expiries_pending: bool
) -> tuple[int, bool]:
    """One round: the start-up's ``bring_expiries_forward`` first while it has not run through,
    then the shredding job. Returns how many packets were shredded, and whether expiries are
    still pending."""
    if expiries_pending:  # a failure here leaves the round's shredding to run
        expiries_pending = apply_lowered_ttl(
            database=database, retention=retention, actor="system:shredder"
        )
    shredded = shred_expired(database=database, retention=retention, actor="system:shredder")
    forget_old_replays(database=database, retention=retention)
    database.purge_replaced_rows()
    return shredded, expiries_pending


async def shred_periodically(
    *,
    database: Database,
    retention: RetentionPolicy,
    interval_seconds: float,
    expiries_pending: bool = False,
) -> None:
    """Run the shredding job, then ``forget_old_replays``, every ``interval_seconds`` in a
    worker thread, until cancelled. With ``expiries_pending`` (the start-up's
    ``bring_expiries_forward`` failed, or left packets a request held), each round runs it
    first until it has run through.

    A failed run (database busy, log unavailable) is logged by type and retried next time.
    Each run also finishes a purge still pending from an earlier overwrite (a reader held it
    up), whichever worker or command asked for it (``request_purge``). Cancelled during a run,
    it returns once the run's thread has ended: a thread cannot be stopped, and the caller
    (the service shutting down) disposes of the database next.
    """
    while True:
        await asyncio.sleep(interval_seconds)
        in_flight = asyncio.ensure_future(
            asyncio.to_thread(
                _shredding_round,
                database=database,
                retention=retention,
                expiries_pending=expiries_pending,
            )
        )
        try:
            shredded, expiries_pending = await asyncio.shield(in_flight)
        except asyncio.CancelledError:
            await asyncio.wait([in_flight])
            raise
        except Exception as exc:
            logger.warning(
                "periodic crypto-shredding failed (%s); retrying later", type(exc).__name__
            )
            continue
        if shredded:
            logger.info("crypto-shredded %d packets", shredded)
