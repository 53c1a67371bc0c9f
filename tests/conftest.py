"""Shared fixtures: every database test runs on SQLite and on PostgreSQL.

Each test gets its own freshly migrated database, cloned from a template that the migrations build
once per run: a file copy on SQLite, ``CREATE DATABASE … TEMPLATE`` on PostgreSQL. Every PostgreSQL
database a run creates carries the run's random prefix and is dropped at the end, so concurrent runs
never see each other's rows. With ``CI=true`` an unreachable PostgreSQL fails instead of skipping.
"""

from __future__ import annotations

import gc
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import psycopg
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlmodel import Session

from service.config import PROJECT_ROOT, Settings, normalize_database_url
from service.crypto import keyring as keyring_module
from service.db import Database, migrate
from service.main import create_app

MIGRATIONS = PROJECT_ROOT / "alembic"
RUN_ID = uuid.uuid4().hex[:10]


def postgres_admin_url() -> str:
    given = os.environ.get("DATABASE_URL", "")
    if given.startswith(("postgres://", "postgresql")):
        return normalize_database_url(given)
    # The maintenance database every cluster has (a new one has no other): only CREATE and DROP
    # DATABASE run on this connection.
    return "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class PostgresServer:
    """Creates and drops this run's databases through an admin connection."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.created: list[str] = []

    def _admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(_libpq(self.admin_url), autocommit=True, connect_timeout=3)

    def reachable(self) -> bool:
        try:
            with self._admin() as connection:
                connection.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def create(self, *, template: str | None = None) -> str:
        name = f"cp_{RUN_ID}_{uuid.uuid4().hex[:8]}"
        clause = f" TEMPLATE {template}" if template else ""
        with self._admin() as connection:
            connection.execute(f"CREATE DATABASE {name}{clause}")
        self.created.append(name)
        return make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        name = make_url(url).database
        with self._admin() as connection:
            connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        if name in self.created:
            self.created.remove(name)

    def drop_all(self) -> None:
        for name in list(self.created):
            self.drop(make_url(self.admin_url).set(database=name).render_as_string(False))


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer(postgres_admin_url())
    if not server.reachable():
        message = f"PostgreSQL is not reachable at {make_url(server.admin_url).host}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; CI requires the PostgreSQL tests to run", pytrace=False)
        pytest.skip(f"{message} (set DATABASE_URL; CI=true turns this into a failure)")
    yield server
    server.drop_all()


@dataclass(frozen=True)
class Template:
    backend: str
    url: str


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    url = f"sqlite:///{path}"
    migrate(url, MIGRATIONS)
    return Template("sqlite", url)


@pytest.fixture(scope="session")
def postgres_template(postgres: PostgresServer) -> Template:
    url = postgres.create()
    migrate(url, MIGRATIONS)
    return Template("postgres", url)


class Databases:
    """Hands out fresh, migrated databases of one backend (dropped at test end)."""

    def __init__(
        self, backend: str, template: Template, tmp: Path, postgres: PostgresServer | None
    ) -> None:
        self.backend = backend
        self.template = template
        self.tmp = tmp
        self.postgres = postgres
        self.urls: list[str] = []

    def fresh(self) -> str:
        if self.backend == "sqlite":
            path = self.tmp / f"db-{uuid.uuid4().hex[:8]}.db"
            shutil.copyfile(str(make_url(self.template.url).database), path)
            url = f"sqlite:///{path}"
        else:
            assert self.postgres is not None
            url = self.postgres.create(template=make_url(self.template.url).database)
        self.urls.append(url)
        return url

    def empty(self) -> str:
        """A database with no schema at all (for migration tests)."""
        if self.backend == "sqlite":
            url = f"sqlite:///{self.tmp / f'empty-{uuid.uuid4().hex[:8]}.db'}"
        else:
            assert self.postgres is not None
            url = self.postgres.create()
        self.urls.append(url)
        return url

    def cleanup(self) -> None:
        if self.postgres is not None:
            for url in self.urls:
                self.postgres.drop(url)


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def databases(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Databases]:
    backend: str = request.param
    if backend == "sqlite":
        dbs = Databases(backend, request.getfixturevalue("sqlite_template"), tmp_path, None)
    else:
        server: PostgresServer = request.getfixturevalue("postgres")
        dbs = Databases(backend, request.getfixturevalue("postgres_template"), tmp_path, server)
    yield dbs
    dbs.cleanup()


@pytest.fixture
def backend(databases: Databases) -> str:
    return databases.backend


@pytest.fixture
def db_url(databases: Databases) -> str:
    return databases.fresh()


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder shared by the run, so the issuer key is generated only once."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture
def settings(home: Path, db_url: str) -> Settings:
    return Settings(env="test", home=home, database_url=db_url)


@pytest.fixture
def database(settings: Settings) -> Iterator[Database]:
    db = Database(settings)
    yield db
    db.dispose()


@pytest.fixture
def session(database: Database) -> Iterator[Session]:
    with database.session() as s:
        yield s


@pytest.fixture
def app(settings: Settings, database: Database) -> FastAPI:
    return create_app(settings, database=database)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


TokenFactory = Callable[..., str]


@pytest.fixture
def token(app: FastAPI) -> TokenFactory:
    """``token("prof-001", "professional")`` → a bearer token from the app's dev issuer."""

    def mint(sub: str, *roles: str, ttl: int = 600) -> str:
        issuer = app.state.dev_issuer
        minted: str = issuer.mint(subject=sub, roles=list(roles), ttl_seconds=ttl)
        return minted

    return mint


@pytest.fixture
def rotations_settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """An older key version may be retired right after a rotation (in production the keyring
    waits ``ROTATION_SETTLE_SECONDS`` for running workers to finish work under it)."""
    monkeypatch.setattr(keyring_module, "ROTATION_SETTLE_SECONDS", 0)


@pytest.fixture
def keyring_followed_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loaded keyring looks at its file on every use (in production: once a second)."""
    monkeypatch.setattr(keyring_module, "RELOAD_CHECK_SECONDS", 0.0)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Answer(Protocol):
    status_code: int


Request = Callable[[], Answer]


class Interleaving:
    """Runs one request in a thread, stops it at a chosen point in its transaction, starts a
    second request meanwhile (in another thread: it may block), then lets the first go on."""

    # Long enough for a second request that does not wait to commit; short of the SQLite bound
    # (2 s), where every second request waits for the paused transaction's write lock.
    HEAD_START = 0.5

    def __init__(self) -> None:
        self.paused = threading.Event()
        self.go_on = threading.Event()

    def pause(self) -> None:
        """Call at the point to stop at, from a function patched for the first request; the
        second request passes the same point without stopping."""
        if self.paused.is_set():
            return
        self.paused.set()
        assert self.go_on.wait(10), "the test never let the paused request go on"

    def stop_after(self, monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
        """Patch ``owner.<name>`` so that the first request stops right after it returns."""
        original = getattr(owner, name)

        def then_pause(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            self.pause()
            return result

        monkeypatch.setattr(owner, name, then_pause)

    def run(
        self, first: Request, second: Request, *, second_waits: Callable[[], bool] | None = None
    ) -> tuple[int, int]:
        """The two requests' statuses. With ``second_waits``, the first goes on once that says
        the second is waiting for it (however slow the machine), not after a head start."""
        statuses: dict[str, int] = {}
        requests = [
            threading.Thread(target=lambda: statuses.update(first=first().status_code)),
            threading.Thread(target=lambda: statuses.update(second=second().status_code)),
        ]
        requests[0].start()
        assert self.paused.wait(10), "the first request never reached its pause"
        requests[1].start()
        if second_waits is None:
            requests[1].join(self.HEAD_START)
        else:
            deadline = time.monotonic() + 10
            while not second_waits():
                assert time.monotonic() < deadline, "the second request never came to wait"
                assert requests[1].is_alive(), "the second request ended without waiting"
                time.sleep(0.01)
        self.go_on.set()
        for thread in requests:
            thread.join(20)
        # A request still running would hold its connection past the test (and be collected,
        # with a ResourceWarning, during some later test): it fails this one instead.
        assert not any(thread.is_alive() for thread in requests), "a request never finished"
        return statuses["first"], statuses["second"]


def waiting_on_a_lock(session: Session) -> Callable[[], bool]:
    """PostgreSQL: whether a backend of the test's database waits for a lock (a row, or an
    advisory lock), read afresh each time (a transaction keeps its first view of the statistics
    otherwise)."""

    def waits() -> bool:
        try:
            session.execute(text("SELECT pg_stat_clear_snapshot()"))
            found = session.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        finally:
            session.rollback()
        return bool(found)

    return waits


@pytest.fixture
def no_collector_pauses() -> Iterator[None]:
    """For a test that times waits to a few tenths of a second. Halfway through the suite the
    heap holds about half a million objects, and one full garbage collection takes 0.25–0.5 s:
    inside the timed window that reads as waiting (it failed a CI run once). So: collect first,
    then keep the collector off until the test ends."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
