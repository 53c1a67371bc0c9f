"""A caller turned away for lacking a permission leaves a denied entry before the 403, and gets
503 instead when the log cannot take it (the matrix in tests/test_authorization.py checks every
route's refusals; these check what one entry holds and the fail-closed path)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from service.config import Settings
from service.db import Database
from service.main import create_app
from tests.conftest import TokenFactory, bearer
from tests.flagging.seed import log_entries
from tests.packets.scenario import HeldLogLock

REQUEST_ID = "3f2b8c1e9d7a4b6c8e0f1a2b3c4d5e6f"
PSEUDONYM = "ps-typed-by-the-caller"


def test_a_refusal_names_who_tried_what_and_the_route_but_not_the_values_in_its_path(
    client: TestClient, token: TokenFactory, session: Session
) -> None:
    professional = bearer(token("prof-001", "professional")) | {"X-Request-ID": REQUEST_ID}
    response = client.post(f"/v1/subjects/{PSEUDONYM}/erase", headers=professional)
    assert response.status_code == 403
    assert response.json()["detail"] == "this action needs the permission 'subjects.erase'"
    [refused] = log_entries(session)
    assert refused == refused | {
        "actor": "prof-001",
        "role": "professional",
        "action": "subjects.erase",
        "object_type": "route",
        "object_id": "POST /v1/subjects/{pseudonym}/erase",
        "outcome": "denied",
        "reason": "lacks subjects.erase",
        "request_id": REQUEST_ID,
        "pseudonyms": [],
    }
    assert PSEUDONYM not in str(refused)


def test_a_caller_with_the_permission_leaves_no_denied_entry(
    client: TestClient, token: TokenFactory, session: Session
) -> None:
    coordinator = bearer(token("coord-001", "coordinator"))
    assert client.get("/v1/professionals", headers=coordinator).status_code == 200
    assert log_entries(session) == []


def test_a_refusal_the_log_cannot_take_is_a_503(
    client: TestClient, token: TokenFactory, db_url: str, home: Path, session: Session
) -> None:
    bounded = Settings(env="test", home=home, database_url=db_url, log_lock_timeout_seconds=0.5)
    database = Database(bounded)
    professional = bearer(token("prof-001", "professional"))
    try:
        with TestClient(create_app(bounded, database=database)) as busy:
            with HeldLogLock(db_url):
                response = busy.get("/v1/professionals", headers=professional)
            assert response.status_code == 503, response.text
            assert response.headers["content-type"] == "application/problem+json"
            assert log_entries(session) == []
            # once the log is free the same request is refused, and logged
            assert busy.get("/v1/professionals", headers=professional).status_code == 403
            assert [e["action"] for e in log_entries(session)] == ["professionals.manage"]
    finally:
        database.dispose()


@pytest.mark.parametrize("role", ["auditor", "source", "analyst", "admin", None])
def test_every_role_without_the_permission_is_logged_under_its_own_name(
    client: TestClient, token: TokenFactory, session: Session, role: str | None
) -> None:
    caller = bearer(token("someone-001", role) if role else token("someone-001"))
    assert client.post("/v1/flagging/runs", json={}, headers=caller).status_code == 403
    [refused] = log_entries(session)
    assert (refused["actor"], refused["role"]) == ("someone-001", role or "none")
    assert refused["object_id"] == "POST /v1/flagging/runs"


@pytest.mark.parametrize(
    ("method", "path", "body", "logged"),
    [
        ("GET", "/v1/professionals?stray=1", None, ("professionals.manage", "route")),
        ("GET", "/v1/packets?status=open&status=closed", None, ("packets.read", "route")),
        ("POST", "/v1/subjects/ps-1/erase", {"now": True}, ("subjects.erase", "route")),
        ("GET", "/v1/audit/checkpoint?stray=1", None, ("audit.read", "audit")),
    ],
    ids=["unknown-query", "repeated-query", "body-where-none-is-taken", "audit-route"],
)
def test_a_stray_parameter_does_not_keep_a_refusal_out_of_the_log(
    client: TestClient,
    token: TokenFactory,
    session: Session,
    method: str,
    path: str,
    body: dict[str, bool] | None,
    logged: tuple[str, str],
) -> None:
    """A caller whose roles lack the permission gets the logged 403 whatever else is wrong
    with the request; the 422 for input the route does not take is for callers it admits."""
    analyst = bearer(token("analyst-001", "analyst"))
    response = client.request(method, path, json=body, headers=analyst)
    assert response.status_code == 403, response.text
    [refused] = log_entries(session)
    assert (refused["action"], refused["object_type"], refused["outcome"]) == (*logged, "denied")
    admitted = {
        "professionals.manage": ("coord-001", "coordinator"),
        "packets.read": ("coord-001", "coordinator"),
        "subjects.erase": ("admin-001", "admin"),
        "audit.read": ("auditor-001", "auditor"),
    }[logged[0]]
    response = client.request(method, path, json=body, headers=bearer(token(*admitted)))
    assert response.status_code == 422, response.text


def test_the_body_of_a_caller_the_route_turns_away_is_never_read(
    client: TestClient, token: TokenFactory, session: Session
) -> None:
    """Parsing a body of many megabytes holds a worker's event loop: a caller who lacks the
    permission gets the logged 403 without it being parsed (a body that is not JSON shows it)."""
    not_json = b'{"batch": [' + b"{}," * 1000
    headers = {"Content-Type": "application/json"}
    for caller in (("prof-001", "professional"), ("auditor-001", "auditor")):
        refused = client.post(
            "/v1/records/batch", content=not_json, headers=headers | bearer(token(*caller))
        )
        assert refused.status_code == 403, refused.text
    assert [(e["actor"], e["action"]) for e in log_entries(session)] == [
        ("prof-001", "records.ingest"),
        ("auditor-001", "records.ingest"),
    ]
    admitted = client.post(
        "/v1/records/batch", content=not_json, headers=headers | bearer(token("src-001", "source"))
    )
    assert admitted.status_code == 422, admitted.text
