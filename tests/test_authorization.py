"""The authorization matrix: every route × every role × {own, someone else's, missing} object.

The table below is the specification. The test enumerates the app's routes and fails when a route
has no row (or a row names a route that no longer exists), so a new route cannot ship without a
decision about who may call it. Each backend builds one small world through the API and runs the
whole matrix against it; no response to anyone but the packet's owner may contain an identity.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, WebSocket
from fastapi.testclient import TestClient
from sqlmodel import Session
from starlette.routing import Route

from service.config import Settings
from service.db import Database
from service.errors import served_routes
from service.main import create_app
from tests.conftest import TokenFactory, bearer
from tests.flagging.seed import AS_OF, log_entries
from tests.packets.scenario import DAY_B, NOTE, World, build_world, leaked, record

# "norole": a valid token that carries no role; "anonymous": no token at all.
ROLES = (
    "professional",
    "coordinator",
    "source",
    "auditor",
    "analyst",
    "admin",
    "norole",
    "anonymous",
)
SUBS = {
    "professional": "prof-001",
    "coordinator": "coord-001",
    "source": "source-welfare",
    "auditor": "auditor-001",
    "analyst": "analyst-001",
    "admin": "admin-001",
    "norole": "nobody-001",
}
VARIANTS = ("own", "other", "missing")
OWNER, OTHER = "prof-001", "prof-002"
Expected = int | tuple[int, int, int]  # no object | (own, someone else's, missing)


def everyone(status: int) -> dict[str, Expected]:
    return dict.fromkeys(ROLES, status)


def only(
    allowed: Mapping[str, Expected], *, others: Expected, anonymous: Expected
) -> dict[str, Expected]:
    """``allowed`` roles as given; every other role ``others``; no token ``anonymous``."""
    table = {role: allowed.get(role, others) for role in ROLES}
    table["anonymous"] = anonymous
    return table


DENY = 403, 403, 403
HIDDEN = 404, 404, 404
NO_TOKEN = 401, 401, 401

MATRIX: dict[tuple[str, str], dict[str, Expected]] = {
    ("GET", "/openapi.json"): everyone(200),
    ("GET", "/docs"): everyone(200),
    ("GET", "/docs/oauth2-redirect"): everyone(200),
    ("GET", "/redoc"): everyone(200),
    ("GET", "/healthz"): everyone(200),
    ("GET", "/readyz"): everyone(200),
    ("GET", "/.well-known/jwks.json"): everyone(200),
    ("GET", "/v1/me"): only({}, others=200, anonymous=401),
    ("POST", "/v1/records/batch"): only({"source": 200}, others=403, anonymous=401),
    ("POST", "/v1/subjects/{pseudonym}/erase"): only(
        {"admin": (200, 200, 404)}, others=DENY, anonymous=NO_TOKEN
    ),
    ("POST", "/v1/flagging/runs"): only({"coordinator": 201}, others=403, anonymous=401),
    ("GET", "/v1/flagging/runs"): only({"coordinator": 200}, others=403, anonymous=401),
    ("GET", "/v1/flagging/runs/{run_id}"): only(
        {"coordinator": (200, 200, 404)}, others=DENY, anonymous=NO_TOKEN
    ),
    ("GET", "/v1/flagging/runs/{run_id}/flags"): only(
        {"coordinator": (200, 200, 404)}, others=DENY, anonymous=NO_TOKEN
    ),
    ("GET", "/v1/flagging/runs/{run_id}/policy"): only(
        {"coordinator": (200, 200, 404), "auditor": (200, 200, 404)},
        others=DENY,
        anonymous=NO_TOKEN,
    ),
    ("POST", "/v1/flags"): only({"source": (201, 201, 422)}, others=DENY, anonymous=NO_TOKEN),
    ("POST", "/v1/professionals"): only({"coordinator": 201}, others=403, anonymous=401),
    ("GET", "/v1/professionals"): only({"coordinator": 200}, others=403, anonymous=401),
    ("PATCH", "/v1/professionals/{professional_id}"): only(
        {"coordinator": (200, 200, 404)}, others=DENY, anonymous=NO_TOKEN
    ),
    ("POST", "/v1/professionals/{professional_id}/deactivate"): only(
        {"coordinator": (200, 200, 404)}, others=DENY, anonymous=NO_TOKEN
    ),
    ("POST", "/v1/packets/partition"): only(
        {"coordinator": (201, 201, 404)}, others=DENY, anonymous=NO_TOKEN
    ),
    ("GET", "/v1/packets"): only(
        {"professional": 200, "coordinator": 200, "source": 200}, others=403, anonymous=401
    ),
    # Routes about one packet: whoever may not act on it gets the same 404, logged as denied,
    # never a 403 that confirms the packet exists.
    ("GET", "/v1/packets/{packet_id}"): only(
        {
            "professional": (200, 404, 404),
            "coordinator": (200, 200, 404),
            "source": (200, 200, 404),
        },
        others=HIDDEN,
        anonymous=NO_TOKEN,
    ),
    ("POST", "/v1/packets/{packet_id}/reassign"): only(
        {"coordinator": (200, 200, 404)}, others=HIDDEN, anonymous=NO_TOKEN
    ),
    ("GET", "/v1/packets/{packet_id}/clients"): only(
        {"professional": (200, 404, 404)}, others=HIDDEN, anonymous=NO_TOKEN
    ),
    ("POST", "/v1/packets/{packet_id}/clients/{pseudonym}/followups"): only(
        {"professional": (201, 404, 404)}, others=HIDDEN, anonymous=NO_TOKEN
    ),
    ("POST", "/v1/packets/{packet_id}/close"): only(
        {"professional": (200, 404, 404), "coordinator": (200, 200, 404)},
        others=HIDDEN,
        anonymous=NO_TOKEN,
    ),
    ("GET", "/v1/audit/entries"): only({"auditor": 200}, others=403, anonymous=401),
    ("GET", "/v1/audit/checkpoint"): only({"auditor": 200}, others=403, anonymous=401),
    ("GET", "/v1/audit/proofs/inclusion"): only({"auditor": 200}, others=403, anonymous=401),
    ("GET", "/v1/audit/proofs/consistency"): only({"auditor": 200}, others=403, anonymous=401),
    ("GET", "/v1/audit/public-key"): only({"auditor": 200}, others=403, anonymous=401),
    ("GET", "/v1/audit/handovers"): only({"auditor": 200}, others=403, anonymous=401),
}
# The key every re-identified client's identity sits under: no non-owner response has it.
IDENTITY_FIELD = '"identity":'
API_DESCRIPTIONS = {"/openapi.json", "/docs", "/redoc"}  # name the field; hold no identity
# Refusals that must leave a ``denied`` access-log entry (route → logged action).
LOGGED_DENIALS = {
    ("GET", "/v1/packets/{packet_id}"): "packet.read",
    ("POST", "/v1/packets/{packet_id}/reassign"): "packet.reassign",
    ("GET", "/v1/packets/{packet_id}/clients"): "packet.open",
    ("POST", "/v1/packets/{packet_id}/clients/{pseudonym}/followups"): "followup.create",
    ("POST", "/v1/packets/{packet_id}/close"): "packet.close",
    ("GET", "/v1/audit/entries"): "audit.read",
    ("GET", "/v1/audit/checkpoint"): "audit.read",
    ("GET", "/v1/audit/proofs/inclusion"): "audit.read",
    ("GET", "/v1/audit/proofs/consistency"): "audit.read",
    ("GET", "/v1/audit/public-key"): "audit.read",
    ("GET", "/v1/audit/handovers"): "audit.read",
}


# Routes that turn callers away on the permission alone (service.access_log.guard.require): the
# denied entry names the permission as its action and the route as its object.
GUARDED = {
    ("POST", "/v1/records/batch"): "records.ingest",
    ("POST", "/v1/subjects/{pseudonym}/erase"): "subjects.erase",
    ("POST", "/v1/professionals"): "professionals.manage",
    ("GET", "/v1/professionals"): "professionals.manage",
    ("PATCH", "/v1/professionals/{professional_id}"): "professionals.manage",
    ("POST", "/v1/professionals/{professional_id}/deactivate"): "professionals.manage",
    ("POST", "/v1/packets/partition"): "packets.partition",
    ("GET", "/v1/packets"): "packets.read",
    ("POST", "/v1/flagging/runs"): "flagging.run",
    ("GET", "/v1/flagging/runs"): "flagging.read",
    ("GET", "/v1/flagging/runs/{run_id}"): "flagging.read",
    ("GET", "/v1/flagging/runs/{run_id}/flags"): "flagging.read",
    ("GET", "/v1/flagging/runs/{run_id}/policy"): "policies.read",
    ("POST", "/v1/flags"): "flags.push",
}


HTTP_METHODS = {"get", "head", "post", "put", "patch", "delete", "options", "trace"}


def app_routes(app: FastAPI) -> set[tuple[str, str]]:
    """Every operation the app serves: the OpenAPI document's operations (every API route is in
    it) plus the plain routes mounted on the app itself (documentation pages, the spec). Anything
    else (a mounted app, a websocket) is named by its kind, so it lacks a row until one is
    written for it."""
    paths: dict[str, dict[str, object]] = app.openapi()["paths"]
    routes = {
        (method.upper(), path)
        for path, operations in paths.items()
        for method in operations
        if method in HTTP_METHODS
    }
    for route in served_routes(app.routes):
        if isinstance(route, Route):
            methods = route.methods or set()
            # Starlette answers HEAD wherever it answers GET; a HEAD route of its own needs a row.
            routes |= {(m, route.path) for m in methods if not (m == "HEAD" and "GET" in methods)}
        else:
            routes.add((type(route).__name__, str(getattr(route, "path", ""))))
    return routes


def test_a_mounted_app_or_a_websocket_counts_as_a_route_needing_a_row() -> None:
    app = FastAPI()
    app.mount("/v1/internal", FastAPI())

    @app.websocket("/v1/live")
    async def live(websocket: WebSocket) -> None:  # pragma: no cover - never connected
        await websocket.close()

    @app.head("/v1/packets/{packet_id}/clients")
    def peek(packet_id: str) -> None:  # pragma: no cover - never called
        return None

    assert {
        ("Mount", "/v1/internal"),
        ("APIWebSocketRoute", "/v1/live"),
        ("HEAD", "/v1/packets/{packet_id}/clients"),
    } <= app_routes(app)


def settings_variants(home: Path, db_url: str) -> Iterator[tuple[str, Settings]]:
    """The test settings, production's, and each yes/no setting flipped: a route that only some
    configuration serves still needs a row."""
    base = Settings(env="test", home=home, database_url=db_url)
    yield "test", base
    jwks = home / "jwks.json"
    jwks.write_text(json.dumps({"keys": [create_app(base).state.dev_issuer.public_jwk]}))
    yield (
        "production",
        Settings(
            env="production",
            home=home,
            database_url=db_url,
            dev_issuer=False,
            jwks_file=jwks,
            checkpoint_origin="casepackets.example.nl/access-log",
            shred_interval_seconds=0,
        ),
    )
    for name, field in Settings.model_fields.items():
        if field.annotation is bool:
            flipped = base.model_copy(update={name: not getattr(base, name)})
            if name == "dev_issuer":
                flipped = flipped.model_copy(update={"jwks_file": jwks})
            yield f"{name}={getattr(flipped, name)}", flipped


def test_no_configuration_serves_a_route_without_a_row(home: Path, db_url: str) -> None:
    built = 0
    for name, settings in settings_variants(home, db_url):
        database = Database(settings)
        try:
            unknown = sorted(app_routes(create_app(settings, database=database)) - MATRIX.keys())
        finally:
            database.dispose()
        assert not unknown, f"with {name}: routes without a row in the matrix: {unknown}"
        built += 1
    assert built >= 3  # test, production, and at least one flipped setting


@dataclass
class Objects:
    """The world's objects each variant points at; mutating successes get their own packet."""

    world: World
    own: dict[str, Any]
    other: dict[str, Any]
    closed_by_owner: dict[str, Any]
    closed_by_coordinator: dict[str, Any]
    others_closed_by_coordinator: dict[str, Any]
    missing_packet: str = str(uuid.uuid4())

    def packet(self, variant: str) -> dict[str, Any]:
        if variant == "missing":
            return {"id": self.missing_packet, "pseudonyms": self.own["pseudonyms"]}
        return self.own if variant == "own" else self.other

    def closing(self, role: str, variant: str) -> str:
        if (role, variant) == ("professional", "own"):
            return str(self.closed_by_owner["id"])
        if (role, variant) == ("coordinator", "own"):
            return str(self.closed_by_coordinator["id"])
        if (role, variant) == ("coordinator", "other"):
            return str(self.others_closed_by_coordinator["id"])
        return str(self.packet(variant)["id"])


Request = tuple[str, str, Any]  # method, url, json body
Builder = Callable[[Objects, str, str], Request]
PUSHED = "Rent arrears were reported by the housing corporation."


def build(objects: Objects, key: tuple[str, str], role: str, variant: str) -> Request:
    method, path = key
    packet = objects.packet(variant)
    # the subject an admin erases is not the one the other routes use
    erasable = packet["pseudonyms"][1] if variant != "missing" else "0" * 32
    subject = packet["pseudonyms"][0] if variant != "missing" else "0" * 32
    run = objects.world.run_id if variant != "missing" else "0" * 32
    professional = {"own": OWNER, "other": OTHER, "missing": "nobody"}[variant]
    spare = {"own": "spare-1", "other": "spare-2", "missing": "nobody"}[variant]
    body: Any = None
    url = path
    if path == "/v1/records/batch":
        body = {"subjects": [record(900, "Nowhere")]}
    elif path == "/v1/subjects/{pseudonym}/erase":
        url = f"/v1/subjects/{erasable}/erase"
    elif path == "/v1/flagging/runs" and method == "POST":
        body = {"as_of": AS_OF.isoformat()}
    elif path.startswith("/v1/flagging/runs/{run_id}"):
        url = path.replace("{run_id}", run)
    elif path == "/v1/flags":
        body = {
            "flags": [{"pseudonym": subject, "reason_code": "debt-signal", "explanation": PUSHED}]
        }
    elif path == "/v1/professionals" and method == "POST":
        body = {
            "id": f"new-{uuid.uuid4().hex[:8]}",
            "display_name": "New caseworker",
            "team": "Zuid-2",
            "districts": ["Nowhere"],
            "capacity": 5,
        }
    elif path == "/v1/professionals/{professional_id}":
        url, body = f"/v1/professionals/{professional}", {"team": "Zuid-1"}
    elif path == "/v1/professionals/{professional_id}/deactivate":
        url = f"/v1/professionals/{spare}/deactivate"
    elif path == "/v1/packets/partition":
        body = {"run_id": run}
    elif path == "/v1/packets/{packet_id}/reassign":
        url, body = f"/v1/packets/{packet['id']}/reassign", {"professional_id": professional}
    elif path == "/v1/packets/{packet_id}/close":
        url = f"/v1/packets/{objects.closing(role, variant)}/close"
    elif path == "/v1/packets/{packet_id}/clients/{pseudonym}/followups":
        url = f"/v1/packets/{packet['id']}/clients/{packet['pseudonyms'][0]}/followups"
        body = {"kind": "contact", "date": DAY_B, "outcome_code": "reached", "note": NOTE}
    elif "{packet_id}" in path:
        url = path.replace("{packet_id}", str(packet["id"]))
    elif path == "/v1/audit/entries":
        url = "/v1/audit/entries?start=0&end=1"
    elif path == "/v1/audit/proofs/inclusion":
        url = "/v1/audit/proofs/inclusion?index=0&tree_size=1"
    elif path == "/v1/audit/proofs/consistency":
        url = "/v1/audit/proofs/consistency?first=0&second=1"
    assert "{" not in url, f"no request builder for {method} {path}"
    return method, url, body


def test_every_route_has_a_row_in_the_matrix(app: FastAPI) -> None:
    routes = app_routes(app)
    missing = sorted(routes - MATRIX.keys())
    stale = sorted(MATRIX.keys() - routes)
    assert not missing, f"routes without a row in the authorization matrix: {missing}"
    assert not stale, f"matrix rows for routes that no longer exist: {stale}"


def test_authorization_matrix(
    app: FastAPI, client: TestClient, token: TokenFactory, session: Session
) -> None:
    assert app_routes(app) == MATRIX.keys()
    world = build_world(
        client,
        token,
        professionals={OWNER: ["A1", "A2", "A3"], OTHER: ["B1", "B2"]},
        spare_professionals=["spare-1", "spare-2"],
    )
    objects = Objects(
        world=world,
        own=world.packet(OWNER, "A1"),
        other=world.packet(OTHER, "B1"),
        closed_by_owner=world.packet(OWNER, "A2"),
        closed_by_coordinator=world.packet(OWNER, "A3"),
        others_closed_by_coordinator=world.packet(OTHER, "B2"),
    )
    headers = {role: bearer(token(sub, role)) for role, sub in SUBS.items() if role != "norole"}
    headers["norole"] = bearer(token(SUBS["norole"]))
    headers["anonymous"] = {}

    mismatches: list[str] = []
    leaks: list[str] = []
    owner_saw_identities = False
    expected_denials: Counter[tuple[str, str]] = Counter()
    expected_routes: Counter[tuple[str, str, str]] = Counter()
    for key, row in MATRIX.items():
        for role in ROLES:
            expectation = row[role]
            cases = (
                [("-", expectation)]
                if isinstance(expectation, int)
                else list(zip(VARIANTS, expectation, strict=True))
            )
            for variant, status in cases:
                # a route without an object still gets a valid request (the "own" world)
                method, url, body = build(objects, key, role, "own" if variant == "-" else variant)
                response = client.request(method, url, json=body, headers=headers[role])
                if response.status_code != status:
                    mismatches.append(
                        f"{method} {key[1]} as {role} ({variant}): expected {status}, got "
                        f"{response.status_code} {response.text[:120]}"
                    )
                owners_view = (
                    role == "professional"
                    and variant == "own"
                    and key[1].startswith("/v1/packets/{packet_id}/clients")
                )
                describes_the_api = key[1] in API_DESCRIPTIONS
                found = leaked(
                    response.text
                    + "\n"
                    + "\n".join(f"{k}: {v}" for k, v in response.headers.items()),
                    world.secrets | (set() if describes_the_api else {IDENTITY_FIELD}),
                )
                if owners_view:
                    owner_saw_identities |= bool(found)
                elif found:
                    leaks.append(f"{method} {key[1]} as {role} ({variant})")
                if role == "anonymous" or status not in (403, 404):
                    continue
                if key in LOGGED_DENIALS:
                    expected_denials[(LOGGED_DENIALS[key], SUBS[role])] += 1
                elif status == 403:
                    # every 403 leaves a denied entry; a route missing here fails the comparison
                    action = GUARDED.get(key, f"no denial known for {key}")
                    expected_denials[(action, SUBS[role])] += 1
                    expected_routes[(action, SUBS[role], " ".join(key))] += 1

    assert not mismatches, "authorization matrix violated:\n" + "\n".join(mismatches)
    assert not leaks, f"identities reached a non-owner: {leaks}"
    assert owner_saw_identities, "the leak scan never matched: it would not catch a leak"
    denied = Counter(
        (e["action"], e["actor"]) for e in log_entries(session) if e["outcome"] == "denied"
    )
    assert denied == expected_denials
    refused_on_permission = Counter(
        (e["action"], e["actor"], e["object_id"])
        for e in log_entries(session)
        if e["outcome"] == "denied" and e["object_type"] == "route"
    )
    assert refused_on_permission == expected_routes
    assert leaked(str(log_entries(session)), world.secrets) == []


def test_roles_this_service_does_not_know_are_dropped_before_they_reach_the_log(
    app: FastAPI, client: TestClient, session: Session
) -> None:
    """A provider's own roles, or one it lets an administrator type, grant nothing and never
    reach the access log, which can never be corrected; one that cannot be encoded would stop
    the denied entry of an attempt from being written."""
    extra = ["professional", "\ud800", "Jan Jansen 1970-01-01", "offline_access"]
    token = app.state.dev_issuer.mint(subject="prof-009", roles=extra)
    me = client.get("/v1/me", headers=bearer(token))
    assert me.status_code == 200, me.text
    assert me.json()["roles"] == ["professional"]
    response = client.get(f"/v1/packets/{uuid.uuid4()}/clients", headers=bearer(token))
    assert response.status_code == 404, response.text
    tried = [e for e in log_entries(session, "packet.open") if e["actor"] == "prof-009"]
    assert [(e["outcome"], e["role"]) for e in tried] == [("denied", "professional")]


def test_a_caller_with_the_longest_subject_a_token_may_carry_can_do_what_their_role_allows(
    app: FastAPI, client: TestClient, token: TokenFactory
) -> None:
    """Every column that records who acted holds the longest subject a token may carry, on both
    databases (PostgreSQL refuses a longer text where SQLite stores it)."""
    coordinator = bearer(token("c" * 128, "coordinator"))
    run = client.post("/v1/flagging/runs", json={"as_of": AS_OF.isoformat()}, headers=coordinator)
    assert run.status_code == 201, run.text
    assert run.json()["started_by"] == "c" * 128
    longer = client.get("/v1/me", headers=bearer(token("c" * 129, "coordinator")))
    assert longer.status_code == 401
    assert "1 to 128 characters" in longer.json()["detail"]
