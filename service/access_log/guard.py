"""``require(permission)``: the route dependency that admits callers holding a permission and
logs everyone it turns away.

Invariant: a caller without the permission gets 403 only once a ``denied`` access-log entry has
committed, naming who tried (actor, roles, request id), the permission as the action and the
route (method and path template, never the values in the path) as the object; when the log
cannot take the entry within its bound, the answer is 503 and nothing else happens. Refusals that
say more than "lacks the permission" (a packet someone does not own, the log to a non-auditor)
are logged where they are decided, with their own action and object.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.dependencies.models import Dependant
from sqlmodel import Session

from service.access_log.service import LogEntry, append
from service.auth.dependencies import Caller, CurrentCaller
from service.auth.permissions import Permission
from service.db import SessionDep
from service.errors import Forbidden, ServiceError


class PermissionRefused(Forbidden):
    commit_before_raising = True  # the refusal keeps its ``denied`` entry


def route_of(request: Request) -> str:
    """``METHOD /path/{template}``: the route asked for, without what the caller put in it."""
    route = request.scope.get("route")
    return f"{request.method} {getattr(route, 'path', request.url.path)}"


class Require:
    """The dependency ``require`` returns. ``permission`` tells ``JsonRoute`` which permission
    the route needs (``required_permissions``); a subclass may log its refusal otherwise
    and raise another error for it."""

    refused: type[ServiceError] = PermissionRefused  # must commit before raising (its entry)

    def __init__(self, permission: Permission) -> None:
        self.permission = permission

    async def __call__(
        self, request: Request, session: SessionDep, caller: CurrentCaller
    ) -> Caller:
        if caller.can(self.permission):
            return caller
        await run_in_threadpool(self.log_refusal, request, session, caller)
        raise self.refused(f"this action needs the permission {self.permission.value!r}")

    def log_refusal(self, request: Request, session: Session, caller: Caller) -> None:
        append(
            session=session,
            entry=LogEntry.by(
                caller,
                action=self.permission.value,
                object_type="route",
                object_id=route_of(request),
                outcome="denied",
                reason=f"lacks {self.permission.value}",
            ),
        )


def require(permission: Permission) -> Any:
    """``caller: Annotated[Caller, require(Permission.X)]``: the caller if they hold X;
    otherwise a logged 403."""
    return Depends(Require(permission))


def required_permissions(dependant: Dependant) -> frozenset[Permission]:
    """The permissions the route, or a dependency of it, requires through ``require``."""
    found: set[Permission] = set()
    for sub in dependant.dependencies:
        if isinstance(sub.call, Require):
            found.add(sub.call.permission)
        found |= required_permissions(sub)
    return frozenset(found)
