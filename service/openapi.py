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


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {
            "model": Problem,
            "description": _DESCRIPTIONS[status],
            "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for status in statuses
    }


AUTH_ERRORS = problem_responses(401, 403)
