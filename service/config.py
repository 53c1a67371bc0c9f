"""Settings, read once from the environment (prefix ``CASEPACKETS_``) and validated.

Guarantee: a ``Settings`` object exists only for a safe combination. Production with the built-in
dev issuer, production without a pinned JWKS, the built-in issuer beside a real identity provider's
keys, or a placeholder value anywhere is refused with a message naming the variable to change.
A ``CASEPACKETS_`` variable that names no setting is refused too, by name alone: a misspelled one
would otherwise be ignored and its default kept without a word.
The built-in issuer is on by default only where there is no identity provider: outside production
and without CASEPACKETS_JWKS_FILE or CASEPACKETS_JWKS_URL.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import socket
import sys
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from service.clock import DEFAULT_TIMEZONE, zone_named
from service.records.models import MAX_BATCH_ROWS

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def installed_data(distribution: importlib.metadata.Distribution | None = None) -> Path:
    """Where a wheel install put the folders the code reads at run time (pyproject's data-files):
    ``<prefix>/share/casepackets`` under the prefix that install used, read from the files it
    recorded. That is not always ``sys.prefix``: ``pip install --user`` uses the user base, and
    Debian's system Python installs under /usr/local. Without such a record, ``sys.prefix``'s."""
    fallback = Path(sys.prefix) / "share" / "casepackets"
    if distribution is None:
        try:
            distribution = importlib.metadata.distribution("casepackets")
        except importlib.metadata.PackageNotFoundError:
            return fallback
    for file in distribution.files or ():
        if file.parts[-4:] == ("share", "casepackets", "policies", "access.yaml"):
            return Path(file.locate()).resolve().parents[1]
    return fallback


def shipped(folder: str, *, root: Path = PROJECT_ROOT, installed: Path | None = None) -> Path:
    """``policies`` or ``alembic`` as shipped: the checkout's own folder when running from the
    source tree (it has pyproject.toml), else the copy the wheel installed under
    ``<prefix>/share/casepackets`` (``installed_data``). Never a folder of the same name in
    site-packages (there, ``alembic`` is the library)."""
    if (root / "pyproject.toml").is_file():
        return root / folder
    return (installed if installed is not None else installed_data()) / folder


ENV_PREFIX = "CASEPACKETS_"
# Variables with the prefix that are not settings, each read by the project's own tooling; the
# settings accept them beside their own.
NON_SETTING_VARIABLES = frozenset(
    {
        "CASEPACKETS_FUZZ_EXAMPLES",  # tests/test_api_fuzz.py: examples per fuzzed operation
    }
)

PLACEHOLDERS = ("changeme", "change-me", "change_me", "changethis", "placeholder")
# The databases casepackets runs on, as SQLAlchemy names them after normalize_database_url.
DATABASE_DRIVERS = ("postgresql+psycopg", "sqlite", "sqlite+pysqlite")


def _holds_placeholder(value: object) -> bool:
    """A text that contains a placeholder word, or a path with a folder or file named one
    (``/srv/changeme/keyring.json``; a folder that merely contains the word is a real one)."""
    if isinstance(value, Path):
        return any(part.lower().split(".")[0] in PLACEHOLDERS for part in value.parts)
    return isinstance(value, str) and any(p in value.lower() for p in PLACEHOLDERS)


class UnsafeSettings(ValueError):
    """The configuration would run the service in an unsafe way."""


class Settings(BaseSettings):
    # A refused value is never echoed: a database URL may hold a password.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", hide_input_in_errors=True
    )

    env: Literal["development", "test", "production"] = "development"
    home: Path = Field(default=Path("var"), description="data folder (SQLite file, keyring)")
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("CASEPACKETS_DATABASE_URL", "DATABASE_URL"),
        description="SQLAlchemy URL; default is SQLite under the data folder",
    )
    keyring_path: Path | None = Field(default=None, description="default <home>/keyring.json")
    policies_dir: Path = Field(default_factory=lambda: shipped("policies"))
    migrations_dir: Path = Field(default_factory=lambda: shipped("alembic"))

    jwt_issuer: str = "casepackets-dev"
    jwt_audience: str = "casepackets"
    jwt_algorithm: Literal["RS256", "ES256"] = "RS256"
    jwks_file: Path | None = None
    jwks_url: str | None = None
    jwks_refresh_seconds: float = Field(
        default=300,
        gt=0,
        le=86_400,  # a key the provider withdrew is refused within a day at the latest
        allow_inf_nan=False,
        description="refetch the JWKS URL's keys once they are this old, refusing keys it no "
        "longer lists; if the provider cannot be reached, the last keys are kept as long again, "
        "then every token is refused",
    )
    roles_claim: str = "roles"
    dev_issuer: bool = Field(
        default=True,
        description="the built-in issuer; unless set, on only outside production and without a "
        "JWKS file or URL",
    )
    token_leeway_seconds: int = Field(default=30, ge=0, le=300)
    token_max_lifetime_seconds: int = Field(
        default=24 * 3600,
        ge=60,
        le=30 * 24 * 3600,
        description="refuse tokens whose exp - iat is longer: a leaked long-lived token stays "
        "usable until it expires",
    )

    timezone: str = Field(
        default=DEFAULT_TIMEZONE,
        description="where the municipality is: 'today' for event dates and flagging runs",
    )

    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_batch_rows: int = Field(default=10_000, ge=1, le=MAX_BATCH_ROWS)
    log_lock_timeout_seconds: float = Field(default=2.0, gt=0, le=60)
    database_pool_size: int = Field(
        default=20,
        ge=1,
        le=200,
        description="database connections kept open per worker process (as many again may be "
        "opened briefly under bursts); a request that finds none free within the lock bound "
        "gets 503",
    )
    # Finite and at most a day: "inf" or a huge number would turn the retention policy's
    # shredding off without saying so (0 is the one way to, leaving it to `casepackets expire`).
    shred_interval_seconds: float = Field(
        default=300,
        ge=0,
        le=86_400,
        allow_inf_nan=False,
        description="crypto-shred due packets this often; 0 turns it off",
    )
    checkpoint_origin: str = Field(
        default_factory=lambda: f"casepackets/{socket.gethostname()}",
        description="the access log's name on every signed checkpoint; auditors pin it, so it "
        "must never change (required in production)",
    )

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return normalize_database_url(self.database_url)
        return f"sqlite:///{(self.home / 'casepackets.db').resolve()}"

    @property
    def resolved_keyring_path(self) -> Path:
        return self.keyring_path or self.home / "keyring.json"

    @property
    def dev_issuer_key_path(self) -> Path:
        return self.home / f"dev-issuer-{self.jwt_algorithm.lower()}.pem"

    @model_validator(mode="before")
    @classmethod
    def _refuse_unknown_variables(cls, given: Any) -> Any:
        # Before the values are checked: a misspelled name is often why another one looks wrong
        # (CASEPACKETS_JWKS_URI leaves production without an identity provider).
        unknown = _unknown_variables(os.environ)
        if unknown:
            raise ValueError("; ".join(unknown))
        return given

    @field_validator(
        "home", "keyring_path", "jwks_file", "policies_dir", "migrations_dir", mode="before"
    )
    @classmethod
    def _path_given(cls, value: object) -> object:
        # An empty path is the current folder, not the default: CASEPACKETS_HOME=$UNSET would put
        # the database and keyring wherever a command happens to run (scripts/serve reads an
        # empty one as unset), and an empty CASEPACKETS_JWKS_FILE would turn the built-in issuer
        # off as if an identity provider were configured.
        if isinstance(value, str) and not value.strip():
            raise ValueError("is empty; unset it for the default, or give a path")
        return value

    @field_validator("checkpoint_origin")
    @classmethod
    def _usable_origin(cls, origin: str) -> str:
        # The signed-note key name rule (C2SP): a checkpoint signed under it must parse.
        if not origin or any(c.isspace() or c == "+" for c in origin):
            raise ValueError(
                "must be a non-empty name without spaces or '+' "
                "(e.g. casepackets.example.nl/access-log)"
            )
        return origin

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, name: str) -> str:
        # service.clock reads the same variable on first use; the settings' error names the
        # variable itself, so the message here is the value's alone.
        try:
            zone_named(name)
        except ValueError:
            raise ValueError(f"{name!r} is not an IANA time zone") from None
        return name

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        for name, value in self.model_dump().items():
            if _holds_placeholder(value):
                raise UnsafeSettings(
                    f"CASEPACKETS_{name.upper()} holds a placeholder value; set a real one"
                )
        if self.database_url:  # empty counts as unset, as in resolved_database_url
            refuse_unusable_database_url(self.database_url)
        identity_provider = bool(self.jwks_file or self.jwks_url)
        if "dev_issuer" not in self.model_fields_set:
            # On only where nothing else signs tokens: beside an identity provider it would mint
            # tokens for any role under the provider's issuer name, and they would be accepted.
            self.dev_issuer = not identity_provider and self.env != "production"
        if self.env == "production":
            if self.dev_issuer:
                raise UnsafeSettings(
                    "CASEPACKETS_DEV_ISSUER must be false when CASEPACKETS_ENV=production: "
                    "the built-in issuer mints tokens for any role"
                )
            if not identity_provider:
                raise UnsafeSettings(
                    "CASEPACKETS_ENV=production needs CASEPACKETS_JWKS_FILE or "
                    "CASEPACKETS_JWKS_URL (the identity provider's pinned public keys)"
                )
            if self.jwks_url and not self.jwks_url.startswith("https://"):
                raise UnsafeSettings("CASEPACKETS_JWKS_URL must use https:// in production")
            if "checkpoint_origin" not in self.model_fields_set:
                raise UnsafeSettings(
                    "CASEPACKETS_ENV=production needs CASEPACKETS_CHECKPOINT_ORIGIN, the access "
                    "log's lasting name (e.g. casepackets.example.nl/access-log): auditors pin "
                    "it, and the default from the host name changes with every container"
                )
        if self.jwks_file and self.jwks_url:
            raise UnsafeSettings("set CASEPACKETS_JWKS_FILE or CASEPACKETS_JWKS_URL, not both")
        if self.dev_issuer and identity_provider:
            raise UnsafeSettings(
                "CASEPACKETS_DEV_ISSUER=true cannot be combined with CASEPACKETS_JWKS_FILE or "
                "CASEPACKETS_JWKS_URL: the built-in issuer mints tokens for any role under "
                "CASEPACKETS_JWT_ISSUER, and the service would accept them beside the identity "
                "provider's; leave CASEPACKETS_DEV_ISSUER unset (or false)"
            )
        return self


def _variables_read_by_settings() -> frozenset[str]:
    """The names pydantic-settings reads a field from: its aliases if it has any, else the
    prefixed field name."""
    names: set[str] = set()
    for field_name, field in Settings.model_fields.items():
        alias = field.validation_alias
        choices = (
            alias.choices if isinstance(alias, AliasChoices) else [alias or ENV_PREFIX + field_name]
        )
        names.update(choice.upper() for choice in choices if isinstance(choice, str))
    return frozenset(names)


SETTING_VARIABLES = _variables_read_by_settings()


def _unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """Each variable with the prefix (in any case, as the settings read them) that is neither a
    setting nor a known non-setting, by name and, where one is close, the variable probably
    meant. Never a value: it may be a secret."""
    known = SETTING_VARIABLES | NON_SETTING_VARIABLES
    # Compared without the prefix, which alone would make every name look close to every other.
    by_suffix = {
        name.removeprefix(ENV_PREFIX): name for name in known if name.startswith(ENV_PREFIX)
    }
    problems = []
    for variable in sorted(environ):
        name = variable.upper()
        if not name.startswith(ENV_PREFIX) or name in known:
            continue
        close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), sorted(by_suffix), n=1)
        hint = f" (did you mean {by_suffix[close[0]]}?)" if close else ""
        problems.append(f"{variable} is not a setting{hint}")
    return problems


def refuse_unusable_database_url(url: str) -> None:
    """A URL that names no database casepackets runs on is refused by its scheme alone, never
    echoed (it may hold a password)."""
    try:
        driver = make_url(normalize_database_url(url)).drivername
    except (ArgumentError, ValueError):  # ValueError: a port that is no number, quoted in it
        driver = None
    if driver not in DATABASE_DRIVERS:
        scheme = f" ({driver}://…)" if driver else ""
        raise ValueError(
            f"DATABASE_URL (or CASEPACKETS_DATABASE_URL) is not a database URL casepackets can "
            f"use{scheme}: give postgresql://user@host:5432/name or sqlite:////absolute/path.db"
        )


def normalize_database_url(url: str) -> str:
    """Map plain ``postgresql://`` URLs to the psycopg 3 driver."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


@lru_cache
def get_settings() -> Settings:
    return Settings()
