"""The access policy: deny by default, closed vocabularies, errors that name file and line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.auth.permissions import Permission, PolicyError, Role, load_access_policy
from service.config import PROJECT_ROOT

POLICY = PROJECT_ROOT / "policies" / "access.yaml"


def test_shipped_policy_loads_and_grants_each_role_its_own_work() -> None:
    policy = load_access_policy(POLICY)
    assert set(policy.grants) == set(Role)
    assert Permission.PACKETS_OPEN in policy.permissions_for(["professional"])
    assert Permission.AUDIT_READ in policy.permissions_for(["auditor"])
    assert Permission.RECORDS_INGEST in policy.permissions_for(["source"])


def test_deny_by_default() -> None:
    policy = load_access_policy(POLICY)
    assert policy.permissions_for([]) == frozenset()
    assert policy.permissions_for(["superuser", "root"]) == frozenset()
    assert Permission.PACKETS_OPEN not in policy.permissions_for(["coordinator", "admin"])
    assert Permission.AUDIT_READ not in policy.permissions_for(["analyst"])


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "access.yaml"
    path.write_text(text)
    return path


def test_unknown_role_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "version: 1\nroles:\n  professional: [packets.read]\n  wizard: []\n")
    with pytest.raises(PolicyError, match=rf"{path}:4: unknown role 'wizard'"):
        load_access_policy(path)


def test_unknown_permission_names_file_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path, "version: 1\nroles:\n  auditor:\n    - audit.read\n    - audit.rewrite\n"
    )
    with pytest.raises(PolicyError, match=rf"{path}:5: unknown permission 'audit.rewrite'"):
        load_access_policy(path)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "version: 1\nroles: {}\n",
        "roles:\n  auditor: [audit.read]\n",
        "- a\n",
        "version: one\nroles:\n  auditor: [audit.read]\n",
        "version: -1\nroles:\n  auditor: [audit.read]\n",
    ],
    ids=["empty", "no-roles", "no-version", "not-a-mapping", "version-in-words", "version-below-0"],
)
def test_empty_or_malformed_policy_is_refused(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PolicyError, match=f"^{re.escape(str(path))}"):
        load_access_policy(path)


def test_bad_policy_stops_start_up(tmp_path: Path) -> None:
    from service.config import Settings
    from service.main import create_app

    (tmp_path / "policies").mkdir()
    write(tmp_path / "policies", "version: 1\nroles:\n  auditor: [audit.everything]\n")
    settings = Settings(env="test", home=tmp_path, policies_dir=tmp_path / "policies")
    with pytest.raises(PolicyError, match=r"access\.yaml:3: unknown permission"):
        create_app(settings)
