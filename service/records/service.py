"""Record store services: ingest into the identity vault, identity decryption, erasure, rewrap.

Invariants:
- an identity is encrypted (AES-256-GCM) under the subject's own random DEK before it touches the
  database; the DEK is stored only wrapped by the vault KEK; both are bound to their column and row
  (the pseudonym) through associated data, never to the person's data;
- a batch is all-or-nothing: every failing row is reported in one 422 and nothing is flushed;
- the same ``Idempotency-Key`` (per source) returns the stored first answer; the same
  (source, source event id) never stores a second event: sent again with the same subject, type,
  date and office it is already known, with anything else the batch is refused (422);
- a subject's pseudonym is looked up under every active pseudonym key version, so rotating that
  key never splits a person in two; new subjects get the current version;
- an erased subject stays erased: a later batch may add pseudonymized events but never stores
  its identity again;
- nothing here logs, returns or raises an identity; errors name rows and fields only;
- services only flush; the caller (request or command) owns the transaction.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar, overload

from sqlalchemy import (
    Connection,
    RowMapping,
    Select,
    bindparam,
    case,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlmodel import Session

from service.access_log.service import LogEntry, append, logged_current_key
from service.crypto.envelope import (
    AadValue,
    DataKey,
    DecryptionFailed,
    open_,
    rewrap_key,
    seal,
    token_version,
    unwrap_key,
    wrap_key,
)
from service.crypto.keyring import (
    KeyProvider,
    KeyringError,
    Purpose,
    UnknownKey,
    version_number,
)
from service.crypto.pseudonym import DOMAIN, PSEUDONYM_BYTES
from service.db import request_purge
from service.errors import Conflict, Gone, NotFound, Unavailable, Unprocessable
from service.records.models import (
    IDENTITY,
    RECORD_BATCH,
    Event,
    EventIn,
    IdentityIn,
    IngestBatch,
    RecordBatchPublic,
    RowStatus,
    Subject,
    SubjectErasurePublic,
    SubjectRecordIn,
)
from service.schemas import as_utc

SUBJECTS = Subject.__table__  # type: ignore[attr-defined]
EVENTS = Event.__table__  # type: ignore[attr-defined]
BATCHES = IngestBatch.__table__  # type: ignore[attr-defined]


class BatchInvalid(Unprocessable):
    title = "Batch rejected"


class IdempotencyKeyReused(Conflict):
    title = "Idempotency-Key reused"


class ConcurrentIngest(Conflict):
    title = "Concurrent ingest"


class SubjectNotFound(NotFound):
    pass


class SubjectErased(Gone):
    title = "Subject erased"


class KeyStillInUse(Conflict):
    title = "Key version still in use"


# -- identities -------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Identity:
    """A decrypted identity. Its repr is ``***``; hand it only to a caller entitled to it."""

    bsn: str
    given_name: str
    family_name: str
    birth_date: date
    street: str | None = None
    postcode: str | None = None
    city: str | None = None
    phone: str | None = None
    email: str | None = None

    def __repr__(self) -> str:
        return "Identity(***)"

    def to_bytes(self) -> bytes:
        """The plaintext that is sealed: the identity as JSON. An owner's open passes it through
        as the client's ``identity`` (``packets.service.reveal``), so it holds exactly
        ``IdentityPublic``'s fields."""
        fields = asdict(self)
        fields["birth_date"] = self.birth_date.isoformat()
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, raw: bytes) -> Identity:
        fields = json.loads(raw)
        fields["birth_date"] = date.fromisoformat(fields["birth_date"])
        return cls(**fields)

    @classmethod
    def from_input(cls, given: IdentityIn) -> Identity:
        return cls(**given)


def identity_aad(pseudonym: str) -> dict[str, AadValue]:
    """Where an identity ciphertext belongs: the subjects row with this pseudonym."""
    return {"table": "subjects", "column": "identity_ciphertext", "row": pseudonym}


def dek_aad(pseudonym: str) -> dict[str, AadValue]:
    """Where a subject's wrapped DEK belongs."""
    return {"table": "subjects", "column": "wrapped_dek", "row": pseudonym}


def encrypt_identity(*, dek: DataKey, pseudonym: str, identity: Identity) -> str:
    return seal(dek, identity.to_bytes(), aad=identity_aad(pseudonym))


def subject_dek(*, keyring: KeyProvider, subject: Subject) -> DataKey:
    """Unwrap the subject's DEK with the vault KEK version it names; erased → ``SubjectErased``."""
    if subject.wrapped_dek is None:
        raise SubjectErased("this subject was erased; the identity no longer exists")
    return unwrap_key(keyring, "vault", subject.wrapped_dek, aad=dek_aad(subject.pseudonym))


def decrypt_identity(*, keyring: KeyProvider, subject: Subject, dek: DataKey) -> Identity:
    """Decrypt the subject's identity with its DEK (from ``subject_dek`` or a packet wrap)."""
    del keyring  # the DEK suffices; kept in the signature so callers stay uniform
    if subject.identity_ciphertext is None:
        raise SubjectErased("this subject was erased; the identity no longer exists")
    return Identity.from_bytes(
        open_(dek, subject.identity_ciphertext, aad=identity_aad(subject.pseudonym))
    )


# -- ingest -----------------------------------------------------------------------------------


SUBJECT_COLUMNS = (
    "id",
    "pseudonym",
    "pseudonym_key_version",
    "district",
    "neighbourhood",
    "birth_year",
    "household_type",
    "identity_ciphertext",
    "wrapped_dek",
    "created_at",
    "updated_at",
)
EVENT_COLUMNS = ("subject_id", "source", "source_event_id", "type", "date", "office")


_IDENTITY_JSON = IDENTITY.serializer.to_json
_RECORD_BATCH_JSON = RECORD_BATCH.serializer.to_json


def identity_plaintext(given: IdentityIn) -> bytes:
    """The bytes that get encrypted: the validated identity as compact JSON (every field in
    declaration order, dates in ISO 8601)."""
    plaintext: bytes = _IDENTITY_JSON(given)
    return plaintext


def _binder(connection: Connection, column: Any) -> Callable[[Any], Any]:
    """The dialect's own conversion of a Python value for ``column`` (identity if none)."""
    process = column.type.bind_processor(connection.dialect)
    return process if process is not None else (lambda value: value)


def _bind(connection: Connection, column: Any, value: Any) -> Any:
    return _binder(connection, column)(value)


def _allocate_subject_ids(connection: Connection, count: int) -> list[int]:
    """Ids for ``count`` new subjects, reserved before the bulk insert.

    PostgreSQL hands them out from the column's sequence; on SQLite the transaction already holds
    the write lock (``BEGIN IMMEDIATE``), so the ids after the current maximum are ours.
    """
    if connection.dialect.name == "postgresql":
        return list(
            connection.execute(
                text(
                    "SELECT nextval(pg_get_serial_sequence('subjects', 'id')) "
                    "FROM generate_series(1, :count)"
                ),
                {"count": count},
            ).scalars()
        )
    highest = connection.execute(select(func.max(SUBJECTS.c.id))).scalar() or 0
    return list(range(highest + 1, highest + 1 + count))


def _refresh_statistics(connection: Connection, *, added: int) -> None:
    """On PostgreSQL, ANALYZE ``subjects`` and ``events`` when a batch (of at least 1,000 new
    subjects) is as large as the table was at its last ANALYZE, i.e. the table at least doubled.

    Why: the foreign-key checks of the events insert use plans cached per connection; planned
    against a nearly empty table they scan it sequentially, which makes every later batch
    quadratic. ANALYZE refreshes the estimates and invalidates those plans. Once planned against
    a table of some size they use the index and stay good as it grows (the planner scales row
    estimates by the table's current size), so doubling is often enough; ANALYZE after every
    batch cost about a tenth of a 10,000-subject batch.
    """
    if connection.dialect.name != "postgresql" or added < 1000:
        return
    estimate = connection.execute(
        text("SELECT reltuples FROM pg_class WHERE oid = 'subjects'::regclass")
    ).scalar()
    if estimate is None or estimate < 0 or added >= estimate:
        connection.execute(text("ANALYZE subjects, events"))


def _bulk_insert(
    connection: Connection, table: Any, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
) -> None:
    """Insert many rows the fastest way each engine offers (COPY on PostgreSQL).

    Values are already in the form the driver takes (dates and times bound by the dialect).
    A failure raises what SQLAlchemy raises for any statement (``IntegrityError``, ``DataError``,
    ...), although COPY runs on the driver's own connection, so callers handle both paths alike.
    """
    names = ", ".join(columns)
    if connection.dialect.name == "postgresql":
        statement = f"COPY {table.name} ({names}) FROM STDIN"
        driver: Any = connection.connection.driver_connection
        driver_error = connection.dialect.loaded_dbapi.Error
        try:
            with driver.cursor() as cursor, cursor.copy(statement) as copy:
                for row in rows:
                    copy.write_row(row)
        except driver_error as exc:
            # The translation SQLAlchemy applies to the statements it runs itself.
            raise DBAPIError.instance(
                statement, None, exc, driver_error, dialect=connection.dialect
            ) from exc
        return
    marks = ", ".join("?" for _ in columns)
    connection.exec_driver_sql(f"INSERT INTO {table.name} ({names}) VALUES ({marks})", rows)  # noqa: S608


def batch_errors(
    *, subjects: Sequence[SubjectRecordIn], event_types: frozenset[str], max_rows: int
) -> list[dict[str, Any]]:
    """Checks beyond the schema: row limit, event vocabulary, duplicates within the batch."""
    errors: list[dict[str, Any]] = []
    if len(subjects) > max_rows:
        errors.append(
            {"row": None, "loc": ["subjects"], "msg": f"a batch holds at most {max_rows} subjects"}
        )
        return errors
    events = [e for r in subjects for e in r["events"]]
    event_ids = {e["source_event_id"] for e in events}
    if (
        len(event_ids) == len(events)
        and {e["type"] for e in events} <= event_types
        and len({r["identity"]["bsn"] for r in subjects}) == len(subjects)
    ):
        return errors  # the common case, in three set operations
    first_row_of_bsn: dict[str, int] = {}
    event_id_counts = Counter(e["source_event_id"] for e in events)
    repeated = {event_id for event_id, count in event_id_counts.items() if count > 1}
    for row, record in enumerate(subjects):
        seen = first_row_of_bsn.setdefault(record["identity"]["bsn"], row)
        if seen != row:
            errors.append(
                {
                    "row": row,
                    "loc": ["subjects", row, "identity", "bsn"],
                    "msg": f"same subject as row {seen}; send each subject once per batch",
                }
            )
        for index, event in enumerate(record["events"]):
            unknown_type = event["type"] not in event_types
            if not unknown_type and event["source_event_id"] not in repeated:
                continue
            loc: list[str | int] = ["subjects", row, "events", index]
            if unknown_type:
                errors.append(
                    {
                        "row": row,
                        "loc": [*loc, "type"],
                        "msg": "unknown event type (see policies/events.yaml)",
                    }
                )
            if event["source_event_id"] in repeated:
                errors.append(
                    {
                        "row": row,
                        "loc": [*loc, "source_event_id"],
                        "msg": "source_event_id occurs more than once in this batch",
                    }
                )
    return errors


def _batch_json(subjects: Sequence[SubjectRecordIn]) -> bytes:
    """The validated batch as canonical compact JSON (what the idempotency digest covers)."""
    serialized: bytes = _RECORD_BATCH_JSON({"subjects": list(subjects)})
    return serialized


def keyed_digest(*, keyring: KeyProvider, message: bytes) -> str:
    """``<version>:<HMAC-SHA256 hex>`` of ``message`` under the current pseudonym key: what an
    Idempotency-Key keeps of a request (no identity or text can be read back from it, but anyone
    holding the key can check a guess against it, so erasure removes those holding a subject).
    ``message`` starts with its own domain (``casepackets/…/v1\0``)."""
    key = keyring.current("pseudonym")
    return f"{key.version}:{hmac.new(key.material, message, hashlib.sha256).hexdigest()}"


def keyed_digest_matches(*, keyring: KeyProvider, message: bytes, stored: str) -> bool | None:
    """Whether ``stored`` is the ``keyed_digest`` of ``message``; None when that cannot be told
    any more, because the pseudonym key version it was made under has been retired."""
    version_text, _, expected = stored.partition(":")
    version = version_number(version_text)  # a row altered in the database may name anything
    if version is None:
        return False
    try:
        key = keyring.get("pseudonym", version)
    except KeyringError:
        retired = {v.version for v in keyring.versions("pseudonym") if v.retired_at}
        return None if version in retired else False
    digest = hmac.new(key.material, message, hashlib.sha256).hexdigest()
    return hmac.compare_digest(digest, expected)


def _batch_message(subjects: Sequence[SubjectRecordIn]) -> bytes:
    return b"casepackets/idempotency/v1\x00" + _batch_json(subjects)


def batch_digest(*, keyring: KeyProvider, subjects: Sequence[SubjectRecordIn]) -> str:
    """A keyed digest of the batch content (no identity can be read back from it)."""
    return keyed_digest(keyring=keyring, message=_batch_message(subjects))


def digest_matches(
    *, keyring: KeyProvider, subjects: Sequence[SubjectRecordIn], stored: str
) -> bool | None:
    """Whether ``subjects`` is the batch ``stored`` was made of (``keyed_digest_matches``)."""
    return keyed_digest_matches(keyring=keyring, message=_batch_message(subjects), stored=stored)


def pseudonymizer(key: bytes) -> Callable[[str], str]:
    """``pseudonymize`` under one key for many BSNs: the keyed HMAC state over the domain prefix
    is computed once and copied per BSN (same result, about half the work)."""
    prefix = hmac.new(key, DOMAIN, hashlib.sha256)

    def pseudonym_of(normalized_bsn: str) -> str:
        mac = prefix.copy()
        mac.update(normalized_bsn.encode("ascii"))
        return mac.digest()[:PSEUDONYM_BYTES].hex()

    return pseudonym_of


@dataclass(frozen=True)
class IngestResult:
    """What ``ingest_batch`` did; ``to_json`` is the ``RecordBatchPublic`` body.

    Why not ``RecordBatchPublic`` itself: one model object per row costs more than the JSON
    for 10,000 rows; the values are typed already, so they are written out once.
    """

    batch_id: str
    source: str
    events_stored: int
    events_already_known: int
    replayed: bool
    pseudonyms: Sequence[str]
    statuses: Sequence[RowStatus]

    @property
    def subjects(self) -> int:
        return len(self.pseudonyms)

    def to_json(self) -> bytes:
        """The ``RecordBatchPublic`` JSON (same fields, same order)."""
        return json.dumps(
            {
                "batch_id": self.batch_id,
                "source": self.source,
                "subjects": self.subjects,
                "events_stored": self.events_stored,
                "events_already_known": self.events_already_known,
                "replayed": self.replayed,
                "rows": [
                    {"row": row, "pseudonym": pseudonym, "status": status}
                    for row, (pseudonym, status) in enumerate(
                        zip(self.pseudonyms, self.statuses, strict=True)
                    )
                ],
            },
            separators=(",", ":"),
        ).encode("utf-8")

    def public(self) -> RecordBatchPublic:
        return RecordBatchPublic.model_validate_json(self.to_json())


def _replay(stored: Mapping[str, Any]) -> IngestResult:
    answer = json.loads(stored["response"])
    rows = answer["rows"]
    return IngestResult(
        batch_id=stored["id"],
        source=stored["source"],
        events_stored=answer["events_stored"],
        events_already_known=answer["events_already_known"],
        replayed=True,
        pseudonyms=[p for _r, p, _s in rows],
        statuses=[s for _r, _p, s in rows],
    )


@dataclass
class _Known:
    id: int
    pseudonym: str
    identity_ciphertext: str | None
    wrapped_dek: str | None
    characteristics: tuple[Any, ...]


def _characteristics(record: SubjectRecordIn) -> tuple[Any, ...]:
    c = record["characteristics"]
    birth_year = c.get("birth_year")
    if birth_year is None:
        birth_year = record["identity"]["birth_date"].year
    return (c["district"], c["neighbourhood"], birth_year, c.get("household_type"))


EVENT_CONTENT = ("subject", "type", "date", "office")


@dataclass(frozen=True)
class _StoredEvent:
    """What defines a stored event besides its (source, source event id)."""

    subject_id: int
    type: str
    date: date
    office: str

    def differences(self, *, subject_id: int, event: EventIn) -> list[str]:
        """The fields in which ``event``, sent for ``subject_id`` (0: a subject not stored yet),
        differs from this one."""
        sent = (subject_id, event["type"], event["date"], event["office"])
        stored = (self.subject_id, self.type, self.date, self.office)
        return [
            name
            for name, sent_value, stored_value in zip(EVENT_CONTENT, sent, stored, strict=True)
            if sent_value != stored_value
        ]


def _known_events(
    connection: Connection, *, source: str, ids: Sequence[str]
) -> dict[str, _StoredEvent]:
    """The events among ``ids`` this source has sent before, by source event id, in one query.

    The ids travel as one parameter (a text[] on PostgreSQL, a JSON array on SQLite) joined
    against the unique index: an ``IN`` list of separately bound values costs a bind parameter
    each to compile and, on PostgreSQL, is compared row by row.
    """
    if not ids:
        return {}
    if connection.dialect.name == "postgresql":
        rows = connection.execute(
            text(
                "SELECT e.source_event_id, e.subject_id, e.type, e.date, e.office "
                "FROM unnest(CAST(:ids AS text[])) AS sent(id) "
                "JOIN events e ON e.source = :source AND e.source_event_id = sent.id"
            ),
            {"ids": list(ids), "source": source},
        )
    else:
        rows = connection.exec_driver_sql(
            "SELECT source_event_id, subject_id, type, date, office FROM events "
            "WHERE source = ? AND source_event_id IN (SELECT value FROM json_each(?))",
            (source, json.dumps(list(ids))),
        )
    # SQLite hands back the date as the ISO text SQLAlchemy stored; PostgreSQL as a date.
    return {
        event_id: _StoredEvent(
            subject_id=subject_id,
            type=type_,
            date=stored_date if isinstance(stored_date, date) else date.fromisoformat(stored_date),
            office=office,
        )
        for event_id, subject_id, type_, stored_date, office in rows
    }


def _changed_event_errors(
    *,
    subjects: Sequence[SubjectRecordIn],
    subject_ids: Sequence[int],
    known: Mapping[str, _StoredEvent],
) -> list[dict[str, Any]]:
    """A row error for every event whose id is stored with other content: storing it would need
    a second event under one id, and skipping it would silently lose it."""
    errors: list[dict[str, Any]] = []
    for row, (subject_id, record) in enumerate(zip(subject_ids, subjects, strict=True)):
        for index, event in enumerate(record["events"]):
            stored = known.get(event["source_event_id"])
            if stored is None:
                continue
            differences = stored.differences(subject_id=subject_id, event=event)
            if differences:
                errors.append(
                    {
                        "row": row,
                        "loc": ["subjects", row, "events", index, "source_event_id"],
                        "msg": "source_event_id already stored with another "
                        + ", ".join(differences)
                        + "; a stored event cannot be changed by sending it again",
                    }
                )
    return errors


def _find_known(connection: Connection, candidates: Sequence[str]) -> dict[str, _Known]:
    """The stored subjects among ``candidates`` (pseudonyms), in one query (see above)."""
    if not candidates:
        return {}
    columns = (
        "id, pseudonym, identity_ciphertext, wrapped_dek, "
        "district, neighbourhood, birth_year, household_type"
    )
    if connection.dialect.name == "postgresql":
        rows = connection.execute(
            text(
                f"SELECT {columns} FROM subjects "  # noqa: S608 (constant column list)
                "WHERE pseudonym = ANY(CAST(:candidates AS text[]))"
            ),
            {"candidates": list(candidates)},
        )
    else:
        rows = connection.exec_driver_sql(
            f"SELECT {columns} FROM subjects "  # noqa: S608 (constant column list)
            "WHERE pseudonym IN (SELECT value FROM json_each(?))",
            (json.dumps(list(candidates)),),
        )
    return {
        row[1]: _Known(
            id=row[0],
            pseudonym=row[1],
            identity_ciphertext=row[2],
            wrapped_dek=row[3],
            characteristics=tuple(row[4:8]),
        )
        for row in rows
    }


def _rejection(errors: Sequence[dict[str, Any]]) -> BatchInvalid:
    """The 422 for a batch with row errors: it names the failing rows, never their values."""
    rows = sorted({e["row"] for e in errors if e["row"] is not None})
    shown = ", ".join(str(r) for r in rows[:20]) + (" …" if len(rows) > 20 else "")
    return BatchInvalid(
        f"batch rejected, nothing was stored; failing rows: {shown}"
        if rows
        else f"batch rejected, nothing was stored: {errors[0]['msg']}",
        errors=list(errors),
    )


def _stored_batch(source: str, idempotency_key: str) -> Select[Any]:
    return select(BATCHES).where(
        BATCHES.c.source == source, BATCHES.c.idempotency_key == idempotency_key
    )


def _answer_again(
    session: Session,
    *,
    keyring: KeyProvider,
    subjects: Sequence[SubjectRecordIn],
    stored: RowMapping,
    actor: str,
    role: str,
    request_id: str | None,
    kept_since: datetime,
) -> IngestResult:
    """The stored answer to a batch sent again under its Idempotency-Key (logged again), or a
    409 saying why it cannot be given. A batch stored before ``kept_since`` is past the retention
    policy's idempotency_days at once, whether or not the shredder's round has forgotten it."""
    if stored["request_digest"] == ERASED_DIGEST:
        raise IdempotencyKeyReused(
            "this Idempotency-Key's batch held a subject who is erased (when it was "
            "stored, or since), so nothing was kept that a batch sent again could be "
            "matched to; use a new key"
        )
    if stored["request_digest"] == EXPIRED_DIGEST or as_utc(stored["created_at"]) < kept_since:
        raise IdempotencyKeyReused(
            "this Idempotency-Key's batch is older than the service keeps answers for "
            "(idempotency_days in policies/retention.yaml); use a new key"
        )
    matches = digest_matches(keyring=keyring, subjects=subjects, stored=stored["request_digest"])
    if matches is None:
        raise IdempotencyKeyReused(
            "this Idempotency-Key's batch was stored under a pseudonym key version that "
            "has since been retired, so a batch sent again can no longer be matched to "
            "it; use a new key"
        )
    if not matches:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was used for a different batch; use a new key"
        )
    replayed = _replay(dict(stored))
    # An answer that hands out pseudonyms again is logged again, as a push of flags is.
    _log_batch(
        session,
        actor=actor,
        role=role,
        batch_id=replayed.batch_id,
        reason="sent again, not stored twice",
        request_id=request_id,
    )
    return replayed


def ingest_batch(
    *,
    session: Session,
    keyring: KeyProvider,
    event_types: frozenset[str],
    source: str,
    subjects: Sequence[SubjectRecordIn],
    max_rows: int,
    idempotency_key: str | None,
    actor: str,
    role: str,
    request_id: str | None = None,
    idempotency_days: int | None = None,
) -> IngestResult:
    """Store a batch of validated subjects and events, all or nothing; a pseudonym per row.

    ``subjects`` are values validated by ``RECORD_BATCH`` / ``SUBJECT_RECORD`` (every key
    present, BSN normalized, dates parsed). A batch sent again under ``idempotency_key`` gets
    its stored answer for ``idempotency_days`` (the retention policy's; required with a key).
    """
    if idempotency_key is not None and idempotency_days is None:
        raise TypeError("an idempotency_key is replayed for idempotency_days, which is missing")
    errors = batch_errors(subjects=subjects, event_types=event_types, max_rows=max_rows)
    if errors:
        raise _rejection(errors)
    connection = session.connection()
    lock_against_erasure(connection, shared=True)

    now = datetime.now(UTC)
    batch_id = uuid.uuid4().hex
    digest = "" if idempotency_key is None else batch_digest(keyring=keyring, subjects=subjects)
    stored = None
    if idempotency_key is not None:
        stored = connection.execute(_stored_batch(source, idempotency_key)).mappings().first()
    if stored is None:
        try:
            # The batch's row is written first (its answer last), in a savepoint: a retry under
            # the same key racing this batch waits on it (PostgreSQL) and, once this batch
            # commits, fails here with its transaction still usable and gets this batch's
            # answer, as a retried push of flags does. On SQLite the write lock keeps the two
            # apart and the look-up above finds the stored batch. (The SAVEPOINT is sent when
            # the session's connection is asked for inside the block, not by ``connection``.)
            with session.begin_nested():
                session.connection().execute(
                    insert(BATCHES).values(
                        id=batch_id,
                        source=source,
                        idempotency_key=idempotency_key,
                        request_digest=digest,
                        subject_count=len(subjects),
                        response="",
                        created_at=now,
                    )
                )
        except IntegrityError:
            if idempotency_key is None:
                raise
            stored = connection.execute(_stored_batch(source, idempotency_key)).mappings().one()
    if stored is not None:
        return _answer_again(
            session,
            keyring=keyring,
            subjects=subjects,
            stored=stored,
            actor=actor,
            role=role,
            request_id=request_id,
            # Forgotten by the shredder's round when older (``forget_batch_answers``).
            kept_since=now - timedelta(days=idempotency_days or 0),
        )

    # Pseudonyms under every active key version (newest first): an older version's match wins
    # over creating a second subject for the same person.
    current_key = logged_current_key(session=session, keyring=keyring, purpose="pseudonym")
    # Read after the current key: should the file have changed in between, this list is the
    # newer one, and it holds every version the current one can be.
    pseudonym_keys = keyring.active("pseudonym")
    bsns = [record["identity"]["bsn"] for record in subjects]
    per_version = [list(map(pseudonymizer(key.material), bsns)) for key in pseudonym_keys]
    known = _find_known(connection, sorted({p for candidates in per_version for p in candidates}))

    statuses: list[RowStatus] = []
    pseudonyms: list[str] = []
    new_rows: list[tuple[Any, ...]] = []
    new_positions: list[int] = []
    changed_rows: list[dict[str, Any]] = []
    subject_ids: list[int] = []
    # By version: the keyring may have reloaded between the two reads (other Key objects).
    current_candidates = per_version[[k.version for k in pseudonym_keys].index(current_key.version)]
    current_version = current_key.version
    for row, record in enumerate(subjects):
        match = None
        if known:
            for candidates in per_version:
                match = known.get(candidates[row])
                if match is not None:
                    break
        characteristics = _characteristics(record)
        if match is None:
            # New subject: one random DEK, one AES-GCM seal of the identity, one DEK wrap.
            pseudonym = current_candidates[row]
            dek = DataKey.generate()
            new_rows.append(
                (
                    pseudonym,
                    current_version,
                    *characteristics,
                    seal(dek, identity_plaintext(record["identity"]), aad=identity_aad(pseudonym)),
                    wrap_key(keyring, "vault", dek, aad=dek_aad(pseudonym)),
                )
            )
            new_positions.append(row)
            pseudonyms.append(pseudonym)
            statuses.append("created")
            subject_ids.append(0)
            continue
        pseudonyms.append(match.pseudonym)
        subject_ids.append(match.id)
        if match.wrapped_dek is None or match.identity_ciphertext is None:
            statuses.append("erased")
            continue
        plaintext = identity_plaintext(record["identity"])
        dek = unwrap_key(keyring, "vault", match.wrapped_dek, aad=dek_aad(match.pseudonym))
        stored_plaintext = open_(dek, match.identity_ciphertext, aad=identity_aad(match.pseudonym))
        identity_changed = stored_plaintext != plaintext and json.loads(
            stored_plaintext
        ) != json.loads(plaintext)
        if not identity_changed and characteristics == match.characteristics:
            statuses.append("unchanged")
            continue
        statuses.append("updated")
        changed_rows.append(
            {
                "_id": match.id,
                "_ciphertext": (
                    seal(dek, plaintext, aad=identity_aad(match.pseudonym))
                    if identity_changed
                    else match.identity_ciphertext
                ),
                "_district": characteristics[0],
                "_neighbourhood": characteristics[1],
                "_birth_year": characteristics[2],
                "_household_type": characteristics[3],
                "_now": now,
            }
        )

    sent_ids = [event["source_event_id"] for record in subjects for event in record["events"]]
    already = _known_events(connection, source=source, ids=sent_ids)
    if already:
        errors = _changed_event_errors(subjects=subjects, subject_ids=subject_ids, known=already)
        if errors:
            raise _rejection(errors)

    try:
        if new_rows:
            ids = _allocate_subject_ids(connection, len(new_rows))
            for position, subject_id in zip(new_positions, ids, strict=True):
                subject_ids[position] = subject_id
            stamp = _bind(connection, SUBJECTS.c.created_at, now)
            _bulk_insert(
                connection,
                SUBJECTS,
                SUBJECT_COLUMNS,
                [(i, *r, stamp, stamp) for i, r in zip(ids, new_rows, strict=True)],
            )
        if changed_rows:
            # In id order, so two batches updating the same subjects lock them in the same order
            # (PostgreSQL) instead of deadlocking.
            changed_rows.sort(key=lambda row: int(row["_id"]))
            connection.execute(
                update(SUBJECTS)
                .where(SUBJECTS.c.id == bindparam("_id"), SUBJECTS.c.erased_at.is_(None))
                .values(
                    identity_ciphertext=bindparam("_ciphertext"),
                    district=bindparam("_district"),
                    neighbourhood=bindparam("_neighbourhood"),
                    birth_year=bindparam("_birth_year"),
                    household_type=bindparam("_household_type"),
                    updated_at=bindparam("_now"),
                ),
                changed_rows,
            )

        date_processor = EVENTS.c.date.type.bind_processor(connection.dialect)
        event_rows = [
            (
                subject_id,
                source,
                event["source_event_id"],
                event["type"],
                event["date"] if date_processor is None else date_processor(event["date"]),
                event["office"],
            )
            for subject_id, record in zip(subject_ids, subjects, strict=True)
            for event in record["events"]
            if not already or event["source_event_id"] not in already
        ]
        if event_rows:
            _bulk_insert(connection, EVENTS, EVENT_COLUMNS, event_rows)
        _refresh_statistics(connection, added=len(new_rows))

        result = IngestResult(
            batch_id=batch_id,
            source=source,
            events_stored=len(event_rows),
            events_already_known=len(sent_ids) - len(event_rows),
            replayed=False,
            pseudonyms=pseudonyms,
            statuses=statuses,
        )
        answer = {
            "subjects": result.subjects,
            "events_stored": result.events_stored,
            "events_already_known": result.events_already_known,
            "rows": [[r, p, s] for r, (p, s) in enumerate(zip(pseudonyms, statuses, strict=True))],
        }
        connection.execute(
            update(BATCHES)
            .where(BATCHES.c.id == batch_id)
            .values(
                request_digest=ERASED_DIGEST if digest and "erased" in statuses else digest,
                response=json.dumps(answer, separators=(",", ":")),
            )
        )
    except IntegrityError:
        raise ConcurrentIngest(
            "another batch stored the same subjects or events at the same time; nothing was "
            "stored, send the batch again"
        ) from None

    _log_batch(
        session,
        actor=actor,
        role=role,
        batch_id=result.batch_id,
        reason=f"source={source} subjects={result.subjects} events={result.events_stored}",
        request_id=request_id,
    )
    _check_pseudonym_key_unchanged(session, keyring, used=current_version)
    return result


def _log_batch(
    session: Session, *, actor: str, role: str, batch_id: str, reason: str, request_id: str | None
) -> None:
    append(
        session=session,
        entry=LogEntry(
            actor=actor,
            role=role,
            action="records.ingest",
            object_type="batch",
            object_id=batch_id,
            reason=reason,
            request_id=request_id,
        ),
    )


def _check_pseudonym_key_unchanged(session: Session, keyring: KeyProvider, *, used: int) -> None:
    """Refuse the batch (409, nothing stored) when the pseudonym key was rotated after this
    worker last read its keyring.

    Called under the log's lock (after the batch's entry is appended): a rotation logs itself
    under the same lock and stages its version in the keyring before it commits, so any
    rotation committed before this batch is in the file now, and the log says it committed.
    Without the check a worker a moment behind would give a person first stored under the new
    version a second subject under the old one (new subjects take the current version's
    pseudonym; existing ones are matched under every version).
    """
    keyring.refresh()
    if keyring.unreadable:
        raise Unavailable(
            "the keyring file changed but cannot be read, so the pseudonym key held here may be "
            "out of date; nothing was stored"
        )
    if logged_current_key(session=session, keyring=keyring, purpose="pseudonym").version != used:
        raise ConcurrentIngest(
            "the pseudonym key was rotated while this batch was processed; nothing was stored, "
            "send the batch again"
        )


def forget_batch_answers(*, session: Session, before: datetime) -> int:
    """Forget what batches stored before ``before`` kept for replays: the digest of their
    identities (a guess can be checked against it) and their answer, which lists their
    pseudonyms. The batch's id, source, count and time stay. Returns how many batches."""
    result = session.connection().execute(
        update(BATCHES)
        .where(BATCHES.c.created_at < before, BATCHES.c.response != EXPIRED_RESPONSE)
        .values(
            request_digest=case((BATCHES.c.idempotency_key.is_(None), ""), else_=EXPIRED_DIGEST),
            response=EXPIRED_RESPONSE,
        )
    )
    if result.rowcount:
        request_purge(session)
    return int(result.rowcount)


# -- erasure ----------------------------------------------------------------------------------

ErasureHook = Callable[[Session, int], int]
ERASURE_HOOKS: list[ErasureHook] = []

# pg_advisory_xact_lock key over who holds copies of the subjects' DEKs: the ASCII of "cp-deks"
# as an integer, fixed forever. Erasure (which removes copies) and partitioning (which wraps
# DEKs under new packet keys) take it, so they run one at a time: a copy is never made from a
# wrap read before an erasure that commits first, and two partitionings never place the same
# client twice. A vault KEK retirement takes it too (``lock_out_vault_readers``).
SUBJECT_KEYS_LOCK_KEY = 0x63702D64656B73


# pg_advisory_xact_lock key between ingests and pushes of flags (shared: they run side by side)
# and erasure (exclusive): one that read a subject before its erasure commits first, so its
# answer ("updated", "unchanged") is true when given and the erasure finds what it stored; one
# that starts later sees the subject erased. A vault KEK retirement takes it exclusively too
# (``lock_out_vault_readers``). The ASCII of "cp-ingst", fixed forever.
INGEST_ERASURE_LOCK_KEY = 0x63702D696E677374

# What an ingest batch keeps instead of its digest once it held an erased subject: the digest is
# an HMAC of every identity in the batch under the pseudonym key, which outlives the erasure, so
# a guessed name or address could be checked against it.
ERASED_DIGEST = "erased"
# What it keeps once its Idempotency-Key has outlived the retention policy's idempotency_days: no
# digest, and an empty answer (the answer lists the batch's pseudonyms).
EXPIRED_DIGEST = "expired"
EXPIRED_RESPONSE = "{}"


def _hold_advisory_lock(connection: Connection, key: int, *, shared: bool = False) -> None:
    """Hold advisory lock ``key`` until the transaction ends, waiting for its holder
    (PostgreSQL). SQLite needs nothing here: every transaction begins ``BEGIN IMMEDIATE`` and
    holds the database's single write lock from its first statement (see ``service.db``)."""
    if connection.dialect.name == "postgresql":
        function = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
        connection.exec_driver_sql(f"SELECT {function}(%(key)s)", {"key": key})


def lock_against_erasure(connection: Connection, *, shared: bool) -> None:
    """The ingest/erasure lock: shared for ingests and pushes, exclusive for an erasure."""
    _hold_advisory_lock(connection, INGEST_ERASURE_LOCK_KEY, shared=shared)


def lock_subject_keys(session: Session) -> None:
    """Hold the subject-keys lock until the transaction ends (partitioning, erasure)."""
    _hold_advisory_lock(session.connection(), SUBJECT_KEYS_LOCK_KEY)


def lock_out_vault_readers(session: Session) -> None:
    """Wait for the ingests, pushes and partitionings in progress, and keep new ones from
    starting until the transaction ends (PostgreSQL; on SQLite each holds the write lock for its
    whole transaction). A retirement of a vault KEK version takes both locks before it counts
    what still depends on that version: a rewrap may have moved a wrap one of those read under
    the old version and not yet opened, and its material must outlast them."""
    lock_against_erasure(session.connection(), shared=False)
    lock_subject_keys(session)


def register_erasure_hook(hook: ErasureHook) -> None:
    """Other domains register a function that removes what they hold about a subject: their
    wraps of its DEK (packets), and any text about them a source wrote (pushed flags).

    The hook gets ``(session, subject_id)``, deletes (or NULLs) every copy of that subject's DEK
    and every such text it holds, flushes, and returns how many DEK wraps it removed.
    """
    if hook not in ERASURE_HOOKS:
        ERASURE_HOOKS.append(hook)


def get_subject(*, session: Session, pseudonym: str) -> Subject:
    subject = session.exec(  # type: ignore[call-overload]
        select(Subject).where(Subject.pseudonym == pseudonym)  # type: ignore[arg-type]
    ).scalar_one_or_none()
    if subject is None:
        raise SubjectNotFound("no subject with this pseudonym")
    found: Subject = subject
    return found


def erase_subject(
    *,
    session: Session,
    pseudonym: str,
    actor: str,
    role: str,
    request_id: str | None = None,
) -> SubjectErasurePublic:
    """Crypto-shred one subject: its wrapped DEKs (vault and packets) and identity ciphertext.

    Pseudonymized events remain. Erasing twice is harmless and logged again; the second time
    removes what an older version of the service left (a pushed text, a request digest). Waits
    for the ingests and pushes in progress (``lock_against_erasure``), then for a partitioning
    in progress (``lock_subject_keys``), whose new packet wraps it then removes, and (in the
    packets' hook) for every request holding one of the subject's packets. In that order: while
    it waits for a long ingest batch, partitionings go on.
    """
    lock_against_erasure(session.connection(), shared=False)
    lock_subject_keys(session)
    subject = get_subject(session=session, pseudonym=pseudonym)
    already = subject.erased_at is not None
    erased_at = subject.erased_at or datetime.now(UTC)
    removed = 0
    if not already:
        subject.wrapped_dek = None
        subject.identity_ciphertext = None
        subject.erased_at = erased_at
        subject.updated_at = erased_at
        session.add(subject)
        session.flush()
    # Every time: each of these removes only what is still there.
    for hook in ERASURE_HOOKS:
        removed += hook(session, int(subject.id or 0))
    session.connection().execute(
        update(BATCHES)
        .where(
            BATCHES.c.request_digest.not_in(("", ERASED_DIGEST, EXPIRED_DIGEST)),
            BATCHES.c.response.contains(f'"{pseudonym}"', autoescape=True),
        )
        .values(request_digest=ERASED_DIGEST)
    )
    request_purge(session)
    events_kept = (
        session.connection()
        .execute(select(func.count()).select_from(EVENTS).where(EVENTS.c.subject_id == subject.id))
        .scalar_one()
    )
    append(
        session=session,
        entry=LogEntry(
            actor=actor,
            role=role,
            action="subject.erase",
            object_type="subject",
            object_id=pseudonym,
            pseudonyms=(pseudonym,),
            reason="already erased" if already else f"packet_wraps_removed={removed}",
            request_id=request_id,
        ),
    )
    return SubjectErasurePublic(
        pseudonym=pseudonym,
        erased_at=erased_at,
        already_erased=already,
        events_kept=int(events_kept),
    )


# -- key rotation: what depends on which key version ------------------------------------------


@dataclass(frozen=True)
class WrappedKeyColumn:
    """A column holding ``wrap_key`` strings of one purpose, with how to rebuild each row's AAD.

    The packets engineer registers the packet-key column here (``register_wrapped_key_column``)
    so ``keys rewrap`` moves it forward and ``keys retire`` refuses while it still depends on an
    old version.
    """

    purpose: Purpose
    table: str
    column: str
    aad_columns: tuple[str, ...]
    aad: Callable[[Mapping[str, Any]], Mapping[str, AadValue]] = field(compare=False)


WRAPPED_KEY_COLUMNS: list[WrappedKeyColumn] = [
    WrappedKeyColumn(
        purpose="vault",
        table="subjects",
        column="wrapped_dek",
        aad_columns=("pseudonym",),
        aad=lambda row: dek_aad(str(row["pseudonym"])),
    )
]


def register_wrapped_key_column(column: WrappedKeyColumn) -> None:
    if column not in WRAPPED_KEY_COLUMNS:
        WRAPPED_KEY_COLUMNS.append(column)


def _table(name: str) -> Any:
    from service.schema import metadata

    return metadata.tables[name]


def count_key_dependents(*, session: Session, purpose: Purpose, version: int) -> int:
    """How many rows still need ``purpose`` key ``version``.

    Refuses (raises ``KeyStillInUse``) when nothing is registered that could tell, so an
    unknown dependency is never mistaken for none.
    """
    if purpose == "log_signing":
        # Nothing is encrypted under a signing key: stored checkpoints keep their signatures,
        # the service re-checks them by their content, and auditors verify them with the
        # public key they pinned.
        return 0
    connection = session.connection()
    if purpose == "pseudonym":
        return int(
            connection.execute(
                select(func.count())
                .select_from(SUBJECTS)
                .where(SUBJECTS.c.pseudonym_key_version == version)
            ).scalar_one()
        )
    columns = [c for c in WRAPPED_KEY_COLUMNS if c.purpose == purpose]
    if not columns:
        raise KeyStillInUse(
            f"no wrapped-key column is registered for {purpose!r} keys, so it cannot be shown "
            "that nothing depends on this version"
        )
    total = 0
    for wrapped in columns:
        table = _table(wrapped.table)
        total += int(
            connection.execute(
                select(func.count())
                .select_from(table)
                .where(table.c[wrapped.column].like(f"v1.{version}.%"))
            ).scalar_one()
        )
    return total


def pending_rewraps(*, session: Session, keyring: KeyProvider, wrapped: WrappedKeyColumn) -> int:
    table = _table(wrapped.table)
    current = keyring.current(wrapped.purpose).version
    column = table.c[wrapped.column]
    return int(
        session.connection()
        .execute(
            select(func.count())
            .select_from(table)
            .where(column.is_not(None), column.not_like(f"v1.{current}.%"))
        )
        .scalar_one()
    )


def _wraps(wrapped: WrappedKeyColumn) -> tuple[Select[Any], Any, Any]:
    """The rows holding a wrap in ``wrapped``'s column, each with what opens it (its key, the
    wrap, its AAD columns); and the table and its key column."""
    table = _table(wrapped.table)
    key = _row_key(table)
    names = list(dict.fromkeys((key.name, wrapped.column, *wrapped.aad_columns)))
    query = select(*(table.c[name] for name in names)).where(table.c[wrapped.column].is_not(None))
    return query, table, key


# How many of a column's wraps ``opens_under`` tries: one damaged row does not decide.
SAMPLED_WRAPS = 5


def opens_under(*, session: Session, keyring: KeyProvider) -> bool | None:
    """Whether what this database holds is sealed under ``keyring``: True when one of the
    last few wraps of some wrapped-key column opens under one of its keys, False when wraps
    exist and none tried opens (another installation's keyring), None when the database holds
    no wrap at all (a new one). Only the wrapped keys are opened; no identity is decrypted.
    Tells a key command pointed at the wrong database from one pointed at its own, by a proof
    no database can give without the keyring."""
    found = False
    connection = session.connection()
    for wrapped in WRAPPED_KEY_COLUMNS:
        query, _, key = _wraps(wrapped)
        rows = connection.execute(query.order_by(key.desc()).limit(SAMPLED_WRAPS)).mappings()
        for row in rows:
            found = True
            try:
                unwrap_key(
                    keyring, wrapped.purpose, row[wrapped.column], aad=wrapped.aad(dict(row))
                )
            except (DecryptionFailed, UnknownKey):
                continue
            return True
    return False if found else None


RowKey = int | str
K = TypeVar("K", int, str)


class RewrapFailed(Exception):
    """A wrap could not be opened to be moved; the message names its table, column and row."""


def _row_key(table: Any) -> Any:
    """The single-column primary key rewrap pages by (an int id, a UUID string, ...)."""
    columns = list(table.primary_key.columns)
    if len(columns) != 1:
        raise ValueError(f"{table.name} needs a single-column primary key to be rewrapped")
    return columns[0]


@overload
def rewrap_chunk(
    *,
    session: Session,
    keyring: KeyProvider,
    wrapped: WrappedKeyColumn,
    after_id: K,
    limit: int,
    on_unopened: Callable[[RowKey, str], None] | None = None,
) -> tuple[K, int]: ...


@overload
def rewrap_chunk(
    *,
    session: Session,
    keyring: KeyProvider,
    wrapped: WrappedKeyColumn,
    after_id: None = None,
    limit: int,
    on_unopened: Callable[[RowKey, str], None] | None = None,
) -> tuple[RowKey | None, int]: ...


def rewrap_chunk(
    *,
    session: Session,
    keyring: KeyProvider,
    wrapped: WrappedKeyColumn,
    after_id: RowKey | None = None,
    limit: int,
    on_unopened: Callable[[RowKey, str], None] | None = None,
) -> tuple[RowKey | None, int]:
    """Move up to ``limit`` wraps (in primary-key order, after ``after_id``; from the start when
    it is None) to the current KEK version.

    A wrap that cannot be opened (it fails its integrity check, or its version is no longer in
    the keyring) stays as it is: with ``on_unopened`` the row's key and why are passed to it and
    the chunk goes on; without, ``RewrapFailed`` names the row and nothing of the chunk is
    written.

    Keyset pagination on the table's primary key, whatever its type (an int id, a UUID string).
    Only the wrapped keys are unwrapped and re-wrapped; no identity is decrypted. Returns
    ``(last key seen, rows rewrapped)``, counting only the rows actually written; the last key
    is ``after_id`` when nothing was left.
    Resumable: rows already under the current version are skipped, and a row whose wrap changed
    since it was read (shredded, erased, rewrapped by another run) is left alone.
    """
    query, table, key = _wraps(wrapped)
    column = table.c[wrapped.column]
    current = keyring.current(wrapped.purpose).version
    query = query.where(column.not_like(f"v1.{current}.%"))
    if after_id is not None:
        query = query.where(key > after_id)
    connection = session.connection()
    rows = connection.execute(query.order_by(key).limit(limit)).mappings().all()
    if not rows:
        return after_id, 0
    updates = []
    for row in rows:
        try:
            if token_version(row[wrapped.column]) == current:
                continue
            moved_wrap = rewrap_key(
                keyring, wrapped.purpose, row[wrapped.column], aad=wrapped.aad(dict(row))
            )
        except (DecryptionFailed, UnknownKey) as exc:
            version = token_version(row[wrapped.column]) if isinstance(exc, UnknownKey) else 0
            why = (
                f"{wrapped.purpose} v{version} is not in the keyring"
                if isinstance(exc, UnknownKey)
                else "it fails its integrity check"
            )
            if on_unopened is None:
                raise RewrapFailed(
                    f"{wrapped.table}.{wrapped.column} of row {row[key.name]} cannot be "
                    f"rewrapped: {why}"
                ) from None
            on_unopened(row[key.name], why)
            continue
        updates.append({"_key": row[key.name], "_old": row[wrapped.column], "_wrapped": moved_wrap})
    moved = 0
    if updates:
        moved = connection.execute(
            update(table)
            .where(key == bindparam("_key"), column == bindparam("_old"))
            .values({wrapped.column: bindparam("_wrapped")}),
            updates,
        ).rowcount
    last: RowKey = rows[-1][key.name]
    return last, int(moved)
