"""Shared plumbing for the benchmarks: scratch PostgreSQL databases that are always dropped."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable

import psycopg
from sqlalchemy.engine import make_url

from service.config import normalize_database_url


def postgres_admin_url() -> str:
    """``DATABASE_URL`` when it names PostgreSQL, else the local server's ``postgres`` database."""
    given = os.environ.get("DATABASE_URL", "")
    if given.startswith(("postgres://", "postgresql")):
        return normalize_database_url(given)
    return "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def create_postgres_database() -> str:
    """A new, empty database on the admin server; raises ``psycopg.Error`` when unreachable."""
    admin = postgres_admin_url()
    name = f"cp_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(_libpq(admin), autocommit=True, connect_timeout=3) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return make_url(admin).set(database=name).render_as_string(hide_password=False)


def drop_postgres_database(url: str) -> None:
    name = make_url(url).database
    with psycopg.connect(_libpq(postgres_admin_url()), autocommit=True) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def postgres_database() -> tuple[str, Callable[[], None]] | None:
    """A scratch database and the function that drops it, or None (said) when unreachable."""
    try:
        url = create_postgres_database()
    except psycopg.Error as exc:
        print(f"PostgreSQL not reachable ({type(exc).__name__}); skipping its figures")
        return None
    return url, lambda: drop_postgres_database(url)
