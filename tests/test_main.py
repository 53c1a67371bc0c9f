"""Health, problem+json errors, body limits and request ids, end to end over HTTP."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import text

from service import request_body
from service.access_log.guard import require
from service.auth.dependencies import Caller
from service.auth.permissions import Permission
from service.config import Settings
from service.errors import served_routes, shown_path
from service.main import SMALL_BODY_BYTES, create_app
from service.request_body import MAX_FIELDS, JsonRoute
from service.schemas import StrictModel
from tests.conftest import TokenFactory, bearer
from tests.packets.scenario import build_world

PROBLEM = "application/problem+json"
# Held in constants so the frames a 500 logs (which quote source lines) cannot contain them.
LEAKY_MESSAGE = "identity 123456782 must not leak"
LEAKY_CAUSE = "token eyJ-fake must not leak"

REQUEST_A = "0f8fad5b-d9cb-469f-a165-70867728950e"
REQUEST_B = "7c9e6679742540de944be07fc1f90ae7"
REQUEST_C = "6fa459ea-ee8a-3ca4-894e-db77e160355e"


class Thing(StrictModel):
    name: str
    count: int


def probe_router() -> APIRouter:
    router = APIRouter(route_class=JsonRoute)

    @router.post("/probe/things")
    def create_thing(
        thing: Thing, _caller: Annotated[Caller, require(Permission.RECORDS_INGEST)]
    ) -> dict[str, str]:
        return {"name": thing.name}

    @router.get("/probe/boom")
    def boom() -> None:
        raise RuntimeError("secret-bsn-123456782 must not leak")

    @router.get("/probe/leaky")
    def leaky() -> None:
        try:
            raise KeyError(LEAKY_CAUSE)
        except KeyError as cause:
            raise ValueError(LEAKY_MESSAGE) from cause

    return router


@pytest.fixture
def probed(app: FastAPI) -> Iterator[TestClient]:
    app.include_router(probe_router())
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_readyz_checks_database_and_keys(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json()["checks"]["database"] == "ok"
    assert response.json()["checks"]["token_keys"] == "ok"


def test_readyz_reads_beside_a_long_write_instead_of_calling_the_database_unreachable(
    app: FastAPI, client: TestClient
) -> None:
    """On SQLite every other transaction waits for the write lock; a partitioning holds it for
    seconds. An orchestrator must not take the service out of rotation for that."""
    with app.state.database.session() as writer:
        writer.connection().execute(text("UPDATE access_log_entries SET leaf_index = leaf_index"))
        response = client.get("/readyz")
        writer.rollback()
    assert response.status_code == 200, response.text
    assert response.json()["checks"] == {"database": "ok", "token_keys": "ok", "access_log": "ok"}


def test_readyz_is_503_when_the_database_is_unreachable(tmp_path: Path) -> None:
    settings = Settings(
        env="test",
        home=tmp_path,
        database_url="postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1",
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.headers["content-type"].startswith(PROBLEM)
    assert "database" in response.json()["detail"]


def test_a_request_that_finds_no_connection_free_gets_503_within_the_bound(
    settings: Settings,
) -> None:
    """Every connection is held (requests waiting for a lock, say): the next request waits for
    one no longer than the lock bound, and is answered like a lock wait that ran out."""
    bounded = settings.model_copy(update={"database_pool_size": 1, "log_lock_timeout_seconds": 0.3})
    app = create_app(bounded)
    engine = app.state.database.engine
    coordinator = bearer(app.state.dev_issuer.mint(subject="coord-1", roles=["coordinator"]))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/v1/packets", headers=coordinator).status_code == 200
        held = [engine.connect(), engine.connect()]  # the pool's one, and its one overflow
        try:
            began = time.monotonic()
            response = client.get("/v1/packets", headers=coordinator)
            waited = time.monotonic() - began
        finally:
            for connection in held:
                connection.close()
        assert client.get("/v1/packets", headers=coordinator).status_code == 200
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    assert response.json()["detail"].startswith("the database is busy")
    assert waited < 5, f"waited {waited:.1f} s for a connection (SQLAlchemy's default is 30 s)"


def test_unknown_route_is_404_problem(client: TestClient) -> None:
    response = client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith(PROBLEM)
    assert response.json()["detail"] == "no route /v1/…"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/packets/?limit=5"),
        ("POST", "/v1/records/batch/"),
        ("GET", "/v1/audit/checkpoint/"),
        ("GET", "/healthz/"),
    ],
)
def test_a_path_with_a_trailing_slash_is_404_problem_not_a_redirect(
    client: TestClient, token: TokenFactory, method: str, path: str
) -> None:
    """Starlette answered 307 to the path without the slash, an empty body whose Location it
    built from the request's Host header and the scheme it saw: behind a proxy that ends TLS, a
    client following it sent its token and a batch of identities again in clear http, and a
    forged Host sent them to another server."""
    headers = {**bearer(token("src-001", "source", "auditor")), "Host": "elsewhere.example"}
    body: dict[str, list[Any]] | None = {"subjects": []} if method == "POST" else None
    response = client.request(method, path, json=body, headers=headers, follow_redirects=False)
    assert response.status_code == 404, response.headers
    assert "location" not in response.headers
    assert response.headers["content-type"].startswith(PROBLEM)
    assert response.json()["detail"].startswith("no route /")


def test_a_path_is_shown_in_a_problem_without_what_was_typed_into_it(
    client: TestClient, token: TokenFactory
) -> None:
    """A national id or a name typed into a URL is not sent back, in ``instance`` or a detail;
    the routes' own words and the ids the service hands out are."""
    coordinator = bearer(token("coord-001", "coordinator"))
    packet = str(uuid.uuid4())
    for path, shown in (
        ("/v1/123456782/Jan%20Jansen", "/v1/…/…"),
        (f"/v1/packets/{packet}/clients/Jan%20Jansen/followups", None),
        (f"/v1/packets/{packet}/clients/{'a' * 32}/followups", None),
        ("/v1/flagging/runs/123456782", None),
    ):
        response = client.post(path, json={}, headers=coordinator)
        assert response.status_code in (403, 404, 405, 422), (path, response.text)
        assert "123456782" not in response.text
        assert "Jansen" not in response.text
        if shown is not None:
            assert response.json()["detail"].endswith(shown)
    own_words = client.post(
        f"/v1/packets/{packet}/clients/{'a' * 32}/followups", json={}, headers=coordinator
    )
    assert own_words.json()["instance"] == f"/v1/packets/{packet}/clients/{'a' * 32}/followups"
    run = client.get("/v1/flagging/runs/" + "x" * 5000, headers=coordinator)
    assert run.status_code == 422
    assert len(run.text) < 1000


def test_a_body_that_cannot_be_decoded_is_422_saying_why(
    probed: TestClient, token: TokenFactory
) -> None:
    for content, reason in (
        (b'{"name": "Jans\xe9n"}', "it is not UTF-8 text"),
        (b"[" * 100_000 + b"]" * 100_000, "it is nested too deeply"),
        (b'{"name": "a", "count": ' + b"9" * 5000 + b"}", "a number in it has too many digits"),
        ('{"name": "a", "count": 1}'.encode("utf-16"), "it is not UTF-8 text"),
        ('{"name": "a", "count": 1}'.encode("utf-32"), "it is not UTF-8 text"),
        (
            '{"name": "a", "count": 1}'.encode("utf-8-sig"),
            "Unexpected UTF-8 BOM (decode using utf-8-sig)",
        ),
        (b'{"name": "a", "count": 1, "name": "b"}', "a field name appears twice in one object"),
        (
            json.dumps({f"field{n}": n for n in range(MAX_FIELDS + 1)}).encode(),
            f"an object has more than {MAX_FIELDS} fields",
        ),
    ):
        response = probed.post(
            "/probe/things",
            content=content,
            headers={**bearer(token("s-1", "source")), "content-type": "application/json"},
        )
        assert response.status_code == 422, response.text
        assert response.headers["content-type"].startswith(PROBLEM)
        assert response.json()["detail"].startswith("the body is not valid JSON")
        assert response.json()["detail"].endswith(reason)


def test_every_route_reads_its_body_as_utf_8_with_each_field_name_once(app: FastAPI) -> None:
    """A router added without ``route_class=JsonRoute`` would read UTF-16 and let the last of
    two values under one name win: this fails until it has it."""
    routes = [route for route in served_routes(app.routes) if isinstance(route, APIRoute)]
    assert [route.path for route in routes if not isinstance(route, JsonRoute)] == []
    assert "/v1/records/batch" in {route.path for route in routes}


def test_a_request_without_a_token_is_challenged_without_an_error_code(
    client: TestClient,
) -> None:
    """RFC 6750 section 3.1: no error code when no credentials were sent; invalid_token when a
    token was sent and refused."""
    missing = client.get("/v1/me")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="casepackets"'
    refused = client.get("/v1/me", headers={"Authorization": "Bearer x.y.z"})
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == (
        'Bearer realm="casepackets", error="invalid_token"'
    )


def test_a_body_is_parsed_only_once_the_token_is_verified(
    probed: TestClient, token: TokenFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parsing a large body holds the event loop for most of a second: a caller without a
    valid token gets 401 and costs no parsing; one with a token is read as before."""
    parsed: list[bytes] = []
    parse = request_body.parse_json_body

    def recording_parse(body: bytes) -> object:
        parsed.append(body)
        return parse(body)

    monkeypatch.setattr(request_body, "parse_json_body", recording_parse)
    json_content = {"content-type": "application/json"}
    for headers in ({}, {"Authorization": "Bearer x.y.z"}):
        for content in (b'{"name": "a", "count": 1}', b'{"name": "123456782", '):
            refused = probed.post(
                "/probe/things", content=content, headers={**headers, **json_content}
            )
            assert parsed == []
            assert refused.status_code == 401, refused.text
            assert refused.headers["content-type"].startswith(PROBLEM)
            assert "123456782" not in refused.text
    created = probed.post(
        "/probe/things",
        content=b'{"name": "a", "count": 1}',
        headers={**bearer(token("s-1", "source")), **json_content},
    )
    assert created.status_code == 200, created.text
    assert parsed == [b'{"name": "a", "count": 1}']


def test_a_token_is_verified_once_per_request(
    app: FastAPI, probed: TestClient, token: TokenFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The route class verifies the token before the body is read; the ``authenticate``
    dependency then takes the caller it found instead of verifying again."""
    verifier = app.state.token_verifier
    verified: list[str] = []
    original = verifier.verify_async

    async def counting_verify(raw: str) -> object:
        verified.append(raw)
        return await original(raw)

    monkeypatch.setattr(verifier, "verify_async", counting_verify)
    source = token("s-1", "source")
    created = probed.post("/probe/things", json={"name": "a", "count": 1}, headers=bearer(source))
    assert created.status_code == 200, created.text
    assert verified == [source]


def _api_requests(app: FastAPI) -> list[tuple[str, str]]:
    """Every (method, url) of the API's routes, path parameters filled in."""
    filled = {
        "professional_id": "prof-001",
        "packet_id": str(uuid.uuid4()),
        "pseudonym": "0" * 32,
        "run_id": str(uuid.uuid4()),
    }
    return [
        (method, re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: filled.get(m[1], "x"), route.path))
        for route in served_routes(app.routes)
        if isinstance(route, APIRoute) and route.path.startswith("/v1/")
        for method in sorted(route.methods or ())
    ]


def test_every_api_route_needs_a_token_before_it_looks_at_the_input(
    client: TestClient, app: FastAPI
) -> None:
    """A request without a valid token gets 401 before any 422 about its query or its body:
    an unknown query parameter, a repeated one, a body sent to a route that takes none and
    malformed JSON tell an anonymous caller nothing about the API's shape (its OpenAPI
    document is not served in production)."""
    requests = _api_requests(app)
    assert ("GET", "/v1/audit/entries") in requests
    assert ("POST", "/v1/records/batch") in requests
    for credentials in ({}, {"Authorization": "Bearer x.y.z"}):
        for method, url in requests:
            for query, content in (
                ("?x=1", None),
                ("?start=0&start=1&123456782=1", None),
                ("", b'{"123456782": '),
                ("", b'{"force": true}'),
            ):
                headers = {**credentials, "content-type": "application/json"}
                refused = client.request(method, url + query, content=content, headers=headers)
                assert refused.status_code == 401, (method, url, query, refused.text)
                assert refused.headers["content-type"].startswith(PROBLEM)
                assert "takes" not in refused.json()["detail"]
                assert "123456782" not in refused.text
    assert client.get("/.well-known/jwks.json").status_code == 200
    assert client.get("/healthz?probe=1").status_code == 200


def test_with_a_token_the_input_is_refused_as_before(
    client: TestClient, token: TokenFactory
) -> None:
    auditor = bearer(token("audit-001", "auditor"))
    unknown = client.get("/v1/audit/entries?x=1", headers=auditor)
    assert unknown.status_code == 422, unknown.text
    assert unknown.json()["detail"] == (
        "unknown query parameter; /v1/audit/entries takes: end, start"
    )
    malformed = client.post(
        "/v1/records/batch",
        content=b"{",
        headers={**bearer(token("source-welfare", "source")), "content-type": "application/json"},
    )
    assert malformed.status_code == 422, malformed.text
    assert malformed.json()["detail"].startswith("the body is not valid JSON (at character 1)")
    # (a packet route judges first whether the caller may act on the packet: for a packet
    # that does not exist that is its logged 404, tests/packets/test_reidentify.py)
    coordinator = bearer(token("coord-001", "coordinator"))
    url = "/v1/professionals/prof-001/deactivate"
    bodied = client.post(url, json={"force": True}, headers=coordinator)
    assert bodied.status_code == 422, bodied.text
    # (an id typed into a path is shown as "…": it may be anything a caller typed)
    assert bodied.json()["detail"] == (
        "/v1/professionals/…/deactivate takes no request body; send none"
    )


def test_wrong_method_is_405_problem(client: TestClient) -> None:
    response = client.delete("/healthz")
    assert response.status_code == 405
    assert response.headers["content-type"].startswith(PROBLEM)
    assert "DELETE" in response.json()["detail"]


def test_missing_permission_is_403(probed: TestClient, token: TokenFactory) -> None:
    response = probed.post(
        "/probe/things", json={"name": "a", "count": 1}, headers=bearer(token("a-1", "analyst"))
    )
    assert response.status_code == 403
    assert response.headers["content-type"].startswith(PROBLEM)
    assert "records.ingest" in response.json()["detail"]


def test_unknown_fields_are_rejected_without_echoing_input(
    probed: TestClient, token: TokenFactory
) -> None:
    response = probed.post(
        "/probe/things",
        json={"name": "a", "count": "many", "bsn": "123456782"},
        headers=bearer(token("s-1", "source")),
    )
    assert response.status_code == 422
    body = response.json()
    assert response.headers["content-type"].startswith(PROBLEM)
    assert {tuple(e["loc"]) for e in body["errors"]} == {("count",), ("(unknown field)",)}
    assert "123456782" not in response.text
    assert "many" not in response.text


def test_malformed_json_is_422_naming_the_position_not_a_field(
    probed: TestClient, token: TokenFactory
) -> None:
    response = probed.post(
        "/probe/things",
        content=b'{"name": "123456782", ',
        headers={**bearer(token("s-1", "source")), "content-type": "application/json"},
    )
    assert response.status_code == 422
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["detail"] == (
        "the body is not valid JSON (at character 22): "
        "Expecting property name enclosed in double quotes"
    )
    assert body["errors"] == [{"loc": [], "msg": body["detail"], "type": "json_invalid"}]
    assert "123456782" not in response.text


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None]
)
def test_json_body_under_another_content_type_is_422_asking_for_application_json(
    probed: TestClient, token: TokenFactory, content_type: str | None
) -> None:
    headers = bearer(token("s-1", "source"))
    if content_type is not None:
        headers["content-type"] = content_type
    response = probed.post(
        "/probe/things", content=b'{"name": "123456782", "count": 1}', headers=headers
    )
    assert response.status_code == 422
    assert response.headers["content-type"].startswith(PROBLEM)
    assert response.json()["detail"] == (
        "the body must be sent as JSON, with Content-Type: application/json"
    )
    assert "123456782" not in response.text


def test_body_over_the_limit_is_413_before_parsing(probed: TestClient, app: FastAPI) -> None:
    limit = app.state.settings.max_body_bytes
    response = probed.post(
        "/probe/things",
        content=b"x" * (limit + 1),
        headers={"X-Request-ID": REQUEST_A},
    )
    assert response.status_code == 413
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert str(limit) in body["detail"]
    assert body["request_id"] == REQUEST_A == response.headers["X-Request-ID"]
    assert body["instance"] == "/probe/things"


def test_chunked_body_over_the_limit_is_413(probed: TestClient, app: FastAPI) -> None:
    limit = app.state.settings.max_body_bytes

    def chunks() -> Iterator[bytes]:
        for _ in range(limit // 65536 + 2):
            yield b"x" * 65536

    response = probed.post("/probe/things", content=chunks())
    assert response.status_code == 413
    assert response.json()["request_id"] == response.headers["X-Request-ID"]


@pytest.mark.parametrize("chunked", [True, False])
def test_a_body_of_exactly_the_limit_is_read_and_one_byte_more_is_413(
    probed: TestClient, app: FastAPI, token: TokenFactory, chunked: bool
) -> None:
    limit = app.state.settings.max_body_bytes
    headers = {**bearer(token("s-1", "source")), "content-type": "application/json"}

    def body(size: int) -> bytes:
        thing = b'{"name": "edge", "count": 1}'
        return thing + b" " * (size - len(thing))

    def chunks(content: bytes) -> Iterator[bytes]:
        for start in range(0, len(content), 65536):
            yield content[start : start + 65536]

    def sent(size: int) -> tuple[int, Any]:
        content = body(size)
        response = probed.post(
            "/probe/things", content=chunks(content) if chunked else content, headers=headers
        )
        return response.status_code, response.json()

    assert sent(limit) == (200, {"name": "edge"})
    status, problem = sent(limit + 1)
    assert status == 413
    assert str(limit) in problem["detail"]


@pytest.mark.parametrize("chunked", [True, False])
def test_a_route_that_takes_one_small_object_takes_at_most_256_kib(
    client: TestClient, token: TokenFactory, chunked: bool
) -> None:
    """Parsing a 16 MiB body holds a worker's event loop for about a second: only the routes
    that take many rows may be sent that much."""
    coordinator = {**bearer(token("coord-001", "coordinator")), "content-type": "application/json"}
    professional = json.dumps(
        {
            "id": "prof-001",
            "display_name": "Caseworker",
            "team": "Zuid",
            "districts": ["Charlois"],
            "capacity": 20,
        }
    ).encode()

    def sent(url: str, content: bytes, headers: dict[str, str]) -> Any:
        if chunked:
            pieces = [content[start : start + 65536] for start in range(0, len(content), 65536)]
            return client.post(url, content=iter(pieces), headers=headers)
        return client.post(url, content=content, headers=headers)

    padded = professional + b" " * (SMALL_BODY_BYTES + 1 - len(professional))
    refused = sent("/v1/professionals", padded, coordinator)
    assert refused.status_code == 413, refused.text
    assert refused.json()["detail"] == f"request body is larger than {SMALL_BODY_BYTES} bytes"
    assert sent("/v1/professionals", padded[:-1], coordinator).status_code == 201
    # a batch of that size is read (and refused for what it holds, not for its size)
    source = {**bearer(token("src-001", "source")), "content-type": "application/json"}
    batch = sent("/v1/records/batch", b'{"subjects": []}' + b" " * (4 * SMALL_BODY_BYTES), source)
    assert batch.status_code == 422, batch.text


def test_unexpected_error_is_500_without_details(probed: TestClient) -> None:
    response = probed.get("/probe/boom", headers={"X-Request-ID": REQUEST_B})
    assert response.status_code == 500
    assert response.headers["content-type"].startswith(PROBLEM)
    assert response.json()["request_id"] == REQUEST_B
    assert "secret-bsn" not in response.text
    assert "Traceback" not in response.text


def test_unexpected_error_is_logged_without_its_message_and_goes_no_further(
    app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    app.include_router(probe_router())
    caplog.set_level(logging.DEBUG)
    # raise_server_exceptions=True: an exception escaping the ASGI app is re-raised here, as it
    # would reach uvicorn, which logs it with its message and causes.
    with TestClient(app) as strict_client:
        response = strict_client.get("/probe/leaky", headers={"X-Request-ID": REQUEST_C})

    assert response.status_code == 500
    assert response.headers["content-type"].startswith(PROBLEM)
    assert response.headers["x-request-id"] == REQUEST_C
    assert response.json()["request_id"] == REQUEST_C
    assert LEAKY_MESSAGE not in response.text
    [logged] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert logged.name == "casepackets"
    assert logged.getMessage().startswith(
        f"unhandled ValueError on GET /probe/leaky (request {REQUEST_C})"
    )
    assert "in leaky" in logged.getMessage()
    assert logged.exc_info is None
    for secret in ("123456782", "eyJ-fake"):
        assert secret not in caplog.text


def test_request_id_is_echoed_when_a_uuid_or_generated(client: TestClient) -> None:
    for given, kept in (
        ("0f8fad5b-d9cb-469f-a165-70867728950e", "0f8fad5b-d9cb-469f-a165-70867728950e"),
        ("7C9E6679742540DE944BE07FC1F90AE7", "7c9e6679742540de944be07fc1f90ae7"),
    ):
        assert client.get("/healthz", headers={"X-Request-ID": given}).headers["x-request-id"] == (
            kept
        )
    # Free text never reaches the access log through the request id (nor a half-dashed UUID).
    for refused in (
        "abc-1",
        "Jan.Jansen-bsn-123456782",
        "bad id\n",
        "0f8fad5b-d9cb469f-a165-70867728950e",
        "0f8fad5b-d9cb-469f-a165-70867728950e\n",
    ):
        generated = client.get("/healthz", headers={"X-Request-ID": refused}).headers[
            "x-request-id"
        ]
        assert generated != refused.lower()
        assert re.fullmatch(r"[0-9a-f]{32}", generated)


def test_production_starts_not_ready_while_the_identity_provider_is_unreachable(
    tmp_path: Path,
) -> None:
    from service.crypto.keyring import Keyring

    Keyring.init(tmp_path / "keyring.json")
    settings = Settings(
        env="production",
        home=tmp_path,
        dev_issuer=False,
        jwks_url="https://127.0.0.1:1/jwks",
        checkpoint_origin="casepackets.example.nl/access-log",
        database_url=f"sqlite:///{tmp_path}/p.db",
        shred_interval_seconds=0,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert "token_keys" in ready.json()["detail"]
        assert client.get("/.well-known/jwks.json").status_code == 404
        # no browsable docs or schema without a token in production
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 404, path
        assert client.get("/v1/me", headers={"Authorization": "Bearer a.b.c"}).status_code == 401


def test_a_body_sent_to_a_route_that_takes_none_is_422_and_nothing_happens(
    app: FastAPI, client: TestClient, token: TokenFactory
) -> None:
    """Every write route without a request body in the OpenAPI document refuses one: a
    ``{"force": true}`` must not succeed as if it had been understood."""
    admin = bearer(token("admin-001", "admin", "coordinator"))
    # a packet that exists: for one that does not, a packet route answers the logged 404 first
    world = build_world(client, token, professionals={"prof-001": ["Charlois"]})
    packet_id = world.packet("prof-001", "Charlois")["id"]
    bodiless = [
        (method, path)
        for path, operations in app.openapi()["paths"].items()
        for method, operation in operations.items()
        if method in ("post", "put", "patch", "delete") and "requestBody" not in operation
    ]
    assert ("post", "/v1/professionals/{professional_id}/deactivate") in bodiless
    filled = {"professional_id": "prof-001", "packet_id": packet_id, "pseudonym": "0" * 32}
    for method, path in bodiless:
        url = path.format(**filled)
        for body in ({"force": True}, "123456782"):
            refused = client.request(method, url, headers=admin, json=body)
            assert refused.status_code == 422, (url, refused.text)
            assert refused.headers["content-type"].startswith(PROBLEM)
            # a professional's id is free text: it is shown as … like any typed segment
            shown = url.replace("prof-001", "…")
            assert refused.json()["detail"] == f"{shown} takes no request body; send none"
            assert "123456782" not in refused.text
        # Sent in chunks, a body has no Content-Length: it is refused all the same.
        chunked = client.request(
            method,
            url,
            headers={**admin, "content-type": "application/json"},
            content=iter([b'{"force": ', b"true}"]),
        )
        assert chunked.status_code == 422, (url, chunked.text)
        assert chunked.request.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in chunked.request.headers
    # nothing happened: the professional is still active, and without a body it goes through
    [listed] = client.get("/v1/professionals", headers=admin).json()["items"]
    assert listed["active"] is True
    assert client.get(f"/v1/packets/{packet_id}", headers=admin).json()["status"] == "assigned"
    deactivated = client.post("/v1/professionals/prof-001/deactivate", headers=admin)
    assert deactivated.status_code == 200, deactivated.text
    assert deactivated.json()["active"] is False


def test_an_unknown_body_field_is_422_naming_where_it_was_not_what_it_was_called(
    client: TestClient, token: TokenFactory
) -> None:
    """A national id or a name pasted as a field name must not come back, no more than as a
    value: the error says where the unknown field was."""
    coordinator = bearer(token("coord-001", "coordinator"))
    body = {
        "id": "prof-001",
        "display_name": "Caseworker",
        "team": "Zuid",
        "districts": ["Charlois"],
        "capacity": 5,
        "Jan de Vries 123456782": "x",
    }
    refused = client.post("/v1/professionals", json=body, headers=coordinator)
    assert refused.status_code == 422
    assert refused.headers["content-type"].startswith(PROBLEM)
    assert "123456782" not in refused.text
    assert "Jan de Vries" not in refused.text
    assert refused.json()["detail"] == "request is invalid: (unknown field)"
    assert refused.json()["errors"] == [
        {
            "loc": ["(unknown field)"],
            "msg": "unknown field; not accepted here",
            "type": "extra_forbidden",
        }
    ]
    nested = client.post(
        "/v1/records/batch",
        json={"subjects": [{"identity": {"123456782": "123456782"}}]},
        headers=bearer(token("source-welfare", "source")),
    )
    assert nested.status_code == 422
    assert "123456782" not in nested.text
    assert "subjects.0.identity.(unknown field)" in nested.json()["detail"]


def test_an_unknown_query_parameter_is_422_without_echoing_it(
    client: TestClient, token: TokenFactory
) -> None:
    coordinator = bearer(token("coord-001", "coordinator"))
    assert client.get("/v1/packets?status=closed", headers=coordinator).status_code == 200
    typo = client.get("/v1/packets?stauts=closed", headers=coordinator)
    assert typo.status_code == 422
    assert typo.headers["content-type"].startswith(PROBLEM)
    assert typo.json()["detail"].startswith("unknown query parameter; /v1/packets takes: ")
    assert "status" in typo.json()["detail"]
    assert "stauts" not in typo.text
    me = client.get("/v1/me?123456782=1", headers=coordinator)
    assert me.status_code == 422
    assert "takes: none" in me.json()["detail"]
    assert "123456782" not in me.text
    assert client.get("/healthz?probe=1").status_code == 200


def test_a_query_parameter_given_twice_is_422_not_the_last_one_quietly(
    client: TestClient, token: TokenFactory
) -> None:
    coordinator = bearer(token("coord-001", "coordinator"))
    twice = client.get("/v1/packets?status=closed&status=assigned", headers=coordinator)
    assert twice.status_code == 422, twice.text
    assert twice.json()["detail"] == (
        "query parameters given more than once: status; give each once"
    )
    auditor = bearer(token("audit-001", "auditor"))
    entries = client.get("/v1/audit/entries?start=0&end=1&start=3", headers=auditor)
    assert entries.status_code == 422, entries.text


def test_a_path_shows_an_id_only_when_the_whole_segment_is_one() -> None:
    """A name typed after (or before) a pseudonym or a packet id is no id: the segment is hidden."""
    words = frozenset({"", "v1", "packets", "clients"})
    packet, pseudonym = "0f8fad5b-d9cb-469f-a165-70867728950e", "ab" * 16
    assert shown_path(f"/v1/packets/{packet}/clients", words) == f"/v1/packets/{packet}/clients"
    assert shown_path(f"/v1/packets/{pseudonym}", words) == f"/v1/packets/{pseudonym}"
    for typed in (f"{pseudonym}Jansen", f"{packet}-123456782", f"Jansen{pseudonym}"):
        assert shown_path(f"/v1/packets/{typed}/clients?x=1", words) == "/v1/packets/…/clients?…"


def test_the_server_access_log_keeps_no_identity_typed_into_a_url(tmp_path: Path) -> None:
    """uvicorn logs every request line; a national id or a name typed into a path or a query
    string must not reach that log, while the routes' own words and the ids the service hands
    out stay readable there."""
    from service.crypto.keyring import Keyring

    Keyring.init(tmp_path / "keyring.json")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "CASEPACKETS_ENV": "development",
        "CASEPACKETS_HOME": str(tmp_path),
        "CASEPACKETS_DATABASE_URL": f"sqlite:///{tmp_path}/served.db",
        "CASEPACKETS_SHRED_INTERVAL_SECONDS": "0",
    }
    uvicorn = [sys.executable, "-m", "uvicorn", "service.main:create_app", "--factory"]
    server = subprocess.Popen(
        [*uvicorn, "--host", "127.0.0.1", "--port", str(port), "--log-level", "info"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    packet = "0f8fad5b-d9cb-469f-a165-70867728950e"
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        httpx.post(f"{base}/v1/subjects/123456782/erase", timeout=5)
        httpx.get(f"{base}/v1/packets?bsn=123456782&name=Jansen", timeout=5)
        httpx.get(f"{base}/v1/packets/{packet}/clients", timeout=5)
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0].decode()
    assert "/v1/subjects/…/erase" in output
    assert "/v1/packets?…" in output
    assert f"/v1/packets/{packet}/clients" in output
    assert "123456782" not in output
    assert "Jansen" not in output
