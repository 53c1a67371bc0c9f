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
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.types import Message

from service.access_log.guard import required_permissions
from service.auth.dependencies import authenticate_request, requires_token
from service.errors import RefusedObject

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


class JsonRoute(APIRoute):
    """An ``APIRoute`` whose handler reads JSON bodies with ``parse_json_body``, and only once
    the caller's token is verified when the route needs one: before FastAPI reads the body or
    solves a single dependency (so also before ``service.main.refuse_unknown_input``). A caller
    the route's ``require`` will refuse has no body read at all."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        needs_token = requires_token(self.dependant)
        required = required_permissions(self.dependant)

        async def read_strictly(request: Request) -> Response:
            receive = request.receive
            if needs_token:
                caller = await authenticate_request(request)  # an anonymous body is never parsed
                if not required <= caller.permissions:
                    # The route's require() will refuse: its logged 403 comes before anything
                    # about the body or the query (service.main.refuse_unknown_input).
                    request.state.turned_away = True
                    receive = _no_body
            return await handler(_JsonRequest(request.scope, receive))

        return read_strictly
