"""The command line mints tokens the service accepts."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from service.cli import app as cli
from service.config import PROJECT_ROOT, Settings, get_settings
from service.main import create_app
from tests.conftest import bearer


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


def test_migrate_command_builds_the_schema(cli_home: Path) -> None:
    result = CliRunner().invoke(cli, ["migrate"])
    assert result.exit_code == 0, result.output
    assert (cli_home / "cli.db").exists()


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


def test_a_bad_setting_is_refused_by_its_variable_name(
    cli_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CASEPACKETS_ENV", "prod")
    monkeypatch.setenv("CASEPACKETS_TOKEN_LEEWAY_SECONDS", "999")
    get_settings.cache_clear()
    result = CliRunner().invoke(cli, ["migrate"])
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert "CASEPACKETS_ENV: Input should be 'development', 'test' or 'production'" in said
    assert "CASEPACKETS_TOKEN_LEEWAY_SECONDS: Input should be less than or equal to 300" in said
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
