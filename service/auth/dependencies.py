"""FastAPI dependencies that turn a bearer token into a ``Caller``.

Invariant: every route but health and the JWKS document depends on ``authenticate`` (through
``service.access_log.guard.require(...)`` or ``CurrentCaller``); a request without a valid token
gets 401 (with ``WWW-Authenticate``), one without the permission a logged 403. The 401 comes
before anything else about the request is looked at: ``service.request_body.JsonRoute``
verifies the token of every route that ``requires_token`` before it parses the body, and before
the query or the body is checked against what the route takes, so an anonymous caller costs no
parsing and learns nothing about a route's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.auth.permissions import AccessPolicy, Permission, known_roles
from service.auth.tokens import InvalidToken, TokenVerifier
from service.errors import Unauthenticated

bearer_scheme = HTTPBearer(auto_error=False, description="JWT from the configured issuer")


@dataclass(frozen=True)
class Caller:
    """Who is asking, with what rights, in which request (ids only, never an identity)."""

    sub: str
    roles: frozenset[str]
    permissions: frozenset[Permission]
    request_id: str | None  # None outside an HTTP request (a command-line or background job)

    @property
    def role(self) -> str:
        """The roles as one stable string, for access-log entries."""
        return ",".join(sorted(self.roles)) or "none"

    def can(self, permission: Permission) -> bool:
        return permission in self.permissions


async def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Caller:
    """The caller the bearer token names, verified once per request: the route class verifies
    it before reading the body (``authenticate_request``) and keeps the caller in
    ``request.state``, where this dependency then finds it."""
    verified = getattr(request.state, "caller", None)
    if isinstance(verified, Caller):
        return verified
    if len(request.headers.getlist("authorization")) > 1:
        # Which of them counts is each reader's guess (this one takes the first, a proxy in
        # front may take the last): a request naming two callers is neither of them.
        raise Unauthenticated("send one Authorization header, not several")
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthenticated(
            "a bearer token is required (Authorization: Bearer <token>)", token_sent=False
        )
    verifier: TokenVerifier = request.app.state.token_verifier
    policy: AccessPolicy = request.app.state.access_policy
    try:
        token = await verifier.verify_async(credentials.credentials)
    except InvalidToken as exc:
        raise Unauthenticated(str(exc)) from None
    roles = known_roles(token.roles)
    caller = Caller(
        sub=token.subject,
        roles=roles,
        permissions=policy.permissions_for(roles),
        request_id=getattr(request.state, "request_id", None),
    )
    request.state.caller = caller
    return caller


CurrentCaller = Annotated[Caller, Depends(authenticate)]


def requires_token(dependant: Dependant) -> bool:
    """Whether a route, or any dependency of it, depends on ``authenticate``."""
    return dependant.call is authenticate or any(
        requires_token(sub) for sub in dependant.dependencies
    )


async def authenticate_request(request: Request) -> Caller:
    """``authenticate`` outside dependency injection, for a route class to call before it
    reads the body; 401 when the token is missing or invalid."""
    return await authenticate(request, await bearer_scheme(request))
