"""The single append path of the access log, its tree reads and its signed checkpoints.

Invariants:
- ``append`` writes in the caller's transaction (flush only), so an action and its log entry
  commit or roll back together;
- appends are serialized — ``pg_advisory_xact_lock`` on PostgreSQL, the engine's
  ``BEGIN IMMEDIATE`` on SQLite — so concurrent workers and processes produce one gap-free
  sequence; the wait is bounded by the engine's ``LOG_LOCK_TIMEOUT_OPTION`` (every engine from
  ``service.db.make_engine`` carries settings.log_lock_timeout_seconds) and past it
  ``LogUnavailable`` (503) is raised with nothing written;
- ``append`` is ``append_many`` of one: a batch reads the tree's O(log n) peaks once and writes
  its entries and the subtrees they complete (amortized O(1) each): on PostgreSQL two
  statements, lock-and-read then write; roots and proofs read O(log n) complete-subtree rows;
- ``signed_checkpoint`` never signs a tree that is inconsistent with the latest checkpoint it
  stored: the stored root must be recomputable from the tree and a consistency proof to the new
  size must verify before anything is signed.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from sqlalchemy import Connection, func, insert, select
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from service.access_log import merkle
from service.access_log.checkpoint import (
    Checkpoint,
    checkpoint_text,
    parse_checkpoint,
    unverified_checkpoint,
)
from service.access_log.models import AccessLogCheckpoint, AccessLogEntry, AccessLogSubtree
from service.auth.dependencies import Caller
from service.crypto.keyring import Key, KeyProvider, Purpose, Staged
from service.crypto.signing import (
    SIGNATURE_PREFIX,
    NoteError,
    NoteSigner,
    VerifierKey,
    last_signer_key_id,
    open_note,
)
from service.db import LOG_LOCK_TIMEOUT_OPTION, lock_timeout_ms
from service.errors import BadRequest, ServiceError

Outcome = Literal["allowed", "denied", "error"]
# How the reason of the entry that hands checkpoint signing to a new key begins (``handover``).
HANDOVER_REASON = "checkpoints are signed from now on by "

# pg_advisory_xact_lock key of the log: the ASCII of "cp-alog" as an integer, fixed forever.
LOG_LOCK_KEY = 0x63702D616C6F67
DEFAULT_LOCK_TIMEOUT_SECONDS = 2.0
MAX_ENTRIES_PER_REQUEST = 10_000

_entries = AccessLogEntry.__table__  # type: ignore[attr-defined]
_subtrees = AccessLogSubtree.__table__  # type: ignore[attr-defined]
_checkpoints = AccessLogCheckpoint.__table__  # type: ignore[attr-defined]


class LogUnavailable(ServiceError):
    """The access log could not be written within the bound; nothing happened."""

    status = 503
    title = "Access log unavailable"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Retry-After": "1"})


class LogCorrupted(ServiceError):
    """The stored tree no longer matches a checkpoint the service signed: refuse to go on."""

    status = 500
    title = "Access log integrity failure"


class SignerOutdated(ServiceError):
    """The signing key this process holds is not the one the log hands signing to (its keyring
    is out of date or cannot be read): refuse to sign rather than sign a checkpoint no auditor
    following the handovers can verify."""

    status = 503
    title = "Log signing key out of date"


class OriginChanged(ServiceError):
    """The configured origin is not the one the log's checkpoints carry: refuse to sign."""

    status = 503
    title = "Access log origin changed"


@dataclass(frozen=True)
class LogEntry:
    actor: str
    role: str
    action: str
    object_type: str
    object_id: str
    outcome: Outcome = "allowed"
    pseudonyms: tuple[str, ...] = ()
    reason: str | None = None
    request_id: str | None = None

    @classmethod
    def by(
        cls,
        caller: Caller,
        *,
        action: str,
        object_type: str,
        object_id: str,
        outcome: Outcome = "allowed",
        pseudonyms: Sequence[str] = (),
        reason: str | None = None,
    ) -> LogEntry:
        return cls(
            actor=caller.sub,
            role=caller.role,
            action=action,
            object_type=object_type,
            object_id=object_id,
            outcome=outcome,
            pseudonyms=tuple(pseudonyms),
            reason=reason,
            request_id=caller.request_id,
        )

    def canonical_bytes(self, *, time: datetime) -> bytes:
        """UTF-8 JSON with sorted keys and no insignificant whitespace (the leaf's data)."""
        document = {
            "time": time.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "actor": self.actor,
            "role": self.role,
            "action": self.action,
            "object_type": self.object_type,
            "object_id": self.object_id,
            "pseudonyms": list(self.pseudonyms),
            "outcome": self.outcome,
            "reason": self.reason,
            "request_id": self.request_id,
        }
        return json.dumps(
            document, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")


def clock() -> datetime:
    """The log's clock (entries are stamped with it under the lock)."""
    return datetime.now(UTC)


# PostgreSQL, one round trip: bound the wait, take the advisory lock, restore the caller's lock
# timeout, then read the frontier with a fresh snapshot (a VOLATILE function created by migration
# 0002, so the read sees every append committed before the lock was granted).
_PG_LOCK_FRONTIER = "SELECT * FROM access_log_lock_frontier(%(key)s, %(timeout)s)"

# SQLite (already locked by BEGIN IMMEDIATE): the same frontier read, a row (-1, size) then one
# row (level, position, hash) per peak, each found by a primary-key probe.
_SQLITE_FRONTIER = (
    "WITH RECURSIVE "
    "tree(size) AS (SELECT coalesce(max(position) + 1, 0) FROM access_log_subtrees "
    "WHERE level = 0), "
    "levels(level) AS (SELECT 0 UNION ALL SELECT level + 1 FROM levels WHERE level < 62) "
    "SELECT -1, tree.size, NULL FROM tree "
    "UNION ALL "
    "SELECT s.level, s.position, s.hash FROM tree, levels, access_log_subtrees s "
    "WHERE (tree.size >> levels.level) & 1 = 1 "
    "AND s.level = levels.level AND s.position = (tree.size >> levels.level) - 1"
)

# PostgreSQL: the entry rows and the completed subtree rows in one statement, constant text
# whatever the batch size (so psycopg prepares it once).
_PG_WRITE = (
    "WITH written AS (INSERT INTO access_log_entries (leaf_index, leaf_hash, entry) "
    "SELECT * FROM unnest(%(indexes)s::bigint[], %(leaves)s::bytea[], %(entries)s::bytea[])) "
    "INSERT INTO access_log_subtrees (level, position, hash) "
    "SELECT * FROM unnest(%(levels)s::int[], %(positions)s::bigint[], %(hashes)s::bytea[])"
)
_SQLITE_WRITE_ENTRIES = (
    "INSERT INTO access_log_entries (leaf_index, leaf_hash, entry) VALUES (?, ?, ?)"
)
_SQLITE_WRITE_SUBTREES = "INSERT INTO access_log_subtrees (level, position, hash) VALUES (?, ?, ?)"


@dataclass(frozen=True)
class _Frontier:
    connection: Connection
    size: int
    peak_hashes: list[bytes]  # of merkle.peaks(size), largest first


def _waited_too_long(exc: OperationalError) -> bool:
    """A bounded wait that ran out ("try again"), not another failure such as a missing table.
    On PostgreSQL every operational error (lock timeout, server gone) is one to retry."""
    if isinstance(exc.orig, sqlite3.OperationalError):
        message = str(exc.orig)
        return "locked" in message or "busy" in message
    return True


def hold_lock(session: Session) -> None:
    """Take the log's write lock for the rest of the transaction (waiting at most the bound): a
    rotation of the log signing key has then either committed, with the keyring written, or
    waits for this transaction."""
    _lock_frontier(session)


def _lock_frontier(session: Session) -> _Frontier:
    """Take the log's write lock for the rest of the transaction, waiting at most the bound, and
    read the tree size and its peaks under it.

    PostgreSQL: ``pg_advisory_xact_lock`` under ``lock_timeout`` from the engine's
    ``LOG_LOCK_TIMEOUT_OPTION`` (settings.log_lock_timeout_seconds, see ``service.db``), read in
    the same round trip. SQLite: the engine begins every transaction ``BEGIN IMMEDIATE`` under the
    busy timeout set from the same setting, so holding the session's connection is holding the
    lock.
    """
    try:
        connection = session.connection()
        if connection.dialect.name == "postgresql":
            seconds = connection.get_execution_options().get(
                LOG_LOCK_TIMEOUT_OPTION, DEFAULT_LOCK_TIMEOUT_SECONDS
            )
            rows = connection.exec_driver_sql(
                _PG_LOCK_FRONTIER,
                {"key": LOG_LOCK_KEY, "timeout": f"{lock_timeout_ms(seconds)}ms"},
            ).all()
        else:
            rows = connection.exec_driver_sql(_SQLITE_FRONTIER).all()
    except OperationalError as exc:
        if not _waited_too_long(exc):
            raise
        raise LogUnavailable(
            "the access log is busy; the request was not carried out, try again"
        ) from None
    size = 0
    found: dict[merkle.Subtree, bytes] = {}
    for level, position, hash_ in rows:
        if level == -1:
            size = int(position)
        else:
            found[merkle.Subtree(int(level), int(position))] = bytes(hash_)
    wanted = merkle.peaks(size)
    if found.keys() != set(wanted):
        raise LogCorrupted(f"the access log is missing {len(set(wanted) - found.keys())} peaks")
    return _Frontier(connection, size, [found[s] for s in wanted])


def _write(
    connection: Connection,
    entries: Sequence[tuple[int, bytes, bytes]],
    subtrees: Sequence[tuple[merkle.Subtree, bytes]],
) -> None:
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(
            _PG_WRITE,
            {
                "indexes": [index for index, _, _ in entries],
                "leaves": [leaf for _, leaf, _ in entries],
                "entries": [data for _, _, data in entries],
                "levels": [s.level for s, _ in subtrees],
                "positions": [s.index for s, _ in subtrees],
                "hashes": [hash_ for _, hash_ in subtrees],
            },
        )
    else:
        connection.exec_driver_sql(_SQLITE_WRITE_ENTRIES, list(entries))
        connection.exec_driver_sql(
            _SQLITE_WRITE_SUBTREES, [(s.level, s.index, hash_) for s, hash_ in subtrees]
        )


# The subtrees a root or proof needs, each found by a primary-key probe, in one statement whose
# text does not depend on how many are wanted: (level, position) pairs go in as two arrays
# (PostgreSQL) or one JSON array (SQLite, where CROSS JOIN keeps the pairs as the outer loop).
_PG_SUBTREES = (
    "SELECT s.level, s.position, s.hash "
    "FROM unnest(%(levels)s::int[], %(positions)s::bigint[]) AS wanted(level, position) "
    "JOIN access_log_subtrees s ON s.level = wanted.level AND s.position = wanted.position"
)
_SQLITE_SUBTREES = (
    "SELECT s.level, s.position, s.hash FROM json_each(?) AS wanted "
    "CROSS JOIN access_log_subtrees s ON s.level = json_extract(wanted.value, '$[0]') "
    "AND s.position = json_extract(wanted.value, '$[1]')"
)
_TREE_SIZE = select(func.max(_subtrees.c.position)).where(_subtrees.c.level == 0)


def _lookup(session: Session) -> merkle.SubtreeLookup:
    def lookup(wanted: set[merkle.Subtree]) -> Mapping[merkle.Subtree, bytes]:
        if not wanted:
            return {}
        connection = session.connection()
        pairs = [(s.level, s.index) for s in wanted]
        if connection.dialect.name == "postgresql":
            levels, positions = zip(*pairs, strict=True)
            result = connection.exec_driver_sql(
                _PG_SUBTREES, {"levels": list(levels), "positions": list(positions)}
            )
        else:
            result = connection.exec_driver_sql(_SQLITE_SUBTREES, (json.dumps(pairs),))
        found = {
            merkle.Subtree(int(level), int(position)): bytes(hash_)
            for level, position, hash_ in result
        }
        missing = wanted - found.keys()
        if missing:
            raise LogCorrupted(f"the access log is missing {len(missing)} subtree hashes")
        return found

    return lookup


def tree_size(*, session: Session) -> int:
    """The number of leaves, read from the tree itself (one primary-key lookup)."""
    last = session.execute(_TREE_SIZE).scalar()
    return 0 if last is None else int(last) + 1


def append_many(*, session: Session, entries: Sequence[LogEntry]) -> list[int]:
    """Append ``entries`` in order in the caller's transaction (serialized, bounded wait →
    ``LogUnavailable``); returns their consecutive leaf indexes.

    One lock with one read of the tree's frontier, then one batched write of the entry rows and
    every subtree they complete (hashed here from the frontier): two statements on PostgreSQL
    for any batch size. The batch is stamped once, under the lock, so time never goes backwards
    along the log on one clock.
    """
    if not entries:
        return []
    frontier = _lock_frontier(session)
    now = clock()
    rows = []
    for index, entry in enumerate(entries, start=frontier.size):
        data = entry.canonical_bytes(time=now)
        rows.append((index, merkle.leaf_hash(data), data))
    completed = merkle.extend(frontier.size, frontier.peak_hashes, [leaf for _, leaf, _ in rows])
    _write(frontier.connection, rows, completed)
    return list(range(frontier.size, frontier.size + len(rows)))


def append(*, session: Session, entry: LogEntry) -> int:
    """Append in the caller's transaction (serialized, bounded wait → ``LogUnavailable``).

    Returns the leaf index; ``append_many`` of one entry.
    """
    return append_many(session=session, entries=(entry,))[0]


def rotation_committed(*, session: Session, staged: Staged) -> bool:
    """Whether the log holds the rotation entry that makes ``staged`` current: the entry at its
    leaf index is a ``keys.rotate`` naming that very version (one primary-key read). Another
    entry there, or none, means the rotation never committed."""
    data = session.execute(
        select(_entries.c.entry).where(_entries.c.leaf_index == staged.leaf_index)
    ).scalar()
    if data is None:
        return False
    try:
        entry = json.loads(bytes(data))
    except ValueError:
        return False
    return (
        isinstance(entry, dict)
        and entry.get("action") == "keys.rotate"
        and entry.get("object_id") == staged.object_id
    )


def latest_checkpoint_opens(*, session: Session, verifiers: Sequence[VerifierKey]) -> bool | None:
    """Whether any of ``verifiers`` signed the latest stored checkpoint; None when none is
    stored. Tells a log from another one (a key command pointed at the wrong database)."""
    latest = _latest_checkpoint(session)
    if latest is None:
        return None
    return any(_opens(latest.note, verifier) for verifier in verifiers)


def logged_current_key(*, session: Session, keyring: KeyProvider, purpose: Purpose) -> Key:
    """The version of ``purpose`` in use: the keyring's current one, or its staged one once the
    rotation entry that names it has committed (the rotation promotes it just after; if it was
    killed first, this is how every worker still moves on together). Under the log's lock the
    answer cannot change until the lock is released."""
    staged = keyring.staged(purpose)
    if staged is not None and rotation_committed(session=session, staged=staged):
        return keyring.get(purpose, staged.version)
    return keyring.current(purpose)


def root(*, session: Session, size: int) -> bytes:
    return merkle.tree_root(size, _lookup(session))


def _check_size(size: int, current: int, what: str) -> None:
    if size > current:
        raise BadRequest(f"{what} {size} is beyond the log's size {current}")


def inclusion_proof(*, session: Session, index: int, size: int) -> list[bytes]:
    _check_size(size, tree_size(session=session), "tree_size")
    if not 0 <= index < size:
        raise BadRequest(f"index {index} is outside a tree of size {size}")
    return merkle.inclusion_proof(index, size, _lookup(session))


def consistency_proof(*, session: Session, first: int, second: int) -> list[bytes]:
    _check_size(second, tree_size(session=session), "second")
    if not 0 <= first <= second:
        raise BadRequest(f"first ({first}) must not exceed second ({second})")
    return merkle.consistency_proof(first, second, _lookup(session))


def entry_range(*, session: Session, start: int, end: int) -> tuple[int, int]:
    """Check an auditor's ``[start, end)`` against the committed log and the per-request limit."""
    size = tree_size(session=session)
    if not 0 <= start < end:
        raise BadRequest(f"the range [{start}, {end}) is empty or negative")
    _check_size(end, size, "end")
    if end - start > MAX_ENTRIES_PER_REQUEST:
        raise BadRequest(f"at most {MAX_ENTRIES_PER_REQUEST} entries per request")
    return start, end


def iter_entries(*, session: Session, start: int, end: int, chunk: int = 1000) -> Iterator[bytes]:
    """The entry bytes of ``[start, end)`` in order, read ``chunk`` rows at a time."""
    for chunk_start in range(start, end, chunk):
        rows = session.execute(
            select(_entries.c.entry)
            .where(_entries.c.leaf_index >= chunk_start)
            .where(_entries.c.leaf_index < min(end, chunk_start + chunk))
            .order_by(_entries.c.leaf_index)
        ).scalars()
        for data in rows:
            yield bytes(data)


def stream_entries(
    *,
    open_session: Callable[[], AbstractContextManager[Session]],
    start: int,
    end: int,
    chunk: int = 1000,
) -> Iterator[list[bytes]]:
    """``[start, end)`` in chunks, each read in its own short session (constant memory, and no
    lock is held between chunks)."""
    for chunk_start in range(start, end, chunk):
        with open_session() as session:
            read = list(
                iter_entries(session=session, start=chunk_start, end=min(end, chunk_start + chunk))
            )
        yield read  # sent to a client that may be slow: no transaction stays open meanwhile


def iter_leaf_hashes(
    *, session: Session, start: int, end: int, chunk: int = 10_000
) -> Iterator[bytes]:
    """The tree's own level-0 hashes for ``[start, end)`` (independent of the entries table)."""
    for chunk_start in range(start, end, chunk):
        rows = session.execute(
            select(_subtrees.c.hash)
            .where(_subtrees.c.level == 0)
            .where(_subtrees.c.position >= chunk_start)
            .where(_subtrees.c.position < min(end, chunk_start + chunk))
            .order_by(_subtrees.c.position)
        ).scalars()
        for hash_ in rows:
            yield bytes(hash_)


@dataclass(frozen=True)
class StoredCheckpoint:
    tree_size: int
    root_hash: bytes
    note: str


def _latest_checkpoint(session: Session) -> StoredCheckpoint | None:
    row = session.execute(
        select(_checkpoints.c.tree_size, _checkpoints.c.root_hash, _checkpoints.c.note)
        .order_by(_checkpoints.c.tree_size.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    return StoredCheckpoint(tree_size=int(row[0]), root_hash=bytes(row[1]), note=str(row[2]))


def cosigned_checkpoint_notes(*, session: Session, up_to: int) -> dict[int, str]:
    """The stored checkpoints over at most ``up_to`` entries that carry more than one signature
    line (a handover's, see ``handover``), by tree size."""
    two_signatures = f"%\n{SIGNATURE_PREFIX}%\n{SIGNATURE_PREFIX}%"
    rows = session.execute(
        select(_checkpoints.c.tree_size, _checkpoints.c.note)
        .where(_checkpoints.c.tree_size <= up_to)
        .where(_checkpoints.c.note.like(two_signatures))
    )
    return {int(size): str(note) for size, note in rows}


def _origin_of(latest: StoredCheckpoint) -> str:
    return unverified_checkpoint(latest.note).origin


def _check_origin(latest: StoredCheckpoint | None, origin: str) -> None:
    """A log keeps one origin for life: auditors hold checkpoints signed under it."""
    if latest is not None and (signed_as := _origin_of(latest)) != origin:
        raise OriginChanged(
            f"the access log's checkpoints are signed as {signed_as!r}, but this service is "
            f"configured as {origin!r}; set CASEPACKETS_CHECKPOINT_ORIGIN back to {signed_as!r}"
        )


def _signed_by(latest: StoredCheckpoint, signer: NoteSigner, *, session: Session) -> bool:
    """Whether ``signer`` signed ``latest``; refuses it (503) when it handed signing over, there
    or at any handover before: a worker whose keyring has not followed (auditors reject whatever
    a key signs after its handover). A key that did not sign ``latest`` and handed nothing over
    is a newer one (a rotation logged before handovers existed, or a database restored from
    before one); only then are the handovers read (one scan of the stored checkpoints)."""
    if _opens(latest.note, signer.verifier):
        if _signed_last(latest.note, signer):
            return True
        handed_over_at = latest.tree_size
    else:
        handovers = cosigned_checkpoint_notes(session=session, up_to=latest.tree_size)
        handed_over = [
            size
            for size, note in sorted(handovers.items())
            if _opens(note, signer.verifier) and not _signed_last(note, signer)
        ]
        if not handed_over:
            return False
        handed_over_at = handed_over[0]
    raise SignerOutdated(
        f"the log signing key held here ({signer.verifier.key_id.hex()}) handed signing over "
        f"at size {handed_over_at}; this worker's keyring is out of date"
    )


def _opens(note: str, verifier: VerifierKey) -> bool:
    try:
        open_note(note, verifier)
    except NoteError:
        return False
    return True


def _signed_last(note: str, signer: NoteSigner) -> bool:
    return last_signer_key_id(note) == signer.verifier.key_id


def _check_against(latest: StoredCheckpoint, *, session: Session, signer: NoteSigner) -> bool:
    """The stored checkpoint is one we signed and the tree still has its root at its size;
    True when ``signer`` (the current key) signed it, False when an earlier key version did
    (see ``_signed_by``)."""
    by_signer = _signed_by(latest, signer, session=session)
    # Signed under an earlier key version: the root column is still bound by the trigger.
    body = (
        parse_checkpoint(open_note(latest.note, signer.verifier))
        if by_signer
        else unverified_checkpoint(latest.note)
    )
    if body.size != latest.tree_size or body.root != latest.root_hash:
        raise LogCorrupted("a stored checkpoint does not match its own note")
    if root(session=session, size=latest.tree_size) != latest.root_hash:
        raise LogCorrupted(
            f"the tree no longer has the root signed at size {latest.tree_size}; refusing to sign"
        )
    return by_signer


def signed_checkpoint(
    *, session: Session, signer: NoteSigner, origin: str, cosigner: NoteSigner | None = None
) -> str:
    """A signed note covering every entry in this transaction's view (stored when new).

    Runs under the log lock so concurrent callers neither race nor sign a fork. A ``cosigner``
    adds its signature to a new checkpoint (a signing key's handover, see ``handover``); there
    must then be entries no checkpoint covers yet.
    """
    frontier = _lock_frontier(session)
    size = frontier.size
    latest = _latest_checkpoint(session)
    _check_origin(latest, origin)
    if latest is not None and latest.tree_size == size:
        if cosigner is not None:
            raise ValueError("a cosigned checkpoint needs an entry no checkpoint covers yet")
        if _check_against(latest, session=session, signer=signer):
            return latest.note
        # Stored under an earlier key (no entry since a rotation): the same tree, signed now by
        # the current key; the stored one stays as it was.
        return signer.sign(
            checkpoint_text(Checkpoint(origin=origin, size=size, root=latest.root_hash))
        )
    # Only a handover signs a tree ending with a rotation of the signing key: the old key's
    # signature over such a tree, cosigned by the key it names, is what tells auditors to trust
    # that key, so an entry written past the service must not get one.
    # Imported here: handover builds on this module. What counts is what audit verify follows.
    from service.access_log.handover import handed_to

    last_entry = b"".join(iter_entries(session=session, start=size - 1, end=size)) if size else b""
    if cosigner is None and handed_to(last_entry) is not None:
        raise LogCorrupted(
            f"entry {size - 1} hands checkpoint signing over, but no handover is being signed; "
            f"refusing to sign a tree ending with it"
        )
    new_root = merkle.fold(frontier.peak_hashes)
    if latest is not None:
        if latest.tree_size > size:
            raise LogCorrupted(
                f"a checkpoint was signed at size {latest.tree_size} but the log has {size} entries"
            )
        _check_against(latest, session=session, signer=signer)
        try:
            merkle.verify_consistency(
                first=latest.tree_size,
                second=size,
                first_root=latest.root_hash,
                second_root=new_root,
                proof=consistency_proof(session=session, first=latest.tree_size, second=size),
            )
        except merkle.ProofError as exc:
            raise LogCorrupted(f"refusing to sign an inconsistent checkpoint: {exc}") from None
    note = signer.sign(checkpoint_text(Checkpoint(origin=origin, size=size, root=new_root)))
    if cosigner is not None:
        note = cosigner.cosign(note)
    session.execute(
        insert(_checkpoints),
        [
            {
                "tree_size": size,
                "root_hash": new_root,
                "note": note,
                "created_at": datetime.now(UTC),
            }
        ],
    )
    return note


def log_audit_read(
    *,
    session: Session,
    caller: Caller,
    object_id: str,
    outcome: Outcome = "allowed",
    reason: str | None = None,
) -> int:
    """Reads of the log are themselves logged, and so are refused ones."""
    return append(
        session=session,
        entry=LogEntry.by(
            caller,
            action="audit.read",
            object_type="audit",
            object_id=object_id,
            outcome=outcome,
            reason=reason,
        ),
    )


def check_readiness(*, session: Session, signer: NoteSigner | None) -> str:
    if signer is None:
        return "no log signing key"
    tree_size(session=session)
    latest = _latest_checkpoint(session)
    try:
        _check_origin(latest, signer.name)
        if latest is not None:
            _signed_by(latest, signer, session=session)
    except (OriginChanged, SignerOutdated) as exc:
        return exc.detail
    return "ok"
