"""Record store services: ingest into the identity vault, identity decryption, erasure, rewrap.

Invariants:
- an identity is encrypted (AES-256-GCM) under the subject's own random DEK before it touches the
  database; the DEK is stored only wrapped by the vault KEK; both are bound to their column and row
  (the pseudonym) through associated data, never to the person's data;
- a batch is all-or-nothing: every failing row is reported in one 422 and nothing is flushed;
- the same ``Idempotency-Key`` (per source) returns the stored first answer; the same
  (source, source event id) never stores a second event;
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    String,
    any_,
    bindparam,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlmodel import Session

from service.access_log.service import LogEntry, append
from service.crypto.envelope import (
    AadValue,
    DataKey,
    open_,
    rewrap_key,
    seal,
    token_version,
    unwrap_key,
    wrap_key,
)
from service.crypto.keyring import KeyProvider, KeyringError, Purpose
from service.crypto.pseudonym import pseudonymize
from service.errors import Conflict, Gone, NotFound, Unprocessable
from service.records.models import (
    Event,
    IdentityIn,
    IngestBatch,
    RecordBatchCreate,
    RecordBatchPublic,
    RowResultPublic,
    RowStatus,
    Subject,
    SubjectErasurePublic,
    SubjectRecordIn,
)

SUBJECTS = Subject.__table__  # type: ignore[attr-defined]
EVENTS = Event.__table__  # type: ignore[attr-defined]
BATCHES = IngestBatch.__table__  # type: ignore[attr-defined]
LOOKUP_CHUNK = 1000
T = TypeVar("T")


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
        return cls(**given.model_dump())


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


def identity_plaintext(given: IdentityIn) -> bytes:
    """The bytes that get encrypted: the validated identity as compact JSON."""
    return given.model_dump_json().encode("utf-8")


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
    """On PostgreSQL, ANALYZE ``subjects`` after it grew by a tenth (and at least 1,000 rows).

    Why: the foreign-key checks of the events insert use plans cached per connection; planned
    against a nearly empty table they scan it sequentially, which makes every later batch
    quadratic. ANALYZE refreshes the estimates and invalidates those plans.
    """
    if connection.dialect.name != "postgresql" or added < 1000:
        return
    estimate = connection.execute(
        text("SELECT reltuples FROM pg_class WHERE oid = 'subjects'::regclass")
    ).scalar()
    if estimate is None or estimate < 0 or added * 10 >= estimate:
        connection.execute(text("ANALYZE subjects, events"))


def _bulk_insert(
    connection: Connection, table: Any, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
) -> None:
    """Insert many rows the fastest way each engine offers (COPY on PostgreSQL).

    Values are already in the form the driver takes (dates and times bound by the dialect).
    """
    names = ", ".join(columns)
    if connection.dialect.name == "postgresql":
        driver: Any = connection.connection.driver_connection
        with (
            driver.cursor() as cursor,
            cursor.copy(f"COPY {table.name} ({names}) FROM STDIN") as copy,
        ):
            for row in rows:
                copy.write_row(row)
        return
    marks = ", ".join("?" for _ in columns)
    connection.exec_driver_sql(f"INSERT INTO {table.name} ({names}) VALUES ({marks})", rows)  # noqa: S608


def chunked(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def batch_errors(
    *, batch: RecordBatchCreate, event_types: frozenset[str], max_rows: int
) -> list[dict[str, Any]]:
    """Checks beyond the schema: row limit, event vocabulary, duplicates within the batch."""
    errors: list[dict[str, Any]] = []
    if len(batch.subjects) > max_rows:
        errors.append(
            {"row": None, "loc": ["subjects"], "msg": f"a batch holds at most {max_rows} subjects"}
        )
        return errors
    first_row_of_bsn: dict[str, int] = {}
    event_id_counts = Counter(e.source_event_id for r in batch.subjects for e in r.events)
    for row, record in enumerate(batch.subjects):
        seen = first_row_of_bsn.setdefault(record.identity.bsn, row)
        if seen != row:
            errors.append(
                {
                    "row": row,
                    "loc": ["subjects", row, "identity", "bsn"],
                    "msg": f"same subject as row {seen}; send each subject once per batch",
                }
            )
        for index, event in enumerate(record.events):
            loc: list[str | int] = ["subjects", row, "events", index]
            if event.type not in event_types:
                errors.append(
                    {
                        "row": row,
                        "loc": [*loc, "type"],
                        "msg": "unknown event type (see policies/events.yaml)",
                    }
                )
            if event_id_counts[event.source_event_id] > 1:
                errors.append(
                    {
                        "row": row,
                        "loc": [*loc, "source_event_id"],
                        "msg": "source_event_id occurs more than once in this batch",
                    }
                )
    return errors


def batch_digest(*, keyring: KeyProvider, batch: RecordBatchCreate) -> str:
    """A keyed digest of the batch content (no identity can be guessed from it)."""
    key = keyring.current("pseudonym")
    mac = hmac.new(
        key.material,
        b"casepackets/idempotency/v1\x00" + batch.model_dump_json().encode(),
        hashlib.sha256,
    )
    return f"{key.version}:{mac.hexdigest()}"


def digest_matches(*, keyring: KeyProvider, batch: RecordBatchCreate, stored: str) -> bool:
    version_text, _, expected = stored.partition(":")
    try:
        key = keyring.get("pseudonym", int(version_text))
    except (ValueError, KeyringError):
        return False
    mac = hmac.new(
        key.material,
        b"casepackets/idempotency/v1\x00" + batch.model_dump_json().encode(),
        hashlib.sha256,
    )
    return hmac.compare_digest(mac.hexdigest(), expected)


def _replay(stored: Mapping[str, Any]) -> RecordBatchPublic:
    answer = json.loads(stored["response"])
    return RecordBatchPublic(
        batch_id=stored["id"],
        source=stored["source"],
        subjects=answer["subjects"],
        events_stored=answer["events_stored"],
        events_already_known=answer["events_already_known"],
        replayed=True,
        rows=[
            RowResultPublic.model_construct(row=r, pseudonym=p, status=s)
            for r, p, s in answer["rows"]
        ],
    )


@dataclass
class _Known:
    id: int
    pseudonym: str
    identity_ciphertext: str | None
    wrapped_dek: str | None
    characteristics: tuple[Any, ...]


def _characteristics(record: SubjectRecordIn) -> tuple[Any, ...]:
    c = record.characteristics
    birth_year = c.birth_year if c.birth_year is not None else record.identity.birth_date.year
    return (c.district, c.neighbourhood, birth_year, c.household_type)


def _among(connection: Connection, column: Any, values: Sequence[str]) -> Any:
    """``column IN values``; on PostgreSQL as ``= ANY(one text[] parameter)``.

    Why: a list of separately cast parameters is not a constant to the planner, so PostgreSQL
    compares each row against every value (quadratic per batch); one array parameter is hashed
    and can use the index.
    """
    if connection.dialect.name == "postgresql":
        return column == any_(bindparam(None, list(values), type_=postgresql.ARRAY(String)))
    return column.in_(values)


def _known_event_ids(connection: Connection, *, source: str, ids: Sequence[str]) -> set[str]:
    """Which of ``ids`` this source has sent before.

    On PostgreSQL one query joins an unnested array parameter against the unique index; an
    ``IN`` list of separately bound values is compared row by row, which grows with the table.
    """
    if not ids:
        return set()
    if connection.dialect.name == "postgresql":
        rows = connection.execute(
            text(
                "SELECT e.source_event_id FROM unnest(CAST(:ids AS text[])) AS sent(id) "
                "JOIN events e ON e.source = :source AND e.source_event_id = sent.id"
            ),
            {"ids": list(ids), "source": source},
        ).scalars()
        return set(rows)
    found: set[str] = set()
    for chunk in chunked(ids, LOOKUP_CHUNK):
        found.update(
            connection.execute(
                select(EVENTS.c.source_event_id).where(
                    EVENTS.c.source == source, EVENTS.c.source_event_id.in_(chunk)
                )
            ).scalars()
        )
    return found


def _find_known(session: Session, candidates: Sequence[str]) -> dict[str, _Known]:
    connection = session.connection()
    known: dict[str, _Known] = {}
    for chunk in chunked(candidates, LOOKUP_CHUNK):
        rows = connection.execute(
            select(
                SUBJECTS.c.id,
                SUBJECTS.c.pseudonym,
                SUBJECTS.c.identity_ciphertext,
                SUBJECTS.c.wrapped_dek,
                SUBJECTS.c.district,
                SUBJECTS.c.neighbourhood,
                SUBJECTS.c.birth_year,
                SUBJECTS.c.household_type,
            ).where(_among(connection, SUBJECTS.c.pseudonym, chunk))
        )
        for row in rows:
            known[row.pseudonym] = _Known(
                id=row.id,
                pseudonym=row.pseudonym,
                identity_ciphertext=row.identity_ciphertext,
                wrapped_dek=row.wrapped_dek,
                characteristics=(
                    row.district,
                    row.neighbourhood,
                    row.birth_year,
                    row.household_type,
                ),
            )
    return known


def ingest_batch(
    *,
    session: Session,
    keyring: KeyProvider,
    event_types: frozenset[str],
    source: str,
    batch: RecordBatchCreate,
    max_rows: int,
    idempotency_key: str | None,
    actor: str,
    role: str,
    request_id: str | None = None,
) -> RecordBatchPublic:
    """Store a batch of subjects and events, all or nothing; returns a pseudonym per row."""
    errors = batch_errors(batch=batch, event_types=event_types, max_rows=max_rows)
    if errors:
        rows = sorted({e["row"] for e in errors if e["row"] is not None})
        shown = ", ".join(str(r) for r in rows[:20]) + (" …" if len(rows) > 20 else "")
        raise BatchInvalid(
            f"batch rejected, nothing was stored; failing rows: {shown}"
            if rows
            else f"batch rejected, nothing was stored: {errors[0]['msg']}",
            errors=errors,
        )
    connection = session.connection()

    digest = ""
    if idempotency_key is not None:
        digest = batch_digest(keyring=keyring, batch=batch)
        stored = (
            connection.execute(
                select(BATCHES).where(
                    BATCHES.c.source == source, BATCHES.c.idempotency_key == idempotency_key
                )
            )
            .mappings()
            .first()
        )
        if stored is not None:
            if not digest_matches(keyring=keyring, batch=batch, stored=stored["request_digest"]):
                raise IdempotencyKeyReused(
                    "this Idempotency-Key was used for a different batch; use a new key"
                )
            return _replay(dict(stored))

    # Pseudonyms under every active key version (newest first): an older version's match wins
    # over creating a second subject for the same person.
    pseudonym_keys = keyring.active("pseudonym")
    current_key = keyring.current("pseudonym")
    per_version = [
        [pseudonymize(key.material, record.identity.bsn) for record in batch.subjects]
        for key in pseudonym_keys
    ]
    known = _find_known(session, sorted({p for candidates in per_version for p in candidates}))

    now = datetime.now(UTC)
    statuses: list[RowStatus] = []
    pseudonyms: list[str] = []
    new_rows: list[tuple[Any, ...]] = []
    new_positions: list[int] = []
    changed_rows: list[dict[str, Any]] = []
    subject_ids: list[int] = []
    current_candidates = per_version[pseudonym_keys.index(current_key)]
    for row, record in enumerate(batch.subjects):
        match = next((known[c[row]] for c in per_version if c[row] in known), None)
        characteristics = _characteristics(record)
        if match is None:
            pseudonym = current_candidates[row]
            dek = DataKey.generate()
            new_rows.append(
                (
                    pseudonym,
                    current_key.version,
                    *characteristics,
                    seal(dek, identity_plaintext(record.identity), aad=identity_aad(pseudonym)),
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
        plaintext = identity_plaintext(record.identity)
        dek = unwrap_key(keyring, "vault", match.wrapped_dek, aad=dek_aad(match.pseudonym))
        stored_plaintext = open_(dek, match.identity_ciphertext, aad=identity_aad(match.pseudonym))
        identity_changed = json.loads(stored_plaintext) != json.loads(plaintext)
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

        sent_ids = [e.source_event_id for record in batch.subjects for e in record.events]
        already = _known_event_ids(connection, source=source, ids=sent_ids)
        to_date = _binder(connection, EVENTS.c.date)
        event_rows = [
            (
                subject_id,
                source,
                event.source_event_id,
                event.type,
                to_date(event.date),
                event.office,
            )
            for subject_id, record in zip(subject_ids, batch.subjects, strict=True)
            for event in record.events
            if event.source_event_id not in already
        ]
        if event_rows:
            _bulk_insert(connection, EVENTS, EVENT_COLUMNS, event_rows)
        _refresh_statistics(connection, added=len(new_rows))

        batch_id = uuid.uuid4().hex
        answer = {
            "subjects": len(batch.subjects),
            "events_stored": len(event_rows),
            "events_already_known": len(sent_ids) - len(event_rows),
            "rows": [[r, p, s] for r, (p, s) in enumerate(zip(pseudonyms, statuses, strict=True))],
        }
        connection.execute(
            insert(BATCHES).values(
                id=batch_id,
                source=source,
                idempotency_key=idempotency_key,
                request_digest=digest,
                subject_count=len(batch.subjects),
                response=json.dumps(answer, separators=(",", ":")),
                created_at=now,
            )
        )
    except Exception as exc:
        if _is_integrity_error(exc):
            raise ConcurrentIngest(
                "another batch stored the same subjects, events or Idempotency-Key at the same "
                "time; nothing was stored, send the batch again"
            ) from None
        raise

    append(
        session=session,
        entry=LogEntry(
            actor=actor,
            role=role,
            action="records.ingest",
            object_type="batch",
            object_id=batch_id,
            reason=f"source={source} subjects={answer['subjects']} "
            f"events={answer['events_stored']}",
            request_id=request_id,
        ),
    )
    return RecordBatchPublic(
        batch_id=batch_id,
        source=source,
        subjects=len(batch.subjects),
        events_stored=len(event_rows),
        events_already_known=len(sent_ids) - len(event_rows),
        replayed=False,
        rows=[
            RowResultPublic.model_construct(row=r, pseudonym=p, status=s)
            for r, (p, s) in enumerate(zip(pseudonyms, statuses, strict=True))
        ],
    )


def _is_integrity_error(exc: Exception) -> bool:
    from sqlalchemy.exc import IntegrityError

    return isinstance(exc, IntegrityError)


# -- erasure ----------------------------------------------------------------------------------

ErasureHook = Callable[[Session, int], int]
ERASURE_HOOKS: list[ErasureHook] = []


def register_erasure_hook(hook: ErasureHook) -> None:
    """Other domains (packets) register a function that deletes their wraps of a subject's DEK.

    The hook gets ``(session, subject_id)``, deletes (or NULLs) every copy of that subject's DEK
    it holds, flushes, and returns how many it removed.
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

    Pseudonymized events remain. Erasing twice is harmless and logged again.
    """
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
        for hook in ERASURE_HOOKS:
            removed += hook(session, int(subject.id or 0))
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


def rewrap_chunk(
    *,
    session: Session,
    keyring: KeyProvider,
    wrapped: WrappedKeyColumn,
    after_id: int,
    limit: int,
) -> tuple[int, int]:
    """Move up to ``limit`` wraps (in id order, after ``after_id``) to the current KEK version.

    Only the wrapped keys are unwrapped and re-wrapped; no identity is decrypted. Returns
    ``(last id seen, rows rewrapped)``; the last id is ``after_id`` when nothing was left.
    Resumable: rows already under the current version are skipped.
    """
    table = _table(wrapped.table)
    column = table.c[wrapped.column]
    current = keyring.current(wrapped.purpose).version
    connection = session.connection()
    rows = (
        connection.execute(
            select(table.c.id, column, *(table.c[name] for name in wrapped.aad_columns))
            .where(
                table.c.id > after_id,
                column.is_not(None),
                column.not_like(f"v1.{current}.%"),
            )
            .order_by(table.c.id)
            .limit(limit)
        )
        .mappings()
        .all()
    )
    if not rows:
        return after_id, 0
    updates = [
        {
            "_id": row["id"],
            "_wrapped": rewrap_key(
                keyring, wrapped.purpose, row[wrapped.column], aad=wrapped.aad(dict(row))
            ),
        }
        for row in rows
        if token_version(row[wrapped.column]) != current
    ]
    if updates:
        connection.execute(
            update(table)
            .where(table.c.id == bindparam("_id"), column.is_not(None))
            .values({wrapped.column: bindparam("_wrapped")}),
            updates,
        )
    return int(rows[-1]["id"]), len(updates)
