"""Settings refuse unsafe combinations with a message naming what to change."""

from __future__ import annotations

import importlib.metadata
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import ValidationError

from service.cli import refusal
from service.config import (
    PROJECT_ROOT,
    Settings,
    installed_data,
    normalize_database_url,
    shipped,
)
from service.records.models import MAX_BATCH_ROWS


def test_production_refuses_the_dev_issuer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CASEPACKETS_DEV_ISSUER must be false"):
        Settings(env="production", home=tmp_path, dev_issuer=True, jwks_url="https://idp/jwks")


@pytest.mark.parametrize(
    "identity_provider",
    [{"jwks_file": Path("jwks.json")}, {"jwks_url": "https://idp.example/jwks"}],
    ids=["jwks_file", "jwks_url"],
)
def test_an_identity_provider_turns_the_dev_issuer_off_by_default(
    tmp_path: Path, identity_provider: dict[str, Any]
) -> None:
    assert Settings(home=tmp_path).dev_issuer
    assert not Settings(home=tmp_path, **identity_provider).dev_issuer
    assert not Settings(home=tmp_path, dev_issuer=False, **identity_provider).dev_issuer
    with pytest.raises(ValueError, match="CASEPACKETS_DEV_ISSUER=true cannot be combined"):
        Settings(home=tmp_path, dev_issuer=True, **identity_provider)


def test_an_identity_provider_from_the_environment_turns_the_dev_issuer_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CASEPACKETS_JWKS_URL", "https://idp.example/jwks")
    assert not Settings(home=tmp_path).dev_issuer
    monkeypatch.setenv("CASEPACKETS_DEV_ISSUER", "true")
    with pytest.raises(ValueError, match="cannot be combined"):
        Settings(home=tmp_path)


def test_production_without_an_identity_provider_is_told_to_configure_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CASEPACKETS_JWKS_FILE or CASEPACKETS_JWKS_URL"):
        Settings(env="production", home=tmp_path)


def test_production_requires_pinned_keys(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CASEPACKETS_JWKS_FILE or CASEPACKETS_JWKS_URL"):
        Settings(env="production", home=tmp_path, dev_issuer=False)


def test_production_requires_https_jwks(tmp_path: Path) -> None:
    """Every other production setting is right, so only the scheme can be what is refused (a
    bare ``match="https"`` also matched the link to pydantic's docs in any ValidationError)."""
    with pytest.raises(ValidationError) as refused:
        Settings(
            env="production",
            home=tmp_path,
            dev_issuer=False,
            jwks_url="http://idp/jwks",
            checkpoint_origin="casepackets.example.nl/access-log",
        )
    assert refusal(refused.value) == "CASEPACKETS_JWKS_URL must use https:// in production"


def test_a_jwks_file_and_a_jwks_url_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(
            home=tmp_path,
            dev_issuer=False,
            jwks_file=Path("jwks.json"),
            jwks_url="https://idp.example/jwks",
        )
    assert refusal(refused.value) == "set CASEPACKETS_JWKS_FILE or CASEPACKETS_JWKS_URL, not both"


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("token_leeway_seconds", 301),
        ("token_max_lifetime_seconds", 30 * 24 * 3600 + 1),
        ("token_max_lifetime_seconds", 59),
    ],
)
def test_token_time_bounds_past_their_limits_are_refused(
    tmp_path: Path, setting: str, value: int
) -> None:
    """A leeway or a token lifetime past its bound keeps an expired or leaked token usable."""
    given: dict[str, Any] = {setting: value}
    with pytest.raises(ValidationError) as refused:
        Settings(home=tmp_path, **given)
    assert refusal(refused.value).startswith(f"CASEPACKETS_{setting.upper()}:")


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("shred_interval_seconds", "inf"),
        ("shred_interval_seconds", "nan"),
        ("shred_interval_seconds", "86401"),
        ("jwks_refresh_seconds", "inf"),
        ("jwks_refresh_seconds", "1e12"),
    ],
)
def test_an_interval_that_would_mean_never_is_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str, value: str
) -> None:
    """Shredding every 'inf' seconds, or refetching the identity provider's keys that seldom,
    would switch off the retention policy or key withdrawal without saying so."""
    monkeypatch.setenv(f"CASEPACKETS_{setting.upper()}", value)
    with pytest.raises(ValidationError) as refused:
        Settings(home=tmp_path)
    assert refusal(refused.value).startswith(f"CASEPACKETS_{setting.upper()}:")


def test_the_batch_size_may_not_exceed_the_ceiling_the_request_schema_holds(
    tmp_path: Path,
) -> None:
    assert Settings(home=tmp_path, max_batch_rows=MAX_BATCH_ROWS).max_batch_rows == MAX_BATCH_ROWS
    with pytest.raises(ValidationError, match="max_batch_rows"):
        Settings(home=tmp_path, max_batch_rows=MAX_BATCH_ROWS + 1)


@pytest.mark.parametrize("password", ["changethis", "CHANGEME", "Change-Me"])
def test_placeholder_values_are_refused(tmp_path: Path, password: str) -> None:
    with pytest.raises(ValueError, match="CASEPACKETS_DATABASE_URL holds a placeholder"):
        Settings(home=tmp_path, database_url=f"postgresql://app:{password}@db/casepackets")


@pytest.mark.parametrize(
    "given",
    [{"keyring_path": Path("/srv/changeme/keyring.json")}, {"home": Path("/srv/placeholder")}],
)
def test_placeholder_paths_are_refused(given: dict[str, Any]) -> None:
    field = next(iter(given)).upper()
    with pytest.raises(ValueError, match=f"CASEPACKETS_{field} holds a placeholder"):
        Settings(**given)


@pytest.mark.parametrize("origin", ["", "casepackets log", "casepackets+log", "\t"])
def test_a_checkpoint_origin_no_checkpoint_could_be_signed_under_is_refused(
    tmp_path: Path, origin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused when the settings are read, naming the variable, rather than when the first
    checkpoint is signed (start-up then died with a traceback)."""
    monkeypatch.setenv("CASEPACKETS_CHECKPOINT_ORIGIN", origin)
    with pytest.raises(ValidationError) as caught:
        Settings(home=tmp_path)
    assert refusal(caught.value).startswith("CASEPACKETS_CHECKPOINT_ORIGIN: must be a non-empty")


def test_production_requires_a_lasting_checkpoint_origin(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CASEPACKETS_CHECKPOINT_ORIGIN"):
        Settings(
            env="production", home=tmp_path, dev_issuer=False, jwks_url="https://idp.example/jwks"
        )


def test_production_with_pinned_keys_and_an_origin_is_accepted(tmp_path: Path) -> None:
    settings = Settings(
        env="production",
        home=tmp_path,
        dev_issuer=False,
        jwks_url="https://idp.example/jwks",
        checkpoint_origin="casepackets.example.nl/access-log",
    )
    assert settings.jwks_url == "https://idp.example/jwks"
    assert settings.checkpoint_origin == "casepackets.example.nl/access-log"


def test_shipped_folders_come_from_the_checkout_or_the_installed_data(tmp_path: Path) -> None:
    checkout, site_packages, data = tmp_path / "src", tmp_path / "site", tmp_path / "share"
    checkout.mkdir()
    (checkout / "pyproject.toml").write_text("[project]\n")
    (site_packages / "alembic").mkdir(parents=True)  # the library, not our migrations
    assert shipped("policies", root=checkout, installed=data) == checkout / "policies"
    assert shipped("alembic", root=site_packages, installed=data) == data / "alembic"
    # from this checkout, the defaults are the repository's own folders
    assert Settings(home=tmp_path).policies_dir == PROJECT_ROOT / "policies"
    assert (Settings(home=tmp_path).migrations_dir / "env.py").is_file()


def test_installed_data_is_where_the_wheel_put_it_whatever_the_prefix(tmp_path: Path) -> None:
    """``pip install --user`` (and Debian's system Python, whose pip installs under /usr/local)
    puts the data-files under another prefix than the interpreter's sys.prefix: the policies and
    migrations were looked for under sys.prefix, and every command but ``keys init`` refused."""
    site = tmp_path / "user" / "lib" / "python3.11" / "site-packages"
    record = site / "casepackets-0.1.0.dist-info"
    record.mkdir(parents=True)
    (record / "METADATA").write_text("Metadata-Version: 2.4\nName: casepackets\nVersion: 0.1.0\n")
    (record / "RECORD").write_text(
        "service/config.py,,\n"
        "../../../share/casepackets/alembic/env.py,,\n"
        "../../../share/casepackets/policies/access.yaml,,\n"
    )
    found = installed_data(importlib.metadata.PathDistribution(record))
    assert found == (tmp_path / "user" / "share" / "casepackets").resolve()
    # without a record of its files (not installed by a wheel), the interpreter's prefix
    (record / "RECORD").unlink()
    bare = installed_data(importlib.metadata.PathDistribution(record))
    assert bare == Path(sys.prefix) / "share" / "casepackets"


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


def test_a_wheel_ships_every_policy_and_migration() -> None:
    """pyproject's data-files (installed under <prefix>/share/casepackets, where ``shipped``
    looks outside a checkout) name every file of policies/ and alembic/ that the code reads."""
    data_files = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "data-files"
    ]
    listed = {
        (Path(target) / Path(path).name).relative_to("share/casepackets")
        for target, patterns in data_files.items()
        for pattern in patterns
        for path in PROJECT_ROOT.glob(pattern)
    }
    needed = {
        path.relative_to(PROJECT_ROOT)
        for folder in ("policies", "alembic")
        for path in (PROJECT_ROOT / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert needed == listed


def pinned_versions() -> dict[str, str]:
    """constraints.txt as {normalized name: version}."""
    lines = (PROJECT_ROOT / "constraints.txt").read_text().splitlines()
    pairs = (line.split("==") for line in lines if line and not line.startswith("#"))
    return {canonicalize_name(name): version for name, version in pairs}


def test_constraints_pin_every_package_the_project_installs() -> None:
    """constraints.txt (written by scripts/lock) pins what pyproject asks for, with the dev
    extras, and everything that needs in turn, at the versions installed here: a dependency added
    without refreshing it, or an install that ignored it, would run unpinned."""
    pinned = pinned_versions()
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    wanted = [
        Requirement(line)
        for line in project["dependencies"] + project["optional-dependencies"]["dev"]
    ]
    seen: dict[str, str] = {}
    while wanted:
        requirement = wanted.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        distribution = importlib.metadata.distribution(name)
        seen[name] = distribution.version
        extras = {"", *requirement.extras}
        for line in distribution.requires or ():
            needed = Requirement(line)
            marker = needed.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in extras):
                wanted.append(needed)
    assert {name: pinned.get(name) for name in seen} == seen


@pytest.mark.parametrize(
    "url", ["foo://x", "not a url", "mysql://app:s3cret@db/x", "postgresql+psycopg2://app@db/x"]
)
def test_a_url_naming_no_database_casepackets_runs_on_is_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(ValueError, match="is not a database URL casepackets can use") as refused:
        Settings(home=tmp_path, database_url=url)
    assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize(
    "url", ["postgresql://app:s3cret/casepackets", "postgresql://app@db:s3cret/casepackets"]
)
def test_a_url_whose_port_is_no_number_is_refused_by_name_without_echoing_it(
    tmp_path: Path, url: str
) -> None:
    """A URL missing its ``@host`` reads the password as the port: SQLAlchemy's own error
    ("invalid literal for int() …") quoted it, and named no variable."""
    with pytest.raises(ValidationError) as refused:
        Settings(home=tmp_path, database_url=url)
    said = refusal(refused.value)
    assert said.startswith("DATABASE_URL (or CASEPACKETS_DATABASE_URL) is not a database URL")
    assert "s3cret" not in str(refused.value)


def test_a_refusal_never_echoes_the_settings_it_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database URL may hold a password; a refusal printed in full (by uvicorn, say) must
    not show it."""
    monkeypatch.setenv("CASEPACKETS_ENV", "production")
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:s3cret@db/x")
    with pytest.raises(
        ValueError, match="CASEPACKETS_JWKS_FILE or CASEPACKETS_JWKS_URL"
    ) as refused:
        Settings()
    assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize("variable", ["CASEPACKETS_SHRED_INTERVAL", "casepackets_shred_interval"])
def test_a_misspelled_setting_is_refused_naming_the_one_it_resembles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """Ignored, it left the shredder on its default while the operator believed it off. The
    settings read names in any case, so a misspelling in any case is refused; the value (it may
    be a secret) is never shown."""
    monkeypatch.setenv(variable, "s3cret-0")
    with pytest.raises(ValidationError) as refused:
        Settings(home=tmp_path)
    assert refusal(refused.value) == (
        f"{variable} is not a setting (did you mean CASEPACKETS_SHRED_INTERVAL_SECONDS?)"
    )
    assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize(
    "variable",
    [
        "CASEPACKETS_HOME",
        "CASEPACKETS_KEYRING_PATH",
        "CASEPACKETS_JWKS_FILE",
        "CASEPACKETS_POLICIES_DIR",
        "CASEPACKETS_MIGRATIONS_DIR",
    ],
)
def test_an_empty_path_setting_is_refused_by_name_not_read_as_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """``CASEPACKETS_HOME=$DATA`` with DATA unset put the database, keyring and issuer key in
    whatever folder a command ran from (scripts/serve reads an empty one as unset, so a
    `casepackets token` beside it signed with a key the service refused); an empty JWKS file
    turned the built-in issuer off as if a provider were configured."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(variable, "")
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert refusal(refused.value) == (
        f"{variable}: is empty; unset it for the default, or give a path"
    )


def test_only_variables_with_the_casepackets_prefix_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another product's variables that merely contain the name are not ours to refuse."""
    monkeypatch.setenv("CASEPACKETSX_FOO", "1")
    monkeypatch.setenv("OTHER_CASEPACKETS_FOO", "1")
    Settings(home=tmp_path)
    monkeypatch.setenv("CASEPACKETS_FOO", "1")
    with pytest.raises(ValidationError) as refused:
        Settings(home=tmp_path)
    assert refusal(refused.value) == "CASEPACKETS_FOO is not a setting"


def dockerfile_variables() -> dict[str, str]:
    """The CASEPACKETS_ variables the Dockerfile's ENV instructions set, with their values."""
    instructions = (PROJECT_ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    assignments = (
        word.split("=", 1)
        for line in instructions
        if line.startswith("ENV ")
        for word in shlex.split(line.removeprefix("ENV "))
    )
    return {name: value for name, value in assignments if name.startswith("CASEPACKETS_")}


def test_every_variable_the_project_sets_is_accepted_and_a_near_miss_points_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image's own environment (with what the README's ``docker run`` adds) loads, and so does
    the fuzz tests' CASEPACKETS_FUZZ_EXAMPLES; a name one letter short of any of them is refused,
    pointing back to it."""
    image = dockerfile_variables()
    assert {"CASEPACKETS_ENV", "CASEPACKETS_HOME", "CASEPACKETS_POLICIES_DIR"} <= image.keys()
    project_sets = {**image, "CASEPACKETS_FUZZ_EXAMPLES": "15"}
    for name, value in project_sets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CASEPACKETS_JWKS_URL", "https://idp.example/jwks")
    monkeypatch.setenv("CASEPACKETS_CHECKPOINT_ORIGIN", "casepackets.example.nl/access-log")
    settings = Settings()
    assert (settings.env, settings.home) == ("production", Path("/data"))
    for name, value in project_sets.items():
        monkeypatch.setenv(name[:-1], value)
        with pytest.raises(ValidationError) as refused:
            Settings()
        assert refusal(refused.value) == f"{name[:-1]} is not a setting (did you mean {name}?)"
        monkeypatch.delenv(name[:-1])
