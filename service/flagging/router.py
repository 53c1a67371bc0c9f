"""Flagging routes: runs (coordinators), their flags, and flags pushed by sources."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from service.access_log.guard import require
from service.auth.dependencies import Caller
from service.auth.permissions import Permission
from service.clock import today
from service.db import SessionDep
from service.flagging import service
from service.flagging.models import (
    ArchivedPolicyPublic,
    FlaggingRunCreate,
    FlaggingRunPagePublic,
    FlaggingRunPublic,
    FlagPagePublic,
    FlagsPush,
    FlagsPushedPublic,
)
from service.flagging.rules import FlaggingPolicy
from service.openapi import AUTH_ERRORS, problem_responses
from service.request_body import JsonRoute
from service.schemas import DIGITS_ONLY, MAX_INT64, IdempotencyKeyHeader

MAX_FLAG_ID = 2**31 - 1  # flags.id is an INTEGER column

router = APIRouter(route_class=JsonRoute, tags=["flagging"])


def _policy(request: Request) -> FlaggingPolicy:
    policy: FlaggingPolicy = request.app.state.flagging_policy
    return policy


@router.post(
    "/v1/flagging/runs",
    response_model=FlaggingRunPublic,
    status_code=201,
    responses={**AUTH_ERRORS, **problem_responses(409, 422, 503)},
    summary="Evaluate the flagging policy over every subject",
)
def create_run(
    request: Request,
    session: SessionDep,
    caller: Annotated[Caller, require(Permission.FLAGGING_RUN)],
    body: FlaggingRunCreate | None = None,
) -> FlaggingRunPublic:
    """The body is optional: without one (or without ``as_of``) the policy is evaluated as on
    today."""
    as_of = body.as_of if body is not None else None
    run = service.run_flagging(
        session=session,
        policy=_policy(request),
        as_of=as_of or today(),
        caller=caller,
    )
    return FlaggingRunPublic.model_validate(run, from_attributes=True)


@router.get(
    "/v1/flagging/runs",
    response_model=FlaggingRunPagePublic,
    responses={**AUTH_ERRORS, **problem_responses(422)},
    summary="Flagging runs, newest first: policy version, date and counts",
)
def list_runs(
    session: SessionDep,
    _caller: Annotated[Caller, require(Permission.FLAGGING_READ)],
    after: Annotated[
        str | None,
        Query(min_length=1, max_length=200, description="the previous page's next_after"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=service.MAX_PAGE), DIGITS_ONLY] = 100,
) -> FlaggingRunPagePublic:
    items, next_after = service.list_runs(session=session, after=after, limit=limit)
    return FlaggingRunPagePublic(items=items, next_after=next_after)


# A run's id as a run was given it (32 lowercase hex): anything else is refused unseen (422), not
# looked up and echoed back in a 404.
RunId = Annotated[
    str, Path(pattern=f"^{service.RUN_ID.pattern}$", description="as a run was given it")
]


@router.get(
    "/v1/flagging/runs/{run_id}",
    response_model=FlaggingRunPublic,
    responses={**AUTH_ERRORS, **problem_responses(404)},
    summary="One flagging run: policy version and counts",
)
def get_run(
    run_id: RunId,
    session: SessionDep,
    _caller: Annotated[Caller, require(Permission.FLAGGING_READ)],
) -> FlaggingRunPublic:
    run = service.get_run(session=session, run_id=run_id)
    return FlaggingRunPublic.model_validate(run, from_attributes=True)


@router.get(
    "/v1/flagging/runs/{run_id}/policy",
    response_model=ArchivedPolicyPublic,
    responses={**AUTH_ERRORS, **problem_responses(404)},
    summary="The policy file a run evaluated, exactly as it read it (the rules behind its flags)",
)
def get_run_policy(
    run_id: RunId,
    session: SessionDep,
    _caller: Annotated[Caller, require(Permission.POLICIES_READ)],
) -> ArchivedPolicyPublic:
    """Coordinators and auditors (``policies.read``): the file holds rules, no personal data. An
    auditor finds the run's id and the file's whole SHA-256 in its ``flagging.run`` log entry."""
    return service.get_run_policy(session=session, run_id=run_id)


@router.get(
    "/v1/flagging/runs/{run_id}/flags",
    response_model=FlagPagePublic,
    responses={**AUTH_ERRORS, **problem_responses(404)},
    summary="A run's flags: pseudonyms, rule hits and explanations (never identities)",
)
def list_run_flags(
    run_id: RunId,
    session: SessionDep,
    caller: Annotated[Caller, require(Permission.FLAGGING_READ)],
    after: Annotated[
        int, Query(ge=0, le=MAX_INT64, description="the previous page's next_after"), DIGITS_ONLY
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=service.MAX_PAGE), DIGITS_ONLY] = 100,
) -> FlagPagePublic:
    # Flag ids are 32-bit on PostgreSQL: a cursor past the largest one reads no flag, as on
    # SQLite, rather than failing as a number the column cannot hold.
    items, next_after = service.list_run_flags(
        session=session, run_id=run_id, after=min(after, MAX_FLAG_ID), limit=limit, caller=caller
    )
    return FlagPagePublic(items=items, next_after=next_after)


@router.post(
    "/v1/flags",
    response_model=FlagsPushedPublic,
    status_code=201,
    responses={**AUTH_ERRORS, **problem_responses(409, 422, 503)},
    summary="Push external flags by pseudonym, with a reason code and an explanation",
)
def push_flags(
    body: FlagsPush,
    request: Request,
    session: SessionDep,
    caller: Annotated[Caller, require(Permission.FLAGS_PUSH)],
    idempotency_key: IdempotencyKeyHeader = None,
) -> FlagsPushedPublic:
    """All or nothing. Send an ``Idempotency-Key`` to make a retry safe: the same flags sent
    again with it get the flags stored the first time; other flags with it, 409."""
    return FlagsPushedPublic(
        flags=service.push_flags(
            session=session,
            keyring=request.app.state.keyring,
            flags=body.flags,
            caller=caller,
            idempotency_key=idempotency_key,
            idempotency_days=request.app.state.retention_policy.idempotency_days,
        )
    )
