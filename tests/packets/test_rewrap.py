"""Packet KEK rotation end to end: rotate, rewrap (paging by UUID ids), open, retire.

SQLite and PostgreSQL, through the ``casepackets keys`` commands against the test's database and
its own keyring file, and the owner's ``GET /v1/packets/{id}/clients``.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlmodel import Session
from typer.testing import CliRunner

from service.access_log import service as log_service
from service.access_log.checkpoint import parse_checkpoint
from service.cli import app as cli
from service.config import Settings, get_settings
from service.crypto import keyring as keyring_module
from service.crypto.keyring import Keyring, LockedKeyring, UnknownKey
from service.crypto.signing import NoteError, NoteSigner, VerifierKey, open_note
from service.db import Database
from service.packets import service as packets_service
from service.records import service as records_service
from service.records.service import WRAPPED_KEY_COLUMNS, pending_rewraps, rewrap_chunk
from tests.conftest import Answer, Interleaving, TokenFactory, bearer, waiting_on_a_lock
from tests.flagging.seed import AS_OF, log_entries
from tests.packets import scenario
from tests.packets.scenario import PACKETS, World, build_world, leaked
from tests.records.conftest import make_record

OWNER = "prof-001"
OTHER = "prof-002"


@pytest.fixture
def keyring_path(tmp_path: Path) -> Path:
    return tmp_path / "own-keyring.json"


@pytest.fixture
def settings(home: Path, db_url: str, keyring_path: Path) -> Settings:
    """The shared test settings, but with a keyring of this test's own (it gets rotated)."""
    return Settings(env="test", home=home, database_url=db_url, keyring_path=keyring_path)


@pytest.fixture
def keys_cli(
    db_url: str, keyring_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[CliRunner]:
    """``casepackets`` pointed at the test's database and keyring."""
    monkeypatch.setenv("CASEPACKETS_HOME", str(tmp_path))
    monkeypatch.setenv("CASEPACKETS_DATABASE_URL", db_url)
    monkeypatch.setenv("CASEPACKETS_KEYRING_PATH", str(keyring_path))
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


def packet_wraps(database: Database) -> dict[str, str]:
    with database.session() as session:
        rows = session.execute(select(PACKETS.c.id, PACKETS.c.wrapped_key)).all()
        session.rollback()
    return {str(packet_id): str(wrapped) for packet_id, wrapped in rows}


def family_names(client: TestClient, token: TokenFactory, packet_id: str, owner: str) -> set[str]:
    response = client.get(
        f"/v1/packets/{packet_id}/clients", headers=bearer(token(owner, "professional"))
    )
    assert response.status_code == 200, response.text
    return {c["identity"]["family_name"] for c in response.json()["clients"]}


def expected_names(world: World, owner: str, district: str) -> set[str]:
    return {p.identity["family_name"] for p in world.members(world.packet(owner, district))}


def said(output: str) -> str:
    return " ".join(output.split())


def test_packet_kek_rotation_rewrap_then_retire(
    client: TestClient,
    app: FastAPI,
    token: TokenFactory,
    database: Database,
    keyring_path: Path,
    keys_cli: CliRunner,
    keyring_followed_at_once: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The running app follows the commands' changes to the keyring file, without a restart."""
    world = build_world(
        client,
        token,
        professionals={OWNER: ["Charlois", "Feijenoord"], OTHER: ["IJsselmonde"]},
        per_district=3,
    )
    packets = {
        (owner, district): packet["id"]
        for owner, by_district in world.packets.items()
        for district, packet in by_district.items()
    }
    assert len(packets) == 3
    assert all(w.startswith("v1.1.") for w in packet_wraps(database).values())

    rotated = keys_cli.invoke(cli, ["keys", "rotate", "--purpose", "packet"])
    assert rotated.exit_code == 0, rotated.output
    assert app.state.keyring.current("packet").version == 2

    # Before the rewrap every packet still needs v1: retiring it is refused, nothing destroyed.
    refused = keys_cli.invoke(cli, ["keys", "retire", "--purpose", "packet", "--version", "1"])
    assert refused.exit_code == 1, refused.output
    assert "3 rows still depend on packet v1" in said(refused.output)
    assert Keyring.load(keyring_path).get("packet", 1).version == 1

    # A rewrap interrupted after its first chunk: what it moved is committed, and so is the
    # access-log entry for it; running it again finishes the job, with an entry per chunk.
    real_chunk, calls = records_service.rewrap_chunk, []

    def failing_second_chunk(**arguments: Any) -> Any:
        calls.append(arguments["wrapped"].purpose)
        if calls.count("packet") == 2:
            raise RuntimeError("interrupted")
        return real_chunk(**arguments)

    with pytest.MonkeyPatch.context() as interrupting:
        interrupting.setattr("service.cli.rewrap_chunk", failing_second_chunk)
        interrupted = keys_cli.invoke(cli, ["keys", "rewrap", "--chunk", "2"])
    assert interrupted.exit_code != 0
    assert sum(w.startswith("v1.2.") for w in packet_wraps(database).values()) == 2
    rewrapped = keys_cli.invoke(cli, ["keys", "rewrap", "--chunk", "2"])
    assert rewrapped.exit_code == 0, rewrapped.output
    assert "rewrapped 1 key;" in said(rewrapped.output)
    after = packet_wraps(database)
    assert sorted(after) == sorted(packets.values())
    assert all(w.startswith("v1.2.") for w in after.values())
    with database.transaction() as session:
        entries = log_entries(session, "keys.rewrap")
    assert [(e["object_id"], e["reason"]) for e in entries] == [
        ("packets.wrapped_key", "rewrapped=2 to packet v2"),
        ("packets.wrapped_key", "rewrapped=1 to packet v2"),
    ]

    # Right after the rotation, work a worker began under v1 may still be committing.
    early = keys_cli.invoke(cli, ["keys", "retire", "--purpose", "packet", "--version", "1"])
    assert early.exit_code == 1, early.output
    assert re.search(r"packet v2 became current \d+ s ago", said(early.output))
    monkeypatch.setattr(keyring_module, "ROTATION_SETTLE_SECONDS", 0)  # as if 5 minutes later
    retired = keys_cli.invoke(cli, ["keys", "retire", "--purpose", "packet", "--version", "1"])
    assert retired.exit_code == 0, retired.output
    with pytest.raises(UnknownKey):
        app.state.keyring.get("packet", 1)

    # Every packet still opens for its owner, with the identities that were ingested.
    for (owner, district), packet_id in packets.items():
        names = family_names(client, token, packet_id, owner)
        assert names == expected_names(world, owner, district)

    # Nothing is left to move: a second rewrap is a no-op.
    again = keys_cli.invoke(cli, ["keys", "rewrap"])
    assert again.exit_code == 0, again.output
    assert "rewrapped 0 keys" in said(again.output)


def test_rewrap_pages_by_uuid_and_resumes(
    client: TestClient,
    app: FastAPI,
    token: TokenFactory,
    database: Database,
    keyring_path: Path,
) -> None:
    """``rewrap_chunk`` in chunks of one: keyset pagination over string keys, one commit each,
    every packet moved exactly once, in id order."""
    world = build_world(
        client, token, professionals={OWNER: ["Charlois", "Feijenoord", "IJsselmonde"]}
    )
    with Keyring.edit(keyring_path) as keyring:
        keyring.rotate("packet")
    app.state.keyring = keyring
    column = next(c for c in WRAPPED_KEY_COLUMNS if c.table == "packets")
    assert column.purpose == "packet"
    with database.transaction() as session:
        assert pending_rewraps(session=session, keyring=keyring, wrapped=column) == 3

    seen: list[str] = []
    after: str | None = None
    while True:
        with database.transaction() as session:
            last, moved = rewrap_chunk(
                session=session, keyring=keyring, wrapped=column, after_id=after, limit=1
            )
        if last == after:
            break
        assert isinstance(last, str)
        assert moved == 1
        seen.append(last)
        after = last
    assert seen == sorted(p["id"] for d in world.packets.values() for p in d.values())
    with database.transaction() as session:
        assert pending_rewraps(session=session, keyring=keyring, wrapped=column) == 0
    for district in ("Charlois", "Feijenoord", "IJsselmonde"):
        packet_id = world.packet(OWNER, district)["id"]
        assert family_names(client, token, packet_id, OWNER) == expected_names(
            world, OWNER, district
        )


def test_checkpoints_are_signed_under_a_rotated_log_signing_key_without_a_restart(
    client: TestClient, token: TokenFactory, keys_cli: CliRunner, keyring_followed_at_once: None
) -> None:
    auditor = bearer(token("auditor-001", "auditor"))
    before = VerifierKey.parse(client.get("/v1/audit/public-key", headers=auditor).text)
    rotated = keys_cli.invoke(cli, ["keys", "rotate", "--purpose", "log_signing"])
    assert rotated.exit_code == 0, rotated.output
    after = VerifierKey.parse(client.get("/v1/audit/public-key", headers=auditor).text)
    assert after.key_id != before.key_id
    checkpoint = client.get("/v1/audit/checkpoint", headers=auditor).text
    assert parse_checkpoint(open_note(checkpoint, after)).size > 0
    with pytest.raises(NoteError):
        open_note(checkpoint, before)


def test_a_worker_that_cannot_read_its_changed_keyring_signs_nothing_and_is_not_ready(
    client: TestClient,
    token: TokenFactory,
    keyring_path: Path,
    keys_cli: CliRunner,
    keyring_followed_at_once: None,
) -> None:
    """It may hold a key that has handed signing over (what it signed, auditors would reject),
    or a pseudonym key rotated since. Just after a rotation a worker that can read the file is
    ready at once."""
    auditor = bearer(token("auditor-001", "auditor"))
    rotated = keys_cli.invoke(cli, ["keys", "rotate", "--purpose", "log_signing"])
    assert rotated.exit_code == 0, rotated.output
    assert client.get("/readyz").status_code == 200
    keyring_path.chmod(0o640)
    keyring_path.touch()  # changed since the worker read it
    refused = client.get("/v1/audit/checkpoint", headers=auditor)
    assert refused.status_code == 503, refused.text
    assert "the keyring file changed but cannot be read" in refused.json()["detail"]
    ready = client.get("/readyz")
    assert ready.status_code == 503
    # Nor does it ingest: it may not hold a pseudonym key rotated meanwhile.
    source = bearer(token("source-welfare", "source"))
    batch = {"subjects": [make_record(0)]}
    refused_batch = client.post("/v1/records/batch", json=batch, headers=source)
    assert refused_batch.status_code == 503, refused_batch.text
    assert "nothing was stored" in refused_batch.json()["detail"]
    keyring_path.chmod(0o600)
    assert client.get("/readyz").status_code == 200
    assert client.get("/v1/audit/checkpoint", headers=auditor).status_code == 200
    assert client.post("/v1/records/batch", json=batch, headers=source).status_code == 200


def test_a_worker_stays_ready_through_a_handover_committing_while_it_is_checked(
    client: TestClient, token: TokenFactory, keys_cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handover commits after the check reread the keyring but before it reads the log:
    judged with the key that handed over, the worker would be reported not ready."""
    monkeypatch.setattr(keyring_module, "RELOAD_CHECK_SECONDS", 3600.0)
    auditor = bearer(token("auditor-001", "auditor"))
    assert client.get("/v1/audit/checkpoint", headers=auditor).status_code == 200
    real_check = log_service.check_readiness
    rotations: list[int] = []

    def rotate_then_check(*, session: Session, signer: NoteSigner | None) -> str:
        if not rotations:
            rotated = keys_cli.invoke(cli, ["keys", "rotate", "--purpose", "log_signing"])
            rotations.append(rotated.exit_code)
        return real_check(session=session, signer=signer)

    monkeypatch.setattr(log_service, "check_readiness", rotate_then_check)
    ready = client.get("/readyz")
    assert rotations == [0]
    assert ready.status_code == 200, ready.text


def test_the_first_checkpoint_after_a_handover_is_signed_by_the_new_key_at_once(
    client: TestClient,
    app: FastAPI,
    token: TokenFactory,
    keyring_path: Path,
    keys_cli: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker looks at the keyring file only now and then (here: not for an hour), but a
    checkpoint is signed under the log's lock, after the handover has committed with the new key
    in the file: it rereads the file then, and the key that handed over signs nothing more."""
    monkeypatch.setattr(keyring_module, "RELOAD_CHECK_SECONDS", 3600.0)
    auditor = bearer(token("auditor-001", "auditor"))
    old = VerifierKey.parse(client.get("/v1/audit/public-key", headers=auditor).text)
    rotated = keys_cli.invoke(cli, ["keys", "rotate", "--purpose", "log_signing"])
    assert rotated.exit_code == 0, rotated.output
    assert client.get("/readyz").status_code == 200, "judged with the key handed to"
    new = NoteSigner.from_keyring(Keyring.load(keyring_path), name=old.name).verifier
    assert new.key_id != old.key_id
    served = VerifierKey.parse(client.get("/v1/audit/public-key", headers=auditor).text)
    assert served.key_id == new.key_id  # the key served is the one that signs, at once too
    checkpoint = client.get("/v1/audit/checkpoint", headers=auditor).text
    assert parse_checkpoint(open_note(checkpoint, new)).size > 0
    with pytest.raises(NoteError):
        open_note(checkpoint, old)


def committed_entries(database: Database) -> int:
    """The access-log entries other connections see (a read outside any transaction)."""
    raw = database.engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("SELECT count(*) FROM access_log_entries")
        row = cursor.fetchone()
        assert row is not None
        return int(row[0])
    finally:
        raw.close()


def test_a_pseudonym_rotation_stages_its_version_before_it_commits_and_promotes_it_after(
    app: FastAPI,  # makes the keyring
    database: Database,
    keyring_path: Path,
    keys_cli: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An ingest checks the pseudonym key under the log's lock: the rotation must have staged
    the new version by the time its entry is committed, or an ingest a moment later could still
    pass its check on the old one and give a person a second subject. It is promoted after."""
    before = committed_entries(database)
    seen_while_writing: list[tuple[int, bool]] = []
    real_save = LockedKeyring._save

    def save(self: LockedKeyring, document: dict[str, Any]) -> None:
        real_save(self, document)
        staged = "staged" in document["purposes"]["pseudonym"]
        seen_while_writing.append((committed_entries(database), staged))

    monkeypatch.setattr(LockedKeyring, "_save", save)
    rotated = keys_cli.invoke(cli, ["keys", "rotate", "--purpose", "pseudonym"])
    assert rotated.exit_code == 0, rotated.output
    # staged while the rotation's entry was uncommitted, made current once it was committed
    assert seen_while_writing == [(before, True), (before + 1, False)]
    assert committed_entries(database) == before + 1
    assert Keyring.load(keyring_path).current("pseudonym").version == 2

    # A commit that fails after the file was written leaves the version staged, and unused.
    def failing_commit(self: Session) -> None:
        raise OperationalError("COMMIT", {}, Exception("the database went away"))

    with pytest.MonkeyPatch.context() as failing:
        failing.setattr(Session, "commit", failing_commit)
        refused = keys_cli.invoke(cli, ["keys", "rotate", "--purpose", "pseudonym"])
    assert refused.exit_code != 0
    assert Keyring.load(keyring_path).staged("pseudonym") is not None
    assert Keyring.load(keyring_path).current("pseudonym").version == 2
    assert committed_entries(database) == before + 1


def test_an_open_whose_packet_kek_is_retired_before_its_reveal_shows_nothing_and_says_try_again(
    client: TestClient,
    app: FastAPI,
    token: TokenFactory,
    database: Database,
    keys_cli: CliRunner,
    keyring_followed_at_once: None,
    rotations_settled: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The open's batch committed its ``packet.open`` entry holding the packet key's v1 wrap;
    before it is decrypted, a rewrap moves the packet to v2 and v1 is retired. The owner gets a
    503 problem that invites a retry (which reads the new wrap), no identity, and the log says
    that nothing was shown."""
    world = build_world(client, token, professionals={OWNER: ["Charlois"]}, per_district=3)
    packet = world.packet(OWNER, "Charlois")
    rotated = keys_cli.invoke(cli, ["keys", "rotate", "--purpose", "packet"])
    assert rotated.exit_code == 0, rotated.output
    real_reveal = packets_service.reveal
    commands: list[int] = []  # the exit codes of the key commands run before the reveal

    def retired_before_reveal(**arguments: Any) -> bytes:
        if not commands:
            for command in (["rewrap"], ["retire", "--purpose", "packet", "--version", "1"]):
                commands.append(keys_cli.invoke(cli, ["keys", *command]).exit_code)
        return real_reveal(**arguments)

    monkeypatch.setattr(packets_service, "reveal", retired_before_reveal)
    owner = bearer(token(OWNER, "professional"))
    url = f"/v1/packets/{packet['id']}/clients"
    opened = client.get(url, headers=owner)
    assert commands == [0, 0]
    assert opened.status_code == 503, opened.text
    assert opened.headers["content-type"] == "application/problem+json"
    assert opened.headers["retry-after"] == "1"
    assert opened.json()["detail"] == (
        f"the key of packet {packet['id']} was rewrapped and its old version retired while "
        "this open was logged; nothing was shown, try again"
    )
    assert leaked(opened.text, world.secrets) == []
    # The operator learns which packet and version, should the version be gone for good.
    assert f"the key of packet {packet['id']} is under packet v1" in caplog.text
    assert leaked(caplog.text, world.secrets) == []
    with database.transaction() as session:
        opens = log_entries(session, "packet.open")
    assert [(e["actor"], e["outcome"], e["reason"]) for e in opens] == [
        (OWNER, "allowed", None),
        (
            OWNER,
            "denied",
            "the packet key's version was retired before it was read; nothing was shown",
        ),
    ]
    assert opens[0]["request_id"] == opens[1]["request_id"]
    assert sorted(opens[1]["pseudonyms"]) == sorted(packet["pseudonyms"])
    # Tried again, the open reads the packet's new wrap.
    assert family_names(client, token, packet["id"], OWNER) == expected_names(
        world, OWNER, "Charlois"
    )


def test_a_followup_needing_a_packet_key_under_a_version_the_keyring_lacks_is_a_clear_503(
    client: TestClient,
    token: TokenFactory,
    database: Database,
    keys_cli: CliRunner,
    keyring_followed_at_once: None,
    rotations_settled: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A packet row whose key wrap is under a packet KEK version the keyring no longer holds (a
    database restored from a backup taken before ``keys rewrap``, after ``keys retire``): a
    follow-up that needs the packet key (a note, an ``Idempotency-Key``) is refused as the open
    is, 503 with ``Retry-After`` and a detail naming the packet, never a bare 500, and nothing
    is recorded; one that needs no key is recorded."""
    world = build_world(client, token, professionals={OWNER: ["Charlois"]}, per_district=3)
    packet = world.packet(OWNER, "Charlois")
    backup = packet_wraps(database)[packet["id"]]
    assert backup.startswith("v1.1.")
    for command in (
        ["rotate", "--purpose", "packet"],
        ["rewrap"],
        ["retire", "--purpose", "packet", "--version", "1"],
    ):
        done = keys_cli.invoke(cli, ["keys", *command])
        assert done.exit_code == 0, done.output
    with database.session() as session:
        session.execute(
            PACKETS.update().where(PACKETS.c.id == packet["id"]).values(wrapped_key=backup)
        )
        session.commit()
    owner = bearer(token(OWNER, "professional"))
    url = f"/v1/packets/{packet['id']}/clients/{packet['pseudonyms'][0]}/followups"
    with_a_note = {"kind": "contact", "date": scenario.DAY_B, "note": scenario.NOTE}
    plain = {"kind": "contact", "date": scenario.DAY_B}
    answers = [
        client.post(url, json=with_a_note, headers=owner),
        client.post(url, json=plain, headers={**owner, "Idempotency-Key": "retry-1"}),
    ]
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.headers["retry-after"] == "1"
        assert answer.json()["detail"] == (
            f"the key of packet {packet['id']} is under a packet key version the keyring does "
            "not hold; nothing was recorded (a follow-up without a note or Idempotency-Key "
            "needs no key)"
        )
        assert scenario.NOTE not in answer.text
        assert leaked(answer.text, world.secrets) == []
    assert f"the key of packet {packet['id']} is under packet v1" in caplog.text
    assert scenario.NOTE not in caplog.text
    with database.transaction() as session:
        stored = session.execute(select(scenario.FOLLOWUPS.c.id)).scalars().all()
        entries = log_entries(session, "followup.create")
    assert (stored, entries) == ([], [])
    recorded = client.post(url, json=plain, headers=owner)
    assert recorded.status_code == 201, recorded.text


def retired_while_paused(
    work: Callable[[], Answer],
    *,
    pause_after: tuple[object, str],
    keys_cli: CliRunner,
    session: Session,
    monkeypatch: pytest.MonkeyPatch,
    rotated_first: bool = False,
) -> tuple[int, list[int]]:
    """``work``'s status, and the exit codes of ``keys rewrap`` and ``keys retire --purpose vault
    --version 1`` (after ``keys rotate --purpose vault`` if ``rotated_first``), run while
    ``work`` is stopped right after ``pause_after`` returned (its vault wraps read, not yet
    opened). The work goes on once the commands are done, or wait for it."""
    interleaving = Interleaving()
    interleaving.stop_after(monkeypatch, *pause_after)
    statuses: list[int] = []
    exit_codes: list[int] = []
    commands = [["rewrap"], ["retire", "--purpose", "vault", "--version", "1"]]
    if rotated_first:
        commands.insert(0, ["rotate", "--purpose", "vault"])
    threads = [
        threading.Thread(target=lambda: statuses.append(work().status_code)),
        threading.Thread(
            target=lambda: exit_codes.extend(
                keys_cli.invoke(cli, ["keys", *command]).exit_code for command in commands
            )
        ),
    ]
    threads[0].start()
    assert interleaving.paused.wait(10), "the work never reached its pause"
    threads[1].start()
    waits, deadline = waiting_on_a_lock(session), time.monotonic() + 10
    while threads[1].is_alive() and not waits():
        assert time.monotonic() < deadline, "the key commands neither ended nor came to wait"
        time.sleep(0.01)
    interleaving.go_on.set()
    for thread in threads:
        thread.join(20)
    assert not any(thread.is_alive() for thread in threads), "the work or a command never ended"
    return statuses[0], exit_codes


def rotated_vault(keys_cli: CliRunner) -> None:
    rotated = keys_cli.invoke(cli, ["keys", "rotate", "--purpose", "vault"])
    assert rotated.exit_code == 0, rotated.output


# On SQLite the work holds the database's write lock from its first statement: a rewrap cannot
# move a wrap under it.
@pytest.mark.parametrize(
    "databases", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_a_vault_kek_retired_during_a_partitioning_waits_for_the_wraps_it_read(
    client: TestClient,
    token: TokenFactory,
    session: Session,
    keys_cli: CliRunner,
    keyring_followed_at_once: None,
    rotations_settled: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    people = scenario.ingest(client, token, ["Charlois"] * 3)
    coordinator = bearer(token(scenario.COORDINATOR, "coordinator"))
    scenario.register(client, coordinator, OWNER, ["Charlois"])
    run = client.post("/v1/flagging/runs", json={"as_of": AS_OF.isoformat()}, headers=coordinator)
    assert run.status_code == 201, run.text
    rotated_vault(keys_cli)

    def partitioning() -> Answer:
        return client.post(
            "/v1/packets/partition", json={"run_id": run.json()["id"]}, headers=coordinator
        )

    status, exit_codes = retired_while_paused(
        partitioning,
        pause_after=(packets_service, "_candidates"),
        keys_cli=keys_cli,
        session=session,
        monkeypatch=monkeypatch,
    )
    assert (status, exit_codes) == (201, [0, 0])
    (packet_id,) = session.execute(select(PACKETS.c.id)).scalars().all()
    session.rollback()
    # built from the wraps read under v1, before it was destroyed: the packet opens
    assert family_names(client, token, packet_id, OWNER) == {
        person.identity["family_name"] for person in people.values()
    }


@pytest.mark.parametrize(
    "databases", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_a_vault_kek_retired_during_an_ingest_waits_for_the_wraps_it_read(
    client: TestClient,
    token: TokenFactory,
    session: Session,
    keyring_path: Path,
    keys_cli: CliRunner,
    keyring_followed_at_once: None,
    rotations_settled: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    known = make_record(0)
    source = bearer(token("source-welfare", "source"))
    first = client.post("/v1/records/batch", json={"subjects": [known]}, headers=source)
    assert first.status_code == 200, first.text
    rotated_vault(keys_cli)
    moved = {**known, "identity": {**known["identity"], "street": "Putselaan 9"}}

    def ingest_again() -> Answer:
        return client.post("/v1/records/batch", json={"subjects": [moved]}, headers=source)

    status, exit_codes = retired_while_paused(
        ingest_again,
        pause_after=(records_service, "_find_known"),
        keys_cli=keys_cli,
        session=session,
        monkeypatch=monkeypatch,
    )
    assert (status, exit_codes) == (200, [0, 0])
    # The new address is stored, sealed under the subject's DEK, now wrapped under v2 alone.
    keyring = Keyring.load(keyring_path)
    subject = records_service.get_subject(
        session=session, pseudonym=first.json()["rows"][0]["pseudonym"]
    )
    session.rollback()
    assert subject.wrapped_dek is not None
    assert subject.wrapped_dek.startswith("v1.2.")
    dek = records_service.subject_dek(keyring=keyring, subject=subject)
    stored = records_service.decrypt_identity(keyring=keyring, subject=subject, dek=dek)
    assert stored.street == "Putselaan 9"


@pytest.mark.parametrize(
    "databases", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_a_vault_kek_is_not_retired_under_a_new_subject_an_ingest_wrapped_before_its_rotation(
    client: TestClient,
    token: TokenFactory,
    session: Session,
    keyring_path: Path,
    keys_cli: CliRunner,
    keyring_followed_at_once: None,
    rotations_settled: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An ingest wraps a new subject's DEK under vault v1, then v2 is rotated in, the rewrap
    runs (it cannot see the uncommitted subject) and v1 is retired. The retirement counts what
    depends on v1 only once the ingest has committed: it finds the new subject and is refused,
    so that person's identity can still be read. Counted before waiting, it found nothing and
    destroyed v1 under them."""
    source = bearer(token("source-welfare", "source"))
    first = client.post("/v1/records/batch", json={"subjects": [make_record(0)]}, headers=source)
    assert first.status_code == 200, first.text

    def ingest_a_new_subject() -> Answer:
        return client.post("/v1/records/batch", json={"subjects": [make_record(1)]}, headers=source)

    status, exit_codes = retired_while_paused(
        ingest_a_new_subject,
        pause_after=(records_service, "_known_events"),  # its new DEK wrapped, not yet stored
        keys_cli=keys_cli,
        session=session,
        monkeypatch=monkeypatch,
        rotated_first=True,
    )
    assert (status, exit_codes) == (200, [0, 0, 1])
    keyring = Keyring.load(keyring_path)
    pseudonyms = session.execute(select(records_service.SUBJECTS.c.pseudonym)).scalars().all()
    for pseudonym in pseudonyms:
        subject = records_service.get_subject(session=session, pseudonym=pseudonym)
        assert subject.wrapped_dek is not None
        dek = records_service.subject_dek(keyring=keyring, subject=subject)
        records_service.decrypt_identity(keyring=keyring, subject=subject, dek=dek)
    session.rollback()
    assert len(pseudonyms) == 2
