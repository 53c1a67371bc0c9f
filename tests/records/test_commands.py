"""casepackets keys / import / demo, and serve's first-run preparation."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import Session
from typer.testing import CliRunner

from service.access_log.service import LOG_LOCK_KEY
from service.cli import app as cli
from service.cli import prepare
from service.config import Settings, get_settings
from service.crypto.keyring import Keyring, check_purpose
from service.db import Database
from service.records.bulk import CSV_COLUMNS
from service.records.demo import REFERENCE_DATE, synthetic_bsn
from tests.conftest import Databases
from tests.records.conftest import count_rows


@pytest.fixture
def cli_env(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    monkeypatch.setenv("CASEPACKETS_HOME", str(tmp_path))
    monkeypatch.setenv("CASEPACKETS_DATABASE_URL", db_url)
    monkeypatch.setenv("CASEPACKETS_ENV", "test")
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture
def cli_session(cli_env: Settings) -> Iterator[Session]:
    database = Database(cli_env)
    with database.session() as session:
        yield session
    database.dispose()


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def line(index: int, event: int, **changes: str) -> dict[str, str]:
    row = {
        "bsn": synthetic_bsn(index, 5),
        "given_name": "Fatima",
        "family_name": f"Oukili{index}",
        "birth_date": "2001-03-09",
        "street": "Pretorialaan 5",
        "postcode": "3072 ES",
        "city": "Rotterdam",
        "phone": "06-12345678",
        "email": "",
        "district": "Feijenoord",
        "neighbourhood": "Afrikaanderwijk",
        "birth_year": "",
        "household_type": "single_parent",
        "event_type": "welfare_start",
        "event_date": f"2024-0{event + 1}-01",
        "office": "Werk en Inkomen Rotterdam Zuid",
        "source_event_id": f"csv-{index}-{event}",
    }
    row.update(changes)
    return row


def test_keys_init_rotate_and_refused_retire(cli_env: Settings, rotations_settled: None) -> None:
    assert run("keys", "init")[0] == 0
    assert run("keys", "init")[0] == 1
    assert run("migrate")[0] == 0
    code, _ = run("demo", "--subjects", "100", "--seed", "2", "--batch-size", "40")
    assert code == 0
    assert run("keys", "rotate", "--purpose", "vault")[0] == 0
    code, output = run("keys", "retire", "--purpose", "vault", "--version", "1")
    assert code == 1
    assert "still depend" in output
    code, output = run("keys", "rewrap", "--chunk", "30")
    assert code == 0, output
    assert run("keys", "retire", "--purpose", "vault", "--version", "1")[0] == 0
    keyring = Keyring.load(cli_env.resolved_keyring_path)
    assert [v.version for v in keyring.versions("vault") if v.retired_at] == [1]
    code, output = run("keys", "list")
    assert code == 0
    assert keyring.current("vault").material.hex() not in output


def test_old_signing_and_pseudonym_keys_get_the_right_retirement(
    cli_env: Settings, rotations_settled: None
) -> None:
    """A signing key encrypts nothing, so its old version can go at once; a pseudonym key's old
    version stays while subjects carry its pseudonyms (rewrap cannot move them)."""
    Keyring.init(cli_env.resolved_keyring_path)
    assert run("demo", "--subjects", "100", "--seed", "3")[0] == 0
    for purpose in ("log_signing", "pseudonym"):
        code, output = run("keys", "rotate", "--purpose", purpose)
        assert code == 0, output
    code, output = run("keys", "list")
    assert "unused" in output
    assert "matches" in output
    code, output = run("keys", "retire", "--purpose", "log_signing", "--version", "1")
    assert code == 0, output
    code, output = run("keys", "retire", "--purpose", "pseudonym", "--version", "1")
    assert code == 1
    said = " ".join(output.split())
    assert "100 rows still depend on pseudonym v1" in said
    assert "never recomputed" in said
    assert "rewrap" not in said
    keyring = Keyring.load(cli_env.resolved_keyring_path)
    assert [v.version for v in keyring.versions("log_signing") if v.retired_at] == [1]
    assert not [v for v in keyring.versions("pseudonym") if v.retired_at]


def test_key_commands_refuse_a_database_without_this_versions_schema(
    databases: Databases, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CASEPACKETS_HOME", str(tmp_path))
    monkeypatch.setenv("CASEPACKETS_DATABASE_URL", databases.empty())
    monkeypatch.setenv("CASEPACKETS_ENV", "test")
    get_settings.cache_clear()
    try:
        Keyring.init(tmp_path / "keyring.json")
        code, output = run("keys", "rotate", "--purpose", "vault")
        assert code == 2
        assert "run `casepackets migrate` first" in " ".join(output.split())
        keyring = Keyring.load(tmp_path / "keyring.json")
        assert [v.version for v in keyring.versions("vault")] == [1]
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize("purpose", ["vault", "log_signing"])
def test_a_rotation_the_log_cannot_record_leaves_the_keyring_as_it_was(
    cli_env: Settings, monkeypatch: pytest.MonkeyPatch, backend: str, purpose: str
) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    monkeypatch.setenv("CASEPACKETS_LOG_LOCK_TIMEOUT_SECONDS", "0.3")
    get_settings.cache_clear()
    holder = Database(get_settings())
    try:
        with holder.transaction() as session:
            if backend == "postgres":
                session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOG_LOCK_KEY})
            else:
                session.execute(text("SELECT 1"))  # BEGIN IMMEDIATE: the write lock is held
            code, output = run("keys", "rotate", "--purpose", purpose)
        assert code == 1
        assert "busy" in output  # SQLite: the whole database; PostgreSQL: the access log
        keyring = Keyring.load(cli_env.resolved_keyring_path)
        assert [v.version for v in keyring.versions(check_purpose(purpose))] == [1]
    finally:
        holder.dispose()


def test_import_stores_valid_subjects_and_reports_rejected_lines(
    cli_env: Settings, cli_session: Session, tmp_path: Path
) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    rows = [line(0, 0), line(0, 1), line(1, 0), line(2, 0, event_type="alien_visit")]
    rows += [line(3, 0, bsn="123456789"), line(4, 0), line(4, 1, family_name="Other")]
    path = write_csv(tmp_path / "records.csv", rows)
    code, output = run("import", str(path), "--source", "welfare", "--batch-size", "2")
    assert code == 1, output
    assert "line 5: event_type" in output
    assert "line 6: bsn" in output
    assert "line 8: identity" in output
    assert "123456789" not in output
    assert "Other" not in output
    assert count_rows(cli_session, "subjects") == 3  # 0, 1 and 4 (4's odd line left out)
    assert count_rows(cli_session, "events") == 4
    code, _ = run("import", str(path), "--source", "welfare")
    assert count_rows(cli_session, "events") == 4


def test_import_refuses_an_unknown_header(cli_env: Settings, tmp_path: Path) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    path = tmp_path / "bad.csv"
    path.write_text("bsn,name\n111222333,Jan\n", encoding="utf-8")
    code, output = run("import", str(path), "--source", "x")
    assert code == 2
    assert "unknown name" in output


def test_demo_is_deterministic_per_seed_and_names_the_date_to_flag_it_as_of(
    cli_env: Settings, cli_session: Session
) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    code, output = run("demo", "--subjects", "150", "--seed", "9")
    assert code == 0, output
    assert f"casepackets flag --as-of {REFERENCE_DATE}" in " ".join(output.split())
    events = count_rows(cli_session, "events")
    assert count_rows(cli_session, "subjects") == 150
    assert run("demo", "--subjects", "150", "--seed", "9")[0] == 0
    assert count_rows(cli_session, "subjects") == 150
    assert count_rows(cli_session, "events") == events


def test_prepare_creates_keys_and_demo_once(cli_env: Settings, cli_session: Session) -> None:
    prepare(cli_env)
    assert cli_env.resolved_keyring_path.exists()
    first_key = Keyring.load(cli_env.resolved_keyring_path).current("vault").material
    assert count_rows(cli_session, "subjects") == 500
    prepare(cli_env)
    assert Keyring.load(cli_env.resolved_keyring_path).current("vault").material == first_key
    assert count_rows(cli_session, "subjects") == 500
