"""The single append path of the access log, its tree reads and its signed checkpoints.

Invariants:
- ``append`` writes in the caller's transaction (flush only), so an action and its log entry
  commit or roll back together;
- appends are serialized — ``pg_advisory_xact_lock`` on PostgreSQL, the engine's
  ``BEGIN IMMEDIATE`` on SQLite — so concurrent workers and processes produce one gap-free
  sequence; the wait is bounded and past it ``LogUnavailable`` (503) is raised with nothing
  written;
- an append reads and writes O(log n) rows (the left siblings it completes, amortized O(1));
  roots and proofs read O(log n) complete-subtree rows;
- ``signed_checkpoint`` never signs a tree that is inconsistent with the latest checkpoint it
  stored: the stored root must be recomputable from the tree and a consistency proof to the new
  size must verify before anything is signed.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from sqlalchemy import Engine, and_, func, insert, or_, select, text
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from service.access_log import merkle
from service.access_log.checkpoint import Checkpoint, checkpoint_text, parse_checkpoint
from service.access_log.models import AccessLogCheckpoint, AccessLogEntry, AccessLogSubtree
from service.auth.dependencies import Caller
from service.crypto.signing import NoteError, NoteSigner, open_note
from service.errors import BadRequest, ServiceError

Outcome = Literal["allowed", "denied", "error"]

# pg_advisory_xact_lock key of the log: the ASCII of "cp-alog" as an integer, fixed forever.
LOG_LOCK_KEY = 0x63702D616C6F67
DEFAULT_LOCK_TIMEOUT_SECONDS = 2.0
MAX_ENTRIES_PER_REQUEST = 10_000

_entries = AccessLogEntry.__table__  # type: ignore[attr-defined]
_subtrees = AccessLogSubtree.__table__  # type: ignore[attr-defined]
_checkpoints = AccessLogCheckpoint.__table__  # type: ignore[attr-defined]
_lock_timeouts: weakref.WeakKeyDictionary[Engine, float] = weakref.WeakKeyDictionary()


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


def use_lock_timeout(engine: Engine, seconds: float) -> None:
    """Bound the wait for the log lock on ``engine`` (settings.log_lock_timeout_seconds).

    On SQLite the engine's busy timeout (set from the same setting) is the bound.
    """
    _lock_timeouts[engine] = seconds


def _lock_log(session: Session) -> None:
    """Take the log's write lock for the rest of the transaction, waiting at most the bound."""
    bind = session.get_bind()
    try:
        if bind.dialect.name == "postgresql":
            engine = bind if isinstance(bind, Engine) else bind.engine
            timeout_ms = max(
                1, int(_lock_timeouts.get(engine, DEFAULT_LOCK_TIMEOUT_SECONDS) * 1000)
            )
            # One round trip: bound the wait, take the lock, then give the caller's later
            # statements back their own lock timeout. The size is read by a later statement,
            # whose snapshot is taken after the lock is held.
            session.execute(
                text(
                    "WITH bounded AS (SELECT current_setting('lock_timeout') AS previous, "
                    "set_config('lock_timeout', :timeout, true)) "
                    "SELECT pg_advisory_xact_lock(:key), "
                    "set_config('lock_timeout', bounded.previous, true) FROM bounded"
                ),
                {"timeout": f"{timeout_ms}ms", "key": LOG_LOCK_KEY},
            )
        else:
            # BEGIN IMMEDIATE (issued by the engine) holds the write lock; this makes sure the
            # transaction has begun, waiting at most the busy timeout.
            session.execute(text("SELECT 1"))
    except OperationalError:
        raise LogUnavailable(
            "the access log is busy; the request was not carried out, try again"
        ) from None


def _lookup(session: Session) -> merkle.SubtreeLookup:
    def lookup(wanted: set[merkle.Subtree]) -> Mapping[merkle.Subtree, bytes]:
        if not wanted:
            return {}
        # One primary-key probe per subtree (SQLite does not use the index for a row-value IN).
        rows = session.execute(
            select(_subtrees.c.level, _subtrees.c.position, _subtrees.c.hash).where(
                or_(
                    *(
                        and_(_subtrees.c.level == s.level, _subtrees.c.position == s.index)
                        for s in sorted(wanted)
                    )
                )
            )
        ).all()
        found = {merkle.Subtree(level, position): bytes(hash_) for level, position, hash_ in rows}
        missing = wanted - found.keys()
        if missing:
            raise LogCorrupted(f"the access log is missing {len(missing)} subtree hashes")
        return found

    return lookup


def tree_size(*, session: Session) -> int:
    """The number of leaves, read from the tree itself (one primary-key lookup)."""
    last = session.execute(
        select(func.max(_subtrees.c.position)).where(_subtrees.c.level == 0)
    ).scalar()
    return 0 if last is None else int(last) + 1


def append(*, session: Session, entry: LogEntry) -> int:
    """Append in the caller's transaction (serialized, bounded wait → ``LogUnavailable``).

    Returns the leaf index. The time is stamped here, under the lock, so it never goes backwards
    along the log on one clock.
    """
    _lock_log(session)
    index = tree_size(session=session)
    data = entry.canonical_bytes(time=datetime.now(UTC))
    leaf = merkle.leaf_hash(data)
    siblings = _lookup(session)(set(merkle.siblings_to_complete(index)))
    session.execute(insert(_entries), [{"leaf_index": index, "leaf_hash": leaf, "entry": data}])
    session.execute(
        insert(_subtrees),
        [
            {"level": s.level, "position": s.index, "hash": h}
            for s, h in merkle.new_subtrees(index, leaf, siblings)
        ],
    )
    return index


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
    *, open_session: Callable[[], Session], start: int, end: int, chunk: int = 1000
) -> Iterator[list[bytes]]:
    """``[start, end)`` in chunks, each read in its own short session (constant memory, and no
    lock is held between chunks)."""
    for chunk_start in range(start, end, chunk):
        with open_session() as session:
            yield list(
                iter_entries(session=session, start=chunk_start, end=min(end, chunk_start + chunk))
            )


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


def _check_against(latest: StoredCheckpoint, *, session: Session, signer: NoteSigner) -> None:
    """The stored checkpoint is one we signed and the tree still has its root at its size."""
    try:
        body = parse_checkpoint(open_note(latest.note, signer.verifier))
    except NoteError:
        # Signed under an earlier key version: the root column is still bound by the trigger.
        body = parse_checkpoint(latest.note.partition("\n\n")[0] + "\n")
    if body.size != latest.tree_size or body.root != latest.root_hash:
        raise LogCorrupted("a stored checkpoint does not match its own note")
    if root(session=session, size=latest.tree_size) != latest.root_hash:
        raise LogCorrupted(
            f"the tree no longer has the root signed at size {latest.tree_size}; refusing to sign"
        )


def signed_checkpoint(*, session: Session, signer: NoteSigner, origin: str) -> str:
    """A signed note covering every entry in this transaction's view (stored when new).

    Runs under the log lock so concurrent callers neither race nor sign a fork.
    """
    _lock_log(session)
    size = tree_size(session=session)
    latest = _latest_checkpoint(session)
    if latest is not None and latest.tree_size == size:
        _check_against(latest, session=session, signer=signer)
        return latest.note
    new_root = root(session=session, size=size)
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


def log_audit_read(*, session: Session, caller: Caller, object_id: str) -> int:
    """Auditors' reads are themselves logged."""
    return append(
        session=session,
        entry=LogEntry.by(caller, action="audit.read", object_type="audit", object_id=object_id),
    )


def check_readiness(*, session: Session, signer: NoteSigner | None) -> str:
    if signer is None:
        return "no log signing key"
    tree_size(session=session)
    session.execute(select(func.count()).select_from(_checkpoints)).scalar()
    return "ok"
