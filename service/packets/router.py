"""Routes for professionals (coordinators), partitioning, packet metadata, re-identification,
follow-ups and closing.

The routes about one packet depend on authentication alone, not on ``require(...)``: whoever
is not entitled, whatever their role, gets the same 404 (never a 403 that would confirm the
packet exists), and the service logs the attempt as denied. That holds for a request the route
cannot take as sent, too (a stray parameter, a body that does not fit): the caller's right to
the packet is judged before its 422 (``hidden_unless_admitted``).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from service.access_log.guard import require
from service.auth.dependencies import Caller, CurrentCaller
from service.auth.permissions import Permission
from service.crypto.keyring import KeyProvider
from service.db import Database, SessionDep
from service.openapi import AUTH_ERRORS, problem_responses
from service.packets import service
from service.packets.models import (
    FollowupCreate,
    FollowupPublic,
    PacketClientsPublic,
    PacketDetailPublic,
    PacketPagePublic,
    PacketPublic,
    PacketReassign,
    PacketStatus,
    PartitionCreate,
    PartitionPublic,
    ProfessionalCreate,
    ProfessionalPagePublic,
    ProfessionalPublic,
    ProfessionalUpdate,
)
from service.packets.opens import PacketOpens
from service.packets.policy import FollowupPolicy, PartitioningPolicy, RetentionPolicy
from service.request_body import JsonRoute, Judge, judged_before_its_input
from service.schemas import (
    AS_STORED,
    DIGITS_ONLY,
    NO_NUL,
    PACKET_ID,
    IdempotencyKeyHeader,
    PacketIdPath,
    PseudonymPath,
)

router = APIRouter(route_class=JsonRoute)


# -- professionals ----------------------------------------------------------------------------


@router.post(
    "/v1/professionals",
    response_model=ProfessionalPublic,
    status_code=201,
    tags=["professionals"],
    responses={**AUTH_ERRORS, **problem_responses(409, 422)},
    summary="Register a professional (id = the `sub` of their tokens)",
)
def create_professional(
    body: ProfessionalCreate,
    session: SessionDep,
    caller: Annotated[Caller, require(Permission.PROFESSIONALS_MANAGE)],
) -> ProfessionalPublic:
    return service.create_professional(session=session, given=body, caller=caller)


@router.get(
    "/v1/professionals",
    response_model=ProfessionalPagePublic,
    tags=["professionals"],
    responses=AUTH_ERRORS,
    summary="Professionals with their districts, capacity and open load",
)
def list_professionals(
    session: SessionDep,
    _caller: Annotated[Caller, require(Permission.PROFESSIONALS_MANAGE)],
    team: Annotated[str | None, Query(max_length=64), AS_STORED, NO_NUL] = None,
    active: bool | None = None,
    after: Annotated[
        str | None,
        Query(min_length=1, max_length=128, description="the previous page's next_after"),
        NO_NUL,
    ] = None,
    limit: Annotated[int, Query(ge=1, le=service.MAX_PAGE), DIGITS_ONLY] = 100,
) -> ProfessionalPagePublic:
    items, next_after = service.list_professionals(
        session=session, team=team, active=active, after=after, limit=limit
    )
    return ProfessionalPagePublic(items=items, next_after=next_after)


# As registered (1 to 128 characters once the spaces around it are gone, no NUL): a longer path
# segment names nobody, and is refused (422) rather than echoed back in a 404. Like every text
# parameter that reaches SQL (the lists' filters and cursors too), it is refused with a NUL on
# both databases: PostgreSQL cannot even compare such text, and SQLite would just find nothing.
ProfessionalIdPath = Annotated[str, Path(min_length=1, max_length=128), AS_STORED, NO_NUL]


@router.patch(
    "/v1/professionals/{professional_id}",
    response_model=ProfessionalPublic,
    tags=["professionals"],
    responses={**AUTH_ERRORS, **problem_responses(404, 422)},
    summary="Change a professional's name, team, districts, capacity or active flag",
)
def update_professional(
    professional_id: ProfessionalIdPath,
    body: ProfessionalUpdate,
    session: SessionDep,
    caller: Annotated[Caller, require(Permission.PROFESSIONALS_MANAGE)],
) -> ProfessionalPublic:
    return service.update_professional(
        session=session, professional_id=professional_id, changes=body, caller=caller
    )


@router.post(
    "/v1/professionals/{professional_id}/deactivate",
    response_model=ProfessionalPublic,
    tags=["professionals"],
    responses={**AUTH_ERRORS, **problem_responses(404)},
    summary="Stop assigning new packets to a professional (open packets stay until reassigned)",
)
def deactivate_professional(
    professional_id: ProfessionalIdPath,
    session: SessionDep,
    caller: Annotated[Caller, require(Permission.PROFESSIONALS_MANAGE)],
) -> ProfessionalPublic:
    return service.deactivate_professional(
        session=session, professional_id=professional_id, caller=caller
    )


# -- packets ----------------------------------------------------------------------------------


def hidden_unless_admitted(action: str) -> Judge:
    """The judge of a packet route's requests that it cannot take as sent: a caller who may not
    do ``action`` to the packet gets the logged 404 they would get for a proper request. A
    packet id of another shape names no packet, and is never written to the log: its 422 stands
    (``PacketIdPath``)."""

    async def judge(request: Request, caller: Caller) -> None:
        packet_id = request.path_params.get("packet_id", "")
        if PACKET_ID.fullmatch(packet_id):
            database: Database = request.app.state.database
            await run_in_threadpool(
                service.refuse_if_hidden,
                database,
                packet_id=packet_id,
                caller=caller,
                action=action,
            )

    return judge


@router.post(
    "/v1/packets/partition",
    response_model=PartitionPublic,
    status_code=201,
    tags=["packets"],
    responses={**AUTH_ERRORS, **problem_responses(404, 422, 503)},
    summary="Split a run's flagged cases (and pending external flags) into assigned packets",
)
def partition(
    request: Request,
    body: PartitionCreate,
    session: SessionDep,
    caller: Annotated[Caller, require(Permission.PACKETS_PARTITION)],
) -> PartitionPublic:
    keyring: KeyProvider = request.app.state.keyring
    partitioning: PartitioningPolicy = request.app.state.partitioning_policy
    retention: RetentionPolicy = request.app.state.retention_policy
    return service.partition_run(
        session=session,
        keyring=keyring,
        run_id=body.run_id,
        packet_size=partitioning.packet_size,
        retention=retention,
        caller=caller,
    )


@router.get(
    "/v1/packets",
    response_model=PacketPagePublic,
    tags=["packets"],
    responses=AUTH_ERRORS,
    summary="Packet metadata: own packets for professionals, all for coordinators and sources",
)
def list_packets(
    session: SessionDep,
    caller: Annotated[Caller, require(Permission.PACKETS_READ)],
    status: PacketStatus | None = None,
    professional_id: Annotated[
        str | None,
        Query(
            max_length=128,
            description="one professional's packets (a professional's own list is theirs only: "
            "another's id finds nothing)",
        ),
        AS_STORED,
        NO_NUL,
    ] = None,
    after: Annotated[
        str | None,
        Query(min_length=1, max_length=200, description="the previous page's next_after"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=service.MAX_PAGE), DIGITS_ONLY] = 100,
) -> PacketPagePublic:
    items, next_after = service.list_packets(
        session=session,
        caller=caller,
        status=status,
        professional_id=professional_id,
        after=after,
        limit=limit,
    )
    return PacketPagePublic(items=items, next_after=next_after)


@router.get(
    "/v1/packets/{packet_id}",
    response_model=PacketDetailPublic,
    tags=["packets"],
    responses=problem_responses(401, 404, 503),
    summary="One packet's metadata: status, members' pseudonyms, dates (never identities)",
)
@judged_before_its_input(hidden_unless_admitted("packet.read"))
def get_packet(
    packet_id: PacketIdPath, session: SessionDep, caller: CurrentCaller
) -> PacketDetailPublic:
    """The owner, coordinators and sources; anyone else gets 404 and the attempt is logged."""
    return service.get_packet(session=session, packet_id=packet_id, caller=caller)


@router.post(
    "/v1/packets/{packet_id}/reassign",
    response_model=PacketPublic,
    tags=["packets"],
    responses=problem_responses(401, 404, 409, 422, 503),
    summary="Give an open packet to another professional; the former owner loses access",
)
@judged_before_its_input(hidden_unless_admitted("packet.reassign"))
def reassign_packet(
    packet_id: PacketIdPath, body: PacketReassign, session: SessionDep, caller: CurrentCaller
) -> PacketPublic:
    """Coordinators; anyone else gets 404 and the attempt is logged."""
    return service.reassign_packet(
        session=session, packet_id=packet_id, professional_id=body.professional_id, caller=caller
    )


# -- the owner's routes -----------------------------------------------------------------------


OWNER_ERRORS = {**problem_responses(401, 404, 410, 503)}


@router.get(
    "/v1/packets/{packet_id}/clients",
    response_model=PacketClientsPublic,
    tags=["packets"],
    responses=OWNER_ERRORS,
    summary="Re-identify your own packet: identities, characteristics, why flagged, follow-ups",
)
@judged_before_its_input(hidden_unless_admitted("packet.open"))
async def open_packet(request: Request, packet_id: PacketIdPath, caller: CurrentCaller) -> Response:
    """Owner only; everyone else gets 404 and the attempt is logged as denied. The access is
    logged before any identity is decrypted: if the log cannot be written in time, 503 and no
    identity. A closed, expired or shredded packet gets 410."""
    opens: PacketOpens = request.app.state.packet_opens
    keyring: KeyProvider = request.app.state.keyring
    sealed = await opens.log(service.OpenRequest(packet_id=packet_id, caller=caller))
    # Committed: the ``packet.open`` entry is durable before anything is decrypted. Decrypting
    # here, on the event loop, is like serializing a response: bounded (at most 20 clients) and
    # CPU only, and the next batch of opens is being logged meanwhile.
    try:
        body = service.reveal(keyring=keyring, sealed=sealed)
    except (service.PacketKeyDamaged, service.PacketKeyRetired) as refusal:
        database: Database = request.app.state.database
        await run_in_threadpool(
            service.record_unrevealed, database, sealed=sealed, caller=caller, refusal=refusal
        )
        raise
    return Response(body, media_type="application/json")


@router.post(
    "/v1/packets/{packet_id}/clients/{pseudonym}/followups",
    response_model=FollowupPublic,
    status_code=201,
    tags=["packets"],
    responses={**OWNER_ERRORS, **problem_responses(409, 422)},
    summary="Record an appointment, contact, intervention or outcome for one of your clients",
)
@judged_before_its_input(hidden_unless_admitted("followup.create"))
def create_followup(
    request: Request,
    packet_id: PacketIdPath,
    pseudonym: PseudonymPath,
    body: FollowupCreate,
    session: SessionDep,
    caller: CurrentCaller,
    idempotency_key: IdempotencyKeyHeader = None,
) -> FollowupPublic:
    """Owner only (others: 404, logged). The note is encrypted under the packet key and shown
    only on the owner's re-identification route; kinds, dates and outcome codes are metadata."""
    keyring: KeyProvider = request.app.state.keyring
    policy: FollowupPolicy = request.app.state.followup_policy
    return service.create_followup(
        session=session,
        keyring=keyring,
        policy=policy,
        packet_id=packet_id,
        pseudonym=pseudonym,
        given=body,
        caller=caller,
        idempotency_key=idempotency_key,
    )


@router.post(
    "/v1/packets/{packet_id}/close",
    response_model=PacketPublic,
    tags=["packets"],
    responses={**OWNER_ERRORS, **problem_responses(409)},
    summary="Close a packet (its owner, or a coordinator); it is crypto-shredded after the grace",
)
@judged_before_its_input(hidden_unless_admitted("packet.close"))
def close_packet(
    packet_id: PacketIdPath, session: SessionDep, caller: CurrentCaller
) -> PacketPublic:
    return service.close_packet(session=session, packet_id=packet_id, caller=caller)
