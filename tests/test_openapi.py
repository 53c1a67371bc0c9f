"""The committed contract (openapi/openapi.json) matches what the service serves."""

from __future__ import annotations

from typing import Any

from service.openapi_export import CONTRACT, current_spec, render

PUBLIC = {"/healthz", "/readyz", "/.well-known/jwks.json"}


def test_committed_contract_matches_the_served_spec() -> None:
    assert CONTRACT.exists(), "run scripts/export_openapi and commit openapi/openapi.json"
    assert CONTRACT.read_text(encoding="utf-8") == render(current_spec()), (
        "the API changed: run scripts/export_openapi and review the diff"
    )


def operations() -> list[tuple[str, str, dict[str, Any]]]:
    spec = current_spec()
    return [
        (path, method, op)
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in {"get", "post", "put", "patch", "delete"}
    ]


def test_every_protected_route_declares_bearer_auth_and_its_errors() -> None:
    spec = current_spec()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, method, op in operations():
        if path in PUBLIC:
            continue
        assert op.get("security") == [{"HTTPBearer": []}], f"{method} {path} lacks bearer auth"
        assert "401" in op["responses"], f"{method} {path} does not declare 401"


def test_every_route_has_a_success_schema() -> None:
    for path, method, op in operations():
        ok = [s for s in op["responses"] if s.startswith("2")]
        assert ok, f"{method} {path} declares no success response"
        content = op["responses"][ok[0]].get("content", {})
        assert content, f"{method} {path} has no response model"


def test_every_error_response_is_declared_as_problem_json_alone() -> None:
    """Errors are only ever sent as application/problem+json; a client generated from the
    contract must not expect a plain JSON or text error body."""
    declared = {
        (path, method, status): sorted(response.get("content", {}))
        for path, operations in current_spec()["paths"].items()
        for method, operation in operations.items()
        for status, response in operation["responses"].items()
        if status[0] in "45"
    }
    assert declared
    assert {k: v for k, v in declared.items() if v != ["application/problem+json"]} == {}


def test_every_route_declares_the_errors_every_route_of_its_kind_can_give() -> None:
    """The size limit stands in front of every route that takes a body (413); every /v1/ route
    refuses an unknown or repeated query parameter (422) and answers 503 when the database is
    busy or unreachable."""
    missing = []
    for path, method, op in operations():
        expected = {"413"} if "requestBody" in op else set()
        if path.startswith("/v1/"):
            expected |= {"422", "503"}
        if not expected <= op["responses"].keys():
            missing.append(f"{method} {path}: {sorted(expected - op['responses'].keys())}")
    assert missing == []
