"""HTTP for the record store: batch ingest (sources) and subject erasure (admins)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Request, Response

from service.access_log.guard import require
from service.auth.dependencies import Caller
from service.auth.permissions import Permission
from service.config import Settings
from service.crypto.keyring import Keyring
from service.db import Database, SessionDep
from service.errors import Unprocessable
from service.openapi import AUTH_ERRORS, problem_responses
from service.records.models import (
    DEMO_SOURCE_PREFIX,
    DEMO_SOURCE_REFUSAL,
    SOURCE_MAX,
    RecordBatchCreate,
    RecordBatchPublic,
    SubjectErasurePublic,
)
from service.records.service import erase_subject, ingest_batch
from service.records.vocabulary import load_event_types
from service.request_body import JsonRoute
from service.schemas import IdempotencyKeyHeader, PseudonymPath

router = APIRouter(route_class=JsonRoute)


@router.post(
    "/v1/records/batch",
    tags=["records"],
    summary="Ingest a batch of subjects with events (all-or-nothing, idempotent)",
    response_model=RecordBatchPublic,
    responses={**AUTH_ERRORS, **problem_responses(409, 413, 422, 503)},
)
def ingest_records(
    batch: RecordBatchCreate,
    request: Request,
    session: SessionDep,
    caller: Annotated[Caller, require(Permission.RECORDS_INGEST)],
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """One failing row rejects the batch with a 422, and nothing is stored. The 422 lists every
    row and field failing the first of two checks that fails: each row's shape (here, by the
    schema), then what needs the whole batch or the database (``ingest_batch``). The source is
    the caller's token subject."""
    settings: Settings = request.app.state.settings
    keyring: Keyring = request.app.state.keyring
    if len(caller.sub) > SOURCE_MAX:
        raise Unprocessable(f"the token subject (the source name) exceeds {SOURCE_MAX} characters")
    if caller.sub.startswith(DEMO_SOURCE_PREFIX):
        raise Unprocessable(f"the token subject (the source name): {DEMO_SOURCE_REFUSAL}")
    result = ingest_batch(
        session=session,
        keyring=keyring,
        event_types=load_event_types(settings.policies_dir / "events.yaml"),
        source=caller.sub,
        subjects=batch["subjects"],
        max_rows=settings.max_batch_rows,
        idempotency_key=idempotency_key,
        actor=caller.sub,
        role=caller.role,
        request_id=caller.request_id,
        idempotency_days=request.app.state.retention_policy.idempotency_days,
    )
    # The RecordBatchPublic body, written once from typed values (no model object per row).
    return Response(result.to_json(), media_type="application/json")


@router.post(
    "/v1/subjects/{pseudonym}/erase",
    tags=["subjects"],
    summary="Crypto-shred one subject's identity (vault and packet wraps); events remain",
    responses={**AUTH_ERRORS, **problem_responses(404, 503)},
)
def erase(
    request: Request,
    pseudonym: PseudonymPath,
    session: SessionDep,
    caller: Annotated[Caller, require(Permission.SUBJECTS_ERASE)],
    after_response: BackgroundTasks,
) -> SubjectErasurePublic:
    """After this no key can decrypt the subject's identity; erasing twice is harmless."""
    erased = erase_subject(
        session=session,
        pseudonym=pseudonym,
        actor=caller.sub,
        role=caller.role,
        request_id=caller.request_id,
    )
    # Once the erasure has committed (before the response), the overwritten row versions go too
    # (also when erasing again: it may have removed what an older version left).
    database: Database = request.app.state.database
    after_response.add_task(database.purge_replaced_rows)
    return erased
