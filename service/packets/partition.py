"""Pure partitioning: flagged cases + professionals → packets, and the cases that could not go.

Guarantees (tested as Hypothesis properties):
- every input case comes out exactly once, either in one packet or as unplaced with a reason —
  nothing is dropped silently and nothing is placed twice;
- a packet holds at most ``packet_size`` cases (1–20), all from one district, for one
  professional who is active and serves that district;
- no professional gets more than ``capacity - open_load`` new cases;
- a returning client goes to the professional who had them before when that professional is
  active, serves the client's district and still has room;
- a case flagged as already in an open packet is never placed again;
- the same input gives the same output: every choice is made on sorted values, never at random,
  and the order of the input lists does not matter.

The remaining cases of a district go, one packet-sized chunk at a time, to the eligible
professional with the most room left (ties: lowest id), which spreads work over the team.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

# The service's promise: a professional re-identifies at most 20 clients a packet.
MAX_PACKET_SIZE: Final = 20

ALREADY_IN_OPEN_PACKET: Final = "already in an open packet"
DUPLICATE_CASE: Final = "listed more than once in this partitioning"


def no_professional(district: str) -> str:
    return f"no active professional serves district {district}"


def no_capacity(district: str) -> str:
    return f"every professional serving district {district} is at capacity"


@dataclass(frozen=True)
class Case:
    """A flagged case as partitioning sees it: pseudonym, district and prior professional."""

    pseudonym: str
    district: str
    previous_professional: str | None = None
    in_open_packet: bool = False


@dataclass(frozen=True)
class Professional:
    id: str
    districts: frozenset[str]
    capacity: int
    open_load: int = 0
    active: bool = True

    @property
    def room(self) -> int:
        return max(self.capacity - self.open_load, 0)


@dataclass(frozen=True)
class PlannedPacket:
    professional_id: str
    district: str
    pseudonyms: tuple[str, ...]


@dataclass(frozen=True)
class UnplacedCase:
    pseudonym: str
    district: str
    reason: str


@dataclass(frozen=True)
class Partition:
    packets: tuple[PlannedPacket, ...]
    unplaced: tuple[UnplacedCase, ...]


def partition(
    cases: Iterable[Case], professionals: Iterable[Professional], *, packet_size: int
) -> Partition:
    """Cut ``cases`` into packets for ``professionals`` (see the module guarantees)."""
    if not 1 <= packet_size <= MAX_PACKET_SIZE:
        raise ValueError(f"packet_size must be from 1 to {MAX_PACKET_SIZE}, not {packet_size}")
    team = sorted(professionals, key=lambda p: p.id)
    if len({p.id for p in team}) != len(team):
        raise ValueError("professional ids must be unique")
    by_id = {p.id: p for p in team}
    room = {p.id: p.room for p in team if p.active}
    serving: dict[str, list[str]] = defaultdict(list)
    for professional in team:
        if professional.active:
            for district in professional.districts:
                serving[district].append(professional.id)

    unplaced: list[UnplacedCase] = []
    waiting: dict[str, list[Case]] = defaultdict(list)
    assigned: dict[tuple[str, str], list[str]] = defaultdict(list)
    seen: set[str] = set()
    # Every field decides the order, so two copies of a case (which the service never sends) are
    # settled the same way whatever order they come in: one in an open packet first.
    ordered = sorted(
        cases,
        key=lambda c: (
            c.district,
            c.pseudonym,
            not c.in_open_packet,
            c.previous_professional or "",
        ),
    )
    for case in ordered:
        if case.pseudonym in seen:
            unplaced.append(UnplacedCase(case.pseudonym, case.district, DUPLICATE_CASE))
            continue
        seen.add(case.pseudonym)
        if case.in_open_packet:
            unplaced.append(UnplacedCase(case.pseudonym, case.district, ALREADY_IN_OPEN_PACKET))
            continue
        before = by_id.get(case.previous_professional or "")
        if before is not None and room.get(before.id, 0) > 0 and case.district in before.districts:
            assigned[(before.id, case.district)].append(case.pseudonym)
            room[before.id] -= 1
            continue
        waiting[case.district].append(case)

    for district in sorted(waiting):
        queue = waiting[district]
        eligible = serving.get(district, [])
        start = 0
        while start < len(queue):
            candidates = [p for p in eligible if room[p] > 0]
            if not candidates:
                reason = no_capacity(district) if eligible else no_professional(district)
                unplaced.extend(UnplacedCase(c.pseudonym, district, reason) for c in queue[start:])
                break
            chosen = min(candidates, key=lambda p: (-room[p], p))
            take = min(packet_size, room[chosen], len(queue) - start)
            assigned[(chosen, district)].extend(c.pseudonym for c in queue[start : start + take])
            room[chosen] -= take
            start += take

    packets: list[PlannedPacket] = []
    for (professional_id, district), pseudonyms in sorted(assigned.items()):
        members = sorted(pseudonyms)
        packets.extend(
            PlannedPacket(professional_id, district, tuple(members[start : start + packet_size]))
            for start in range(0, len(members), packet_size)
        )
    packets.sort(key=lambda p: (p.district, p.professional_id, p.pseudonyms))
    unplaced.sort(key=lambda u: (u.district, u.pseudonym, u.reason))
    return Partition(packets=tuple(packets), unplaced=tuple(unplaced))


def placed_pseudonyms(result: Partition) -> Sequence[str]:
    return [pseudonym for packet in result.packets for pseudonym in packet.pseudonyms]
