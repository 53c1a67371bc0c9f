"""The built-in issuer's signing key file (no database)."""

from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path

import pytest

from service.crypto import issuer_keys
from service.crypto.issuer_keys import load_or_create_private_pem, public_pem


class HalfWritten(io.FileIO):
    """A file whose write stops half-way, as a full disk or a kill leaves it."""

    def write(self, data: bytes) -> int:  # type: ignore[override]
        super().write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_key_file_is_made_whole_with_mode_0600_and_read_back_the_same(tmp_path: Path) -> None:
    path = tmp_path / "issuer" / "issuer-key.pem"
    made = load_or_create_private_pem(path, "ES256")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_private_pem(path, "ES256") == made
    assert public_pem(made).startswith(b"-----BEGIN PUBLIC KEY-----")
    assert sorted(p.name for p in path.parent.iterdir()) == ["issuer-key.pem"]


def test_a_key_file_whose_write_fails_half_way_leaves_nothing_for_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "issuer-key.pem"
    with monkeypatch.context() as patched:
        patched.setattr(os, "fdopen", lambda fd, mode: HalfWritten(fd, "wb"))
        with pytest.raises(OSError, match="No space left"):
            load_or_create_private_pem(path, "ES256")
    assert list(tmp_path.iterdir()) == []  # no key cut short, no hidden leftover
    made = load_or_create_private_pem(path, "ES256")  # the next start makes a whole one
    assert public_pem(made).startswith(b"-----BEGIN PUBLIC KEY-----")


def test_a_key_file_another_process_made_meanwhile_is_the_one_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "issuer-key.pem"
    theirs = issuer_keys.generate_private_pem("ES256")
    real_generate = issuer_keys.generate_private_pem

    def generate_while_they_write(algorithm: str) -> bytes:
        ours = real_generate(algorithm)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(theirs)
        return ours

    monkeypatch.setattr(issuer_keys, "generate_private_pem", generate_while_they_write)
    assert load_or_create_private_pem(path, "ES256") == theirs
    assert [p.name for p in tmp_path.iterdir()] == ["issuer-key.pem"]
