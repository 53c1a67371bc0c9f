"""The embedded default's first minute: a demo team, a flagging run and packets to open.

Runs only on a database with no packets yet (so a second ``serve`` changes nothing), and only
through the same service functions the API uses, so every step is in the access log.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

from sqlalchemy import func, select
from sqlmodel import Session

from service.crypto.keyring import KeyProvider
from service.errors import NotFound
from service.flagging.rules import FlaggingPolicy
from service.flagging.service import run_flagging, system_caller
from service.packets.models import Packet, ProfessionalCreate
from service.packets.policy import RetentionPolicy
from service.packets.service import create_professional, get_professional, partition_run

SOUTH = ("Feijenoord", "Charlois", "IJsselmonde")
DEMO_TEAM = tuple(
    ProfessionalCreate(
        id=professional_id,
        display_name=f"Demo professional {label}",
        team="Zuid",
        districts=list(districts),
        capacity=60,
    )
    for professional_id, label, districts in (
        ("prof-001", "Feijenoord", ("Feijenoord",)),
        ("prof-002", "Charlois", ("Charlois",)),
        ("prof-003", "IJsselmonde", ("IJsselmonde",)),
        ("prof-004", "Zuid (all districts)", SOUTH),
    )
)


@dataclass(frozen=True)
class DemoPackets:
    run_id: str
    flagged: int
    packets: int
    unplaced: int


def has_packets(*, session: Session) -> bool:
    return bool(session.connection().execute(select(func.count()).select_from(Packet)).scalar())


def build_demo_packets(
    *,
    session: Session,
    keyring: KeyProvider,
    flagging_policy: FlaggingPolicy,
    packet_size: int,
    retention: RetentionPolicy,
    as_of: date,
) -> DemoPackets:
    """Register the demo team (when absent), run the flagging policy and partition the run."""
    caller = system_caller("serve")
    for professional in DEMO_TEAM:
        try:
            get_professional(session=session, professional_id=professional.id)
        except NotFound:
            create_professional(session=session, given=professional, caller=caller)
    run = run_flagging(session=session, policy=flagging_policy, as_of=as_of, caller=caller)
    result = partition_run(
        session=session,
        keyring=keyring,
        run_id=run.id,
        packet_size=packet_size,
        retention=retention,
        caller=caller,
    )
    return DemoPackets(
        run_id=run.id,
        flagged=run.flagged,
        packets=len(result.packets),
        unplaced=len(result.unplaced),
    )


def first_packet_of(*, session: Session, professional_id: str) -> str | None:
    """The id of the professional's oldest packet still in use, if any."""
    packet_id = (
        session.connection()
        .execute(
            select(Packet.id)  # type: ignore[call-overload]
            .where(Packet.professional_id == professional_id)
            .where(Packet.status.in_(("assigned", "opened")))  # type: ignore[attr-defined]
            .order_by(Packet.created_at, Packet.id)
            .limit(1)
        )
        .scalar()
    )
    return str(packet_id) if packet_id is not None else None
