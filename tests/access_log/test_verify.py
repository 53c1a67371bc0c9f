"""Offline export and verification: an untouched log verifies; every kind of tampering is named."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError
from sqlmodel import Session
from typer.testing import CliRunner

from service.access_log import merkle
from service.access_log import service as log
from service.access_log.checkpoint import Checkpoint, checkpoint_text, unverified_checkpoint
from service.access_log.export import (
    CHECKPOINT_FILE,
    ENTRIES_FILE,
    HANDOVERS_FILE,
    LEAF_HASHES_FILE,
    PUBLIC_KEY_FILE,
    export_log,
)
from service.access_log.handover import hand_over, handed_to
from service.access_log.verify import VerificationFailed, bounded_lines, verify_files
from service.access_log.verify import reporting_lines as reporting
from service.access_log.verify import root_of_lines as merkle_root_of_lines
from service.cli import app as cli
from service.config import Settings, get_settings
from service.crypto.keyring import Keyring, LockedKeyring, Staged
from service.crypto.signing import NoteSigner, VerifierKey, open_note
from service.db import Database
from service.main import create_app
from tests.access_log.conftest import ORIGIN, append_each, run_sql, without_triggers_sql
from tests.conftest import Databases, bearer

Rows = list[tuple[bytes, bytes]]


def verify(
    folder: Path, *extra: str, leaf_hashes: bool = True, public_key: Path | None = None
) -> tuple[int, str]:
    arguments = [
        "audit",
        "verify",
        "--entries",
        str(folder / ENTRIES_FILE),
        "--checkpoint",
        str(folder / CHECKPOINT_FILE),
        "--public-key",
        str(public_key or folder / PUBLIC_KEY_FILE),
    ]
    if leaf_hashes:
        arguments += ["--leaf-hashes", str(folder / LEAF_HASHES_FILE)]
    result = CliRunner().invoke(cli, [*arguments, *extra])
    return result.exit_code, " ".join(result.output.split())


def export(database: Database, signer: NoteSigner, folder: Path) -> Path:
    export_log(database=database, signer=lambda _session: signer, origin=ORIGIN, folder=folder)
    return folder


def test_an_untouched_export_verifies(
    database: Database, signer: NoteSigner, tmp_path: Path
) -> None:
    append_each(database, 30)
    trusted = export(database, signer, tmp_path / "first")
    append_each(database, 11)
    folder = export(database, signer, tmp_path / "second")
    assert len((folder / ENTRIES_FILE).read_bytes().splitlines()) == 41
    assert (folder / LEAF_HASHES_FILE).stat().st_size == 41 * 32
    code, output = verify(folder, "--trusted-checkpoint", str(trusted / CHECKPOINT_FILE))
    assert code == 0, output
    assert "OK: 41 entries" in output
    assert "trusted checkpoint of size 30" in output
    assert verify(folder, leaf_hashes=False)[0] == 0


def crafted_checkpoint(note: str) -> dict[str, bytes]:
    """Ways to damage an exported checkpoint, as the bytes of the file."""
    text, _, signatures = note.partition("\n\n")
    origin, size, root = text.split("\n")
    return {
        "not UTF-8": note.encode().replace(b"\n\n", b"\n\xff\n", 1),
        "CRLF": note.replace("\n", "\r\n").encode(),
        "a 5,000-digit size": f"{origin}\n{'9' * 5000}\n{root}\n\n{signatures}".encode(),
        "a root outside ASCII": f"{origin}\n{size}\n{root[:-2]}é=\n\n{signatures}".encode(),
        "trailing words": (note + "and more\n").encode(),
    }


def test_a_crafted_export_fails_with_a_message_never_a_traceback(
    database: Database, signer: NoteSigner, tmp_path: Path
) -> None:
    append_each(database, 6)
    folder = export(database, signer, tmp_path / "export")
    note = (folder / CHECKPOINT_FILE).read_text()
    for damage, data in crafted_checkpoint(note).items():
        (folder / CHECKPOINT_FILE).write_bytes(data)
        code, output = verify(folder)
        assert code == 1, (damage, output)
        assert output.startswith("FAILED:"), (damage, output)
    (folder / CHECKPOINT_FILE).write_text(note)
    nested = {"size": 6, "note": "[" * 100_000 + "]" * 100_000}
    for handovers in (b"\xff\n", json.dumps(nested).encode() + b"\n", b"[" * 100_000 + b"\n"):
        (folder / HANDOVERS_FILE).write_bytes(handovers)
        code, output = verify(folder, "--handovers", str(folder / HANDOVERS_FILE))
        assert code == 1, output
        assert output.startswith("FAILED:"), output
    (folder / PUBLIC_KEY_FILE).write_bytes(b"\xff\xfe")
    code, output = verify(folder)
    assert (code, output[:7]) == (1, "FAILED:")


def test_a_file_that_is_not_utf8_is_named_with_the_byte_that_is_not(
    database: Database, signer: NoteSigner, tmp_path: Path
) -> None:
    """Read as it is, never with replacement characters that would make it another text."""
    append_each(database, 2)
    folder = export(database, signer, tmp_path / "export")
    note = (folder / CHECKPOINT_FILE).read_bytes()
    bad_byte = note.index(b"\n\n") + 1
    (folder / CHECKPOINT_FILE).write_bytes(note.replace(b"\n\n", b"\n\xff\n", 1))
    code, output = verify(folder)
    assert code == 1
    assert f"checkpoint is not UTF-8 text (byte {bad_byte})" in output


def test_a_line_longer_than_the_bound_is_refused_before_it_is_held() -> None:
    lines = bounded_lines(io.BytesIO(b"short\n" + b"x" * 100 + b"\n"), limit=50)
    assert next(lines) == b"short\n"
    with pytest.raises(VerificationFailed, match="longer than 50 bytes"):
        next(lines)


def rewrite_entries(engine: Engine, backend: str, change: Callable[[Rows], Rows]) -> None:
    """What an operator with the triggers switched off could do: rewrite the entry table."""
    with engine.connect() as connection:
        rows = [
            (bytes(leaf), bytes(data))
            for leaf, data in connection.execute(
                text("SELECT leaf_hash, entry FROM access_log_entries ORDER BY leaf_index")
            )
        ]
    changed = change(rows)
    inserts = [
        f"INSERT INTO access_log_entries (leaf_index, leaf_hash, entry) VALUES ({i}, :h{i}, :e{i})"
        for i in range(len(changed))
    ]
    params: dict[str, object] = {}
    for i, (_, data) in enumerate(changed):
        params[f"h{i}"] = merkle.leaf_hash(data)  # a careful forger recomputes the leaf hash
        params[f"e{i}"] = data
    run_sql(
        engine,
        without_triggers_sql(backend, "access_log_entries", ["DELETE FROM access_log_entries"]),
    )
    with engine.begin() as connection:
        for statement in inserts:
            connection.execute(text(statement), params)


def edited(rows: Rows) -> Rows:
    leaf, data = rows[7]
    document = json.loads(data)
    document["outcome"] = "allowed" if document["outcome"] == "denied" else "denied"
    forged = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    return [*rows[:7], (leaf, forged), *rows[8:]]


def deleted(rows: Rows) -> Rows:
    return [*rows[:7], *rows[8:]]


def swapped(rows: Rows) -> Rows:
    changed = [*rows]
    changed[3], changed[9] = changed[9], changed[3]
    return changed


def truncated(rows: Rows) -> Rows:
    return rows[:15]


def inserted(rows: Rows) -> Rows:
    fake = rows[2][1].replace(b'"object_id":"2"', b'"object_id":"999"')
    return [*rows[:10], (b"", fake), *rows[10:]]


@pytest.mark.parametrize(
    ("change", "first_bad"),
    [(edited, 7), (deleted, 7), (swapped, 3), (truncated, 15), (inserted, 10)],
)
def test_tampering_is_flagged_with_the_first_bad_index(
    database: Database,
    signer: NoteSigner,
    raw_engine: Engine,
    backend: str,
    tmp_path: Path,
    change: Callable[[Rows], Rows],
    first_bad: int,
) -> None:
    append_each(database, 20)
    trusted = export(database, signer, tmp_path / "before")
    rewrite_entries(raw_engine, backend, change)
    folder = export(database, signer, tmp_path / "after")

    code, output = verify(folder)
    assert code != 0
    assert "FAILED" in output
    assert f"first bad index {first_bad}" in output

    code, output = verify(
        folder, "--trusted-checkpoint", str(trusted / CHECKPOINT_FILE), leaf_hashes=False
    )
    assert code != 0
    assert "FAILED" in output


@pytest.mark.parametrize(
    ("change", "first_bad"),
    [
        (lambda lines: lines[1:], 0),  # the first entry removed
        (lambda lines: [*lines[:3], lines[2], *lines[3:]], 3),  # an entry given twice
        (lambda lines: lines[:-2], 8),  # the last two removed
    ],
)
def test_an_index_is_named_only_where_the_leaf_hashes_locate_it(
    database: Database,
    signer: NoteSigner,
    tmp_path: Path,
    change: Callable[[list[bytes]], list[bytes]],
    first_bad: int,
) -> None:
    """A count of entries that differs from the checkpoint's says entries were removed or
    added, not which: without authenticated leaf hashes no index is named (one would send the
    auditor to the wrong entry)."""
    append_each(database, 10)
    folder = export(database, signer, tmp_path / "export")
    lines = (folder / ENTRIES_FILE).read_bytes().splitlines(keepends=True)
    (folder / ENTRIES_FILE).write_bytes(b"".join(change(lines)))

    code, output = verify(folder, leaf_hashes=False)
    assert code != 0
    assert "FAILED" in output
    assert "first bad index" not in output
    assert "--leaf-hashes can tell" in " ".join(output.split())

    code, output = verify(folder)
    assert code != 0
    assert f"first bad index {first_bad}" in output


def test_leaf_hashes_that_fold_to_the_root_at_another_size_locate_nothing(
    database: Database, signer: NoteSigner, tmp_path: Path
) -> None:
    """A one-leaf tree's root is its leaf: a leaf-hashes file holding just the signed root
    folds to that root, yet it authenticates no leaf of a tree of 10."""
    append_each(database, 10)
    folder = export(database, signer, tmp_path / "export")
    root = unverified_checkpoint((folder / CHECKPOINT_FILE).read_text()).root
    (folder / LEAF_HASHES_FILE).write_bytes(root)
    entries = folder / ENTRIES_FILE
    entries.write_bytes(entries.read_bytes().replace(b'"object_id":"4"', b'"object_id":"X"', 1))
    code, output = verify(folder)
    assert code == 1
    assert "first bad index" not in output
    assert "the entries do not hash to the signed root" in output


def test_a_forged_or_foreign_checkpoint_is_refused(
    database: Database, signer: NoteSigner, tmp_path: Path
) -> None:
    append_each(database, 5)
    folder = export(database, signer, tmp_path / "export")
    note = (folder / CHECKPOINT_FILE).read_text()
    (folder / CHECKPOINT_FILE).write_text(note.replace("\n5\n", "\n4\n", 1))
    code, output = verify(folder)
    assert code != 0
    assert "does not verify" in output

    impostor = NoteSigner(name=ORIGIN, seed=b"\x01" * 32)
    (folder / CHECKPOINT_FILE).write_text(impostor.sign(note.partition("\n\n")[0] + "\n"))
    code, output = verify(folder)
    assert code != 0
    assert "new checkpoint rejected" in output
    assert "no signature by" in output


def test_a_rolled_back_log_fails_against_the_trusted_checkpoint(
    database: Database, signer: NoteSigner, tmp_path: Path
) -> None:
    append_each(database, 9)
    newer = export(database, signer, tmp_path / "newer")
    older = tmp_path / "older"
    older.mkdir()
    lines = (newer / ENTRIES_FILE).read_bytes().splitlines(keepends=True)
    (older / ENTRIES_FILE).write_bytes(b"".join(lines[:5]))
    tree = merkle.MemoryTree(merkle.leaf_hash(line[:-1]) for line in lines[:5])
    from service.access_log.checkpoint import Checkpoint, checkpoint_text

    (older / CHECKPOINT_FILE).write_text(
        signer.sign(checkpoint_text(Checkpoint(origin=ORIGIN, size=5, root=tree.root())))
    )
    (older / PUBLIC_KEY_FILE).write_text((newer / PUBLIC_KEY_FILE).read_text())
    assert verify(older, leaf_hashes=False)[0] == 0
    code, output = verify(
        older, "--trusted-checkpoint", str(newer / CHECKPOINT_FILE), leaf_hashes=False
    )
    assert code != 0
    assert "rolled back" in output


@pytest.fixture
def cli_env(
    home: Path, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    keyring = tmp_path / "keyring.json"
    Keyring.init(keyring)
    monkeypatch.setenv("CASEPACKETS_HOME", str(home))
    monkeypatch.setenv("CASEPACKETS_DATABASE_URL", db_url)
    monkeypatch.setenv("CASEPACKETS_KEYRING_PATH", str(keyring))
    monkeypatch.setenv("CASEPACKETS_CHECKPOINT_ORIGIN", ORIGIN)
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_export_command_writes_files_that_verify(cli_env: Path, database: Database) -> None:
    append_each(database, 12)
    out = cli_env / "export"
    result = CliRunner().invoke(cli, ["audit", "export", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "exported 12 entries" in " ".join(result.output.split())
    assert (out / PUBLIC_KEY_FILE).read_text().startswith(f"{ORIGIN}+")
    code, output = verify(out)
    assert code == 0, output


def test_export_command_refuses_a_folder_of_other_files_and_leaves_it_alone(
    cli_env: Path, database: Database
) -> None:
    append_each(database, 3)
    out = cli_env / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not an export")
    result = CliRunner().invoke(cli, ["audit", "export", "--out", str(out)])
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert (
        f"failed: cannot write the export to {out}: it holds a file that is not part of an "
        f"export, so it is not replaced ({out / 'notes.txt'})"
    ) in said
    assert [path.name for path in out.iterdir()] == ["notes.txt"]


def export_command(folder: Path) -> Path:
    result = CliRunner().invoke(cli, ["audit", "export", "--out", str(folder)])
    assert result.exit_code == 0, result.output
    return folder


def rotate_log_signing() -> None:
    result = CliRunner().invoke(cli, ["keys", "rotate", "--purpose", "log_signing"])
    assert result.exit_code == 0, result.output


@pytest.fixture
def rotated(cli_env: Path, database: Database) -> tuple[Path, Path]:
    """An export, a rotation of the log signing key, more entries, and a second export."""
    append_each(database, 10)
    before = export_command(cli_env / "before")
    rotate_log_signing()
    append_each(database, 4)
    after = export_command(cli_env / "after")
    assert (before / PUBLIC_KEY_FILE).read_text() != (after / PUBLIC_KEY_FILE).read_text()
    return before, after


def test_an_export_of_entries_altered_in_the_database_says_so_and_keeps_the_evidence(
    cli_env: Path, database: Database, raw_engine: Engine, backend: str
) -> None:
    """The checkpoint is signed over the stored tree hashes; entry 7 rewritten behind the
    triggers no longer hashes to them. The operator hears it from the export, not months later
    from the auditor, and the export is kept for the auditor."""
    append_each(database, 10)
    rewrite_entries(raw_engine, backend, edited)
    result = CliRunner().invoke(cli, ["audit", "export", "--out", str(cli_env / "export")])
    said = " ".join(result.output.split())
    assert result.exit_code == 1, said
    assert "exported 10 entries and a signed checkpoint" in said
    assert "but the entries do not hash to the checkpoint the service signed" in said
    code, output = verify(cli_env / "export")
    assert code == 1
    assert "first bad index 7" in output


def test_after_a_rotation_the_trusted_checkpoint_s_key_reaches_the_new_key_by_its_handover(
    rotated: tuple[Path, Path],
) -> None:
    before, after = rotated
    trusted = [
        "--trusted-checkpoint",
        str(before / CHECKPOINT_FILE),
        "--trusted-public-key",
        str(before / PUBLIC_KEY_FILE),
    ]
    code, output = verify(after, *trusted)
    assert code == 1
    assert "no handover leads from the trusted checkpoint's key" in output
    assert f"--handovers {after / HANDOVERS_FILE}" in output
    code, output = verify(after, *trusted, "--handovers", str(after / HANDOVERS_FILE))
    assert code == 0, output
    assert "handed over at size 12" in output
    # a rotation made before handovers existed: the auditor vouches for the new key themselves
    code, output = verify(after, *trusted, "--key-without-handover")
    assert code == 0, output
    assert "OK: 16 entries" in output  # 10, the first export's own entry, the rotation, 4
    assert "trusted checkpoint of size 10" in output


def test_after_a_rotation_the_new_key_alone_rejects_the_trusted_checkpoint_with_a_hint(
    rotated: tuple[Path, Path],
) -> None:
    before, after = rotated
    code, output = verify(after, "--trusted-checkpoint", str(before / CHECKPOINT_FILE))
    assert code == 1
    assert "FAILED: trusted checkpoint rejected" in output
    assert f"--trusted-public-key {before / PUBLIC_KEY_FILE}" in output


def test_a_trusted_checkpoint_exported_after_a_rotation_opens_by_the_pinned_key_s_handover(
    rotated: tuple[Path, Path], cli_env: Path, database: Database
) -> None:
    """Last month's export was taken after the rotation: its checkpoint is signed by the new
    key, while the auditor pinned the old one. The handover the pinned key signed, within the
    trusted checkpoint, leads to the key that signed it."""
    before, after = rotated
    append_each(database, 3)
    later = export_command(cli_env / "later")
    pinned = before / PUBLIC_KEY_FILE
    trusted = ["--trusted-checkpoint", str(after / CHECKPOINT_FILE)]
    handovers = ["--handovers", str(later / HANDOVERS_FILE)]
    code, output = verify(later, *trusted, *handovers, public_key=pinned)
    assert code == 0, output
    assert "trusted checkpoint of size 16" in output
    # Without the handovers nothing leads there: refused, with the hint as before.
    code, output = verify(later, *trusted, public_key=pinned)
    assert code == 1
    assert "FAILED: trusted checkpoint rejected" in output
    # A checkpoint of that size signed by a key no handover reaches stays refused.
    stranger = NoteSigner(name=ORIGIN, seed=bytes(range(32)))
    forged = cli_env / "forged-trusted"
    forged.write_text(
        stranger.sign(checkpoint_text(unverified_checkpoint((after / CHECKPOINT_FILE).read_text())))
    )
    code, output = verify(later, "--trusted-checkpoint", str(forged), *handovers, public_key=pinned)
    assert code == 1
    assert "FAILED: trusted checkpoint rejected" in output


def test_a_trusted_checkpoint_signed_by_an_unrelated_key_is_rejected(
    rotated: tuple[Path, Path],
) -> None:
    before, after = rotated
    body = (before / CHECKPOINT_FILE).read_text().partition("\n\n")[0] + "\n"
    unrelated = NoteSigner(name=ORIGIN, seed=os.urandom(32))
    forged = before / "forged-checkpoint"
    forged.write_text(unrelated.sign(body))
    code, output = verify(
        after,
        "--trusted-checkpoint",
        str(forged),
        "--trusted-public-key",
        str(before / PUBLIC_KEY_FILE),
    )
    assert code == 1
    assert "FAILED: trusted checkpoint rejected: the note carries no signature by" in output
    assert f"not signed by the key in {before / PUBLIC_KEY_FILE}" in output


def test_a_trusted_checkpoint_of_another_origin_is_rejected(rotated: tuple[Path, Path]) -> None:
    before, after = rotated
    other_origin = NoteSigner(name="elsewhere/log", seed=os.urandom(32))
    body = (before / CHECKPOINT_FILE).read_text().partition("\n\n")[0] + "\n"
    other = before / "other"
    other.mkdir()
    (other / CHECKPOINT_FILE).write_text(
        other_origin.sign(body.replace(ORIGIN, other_origin.name, 1))
    )
    (other / PUBLIC_KEY_FILE).write_text(f"{other_origin.verifier}\n")
    code, output = verify(
        after,
        "--trusted-checkpoint",
        str(other / CHECKPOINT_FILE),
        "--trusted-public-key",
        str(other / PUBLIC_KEY_FILE),
    )
    assert code == 1
    assert "trusted checkpoint rejected" in output
    assert "never changes origin" in output


@pytest.mark.parametrize("origin", [f"{ORIGIN}[/x]", f"{ORIGIN}[on red]x", f"{ORIGIN}x\\"])
def test_verify_quotes_what_a_file_says_as_it_is(
    cli_env: Path, database: Database, origin: str
) -> None:
    """A checkpoint's origin is the file's text, not the tool's: no markup in it may crash the
    command or change the message the auditor reads."""
    append_each(database, 3)
    trusted = export_command(cli_env / "trusted")
    changed = export_command(cli_env / "changed")
    note = (changed / CHECKPOINT_FILE).read_text()
    (changed / CHECKPOINT_FILE).write_text(note.replace(ORIGIN, origin, 1))
    code, output = verify(
        changed,
        "--trusted-checkpoint",
        str(trusted / CHECKPOINT_FILE),
        public_key=trusted / PUBLIC_KEY_FILE,
    )
    assert code == 1
    assert output.startswith("FAILED:"), output
    assert repr(origin) in output


def rotate_and_die(purpose: str, point: str) -> None:
    """``casepackets keys rotate`` in a process of its own, killed outright (no cleanup of any
    kind, as by SIGKILL or the OOM killer) right after it staged the new version in the keyring
    (``staged``), or right after its log entry committed (``committed``)."""
    if point == "staged":
        real_save = LockedKeyring._save

        def save(self: LockedKeyring, document: dict[str, Any]) -> None:
            real_save(self, document)
            if "staged" in document["purposes"][purpose]:
                os._exit(9)

        LockedKeyring._save = save  # type: ignore[method-assign]
    else:

        def promote(self: LockedKeyring, purpose: Any) -> Any:
            os._exit(9)

        LockedKeyring.promote = promote  # type: ignore[method-assign]
    CliRunner().invoke(cli, ["keys", "rotate", "--purpose", purpose])
    os._exit(0)


def killed_rotation(purpose: str, point: str) -> None:
    process = multiprocessing.get_context("spawn").Process(
        target=rotate_and_die, args=(purpose, point)
    )
    process.start()
    process.join(120)
    assert process.exitcode == 9


@pytest.mark.parametrize("point", ["staged", "committed"])
def test_a_signing_key_rotation_killed_midway_leaves_a_log_that_verifies(
    cli_env: Path, database: Database, point: str
) -> None:
    """Killed before its entry committed, the rotation never happened: checkpoints stay signed
    by the key auditors pinned. Killed after, it did: checkpoints are signed by the new key,
    which the committed handover leads to. Either way the next key command settles the keyring."""
    append_each(database, 5)
    before = export_command(cli_env / "before")
    killed_rotation("log_signing", point)
    keyring = Keyring.load(cli_env / "keyring.json")
    assert keyring.current("log_signing").version == 1
    assert keyring.staged("log_signing") == Staged("log_signing", 2, leaf_index=6)

    append_each(database, 2)
    after = export_command(cli_env / "after")
    pinned = before / PUBLIC_KEY_FILE
    trusted = ["--trusted-checkpoint", str(before / CHECKPOINT_FILE)]
    code, output = verify(
        after, *trusted, "--handovers", str(after / HANDOVERS_FILE), public_key=pinned
    )
    assert code == 0, output
    if point == "staged":  # 5, the first export's own entry, 2
        assert "OK: 8 entries" in output
        assert (after / PUBLIC_KEY_FILE).read_text() == pinned.read_text()
    else:  # and the rotation, after the export's entry
        assert "OK: 9 entries" in output
        assert "handed over at size 7" in output
        assert (after / PUBLIC_KEY_FILE).read_text() != pinned.read_text()

    result = CliRunner().invoke(cli, ["keys", "rotate", "--purpose", "log_signing"])
    said = " ".join(result.output.split())
    assert result.exit_code == 0, said
    if point == "staged":
        assert "log_signing v2: its rotation never reached the log, so it was discarded" in said
    else:
        assert "log_signing v2: its rotation was logged, so it is now current" in said
    keyring = Keyring.load(cli_env / "keyring.json")
    assert keyring.staged("log_signing") is None
    assert keyring.current("log_signing").version == 3
    retired = [v.version for v in keyring.versions("log_signing") if v.retired_at]
    assert retired == ([2] if point == "staged" else [])
    append_each(database, 1)
    final = export_command(cli_env / "final")
    code, output = verify(
        final, *trusted, "--handovers", str(final / HANDOVERS_FILE), public_key=pinned
    )
    assert code == 0, output


@pytest.mark.parametrize("other_log", ["signed-by-another-key", "never-signed"])
def test_a_staged_key_is_not_discarded_on_the_word_of_another_log(
    cli_env: Path,
    database: Database,
    databases: Databases,
    db_url: str,
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
    other_log: str,
) -> None:
    """A key command pointed at the wrong database (another deployment's, or a new one with no
    checkpoint yet) would find no rotation entry there and destroy a staged key whose rotation
    committed in the right one."""
    append_each(database, 5)
    export_command(cli_env / "before")
    killed_rotation("log_signing", "staged")
    other_url = databases.fresh()
    other = Database(Settings(env="test", home=home, database_url=other_url))
    try:
        append_each(other, 6)
        if other_log == "signed-by-another-key":
            with other.transaction() as session:
                stranger = NoteSigner(name=ORIGIN, seed=os.urandom(32))
                log.signed_checkpoint(session=session, signer=stranger, origin=ORIGIN)
    finally:
        other.dispose()
    monkeypatch.setenv("CASEPACKETS_DATABASE_URL", other_url)
    get_settings.cache_clear()
    refused = CliRunner().invoke(cli, ["keys", "rotate", "--purpose", "log_signing"])
    said = " ".join(refused.output.split())
    assert refused.exit_code == 2, said
    assert "is CASEPACKETS_DATABASE_URL the database this keyring belongs to?" in said
    assert Keyring.load(cli_env / "keyring.json").staged("log_signing") is not None

    monkeypatch.setenv("CASEPACKETS_DATABASE_URL", db_url)
    get_settings.cache_clear()
    settled = CliRunner().invoke(cli, ["keys", "rotate", "--purpose", "log_signing"])
    said = " ".join(settled.output.split())
    assert settled.exit_code == 0, said
    assert "log_signing v2: its rotation never reached the log, so it was discarded" in said


def test_a_signing_key_rotation_whose_commit_was_made_but_reported_failed_goes_on(
    cli_env: Path, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The acknowledgement of a commit can be lost (a dropped connection, Ctrl-C during it):
    the database holds the rotation and its handover although the command saw an error. The
    new key must then be kept, and used, or no checkpoint could ever be signed again."""
    append_each(database, 3)
    before = export_command(cli_env / "before")
    real_commit = Session.commit

    def commit_then_fail(self: Session) -> None:
        real_commit(self)
        raise OperationalError("COMMIT", {}, Exception("server closed the connection"))

    with monkeypatch.context() as patched:
        patched.setattr(Session, "commit", commit_then_fail)
        result = CliRunner().invoke(cli, ["keys", "rotate", "--purpose", "log_signing"])
    assert result.exit_code != 0
    assert "log_signing v2 stays staged" in " ".join(result.output.split())
    append_each(database, 1)
    after = export_command(cli_env / "after")
    code, output = verify(
        after,
        "--trusted-checkpoint",
        str(before / CHECKPOINT_FILE),
        "--handovers",
        str(after / HANDOVERS_FILE),
        public_key=before / PUBLIC_KEY_FILE,
    )
    assert code == 0, output
    assert "handed over at size 5" in output
    settled = CliRunner().invoke(cli, ["keys", "rotate", "--purpose", "log_signing"])
    assert settled.exit_code == 0, settled.output
    assert "its rotation was logged, so it is now current" in " ".join(settled.output.split())


@pytest.mark.parametrize("point", ["staged", "committed"])
def test_a_pseudonym_key_rotation_killed_midway_is_used_only_if_it_was_logged(
    cli_env: Path, database: Database, point: str
) -> None:
    killed_rotation("pseudonym", point)
    result = CliRunner().invoke(cli, ["demo", "--subjects", "100", "--seed", "5"])
    assert result.exit_code == 0, result.output
    with database.session() as session:
        versions = set(
            session.execute(text("SELECT pseudonym_key_version FROM subjects")).scalars()
        )
    assert versions == ({1} if point == "staged" else {2})


@pytest.fixture
def tampered_after_rotation(
    cli_env: Path, database: Database, raw_engine: Engine, backend: str
) -> tuple[Path, Path]:
    """Like ``rotated``, with entry 7 (before the rotation at 10) rewritten before the second
    export."""
    append_each(database, 10)
    before = export_command(cli_env / "before")
    rotate_log_signing()
    append_each(database, 4)
    rewrite_entries(raw_engine, backend, edited)
    after = CliRunner().invoke(cli, ["audit", "export", "--out", str(cli_env / "after")])
    assert after.exit_code == 1, after.output  # the export says the log was altered
    return before, cli_env / "after"


def test_after_a_rotation_tampering_still_fails_against_the_trusted_checkpoint(
    tampered_after_rotation: tuple[Path, Path],
) -> None:
    before, after = tampered_after_rotation
    trusted = [
        "--trusted-checkpoint",
        str(before / CHECKPOINT_FILE),
        "--trusted-public-key",
        str(before / PUBLIC_KEY_FILE),
        "--key-without-handover",
    ]
    for leaf_hashes in (True, False):
        code, output = verify(after, *trusted, leaf_hashes=leaf_hashes)
        assert code == 1
        assert "FAILED" in output
    assert "first bad index 7" in verify(after, *trusted)[1]


def test_a_trusted_public_key_without_a_trusted_checkpoint_is_refused(tmp_path: Path) -> None:
    for name in (ENTRIES_FILE, CHECKPOINT_FILE, PUBLIC_KEY_FILE):
        (tmp_path / name).write_text("")
    code, output = verify(
        tmp_path, "--trusted-public-key", str(tmp_path / PUBLIC_KEY_FILE), leaf_hashes=False
    )
    assert code == 2
    assert "--trusted-public-key is the key of a --trusted-checkpoint" in output


# -- handovers: an auditor who trusts only the old key follows a rotation ----------------------


def handovers_of(folder: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (folder / HANDOVERS_FILE).read_text().splitlines()]


def test_a_rotation_logs_the_new_key_and_a_handover_signed_by_both_keys(
    rotated: tuple[Path, Path],
) -> None:
    before, after = rotated
    old_key = VerifierKey.parse((before / PUBLIC_KEY_FILE).read_text())
    new_key = VerifierKey.parse((after / PUBLIC_KEY_FILE).read_text())
    entries = (after / ENTRIES_FILE).read_bytes().splitlines()
    rotation = json.loads(entries[11])  # after 10 entries and the first export's own
    assert (rotation["action"], rotation["object_id"]) == ("keys.rotate", "log_signing/v2")
    assert rotation["reason"] == f"checkpoints are signed from now on by {new_key}"
    [handover] = handovers_of(after)
    assert handover["size"] == 12
    note = str(handover["note"])
    assert open_note(note, old_key) == open_note(note, new_key)
    assert (before / HANDOVERS_FILE).read_text() == "", "no rotation before the first export"


def test_the_old_key_alone_follows_the_handover_to_the_new_key(
    rotated: tuple[Path, Path],
) -> None:
    before, after = rotated
    new_key = (after / PUBLIC_KEY_FILE).read_text().strip()
    old_key = before / PUBLIC_KEY_FILE
    handovers = ["--handovers", str(after / HANDOVERS_FILE)]
    for leaf_hashes in (True, False):
        code, output = verify(after, *handovers, public_key=old_key, leaf_hashes=leaf_hashes)
        assert code == 0, output
        assert "OK: 16 entries" in output
        assert f"handed over at size 12 to {new_key}" in output
    code, output = verify(
        after, *handovers, "--trusted-checkpoint", str(before / CHECKPOINT_FILE), public_key=old_key
    )
    assert code == 0, output
    assert "extend the trusted checkpoint of size 10" in output


def test_an_export_taken_right_after_a_handover_carries_it(
    database: Database, signer: NoteSigner, tmp_path: Path
) -> None:
    """No entry since the rotation: the export's checkpoint is the handover itself, and
    handovers.ndjson must still hold it, or the old key leads nowhere."""
    append_each(database, 5)
    before = export(database, signer, tmp_path / "before")
    successor = NoteSigner(name=ORIGIN, seed=os.urandom(32))
    with database.transaction() as session:
        hand_over(
            session=session, old=signer, new=successor, origin=ORIGIN, version=2, actor="system:t"
        )
    after = export(database, successor, tmp_path / "after")
    assert [handover["size"] for handover in handovers_of(after)] == [6]
    code, output = verify(
        after, "--handovers", str(after / HANDOVERS_FILE), public_key=before / PUBLIC_KEY_FILE
    )
    assert code == 0, output
    assert f"handed over at size 6 to {successor.verifier}" in output


def test_the_auditor_api_serves_the_handovers_the_export_writes(
    rotated: tuple[Path, Path], cli_env: Path, database: Database
) -> None:
    before, after = rotated
    app = create_app(get_settings())
    with TestClient(app) as client:
        auditor = bearer(app.state.dev_issuer.mint(subject="auditor-001", roles=["auditor"]))
        response = client.get("/v1/audit/handovers", headers=auditor)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    assert response.text == (after / HANDOVERS_FILE).read_text()
    assert [json.loads(line)["size"] for line in response.text.splitlines()] == [12]
    with database.session() as session:
        size = log.tree_size(session=session)
        [read] = log.iter_entries(session=session, start=size - 1, end=size)
    assert (json.loads(read)["action"], json.loads(read)["object_id"]) == (
        "audit.read",
        "handovers",
    )
    served = cli_env / "served-handovers.ndjson"
    served.write_text(response.text)
    code, output = verify(after, "--handovers", str(served), public_key=before / PUBLIC_KEY_FILE)
    assert code == 0, output
    assert "handed over at size 12" in output


def forge_tail(after: Path, forged: Path, *, signer: NoteSigner, keep: int) -> None:
    """``after`` with every entry from index ``keep`` rewritten, a checkpoint ``signer`` signed
    over them, ``signer``'s key as the public key, and no handovers."""
    forged.mkdir()
    lines = (after / ENTRIES_FILE).read_bytes().splitlines(keepends=True)
    rewritten = lines[:keep] + [line.replace(b"prof-001", b"prof-009") for line in lines[keep:]]
    (forged / ENTRIES_FILE).write_bytes(b"".join(rewritten))
    size, root = merkle_root_of_lines(rewritten)
    (forged / CHECKPOINT_FILE).write_text(
        signer.sign(checkpoint_text(Checkpoint(origin=ORIGIN, size=size, root=root)))
    )
    (forged / PUBLIC_KEY_FILE).write_text(f"{signer.verifier}\n")


def test_history_rewritten_before_the_trusted_checkpoint_fails_though_the_log_s_key_signed_it(
    database: Database, signer: NoteSigner, tmp_path: Path
) -> None:
    """Whoever holds the signing key (or the service, if it were subverted) signs a tree whose
    entry 3 was rewritten: its root matches its own entries, but not the trusted checkpoint."""
    append_each(database, 10)
    trusted = export(database, signer, tmp_path / "trusted")
    append_each(database, 5)
    after = export(database, signer, tmp_path / "after")
    forge_tail(after, tmp_path / "forged", signer=signer, keep=3)
    untouched = verify(tmp_path / "forged", leaf_hashes=False)
    assert untouched[0] == 0, "alone, the rewritten export is consistent with its checkpoint"
    code, output = verify(
        tmp_path / "forged",
        "--trusted-checkpoint",
        str(trusted / CHECKPOINT_FILE),
        leaf_hashes=False,
    )
    assert code == 1
    assert "its first 10 entries no longer have the trusted checkpoint's root" in output


def test_a_forged_tail_signed_by_a_key_of_the_forger_s_choosing_is_refused(
    rotated: tuple[Path, Path], cli_env: Path, signer: NoteSigner
) -> None:
    before, after = rotated
    forged = cli_env / "forged"
    forge_tail(after, forged, signer=signer, keep=10)  # the trusted checkpoint covers 10
    trusted = [
        "--trusted-checkpoint",
        str(before / CHECKPOINT_FILE),
        "--trusted-public-key",
        str(before / PUBLIC_KEY_FILE),
    ]
    for key in (forged / PUBLIC_KEY_FILE, after / PUBLIC_KEY_FILE):
        code, output = verify(forged, *trusted, public_key=key, leaf_hashes=False)
        assert code == 1, output
        assert "FAILED" in output
    handovers = ["--handovers", str(after / HANDOVERS_FILE)]
    code, output = verify(forged, *trusted, *handovers, leaf_hashes=False)
    assert code == 1, output


def test_a_key_that_handed_signing_over_signs_no_later_checkpoint(
    rotated: tuple[Path, Path], cli_env: Path, database: Database
) -> None:
    before, after = rotated
    old_key = VerifierKey.parse((before / PUBLIC_KEY_FILE).read_text())
    old_material = Keyring.load(cli_env / "keyring.json").get("log_signing", 1).material
    old_signer = NoteSigner(name=ORIGIN, seed=old_material)
    assert old_signer.verifier == old_key
    # the old key, say leaked, signs a tree past its handover with the tail rewritten
    forged = cli_env / "forged"
    forge_tail(after, forged, signer=old_signer, keep=12)
    code, output = verify(
        forged,
        "--handovers",
        str(after / HANDOVERS_FILE),
        public_key=before / PUBLIC_KEY_FILE,
        leaf_hashes=False,
    )
    assert code == 1, output
    assert "FAILED: new checkpoint rejected" in output


def test_an_export_that_read_the_keyring_before_a_rotation_signs_with_the_new_key(
    cli_env: Path, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``audit export`` started, read the keyring, and a rotation of the signing key committed
    before it got the log's lock: it signs with the key read under the lock, never with the
    one that handed over (the export would fail verification as a stolen old key's)."""
    append_each(database, 5)
    before = export_command(cli_env / "before")
    path = cli_env / "keyring.json"
    read_at_start = Keyring.load(path)
    rotate_log_signing()
    append_each(database, 3)
    real_load = Keyring.load
    loads: list[Path] = []

    def as_at_the_export_s_start(keyring_path: Path) -> Keyring:
        loads.append(keyring_path)
        return read_at_start if len(loads) == 1 else real_load(keyring_path)

    monkeypatch.setattr(Keyring, "load", staticmethod(as_at_the_export_s_start))
    after = export_command(cli_env / "after")
    monkeypatch.undo()
    assert len(loads) == 2
    new_key = NoteSigner.from_keyring(real_load(path), name=ORIGIN).verifier
    assert (after / PUBLIC_KEY_FILE).read_text() == f"{new_key}\n"
    code, output = verify(
        after, "--handovers", str(after / HANDOVERS_FILE), public_key=before / PUBLIC_KEY_FILE
    )
    assert code == 0, output


def test_the_old_key_given_for_the_trusted_checkpoint_vouches_for_nothing_after_it(
    rotated: tuple[Path, Path], cli_env: Path
) -> None:
    """The auditor names the new key as --public-key and the old one for last month's
    checkpoint. The old key, leaked (the reason for the rotation), signs a tail rewritten from
    just after that checkpoint, its rotation entry dropped, with no handover: refused, whether
    or not the auditor vouches for the new key."""
    before, after = rotated
    old_material = Keyring.load(cli_env / "keyring.json").get("log_signing", 1).material
    forged = cli_env / "forged"
    forge_tail(after, forged, signer=NoteSigner(name=ORIGIN, seed=old_material), keep=10)
    lines = (forged / ENTRIES_FILE).read_bytes().splitlines(keepends=True)
    kept = [line for line in lines if b'"keys.rotate"' not in line]
    assert len(kept) == len(lines) - 1
    (forged / ENTRIES_FILE).write_bytes(b"".join(kept))
    size, root = merkle_root_of_lines(kept)
    (forged / CHECKPOINT_FILE).write_text(
        NoteSigner(name=ORIGIN, seed=old_material).sign(
            checkpoint_text(Checkpoint(origin=ORIGIN, size=size, root=root))
        )
    )
    trusted = [
        "--trusted-checkpoint",
        str(before / CHECKPOINT_FILE),
        "--trusted-public-key",
        str(before / PUBLIC_KEY_FILE),
    ]
    for extra in ((), ("--key-without-handover",)):
        code, output = verify(
            forged, *trusted, *extra, public_key=after / PUBLIC_KEY_FILE, leaf_hashes=False
        )
        assert code == 1, output
        assert "FAILED: new checkpoint rejected: the note carries no signature by" in output
    # The real export, signed by the new key, passes as before on the auditor's word.
    code, output = verify(after, *trusted, "--key-without-handover", leaf_hashes=False)
    assert code == 0, output
    assert output.endswith(f"; signed by {(after / PUBLIC_KEY_FILE).read_text().strip()}")


def test_handovers_that_lead_past_the_key_given_still_reach_it(
    rotated: tuple[Path, Path], cli_env: Path, database: Database
) -> None:
    """Trusted checkpoint by the first key, --public-key the second, and a later rotation to a
    third: the handovers pass through the key given, so the third key's checkpoint verifies."""
    before, after = rotated
    rotate_log_signing()
    append_each(database, 2)
    latest = export_command(cli_env / "latest")
    code, output = verify(
        latest,
        "--trusted-checkpoint",
        str(before / CHECKPOINT_FILE),
        "--trusted-public-key",
        str(before / PUBLIC_KEY_FILE),
        "--handovers",
        str(latest / HANDOVERS_FILE),
        public_key=after / PUBLIC_KEY_FILE,
    )
    assert code == 0, output
    assert f"to {(latest / PUBLIC_KEY_FILE).read_text().strip()}" in output


def test_a_key_that_handed_over_is_refused_even_when_its_handover_is_left_out(
    rotated: tuple[Path, Path], cli_env: Path
) -> None:
    """The old key leaks after its handover and signs a rewritten tail; handovers.ndjson, which
    the forger also controls, leaves the handover out. The rotation entry among the signed
    entries still says the old key signs nothing past it. (A forger who rewrites that entry too
    is stopped only by a trusted checkpoint that covers it.)"""
    before, after = rotated
    old_material = Keyring.load(cli_env / "keyring.json").get("log_signing", 1).material
    forged = cli_env / "forged"
    forge_tail(after, forged, signer=NoteSigner(name=ORIGIN, seed=old_material), keep=12)
    (forged / HANDOVERS_FILE).write_text("")
    for extra in ((), ("--handovers", str(forged / HANDOVERS_FILE))):
        code, output = verify(
            forged, *extra, public_key=before / PUBLIC_KEY_FILE, leaf_hashes=False
        )
        assert code == 1, output
        assert "a key that handed signing over signs no later checkpoint" in output
    # The export as the service made it, verified by the key now current, needs no handovers.
    code, output = verify(after)
    assert code == 0, output


def test_an_unsigned_trusted_checkpoint_is_refused_as_unsigned_whatever_it_claims(
    rotated: tuple[Path, Path], cli_env: Path
) -> None:
    """With handovers given, a trusted note no key reached vouches for nothing: neither its size
    (a 'rolled back' verdict) nor its shape (a traceback) is taken from it."""
    before, after = rotated
    stranger = NoteSigner(name=ORIGIN, seed=bytes(range(32)))
    real = unverified_checkpoint((after / CHECKPOINT_FILE).read_text())
    notes = {
        "larger": stranger.sign(checkpoint_text(Checkpoint(ORIGIN, 1_000_000, real.root))),
        "malformed": stranger.sign("not a checkpoint\n"),
    }
    for name, note in notes.items():
        path = cli_env / f"trusted-{name}"
        path.write_text(note)
        code, output = verify(
            after,
            "--trusted-checkpoint",
            str(path),
            "--handovers",
            str(after / HANDOVERS_FILE),
            public_key=before / PUBLIC_KEY_FILE,
        )
        assert code == 1, (name, output)
        assert "FAILED: trusted checkpoint rejected" in output, (name, output)
        assert "--trusted-public-key" in output, (name, output)
        assert "Traceback" not in output


def test_without_the_handovers_the_old_key_is_refused_with_a_hint(
    rotated: tuple[Path, Path],
) -> None:
    before, after = rotated
    code, output = verify(after, public_key=before / PUBLIC_KEY_FILE)
    assert code == 1
    assert "FAILED: new checkpoint rejected" in output
    assert f"--handovers {after / HANDOVERS_FILE}" in output


def rewrite_handover(folder: Path, change: Callable[[str], str]) -> None:
    [handover] = handovers_of(folder)
    handover["note"] = change(str(handover["note"]))
    (folder / HANDOVERS_FILE).write_text(json.dumps(handover) + "\n")


def without_new_signature(note: str) -> str:
    """The handover as if only the old key had signed it."""
    return note.rstrip("\n").rsplit("\n", 1)[0] + "\n"


def resigned_by_a_stranger(note: str) -> str:
    stranger = NoteSigner(name=ORIGIN, seed=os.urandom(32))
    return stranger.sign(note.partition("\n\n")[0] + "\n")


def old_signature_damaged(note: str) -> str:
    """The handover with one character of the old key's signature changed."""
    text, _, signatures = note.partition("\n\n")
    old, new = signatures.splitlines(keepends=True)
    old = old[:-6] + ("A" if old[-6] != "A" else "B") + old[-5:]
    return f"{text}\n\n{old}{new}"


@pytest.mark.parametrize(
    ("change", "failure"),
    [
        (without_new_signature, "is not cosigned by the key it hands signing to"),
        (resigned_by_a_stranger, "new checkpoint rejected"),
        (
            old_signature_damaged,
            "the handover checkpoint at size 12: the signature by casepackets/test does not verify",
        ),
    ],
)
def test_a_handover_the_old_key_did_not_make_with_the_new_key_is_not_followed(
    rotated: tuple[Path, Path], change: Callable[[str], str], failure: str
) -> None:
    before, after = rotated
    rewrite_handover(after, change)
    code, output = verify(
        after, "--handovers", str(after / HANDOVERS_FILE), public_key=before / PUBLIC_KEY_FILE
    )
    assert code == 1
    assert failure in output


def test_a_stranger_s_handover_beside_the_real_one_does_not_hide_it(
    rotated: tuple[Path, Path],
) -> None:
    before, after = rotated
    [real] = handovers_of(after)
    forged = {**real, "note": resigned_by_a_stranger(str(real["note"]))}
    lines = [json.dumps(real), json.dumps(forged)]  # the later line once overrode the earlier
    (after / HANDOVERS_FILE).write_text("\n".join(lines) + "\n")
    code, output = verify(
        after, "--handovers", str(after / HANDOVERS_FILE), public_key=before / PUBLIC_KEY_FILE
    )
    assert code == 0, output
    assert "handed over at size 12" in output


def test_only_a_rotation_entry_naming_a_key_hands_signing_over() -> None:
    key = NoteSigner(name=ORIGIN, seed=os.urandom(32)).verifier
    entry = {
        "action": "keys.rotate",
        "object_id": "log_signing/v2",
        "reason": f"checkpoints are signed from now on by {key}",
    }
    assert handed_to(json.dumps(entry, separators=(",", ":")).encode()) == key
    for other in (
        [entry],  # the markers inside a line that is not an entry at all
        {**entry, "reason": "new current version"},  # a rotation from before handovers
        {**entry, "object_id": "vault/v2"},
        {**entry, "object_id": "vault/v2", "x": {"object_id": "log_signing/v2"}},  # nested
        {**entry, "reason": "checkpoints are signed from now on by nobody"},
        {**entry, "reason": str(key)},  # a key, but not the words that hand signing to it
    ):
        assert handed_to(json.dumps(other, separators=(",", ":")).encode()) is None, other


def test_a_stranger_cannot_hand_signing_to_their_own_key(
    rotated: tuple[Path, Path],
) -> None:
    """A forged log signed by a stranger's key, with a handover the stranger signed: the old
    key signed no handover to it, so it is not trusted."""
    before, after = rotated
    stranger = NoteSigner(name=ORIGIN, seed=os.urandom(32))
    body = (after / CHECKPOINT_FILE).read_text().partition("\n\n")[0] + "\n"
    (after / CHECKPOINT_FILE).write_text(stranger.sign(body))
    rewrite_handover(after, lambda note: stranger.cosign(resigned_by_a_stranger(note)))
    code, output = verify(
        after, "--handovers", str(after / HANDOVERS_FILE), public_key=before / PUBLIC_KEY_FILE
    )
    assert code == 1
    assert "FAILED: new checkpoint rejected: the note carries no signature by" in output


def test_entries_rewritten_before_a_handover_fail_against_the_old_key(
    tampered_after_rotation: tuple[Path, Path],
) -> None:
    before, after = tampered_after_rotation
    code, output = verify(
        after, "--handovers", str(after / HANDOVERS_FILE), public_key=before / PUBLIC_KEY_FILE
    )
    assert code == 1
    assert "its first 12 entries no longer have the root of the handover checkpoint" in output


def test_verifying_files_reports_how_far_it_read(
    database: Database, signer: NoteSigner, tmp_path: Path
) -> None:
    append_each(database, 6)
    folder = export(database, signer, tmp_path / "export")
    read: list[int] = []
    verify_files(
        entries=folder / ENTRIES_FILE,
        checkpoint=folder / CHECKPOINT_FILE,
        public_key=folder / PUBLIC_KEY_FILE,
        on_progress=read.append,
    )
    assert read == [(folder / ENTRIES_FILE).stat().st_size]
    # A long file is reported every 10,000 lines as well.
    handle = io.BytesIO(b"x\n" * 25_000)
    positions: list[int] = []
    assert sum(1 for _ in reporting(bounded_lines(handle), handle, positions.append)) == 25_000
    assert positions == [20_000, 40_000, 50_000]


def test_a_checkpoint_whose_origin_is_not_its_key_s_name_is_rejected(
    database: Database, signer: NoteSigner, tmp_path: Path
) -> None:
    """The key signs for one log, the one its name says: its signature over a checkpoint of
    another origin vouches for nothing."""
    append_each(database, 4)
    folder = export(database, signer, tmp_path / "export")
    body = (folder / CHECKPOINT_FILE).read_text().partition("\n\n")[0] + "\n"
    (folder / CHECKPOINT_FILE).write_text(signer.sign(body.replace(ORIGIN, "elsewhere/log", 1)))
    for leaf_hashes in (True, False):
        code, output = verify(folder, leaf_hashes=leaf_hashes)
        assert code == 1
        assert "its origin 'elsewhere/log' is not the key's name 'casepackets/test'" in output


def test_a_handover_to_a_key_of_another_name_is_not_followed(
    database: Database, signer: NoteSigner, tmp_path: Path
) -> None:
    append_each(database, 4)
    before = export(database, signer, tmp_path / "before")
    renamed = NoteSigner(name="elsewhere/log", seed=os.urandom(32))
    with database.transaction() as session:
        hand_over(
            session=session, old=signer, new=renamed, origin=ORIGIN, version=2, actor="system:t"
        )
    after = export(database, renamed, tmp_path / "after")
    code, output = verify(
        after, "--handovers", str(after / HANDOVERS_FILE), public_key=before / PUBLIC_KEY_FILE
    )
    assert code == 1
    assert "the checkpoint at size 5 is not a handover" in output


def test_a_last_entry_without_its_newline_is_named_on_every_path(
    database: Database, signer: NoteSigner, tmp_path: Path
) -> None:
    append_each(database, 3)
    folder = export(database, signer, tmp_path / "export")
    entries = folder / ENTRIES_FILE
    entries.write_bytes(entries.read_bytes().removesuffix(b"\n"))
    for leaf_hashes in (True, False):
        code, output = verify(folder, leaf_hashes=leaf_hashes)
        assert code == 1
        assert "every entry line must end with a newline" in output


def test_a_handovers_file_from_a_later_export_still_verifies_an_earlier_one(
    rotated: tuple[Path, Path],
) -> None:
    """Handovers past the checkpoint's size say nothing about it: they are left aside."""
    before, after = rotated
    code, output = verify(before, "--handovers", str(after / HANDOVERS_FILE))
    assert code == 0, output
    assert "OK: 10 entries" in output


def test_a_leaf_hashes_file_cut_mid_hash_is_refused(
    database: Database, signer: NoteSigner, tmp_path: Path
) -> None:
    append_each(database, 3)
    folder = export(database, signer, tmp_path / "export")
    with (folder / LEAF_HASHES_FILE).open("ab") as hashes:
        hashes.write(b"\x00")
    code, output = verify(folder)
    assert code == 1
    assert "the leaf-hashes file is not a whole number of hashes" in output


def test_a_trusted_checkpoint_the_old_key_signed_after_its_handover_is_refused(
    rotated: tuple[Path, Path], cli_env: Path
) -> None:
    """The leaked old key signs a checkpoint at size 14, past its handover at 12, over the true
    entries: given as the trusted one, it is refused as the new checkpoint would be."""
    before, after = rotated
    old_material = Keyring.load(cli_env / "keyring.json").get("log_signing", 1).material
    lines = (after / ENTRIES_FILE).read_bytes().splitlines(keepends=True)
    size, root = merkle_root_of_lines(lines[:14])
    forged = cli_env / "forged-trusted"
    forged.write_text(
        NoteSigner(name=ORIGIN, seed=old_material).sign(
            checkpoint_text(Checkpoint(origin=ORIGIN, size=size, root=root))
        )
    )
    code, output = verify(
        after,
        "--handovers",
        str(after / HANDOVERS_FILE),
        "--trusted-checkpoint",
        str(forged),
        "--trusted-public-key",
        str(before / PUBLIC_KEY_FILE),
    )
    assert code == 1, output
    assert "trusted checkpoint rejected" in output
    assert "a key that handed signing over signs no later checkpoint" in output


def test_a_key_that_handed_over_is_not_handed_signing_back_by_entries_only_it_signed(
    rotated: tuple[Path, Path], cli_env: Path
) -> None:
    """The auditor trusts the old key and holds the handover checkpoint (size 12, signed by the
    old key, cosigned by the new) from an export taken right after the rotation. The old key,
    leaked, signs the true first 12 entries followed by a forged rotation naming the old key
    itself again: entries only the old key vouches for cannot give it back what it handed
    over."""
    before, after = rotated
    old_signer = NoteSigner(
        name=ORIGIN,
        seed=Keyring.load(cli_env / "keyring.json").get("log_signing", 1).material,
    )
    new_key = VerifierKey.parse((after / PUBLIC_KEY_FILE).read_text())
    [handover] = handovers_of(after)
    trusted = cli_env / "trusted-handover"
    trusted.write_text(str(handover["note"]))
    lines = (after / ENTRIES_FILE).read_bytes().splitlines(keepends=True)
    assert handed_to(lines[11][:-1]) == new_key
    handed_back = (
        lines[11]
        .replace(str(new_key).encode(), str(old_signer.verifier).encode())
        .replace(b"log_signing/v2", b"log_signing/v3")
    )
    assert handed_to(handed_back[:-1]) == old_signer.verifier
    forged = cli_env / "forged"
    forged.mkdir()
    rewritten = [
        *lines[:12],
        handed_back,
        *(line.replace(b"prof-001", b"prof-009") for line in lines[12:]),
    ]
    (forged / ENTRIES_FILE).write_bytes(b"".join(rewritten))
    size, root = merkle_root_of_lines(rewritten)
    (forged / CHECKPOINT_FILE).write_text(
        old_signer.sign(checkpoint_text(Checkpoint(origin=ORIGIN, size=size, root=root)))
    )
    code, output = verify(
        forged,
        "--trusted-checkpoint",
        str(trusted),
        public_key=before / PUBLIC_KEY_FILE,
        leaf_hashes=False,
    )
    assert code == 1, output
    assert "a key that handed signing over signs no later checkpoint" in output
