"""JSON request bodies read as the README promises: UTF-8 text, each field name once per object,
at most ``MAX_FIELDS`` fields per object.

Starlette's ``Request.json`` hands the bytes to ``json.loads``, which also takes UTF-16, UTF-32
and a UTF-8 byte order mark, and keeps the last of two values under one name. Two readers of
the same batch (a source's own checks, a proxy, this service) could then see different
identities in it. Every route here reads its body through ``JsonRoute`` instead: bytes that are
not UTF-8 and a repeated field name are refused (422, ``service.errors``), before any model
sees them. So is an object of more fields than any model has: each unknown field is an error,
and a body of a million of them would cost seconds and a gigabyte to list.

Parsing a large body costs the event loop most of a second, so a route that needs a token
verifies it first: a request without a valid one gets its 401 and its body is never parsed (it
was received, up to the size limit, by ``service.main.BodySizeLimit``); nor is the body of a
caller whose roles lack the route's permission, who gets the logged 403.

A route may name a judge (``judged_before_its_input``) that hears a request the route cannot
take as sent before its 422 is given: the packet routes answer a caller who may not act on the
packet with the same logged 404 as for any of their requests, so a stray parameter or a body
that does not fit keeps no attempt out of the access log.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.types import Message

from service.access_log.guard import required_permissions
from service.auth.dependencies import Caller, authenticate_request, requires_token
from service.errors import RefusedObject, UnknownInput

# No request model has a quarter as many.
MAX_FIELDS = 64


def _each_name_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len(pairs) > MAX_FIELDS:
        raise RefusedObject(f"an object has more than {MAX_FIELDS} fields")
    fields = dict(pairs)
    if len(fields) != len(pairs):
        raise RefusedObject("a field name appears twice in one object")
    return fields


def parse_json_body(body: bytes) -> Any:
    """The body as JSON; UnicodeDecodeError when it is not UTF-8 (a byte order mark is a
    ``JSONDecodeError``), RefusedObject when an object names a field twice or has more than
    ``MAX_FIELDS`` fields."""
    return json.loads(body.decode("utf-8"), object_pairs_hook=_each_name_once)


class _JsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body())
        return self._json


async def _no_body() -> Message:
    """What a route reads instead of the body of a caller it will refuse (its logged 403,
    ``service.access_log.guard``, comes before anything is said of the body)."""
    return {"type": "http.request", "body": b"", "more_body": False}


# Hears a request its route cannot take as sent, from a verified caller; answers instead of the
# 422 by raising (a ``ServiceError``), or returns to let the 422 go out.
Judge = Callable[[Request, Caller], Awaitable[None]]
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])
_JUDGE = "judged_before_its_input"


def judged_before_its_input(judge: Judge) -> Callable[[Endpoint], Endpoint]:
    """Mark a route's endpoint (below its ``@router`` decorator): a verified caller's request
    that the route cannot take as sent (``_about_the_input``) goes to ``judge`` before its 422."""

    def mark(endpoint: Endpoint) -> Endpoint:
        setattr(endpoint, _JUDGE, judge)
        return endpoint

    return mark


def _about_the_input(error: Exception) -> bool:
    """Whether ``error`` is a 422 about what was sent rather than a decision on it: a body that
    cannot be read or does not fit its model, a path or query value of the wrong shape, input
    the route does not take. (FastAPI's 400 for an unreadable body is answered as a 422,
    ``service.errors``.)"""
    if isinstance(error, HTTPException):
        return error.status_code == 400
    return isinstance(error, RequestValidationError | UnknownInput)


class JsonRoute(APIRoute):
    """An ``APIRoute`` whose handler reads JSON bodies with ``parse_json_body``, and only once
    the caller's token is verified when the route needs one: before FastAPI reads the body or
    solves a single dependency (so also before ``service.main.refuse_unknown_input``). A caller
    the route's ``require`` will refuse has no body read at all."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        needs_token = requires_token(self.dependant)
        required = required_permissions(self.dependant)
        judge: Judge | None = getattr(self.endpoint, _JUDGE, None)

        async def read_strictly(request: Request) -> Response:
            receive = request.receive
            caller: Caller | None = None
            if needs_token:
                caller = await authenticate_request(request)  # an anonymous body is never parsed
                if not required <= caller.permissions:
                    # The route's require() will refuse: its logged 403 comes before anything
                    # about the body or the query (service.main.refuse_unknown_input).
                    request.state.turned_away = True
                    receive = _no_body
            try:
                return await handler(_JsonRequest(request.scope, receive))
            except Exception as error:
                if judge is not None and caller is not None and _about_the_input(error):
                    await judge(request, caller)
                raise

        return read_strictly
