"""Shared OpenAPI pieces: the problem+json schema and the error responses routes declare."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.errors import PROBLEM_JSON


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str | None = None
    row: int | None = Field(default=None, description="index of the failing row in a batch")


class Problem(BaseModel):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
    request_id: str | None = None
    errors: list[FieldError] | None = None


_DESCRIPTIONS = {
    400: "Malformed request",
    401: "Missing or invalid bearer token",
    403: "The caller's roles lack the permission",
    404: "Not found (or not visible to this caller)",
    409: "Conflicts with the current state",
    410: "Gone: closed, expired or crypto-shredded",
    413: "Body larger than the limit",
    422: "Request does not validate; errors name the fields and rows",
    503: "Temporarily unavailable (database or access log busy); nothing was changed",
}


PROBLEM_SCHEMA = "#/components/schemas/Problem"


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {
            "model": Problem,
            "description": _DESCRIPTIONS[status],
            "content": {PROBLEM_JSON: {"schema": {"$ref": PROBLEM_SCHEMA}}},
        }
        for status in statuses
    }


AUTH_ERRORS = problem_responses(401, 403)


def problems_only(spec: dict[str, Any]) -> dict[str, Any]:
    """The document with every error response declared as ``application/problem+json`` alone:
    FastAPI adds the route's own media type (``application/json``, ``text/plain``) beside the
    one ``problem_responses`` declares, though errors are only ever sent as problem+json.

    And with the errors every route of a kind can give, whether or not the route declares them:
    413 wherever a body is taken (the size limit stands in front of every route); 422 (an
    unknown or repeated query parameter) and 503 (the database busy or unreachable) on every
    ``/v1/`` route."""
    for path, operations in spec.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            universal = [413] if "requestBody" in operation else []
            if path.startswith("/v1/"):
                universal += [422, 503]
            for status in universal:
                responses.setdefault(
                    str(status),
                    {
                        "description": _DESCRIPTIONS[status],
                        "content": {PROBLEM_JSON: {"schema": {"$ref": PROBLEM_SCHEMA}}},
                    },
                )
            for status, response in operation.get("responses", {}).items():
                content = response.get("content")
                if str(status)[0] in "45" and content and PROBLEM_JSON in content:
                    response["content"] = {PROBLEM_JSON: content[PROBLEM_JSON]}
    return spec
