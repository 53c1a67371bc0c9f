"""casepackets keys / import / demo, and serve's first-run preparation."""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import fcntl
import json
import multiprocessing
import os
import re
import threading
from collections.abc import Iterator
from contextlib import suppress
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from threading import BrokenBarrierError
from typing import Any

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import DataError
from sqlmodel import Session, col, select
from typer.testing import CliRunner

from service.access_log import service as access_log
from service.access_log.handover import handed_to
from service.access_log.service import LOG_LOCK_KEY
from service.cli import app as cli
from service.cli import prepare
from service.config import Settings, get_settings
from service.crypto import keyring as keyring_module
from service.crypto.keyring import (
    Keyring,
    KeyringInaccessible,
    LockedKeyring,
    check_purpose,
    new_key_material,
)
from service.crypto.signing import NoteSigner
from service.db import Database, make_engine
from service.records import bulk
from service.records import service as records_service
from service.records.bulk import CSV_COLUMNS
from service.records.demo import REFERENCE_DATE, synthetic_bsn
from service.records.models import MAX_SUBJECT_EVENTS, Subject
from service.records.service import (
    BatchInvalid,
    ConcurrentIngest,
    IngestResult,
    decrypt_identity,
    ingest_batch,
    subject_dek,
)
from service.records.vocabulary import load_event_types
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


def test_the_whole_runbook_pointed_at_a_new_database_destroys_nothing(
    cli_env: Settings,
    rotations_settled: None,
    databases: Databases,
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rotate, rewrap and retire, all pointed at a new database by mistake: nothing there
    depends on any version, but nothing there is sealed under the keyring either, so the
    retirement is refused and the version keeps its material for the keyring's own database,
    where only the rows that still need it refuse it."""
    assert run("keys", "init")[0] == 0
    assert run("migrate")[0] == 0
    assert run("demo", "--subjects", "100", "--seed", "2")[0] == 0
    monkeypatch.setenv("CASEPACKETS_DATABASE_URL", databases.fresh())
    get_settings.cache_clear()
    assert run("keys", "rotate", "--purpose", "vault")[0] == 0
    assert run("keys", "rewrap")[0] == 0
    code, output = run("keys", "retire", "--purpose", "vault", "--version", "1")
    said = " ".join(output.split())
    assert code == 2, said
    assert "this database holds nothing sealed under this keyring" in said
    assert "is CASEPACKETS_DATABASE_URL the database this keyring belongs to?" in said
    assert "Nothing was changed" in said
    keyring = Keyring.load(cli_env.resolved_keyring_path)
    assert keyring.get("vault", 1).material, "v1 keeps its material"

    monkeypatch.setenv("CASEPACKETS_DATABASE_URL", db_url)
    get_settings.cache_clear()
    code, output = run("keys", "retire", "--purpose", "vault", "--version", "1")
    assert code == 1, output
    assert "still depend" in output
    assert run("keys", "rewrap")[0] == 0
    assert run("keys", "retire", "--purpose", "vault", "--version", "1")[0] == 0


def test_no_key_is_rotated_or_retired_in_another_installation_s_database(
    cli_env: Settings,
    rotations_settled: None,
    databases: Databases,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A database whose wraps this keyring's keys do not open is another installation's: a
    rotation logged there (a log signing key's handover above all) would lead none of this
    keyring's auditors anywhere, and its rows say nothing of what depends on this keyring."""
    assert run("keys", "init")[0] == 0
    ours = cli_env.resolved_keyring_path
    assert run("keys", "rotate", "--purpose", "vault")[0] == 0  # a version 1 to retire
    monkeypatch.setenv("CASEPACKETS_DATABASE_URL", databases.fresh())
    monkeypatch.setenv("CASEPACKETS_KEYRING_PATH", str(tmp_path / "theirs" / "keyring.json"))
    get_settings.cache_clear()
    assert run("keys", "init")[0] == 0
    assert run("demo", "--subjects", "100", "--seed", "3")[0] == 0
    monkeypatch.setenv("CASEPACKETS_KEYRING_PATH", str(ours))
    get_settings.cache_clear()
    before = ours.read_bytes()
    for command in (
        ("rotate", "--purpose", "log_signing"),
        ("rotate", "--purpose", "vault"),
        ("retire", "--purpose", "vault", "--version", "1"),
    ):
        code, output = run("keys", *command)
        said = " ".join(output.split())
        assert code == 2, (command, said)
        assert "what this database holds does not open under this keyring's keys" in said
    assert ours.read_bytes() == before


def test_a_staged_version_is_not_discarded_on_another_installation_s_word(
    cli_env: Settings,
    databases: Databases,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A staged version whose rotation may have committed in this keyring's own database is
    not destroyed because another installation's database lacks that entry: the key command
    stops, and the staged material stays."""
    assert run("keys", "init")[0] == 0
    ours = cli_env.resolved_keyring_path
    with Keyring.edit(ours) as keyring:
        staged = keyring.stage("vault", material=new_key_material(), leaf_index=0)
    monkeypatch.setenv("CASEPACKETS_DATABASE_URL", databases.fresh())
    monkeypatch.setenv("CASEPACKETS_KEYRING_PATH", str(tmp_path / "theirs" / "keyring.json"))
    get_settings.cache_clear()
    assert run("keys", "init")[0] == 0
    assert run("demo", "--subjects", "100", "--seed", "3")[0] == 0
    monkeypatch.setenv("CASEPACKETS_KEYRING_PATH", str(ours))
    get_settings.cache_clear()
    before = ours.read_bytes()
    code, output = run("keys", "rotate", "--purpose", "packet")
    said = " ".join(output.split())
    assert code == 2, said
    assert "vault v2 is staged and its rotation is not in the log" in said
    assert "what this database holds does not open under this keyring's keys" in said
    assert ours.read_bytes() == before
    assert Keyring.load(ours).get("vault", 2).material == staged.material


def test_a_rewrap_moves_every_wrap_it_can_open_and_names_the_rows_it_cannot(
    cli_env: Settings, cli_session: Session
) -> None:
    """One damaged wrap (a restore gone wrong, tampering) neither stops the rewrap nor lets it
    say that nothing depends on the old version: its row is named, with why, and the status
    is 1."""
    assert run("keys", "init")[0] == 0
    assert run("migrate")[0] == 0
    assert run("demo", "--subjects", "100", "--seed", "2")[0] == 0
    first, second = cli_session.exec(select(Subject).order_by(col(Subject.id)).limit(2)).all()
    cli_session.execute(
        text("UPDATE subjects SET wrapped_dek = :wrap WHERE id = :id"),
        {"wrap": first.wrapped_dek, "id": second.id},
    )
    cli_session.commit()
    assert run("keys", "rotate", "--purpose", "vault")[0] == 0
    code, output = run("keys", "rewrap", "--chunk", "30")
    said = " ".join(output.split())
    assert code == 1, said
    assert (
        f"not rewrapped: subjects.wrapped_dek of row {second.id}: it fails its integrity check"
        in said
    )
    assert "rewrapped 99 keys; 1 wrap is not under the current KEK" in said
    assert "1 because it cannot be opened (listed above)" in said
    assert "written while this ran" not in said
    assert "nothing depends" not in said
    keyring = Keyring.load(cli_env.resolved_keyring_path)
    versions = {
        subject_id: wrap.split(".")[1]
        for subject_id, wrap in cli_session.execute(text("SELECT id, wrapped_dek FROM subjects"))
    }
    assert versions.pop(second.id) == "1", "left as it was"
    assert set(versions.values()) == {str(keyring.current("vault").version)}


def test_a_retirement_a_rewrap_cannot_help_is_refused_for_what_it_is(cli_env: Settings) -> None:
    """The current version, or one that does not exist, is said to be so: not that rows depend
    on it (a rewrap cannot change that), nor that a rotation is too recent."""
    assert run("keys", "init")[0] == 0
    assert run("migrate")[0] == 0
    assert run("demo", "--subjects", "100", "--seed", "2")[0] == 0
    code, output = run("keys", "retire", "--purpose", "vault", "--version", "1")
    assert code == 1
    assert "vault v1 is current; rotate before retiring it" in " ".join(output.split())
    code, output = run("keys", "retire", "--purpose", "vault", "--version", "9")
    assert code == 1
    assert "no active vault key version 9" in " ".join(output.split())


@pytest.mark.parametrize("command", ["rotate", "retire"])
def test_a_keyring_that_cannot_be_written_after_the_log_is_said_in_one_line(
    cli_env: Settings, rotations_settled: None, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """The log is written first (no wrap may exist under a version the log does not name, and
    material is destroyed only once the log says so); a keyring write failing after it is one
    line naming what to do, not a withheld traceback."""
    assert run("keys", "init")[0] == 0
    assert run("migrate")[0] == 0
    assert run("demo", "--subjects", "100", "--seed", "2")[0] == 0  # something sealed here
    if command == "retire":
        assert run("keys", "rotate", "--purpose", "log_signing")[0] == 0

    def unwritable(*_args: Any, **_kwargs: Any) -> Any:
        raise KeyringInaccessible("cannot write the keyring: Operation not permitted")

    monkeypatch.setattr(LockedKeyring, command, unwritable)
    if command == "rotate":
        code, output = run("keys", "rotate", "--purpose", "vault")
        logged = "the rotation to vault v2"
    else:
        code, output = run("keys", "retire", "--purpose", "log_signing", "--version", "1")
        logged = "the retirement of log_signing v1"
    said = " ".join(output.split())
    assert code == 2, said
    assert said.startswith("keyring not written: cannot write the keyring")
    assert f"The access log already records {logged}" in said
    assert "unexpected" not in said


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


@pytest.mark.parametrize(
    "command",
    [
        ["keys", "rotate", "--purpose", "vault"],
        ["demo", "--subjects", "100"],
        ["flag"],
        ["expire"],
        ["audit", "export", "--out", "{home}/export"],
    ],
)
def test_commands_refuse_a_sqlite_database_that_is_not_there_without_creating_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    command = [part.format(home=tmp_path) for part in command]
    database = tmp_path / "nothing-here.db"
    monkeypatch.setenv("CASEPACKETS_HOME", str(tmp_path))
    monkeypatch.setenv("CASEPACKETS_DATABASE_URL", f"sqlite:///{database}")
    monkeypatch.setenv("CASEPACKETS_ENV", "test")
    get_settings.cache_clear()
    try:
        Keyring.init(tmp_path / "keyring.json")
        before = sorted(path.name for path in tmp_path.iterdir())
        code, output = run(*command)
        assert code == 2, output
        assert " ".join(output.split()) == (
            f"refused: there is no database at {database}; run `casepackets migrate` first"
        )
        assert sorted(path.name for path in tmp_path.iterdir()) == before
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


@pytest.mark.parametrize(
    "change",
    [
        ("rotate", "--purpose", "vault"),
        ("rotate", "--purpose", "log_signing"),
        ("retire", "--purpose", "log_signing", "--version", "1"),
    ],
    ids=["rotate-vault", "rotate-log-signing", "retire"],
)
def test_a_key_change_whose_log_entry_does_not_commit_changes_no_key_in_use(
    cli_env: Settings,
    monkeypatch: pytest.MonkeyPatch,
    rotations_settled: None,
    change: tuple[str, ...],
) -> None:
    """The vault key and a retirement are written only after the commit: the keyring stays as
    it was. A log signing key is staged before it: it stays staged (the commit may have failed
    after the database made it durable), is used by no one while the log lacks its entry, and
    the next key command discards it."""
    Keyring.init(cli_env.resolved_keyring_path)
    assert run("demo", "--subjects", "100", "--seed", "2")[0] == 0  # something sealed here
    assert run("keys", "rotate", "--purpose", "log_signing")[0] == 0
    before = cli_env.resolved_keyring_path.read_bytes()

    def failing_commit(self: Session) -> None:
        raise RuntimeError("the commit failed")

    with monkeypatch.context() as patched:
        patched.setattr(Session, "commit", failing_commit)
        code, output = run("keys", *change)
    assert code != 0
    keyring = Keyring.load(cli_env.resolved_keyring_path)
    if change[:3] == ("rotate", "--purpose", "log_signing"):
        assert "log_signing v3 stays staged" in " ".join(output.split())
        assert keyring.current("log_signing").version == 2
        assert keyring.staged("log_signing") is not None
    else:
        assert cli_env.resolved_keyring_path.read_bytes() == before
    code, output = run("keys", *change)
    assert code == 0, "the change goes through once the log can commit"
    if change[:3] == ("rotate", "--purpose", "log_signing"):
        assert "log_signing v3: its rotation never reached the log" in " ".join(output.split())
        assert Keyring.load(cli_env.resolved_keyring_path).current("log_signing").version == 4
    assert cli_env.resolved_keyring_path.read_bytes() != before


# -- key commands at once ----------------------------------------------------------------------

# How long a command that has read the keyring waits for the other to read it too.
READ_PAUSE_SECONDS = 1.5


def key_command_in_a_process(
    command: list[str], start: Barrier, read: Barrier, results: Queue[tuple[str, int, str]]
) -> None:
    """``casepackets keys …`` in a process of its own (configured by the environment it
    inherits), started with another one. Having read the keyring file it waits, at most
    ``READ_PAUSE_SECONDS``, for the other to have read it too, so that without a lock held from
    reading to writing the two always change the same file."""
    real_read = keyring_module._read_private
    paused = False

    def read_then_pause(path: Path) -> bytes:
        nonlocal paused
        raw = real_read(path)
        if not paused:
            paused = True
            with suppress(BrokenBarrierError):  # the other one is waiting for the lock
                read.wait(READ_PAUSE_SECONDS)
        return raw

    keyring_module._read_private = read_then_pause
    start.wait(60)
    code, output = run("keys", *command)
    results.put((command[2], code, " ".join(output.split())))


def at_once(*commands: list[str]) -> list[tuple[str, int, str]]:
    """(purpose, exit status, output) of each ``keys`` command, one process each, in no set
    order; every command is ``[verb, "--purpose", purpose, …]``."""
    context = multiprocessing.get_context("spawn")
    start, read = context.Barrier(len(commands)), context.Barrier(len(commands))
    results: Queue[tuple[str, int, str]] = context.Queue()
    processes = [
        context.Process(target=key_command_in_a_process, args=(command, start, read, results))
        for command in commands
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(60)
    return outcomes


def logged_rotations(settings: Settings) -> list[tuple[str, bytes]]:
    """(object id, entry bytes) of every key rotation in the access log, in log order."""
    database = Database(settings)
    try:
        with database.transaction() as session:
            size = access_log.tree_size(session=session)
            entries = list(access_log.iter_entries(session=session, start=0, end=size))
    finally:
        database.dispose()
    parsed = [(json.loads(entry), bytes(entry)) for entry in entries]
    return [(e["object_id"], raw) for e, raw in parsed if e["action"] == "keys.rotate"]


def rotate(purpose: str) -> list[str]:
    return ["rotate", "--purpose", purpose]


def test_rotations_of_two_keys_at_once_are_both_kept_as_logged(cli_env: Settings) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    outcomes = at_once(rotate("vault"), rotate("packet"))
    keyring = Keyring.load(cli_env.resolved_keyring_path)
    for purpose, code, output in outcomes:
        assert code == 0, output
        assert f"{purpose} key is now at version 2" in output
        assert [info.version for info in keyring.versions(check_purpose(purpose))] == [1, 2]
    assert sorted(object_id for object_id, _ in logged_rotations(cli_env)) == [
        "packet/v2",
        "vault/v2",
    ]


@pytest.mark.parametrize("purpose", ["vault", "log_signing"])
def test_two_rotations_of_one_key_at_once_make_two_versions_each_logged_once(
    cli_env: Settings, purpose: str
) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    outcomes = at_once(rotate(purpose), rotate(purpose))
    assert sorted(code for _, code, _ in outcomes) == [0, 0], outcomes
    keyring = Keyring.load(cli_env.resolved_keyring_path)
    checked = check_purpose(purpose)
    assert [info.version for info in keyring.versions(checked)] == [1, 2, 3]
    logged = logged_rotations(cli_env)
    assert [object_id for object_id, _ in logged] == [f"{purpose}/v2", f"{purpose}/v3"]
    said = " ".join(output for _, _, output in outcomes)
    for version in (2, 3):
        assert f"{purpose} key is now at version {version}" in said
    if purpose == "log_signing":  # each handover names the key the file holds under its version
        for version, (_, entry) in zip((2, 3), logged, strict=True):
            stored = keyring.get(checked, version).material
            signer = NoteSigner(name=cli_env.checkpoint_origin, seed=stored)
            assert handed_to(entry) == signer.verifier


def test_a_retirement_and_a_rotation_at_once_are_both_kept(cli_env: Settings) -> None:
    path = cli_env.resolved_keyring_path
    Keyring.init(path)
    assert run("keys", *rotate("vault"))[0] == 0
    assert run("demo", "--subjects", "100", "--seed", "2")[0] == 0  # sealed under vault v2
    document = json.loads(path.read_text())  # a rotation long past: vault v1 may be retired
    document["purposes"]["vault"]["versions"]["2"]["created_at"] = "2000-01-01T00:00:00+00:00"
    path.write_text(json.dumps(document))
    outcomes = at_once(["retire", "--purpose", "vault", "--version", "1"], rotate("packet"))
    assert sorted(code for _, code, _ in outcomes) == [0, 0], outcomes
    keyring = Keyring.load(path)
    assert [(info.version, bool(info.retired_at)) for info in keyring.versions("vault")] == [
        (1, True),
        (2, False),
    ]
    assert [info.version for info in keyring.versions("packet")] == [1, 2]
    assert [object_id for object_id, _ in logged_rotations(cli_env)] == ["vault/v2", "packet/v2"]


def hold_the_keyring_lock(keyring: str, held: Event, release: Event) -> None:
    """Another key command, in a process of its own: holds ``<keyring>.lock`` until told."""
    fd = os.open(f"{keyring}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.set()
        release.wait(60)
    finally:
        os.close(fd)


def test_a_rotation_while_another_key_command_runs_too_long_is_refused_and_changes_nothing(
    cli_env: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = cli_env.resolved_keyring_path
    Keyring.init(path)
    before = path.read_bytes()
    monkeypatch.setattr(keyring_module, "EDIT_LOCK_TIMEOUT_SECONDS", 0.5)
    context = multiprocessing.get_context("spawn")
    held, release = context.Event(), context.Event()
    holder = context.Process(target=hold_the_keyring_lock, args=(str(path), held, release))
    holder.start()
    try:
        assert held.wait(60)
        code, output = run("keys", "rotate", "--purpose", "vault")
    finally:
        release.set()
        holder.join(60)
    assert code == 1
    assert "another key command is running; try again" in " ".join(output.split())
    assert path.read_bytes() == before
    assert logged_rotations(cli_env) == []


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


def test_import_reads_a_pipe(cli_env: Settings, cli_session: Session, tmp_path: Path) -> None:
    """``casepackets import /dev/stdin`` under ``cat file |``: a pipe cannot tell its position,
    which the progress was once taken from (an unexpected OSError, exit status 1)."""
    Keyring.init(cli_env.resolved_keyring_path)
    content = write_csv(tmp_path / "records.csv", [line(0, 0), line(0, 1), line(1, 0)])
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    # Opening a pipe to write waits for its reader, the import.
    writer = threading.Thread(target=pipe.write_bytes, args=(content.read_bytes(),), daemon=True)
    writer.start()
    code, output = run("import", str(pipe), "--source", "welfare", "--batch-size", "1")
    writer.join(10)

    assert code == 0, output
    assert "imported 2 subjects, 3 new events" in output
    assert count_rows(cli_session, "subjects") == 2
    assert count_rows(cli_session, "events") == 3


def test_import_progress_counts_every_byte_of_the_file(cli_env: Settings, tmp_path: Path) -> None:
    """Counted from the lines read (a pipe has no position): a byte order mark, line ends and a
    byte that is not UTF-8 count as they are in the file."""
    keyring = Keyring.init(cli_env.resolved_keyring_path)
    path = write_csv(tmp_path / "records.csv", [line(0, 0), line(1, 0), line(2, 0)])
    content = path.read_bytes().replace(b"Fatima", b"Fatim\xe9", 1).replace(b"\r\n", b"\n", 2)
    path.write_bytes(codecs.BOM_UTF8 + content)
    read: list[int] = []
    database = Database(cli_env)
    try:
        result = bulk.import_csv(
            database=database,
            keyring=keyring,
            event_types=load_event_types(cli_env.policies_dir / "events.yaml"),
            path=path,
            source="welfare",
            actor="system:import:welfare",
            batch_size=1,
            on_progress=lambda _stored, read_bytes: read.append(read_bytes),
        )
    finally:
        database.dispose()

    assert [rejection.line for rejection in result.rejected] == [2]  # its "Fatim\xe9"
    assert result.subjects == 2
    assert read == sorted(read)
    assert read[-1] == path.stat().st_size


def stored_given_names(settings: Settings, session: Session) -> list[str]:
    keyring = Keyring.load(settings.resolved_keyring_path)
    session.rollback()
    try:
        return sorted(
            decrypt_identity(
                keyring=keyring, subject=subject, dek=subject_dek(keyring=keyring, subject=subject)
            ).given_name
            for subject in session.exec(select(Subject))
        )
    finally:
        session.rollback()


@pytest.mark.parametrize("batch_size", ["1", "2", "10"])
def test_a_later_line_with_another_identity_is_rejected_whatever_the_batch_size(
    cli_env: Settings, cli_session: Session, tmp_path: Path, batch_size: str
) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    rows = [line(0, 0, given_name="Jan"), line(1, 0), line(0, 1, given_name="Piet")]
    path = write_csv(tmp_path / "records.csv", rows)
    code, output = run("import", str(path), "--source", "welfare", "--batch-size", batch_size)
    assert code == 1, output
    assert "line 4: identity: differs from an earlier line of the same BSN" in output
    assert "Piet" not in output
    assert stored_given_names(cli_env, cli_session) == ["Fatima", "Jan"]
    assert count_rows(cli_session, "events") == 2


@pytest.mark.parametrize("batch_size", ["1", "2", "10"])
def test_a_repeated_source_event_id_is_rejected_whatever_the_batch_size(
    cli_env: Settings, cli_session: Session, tmp_path: Path, batch_size: str
) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    rows = [line(0, 0), line(1, 0, source_event_id="csv-0-0"), line(2, 0), line(2, 0)]
    path = write_csv(tmp_path / "records.csv", rows)
    code, output = run("import", str(path), "--source", "welfare", "--batch-size", batch_size)
    assert code == 1, output
    said = " ".join(output.split())
    assert "line 3: source_event_id: repeats the source_event_id of an earlier line" in said
    assert "line 5: source_event_id: repeats the source_event_id of an earlier line" in said
    assert "2 lines rejected" in said
    assert count_rows(cli_session, "subjects") == 2  # 0 and 2; 1's only line was rejected
    assert count_rows(cli_session, "events") == 2


def test_a_subject_with_more_events_than_a_batch_holds_is_rejected_naming_the_limit(
    cli_env: Settings, cli_session: Session, tmp_path: Path
) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    first = dt.date(2020, 1, 1)
    rows = [
        line(0, 0, event_date=(first + dt.timedelta(days=k)).isoformat(), source_event_id=f"v-{k}")
        for k in range(MAX_SUBJECT_EVENTS + 1)
    ]
    path = write_csv(tmp_path / "records.csv", [*rows, line(1, 0)])
    code, output = run("import", str(path), "--source", "welfare")
    assert code == 1, output
    said = " ".join(output.split())
    limit = f"a subject has at most {MAX_SUBJECT_EVENTS} events per batch; this one has 1001"
    assert f"line 2: events: {limit}" in said
    assert f"{MAX_SUBJECT_EVENTS + 1} lines rejected" in said
    assert count_rows(cli_session, "subjects") == 1
    assert count_rows(cli_session, "events") == 1


@pytest.mark.parametrize("batch_size", ["1", "10"])
def test_a_subject_over_several_batches_or_bsn_spellings_is_one_subject_counted_once(
    cli_env: Settings, cli_session: Session, tmp_path: Path, batch_size: str
) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    bsn = synthetic_bsn(0, 5)
    rows = [line(0, 0), line(1, 0), line(0, 1, bsn=f"{bsn[:4]} {bsn[4:]}"), line(0, 2)]
    path = write_csv(tmp_path / "records.csv", rows)
    code, output = run("import", str(path), "--source", "welfare", "--batch-size", batch_size)
    assert code == 0, output
    assert "imported 2 subjects, 4 new events" in " ".join(output.split())
    assert count_rows(cli_session, "subjects") == 2
    assert count_rows(cli_session, "events") == 4


@pytest.mark.parametrize(
    "source", ["", "s" * 65, "tab\there", "bad\udcffbyte", " welfare", "welfare ", "\u00a0welfare"]
)
def test_import_refuses_a_source_the_api_would_refuse_in_one_line(
    cli_env: Settings, cli_session: Session, tmp_path: Path, source: str
) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    path = write_csv(tmp_path / "records.csv", [line(0, 0)])
    code, output = run("import", str(path), "--source", source)
    assert code == 2, output
    assert output.strip() == (
        "import refused: --source must be printable text of 1 to 64 characters, without spaces "
        "around it"
    )
    assert count_rows(cli_session, "events") == 0


def test_import_refuses_the_demos_source_names_in_one_line(
    cli_env: Settings, cli_session: Session, tmp_path: Path
) -> None:
    """Records imported as demo-seed-<x> would pass for the demo's: ``serve`` would build packets
    of them for the demo team and print a curl line that re-identifies them."""
    Keyring.init(cli_env.resolved_keyring_path)
    path = write_csv(tmp_path / "records.csv", [line(0, 0)])
    code, output = run("import", str(path), "--source", "demo-seed-1")
    assert code == 2, output
    assert output.strip() == (
        "import refused: --source names beginning with 'demo-seed-' are `casepackets demo`'s"
    )
    assert count_rows(cli_session, "events") == 0


def test_import_takes_a_source_of_64_characters(
    cli_env: Settings, cli_session: Session, tmp_path: Path
) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    path = write_csv(tmp_path / "records.csv", [line(0, 0)])
    code, output = run("import", str(path), "--source", "s" * 64)
    assert code == 0, output
    assert count_rows(cli_session, "events") == 1


def test_import_refuses_an_unknown_header_by_position_not_by_name(
    cli_env: Settings, tmp_path: Path
) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    path = tmp_path / "bad.csv"
    path.write_text("bsn,name,given_name\n111222333,Jan,Jan\n", encoding="utf-8")
    code, output = run("import", str(path), "--source", "x")
    assert code == 2
    said = " ".join(output.split())
    assert "missing birth_date, district, family_name, neighbourhood" in said
    assert "1 unrecognised column (column 2)" in said
    assert re.search(r"\bname\b", said) is None  # a header value, as printed by column names


def test_import_of_a_file_without_header_prints_none_of_its_first_line(
    cli_env: Settings, cli_session: Session, tmp_path: Path
) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    first = line(0, 0, email="fatima@example.nl")
    path = tmp_path / "headless.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.DictWriter(handle, fieldnames=CSV_COLUMNS).writerows([first, line(1, 0)])
    code, output = run("import", str(path), "--source", "welfare")
    assert code == 2, output
    said = " ".join(output.split())
    assert "line 1 is not a header" in said
    for value in filter(None, first.values()):
        assert value not in output, value
    assert count_rows(cli_session, "subjects") == 0


def write_lines(path: Path, rows: list[dict[str, str]], *, terminator: str = "\r\n") -> Path:
    """``rows`` under a header, as UTF-8 lines ending in ``terminator``."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, lineterminator=terminator)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_a_line_that_is_not_utf8_is_rejected_alone_wherever_it_falls(
    cli_env: Settings, cli_session: Session, tmp_path: Path
) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    rows = [line(i, 0) for i in range(4)] + [line(4, 0, city="Zoëstad"), line(5, 0)]
    path = tmp_path / "latin1.csv"
    path.write_bytes(write_lines(path, rows).read_text("utf-8").encode("latin-1"))
    code, output = run("import", str(path), "--source", "welfare", "--batch-size", "2")
    assert code == 1, output
    said = " ".join(output.split())
    assert "line 6: row: not UTF-8" in said
    assert "1 lines rejected" in said
    assert "Zo" not in output
    assert count_rows(cli_session, "subjects") == 5


def test_a_control_character_at_a_values_edge_is_rejected_as_the_api_rejects_it(
    cli_env: Settings, cli_session: Session, tmp_path: Path
) -> None:
    """The information separators U+001C to U+001F are whitespace to ``str.strip`` but control
    characters to the API, which does not strip them and refuses them (422) as any other: the
    import rejects such a line too instead of storing it without them."""
    Keyring.init(cli_env.resolved_keyring_path)
    rows = [line(0, 0), line(1, 0, given_name="Fatima\x1f"), line(2, 0, office="\x1e" + OFFICE)]
    path = write_csv(tmp_path / "records.csv", rows)
    code, output = run("import", str(path), "--source", "welfare")
    assert code == 1, output
    said = " ".join(output.split())
    assert "line 3: given_name: invalid value" in said
    assert "line 4: office: invalid value" in said
    assert "2 lines rejected" in said
    assert count_rows(cli_session, "subjects") == 1
    assert count_rows(cli_session, "events") == 1


def test_an_import_refuses_a_header_that_is_not_utf8_before_storing_anything(
    cli_env: Settings, cli_session: Session, tmp_path: Path
) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    path = write_lines(tmp_path / "records.csv", [line(0, 0)])
    path.write_bytes(b"\xe9" + path.read_bytes())
    code, output = run("import", str(path), "--source", "welfare")
    assert code == 2, output
    assert "line 1 is not UTF-8" in " ".join(output.split())
    assert count_rows(cli_session, "subjects") == 0


@pytest.mark.parametrize("terminator", ["\r", "\n", "\r\n"])
def test_an_import_reads_lines_ending_in_cr_lf_or_both(
    cli_env: Settings, cli_session: Session, tmp_path: Path, terminator: str
) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    rows = [line(0, 0), line(0, 1, office="Wijkteam\r\nZuid"), line(1, 0, bsn="bad")]
    path = write_lines(tmp_path / "records.csv", rows, terminator=terminator)
    code, output = run("import", str(path), "--source", "welfare", "--batch-size", "1")
    assert code == 1, output
    said = " ".join(output.split())
    for number in (3, 4):  # a value may not hold a line break, however the lines end
        assert f"line {number}: row: a quoted value runs over lines 3–4" in said
    assert "line 5: bsn: invalid value" in said
    assert "3 lines rejected" in said
    assert "Wijkteam" not in output
    assert count_rows(cli_session, "events") == 1


def rewrite_line(path: Path, number: int, old: str, new: str) -> None:
    """Replace ``old`` by ``new`` in physical line ``number`` of ``path`` (the header is line 1),
    to write what a CSV writer would not: a stray quote, a line cut short."""
    lines = path.read_bytes().decode("utf-8").splitlines(keepends=True)
    assert old in lines[number - 1]
    lines[number - 1] = lines[number - 1].replace(old, new)
    path.write_bytes("".join(lines).encode("utf-8"))


OFFICE = "Werk en Inkomen Rotterdam Zuid"  # what line() puts in the office column


@pytest.mark.parametrize("closed_on", [None, 5], ids=["never-closed", "closed-on-line-5"])
def test_a_stray_opening_quote_rejects_every_line_it_swallows_and_no_other(
    cli_env: Settings, cli_session: Session, tmp_path: Path, closed_on: int | None
) -> None:
    """Line 3 opens a quote it does not close: the lines up to the next quote (line 5's, which
    would be a valid line on its own), or the end of the file, are one record."""
    Keyring.init(cli_env.resolved_keyring_path)
    path = write_lines(tmp_path / "records.csv", [line(i, 0) for i in range(6)])
    rewrite_line(path, 3, f",{OFFICE},", f',"{OFFICE},')
    if closed_on is not None:
        rewrite_line(path, closed_on, f",{OFFICE},", f',"{OFFICE}",')
    last = 7 if closed_on is None else closed_on
    code, output = run("import", str(path), "--source", "welfare", "--batch-size", "2")
    assert code == 1, output
    said = " ".join(output.split())
    for number in range(3, last + 1):
        assert (
            f"line {number}: row: a quoted value runs over lines 3–{last}: an unclosed quote? "
            "values may not contain line breaks" in said
        )
    assert f"{last - 2} lines rejected" in said
    assert "Oukili" not in output
    assert OFFICE not in output
    assert count_rows(cli_session, "subjects") == 8 - last  # line 2 and the lines after `last`
    assert count_rows(cli_session, "events") == 8 - last


def test_a_stray_opening_quote_in_a_large_file_stops_the_import_suggesting_it(
    cli_env: Settings, cli_session: Session, tmp_path: Path
) -> None:
    """With no quote after it, line 3's value runs on until the parser's field limit, and no
    line after it can be read."""
    Keyring.init(cli_env.resolved_keyring_path)
    path = write_lines(tmp_path / "records.csv", [line(i, 0) for i in range(1000)])
    rewrite_line(path, 3, f",{OFFICE},", f',"{OFFICE},')
    code, output = run("import", str(path), "--source", "welfare", "--batch-size", "1")
    assert code == 3, output
    said = " ".join(output.split())
    assert (
        "import stopped at line 3: a field is longer than 131072 characters (an unclosed quote?)"
        in said
    )
    assert count_rows(cli_session, "subjects") == 1


def test_a_line_with_fewer_values_than_the_header_is_rejected_whole(
    cli_env: Settings, cli_session: Session, tmp_path: Path
) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    path = write_lines(tmp_path / "records.csv", [line(0, 0), line(1, 0), line(2, 0)])
    rewrite_line(path, 3, f",welfare_start,2024-01-01,{OFFICE},csv-1-0", "")
    code, output = run("import", str(path), "--source", "welfare")
    assert code == 1, output
    said = " ".join(output.split())
    assert "line 3: row: fewer values than header columns" in said
    assert "1 lines rejected" in said
    assert "Oukili" not in output
    assert count_rows(cli_session, "subjects") == 2  # 0 and 2; nothing of line 3
    assert count_rows(cli_session, "events") == 2


def test_a_line_with_one_value_more_than_the_header_is_rejected_whole(
    cli_env: Settings, cli_session: Session, tmp_path: Path
) -> None:
    """One value too many, as a stray comma makes: rejected by line, not an import that fails."""
    Keyring.init(cli_env.resolved_keyring_path)
    path = write_lines(tmp_path / "records.csv", [line(0, 0), line(1, 0), line(2, 0)])
    rewrite_line(path, 3, "csv-1-0", "csv-1-0,")
    code, output = run("import", str(path), "--source", "welfare")
    assert code == 1, output
    said = " ".join(output.split())
    assert "line 3: row: more values than header columns" in said
    assert "1 lines rejected" in said
    assert count_rows(cli_session, "subjects") == 2  # 0 and 2; nothing of line 3


def test_import_lists_the_first_50_rejected_lines_and_counts_the_rest(
    cli_env: Settings, tmp_path: Path
) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    rows = [line(index, 0, event_type="alien_visit") for index in range(52)]
    path = write_csv(tmp_path / "records.csv", rows)
    code, output = run("import", str(path), "--source", "welfare")
    assert code == 1, output
    listed = re.findall(r"^  line (\d+): event_type:", output, flags=re.MULTILINE)
    assert listed == [str(number) for number in range(2, 52)]
    said = " ".join(output.split())
    assert "… and 2 more rejected lines" in said
    assert "52 lines rejected" in said


def test_an_import_keeps_the_first_rejections_and_counts_them_all(
    cli_env: Settings, tmp_path: Path
) -> None:
    """What an import remembers of rejected lines is bounded, the count is not."""
    keyring = Keyring.init(cli_env.resolved_keyring_path)
    rows = [line(index, 0, event_type="alien_visit") for index in range(3)]
    path = write_csv(tmp_path / "records.csv", [*rows, line(3, 0)])
    database = Database(cli_env)
    try:
        result = bulk.import_csv(
            database=database,
            keyring=keyring,
            event_types=load_event_types(cli_env.policies_dir / "events.yaml"),
            path=path,
            source="welfare",
            actor="system:import:welfare",
            batch_size=10,
            keep_rejections=2,
        )
    finally:
        database.dispose()

    assert [rejection.line for rejection in result.rejected] == [2, 3]
    assert result.rejected_total == 3
    assert result.subjects == 1


def test_an_import_that_stops_after_committed_batches_says_what_was_stored(
    cli_env: Settings, cli_session: Session, tmp_path: Path
) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    rows = [line(0, 0), line(1, 0), line(2, 0, office="x" * 140_000), line(3, 0), line(4, 0)]
    path = write_lines(tmp_path / "records.csv", rows)
    code, output = run("import", str(path), "--source", "welfare", "--batch-size", "1")
    assert code == 3, output
    said = " ".join(output.split())
    assert "import stopped at line 4: a field is longer than 131072 characters" in said
    assert "2 subjects and 2 new events" in said
    assert "nothing from line 4 on" in said
    assert "run the same import again" in said
    assert count_rows(cli_session, "subjects") == 2

    rows[2] = line(2, 0)
    write_lines(path, rows)
    code, output = run("import", str(path), "--source", "welfare", "--batch-size", "1")
    assert code == 0, output
    assert "imported 5 subjects, 3 new events (2 already known)" in " ".join(output.split())
    assert count_rows(cli_session, "subjects") == 5
    assert count_rows(cli_session, "events") == 5


def test_an_interrupted_import_says_what_is_stored_and_finishes_when_run_again(
    cli_env: Settings, cli_session: Session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    path = write_csv(tmp_path / "records.csv", [line(n, 0) for n in range(4)])
    real_ingest, calls = records_service.ingest_batch, []

    def interrupted_at_the_third_batch(**arguments: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_ingest(**arguments)

    with pytest.MonkeyPatch.context() as interrupting:
        interrupting.setattr(bulk, "ingest_batch", interrupted_at_the_third_batch)
        code, output = run("import", str(path), "--source", "welfare", "--batch-size", "1")
    assert code == 130, output
    said = " ".join(output.split())
    assert "interrupted: the batches committed before are stored" in said
    assert "Run the same import again to finish" in said
    assert count_rows(cli_session, "subjects") == 2
    code, output = run("import", str(path), "--source", "welfare", "--batch-size", "1")
    assert code == 0, output
    assert count_rows(cli_session, "subjects") == 4


def test_a_batch_the_service_refuses_stops_the_import_with_what_was_stored(
    cli_env: Settings, cli_session: Session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    path = write_lines(tmp_path / "records.csv", [line(0, 0), line(0, 1), line(1, 0), line(2, 0)])
    batches = 0

    def second_batch_races(**kwargs: Any) -> IngestResult:
        nonlocal batches
        batches += 1
        if batches == 2:
            raise ConcurrentIngest("another batch stored the same subjects at the same time")
        return ingest_batch(**kwargs)

    monkeypatch.setattr(bulk, "ingest_batch", second_batch_races)
    code, output = run("import", str(path), "--source", "welfare", "--batch-size", "1")
    assert code == 3, output
    said = " ".join(output.split())
    assert (
        "import stopped at line 4: the batch from this line on was refused (another batch "
        "stored the same subjects at the same time)" in said
    )
    assert "1 subjects and 2 new events" in said
    assert count_rows(cli_session, "subjects") == 1


def test_a_database_error_stops_the_import_without_quoting_the_batch(
    cli_env: Settings, cli_session: Session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    path = write_lines(tmp_path / "records.csv", [line(0, 0), line(1, 0)])
    batches = 0

    def second_batch_fails(**kwargs: Any) -> IngestResult:
        nonlocal batches
        batches += 1
        if batches == 2:
            raise DataError("COPY events", None, ValueError("value 'Oukili1' too long"))
        return ingest_batch(**kwargs)

    monkeypatch.setattr(bulk, "ingest_batch", second_batch_fails)
    code, output = run("import", str(path), "--source", "welfare", "--batch-size", "1")
    assert code == 3, output
    said = " ".join(output.split())
    assert "import stopped at line 3: the database refused the batch from this line on" in said
    assert "Oukili1" not in output
    assert count_rows(cli_session, "subjects") == 1


CHANGED_EVENT = "source_event_id: source_event_id already stored with another office"


@pytest.mark.parametrize("batch_size", ["1", "10"])
def test_a_line_resending_a_stored_event_with_other_content_is_rejected_and_the_rest_stored(
    cli_env: Settings, cli_session: Session, tmp_path: Path, batch_size: str
) -> None:
    """The service refuses the batch for that line's row; the import names the line, not the
    batch's row, and stores the batch again without it."""
    Keyring.init(cli_env.resolved_keyring_path)
    first = write_csv(tmp_path / "first.csv", [line(0, 0), line(1, 0), line(2, 0)])
    assert run("import", str(first), "--source", "welfare")[0] == 0
    rows = [line(0, 0), line(1, 0), line(2, 0, office="Desk B"), line(3, 0), line(4, 0)]
    path = write_csv(tmp_path / "second.csv", rows)
    for _ in range(2):  # the same answer when run again
        code, output = run("import", str(path), "--source", "welfare", "--batch-size", batch_size)
        assert code == 1, output
        said = " ".join(output.split())
        assert f"line 4: {CHANGED_EVENT}" in said
        assert "1 lines rejected" in said
        assert "imported 4 subjects" in said
        assert "stopped" not in said
        assert "failing rows" not in said
        assert "Desk B" not in output
        assert "Oukili2" not in output
        assert count_rows(cli_session, "subjects") == 5
        assert count_rows(cli_session, "events") == 5


def test_a_subject_with_a_line_the_service_refuses_is_left_out_whole_with_its_lines_named(
    cli_env: Settings, cli_session: Session, tmp_path: Path
) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    first = write_csv(tmp_path / "first.csv", [line(1, 0)])
    assert run("import", str(first), "--source", "welfare")[0] == 0
    rows = [line(0, 0), line(1, 1), line(1, 0, office="Desk B"), line(1, 2), line(2, 0)]
    path = write_csv(tmp_path / "second.csv", rows)
    code, output = run("import", str(path), "--source", "welfare")
    assert code == 1, output
    said = " ".join(output.split())
    assert f"line 4: {CHANGED_EVENT}" in said
    assert "line 3: row: its subject is left out for line 4" in said
    assert "line 5: row: its subject is left out for line 4" in said
    assert "3 lines rejected" in said
    assert "imported 2 subjects, 2 new events" in said
    assert count_rows(cli_session, "subjects") == 3
    assert count_rows(cli_session, "events") == 3  # 1-0 from before, 0-0 and 2-0


def test_a_subject_with_an_invalid_line_is_left_out_whole_with_only_that_line_blamed(
    cli_env: Settings, cli_session: Session, tmp_path: Path
) -> None:
    """The import's own checks name the line at fault, as the service's refusals do; the
    subject's good lines are reported as left out with it, never as invalid themselves."""
    Keyring.init(cli_env.resolved_keyring_path)
    rows = [
        line(0, 0),
        line(0, 1, event_date="2024-02-31"),
        line(0, 2),
        line(1, 0),
        line(1, 1, event_type="lottery_win"),
        line(2, 0),
    ]
    path = write_csv(tmp_path / "records.csv", rows)
    code, output = run("import", str(path), "--source", "welfare")
    assert code == 1, output
    said = " ".join(output.split())
    assert "line 2: row: its subject is left out for line 3" in said
    assert "line 3: event_date: invalid value" in said
    assert "line 4: row: its subject is left out for line 3" in said
    assert "line 5: row: its subject is left out for line 6" in said
    assert "line 6: event_type: unknown event type" in said
    assert "5 lines rejected" in said
    assert "imported 1 subjects, 1 new events" in said
    assert count_rows(cli_session, "subjects") == 1


def refusing_row_zero(calls: list[int]) -> Any:
    """An ``ingest_batch`` that refuses every batch for its first row, as if each retry met a
    new conflict."""

    def ingest(**arguments: Any) -> IngestResult:
        calls.append(len(arguments["subjects"]))
        loc = ["subjects", 0, "events", 0, "source_event_id"]
        raise BatchInvalid(
            "batch rejected, nothing was stored; failing rows: 0",
            errors=[{"row": 0, "loc": loc, "msg": "stored meanwhile by another import"}],
        )

    return ingest


def test_a_batch_refused_for_other_rows_on_every_try_stops_after_a_bounded_number_of_tries(
    cli_env: Settings, cli_session: Session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    path = write_csv(tmp_path / "records.csv", [line(n, 0) for n in range(6)])
    calls: list[int] = []
    monkeypatch.setattr(bulk, "ingest_batch", refusing_row_zero(calls))
    code, output = run("import", str(path), "--source", "welfare", "--batch-size", "10")
    assert code == 3, output
    assert calls == [6, 5, 4, 3]
    said = " ".join(output.split())
    for number in (2, 3, 4, 5):
        assert f"line {number}: source_event_id: stored meanwhile by another import" in said
    assert "4 lines rejected" in said
    assert "import stopped at line 2: the batch from this line on was refused 4 times" in said
    assert "failing rows" not in said
    assert count_rows(cli_session, "subjects") == 0


def test_a_batch_whose_every_row_is_refused_stores_nothing_and_goes_on(
    cli_env: Settings, cli_session: Session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    path = write_csv(tmp_path / "records.csv", [line(n, 0) for n in range(3)])
    calls: list[int] = []
    monkeypatch.setattr(bulk, "ingest_batch", refusing_row_zero(calls))
    code, output = run("import", str(path), "--source", "welfare", "--batch-size", "1")
    assert code == 1, output
    assert calls == [1, 1, 1]
    said = " ".join(output.split())
    assert "imported 0 subjects, 0 new events (0 already known) in 0 batches" in said
    assert "3 lines rejected" in said
    assert count_rows(cli_session, "subjects") == 0


def test_a_batch_refused_as_a_whole_still_stops_the_import(
    cli_env: Settings, cli_session: Session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Keyring.init(cli_env.resolved_keyring_path)
    path = write_csv(tmp_path / "records.csv", [line(0, 0), line(1, 0)])
    batches = 0

    def second_batch_too_large(**kwargs: Any) -> IngestResult:
        nonlocal batches
        batches += 1
        if batches == 2:
            error = {"row": None, "loc": ["subjects"], "msg": "a batch holds at most 0 subjects"}
            raise BatchInvalid("batch rejected, nothing was stored", errors=[error])
        return ingest_batch(**kwargs)

    monkeypatch.setattr(bulk, "ingest_batch", second_batch_too_large)
    code, output = run("import", str(path), "--source", "welfare", "--batch-size", "1")
    assert code == 3, output
    assert batches == 2
    said = " ".join(output.split())
    assert "import stopped at line 3: the batch from this line on was refused" in said
    assert count_rows(cli_session, "subjects") == 1


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


def test_a_demo_seed_too_long_to_name_its_source_is_refused_in_one_line(
    cli_env: Settings, cli_session: Session
) -> None:
    """The seed is spelled into the batches' source and the subjects' e-mail addresses, which
    have a length limit: a seed of 60 digits is refused by its option, not by a traceback from
    the first batch, and nothing is stored."""
    Keyring.init(cli_env.resolved_keyring_path)
    result = CliRunner().invoke(cli, ["demo", "--subjects", "100", "--seed", "9" * 60])
    assert result.exit_code == 2, result.output
    assert "--seed" in result.output
    assert "Traceback" not in result.output
    assert "ValidationError" not in result.output
    assert count_rows(cli_session, "subjects") == 0
    assert count_rows(cli_session, "ingest_batches") == 0
    # A 64-bit integer, either sign, and nothing past it.
    for seed in (2**63, -(2**63) - 1):
        refused = CliRunner().invoke(cli, ["demo", "--subjects", "100", "--seed", str(seed)])
        assert refused.exit_code == 2, (seed, refused.output)
        assert "--seed" in refused.output
    assert count_rows(cli_session, "subjects") == 0
    assert run("demo", "--subjects", "100", "--seed", str(2**63 - 1))[0] == 0
    assert run("demo", "--subjects", "100", "--seed", str(-(2**63)))[0] == 0
    assert count_rows(cli_session, "subjects") == 200


def test_prepare_creates_keys_and_demo_once_in_the_embedded_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("DATABASE_URL", "CASEPACKETS_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(env="test", home=tmp_path)
    prepare(settings)
    assert settings.resolved_keyring_path.exists()
    first_key = Keyring.load(settings.resolved_keyring_path).current("vault").material
    database = Database(settings)
    try:
        with database.session() as session:
            assert count_rows(session, "subjects") == 500
            packets = count_rows(session, "packets")
            assert packets > 0
        prepare(settings)
        assert Keyring.load(settings.resolved_keyring_path).current("vault").material == first_key
        with database.session() as session:
            assert count_rows(session, "subjects") == 500
            assert count_rows(session, "packets") == packets
    finally:
        database.dispose()


def test_prepare_loads_no_demo_into_a_configured_database(
    cli_env: Settings, cli_session: Session
) -> None:
    """A database named by DATABASE_URL may be a real one: serve migrates it and creates the
    keyring (outside production), but fills it with no synthetic subjects or packets."""
    prepare(cli_env)
    assert cli_env.resolved_keyring_path.exists()
    assert count_rows(cli_session, "subjects") == 0
    assert count_rows(cli_session, "packets") == 0
    assert count_rows(cli_session, "professionals") == 0


@pytest.mark.parametrize("revision", [None, "0099"], ids=["no schema", "newer schema"])
def test_import_and_demo_refuse_a_database_not_at_this_versions_schema(
    databases: Databases,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    revision: str | None,
) -> None:
    """Only `migrate` (and `serve`) change the schema: an import must not migrate a production
    database as a side effect, nor fail half-way on one a newer version migrated."""
    url = databases.empty() if revision is None else databases.fresh()
    if revision is not None:
        engine = make_engine(url)
        try:
            with engine.begin() as connection:
                connection.execute(
                    text("UPDATE alembic_version SET version_num = :v"), {"v": revision}
                )
        finally:
            engine.dispose()
    monkeypatch.setenv("CASEPACKETS_HOME", str(tmp_path))
    monkeypatch.setenv("CASEPACKETS_DATABASE_URL", url)
    monkeypatch.setenv("CASEPACKETS_ENV", "test")
    get_settings.cache_clear()
    try:
        Keyring.init(tmp_path / "keyring.json")
        path = write_csv(tmp_path / "records.csv", [line(0, 0)])
        for command in (
            ["import", str(path), "--source", "welfare"],
            ["demo", "--subjects", "100"],
        ):
            code, output = run(*command)
            said = " ".join(output.split())
            assert code == 2, (command, output)
            assert "Traceback" not in output
            if revision is None:
                assert "run `casepackets migrate` first" in said
            else:
                assert f"the database is at revision {revision}, newer than" in said
        engine = make_engine(url)
        try:
            with engine.connect() as connection:
                tables = set(inspect(connection).get_table_names())
        finally:
            engine.dispose()
        assert "subjects" not in tables if revision is None else "subjects" in tables
    finally:
        get_settings.cache_clear()


def test_long_commands_interrupted_say_what_they_kept_and_finish_when_run_again(
    cli_env: Settings, cli_session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C in demo, flag, keys rewrap or expire: one line saying what was kept and how to
    finish (exit status 130), and running the command again finishes the job."""
    from service.flagging import service as flagging_service
    from service.packets import service as packets_service

    Keyring.init(cli_env.resolved_keyring_path)
    real_ingest, batches = records_service.ingest_batch, []

    def interrupted_at_the_second_batch(**arguments: Any) -> Any:
        batches.append(1)
        if len(batches) == 2:
            raise KeyboardInterrupt
        return real_ingest(**arguments)

    with pytest.MonkeyPatch.context() as interrupting:
        interrupting.setattr(bulk, "ingest_batch", interrupted_at_the_second_batch)
        code, output = run("demo", "--subjects", "100", "--batch-size", "60")
    assert code == 130, output
    assert "interrupted: the batches committed before are stored" in " ".join(output.split())
    assert "Run the same demo again to finish" in " ".join(output.split())
    assert count_rows(cli_session, "subjects") == 60
    assert run("demo", "--subjects", "100", "--batch-size", "60")[0] == 0
    assert count_rows(cli_session, "subjects") == 100

    real_run = flagging_service.run_flagging

    def interrupted_once_evaluated(**arguments: Any) -> Any:
        real_run(**arguments)  # every flag written to the run's transaction, then Ctrl-C
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as interrupting:
        interrupting.setattr(flagging_service, "run_flagging", interrupted_once_evaluated)
        code, output = run("flag", "--as-of", REFERENCE_DATE.isoformat())
    assert code == 130, output
    assert "interrupted: nothing was stored" in " ".join(output.split())
    assert count_rows(cli_session, "flagging_runs") == count_rows(cli_session, "flags") == 0

    assert run("keys", "rotate", "--purpose", "vault")[0] == 0
    real_chunk, chunks = records_service.rewrap_chunk, []

    def interrupted_at_the_second_chunk(**arguments: Any) -> Any:
        chunks.append(1)
        if len(chunks) == 2:
            raise KeyboardInterrupt
        return real_chunk(**arguments)

    with pytest.MonkeyPatch.context() as interrupting:
        interrupting.setattr("service.cli.rewrap_chunk", interrupted_at_the_second_chunk)
        code, output = run("keys", "rewrap", "--chunk", "40")
    assert code == 130, output
    said = " ".join(output.split())
    assert "interrupted: the chunks committed before are rewrapped" in said
    assert "Run `casepackets keys rewrap` again to finish" in said
    code, output = run("keys", "rewrap", "--chunk", "40")
    assert code == 0, output
    assert "rewrapped 60 keys; nothing depends on older KEK versions now" in " ".join(
        output.split()
    )

    def interrupted_shredding(**_: Any) -> int:
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as interrupting:
        interrupting.setattr(packets_service, "shred_expired", interrupted_shredding)
        code, output = run("expire")
    assert code == 130, output
    assert "Run `casepackets expire` again to finish" in " ".join(output.split())


def test_an_import_stopped_by_sigterm_rolls_back_its_batch_and_says_what_is_stored(
    cli_env: Settings, cli_session: Session, db_url: str, tmp_path: Path
) -> None:
    """SIGTERM (``docker stop``) ends a command as Ctrl-C does, exit status 143: the batch in
    progress rolls back, and the command says what is stored and how to finish."""
    import signal
    import subprocess
    import sys
    import time

    from service.config import PROJECT_ROOT

    Keyring.init(cli_env.resolved_keyring_path)
    env = {
        **os.environ,
        "CASEPACKETS_HOME": str(tmp_path),
        "CASEPACKETS_DATABASE_URL": db_url,
        "CASEPACKETS_ENV": "test",
    }
    command = [sys.executable, "-m", "service.cli", "import", "/dev/stdin", "--source", "welfare"]
    importing = subprocess.Popen(
        [*command, "--batch-size", "1"],
        cwd=PROJECT_ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert importing.stdin is not None
    try:
        rows = [",".join(line(n, 0).values()) for n in range(3)]
        importing.stdin.write(",".join(CSV_COLUMNS) + "\n" + "\n".join(rows) + "\n")
        importing.stdin.flush()  # the pipe stays open: the import waits for more lines
        deadline = time.monotonic() + 60
        while count_rows(cli_session, "subjects") < 2:
            assert time.monotonic() < deadline, "the import stored nothing"
            assert importing.poll() is None, importing.communicate()[0]
            time.sleep(0.1)
            cli_session.rollback()  # a fresh snapshot
        importing.send_signal(signal.SIGTERM)
        output = importing.communicate(timeout=60)[0]
    finally:
        if importing.poll() is None:
            importing.kill()
    assert importing.returncode == 143, output
    said = " ".join(output.split())
    assert "interrupted: the batches committed before are stored" in said, output
    assert "Traceback" not in output
    cli_session.rollback()
    # The third subject waits for its next line (another of the same BSN may follow) or the end.
    assert count_rows(cli_session, "subjects") == 2
