"""The append path, tree reads from the database, append-only triggers and checkpoint signing."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, event, select, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlmodel import Session

from service.access_log import merkle
from service.access_log import service as log
from service.access_log.checkpoint import Checkpoint, checkpoint_text, parse_checkpoint
from service.access_log.handover import (
    HANDOVER_ACTION,
    HANDOVER_OBJECT_PREFIX,
    hand_over,
    handover_notes,
)
from service.access_log.models import AccessLogEntry
from service.auth.dependencies import Caller
from service.auth.permissions import Permission
from service.crypto.keyring import Staged
from service.crypto.signing import NoteSigner, VerifierKey, key_id, open_note
from service.db import Database, make_engine
from service.errors import BadRequest
from tests.access_log.conftest import ORIGIN, append_each, entry, run_sql, without_triggers_sql


def test_appends_get_consecutive_indexes_and_canonical_bytes(database: Database) -> None:
    assert append_each(database, 5) == [0, 1, 2, 3, 4]
    with database.session() as session:
        rows = session.execute(
            select(
                AccessLogEntry.leaf_index, AccessLogEntry.leaf_hash, AccessLogEntry.entry
            ).order_by(AccessLogEntry.leaf_index)  # type: ignore[call-overload]
        ).all()
    assert [row[0] for row in rows] == [0, 1, 2, 3, 4]
    _index, leaf, data = rows[3]
    document = json.loads(data)
    assert data == json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
    assert set(document) == {
        "time",
        "actor",
        "role",
        "action",
        "object_type",
        "object_id",
        "pseudonyms",
        "outcome",
        "reason",
        "request_id",
    }
    assert document["object_id"] == "3"
    assert document["pseudonyms"] == ["ps-0003"]
    assert document["time"].endswith("Z")
    assert bytes(leaf) == merkle.leaf_hash(bytes(data))


def test_log_entry_by_caller_takes_actor_role_and_request_id() -> None:
    caller = Caller(
        sub="prof-009",
        roles=frozenset({"professional", "coordinator"}),
        permissions=frozenset({Permission.PACKETS_OPEN}),
        request_id="req-77",
    )
    made = log.LogEntry.by(
        caller,
        action="packet.open",
        object_type="packet",
        object_id="12",
        outcome="denied",
        pseudonyms=["a", "b"],
        reason="not the owner",
    )
    assert made == log.LogEntry(
        actor="prof-009",
        role="coordinator,professional",
        action="packet.open",
        object_type="packet",
        object_id="12",
        outcome="denied",
        pseudonyms=("a", "b"),
        reason="not the owner",
        request_id="req-77",
    )


def test_entry_time_is_written_in_utc_whatever_zone_it_is_given_in() -> None:
    from datetime import timedelta, timezone

    amsterdam_summer = timezone(timedelta(hours=2))
    data = entry(1).canonical_bytes(time=datetime(2026, 6, 1, 12, 0, 0, 5, tzinfo=amsterdam_summer))
    assert json.loads(data)["time"] == "2026-06-01T10:00:00.000005Z"


def test_entry_bytes_keep_non_ascii_text_as_utf8() -> None:
    from datetime import UTC, datetime

    data = log.LogEntry(
        actor="système", role="r", action="a", object_type="t", object_id="ë"
    ).canonical_bytes(time=datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC))
    assert "système".encode() in data
    assert b'"time":"2026-01-02T03:04:05.000006Z"' in data


def test_roots_and_proofs_from_the_database_match_an_in_memory_tree(database: Database) -> None:
    append_each(database, 21)
    with database.session() as session:
        leaves = [
            merkle.leaf_hash(bytes(data))
            for data in log.iter_entries(session=session, start=0, end=21)
        ]
        tree = merkle.MemoryTree(leaves)
        assert log.tree_size(session=session) == 21
        for size in range(22):
            assert log.root(session=session, size=size) == tree.root(size)
        for size in (1, 7, 8, 13, 21):
            for index in range(size):
                proof = log.inclusion_proof(session=session, index=index, size=size)
                merkle.verify_inclusion(
                    leaf=leaves[index], index=index, size=size, proof=proof, root=tree.root(size)
                )
        for second in (1, 8, 16, 21):
            for first in range(second + 1):
                merkle.verify_consistency(
                    first=first,
                    second=second,
                    first_root=tree.root(first),
                    second_root=tree.root(second),
                    proof=log.consistency_proof(session=session, first=first, second=second),
                )
        assert list(log.iter_leaf_hashes(session=session, start=0, end=21)) == leaves


def test_an_append_runs_a_constant_number_of_statements(database: Database) -> None:
    append_each(database, 63)  # the 64th leaf completes 6 subtrees at once
    statements: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        statements.append(statement)

    event.listen(database.engine, "before_cursor_execute", count)
    try:
        with database.transaction() as session:
            assert log.append(session=session, entry=entry(63)) == 63
    finally:
        event.remove(database.engine, "before_cursor_execute", count)
    # PostgreSQL: lock-and-read-frontier, one write; SQLite: BEGIN IMMEDIATE, frontier, 2 inserts
    assert len(statements) <= 4
    with database.session() as session:
        assert (
            log.root(session=session, size=64)
            == merkle.MemoryTree(
                merkle.leaf_hash(bytes(d))
                for d in log.iter_entries(session=session, start=0, end=64)
            ).root()
        )


def test_an_append_rolls_back_with_the_callers_transaction(database: Database) -> None:
    append_each(database, 2)
    with database.session() as session:
        assert log.append(session=session, entry=entry(2)) == 2
        session.rollback()
    with database.session() as session:
        assert log.tree_size(session=session) == 2
    with database.transaction() as session:
        assert log.append(session=session, entry=entry(3)) == 2  # no gap where the rollback was


@pytest.mark.parametrize(
    "table", ["access_log_entries", "access_log_subtrees", "access_log_checkpoints"]
)
def test_direct_update_and_delete_are_rejected(
    database: Database, raw_engine: Engine, signer: NoteSigner, backend: str, table: str
) -> None:
    append_each(database, 3)
    with database.transaction() as session:
        log.signed_checkpoint(session=session, signer=signer, origin=ORIGIN)
    column = {
        "access_log_entries": "entry",
        "access_log_subtrees": "hash",
        "access_log_checkpoints": "root_hash",
    }[table]
    attempts = [f"UPDATE {table} SET {column} = {column}", f"DELETE FROM {table}"]
    if backend == "postgres":
        attempts.append(f"TRUNCATE {table}")
    else:
        # SQLite replaces by deleting the row in the way, without firing DELETE triggers.
        attempts.append(f"INSERT OR REPLACE INTO {table} SELECT * FROM {table}")
        attempts.append(f"REPLACE INTO {table} SELECT * FROM {table}")
    for statement in attempts:
        with pytest.raises(DBAPIError, match="append-only"):
            run_sql(raw_engine, [statement])
    with raw_engine.connect() as connection:
        remaining = connection.execute(text(f"SELECT count(*) FROM {table}")).scalar()
    assert isinstance(remaining, int)
    assert remaining > 0


def test_checkpoints_are_c2sp_signed_notes(database: Database, signer: NoteSigner) -> None:
    append_each(database, 5)
    with database.transaction() as session:
        note = log.signed_checkpoint(session=session, signer=signer, origin=ORIGIN)
    text_, _, signature_line = note.partition("\n\n")
    origin, size, _root_b64 = text_.split("\n")
    assert (origin, size) == (ORIGIN, "5")
    assert signature_line.startswith(f"\u2014 {ORIGIN} ")
    assert signature_line.endswith("\n")
    import base64
    import hashlib

    blob = base64.b64decode(signature_line.split(" ")[2])
    public = signer.verifier.public_key
    assert blob[:4] == hashlib.sha256(ORIGIN.encode() + b"\n\x01" + public).digest()[:4]
    assert blob[:4] == key_id(ORIGIN, public)
    assert len(blob) == 4 + 64
    checkpoint = parse_checkpoint(open_note(note, signer.verifier))
    with database.session() as session:
        assert checkpoint.root == log.root(session=session, size=5)
    assert VerifierKey.parse(str(signer.verifier)) == signer.verifier
    # No growth: the same stored checkpoint comes back; growth: a new, consistent one.
    with database.transaction() as session:
        assert log.signed_checkpoint(session=session, signer=signer, origin=ORIGIN) == note
    append_each(database, 4)
    with database.transaction() as session:
        newer = parse_checkpoint(
            open_note(
                log.signed_checkpoint(session=session, signer=signer, origin=ORIGIN),
                signer.verifier,
            )
        )
        merkle.verify_consistency(
            first=5,
            second=9,
            first_root=checkpoint.root,
            second_root=newer.root,
            proof=log.consistency_proof(session=session, first=5, second=9),
        )


def test_a_tree_signed_under_an_earlier_key_is_signed_again_by_the_current_one(
    database: Database, signer: NoteSigner
) -> None:
    append_each(database, 3)
    with database.transaction() as session:
        old_note = log.signed_checkpoint(session=session, signer=signer, origin=ORIGIN)
    successor = NoteSigner(name=ORIGIN, seed=os.urandom(32))
    with database.transaction() as session:
        note = log.signed_checkpoint(session=session, signer=successor, origin=ORIGIN)
    assert parse_checkpoint(open_note(note, successor.verifier)) == parse_checkpoint(
        open_note(old_note, signer.verifier)
    )
    with database.session() as session:
        [stored] = session.execute(text("SELECT note FROM access_log_checkpoints")).scalars()
    assert stored == old_note


def test_a_key_that_handed_signing_over_signs_no_more(
    database: Database, signer: NoteSigner
) -> None:
    """A worker whose keyring has not followed a handover (it cannot read the file since) would
    sign checkpoints auditors following the handovers must reject: refused, 503, not ready."""
    append_each(database, 3)
    with database.transaction() as session:
        log.signed_checkpoint(session=session, signer=signer, origin=ORIGIN)
    successor = NoteSigner(name=ORIGIN, seed=os.urandom(32))
    with database.transaction() as session:
        hand_over(
            session=session, old=signer, new=successor, origin=ORIGIN, version=2, actor="system:t"
        )
    for grown in (False, True):
        if grown:
            append_each(database, 1)
        with database.transaction() as session, pytest.raises(log.SignerOutdated) as error:
            log.signed_checkpoint(session=session, signer=signer, origin=ORIGIN)
        assert error.value.status == 503
        assert "handed signing over at size 4" in error.value.detail
    with database.session() as session:
        assert "handed signing over" in log.check_readiness(session=session, signer=signer)
        assert log.check_readiness(session=session, signer=successor) == "ok"
    with database.transaction() as session:
        note = log.signed_checkpoint(session=session, signer=successor, origin=ORIGIN)
    assert parse_checkpoint(open_note(note, successor.verifier)).size == 5
    # Once the new key has signed a later checkpoint too: the old one signed a handover.
    append_each(database, 1)
    with database.transaction() as session, pytest.raises(log.SignerOutdated) as error:
        log.signed_checkpoint(session=session, signer=signer, origin=ORIGIN)
    assert "handed signing over at size 4" in error.value.detail
    with database.session() as session:
        assert "handed signing over" in log.check_readiness(session=session, signer=signer)


def signing_key_rotation(version: int, reason: str) -> log.LogEntry:
    """A rotation entry of the log signing key, as ``keys rotate`` writes one."""
    return log.LogEntry(
        actor="system:keys",
        role="system",
        action=HANDOVER_ACTION,
        object_type="key",
        object_id=f"{HANDOVER_OBJECT_PREFIX}v{version}",
        reason=reason,
    )


def test_a_tree_ending_with_a_signing_key_rotation_is_signed_only_as_a_handover(
    database: Database, signer: NoteSigner
) -> None:
    """Otherwise rows written past the service (a rotation naming someone's own key) would get
    the genuine key's signature, which that key could then cosign into a handover to itself."""
    append_each(database, 3)
    with database.transaction() as session:
        log.signed_checkpoint(session=session, signer=signer, origin=ORIGIN)
    intruder = NoteSigner(name=ORIGIN, seed=os.urandom(32))
    with database.transaction() as session:
        log.append(
            session=session,
            entry=signing_key_rotation(9, f"{log.HANDOVER_REASON}{intruder.verifier}"),
        )
    with database.transaction() as session, pytest.raises(log.LogCorrupted) as error:
        log.signed_checkpoint(session=session, signer=signer, origin=ORIGIN)
    assert "entry 3 hands checkpoint signing over" in error.value.detail
    # A rotation logged before handovers existed names no key: any tree may end with it.
    with database.transaction() as session:
        log.append(session=session, entry=signing_key_rotation(2, "new current version"))
        note = log.signed_checkpoint(session=session, signer=signer, origin=ORIGIN)
    assert parse_checkpoint(open_note(note, signer.verifier)).size == 5
    append_each(database, 1)  # the service's own entry after it: signed as any other tree
    with database.transaction() as session:
        note = log.signed_checkpoint(session=session, signer=signer, origin=ORIGIN)
    assert parse_checkpoint(open_note(note, signer.verifier)).size == 6


def test_a_log_keeps_its_origin_for_life(database: Database, signer: NoteSigner) -> None:
    """A checkpoint under another origin would not verify against the ones auditors hold: the
    service refuses to sign one, says which origin to set, and reports it as not ready."""
    append_each(database, 3)
    with database.transaction() as session:
        log.signed_checkpoint(session=session, signer=signer, origin=ORIGIN)
    renamed = NoteSigner(name="casepackets/4f2a9c1d7e", seed=os.urandom(32))
    for grown in (False, True):
        if grown:
            append_each(database, 2)
        with database.transaction() as session, pytest.raises(log.OriginChanged) as refused:
            log.signed_checkpoint(session=session, signer=renamed, origin=renamed.name)
        assert refused.value.status == 503
        assert f"set CASEPACKETS_CHECKPOINT_ORIGIN back to '{ORIGIN}'" in refused.value.detail
    with database.session() as session:
        assert "signed as 'casepackets/test'" in log.check_readiness(
            session=session, signer=renamed
        )
        assert log.check_readiness(session=session, signer=signer) == "ok"
    with database.transaction() as session:
        note = log.signed_checkpoint(session=session, signer=signer, origin=ORIGIN)
    assert parse_checkpoint(open_note(note, signer.verifier)).size == 5


def test_only_a_lock_wait_reads_as_a_busy_log(tmp_path: Path) -> None:
    """A database without the log's tables is a failure to report, not "busy, try again"."""
    engine = make_engine(f"sqlite:///{tmp_path / 'unmigrated.db'}")
    try:
        with Session(engine) as session, pytest.raises(OperationalError, match="no such table"):
            log.append(session=session, entry=entry(1))
    finally:
        engine.dispose()


def test_a_proof_that_needs_a_missing_subtree_is_refused(
    database: Database, raw_engine: Engine, backend: str
) -> None:
    append_each(database, 8)
    with database.session() as session:
        # The proof of leaf 7 in a tree of 8 uses the hashes of leaf 6, leaves 4-5 and leaves 0-3.
        assert len(log.inclusion_proof(session=session, index=7, size=8)) == 3
    run_sql(
        raw_engine,
        without_triggers_sql(
            backend,
            "access_log_subtrees",
            ["DELETE FROM access_log_subtrees WHERE level = 2 AND position = 0"],
        ),
    )
    with (
        database.session() as session,
        pytest.raises(log.LogCorrupted, match="missing 1 subtree hashes"),
    ):
        log.inclusion_proof(session=session, index=7, size=8)


def test_the_service_refuses_to_sign_over_a_rewritten_tree(
    database: Database, raw_engine: Engine, signer: NoteSigner, backend: str
) -> None:
    append_each(database, 6)
    with database.transaction() as session:
        log.signed_checkpoint(session=session, signer=signer, origin=ORIGIN)
    append_each(database, 2)
    run_sql(
        raw_engine,
        without_triggers_sql(
            backend,
            "access_log_subtrees",
            ["UPDATE access_log_subtrees SET hash = :forged WHERE level = 2 AND position = 0"],
        ),
        {"forged": b"\x07" * 32},
    )
    with database.session() as session, pytest.raises(log.LogCorrupted):
        log.signed_checkpoint(session=session, signer=signer, origin=ORIGIN)
    with raw_engine.connect() as connection:
        assert (
            connection.execute(text("SELECT max(tree_size) FROM access_log_checkpoints")).scalar()
            == 6
        )


def test_out_of_range_proofs_are_bad_requests(database: Database) -> None:
    append_each(database, 4)
    with database.session() as session:
        with pytest.raises(BadRequest):
            log.inclusion_proof(session=session, index=4, size=4)
        with pytest.raises(BadRequest):
            log.inclusion_proof(session=session, index=0, size=5)
        with pytest.raises(BadRequest):
            log.consistency_proof(session=session, first=3, second=2)
        with pytest.raises(BadRequest):
            log.entry_range(session=session, start=2, end=2)
        with pytest.raises(BadRequest):
            log.entry_range(session=session, start=0, end=5)


def test_the_service_refuses_to_sign_a_new_root_the_old_one_does_not_lead_to(
    database: Database, raw_engine: Engine, signer: NoteSigner, backend: str
) -> None:
    """Leaves 0-7 as one forged subtree: the root signed at size 6 is still recomputable (it
    does not use that subtree), but no consistency proof leads from it to the forged root."""
    append_each(database, 6)
    with database.transaction() as session:
        log.signed_checkpoint(session=session, signer=signer, origin=ORIGIN)
    append_each(database, 2)
    run_sql(
        raw_engine,
        without_triggers_sql(
            backend,
            "access_log_subtrees",
            ["UPDATE access_log_subtrees SET hash = :forged WHERE level = 3 AND position = 0"],
        ),
        {"forged": b"\x07" * 32},
    )
    with (
        database.session() as session,
        pytest.raises(log.LogCorrupted, match="refusing to sign an inconsistent checkpoint"),
    ):
        log.signed_checkpoint(session=session, signer=signer, origin=ORIGIN)
    with raw_engine.connect() as connection:
        assert (
            connection.execute(text("SELECT max(tree_size) FROM access_log_checkpoints")).scalar()
            == 6
        )


def test_a_rewritten_tree_is_refused_even_without_a_new_entry(
    database: Database, raw_engine: Engine, signer: NoteSigner, backend: str
) -> None:
    """No growth since the last checkpoint: the stored note is handed out again only while the
    tree still has the root it signed."""
    append_each(database, 6)
    with database.transaction() as session:
        log.signed_checkpoint(session=session, signer=signer, origin=ORIGIN)
    run_sql(
        raw_engine,
        without_triggers_sql(
            backend,
            "access_log_subtrees",
            ["UPDATE access_log_subtrees SET hash = :forged WHERE level = 2 AND position = 0"],
        ),
        {"forged": b"\x07" * 32},
    )
    with (
        database.session() as session,
        pytest.raises(log.LogCorrupted, match="no longer has the root signed at size 6"),
    ):
        log.signed_checkpoint(session=session, signer=signer, origin=ORIGIN)


def test_a_stored_checkpoint_whose_note_disagrees_with_its_row_is_refused(
    database: Database, raw_engine: Engine, signer: NoteSigner
) -> None:
    """A row inserted past the service (inserts are not refused by the triggers) whose root
    column is the tree's but whose note, signed by the key, says another root: never served."""
    append_each(database, 3)
    with database.transaction() as session:
        root = log.root(session=session, size=3)
    forged_note = signer.sign(checkpoint_text(Checkpoint(origin=ORIGIN, size=3, root=b"\x07" * 32)))
    run_sql(
        raw_engine,
        [
            "INSERT INTO access_log_checkpoints (tree_size, root_hash, note, created_at) "
            "VALUES (3, :root, :note, :created_at)"
        ],
        {"root": root, "note": forged_note, "created_at": datetime.now(UTC)},
    )
    with (
        database.session() as session,
        pytest.raises(log.LogCorrupted, match="does not match its own note"),
    ):
        log.signed_checkpoint(session=session, signer=signer, origin=ORIGIN)


def test_a_staged_key_counts_as_rotated_only_by_its_own_rotation_entry(
    database: Database,
) -> None:
    """The entry at the staged version's leaf index must be the rotation of that purpose and
    version: any other entry there (another key's rotation included) means it never committed."""
    with database.transaction() as session:
        log.append(
            session=session,
            entry=log.LogEntry(
                actor="system:keys",
                role="system",
                action="keys.rotate",
                object_type="key",
                object_id="vault/v2",
                reason="new current version",
            ),
        )
        log.append(session=session, entry=entry(1))
    with database.session() as session:
        assert log.rotation_committed(session=session, staged=Staged("vault", 2, 0))
        for staged in (
            Staged("log_signing", 2, 0),  # another purpose's rotation at that index
            Staged("vault", 3, 0),  # another version's
            Staged("vault", 2, 1),  # not a rotation at all
            Staged("vault", 2, 2),  # nothing there yet
        ):
            assert not log.rotation_committed(session=session, staged=staged), staged


def test_an_entry_range_is_limited_per_request(database: Database) -> None:
    """The limit itself, not the log's size, refuses the range one entry too long."""
    limit = log.MAX_ENTRIES_PER_REQUEST
    with database.transaction() as session:
        log.append_many(session=session, entries=[entry(n) for n in range(limit + 1)])
    with database.session() as session:
        assert log.entry_range(session=session, start=0, end=limit) == (0, limit)
        assert log.entry_range(session=session, start=1, end=limit + 1) == (1, limit + 1)
        with pytest.raises(BadRequest, match=f"at most {limit} entries per request"):
            log.entry_range(session=session, start=0, end=limit + 1)


def test_an_append_over_a_missing_peak_is_refused_as_corruption(
    database: Database, raw_engine: Engine, backend: str
) -> None:
    append_each(database, 6)  # peaks: leaves 0-3 and 4-5
    run_sql(
        raw_engine,
        without_triggers_sql(
            backend,
            "access_log_subtrees",
            ["DELETE FROM access_log_subtrees WHERE level = 1 AND position = 2"],
        ),
    )
    with (
        database.transaction() as session,
        pytest.raises(log.LogCorrupted, match="missing 1 peaks"),
    ):
        log.append(session=session, entry=entry(6))
    with database.session() as session:
        assert log.tree_size(session=session) == 6


def test_a_cosigned_checkpoint_needs_an_entry_no_checkpoint_covers(
    database: Database, signer: NoteSigner
) -> None:
    """A handover's cosignature goes on a new checkpoint only: never silently dropped by
    handing back the stored one."""
    append_each(database, 3)
    with database.transaction() as session:
        log.signed_checkpoint(session=session, signer=signer, origin=ORIGIN)
    successor = NoteSigner(name=ORIGIN, seed=os.urandom(32))
    with (
        database.transaction() as session,
        pytest.raises(ValueError, match="needs an entry no checkpoint covers yet"),
    ):
        log.signed_checkpoint(session=session, signer=signer, origin=ORIGIN, cosigner=successor)


def test_only_cosigned_checkpoints_ending_with_a_handover_are_handovers(
    database: Database, raw_engine: Engine, signer: NoteSigner
) -> None:
    """A stored checkpoint with a second signature (a row inserted past the service) is not
    served as a handover unless its last entry hands signing over."""
    append_each(database, 3)
    witness = NoteSigner(name="witness/example", seed=os.urandom(32))
    with database.session() as session:
        root = log.root(session=session, size=3)
    cosigned = witness.cosign(
        signer.sign(checkpoint_text(Checkpoint(origin=ORIGIN, size=3, root=root)))
    )
    run_sql(
        raw_engine,
        [
            "INSERT INTO access_log_checkpoints (tree_size, root_hash, note, created_at) "
            "VALUES (3, :root, :note, :created_at)"
        ],
        {"root": root, "note": cosigned, "created_at": datetime.now(UTC)},
    )
    with database.session() as session:
        assert log.cosigned_checkpoint_notes(session=session, up_to=3) == {3: cosigned}
        assert handover_notes(session=session, up_to=3) == {}


def test_a_batch_is_stamped_under_the_log_s_lock(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read before the lock, the clock could stamp a batch earlier than one that got the lock
    first: time would go backwards along the log."""
    calls: list[str] = []
    lock_frontier, clock = log._lock_frontier, log.clock

    def locking(session: Session) -> object:
        calls.append("lock")
        return lock_frontier(session)

    def stamping() -> datetime:
        calls.append("clock")
        return clock()

    monkeypatch.setattr(log, "_lock_frontier", locking)
    monkeypatch.setattr(log, "clock", stamping)
    with database.transaction() as session:
        log.append_many(session=session, entries=[entry(0), entry(1)])
    assert calls == ["lock", "clock"]
