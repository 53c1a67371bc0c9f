"""Auth routes: the built-in issuer's JWKS and the caller's own view of their rights."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel

from service.auth.dependencies import CurrentCaller
from service.errors import NotFound
from service.openapi import AUTH_ERRORS, problem_responses
from service.request_body import JsonRoute

router = APIRouter(route_class=JsonRoute, tags=["auth"])


class JwksPublic(BaseModel):
    keys: list[dict[str, Any]]


class CallerPublic(BaseModel):
    sub: str
    roles: list[str]
    permissions: list[str]


@router.get(
    "/.well-known/jwks.json",
    response_model=JwksPublic,
    responses=problem_responses(404),
    summary="Public keys of the built-in development issuer",
)
def jwks(request: Request) -> JwksPublic:
    issuer = request.app.state.dev_issuer
    if issuer is None:
        raise NotFound("the built-in issuer is off; keys come from the identity provider")
    return JwksPublic(keys=[issuer.public_jwk])


@router.get(
    "/v1/me",
    response_model=CallerPublic,
    responses=AUTH_ERRORS,
    summary="Who the token says you are, and what you may do",
)
def me(caller: CurrentCaller) -> CallerPublic:
    return CallerPublic(
        sub=caller.sub,
        roles=sorted(caller.roles),
        permissions=sorted(p.value for p in caller.permissions),
    )
