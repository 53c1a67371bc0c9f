"""FastAPI dependencies that turn a bearer token into a ``Caller`` and enforce permissions.

Invariant: every route but health and the JWKS document depends on ``require(...)``; a request
without a valid token gets 401 (with ``WWW-Authenticate``), one without the permission 403.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.auth.permissions import AccessPolicy, Permission, known_roles
from service.auth.tokens import InvalidToken, TokenVerifier
from service.errors import Forbidden, Unauthenticated

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
    return Caller(
        sub=token.subject,
        roles=roles,
        permissions=policy.permissions_for(roles),
        request_id=getattr(request.state, "request_id", None),
    )


CurrentCaller = Annotated[Caller, Depends(authenticate)]


def require(permission: Permission) -> Any:
    """``caller: Annotated[Caller, require(Permission.X)]`` — 403 unless the caller has X."""

    async def _check(caller: CurrentCaller) -> Caller:
        if not caller.can(permission):
            raise Forbidden(f"this action needs the permission {permission.value!r}")
        return caller

    return Depends(_check)
