"""Flagging runs over the database, the flags they store, and flags pushed by sources.

Guarantees:
- a run evaluates one committed state of the data, whatever commits while it goes on: every
  subject's history comes from one statement, streamed in batches. On PostgreSQL that statement
  keeps the snapshot it was opened with until its last row is fetched (the run's transaction stays
  READ COMMITTED, as its log append needs); on SQLite the run's transaction holds the database's
  one write lock (``BEGIN IMMEDIATE``), so nothing else commits meanwhile. Its memory is bounded by
  the batch size, not by the number of subjects;
- subjects erased when that state was read are not evaluated (nobody could re-identify them, so
  flagging them would help no one). One erased while the run goes on may still be flagged:
  partitioning leaves it unplaced ("the subject was erased");
- every flag stores the exact policy version and the hits (evidence + sentence) that produced it;
  the policy file of that version is archived by its first run (``flagging_policies``), and a
  run refuses a file whose version is archived with other bytes;
- a run and a push each leave one access-log entry in the same transaction ("flagging.run",
  "flags.push"); a failed log append rolls the whole action back;
- nothing here reads or returns an identity: subjects are handled by id and shown by pseudonym.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from service.access_log.service import LogEntry, append
from service.auth.dependencies import Caller
from service.crypto.keyring import KeyProvider
from service.db import request_purge
from service.errors import Conflict, NotFound, Unprocessable
from service.flagging.models import (
    RUN_ID,
    ArchivedPolicy,
    ArchivedPolicyPublic,
    Flag,
    FlaggingRun,
    FlaggingRunPublic,
    FlagPublic,
    FlagPush,
    PushedFlag,
    RuleHitPublic,
    utcnow,
)
from service.flagging.rules import Evaluator, FlaggingPolicy, SubjectEvent, explain
from service.paging import after_place, cursor
from service.records.models import Event, Subject
from service.records.service import (
    ERASED_DIGEST,
    EXPIRED_DIGEST,
    keyed_digest,
    keyed_digest_matches,
    lock_against_erasure,
    register_erasure_hook,
)
from service.schemas import as_utc

DEFAULT_BATCH_SIZE = 2000
MAX_PAGE = 1000
# Event rows a run fetches at a time from its one streamed statement (a few MB at most).
FETCH_ROWS = 10_000

_subjects = Subject.__table__  # type: ignore[attr-defined]
_events = Event.__table__  # type: ignore[attr-defined]
_flags = Flag.__table__  # type: ignore[attr-defined]
_runs = FlaggingRun.__table__  # type: ignore[attr-defined]
_pushes = FlagPush.__table__  # type: ignore[attr-defined]


class FlaggingRunNotFound(NotFound):
    pass


class FlagsKeyReused(Conflict):
    title = "Idempotency-Key reused"


class PolicyVersionClash(Conflict):
    title = "Policy version already archived with other content"


class PolicyNotArchived(NotFound):
    pass


def system_caller(command: str) -> Caller:
    """The actor of a job outside any request, as it appears in the access log
    ("system:<command>", no request id)."""
    return Caller(
        sub=f"system:{command}",
        roles=frozenset({"system"}),
        permissions=frozenset(),
        request_id=None,
    )


@dataclass(frozen=True)
class RunProgress:
    evaluated: int
    flagged: int


def run_flagging(
    *,
    session: Session,
    policy: FlaggingPolicy,
    as_of: date,
    caller: Caller,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Any = None,
) -> FlaggingRun:
    """Evaluate ``policy`` over every subject not erased, as the data stood when the run began
    reading it (see the module docstring); store one flag per flagged subject.

    ``progress``, when given, is called with a ``RunProgress`` after each batch.
    """
    digest = _archive(session, policy)
    run = FlaggingRun(
        id=uuid.uuid4().hex,
        policy_name=policy.name,
        policy_version=policy.version,
        as_of=as_of,
        started_by=caller.sub,
    )
    session.add(run)
    session.flush()
    evaluator = Evaluator(policy, as_of)
    evaluated = flagged = 0
    for histories in _histories(session.connection(), batch_size=batch_size):
        now = utcnow()
        new_flags: list[dict[str, Any]] = []
        for subject_id, history in histories.items():
            hits = evaluator.evaluate(history)
            if hits:
                new_flags.append(
                    {
                        "run_id": run.id,
                        "subject_id": subject_id,
                        "kind": "algorithm",
                        "policy_version": policy.version,
                        "reason_code": None,
                        "pushed_by": None,
                        "hits": [hit.as_json() for hit in hits],
                        "explanation": explain(hits),
                        "created_at": now,
                    }
                )
        if new_flags:
            session.execute(insert(_flags), new_flags)
        evaluated += len(histories)
        flagged += len(new_flags)
        if progress is not None:
            progress(RunProgress(evaluated=evaluated, flagged=flagged))
    run.evaluated = evaluated
    run.flagged = flagged
    run.finished_at = utcnow()
    session.add(run)
    session.flush()
    append(
        session=session,
        entry=LogEntry.by(
            caller,
            action="flagging.run",
            object_type="flagging_run",
            object_id=run.id,
            # The file's whole hash: the signed log commits to the exact rules, whatever
            # happens to the archive's row.
            reason=f"policy {policy.version} (sha256 {digest}) as of {as_of.isoformat()}: "
            f"{evaluated} evaluated, {flagged} flagged",
        ),
    )
    return run


def _histories(
    connection: Connection, *, batch_size: int
) -> Iterator[dict[int, list[SubjectEvent]]]:
    """The event history of every subject not erased, ``batch_size`` subjects at a time in id
    order, all read by one statement: one snapshot of the data, not one per batch (a batch read
    afresh under READ COMMITTED would see half of an ingest that committed between two batches,
    and subjects created or erased meanwhile as timing had it). The connection may write between
    batches."""
    rows = connection.execute(
        select(_subjects.c.id, _events.c.type, _events.c.date, _events.c.office)
        .select_from(_subjects.outerjoin(_events, _events.c.subject_id == _subjects.c.id))
        .where(_subjects.c.erased_at.is_(None))
        .order_by(_subjects.c.id, _events.c.date)
        .execution_options(yield_per=FETCH_ROWS)
    )
    batch: dict[int, list[SubjectEvent]] = {}
    with rows:
        for subject_id, kind, day, office in rows:
            history = batch.get(subject_id)
            if history is None:
                # Rows come in subject order: every history in the batch is complete.
                if len(batch) == batch_size:
                    yield batch
                    batch = {}
                history = batch[subject_id] = []
            if kind is not None:  # None: a subject without events (the outer join's row)
                history.append((kind, day.toordinal(), office))
    if batch:
        yield batch


def _run_id(text: str) -> str:
    if not RUN_ID.fullmatch(text):
        raise ValueError("not a run id")
    return text


def list_runs(
    *, session: Session, after: str | None = None, limit: int = 100
) -> tuple[list[FlaggingRunPublic], str | None]:
    """Runs, newest first, paged by where the previous page ended (``service.paging``)."""
    limit = max(1, min(limit, MAX_PAGE))
    query = select(FlaggingRun).order_by(_runs.c.created_at.desc(), _runs.c.id)
    if after is not None:
        query = query.where(
            after_place(after, _run_id, created_at=_runs.c.created_at, item_id=_runs.c.id)
        )
    runs = session.execute(query.limit(limit + 1)).scalars().all()
    items = [FlaggingRunPublic.model_validate(run, from_attributes=True) for run in runs[:limit]]
    more = len(runs) > limit
    return items, (cursor(items[-1].created_at, items[-1].id) if more else None)


def get_run(*, session: Session, run_id: str) -> FlaggingRun:
    run = session.get(FlaggingRun, run_id)
    if run is None:
        raise FlaggingRunNotFound(f"no flagging run {run_id}")
    return run


def _archive(session: Session, policy: FlaggingPolicy) -> str:
    """Keep the policy file under its version, unless it is kept already; returns the file's
    SHA-256 (hex). The version holds only 48 bits of that hash: another file under the same
    version (made to collide, or an archive row altered) is ``PolicyVersionClash``, and the run
    does not start."""
    digest = hashlib.sha256(policy.content).hexdigest()
    kept = session.get(ArchivedPolicy, policy.version)
    if kept is None:
        try:
            with session.begin_nested():  # a run of the same new version may commit first
                session.add(
                    ArchivedPolicy(
                        version=policy.version,
                        name=policy.name,
                        sha256=digest,
                        content=policy.content,
                    )
                )
                session.flush()
            return digest
        except IntegrityError:
            kept = session.get(ArchivedPolicy, policy.version, populate_existing=True)
    if kept is None or _clashes(kept, policy, digest):
        raise _clash(policy)
    return digest


def refuse_policy_clash(*, session: Session, policy: FlaggingPolicy) -> None:
    """``PolicyVersionClash`` now if ``policy``'s version is archived with other bytes, before
    a long run starts (``run_flagging`` checks again as it archives)."""
    kept = session.get(ArchivedPolicy, policy.version)
    if kept is not None and _clashes(kept, policy, hashlib.sha256(policy.content).hexdigest()):
        raise _clash(policy)


def _clashes(kept: ArchivedPolicy, policy: FlaggingPolicy, digest: str) -> bool:
    return kept.sha256 != digest or kept.content != policy.content


def _clash(policy: FlaggingPolicy) -> PolicyVersionClash:
    return PolicyVersionClash(
        f"policy version {policy.version} is archived with other content: the policy file "
        "read now is not the one that version's flags were decided by; no run starts "
        "until the policy gets a version of its own"
    )


def get_run_policy(*, session: Session, run_id: str) -> ArchivedPolicyPublic:
    """The policy file the run evaluated, as archived by the first run of its version."""
    run = get_run(session=session, run_id=run_id)
    kept = session.get(ArchivedPolicy, run.policy_version)
    if kept is None:
        raise PolicyNotArchived(
            f"the policy of run {run_id} ({run.policy_version}) is not archived: the run is "
            "older than the archive (database revision 0012); the version's hash is the first "
            "12 hex digits of the file's SHA-256"
        )
    return ArchivedPolicyPublic(
        version=kept.version,
        name=kept.name,
        sha256=kept.sha256,
        content=kept.content.decode("utf-8"),
        archived_at=kept.archived_at,
    )


def _public(flag: Flag, pseudonym: str) -> FlagPublic:
    if flag.id is None:
        raise RuntimeError("a flag is shown only after it was flushed")
    return FlagPublic(
        id=flag.id,
        pseudonym=pseudonym,
        kind="external" if flag.kind == "external" else "algorithm",
        run_id=flag.run_id,
        policy_version=flag.policy_version,
        reason_code=flag.reason_code,
        hits=[RuleHitPublic.model_validate(hit) for hit in flag.hits],
        explanation=flag.explanation,
        created_at=flag.created_at,
    )


def list_run_flags(
    *, session: Session, run_id: str, caller: Caller, after: int = 0, limit: int = 100
) -> tuple[list[FlagPublic], int | None]:
    """One page of a run's flags in id order; the second value is the next ``after`` or None.
    The read is logged (``flagging.read``, the run as object, the page's pseudonyms): who saw
    whose flags and explanations is in the access log, as packet reads are, and the page leaves
    the service only once that entry has committed."""
    get_run(session=session, run_id=run_id)
    limit = max(1, min(limit, MAX_PAGE))
    rows = session.execute(
        select(Flag, Subject.pseudonym)  # type: ignore[call-overload]
        .join(Subject, Subject.id == Flag.subject_id)
        .where(_flags.c.run_id == run_id, _flags.c.id > after)
        .order_by(_flags.c.id)
        .limit(limit + 1)
    ).all()
    items = [_public(flag, pseudonym) for flag, pseudonym in rows[:limit]]
    next_after = items[-1].id if len(rows) > limit else None
    append(
        session=session,
        entry=LogEntry.by(
            caller,
            action="flagging.read",
            object_type="flagging_run",
            object_id=run_id,
            pseudonyms=[item.pseudonym for item in items],
        ),
    )
    return items, next_after


def _push_message(flags: Sequence[PushedFlag]) -> bytes:
    """What the digest of a push covers: its flags, in order, as canonical JSON."""
    asked = json.dumps(
        [[f.pseudonym, f.reason_code, f.explanation] for f in flags],
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return b"casepackets/flags-push/v1\x00" + asked.encode("utf-8")


# The push a source sent under an Idempotency-Key.
_STORED_PUSH = select(_pushes.c.id, _pushes.c.request_digest, _pushes.c.created_at).where(
    _pushes.c.pushed_by == bindparam("by"), _pushes.c.idempotency_key == bindparam("key")
)


def push_flags(
    *,
    session: Session,
    keyring: KeyProvider,
    flags: Sequence[PushedFlag],
    caller: Caller,
    idempotency_key: str | None = None,
    idempotency_days: int | None = None,
) -> list[FlagPublic]:
    """Store flags a source pushed by pseudonym (all or nothing); a pseudonym that is unknown,
    erased or given twice → 422. With an ``idempotency_key`` (per source), the same push sent
    again within ``idempotency_days`` (the retention policy's; required with a key) gets the
    flags it stored the first time (logged again, not stored twice); other flags under that key,
    or a push older than that, → 409."""
    if idempotency_key is not None and idempotency_days is None:
        raise TypeError("an idempotency_key is replayed for idempotency_days, which is missing")
    # A push stored before it is forgotten by the shredder's round (``forget_push_digests``).
    kept_since = utcnow() - timedelta(days=idempotency_days or 0)
    # An erasure in progress commits first, so a subject it erases is refused below, and one
    # that starts later finds these flags and removes their text.
    lock_against_erasure(session.connection(), shared=True)
    message = _push_message(flags)
    if idempotency_key is not None:
        stored = session.execute(_STORED_PUSH, {"by": caller.sub, "key": idempotency_key}).first()
        if stored is not None:
            return _pushed_again(
                session,
                keyring=keyring,
                stored=stored,
                message=message,
                caller=caller,
                kept_since=kept_since,
            )
    known = _pushable(session, flags)
    push_id = None
    if idempotency_key is not None:
        push_id = uuid.uuid4().hex
        try:
            # A savepoint: if another push under the same key committed since the look-up above,
            # this transaction stays usable and the push is judged as a stored one.
            with session.begin_nested():
                session.connection().execute(
                    insert(_pushes).values(
                        id=push_id,
                        pushed_by=caller.sub,
                        idempotency_key=idempotency_key,
                        request_digest=keyed_digest(keyring=keyring, message=message),
                        created_at=utcnow(),
                    )
                )
        except IntegrityError:
            stored = session.execute(_STORED_PUSH, {"by": caller.sub, "key": idempotency_key}).one()
            return _pushed_again(
                session,
                keyring=keyring,
                stored=stored,
                message=message,
                caller=caller,
                kept_since=kept_since,
            )
    stored_flags: list[FlagPublic] = []
    for flag in flags:
        record = Flag(
            run_id=None,
            subject_id=known[flag.pseudonym],
            kind="external",
            reason_code=flag.reason_code,
            pushed_by=caller.sub,
            hits=[],
            explanation=flag.explanation,
            push_id=push_id,
        )
        session.add(record)
        session.flush()
        stored_flags.append(_public(record, flag.pseudonym))
    _log_push(session, caller=caller, flags=stored_flags)
    return stored_flags


def _pushable(session: Session, flags: Sequence[PushedFlag]) -> dict[str, int]:
    """Each pseudonym's subject id, or a 422 naming every row whose pseudonym is unknown, erased
    or given again."""
    wanted = sorted({flag.pseudonym for flag in flags})
    known: dict[str, tuple[int, bool]] = {}
    for start in range(0, len(wanted), 500):
        for subject_id, pseudonym, erased_at in session.execute(
            select(_subjects.c.id, _subjects.c.pseudonym, _subjects.c.erased_at).where(
                _subjects.c.pseudonym.in_(wanted[start : start + 500])
            )
        ):
            known[pseudonym] = (subject_id, erased_at is not None)
    errors: list[dict[str, Any]] = []
    first_row: dict[str, int] = {}
    for row, flag in enumerate(flags):
        found = known.get(flag.pseudonym)
        earlier = first_row.setdefault(flag.pseudonym, row)
        if earlier != row:
            errors.append(
                {
                    "row": row,
                    "loc": ["flags", row, "pseudonym"],
                    "msg": f"flagged already in row {earlier}; give one flag per pseudonym",
                }
            )
        elif found is None:
            errors.append(
                {"row": row, "loc": ["flags", row, "pseudonym"], "msg": "unknown pseudonym"}
            )
        elif found[1]:
            errors.append(
                {"row": row, "loc": ["flags", row, "pseudonym"], "msg": "subject was erased"}
            )
    if errors:
        shown = ", ".join(
            f"row {e['row']} ({flags[e['row']].pseudonym}: {e['msg']})" for e in errors[:10]
        )
        raise Unprocessable(
            f"flags refer to pseudonyms that cannot be flagged: {shown}", errors=errors
        )
    return {pseudonym: subject_id for pseudonym, (subject_id, _erased) in known.items()}


def _log_push(
    session: Session, *, caller: Caller, flags: Sequence[FlagPublic], reason: str | None = None
) -> None:
    append(
        session=session,
        entry=LogEntry.by(
            caller,
            action="flags.push",
            object_type="flag",
            object_id=",".join(str(f.id) for f in flags),
            pseudonyms=sorted({flag.pseudonym for flag in flags}),
            reason=reason,
        ),
    )


def _pushed_again(
    session: Session,
    *,
    keyring: KeyProvider,
    stored: Any,
    message: bytes,
    caller: Caller,
    kept_since: datetime,
) -> list[FlagPublic]:
    """The flags a push sent again stored the first time (logged again), or a 409 when the
    source's key was used for other flags, or the push can no longer be matched: also when it
    was stored before ``kept_since``, whether or not the shredder's round has forgotten it."""
    if stored.request_digest == ERASED_DIGEST:
        raise FlagsKeyReused(
            "this Idempotency-Key's push held a subject who has since been erased, so a push "
            "sent again can no longer be matched to it; use a new key"
        )
    if stored.request_digest == EXPIRED_DIGEST or as_utc(stored.created_at) < kept_since:
        raise FlagsKeyReused(
            "this Idempotency-Key's push is older than the service keeps digests for "
            "(idempotency_days in policies/retention.yaml); use a new key"
        )
    matches = keyed_digest_matches(keyring=keyring, message=message, stored=stored.request_digest)
    if matches is None:
        raise FlagsKeyReused(
            "this Idempotency-Key's push was stored under a pseudonym key version that has since "
            "been retired, so a push sent again can no longer be matched to it; use a new key"
        )
    if not matches:
        raise FlagsKeyReused("this Idempotency-Key was used for other flags; use a new key")
    rows = session.execute(
        select(Flag, Subject.pseudonym)  # type: ignore[call-overload]
        .join(Subject, Subject.id == Flag.subject_id)
        .where(_flags.c.push_id == stored.id)
        .order_by(_flags.c.id)
    ).all()
    flags = [_public(flag, pseudonym) for flag, pseudonym in rows]
    _log_push(session, caller=caller, flags=flags, reason="sent again, not stored twice")
    return flags


def forget_push_digests(*, session: Session, before: datetime) -> int:
    """Forget the digests of pushes stored before ``before`` (an HMAC of their pseudonyms and
    texts; a guess can be checked against it); the push and its flags stay. Returns how many."""
    result = session.connection().execute(
        update(_pushes)
        .where(
            _pushes.c.created_at < before,
            _pushes.c.request_digest.not_in((ERASED_DIGEST, EXPIRED_DIGEST)),
        )
        .values(request_digest=EXPIRED_DIGEST)
    )
    if result.rowcount:
        request_purge(session)
    return int(result.rowcount)


# What a pushed flag's explanation becomes when its subject is erased. A source writes it freely
# (up to 1,000 characters), so it may name the person, their address or their circumstances; it
# is stored in clear, and nothing but removing it would forget it. The reason code stays, as
# outcome codes do.
ERASED_EXPLANATION = "(removed when the subject was erased)"


def _erase_pushed_explanations(session: Session, subject_id: int) -> int:
    """Erasure hook: the free text of every flag a source pushed about the subject, and the
    digest of every push that held one (an HMAC of that text under the pseudonym key, which
    outlives the erasure: a guess could be checked against it). Returns 0: it removes no DEK
    wrap."""
    connection = session.connection()
    connection.execute(
        update(_pushes)
        .where(
            _pushes.c.id.in_(
                select(_flags.c.push_id).where(
                    _flags.c.subject_id == subject_id, _flags.c.push_id.is_not(None)
                )
            ),
            _pushes.c.request_digest.not_in((ERASED_DIGEST, EXPIRED_DIGEST)),
        )
        .values(request_digest=ERASED_DIGEST)
    )
    connection.execute(
        update(_flags)
        .where(
            _flags.c.subject_id == subject_id,
            _flags.c.kind == "external",
            _flags.c.explanation != ERASED_EXPLANATION,
        )
        .values(explanation=ERASED_EXPLANATION)
    )
    session.flush()
    return 0


register_erasure_hook(_erase_pushed_explanations)
