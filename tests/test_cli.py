"""The command line mints tokens the service accepts."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from alembic.script import ScriptDirectory
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from service.cli import app as cli
from service.cli import main as cli_main
from service.config import PROJECT_ROOT, Settings, get_settings
from service.crypto.keyring import Keyring
from service.db import Database, alembic_config, make_engine
from service.main import create_app
from tests.access_log.conftest import append_each
from tests.conftest import MIGRATIONS, Databases, PostgresServer, bearer


@pytest.fixture
def cli_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("CASEPACKETS_HOME", str(tmp_path))
    monkeypatch.setenv("CASEPACKETS_DATABASE_URL", f"sqlite:///{tmp_path}/cli.db")
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_token_command_prints_a_token_the_service_accepts(cli_home: Path) -> None:
    result = CliRunner().invoke(cli, ["token", "--sub", "prof-007", "--role", "professional"])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip().splitlines()[-1]
    app = create_app(Settings(env="test", home=cli_home, database_url=f"sqlite:///{cli_home}/x"))
    with TestClient(app) as client:
        response = client.get("/v1/me", headers=bearer(token))
    assert response.status_code == 200
    assert response.json() == {
        "sub": "prof-007",
        "roles": ["professional"],
        "permissions": sorted(["packets.read", "packets.open", "followups.write", "packets.close"]),
    }


def test_token_command_says_when_it_made_the_issuer_key_it_signs_with(cli_home: Path) -> None:
    """Run from another folder than the service's, it makes a key of its own, whose tokens
    that service refuses: the command says so, once."""
    runner = CliRunner()
    first = runner.invoke(cli, ["token", "--sub", "x", "--role", "analyst"])
    assert first.exit_code == 0, first.output
    (key,) = cli_home.glob("dev-issuer-*.pem")
    assert f"created a new built-in issuer key at {key}" in one_line(first.stderr)
    assert first.stdout.strip().startswith("eyJ")
    again = runner.invoke(cli, ["token", "--sub", "x", "--role", "analyst"])
    assert again.exit_code == 0, again.output
    assert again.stderr == ""


def test_token_command_mints_nothing_beside_an_identity_provider(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a real provider's keys configured, a token the built-in issuer minted would carry the
    provider's issuer name and be accepted: the issuer is off unless asked for, and asking for
    it beside the provider's keys is refused."""
    jwks = cli_home / "jwks.json"
    jwks.write_text('{"keys": []}')
    monkeypatch.setenv("CASEPACKETS_JWKS_FILE", str(jwks))
    monkeypatch.setenv("CASEPACKETS_JWT_ISSUER", "https://idp.example/realms/city")
    get_settings.cache_clear()
    runner = CliRunner()
    off = runner.invoke(cli, ["token", "--sub", "intruder", "--role", "admin"])
    assert off.exit_code == 2
    assert "the built-in issuer is off" in off.output
    assert "eyJ" not in off.output
    assert not list(cli_home.glob("dev-issuer-*"))
    monkeypatch.setenv("CASEPACKETS_DEV_ISSUER", "true")
    get_settings.cache_clear()
    refused = runner.invoke(cli, ["token", "--sub", "intruder", "--role", "admin"])
    assert refused.exit_code == 2
    assert "cannot be combined" in " ".join(refused.output.split())
    assert "eyJ" not in refused.output


def test_token_command_refuses_an_unknown_role(cli_home: Path) -> None:
    result = CliRunner().invoke(cli, ["token", "--sub", "x", "--role", "wizard"])
    assert result.exit_code != 0


@pytest.mark.parametrize("sub", ["", " prof-001", "prof-001 ", "x" * 129, "Jan\nJansen"])
def test_token_command_refuses_a_subject_the_service_would_refuse_without_echoing_it(
    cli_home: Path, sub: str
) -> None:
    refused = CliRunner().invoke(cli, ["token", "--sub", sub, "--role", "admin"])
    assert refused.exit_code == 2, refused.output
    output = " ".join(refused.output.split())
    assert "--sub refused: 'sub' must be printable text of 1 to 128 characters" in output
    assert "eyJ" not in refused.output
    assert "Jansen" not in refused.output


def test_token_command_keeps_to_the_maximum_token_lifetime(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CASEPACKETS_TOKEN_MAX_LIFETIME_SECONDS", "600")
    get_settings.cache_clear()
    runner = CliRunner()
    refused = runner.invoke(cli, ["token", "--sub", "x", "--role", "analyst", "--ttl", "601"])
    assert refused.exit_code == 2
    assert "longer than CASEPACKETS_TOKEN_MAX_LIFETIME_SECONDS (600)" in refused.output
    assert "eyJ" not in refused.output
    minted = runner.invoke(cli, ["token", "--sub", "x", "--role", "analyst", "--ttl", "600"])
    assert minted.exit_code == 0, minted.output
    assert minted.stdout.strip().startswith("eyJ")


def test_a_traceback_never_shows_local_variables() -> None:
    """Locals may hold a BSN, a name or a key; older Typer versions showed them by default."""
    assert cli.pretty_exceptions_show_locals is False
    assert cli.pretty_exceptions_enable is False


def test_migrate_command_builds_the_schema_and_says_what_it_did(cli_home: Path) -> None:
    head = sorted(p.name for p in (PROJECT_ROOT / "alembic" / "versions").glob("0*.py"))[-1][:4]
    first = CliRunner().invoke(cli, ["migrate"])
    assert first.exit_code == 0, first.output
    assert (cli_home / "cli.db").exists()
    assert f"schema migrated from an empty database to revision {head}" in first.output
    again = CliRunner().invoke(cli, ["migrate"])
    assert again.exit_code == 0, again.output
    assert f"schema is up to date (revision {head})" in again.output


def test_serve_refuses_to_create_a_keyring_in_production(cli_home: Path) -> None:
    from service.cli import prepare

    settings = Settings(
        env="production",
        home=cli_home,
        dev_issuer=False,
        jwks_url="https://idp.example/jwks",
        checkpoint_origin="casepackets.example.nl/access-log",
        database_url=f"sqlite:///{cli_home}/p.db",
    )
    with pytest.raises(typer.Exit) as refused:
        prepare(settings)
    assert refused.value.exit_code == 2
    assert not (cli_home / "keyring.json").exists()


def test_serve_that_another_process_beats_to_the_keyring_serves_with_that_one(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two services started at once on a fresh data folder (or `keys init` run beside `serve`)
    both find no keyring; one creates it, and the other uses it, as the workers do
    (``Keyring.load_or_init``), instead of refusing to start because a keyring exists."""
    create = Keyring.init

    def created_by_another_process_first(path: Path) -> Keyring:
        create(path)  # the other process, a moment earlier
        return create(path)

    monkeypatch.setattr(Keyring, "init", created_by_another_process_first)
    started: list[Any] = []
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: started.append(a))
    result = CliRunner().invoke(cli, ["serve", "--no-print-tokens"])
    assert result.exit_code == 0, result.output
    assert "refused" not in result.output
    assert started
    Keyring.load(cli_home / "keyring.json")


def test_a_bad_setting_is_refused_by_its_variable_name(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CASEPACKETS_ENV", "prod")
    monkeypatch.setenv("CASEPACKETS_TOKEN_LEEWAY_SECONDS", "999")
    monkeypatch.setenv("CASEPACKETS_TIMEZONE", "Mars/Olympus")
    get_settings.cache_clear()
    result = CliRunner().invoke(cli, ["migrate"])
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert "CASEPACKETS_ENV: Input should be 'development', 'test' or 'production'" in said
    assert "CASEPACKETS_TOKEN_LEEWAY_SECONDS: Input should be less than or equal to 300" in said
    # named once: the zone's own message does not repeat the variable
    assert "CASEPACKETS_TIMEZONE: 'Mars/Olympus' is not an IANA time zone" in said
    assert said.count("CASEPACKETS_TIMEZONE") == 1
    assert "Traceback" not in said
    assert "errors.pydantic.dev" not in said


def test_serve_refuses_a_broken_policy_in_one_line_before_starting(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policies = cli_home / "policies"
    shutil.copytree(PROJECT_ROOT / "policies", policies)
    flagging = policies / "flagging.yaml"
    flagging.write_text(flagging.read_text().replace("type: relapse", "type: relapsing", 1))
    monkeypatch.setenv("CASEPACKETS_POLICIES_DIR", str(policies))
    get_settings.cache_clear()
    result = CliRunner().invoke(cli, ["serve", "--no-print-tokens"])
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert said.startswith("policy refused:")
    assert "policies/flagging.yaml:rule'relapse':unknownruletype'relapsing'" in "".join(
        said.split()
    )
    assert "Traceback" not in said
    assert not (cli_home / "keyring.json").exists()  # refused before anything was prepared


@pytest.mark.parametrize(("given", "value"), [("--port", "70000"), ("PORT", "80800")])
def test_serve_refuses_a_port_no_socket_has_before_starting(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch, given: str, value: str
) -> None:
    """uvicorn took 70000 as 70000 mod 65536 and listened on 4464, while saying (and the
    printed curl lines and the image's health check calling) 70000."""
    started: list[object] = []
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: started.append(k))
    if given == "PORT":
        monkeypatch.setenv("PORT", value)
    result = CliRunner().invoke(
        cli, ["serve", "--no-print-tokens", *([given, value] if given == "--port" else [])]
    )
    assert result.exit_code == 2, result.output
    assert "65535" in result.output
    assert started == []
    assert not (cli_home / "keyring.json").exists()  # refused before anything was prepared


def test_serve_refuses_a_keyring_open_to_others_in_one_line_before_starting(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every worker would refuse it with a traceback: the command says what to fix first."""
    keyring = Keyring.init(cli_home / "keyring.json").path
    keyring.chmod(0o644)
    started: list[object] = []
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: started.append(a))
    result = CliRunner().invoke(cli, ["serve", "--no-print-tokens"])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert "keyring refused:" in said
    assert f"run chmod 600 {keyring}" in said
    assert "Traceback" not in said
    assert started == []
    assert not (cli_home / "cli.db").exists()  # refused before the schema was touched


def test_serve_on_every_address_prints_curl_lines_that_reach_it(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[dict[str, object]] = []
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: started.append(k))
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--port", "8123"])  # noqa: S104
    assert result.exit_code == 0, result.output
    assert started[0]["host"] == "0.0.0.0"  # noqa: S104
    assert "http://127.0.0.1:8123/v1/me" in result.output
    assert "http://0.0.0.0" not in result.output
    for host, shown in (("::", "[::1]"), ("::1", "[::1]"), ("fe80::2", "[fe80::2]")):
        result = CliRunner().invoke(cli, ["serve", "--host", host, "--port", "8123"])
        assert result.exit_code == 0, result.output
        assert f"http://{shown}:8123/v1/me" in result.output


@pytest.mark.parametrize(
    ("max_lifetime", "said"),
    [("86400", "valid 12 hours"), ("3600", "valid 1 hour)"), ("5400", "valid 90 minutes")],
)
def test_serve_says_how_long_its_demo_tokens_last_in_plain_words(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch, max_lifetime: str, said: str
) -> None:
    monkeypatch.setenv("CASEPACKETS_TOKEN_MAX_LIFETIME_SECONDS", max_lifetime)
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: None)
    result = CliRunner().invoke(cli, ["serve"])
    assert result.exit_code == 0, result.output
    assert f"demo tokens ({said}" in result.output


TOO_SHORT_RSA_KEY = {"kty": "RSA", "kid": "k1", "n": "AQAB", "e": "AQAB"}


@pytest.mark.parametrize(
    ("contents", "problem"),
    [
        (None, "No such file or directory"),
        ("{", "Expecting"),
        ('{"keys": []}', "no key with"),
        (json.dumps({"keys": [TOO_SHORT_RSA_KEY] * 2}), "more than one RS256 signing key has kid"),
        (json.dumps({"keys": [TOO_SHORT_RSA_KEY]}), "shorter than 2048 bits"),
    ],
    ids=["missing", "not-json", "no-keys", "two-keys-under-one-kid", "rsa-key-too-short"],
)
def test_serve_refuses_a_jwks_file_it_cannot_use_in_one_line_before_starting(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch, contents: str | None, problem: str
) -> None:
    """Each worker would fail on it with a traceback, and uvicorn would restart them for ever."""
    jwks = cli_home / "jwks.json"
    if contents is not None:
        jwks.write_text(contents)
    monkeypatch.setenv("CASEPACKETS_DEV_ISSUER", "false")
    monkeypatch.setenv("CASEPACKETS_JWKS_FILE", str(jwks))
    get_settings.cache_clear()
    started: list[object] = []
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: started.append(a))
    result = CliRunner().invoke(cli, ["serve", "--no-print-tokens"])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert said.startswith("configuration refused: CASEPACKETS_JWKS_FILE: ")
    assert problem in said
    assert "Traceback" not in said
    assert started == []
    assert not (cli_home / "keyring.json").exists()  # refused before anything was prepared


# -- a database the command cannot use is one line, never a traceback --------------------------


def use_database(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASEPACKETS_DATABASE_URL", url)
    get_settings.cache_clear()


def one_line(output: str) -> str:
    assert "Traceback" not in output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    return lines[0]


def test_flag_refuses_an_as_of_before_1900_in_one_line_as_the_api_does(cli_home: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["migrate"]).exit_code == 0
    assert runner.invoke(cli, ["keys", "init"]).exit_code == 0
    for before in ("1899-12-31", "1066-10-14"):
        refused = runner.invoke(cli, ["flag", "--as-of", before])
        assert refused.exit_code == 2, refused.output
        assert one_line(refused.output) == "refused: as_of may not be before 1900-01-01"
    earliest = runner.invoke(cli, ["flag", "--as-of", "1900-01-01"])
    assert earliest.exit_code == 0, earliest.output
    assert "0 evaluated, 0 flagged" in " ".join(earliest.output.split())


def test_flag_refuses_a_policy_whose_version_is_archived_with_other_bytes(
    cli_home: Path,
) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["migrate"]).exit_code == 0
    assert runner.invoke(cli, ["keys", "init"]).exit_code == 0
    assert runner.invoke(cli, ["flag"]).exit_code == 0  # archives the shipped policy
    engine = make_engine(str(get_settings().database_url))
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE flagging_policies SET content = x'00', sha256 = '0'"))
    finally:
        engine.dispose()
    refused = runner.invoke(cli, ["flag"])
    assert refused.exit_code == 1, refused.output
    assert "Traceback" not in refused.output
    assert one_line(refused.output).startswith("failed: policy version "), refused.output
    assert "is archived with other content" in " ".join(refused.output.split())
    assert "flagging (" not in refused.output  # refused before a progress bar was drawn


def test_flag_refuses_a_policy_reading_an_event_type_no_source_may_send_as_serve_does(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its rules would evaluate without the visits no record can carry: a run of 0 flags."""
    runner = CliRunner()
    assert runner.invoke(cli, ["migrate"]).exit_code == 0
    assert runner.invoke(cli, ["keys", "init"]).exit_code == 0
    policies = cli_home / "policies"
    shutil.copytree(PROJECT_ROOT / "policies", policies)
    events = policies / "events.yaml"
    events.write_text(events.read_text().replace("  helpdesk_visit:", "  helpdesk_visited:"))
    monkeypatch.setenv("CASEPACKETS_POLICIES_DIR", str(policies))
    get_settings.cache_clear()
    for command in (["flag"], ["serve", "--no-print-tokens"]):
        refused = runner.invoke(cli, command)
        assert refused.exit_code == 2, refused.output
        assert one_line(refused.output) == (
            f"policy refused: {policies / 'flagging.yaml'}: the characteristics "
            f"['helpdesk_visit'] are event types that {events} does not accept, so no record "
            "could carry them"
        )


@pytest.mark.parametrize(
    "url", ["foo://x", "not a url", "mysql://casepackets:s3cret-pw@db/casepackets"]
)
def test_a_url_that_names_no_usable_database_is_refused_without_echoing_it(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    use_database(url, monkeypatch)
    for command in (["migrate"], ["flag"]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 2, result.output
        said = one_line(result.output)
        assert "is not a database URL casepackets can use" in said
        assert "s3cret-pw" not in said


def test_a_sqlite_file_that_cannot_be_created_is_one_line(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (cli_home / "a-file").write_text("")
    use_database(f"sqlite:///{cli_home}/a-file/casepackets.db", monkeypatch)
    result = CliRunner().invoke(cli, ["migrate"])
    assert result.exit_code == 2, result.output
    assert one_line(result.output).startswith("failed: cannot reach the database: ")
    # A command that needs a migrated database does not try to create one.
    result = CliRunner().invoke(cli, ["flag"])
    assert result.exit_code == 2, result.output
    assert one_line(result.output).startswith("refused: there is no database at ")


def test_an_unreachable_server_is_not_called_busy_and_its_password_is_not_shown(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_database("postgresql://casepackets:s3cret-pw@127.0.0.1:1/casepackets", monkeypatch)
    for command in (["migrate"], ["flag"], ["keys", "rotate", "--purpose", "vault"]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 2, result.output
        said = one_line(result.output)
        assert said.startswith("failed: cannot reach the database: "), said
        assert "busy" not in said
        assert "s3cret-pw" not in said


@pytest.mark.postgres
def test_a_database_that_does_not_exist_is_named_without_the_password(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch, postgres: PostgresServer
) -> None:
    missing = make_url(postgres.admin_url).set(database="cp_no_such_database", password="s3cret")
    use_database(missing.render_as_string(hide_password=False), monkeypatch)
    for command in (["migrate"], ["flag"]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 2, result.output
        said = one_line(result.output)
        assert said.startswith("failed: cannot reach the database: "), said
        assert '"cp_no_such_database" does not exist' in said
        assert "s3cret" not in said


def test_a_database_newer_than_the_code_is_refused_by_every_command(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch, databases: Databases
) -> None:
    url = databases.fresh()
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    finally:
        engine.dispose()
    use_database(url, monkeypatch)
    Keyring.init(cli_home / "keyring.json")
    head = ScriptDirectory.from_config(alembic_config("", MIGRATIONS)).get_current_head()
    for command in (["migrate"], ["serve", "--no-print-tokens"], ["flag"]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 2, (command, result.output)
        said = one_line(result.output)
        assert f"the database is at revision 0099, newer than this code's {head}" in said


# -- files the command cannot use are one line, never a traceback ------------------------------


def test_a_dev_issuer_key_readable_by_others_is_refused_in_one_line(cli_home: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["token", "--sub", "x", "--role", "analyst"]).exit_code == 0
    (key,) = cli_home.glob("dev-issuer-*.pem")
    key.chmod(0o644)
    result = runner.invoke(cli, ["token", "--sub", "x", "--role", "analyst"])
    assert result.exit_code == 2
    said = one_line(result.output)
    assert "readable by group or others" in said
    assert f"chmod 600 {key}" in said


def test_a_data_folder_or_keyring_path_through_a_file_is_refused_in_one_line(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a_file = cli_home / "a-file"
    a_file.write_text("")
    monkeypatch.setenv("CASEPACKETS_HOME", str(a_file))
    monkeypatch.delenv("CASEPACKETS_DATABASE_URL")
    get_settings.cache_clear()
    runner = CliRunner()
    for command in (
        ["migrate"],
        ["serve", "--no-print-tokens"],
        ["keys", "init"],
        ["keys", "list"],
        ["token", "--sub", "x", "--role", "analyst"],
    ):
        result = runner.invoke(cli, command)
        assert result.exit_code == 2, (command, result.output)
        assert str(a_file) in one_line(result.output)
    monkeypatch.setenv("CASEPACKETS_HOME", str(cli_home))
    monkeypatch.setenv("CASEPACKETS_KEYRING_PATH", str(a_file / "keyring.json"))
    get_settings.cache_clear()
    result = runner.invoke(cli, ["keys", "init"])
    assert result.exit_code == 2, result.output
    assert one_line(result.output).startswith("keyring refused: cannot use the keyring at ")


def test_demo_without_its_policies_is_refused_in_one_line(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["migrate"]).exit_code == 0
    assert runner.invoke(cli, ["keys", "init"]).exit_code == 0
    monkeypatch.setenv("CASEPACKETS_POLICIES_DIR", str(cli_home / "no-policies"))
    get_settings.cache_clear()
    result = runner.invoke(cli, ["demo", "--subjects", "100"])
    assert result.exit_code == 2
    said = one_line(result.output)
    assert said.startswith("policy refused: ")
    assert "no-policies/events.yaml" in said


@pytest.mark.parametrize("folder", ["missing", "empty", "policies"])
def test_a_migrations_folder_without_migrations_is_refused_in_one_line_naming_it(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch, folder: str
) -> None:
    """A wrong CASEPACKETS_MIGRATIONS_DIR (a typo, an empty folder, another shipped folder) is
    one line naming the variable, before the database is touched: never a traceback, never
    'schema is up to date' over a database left empty, nor a database 'newer than' no code."""
    runner = CliRunner()
    assert runner.invoke(cli, ["migrate"]).exit_code == 0
    assert runner.invoke(cli, ["keys", "init"]).exit_code == 0
    wrong = {
        "missing": cli_home / "no-such-folder",
        "empty": cli_home / "empty",
        "policies": PROJECT_ROOT / "policies",
    }[folder]
    (cli_home / "empty").mkdir()
    monkeypatch.setenv("CASEPACKETS_MIGRATIONS_DIR", str(wrong))
    monkeypatch.setenv("CASEPACKETS_DATABASE_URL", f"sqlite:///{cli_home}/fresh.db")
    get_settings.cache_clear()
    for command in (["migrate"], ["serve", "--no-print-tokens"], ["expire"], ["flag"]):
        result = runner.invoke(cli, command)
        assert result.exit_code == 2, (command, result.output)
        said = one_line(result.output)
        assert f"CASEPACKETS_MIGRATIONS_DIR {wrong} holds no casepackets migrations" in said
        if command == ["serve", "--no-print-tokens"]:
            assert not (cli_home / "fresh.db").exists(), "refused before migrating anything"


def test_audit_export_to_a_file_is_refused_in_one_line_before_signing(cli_home: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["migrate"]).exit_code == 0
    assert runner.invoke(cli, ["keys", "init"]).exit_code == 0
    existing = cli_home / "export"
    existing.write_text("not a folder")
    result = runner.invoke(cli, ["audit", "export", "--out", str(existing)])
    assert result.exit_code == 2
    assert one_line(result.output).startswith(f"refused: cannot write the export to {existing}")
    assert existing.read_text() == "not a folder"
    exported = runner.invoke(cli, ["audit", "export", "--out", str(cli_home / "fine")])
    assert exported.exit_code == 0, exported.output
    assert "exported 0 entries" in exported.output  # the refused export signed nothing


def test_an_export_killed_between_its_renames_is_put_back_by_the_next_even_if_that_fails(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after moving the earlier export aside and before renaming the new one into place,
    an export leaves the earlier one in `.export.partial/previous`: the next export puts it back
    before it signs anything, so that export failing too (here: a checkpoint origin the log does
    not carry) does not leave the auditor's folder empty and the earlier export deleted."""
    runner = CliRunner()
    assert runner.invoke(cli, ["migrate"]).exit_code == 0
    assert runner.invoke(cli, ["keys", "init"]).exit_code == 0
    export = cli_home / "export"
    assert runner.invoke(cli, ["audit", "export", "--out", str(export)]).exit_code == 0
    earlier = {path.name: path.read_bytes() for path in export.iterdir()}
    staging = cli_home / ".export.partial"
    staging.mkdir(mode=0o700)
    export.rename(staging / "previous")  # the state a kill -9 between the renames leaves
    monkeypatch.setenv("CASEPACKETS_CHECKPOINT_ORIGIN", "another.example/log")
    get_settings.cache_clear()
    failed = runner.invoke(cli, ["audit", "export", "--out", str(export)])
    assert failed.exit_code == 1, failed.output
    assert "another.example/log" in failed.output
    assert {path.name: path.read_bytes() for path in export.iterdir()} == earlier
    assert not staging.exists()


def test_an_audit_export_is_logged_as_an_audit_read_and_is_in_the_next_export(
    cli_home: Path,
) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["migrate"]).exit_code == 0
    assert runner.invoke(cli, ["keys", "init"]).exit_code == 0
    first = runner.invoke(cli, ["audit", "export", "--out", str(cli_home / "first")])
    assert first.exit_code == 0, first.output
    assert "exported 0 entries" in first.output
    second = runner.invoke(cli, ["audit", "export", "--out", str(cli_home / "second")])
    assert second.exit_code == 0, second.output
    assert "exported 1 entry and" in second.output
    lines = (cli_home / "second" / "entries.ndjson").read_bytes().splitlines()
    assert [json.loads(line) for line in lines] == [
        {
            "action": "audit.read",
            "actor": "system:audit-export",
            "object_id": "export:0-0",
            "object_type": "audit",
            "outcome": "allowed",
            "pseudonyms": [],
            "reason": None,
            "request_id": None,
            "role": "system",
            "time": json.loads(lines[0])["time"],
        }
    ]
    folder = cli_home / "second"
    verified = runner.invoke(
        cli,
        [
            "audit",
            "verify",
            "--entries",
            str(folder / "entries.ndjson"),
            "--checkpoint",
            str(folder / "checkpoint"),
            "--public-key",
            str(folder / "public-key"),
        ],
    )
    assert verified.exit_code == 0, verified.output


def test_an_export_the_log_cannot_record_is_kept_and_the_command_says_it_is_not_logged(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.access_log.export as export

    runner = CliRunner()
    assert runner.invoke(cli, ["migrate"]).exit_code == 0
    assert runner.invoke(cli, ["keys", "init"]).exit_code == 0
    monkeypatch.setenv("CASEPACKETS_LOG_LOCK_TIMEOUT_SECONDS", "0.2")
    get_settings.cache_clear()
    held = sqlite3.connect(cli_home / "cli.db", isolation_level=None)
    export_log = export.export_log

    def export_then_hold_the_log(**arguments: Any) -> export.Exported:
        exported = export_log(**arguments)
        held.execute("BEGIN IMMEDIATE")  # another writer takes the one write lock
        return exported

    monkeypatch.setattr(export, "export_log", export_then_hold_the_log)
    try:
        result = runner.invoke(cli, ["audit", "export", "--out", str(cli_home / "export")])
    finally:
        held.close()
    assert result.exit_code == 1, (result.output, result.exception)
    assert "Traceback" not in result.output
    said = " ".join(result.output.split())
    assert "exported 0 entries and a signed checkpoint" in said
    assert "but the export is not in the access log: the log stayed busy" in said
    assert sorted(path.name for path in (cli_home / "export").iterdir()) == sorted(
        export.EXPORT_FILES
    )
    monkeypatch.setattr(export, "export_log", export_log)
    again = runner.invoke(cli, ["audit", "export", "--out", str(cli_home / "again")])
    assert "exported 0 entries" in again.output  # nothing was logged


def test_backup_copies_what_the_wal_holds_while_the_service_runs(cli_home: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["migrate"]).exit_code == 0
    assert runner.invoke(cli, ["keys", "init"]).exit_code == 0
    live = Database(get_settings())  # a worker's engine: its open connection keeps the -wal
    try:
        append_each(live, 5)
        plain_copy = cli_home / "plain-copy.db"
        shutil.copyfile(cli_home / "cli.db", plain_copy)
        result = runner.invoke(cli, ["backup", "--out", str(cli_home / "backup.db")])
    finally:
        live.dispose()
    assert result.exit_code == 0, result.output
    assert "backed up the database to" in result.output

    def entries(path: Path) -> int:
        with sqlite3.connect(path) as copy:
            count: int = copy.execute("SELECT count(*) FROM access_log_entries").fetchone()[0]
            return count

    assert entries(plain_copy) < 5, "the latest entries were still in the -wal"
    assert entries(cli_home / "backup.db") == 5
    assert (cli_home / "backup.db").stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(cli_home / "backup.db") as copy:
        assert copy.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert not [path.name for path in cli_home.iterdir() if path.name.startswith("backup.db-")]
    assert not [path.name for path in cli_home.iterdir() if ".partial" in path.name]


def test_backup_never_replaces_a_file_and_never_creates_the_database(cli_home: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["migrate"]).exit_code == 0
    existing = cli_home / "existing"
    existing.write_text("an earlier backup")
    result = runner.invoke(cli, ["backup", "--out", str(existing)])
    assert result.exit_code == 2
    assert one_line(result.output) == f"failed: refusing to replace it: {existing}"
    assert existing.read_text() == "an earlier backup"
    (cli_home / "cli.db").unlink()
    result = runner.invoke(cli, ["backup", "--out", str(cli_home / "new.db")])
    assert result.exit_code == 2
    assert one_line(result.output).startswith("failed: no database file: ")
    assert not (cli_home / "cli.db").exists()
    assert not (cli_home / "new.db").exists()


def test_backup_and_export_name_a_path_with_brackets_as_it_is_written(cli_home: Path) -> None:
    """A folder named `[daily]` is a folder, not terminal markup: the command names the file it
    wrote as it is (not `…//backup.db`), and `a[/b]` does not turn a backup that was made into
    an unexpected error (exit 1) that says nothing of it."""
    runner = CliRunner()
    assert runner.invoke(cli, ["migrate"]).exit_code == 0
    assert runner.invoke(cli, ["keys", "init"]).exit_code == 0
    for folder in (cli_home / "[daily]", cli_home / "a[" / "b]"):
        folder.mkdir(parents=True)
        backup = folder / "backup.db"
        result = runner.invoke(cli, ["backup", "--out", str(backup)])
        assert result.exit_code == 0, result.output
        assert one_line(result.output).startswith(f"backed up the database to {backup} (")
        again = runner.invoke(cli, ["backup", "--out", str(backup)])
        assert again.exit_code == 2, again.output
        assert one_line(again.output) == f"failed: refusing to replace it: {backup}"
        export = folder / "export"
        exported = runner.invoke(cli, ["audit", "export", "--out", str(export)])
        assert exported.exit_code == 0, exported.output
        assert f"a signed checkpoint to {export}" in exported.output
        (export / "stray").write_text("not part of an export")
        refused = runner.invoke(cli, ["audit", "export", "--out", str(export)])
        assert refused.exit_code == 2, refused.output
        assert f"cannot write the export to {export}: " in refused.output
        assert f"({export / 'stray'})" in refused.output


def test_audit_export_refusals_name_a_path_with_brackets_as_it_is_written(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusals before a checkpoint is signed name their path as it is too: an export
    folder that cannot be made, and a keyring that is not there; `a[/b]` is neither a style
    nor an unexpected error (exit 1) that names nothing."""
    runner = CliRunner()
    assert runner.invoke(cli, ["migrate"]).exit_code == 0
    assert runner.invoke(cli, ["keys", "init"]).exit_code == 0
    (cli_home / "a[").mkdir()
    (cli_home / "a[" / "b]").write_text("a file, not a folder")
    export = cli_home / "a[" / "b]" / "export"
    refused = runner.invoke(cli, ["audit", "export", "--out", str(export)])
    assert refused.exit_code == 2, refused.output
    assert one_line(refused.output) == (
        f"refused: cannot write the export to {export}: Not a directory"
    )
    keyring = cli_home / "k[" / "x]" / "keyring.json"
    monkeypatch.setenv("CASEPACKETS_KEYRING_PATH", str(keyring))
    get_settings.cache_clear()
    unsigned = runner.invoke(cli, ["audit", "export", "--out", str(cli_home / "export")])
    assert unsigned.exit_code == 2, unsigned.output
    assert one_line(unsigned.output).startswith(
        f"cannot sign a checkpoint: no keyring at {keyring};"
    )
    assert not (cli_home / "export").exists()


def test_a_backup_is_on_disk_before_its_name_appears_and_its_name_after(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["migrate"]).exit_code == 0
    backup = cli_home / "backup.db"
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), backup.exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    result = runner.invoke(cli, ["backup", "--out", str(backup)])
    assert result.exit_code == 0, result.output
    [(copy, named_then), (folder, named_after)] = synced
    assert Path(copy).name.startswith(".backup.db.")
    assert Path(copy).name.endswith(".partial")
    assert not named_then, "the copy is synced before it is linked as the backup"
    assert Path(folder) == cli_home.resolve()
    assert named_after, "the folder is synced once it holds the backup's name"


def test_a_file_put_in_place_of_the_backup_meanwhile_is_not_replaced(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["migrate"]).exit_code == 0
    backup = cli_home / "backup.db"
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if not backup.exists():
            backup.write_text("someone else's")  # after the check, before the link
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    result = runner.invoke(cli, ["backup", "--out", str(backup)])
    assert result.exit_code == 2, result.output
    assert backup.read_text() == "someone else's"
    assert not [path.name for path in cli_home.iterdir() if ".partial" in path.name]


def test_what_a_killed_backup_left_does_not_stop_the_next_one(cli_home: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["migrate"]).exit_code == 0
    for leftover in (
        ".backup.db.partial",
        ".backup.db.k1ll3d.partial",
        ".backup.db.partial-journal",
    ):
        (cli_home / leftover).write_bytes(b"what a SIGKILL left")
    result = runner.invoke(cli, ["backup", "--out", str(cli_home / "backup.db")])
    assert result.exit_code == 0, result.output
    with sqlite3.connect(cli_home / "backup.db") as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    missing = cli_home / "no-such-folder"
    result = runner.invoke(cli, ["backup", "--out", str(missing / "backup.db")])
    assert result.exit_code == 2
    assert one_line(result.output) == f"failed: no such folder: {missing}"


def test_backup_of_postgresql_points_to_pg_dump_without_echoing_the_url(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CASEPACKETS_DATABASE_URL", "postgresql+psycopg://app:s3cret@db/cases")
    get_settings.cache_clear()
    result = CliRunner().invoke(cli, ["backup", "--out", str(cli_home / "b")])
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert "back it up with pg_dump" in said
    assert "s3cret" not in said


def test_migrate_help_says_there_is_no_way_back_but_a_backup() -> None:
    result = CliRunner().invoke(cli, ["migrate", "--help"])
    assert result.exit_code == 0
    said = " ".join(result.output.split())
    assert "There are no downgrades" in said
    assert "back the database up before migrating" in said


def test_an_unexpected_error_is_reported_by_its_type_without_its_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An exception no command handles may quote a CSV line or a refused row: the console
    script shows its type and where it happened, never its message or its causes."""

    row = {"bsn": "1234" + "56782", "family_name": "Quaed" + "vlieg"}  # as read from a file

    def crash() -> Settings:
        try:
            raise KeyError(row["family_name"])
        except KeyError as cause:
            raise ValueError(f"cannot store {row}") from cause

    monkeypatch.setattr("service.cli.settings_or_exit", crash)
    monkeypatch.setattr("sys.argv", ["casepackets", "expire"])
    with pytest.raises(SystemExit) as stopped:
        cli_main()
    assert stopped.value.code == 1
    printed = capsys.readouterr()
    output = printed.out + printed.err
    assert "unexpected ValueError" in output
    assert "in crash" in output  # the frames are shown
    assert "123456782" not in output
    assert "Quaedvlieg" not in output


@pytest.mark.parametrize("folder", ["[daily]", "a[/b]"])
def test_paths_are_named_as_written_brackets_and_all(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch, folder: str
) -> None:
    """A path is text, not console markup: a folder named ``[daily]`` does not vanish as a
    style, and ``a[/b]`` does not end a command that did its work in a MarkupError."""
    home = cli_home / folder
    home.mkdir(parents=True)
    monkeypatch.setenv("CASEPACKETS_HOME", str(home))
    monkeypatch.delenv("CASEPACKETS_DATABASE_URL")
    get_settings.cache_clear()
    runner = CliRunner()
    created = runner.invoke(cli, ["keys", "init"])
    assert created.exit_code == 0, created.output
    assert one_line(created.output).startswith(f"created {home}/keyring.json with keys: ")
    refused = runner.invoke(cli, ["flag"])
    assert refused.exit_code == 2, refused.output
    assert one_line(refused.output) == (
        f"refused: there is no database at {home}/casepackets.db; run `casepackets migrate` first"
    )
    again = runner.invoke(cli, ["keys", "init"])
    assert again.exit_code == 1, again.output
    assert one_line(again.output) == (
        f"refused: a keyring already exists at {home}/keyring.json; refusing to overwrite it"
    )
