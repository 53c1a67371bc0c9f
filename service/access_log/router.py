"""The auditor API: entries as NDJSON, signed checkpoints, proofs, the verifier key and its
handovers.

Every route needs ``audit.read`` and is itself logged (action ``audit.read``) in the request's
transaction, so a read that cannot be logged is not served (503). A refusal is logged too, as
``denied``, and kept: a caller without ``audit.read`` (403) and a range or size the log does
not have (400).
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from sqlmodel import Session
from starlette.datastructures import State

from service.access_log import service
from service.access_log.guard import Require
from service.access_log.handover import handover_line, handover_notes
from service.access_log.models import ConsistencyProofPublic, InclusionProofPublic
from service.auth.dependencies import Caller
from service.auth.permissions import Permission
from service.config import Settings
from service.crypto.keyring import KeyProvider
from service.crypto.signing import NoteSigner
from service.db import Database, SessionDep
from service.errors import BadRequest, Forbidden, Unavailable
from service.openapi import AUTH_ERRORS, problem_responses
from service.request_body import JsonRoute
from service.schemas import DIGITS_ONLY, MAX_INT64

_T = TypeVar("_T")
PREFIX = "/v1/audit"
router = APIRouter(route_class=JsonRoute, prefix=PREFIX, tags=["audit"], responses=AUTH_ERRORS)


class AuditReadRefused(Forbidden):
    commit_before_raising = True  # the refusal keeps its ``denied`` entry


class AuditRangeRefused(BadRequest):
    commit_before_raising = True


class AuditRead(Require):
    """The caller if they may read the log; otherwise a denied ``audit.read`` entry naming the
    part of the log asked for, and 403."""

    refused = AuditReadRefused

    def log_refusal(self, request: Request, session: Session, caller: Caller) -> None:
        service.log_audit_read(
            session=session,
            caller=caller,
            object_id=request.url.path.removeprefix(f"{PREFIX}/"),
            outcome="denied",
            reason=f"lacks {self.permission.value}",
        )


Auditor = Annotated[Caller, Depends(AuditRead(Permission.AUDIT_READ))]


def _read(session: Session, caller: Caller, object_id: str, read: Callable[[], _T]) -> _T:
    """``read()``, logged as allowed; a range or size the log does not have is logged as denied
    and refused (400)."""
    try:
        result = read()
    except BadRequest as exc:
        service.log_audit_read(
            session=session, caller=caller, object_id=object_id, outcome="denied", reason=exc.detail
        )
        raise AuditRangeRefused(exc.detail) from None
    service.log_audit_read(session=session, caller=caller, object_id=object_id)
    return result


ERRORS = problem_responses(400, 503)
NDJSON = "application/x-ndjson"


def current_signer(state: State, session: Session | None = None) -> NoteSigner | None:
    """The checkpoint signer under the ``log_signing`` version in use, built again when that
    version changes (a rotation by ``casepackets keys rotate`` needs no restart). With a
    ``session`` (to sign, or to tell readiness), a staged version counts once the log holds its
    rotation (``service.logged_current_key``), and a keyring whose file changed but cannot be
    read signs nothing (503): the key it holds may have handed signing over. Without a session,
    the keyring's current version. Without a keyring, the signer the app was given, if any."""
    keyring: KeyProvider | None = getattr(state, "keyring", None)
    if keyring is None:
        given: NoteSigner | None = getattr(state, "log_signer", None)
        return given
    if session is None:
        current = keyring.current("log_signing")
    else:
        if keyring.unreadable:
            raise service.SignerOutdated(
                "the keyring file changed but cannot be read, so the log signing key held here "
                "may be out of date; fix the file (mode 0600, readable by the service)"
            )
        current = service.logged_current_key(
            session=session, keyring=keyring, purpose="log_signing"
        )
    # One (version, signer) pair, read and replaced in one step: threads may hold different
    # versions for a moment (one under the log's lock, one not), and none may take another's.
    built: tuple[int, NoteSigner] | None = getattr(state, "log_signer_built", None)
    if built is None or built[0] != current.version:
        built = (
            current.version,
            NoteSigner(name=state.settings.checkpoint_origin, seed=current.material),
        )
        state.log_signer_built = built
    return built[1]


def get_signer(request: Request, session: SessionDep) -> NoteSigner:
    signer = current_signer(request.app.state, session)
    if signer is None:
        raise Unavailable("the log signing key is not loaded")
    return signer


def _refresh_keyring(state: State) -> None:
    keyring: KeyProvider | None = getattr(state, "keyring", None)
    if keyring is not None:
        keyring.refresh()


def _b64(hashes: list[bytes]) -> list[str]:
    return [base64.b64encode(h).decode("ascii") for h in hashes]


@router.get(
    "/entries",
    response_class=StreamingResponse,
    responses={
        **ERRORS,
        200: {
            "description": "One line per entry, each exactly the leaf's bytes",
            "content": {NDJSON: {"schema": {"type": "string"}}},
        },
    },
    summary="Stream log entries [start, end) as NDJSON",
)
def entries(
    request: Request,
    session: SessionDep,
    caller: Auditor,
    start: Annotated[
        int, Query(ge=0, le=MAX_INT64, description="first leaf index (inclusive)"), DIGITS_ONLY
    ],
    end: Annotated[
        int, Query(ge=1, le=MAX_INT64, description="last leaf index (exclusive)"), DIGITS_ONLY
    ],
) -> StreamingResponse:
    start, end = _read(
        session,
        caller,
        f"entries:{start}-{end}",
        lambda: service.entry_range(session=session, start=start, end=end),
    )
    database: Database = request.app.state.database
    # The request's session is closed once the route returns; the stream reads in chunks, each
    # in its own short read-only session, so memory stays constant and no lock is held or
    # waited for (on SQLite a write transaction would wait for writers, and a chunk failing
    # after the 200 has gone out would cut the body short).
    return StreamingResponse(
        _ndjson(service.stream_entries(open_session=database.reading, start=start, end=end)),
        media_type=NDJSON,
    )


def _ndjson(chunks: Iterator[list[bytes]]) -> Iterator[bytes]:
    for chunk in chunks:
        yield b"".join(data + b"\n" for data in chunk)


@router.get(
    "/checkpoint",
    response_class=PlainTextResponse,
    responses={**ERRORS, 200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    summary="A signed checkpoint (C2SP signed note) covering every committed entry",
)
def checkpoint(request: Request, session: SessionDep, caller: Auditor) -> PlainTextResponse:
    service.log_audit_read(session=session, caller=caller, object_id="checkpoint")
    # The entry took the log's lock: a rotation of the signing key has either committed, with
    # the keyring already written, or waits for this request. Read the keyring again now, so a
    # checkpoint after a handover is never signed by the key that handed over.
    _refresh_keyring(request.app.state)
    settings: Settings = request.app.state.settings
    note = service.signed_checkpoint(
        session=session, signer=get_signer(request, session), origin=settings.checkpoint_origin
    )
    return PlainTextResponse(note)


@router.get(
    "/proofs/inclusion",
    response_model=InclusionProofPublic,
    responses=ERRORS,
    summary="RFC 9162 inclusion proof of one leaf in a tree size",
)
def inclusion(
    session: SessionDep,
    caller: Auditor,
    index: Annotated[int, Query(ge=0, le=MAX_INT64), DIGITS_ONLY],
    tree_size: Annotated[int, Query(ge=1, le=MAX_INT64), DIGITS_ONLY],
) -> InclusionProofPublic:
    hashes = _read(
        session,
        caller,
        f"inclusion:{index}@{tree_size}",
        lambda: service.inclusion_proof(session=session, index=index, size=tree_size),
    )
    return InclusionProofPublic(leaf_index=index, tree_size=tree_size, hashes=_b64(hashes))


@router.get(
    "/proofs/consistency",
    response_model=ConsistencyProofPublic,
    responses=ERRORS,
    summary="RFC 9162 consistency proof between two tree sizes",
)
def consistency(
    session: SessionDep,
    caller: Auditor,
    first: Annotated[int, Query(ge=0, le=MAX_INT64), DIGITS_ONLY],
    second: Annotated[int, Query(ge=0, le=MAX_INT64), DIGITS_ONLY],
) -> ConsistencyProofPublic:
    hashes = _read(
        session,
        caller,
        f"consistency:{first}-{second}",
        lambda: service.consistency_proof(session=session, first=first, second=second),
    )
    return ConsistencyProofPublic(first=first, second=second, hashes=_b64(hashes))


@router.get(
    "/public-key",
    response_class=PlainTextResponse,
    responses={**ERRORS, 200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    summary="The checkpoint verifier key: <name>+<hex key id>+<base64(0x01 ‖ key)>",
)
def public_key(request: Request, session: SessionDep, caller: Auditor) -> PlainTextResponse:
    service.log_audit_read(session=session, caller=caller, object_id="public-key")
    # As for a checkpoint: under the log's lock, the key a rotation committed a moment ago.
    _refresh_keyring(request.app.state)
    return PlainTextResponse(f"{get_signer(request, session).verifier}\n")


@router.get(
    "/handovers",
    response_class=Response,
    responses={
        **ERRORS,
        200: {
            "description": 'One line per handover, in tree-size order: {"size": n, "note": '
            '"<checkpoint signed by the old key and cosigned by the new one>"}',
            "content": {NDJSON: {"schema": {"type": "string"}}},
        },
    },
    summary="The log signing key's handovers (what audit verify --handovers reads)",
)
def handovers(session: SessionDep, caller: Auditor) -> Response:
    service.log_audit_read(session=session, caller=caller, object_id="handovers")
    notes = handover_notes(session=session, up_to=service.tree_size(session=session))
    lines = (handover_line(size, note) for size, note in sorted(notes.items()))
    return Response("".join(lines), media_type=NDJSON)


def install(app: FastAPI) -> None:
    """Wire the access log into the app: signer from the keyring, readiness, routes.

    The lock bound needs no wiring: the app's engine carries settings.log_lock_timeout_seconds.
    """
    current_signer(app.state)
    app.state.readiness_checks["access_log"] = _readiness(app)
    app.include_router(router)


def _readiness(app: FastAPI) -> Callable[[], str]:
    def check_once() -> tuple[str, bool]:
        """What readiness finds, and whether the log was read (a second look may differ)."""
        database: Database = app.state.database
        _refresh_keyring(app.state)  # a rotation a moment ago: judged with the key it handed to
        try:
            with database.reading() as session:
                signer = current_signer(app.state, session)
                return service.check_readiness(session=session, signer=signer), True
        except service.SignerOutdated as exc:
            return exc.detail, True
        except Exception as exc:
            return f"access log unreachable ({type(exc).__name__})", False

    def check() -> str:
        # Once more when the log was read and found wanting: a handover committing between the
        # keyring's reread and the reads of the log is judged with the key that handed over;
        # the second look sees both. An unreachable database is not asked twice.
        found, read = check_once()
        return check_once()[0] if found != "ok" and read else found

    return check
