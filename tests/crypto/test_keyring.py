"""The keyring file: private, versioned per purpose, rotated atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from service.crypto.keyring import (
    PURPOSES,
    Keyring,
    KeyringError,
    KeyringMissing,
    KeyringTooOpen,
    UnknownKey,
)


def test_init_creates_a_private_file_with_every_purpose(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    keyring = Keyring.init(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    for purpose in PURPOSES:
        assert keyring.current(purpose).version == 1
        assert len(keyring.current(purpose).material) == 32
    assert len({keyring.current(p).material for p in PURPOSES}) == len(PURPOSES)


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    Keyring.init(tmp_path / "k.json")
    with pytest.raises(KeyringError, match="already exists"):
        Keyring.init(tmp_path / "k.json")


def test_missing_keyring_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(KeyringMissing, match="casepackets keys init"):
        Keyring.load(tmp_path / "absent.json")


def test_group_readable_keyring_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    Keyring.init(path)
    path.chmod(0o640)
    with pytest.raises(KeyringTooOpen, match="chmod 600"):
        Keyring.load(path)


def test_rotate_adds_a_current_version_and_keeps_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    keyring = Keyring.init(path)
    old = keyring.current("vault")
    new = keyring.rotate("vault")
    reloaded = Keyring.load(path)
    assert reloaded.current("vault").version == new.version == 2
    assert reloaded.get("vault", 1).material == old.material
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_retire_destroys_material_but_not_the_current_version(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    keyring = Keyring.init(path)
    old_material = keyring.current("packet").material.hex()
    with pytest.raises(KeyringError, match="current"):
        keyring.retire("packet", 1)
    keyring.rotate("packet")
    keyring.retire("packet", 1)
    with pytest.raises(UnknownKey):
        Keyring.load(path).get("packet", 1)
    assert old_material not in path.read_text()
    assert json.loads(path.read_text())["purposes"]["packet"]["versions"]["1"]["retired_at"]


def test_unknown_purpose_is_refused(tmp_path: Path) -> None:
    keyring = Keyring.init(tmp_path / "k.json")
    with pytest.raises(UnknownKey):
        keyring.current("nope")  # type: ignore[arg-type]
