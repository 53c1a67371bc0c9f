"""JSON request bodies read as the README promises: UTF-8 text, each field name once per object.

Starlette's ``Request.json`` hands the bytes to ``json.loads``, which also takes UTF-16, UTF-32
and a UTF-8 byte order mark, and keeps the last of two values under one name. Two readers of
the same batch (a source's own checks, a proxy, this service) could then see different
identities in it. Every route here reads its body through ``JsonRoute`` instead: bytes that are
not UTF-8 and a repeated field name are refused (422, ``service.errors``), before any model
sees them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute


class RepeatedFieldName(ValueError):
    """An object in the body names one field twice (the name is not kept: it is caller text)."""

    def __init__(self) -> None:
        super().__init__("a field name appears twice in one object")


def _each_name_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    fields = dict(pairs)
    if len(fields) != len(pairs):
        raise RepeatedFieldName
    return fields


def parse_json_body(body: bytes) -> Any:
    """The body as JSON; UnicodeDecodeError when it is not UTF-8 (a byte order mark is a
    ``JSONDecodeError``), RepeatedFieldName when an object names a field twice."""
    return json.loads(body.decode("utf-8"), object_pairs_hook=_each_name_once)


class _JsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body())
        return self._json


class JsonRoute(APIRoute):
    """An ``APIRoute`` whose handler reads JSON bodies with ``parse_json_body``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def read_strictly(request: Request) -> Response:
            return await handler(_JsonRequest(request.scope, request.receive))

        return read_strictly
