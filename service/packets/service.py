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
  an erased subject, or one nobody can take is returned as unplaced with the reason;
- a professional sees only packets assigned to them; anyone else without ``packets.read_all``
  gets 404 for a packet (its existence is not revealed) and the attempt is logged as denied;
- reassignment changes the owner in place, so the former owner loses access with the commit.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, insert, or_, select, update
from sqlmodel import Session

from service.access_log.service import LogEntry, append
from service.auth.dependencies import Caller
from service.auth.permissions import Permission
from service.crypto.envelope import AadValue, DataKey, unwrap_key, wrap_key, wrap_under
from service.crypto.keyring import KeyProvider
from service.errors import Conflict, NotFound, Unprocessable
from service.flagging.models import Flag
from service.flagging.service import get_run
from service.packets import partition as partitioning
from service.packets.models import (
    OPEN_STATUSES,
    Packet,
    PacketDetailPublic,
    PacketMember,
    PacketMemberPublic,
    PacketPublic,
    PartitionPublic,
    Professional,
    ProfessionalCreate,
    ProfessionalPublic,
    ProfessionalUpdate,
    UnplacedCasePublic,
    utcnow,
)
from service.packets.policy import RetentionPolicy
from service.records.models import Subject
from service.records.service import dek_aad, register_erasure_hook

ERASED = "the subject was erased"
MAX_PAGE = 1000

_subjects = Subject.__table__  # type: ignore[attr-defined]
_flags = Flag.__table__  # type: ignore[attr-defined]
_packets = Packet.__table__  # type: ignore[attr-defined]
_members = PacketMember.__table__  # type: ignore[attr-defined]
_professionals = Professional.__table__  # type: ignore[attr-defined]


class ProfessionalNotFound(NotFound):
    pass


class ProfessionalExists(Conflict):
    pass


class PacketNotFound(NotFound):
    # A non-owner's attempt is logged as denied; the entry must survive the 404.
    commit_before_raising = True


class PacketNotReassignable(Conflict):
    pass


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


def _erase_member_wraps(session: Session, subject_id: int) -> int:
    """Erasure hook: a subject's DEK under any packet key is deleted with the subject."""
    result = session.connection().execute(
        update(_members)
        .where(_members.c.subject_id == subject_id, _members.c.wrapped_dek.is_not(None))
        .values(wrapped_dek=None)
    )
    session.flush()
    return int(result.rowcount or 0)


register_erasure_hook(_erase_member_wraps)


# -- professionals ----------------------------------------------------------------------------


def open_loads(
    *, session: Session, professional_ids: Sequence[str] | None = None
) -> dict[str, int]:
    """Clients in open packets, per professional."""
    query = (
        select(_packets.c.professional_id, func.count())
        .select_from(_members.join(_packets, _packets.c.id == _members.c.packet_id))
        .where(_packets.c.status.in_(OPEN_STATUSES))
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


def get_professional(*, session: Session, professional_id: str) -> Professional:
    professional = session.get(Professional, professional_id)
    if professional is None:
        raise ProfessionalNotFound(f"no professional {professional_id!r}")
    return professional


def create_professional(*, session: Session, given: ProfessionalCreate) -> ProfessionalPublic:
    if session.get(Professional, given.id) is not None:
        raise ProfessionalExists(f"professional {given.id!r} already exists; use PATCH to change")
    professional = Professional(
        id=given.id,
        display_name=given.display_name,
        team=given.team,
        districts=given.districts,
        capacity=given.capacity,
    )
    session.add(professional)
    session.flush()
    return _professional_public(professional, 0)


def list_professionals(
    *, session: Session, team: str | None = None, active: bool | None = None
) -> list[ProfessionalPublic]:
    query = select(Professional).order_by(_professionals.c.id)
    if team is not None:
        query = query.where(_professionals.c.team == team)
    if active is not None:
        query = query.where(_professionals.c.active == active)
    professionals = list(session.execute(query).scalars())
    loads = open_loads(session=session)
    return [_professional_public(p, loads.get(p.id, 0)) for p in professionals]


def update_professional(
    *, session: Session, professional_id: str, changes: ProfessionalUpdate
) -> ProfessionalPublic:
    professional = get_professional(session=session, professional_id=professional_id)
    for name, value in changes.model_dump(exclude_unset=True).items():
        if value is None:
            raise Unprocessable(f"{name} may not be null", errors=[{"loc": [name], "msg": "null"}])
        setattr(professional, name, value)
    professional.updated_at = utcnow()
    session.add(professional)
    session.flush()
    load = open_loads(session=session, professional_ids=[professional.id]).get(professional.id, 0)
    return _professional_public(professional, load)


def deactivate_professional(*, session: Session, professional_id: str) -> ProfessionalPublic:
    """No new packets go to them; their open packets stay theirs until reassigned."""
    return update_professional(
        session=session, professional_id=professional_id, changes=ProfessionalUpdate(active=False)
    )


# -- partitioning -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Candidate:
    flag_id: int
    subject_id: int
    pseudonym: str
    district: str
    wrapped_dek: str | None


def _candidates(session: Session, run_id: str) -> list[_Candidate]:
    """One flag per subject: the run's flags, then external flags not yet in any packet."""
    in_a_packet = exists().where(_members.c.flag_id == _flags.c.id)
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
                _flags.c.run_id == run_id,
                and_(_flags.c.kind == "external", ~in_a_packet),
            )
        )
        .order_by(_flags.c.id)
    ).all()
    chosen: dict[int, _Candidate] = {}
    from_run: set[int] = set()
    for flag_id, subject_id, flag_run, pseudonym, district, wrapped_dek in rows:
        if subject_id in chosen and (subject_id in from_run or flag_run != run_id):
            continue
        chosen[subject_id] = _Candidate(flag_id, subject_id, pseudonym, district, wrapped_dek)
        if flag_run == run_id:
            from_run.add(subject_id)
    return list(chosen.values())


def _member_history(
    session: Session, run_id: str, subject_ids: set[int]
) -> tuple[set[int], dict[int, str]]:
    """Subjects in an open packet now, and the professional of each subject's latest packet."""
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
            _packets.c.created_at,
        )
        .select_from(_members.join(_packets, _packets.c.id == _members.c.packet_id))
        .where(_members.c.subject_id.in_(candidates))
    )
    for subject_id, professional_id, status, created_at in rows:
        if subject_id not in subject_ids:
            continue
        if status in OPEN_STATUSES:
            in_open.add(subject_id)
        known = latest.get(subject_id)
        if known is None or (created_at, professional_id) > known:
            latest[subject_id] = (created_at, professional_id)
    return in_open, {subject_id: found[1] for subject_id, found in latest.items()}


def _team(session: Session) -> list[partitioning.Professional]:
    loads = open_loads(session=session)
    return [
        partitioning.Professional(
            id=p.id,
            districts=frozenset(p.districts),
            capacity=p.capacity,
            open_load=loads.get(p.id, 0),
            active=p.active,
        )
        for p in session.execute(select(Professional)).scalars()
    ]


def _packet_public(row: Any, member_count: int) -> PacketPublic:
    return PacketPublic(
        id=row.id,
        run_id=row.run_id,
        professional_id=row.professional_id,
        district=row.district,
        status=row.status,
        member_count=member_count,
        created_at=row.created_at,
        expires_at=row.expires_at,
        closed_at=row.closed_at,
    )


def partition_run(
    *,
    session: Session,
    keyring: KeyProvider,
    run_id: str,
    packet_size: int,
    retention: RetentionPolicy,
    caller: Caller,
) -> PartitionPublic:
    """Split a run's flagged cases into packets, build their keys and assign them (one txn)."""
    get_run(session=session, run_id=run_id)
    candidates = _candidates(session, run_id)
    in_open, previous = _member_history(session, run_id, {c.subject_id for c in candidates})
    erased = [c for c in candidates if c.wrapped_dek is None]
    placeable = {c.pseudonym: (c, c.wrapped_dek) for c in candidates if c.wrapped_dek is not None}
    plan = partitioning.partition(
        (
            partitioning.Case(
                pseudonym=c.pseudonym,
                district=c.district,
                previous_professional=previous.get(c.subject_id),
                in_open_packet=c.subject_id in in_open,
            )
            for c, _wrapped in placeable.values()
        ),
        _team(session),
        packet_size=packet_size,
    )

    now = utcnow()
    expires_at = now + timedelta(days=retention.packet_ttl_days)
    packet_rows: list[dict[str, Any]] = []
    member_rows: list[dict[str, Any]] = []
    created: list[PacketPublic] = []
    for planned in plan.packets:
        packet_id = str(uuid.uuid4())
        packet_key = DataKey.generate()
        packet_rows.append(
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
                "wrapped_key": wrap_key(
                    keyring, "packet", packet_key, aad=packet_key_aad(packet_id)
                ),
            }
        )
        for pseudonym in planned.pseudonyms:
            member, vault_wrapped_dek = placeable[pseudonym]
            dek = unwrap_key(keyring, "vault", vault_wrapped_dek, aad=dek_aad(pseudonym))
            member_rows.append(
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
        created.append(
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
    connection = session.connection()
    if packet_rows:
        connection.execute(insert(_packets), packet_rows)
    for start in range(0, len(member_rows), 5000):
        connection.execute(insert(_members), member_rows[start : start + 5000])

    for packet, planned in zip(created, plan.packets, strict=True):
        for action in ("packet.build", "packet.assign"):
            append(
                session=session,
                entry=LogEntry.by(
                    caller,
                    action=action,
                    object_type="packet",
                    object_id=packet.id,
                    pseudonyms=planned.pseudonyms,
                    reason=f"run {run_id}; professional {planned.professional_id}"
                    if action == "packet.assign"
                    else f"run {run_id}; district {planned.district}",
                ),
            )
    unplaced = [
        UnplacedCasePublic(pseudonym=u.pseudonym, district=u.district, reason=u.reason)
        for u in plan.unplaced
    ] + [
        UnplacedCasePublic(pseudonym=c.pseudonym, district=c.district, reason=ERASED)
        for c in erased
    ]
    return PartitionPublic(
        run_id=run_id, packet_size=packet_size, packets=created, unplaced=unplaced
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


def list_packets(
    *,
    session: Session,
    caller: Caller,
    status: str | None = None,
    professional_id: str | None = None,
    offset: int = 0,
    limit: int = 100,
) -> tuple[list[PacketPublic], int | None]:
    """Own packets for a professional; all (optionally one professional's) with read_all."""
    limit = max(1, min(limit, MAX_PAGE))
    query = select(_packets).order_by(_packets.c.created_at.desc(), _packets.c.id)
    if not _sees_all(caller):
        query = query.where(_packets.c.professional_id == caller.sub)
    elif professional_id is not None:
        query = query.where(_packets.c.professional_id == professional_id)
    if status is not None:
        query = query.where(_packets.c.status == status)
    rows = session.execute(query.offset(offset).limit(limit + 1)).all()
    page = rows[:limit]
    counts = _member_counts(session, [row.id for row in page])
    items = [_packet_public(row, counts.get(row.id, 0)) for row in page]
    return items, (offset + limit if len(rows) > limit else None)


def _visible_packet(session: Session, *, packet_id: str, caller: Caller, action: str) -> Packet:
    packet = session.get(Packet, packet_id)
    if packet is None or (not _sees_all(caller) and packet.professional_id != caller.sub):
        pseudonyms: list[str] = []
        if packet is not None:
            pseudonyms = list(
                session.execute(
                    select(_members.c.pseudonym)
                    .where(_members.c.packet_id == packet_id)
                    .order_by(_members.c.pseudonym)
                ).scalars()
            )
        append(
            session=session,
            entry=LogEntry.by(
                caller,
                action=action,
                object_type="packet",
                object_id=packet_id,
                outcome="denied",
                pseudonyms=pseudonyms,
                reason="no such packet" if packet is None else "not the packet's owner",
            ),
        )
        raise PacketNotFound(f"no packet {packet_id} for this caller")
    return packet


def get_packet(*, session: Session, packet_id: str, caller: Caller) -> PacketDetailPublic:
    packet = _visible_packet(session, packet_id=packet_id, caller=caller, action="packet.read")
    rows = session.execute(
        select(_members.c.pseudonym, _flags.c.kind)
        .select_from(_members.join(_flags, _flags.c.id == _members.c.flag_id))
        .where(_members.c.packet_id == packet_id)
        .order_by(_members.c.pseudonym)
    ).all()
    summary = _packet_public(packet, len(rows))
    return PacketDetailPublic(
        **summary.model_dump(),
        members=[PacketMemberPublic(pseudonym=p, flag_kind=kind) for p, kind in rows],
    )


def reassign_packet(
    *, session: Session, packet_id: str, professional_id: str, caller: Caller
) -> PacketPublic:
    """Give an open packet to another active professional who serves its district and has room."""
    packet = session.execute(
        select(Packet).where(Packet.id == packet_id).with_for_update()  # type: ignore[arg-type]
    ).scalar_one_or_none()
    if packet is None:
        raise NotFound(f"no packet {packet_id}")
    if packet.status not in OPEN_STATUSES:
        raise PacketNotReassignable(
            f"packet {packet_id} is {packet.status}; only open packets move"
        )
    target = get_professional(session=session, professional_id=professional_id)
    if not target.active:
        raise PacketNotReassignable(f"professional {professional_id!r} is not active")
    if packet.district not in target.districts:
        raise PacketNotReassignable(
            f"professional {professional_id!r} does not serve district {packet.district}"
        )
    members = list(
        session.execute(
            select(_members.c.pseudonym)
            .where(_members.c.packet_id == packet_id)
            .order_by(_members.c.pseudonym)
        ).scalars()
    )
    former = packet.professional_id
    if former != professional_id:
        load = open_loads(session=session, professional_ids=[professional_id]).get(
            professional_id, 0
        )
        if load + len(members) > target.capacity:
            raise PacketNotReassignable(
                f"professional {professional_id!r} has room for {max(target.capacity - load, 0)} "
                f"more clients; this packet has {len(members)}"
            )
        packet.professional_id = professional_id
        session.add(packet)
        session.flush()
    append(
        session=session,
        entry=LogEntry.by(
            caller,
            action="packet.reassign",
            object_type="packet",
            object_id=packet_id,
            pseudonyms=members,
            reason=f"from {former} to {professional_id}",
        ),
    )
    return _packet_public(packet, len(members))
