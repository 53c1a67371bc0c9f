"""The ASGI application: settings, policies, keys and the database are wired here, once.

Start-up fails fast, with a message naming the file or variable, when a policy file is invalid,
keys are missing or the settings are unsafe. ``create_app`` builds everything synchronously so a
broken configuration never serves a single request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BaseModel
from sqlalchemy import text
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.access_log.router import install as install_access_log
from service.auth.router import router as auth_router
from service.auth.tokens import DevIssuer, KeySet, TokenVerifier
from service.config import Settings, get_settings
from service.crypto.issuer_keys import load_or_create_private_pem
from service.crypto.keyring import Keyring
from service.db import Database
from service.errors import (
    UnexpectedErrors,
    UnknownInput,
    install_error_handlers,
    problem,
    request_path,
    route_words,
    shown_path,
)
from service.flagging.router import router as flagging_router
from service.openapi import problem_responses, problems_only
from service.packets.opens import PacketOpens
from service.packets.router import router as packets_router
from service.packets.service import apply_lowered_ttl, shred_periodically
from service.policies import load_policies
from service.records.router import router as records_router
from service.request_body import JsonRoute

logger = logging.getLogger("casepackets")
# A caller's X-Request-ID is kept only when it is a UUID (with or without dashes): it is written
# into the append-only access log, so it may not carry free text such as a name or a BSN.
REQUEST_ID = re.compile(r"[0-9a-f]{8}(-?)[0-9a-f]{4}\1[0-9a-f]{4}\1[0-9a-f]{4}\1[0-9a-f]{12}")


# The API routes that take many rows in one body: ``max_body_bytes`` (16 MiB by default). Every
# other API route takes one small object (the largest, a follow-up with a 4,000-character note,
# stays under 50 KiB even with every character escaped), and gets ``SMALL_BODY_BYTES``: parsing a
# body costs the worker's event loop about a second for 16 MiB, which no caller should be able
# to spend on a follow-up.
BULK_PATHS = frozenset({"/v1/records/batch", "/v1/flags"})
SMALL_BODY_BYTES = 256 * 1024


class BodySizeLimit:
    """Refuse bodies over the path's limit with 413 before any route parses them:
    ``max_bytes`` for the bulk routes (``BULK_PATHS``) and paths outside the API, at most
    ``SMALL_BODY_BYTES`` for every other API route.

    A declared ``Content-Length`` over the limit is refused without reading; a chunked body is
    counted as it arrives and refused as soon as it passes the limit.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.small_max_bytes = min(max_bytes, SMALL_BODY_BYTES)

    def limit_of(self, path: str) -> int:
        if path.startswith("/v1/") and path not in BULK_PATHS:
            return self.small_max_bytes
        return self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_of(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await self._refuse(scope, receive, send, limit)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(scope, receive, send, limit)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        # Inside RequestId: the body carries the request's id and path like every other problem.
        response = problem(
            413,
            f"request body is larger than {limit} bytes",
            request=Request(scope),
        )
        await response(scope, receive, send)


class RequestId:
    """Give every request an id (the caller's ``X-Request-ID`` if it is a UUID, else a fresh one) in
    ``request.state.request_id``, echo it as ``X-Request-ID`` and default ``Cache-Control`` to
    ``no-store``.

    Plain ASGI rather than ``@app.middleware("http")``: no extra task, stream or response object
    per request, which every route paid for.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                given = value.decode("latin-1")
                break
        given = given.lower()
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        # request.state reads scope["state"].
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = request_id
                if "cache-control" not in headers:
                    headers["Cache-Control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)


class SafeAccessLog(logging.Filter):
    """uvicorn's access-log line with its path cut down to what is safe to keep in a log
    (``shown_path``: the routes' own words and the ids the service hands out; any other segment,
    a national id or name typed into a URL, becomes ``…``, and a query string ``?…``). What the
    caller sent still reaches the routes unchanged."""

    def __init__(self, words: frozenset[str]) -> None:
        super().__init__()
        self.words = words

    def shown(self, path: str) -> str:
        return shown_path(path, self.words)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                self.shown(arg) if isinstance(arg, str) and arg.startswith("/") else arg
                for arg in record.args
            )
        return True


def install_safe_access_log(app: FastAPI) -> None:
    """Filter uvicorn's access log (one filter per process, for the app created last)."""
    words = route_words(app.routes)
    access = logging.getLogger("uvicorn.access")
    for old in [f for f in access.filters if isinstance(f, SafeAccessLog)]:
        access.removeFilter(old)
    access.addFilter(SafeAccessLog(words))


def _query_names(dependant: Dependant) -> set[str]:
    """The query parameters a route takes, its dependencies' included."""
    names = {field.alias for field in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def _takes_body(dependant: Dependant) -> bool:
    return bool(dependant.body_params) or any(_takes_body(sub) for sub in dependant.dependencies)


# Methods whose body the routes would act on: a body sent with GET or HEAD means nothing.
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


async def refuse_unknown_input(request: Request) -> None:
    """422 for a query parameter the route does not take, as for an unknown body field: a typo
    (``?stauts=closed``) must not quietly answer another question; the name is not echoed. And
    422 for a body sent to a route that takes none (``POST /close`` with ``{"force": true}``
    would otherwise succeed as if the field had been understood). A route that needs a token
    has verified it before this runs (``JsonRoute``): a caller without one gets 401 and learns
    nothing of the parameters a route takes; one whose roles lack the route's permission gets
    its logged 403 (``service.access_log.guard``), so no stray parameter keeps a refusal out of
    the log."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not route.path.startswith("/v1/"):
        return  # health probes: whatever a load balancer appends is harmless there
    if getattr(request.state, "turned_away", False):
        return  # the route's require() refuses this caller, logged (JsonRoute said so)
    if request.method in _WRITES and not _takes_body(route.dependant):
        headers = request.headers
        if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
            raise UnknownInput(
                f"{request_path(request)} takes no request body; send none",
                errors=[{"loc": ["body"], "msg": "this route takes no body"}],
            )
    if not request.query_params:
        return
    accepted = _query_names(route.dependant)  # a few fields; only requests with a query pay
    if not accepted.issuperset(request.query_params.keys()):
        takes = ", ".join(sorted(accepted)) if accepted else "none"
        raise UnknownInput(
            f"unknown query parameter; {request_path(request)} takes: {takes}",
            errors=[{"loc": ["query"], "msg": f"unknown parameter (accepted: {takes})"}],
        )
    # Every parameter takes one value: of two, the last would quietly win
    # (``?status=closed&status=assigned`` would answer for assigned packets alone).
    repeated = sorted(name for name in accepted if len(request.query_params.getlist(name)) > 1)
    if repeated:
        raise UnknownInput(
            f"query parameters given more than once: {', '.join(repeated)}; give each once",
            errors=[{"loc": ["query", name], "msg": "given more than once"} for name in repeated],
        )


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}


def create_app(settings: Settings | None = None, *, database: Database | None = None) -> FastAPI:
    settings = settings or get_settings()
    policies = load_policies(settings.policies_dir)

    dev_issuer: DevIssuer | None = None
    static_keys: list[dict[str, Any]] = []
    if settings.dev_issuer:
        dev_issuer = DevIssuer(
            private_pem=load_or_create_private_pem(
                settings.dev_issuer_key_path, settings.jwt_algorithm
            ),
            algorithm=settings.jwt_algorithm,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        )
        static_keys.append(dev_issuer.public_jwk)
    if settings.jwks_file:
        pinned = KeySet.from_file(settings.jwks_file, algorithm=settings.jwt_algorithm)
        static_keys.extend(pinned.public_jwks()["keys"])
    if not (static_keys or settings.jwks_url):
        raise RuntimeError(
            "no token keys: set CASEPACKETS_JWKS_FILE or CASEPACKETS_JWKS_URL, "
            "or enable the built-in issuer (CASEPACKETS_DEV_ISSUER=true) outside production"
        )
    keys = KeySet(
        static_keys,
        algorithm=settings.jwt_algorithm,
        url=settings.jwks_url,
        max_age_seconds=settings.jwks_refresh_seconds,
    )
    verifier = TokenVerifier(
        algorithm=settings.jwt_algorithm,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        roles_claim=settings.roles_claim,
        keys=keys,
        leeway_seconds=settings.token_leeway_seconds,
        max_lifetime_seconds=settings.token_max_lifetime_seconds,
    )
    database = database or Database(settings)
    # Production refuses to start without the keyring (`casepackets keys init`); development and
    # test create it on first use, like the built-in issuer's key.
    keyring = (
        Keyring.load(settings.resolved_keyring_path)
        if settings.env == "production"
        else Keyring.load_or_init(settings.resolved_keyring_path)
    )

    packet_opens = PacketOpens(database=database, bound_seconds=settings.log_lock_timeout_seconds)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Before the first request: a packet_ttl_days lowered since the packets were built binds
        # them from now on (an open of one past it gets 410, like any expired packet). If it
        # fails, the service still starts (readiness reports the database); the rounds go on.
        expiries_pending = await asyncio.to_thread(
            apply_lowered_ttl,
            database=database,
            retention=policies.retention,
            actor="system:startup",
        )
        shredder = None
        if settings.shred_interval_seconds > 0:
            shredder = asyncio.create_task(
                shred_periodically(
                    database=database,
                    retention=policies.retention,
                    interval_seconds=settings.shred_interval_seconds,
                    expiries_pending=expiries_pending,
                )
            )
        yield
        if shredder is not None:
            shredder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await shredder
        packet_opens.dispose()
        database.dispose()

    # The interactive docs load their scripts from a CDN into a browser that holds a token, and
    # are served without one: development only. The contract itself is openapi/openapi.json.
    browsable = settings.env != "production"
    app = FastAPI(
        title="casepackets",
        version="1.0.0",
        summary="Per-professional case packets over pseudonymized records, with a verifiable "
        "access log",
        lifespan=lifespan,
        dependencies=[Depends(refuse_unknown_input)],
        responses=problem_responses(422),
        # No 307 from /v1/packets/ to /v1/packets: Starlette builds its Location from the Host
        # header and the scheme it sees (http behind a proxy that ends TLS), and a client that
        # follows it sends its token and its body there. A path is served as written, or 404.
        redirect_slashes=False,
        openapi_url="/openapi.json" if browsable else None,
        docs_url="/docs" if browsable else None,
        redoc_url="/redoc" if browsable else None,
    )
    app.router.route_class = JsonRoute  # routes added on the app itself (the routers set theirs)
    app.state.settings = settings
    app.state.database = database
    app.state.keyring = keyring
    app.state.packet_opens = packet_opens
    app.state.access_policy = policies.access
    app.state.flagging_policy = policies.flagging
    app.state.partitioning_policy = policies.partitioning
    app.state.retention_policy = policies.retention
    app.state.followup_policy = policies.followups
    app.state.token_verifier = verifier
    app.state.dev_issuer = dev_issuer

    install_error_handlers(app)
    generated = app.openapi
    app.openapi = lambda: problems_only(generated())  # type: ignore[method-assign]

    # The last one added runs outermost: RequestId wraps UnexpectedErrors, so a 500 carries the
    # request id.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(UnexpectedErrors)
    app.add_middleware(RequestId)

    @app.get("/healthz", response_model=Health, tags=["health"], summary="Liveness")
    def healthz() -> Health:
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Health,
        tags=["health"],
        summary="Readiness: database reachable, keys loaded",
        responses=problem_responses(503),
    )
    def readyz(request: Request) -> Any:
        checks: dict[str, str] = {}
        try:
            with database.reading() as session:
                session.connection().execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unreachable ({type(exc).__name__})"
        checks["token_keys"] = verifier.keys.readiness()
        for name, check in request.app.state.readiness_checks.items():
            checks[name] = check()
        if any(value != "ok" for value in checks.values()):
            failing = ", ".join(k for k, v in checks.items() if v != "ok")
            return problem(503, f"not ready: {failing}", request=request)
        return Health(status="ok", checks=checks)

    app.state.readiness_checks = {}
    app.include_router(auth_router)
    app.include_router(records_router)
    app.include_router(flagging_router)
    app.include_router(packets_router)
    install_access_log(app)
    install_safe_access_log(app)
    return app
