"""Every error a client sees is RFC 9457 ``application/problem+json``.

Guarantees:
- services raise ``ServiceError`` subclasses (no FastAPI import); one handler renders them;
- validation errors name the field and row but never echo the submitted value, because the value
  may be a national id or a name, nor the name of an unknown field, for the same reason;
- a problem lists at most ``LISTED_ERRORS`` errors, and its detail says how many there were;
- unexpected exceptions become a bare 500 with the request id; their type and frames go to the
  server log, never their message (it may quote an identity), and never anything to the client;
- a path is shown (in ``instance``, a detail or the server log) with only the routes' own words and
  the ids the service hands out: a national id or a name typed into a URL becomes ``…``.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Iterable, Iterator, Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PROBLEM_JSON = "application/problem+json"
logger = logging.getLogger("casepackets")

# Enough to correct a body by; a bad body can hold a million errors, and listing them all would
# cost a response many times its size.
LISTED_ERRORS = 100


# What a path segment may show besides the routes' own words: the ids the service hands out (a
# lowercase UUID, 32 lowercase hex characters).
_SHOWN_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}")


def shown_path(path: str, words: frozenset[str]) -> str:
    """``path`` with every segment that is neither one of ``words`` nor a service id shown as
    ``…``, and a query string as ``?…``."""
    path, query, _ = path.partition("?")
    kept = [part if part in words or _SHOWN_ID.fullmatch(part) else "…" for part in path.split("/")]
    return "/".join(kept) + ("?…" if query else "")


def served_routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """The routes themselves, with those of included routers (which recent FastAPI versions
    keep as one entry holding the ``original_router``; no router here is included under an
    extra prefix, so their paths are the served ones)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is None:
            yield route
        else:
            yield from served_routes(inner.routes)


def route_words(routes: Iterable[BaseRoute]) -> frozenset[str]:
    """The fixed segments of the routes' paths (``v1``, ``packets``, ``clients`` …)."""
    return frozenset(
        part
        for route in served_routes(routes)
        for part in str(getattr(route, "path", "")).split("/")
        if "{" not in part
    )


def request_path(request: Request) -> str:
    """The request's path as a response or the server log may show it: ``shown_path`` with the
    words of the app's routes (found again only when routes were added)."""
    app = request.app
    cached: tuple[int, frozenset[str]] | None = getattr(app.state, "route_words", None)
    if cached is None or cached[0] != len(app.routes):
        cached = (len(app.routes), route_words(app.routes))
        app.state.route_words = cached
    return shown_path(request.url.path, cached[1])


class RefusedObject(ValueError):
    """An object in a JSON body that no model may read (``service.request_body``); the message
    names no field (field names are caller text)."""


class ServiceError(Exception):
    """A domain error with the HTTP status it maps to. ``detail`` must never hold an identity."""

    status: int = 400
    title: str | None = None
    # True for refusals that must still leave their access-log entry (a denied packet open):
    # the request's transaction commits what was flushed before the error is rendered.
    commit_before_raising: bool = False

    def __init__(
        self,
        detail: str,
        *,
        errors: Sequence[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = list(errors) if errors else None
        self.headers = headers


class BadRequest(ServiceError):
    status = 400


class Unauthenticated(ServiceError):
    status = 401

    def __init__(self, detail: str, *, token_sent: bool = True) -> None:
        # RFC 6750 section 3.1: a request without credentials gets no error code.
        challenge = 'Bearer realm="casepackets"'
        if token_sent:
            challenge += ', error="invalid_token"'
        super().__init__(detail, headers={"WWW-Authenticate": challenge})


class Forbidden(ServiceError):
    status = 403


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class Gone(ServiceError):
    status = 410


class PayloadTooLarge(ServiceError):
    status = 413


class Unprocessable(ServiceError):
    status = 422


class UnknownInput(Unprocessable):
    """Input the route does not take at all: a stray or repeated query parameter, or a body sent
    to a route that takes none (``service.main.refuse_unknown_input``)."""


class Unavailable(ServiceError):
    status = 503


class ProblemResponse(JSONResponse):
    media_type = PROBLEM_JSON


def problem(
    status: int,
    detail: str,
    *,
    request: Request | None = None,
    title: str | None = None,
    errors: Sequence[dict[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> ProblemResponse:
    if errors and len(errors) > LISTED_ERRORS:
        detail += f" ({len(errors)} errors; the first {LISTED_ERRORS} are listed)"
        errors = errors[:LISTED_ERRORS]
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if request is not None:
        body["instance"] = request_path(request)
        request_id = getattr(request.state, "request_id", None)
        if request_id:
            body["request_id"] = request_id
    if errors:
        body["errors"] = list(errors)
    return ProblemResponse(body, status_code=status, headers=dict(headers) if headers else None)


UNKNOWN_FIELD = "(unknown field)"


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Field paths and messages only: the offending input is deliberately left out."""
    cleaned = []
    for err in exc.errors():
        loc = [part for part in err.get("loc", ()) if part != "body"]
        entry: dict[str, Any] = {"loc": loc, "msg": str(err.get("msg", "invalid"))}
        if err.get("type") == "extra_forbidden" and loc:
            # The name of a field no model has is text the caller typed (a name or a national
            # id pasted as a key): where it was is said, the name itself is not.
            entry = {"loc": [*loc[:-1], UNKNOWN_FIELD], "msg": "unknown field; not accepted here"}
        if err.get("type") == "json_invalid":
            # FastAPI puts the character offset where a field name belongs; the decoder's reason
            # ("Expecting value") never quotes the body, unlike the rest of its error.
            position = f" (at character {loc[0]})" if loc and isinstance(loc[0], int) else ""
            reason = str(err.get("ctx", {}).get("error", "malformed"))
            entry = {"loc": [], "msg": f"the body is not valid JSON{position}: {reason}"}
        if err.get("type"):
            entry["type"] = err["type"]
        if (
            len(loc) >= 2
            and loc[0] in ("subjects", "rows", "flags", "items")
            and isinstance(loc[1], int)
        ):
            entry["row"] = loc[1]
        cleaned.append(entry)
    return cleaned


def _validation_detail(exc: RequestValidationError, errors: Sequence[dict[str, Any]]) -> str:
    """Say why the body could not be read, or else name the failing fields."""
    if isinstance(exc.body, bytes):
        # FastAPI parses a body as JSON only under a JSON Content-Type (not even when the header
        # is missing) and otherwise validates the raw bytes, which no body model accepts.
        return "the body must be sent as JSON, with Content-Type: application/json"
    for error in errors:
        if error.get("type") == "json_invalid":
            return str(error["msg"])
    fields = sorted({".".join(str(p) for p in e["loc"]) or "body" for e in errors})
    shown = ", ".join(fields[:10]) + (" …" if len(fields) > 10 else "")
    return f"request is invalid: {shown}"


# FastAPI's detail when a JSON body could be read as bytes but not decoded (not UTF-8, an object
# ``parse_json_body`` refuses, nested past the recursion limit, an integer of more digits than
# Python converts); the decoder's own ``JSONDecodeError`` comes as a validation error instead
# (``json_invalid``).
FASTAPI_BODY_UNREADABLE = "There was an error parsing the body"


def _unreadable_body_reason(cause: BaseException | None) -> str:
    if isinstance(cause, RefusedObject):
        return str(cause)
    if isinstance(cause, UnicodeDecodeError):
        return "it is not UTF-8 text"
    if isinstance(cause, RecursionError):
        return "it is nested too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "a number in it has too many digits"
    return "it cannot be read"


class UnexpectedErrors:
    """Answer an exception no handler took with a bare 500 problem, log it once, and stop it.

    The log line holds the exception's type, the request id and the stack frames, never the
    message or the chained causes: those may quote an identity, a key or a token. Nothing is
    re-raised: Starlette's ``ServerErrorMiddleware`` would re-raise it to the server, and uvicorn
    logs an escaped exception in full ("Exception in ASGI application"). If the response had
    already started, it is left incomplete and the server closes the connection.

    Install it inside ``RequestId`` so the 500 carries the request id.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        response_started = False

        async def send_tracking_start(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking_start)
        except Exception as exc:
            request = Request(scope)
            logger.error(
                "unhandled %s on %s %s (request %s)\n%s",
                type(exc).__name__,
                request.method,
                request_path(request),
                getattr(request.state, "request_id", "-"),
                "".join(traceback.format_tb(exc.__traceback__)),
            )
            if not response_started:
                response = problem(
                    500,
                    "internal error; the request id identifies it in the server log",
                    request=request,
                )
                await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> ProblemResponse:
        return problem(
            exc.status,
            exc.detail,
            request=request,
            title=exc.title,
            errors=exc.errors,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> ProblemResponse:
        errors = _validation_errors(exc)
        return problem(422, _validation_detail(exc, errors), request=request, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> ProblemResponse:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 400 and detail == FASTAPI_BODY_UNREADABLE:
            reason = _unreadable_body_reason(exc.__cause__)
            return problem(
                422,
                f"the body is not valid JSON: {reason}",
                request=request,
                errors=[{"loc": [], "msg": f"the body is not valid JSON: {reason}"}],
            )
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request_path(request)}"
        if exc.status_code == 405:
            detail = f"method {request.method} is not allowed on {request_path(request)}"
        return problem(exc.status_code, detail, request=request, headers=exc.headers)

    @app.exception_handler(DataError)
    async def _unstorable_value(request: Request, exc: DataError) -> ProblemResponse:
        # The driver's message quotes the value; only its class is logged.
        logger.info(
            "database refused a value on %s: %s", request_path(request), type(exc.orig).__name__
        )
        return problem(
            422,
            "a value cannot be stored: it is out of range or holds a character the database "
            "refuses (such as NUL); nothing was changed",
            request=request,
        )

    @app.exception_handler(OperationalError)
    async def _db_unavailable(request: Request, exc: OperationalError) -> ProblemResponse:
        logger.warning(
            "database operational error on %s: %s", request_path(request), type(exc.orig)
        )
        return _busy(request)

    @app.exception_handler(PoolTimeout)
    async def _no_connection_free(request: Request, exc: PoolTimeout) -> ProblemResponse:
        logger.warning("no database connection came free in time on %s", request_path(request))
        return _busy(request)


def _busy(request: Request) -> ProblemResponse:
    return problem(
        503,
        "the database is busy or unreachable; nothing was changed, try again",
        request=request,
        headers={"Retry-After": "1"},
    )
