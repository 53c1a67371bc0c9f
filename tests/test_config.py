"""Settings refuse unsafe combinations with a message naming what to change."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import Settings, normalize_database_url


def test_production_refuses_the_dev_issuer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CASEPACKETS_DEV_ISSUER must be false"):
        Settings(env="production", home=tmp_path, dev_issuer=True, jwks_url="https://idp/jwks")


def test_production_requires_pinned_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CASEPACKETS_JWKS_FILE or CASEPACKETS_JWKS_URL"):
        Settings(env="production", home=tmp_path, dev_issuer=False)


def test_production_requires_https_jwks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="https"):
        Settings(env="production", home=tmp_path, dev_issuer=False, jwks_url="http://idp/jwks")


def test_placeholder_values_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CASEPACKETS_DATABASE_URL holds a placeholder"):
        Settings(home=tmp_path, database_url="postgresql://app:changethis@db/casepackets")


def test_production_with_pinned_keys_is_accepted(tmp_path: Path) -> None:
    settings = Settings(
        env="production", home=tmp_path, dev_issuer=False, jwks_url="https://idp.example/jwks"
    )
    assert settings.jwks_url == "https://idp.example/jwks"


def test_database_url_from_plain_env_var(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@127.0.0.1/x")
    settings = Settings(home=tmp_path)
    assert settings.resolved_database_url == "postgresql+psycopg://u@127.0.0.1/x"


def test_default_database_is_sqlite_in_the_data_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("CASEPACKETS_DATABASE_URL", raising=False)
    settings = Settings(home=tmp_path)
    assert settings.resolved_database_url == f"sqlite:///{tmp_path.resolve()}/casepackets.db"


def test_normalize_database_url() -> None:
    assert normalize_database_url("postgres://a/b") == "postgresql+psycopg://a/b"
    assert normalize_database_url("sqlite:///x.db") == "sqlite:///x.db"
