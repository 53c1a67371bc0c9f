"""Bulk ingest for ``casepackets import`` and ``demo``: batches, each its own transaction.

Invariants:
- every batch goes through ``service.ingest_batch``, the same path as ``POST /v1/records/batch``;
- a batch commits whole or not at all, so an interrupted import never leaves half a batch;
  re-running it is harmless (source event ids make events idempotent);
- the file is streamed line by line; memory holds one batch, plus a keyed digest per subject
  and per event of the file so that a line's fate does not depend on the batch size (see
  ``_SeenInFile``);
- a rejected CSV line is reported by its line number and field, never by its content, and
  every physical line of the file is stored, rejected or blank: a record over several lines (a
  quoted value holding a line break, such as a stray opening quote makes) is rejected with
  every line it covers, and a line with more or fewer values than the header is rejected;
- a batch the service refuses for particular rows (an event id stored before with other
  content) is stored again without those rows' subjects, whose lines are rejected; a batch is
  tried at most ``_TRIES_PER_BATCH`` times;
- the import is refused (``ImportRefused``) only before anything is stored; a problem after
  that stops it, and the result says at which line (``BulkResult.stopped``): every line before
  it was stored or rejected, nothing from it on was stored.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import ValidationError
from pydantic_core import ErrorDetails
from sqlalchemy.exc import DBAPIError

from service.crypto.keyring import KeyProvider
from service.crypto.pseudonym import InvalidBsn, normalize_bsn
from service.db import Database
from service.errors import ServiceError
from service.records.models import (
    MAX_SUBJECT_EVENTS,
    RECORD_BATCH,
    SUBJECT_RECORD,
    SubjectRecordIn,
    postcode_as_stored,
)
from service.records.service import BatchInvalid, ingest_batch

IDENTITY_COLUMNS = (
    "bsn",
    "given_name",
    "family_name",
    "birth_date",
    "street",
    "postcode",
    "city",
    "phone",
    "email",
)
CHARACTERISTIC_COLUMNS = ("district", "neighbourhood", "birth_year", "household_type")
EVENT_COLUMNS = ("event_type", "event_date", "office", "source_event_id")
CSV_COLUMNS = IDENTITY_COLUMNS + CHARACTERISTIC_COLUMNS + EVENT_COLUMNS
REQUIRED_COLUMNS = frozenset(
    ("bsn", "given_name", "family_name", "birth_date", "district", "neighbourhood")
)


@dataclass
class Rejection:
    line: int
    fields: tuple[str, ...]
    reason: str


@dataclass
class Stop:
    """Where and why an import stopped after it may have stored batches."""

    line: int
    reason: str


@dataclass
class BulkResult:
    subjects: int = 0
    events_stored: int = 0
    events_already_known: int = 0
    batches: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    rejected_total: int = 0
    stopped: Stop | None = None


class ImportRefused(ValueError):
    """The file cannot be imported at all (its header line); nothing was stored."""


Progress = Callable[[int, int], None]  # (subjects in the batch just committed, bytes read)

# Each refusal for particular rows leaves at least one subject out, so retrying ends anyway; the
# bound keeps a batch that keeps failing on other rows (other importers storing the same event
# ids meanwhile) from costing a transaction per subject.
_TRIES_PER_BATCH = 4


def _commit_batch(
    *,
    database: Database,
    keyring: KeyProvider,
    event_types: frozenset[str],
    source: str,
    actor: str,
    subjects: list[SubjectRecordIn],
    max_rows: int,
    result: BulkResult,
) -> None:
    """Store one batch and count its events; the caller counts its subjects."""
    with database.transaction() as session:
        answer = ingest_batch(
            session=session,
            keyring=keyring,
            event_types=event_types,
            source=source,
            subjects=subjects,
            max_rows=max_rows,
            idempotency_key=None,
            actor=actor,
            role="system",
        )
    result.events_stored += answer.events_stored
    result.events_already_known += answer.events_already_known
    result.batches += 1


def ingest_records(
    *,
    database: Database,
    keyring: KeyProvider,
    event_types: frozenset[str],
    source: str,
    actor: str,
    records: Iterable[dict[str, Any]],
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> BulkResult:
    """Validate and ingest already-shaped records (the demo generator) batch by batch."""
    result = BulkResult()
    pending: list[dict[str, Any]] = []

    def flush() -> None:
        batch = RECORD_BATCH.validate_python({"subjects": pending})
        _commit_batch(
            database=database,
            keyring=keyring,
            event_types=event_types,
            source=source,
            actor=actor,
            subjects=batch["subjects"],
            max_rows=batch_size,
            result=result,
        )
        result.subjects += len(pending)  # the generator makes each subject once
        if on_batch is not None:
            on_batch(len(pending))
        pending.clear()

    for record in records:
        pending.append(record)
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    return result


# -- CSV --------------------------------------------------------------------------------------


_UNDECODED = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of a byte not UTF-8


class _Lines:
    """The file's lines as text for ``csv``: LF, CRLF and CR each end a line. A byte that is not
    UTF-8 does not end the import: it is decoded as a lone surrogate and its line is noted, so
    that the CSV line holding it is rejected on its own. The bytes of the lines read so far are
    counted here, so that a pipe, which cannot tell its position, reads as well as a file."""

    def __init__(self, handle: BinaryIO) -> None:
        self._text = io.TextIOWrapper(
            handle, encoding="utf-8", errors="surrogateescape", newline=""
        )
        self.last_undecoded = 0
        self.bytes_read = 0

    def __iter__(self) -> Iterator[str]:
        for number, text in enumerate(self._text, 1):
            if text.isascii():
                self.bytes_read += len(text)
            else:
                # surrogateescape gives back each undecodable byte as it was.
                self.bytes_read += len(text.encode("utf-8", "surrogateescape"))
                if _UNDECODED.search(text):
                    self.last_undecoded = number
            yield text.removeprefix("\ufeff") if number == 1 else text


def _csv_problem(error: csv.Error) -> str:
    """The parser's complaint in our words (its own messages are fixed texts, but a line's
    content must never reach the terminal, so none is passed on)."""
    message = str(error)
    if message.startswith("field larger than field limit"):
        # Seldom a value that long; mostly a stray opening quote, whose value runs on over the
        # following lines until the limit.
        return f"a field is longer than {csv.field_size_limit()} characters (an unclosed quote?)"
    return "not valid CSV"


# What the API strips from a value (``str_strip_whitespace``: Unicode's White_Space). Plain
# ``str.strip`` also strips the information separators U+001C to U+001F, control characters the
# API refuses: a line holding one is rejected as its request would be.
_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


def _blank(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip(_WHITESPACE)
    return value or None


def _date_text(value: str | None) -> str | None:
    """A date as written, or None when blank: the API strips its text fields, but a date is the
    text YYYY-MM-DD and nothing else, so it refuses one with spaces around it, and so does the
    import."""
    return None if _blank(value) is None else value


@dataclass
class _Pending:
    lines: list[int]
    record: dict[str, Any]
    event_lines: list[int]  # the line of each of ``record["events"]``


@dataclass
class _Valid:
    subject: bytes
    pending: _Pending
    record: SubjectRecordIn


def _failing_rows(
    errors: Sequence[dict[str, Any]] | None, rows: int
) -> dict[int, list[dict[str, Any]]] | None:
    """A refused batch's errors by row, or None when one is not about a row of the batch (such
    as its size), which leaving rows out cannot mend."""
    if not errors:
        return None
    failing: dict[int, list[dict[str, Any]]] = {}
    for error in errors:
        row = error.get("row")
        if not isinstance(row, int) or not 0 <= row < rows:
            return None
        failing.setdefault(row, []).append(error)
    return failing


def _invalid(error: ErrorDetails) -> str:
    """Why a subject's record is invalid, in our words: pydantic's messages may quote the value."""
    if error["type"] == "too_long" and tuple(error["loc"]) == ("events",):
        held = error.get("ctx", {}).get("actual_length")
        return f"a subject has at most {MAX_SUBJECT_EVENTS} events per batch; this one has {held}"
    return "invalid value"


def _as_row_error(loc: Sequence[int | str], reason: str) -> dict[str, Any]:
    """A problem the import found in a subject's record, shaped as the service's error about a
    row of a batch (``_refused_lines``)."""
    return {"loc": ["subjects", 0, *loc], "msg": reason}


def _refused_lines(
    item: _Pending, errors: Sequence[dict[str, Any]]
) -> Iterator[tuple[list[int], str, str]]:
    """The lines, field and reason of each service error about one subject of a batch. An error
    about an event names that event's line; one about the subject names all its lines."""
    for error in errors:
        loc = [str(part) for part in error.get("loc", ())][2:]  # past "subjects", row
        about_event = len(loc) >= 2 and loc[0] == "events" and loc[1].isdigit()
        lines = [item.event_lines[int(loc[1])]] if about_event else item.lines
        # The service's messages name fields and rows, never a value (service/errors.py).
        yield lines, _field_names({"loc": loc}), str(error.get("msg", "refused"))


class _SeenInFile:
    """What earlier lines of the file said, so that a line is judged the same whichever batch it
    falls in: the first line of a BSN fixes the subject's identity and characteristics for the
    whole file, and a source_event_id belongs to one line of the file.

    Holds keyed digests only (BLAKE2b, 16 bytes, under a random key that lives as long as the
    import): per subject one of its BSN and one of its first line's identity and
    characteristics, per event one of its source_event_id; never a value in clear. This is the
    import's one memory cost that grows with the file: about 175 bytes per subject and 95 per
    event (some 460 MB for a million subjects with three events each); everything else is
    bounded by the batch.
    """

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._identities: dict[bytes, bytes] = {}
        self._event_ids: set[bytes] = set()
        self._stored: set[bytes] = set()

    def _digest(self, domain: bytes, value: str) -> bytes:
        return hashlib.blake2b(
            value.encode("utf-8", "surrogatepass"), key=self._key, digest_size=16, person=domain
        ).digest()

    def subject(self, bsn: str) -> bytes:
        """The subject's handle: a digest of its (normalized) BSN."""
        return self._digest(b"import.bsn", bsn)

    def same_identity(self, subject: bytes, values: Sequence[str | None]) -> bool:
        """True for the subject's first line and for every later line that repeats its values."""
        digest = self._digest(b"import.identity", json.dumps(values))
        return self._identities.setdefault(subject, digest) == digest

    def first_use_of(self, source_event_id: str) -> bool:
        digest = self._digest(b"import.event", source_event_id)
        if digest in self._event_ids:
            return False
        self._event_ids.add(digest)
        return True

    def stored_first_time(self, subject: bytes) -> bool:
        """Note that a batch stored the subject; True the first time (to count it once)."""
        if subject in self._stored:
            return False
        self._stored.add(subject)
        return True


def _subject_of(row: Mapping[str, str]) -> tuple[str, list[str | None], dict[str, Any]]:
    """The line's BSN (normalized, so "1234 56 782" and "123456782" are one subject; as written
    when invalid, which validation rejects), its identity and characteristics values, and its
    record."""
    identity = {name: _blank(row.get(name)) for name in IDENTITY_COLUMNS}
    identity["birth_date"] = _date_text(row.get("birth_date"))
    characteristics: dict[str, Any] = {
        name: _blank(row.get(name)) for name in CHARACTERISTIC_COLUMNS
    }
    bsn = identity["bsn"] or ""
    with contextlib.suppress(InvalidBsn):
        bsn = normalize_bsn(bsn)
    # Compared as the service stores them, so that lines of one person whose values differ only
    # in what it evens out (the API finds such a resend unchanged) are not told apart: a
    # postcode's case, and a birth year left to the birth date's.
    as_stored = {**identity, "bsn": bsn, **characteristics}
    if as_stored["postcode"] is not None:
        as_stored["postcode"] = postcode_as_stored(as_stored["postcode"])
    if as_stored["birth_year"] is None and as_stored["birth_date"] is not None:
        as_stored["birth_year"] = as_stored["birth_date"][:4]
    values = list(as_stored.values())
    return bsn, values, {"identity": identity, "characteristics": characteristics}


def _event_of(row: Mapping[str, str]) -> dict[str, Any] | None:
    values = {name: _blank(row.get(name)) for name in EVENT_COLUMNS}
    values["event_date"] = _date_text(row.get("event_date"))
    if not any(values.values()):
        return None
    return {
        "type": values["event_type"],
        "date": values["event_date"],
        "office": values["office"],
        "source_event_id": values["source_event_id"],
    }


def _field_names(error: dict[str, Any]) -> str:
    loc = [str(part) for part in error.get("loc", ())]
    if len(loc) >= 3 and loc[0] == "events":
        return {"type": "event_type", "date": "event_date"}.get(loc[-1], loc[-1])
    return loc[-1] if loc else "row"


def _holds_line_break(values: Sequence[str]) -> bool:
    return any("\n" in value or "\r" in value for value in values)


def _line_break_problem(first: int, last: int) -> str:
    """Why a record whose values hold a line break is rejected. Only a quoted value can hold one;
    such a value is rarely meant, and a stray opening quote makes one of every line up to the
    next quote (or the end of the file)."""
    if last > first:
        where = f"runs over lines {first}–{last}"
    else:
        where = "is not closed by the end of the file"
    return f"a quoted value {where}: an unclosed quote? values may not contain line breaks"


def _header_refusal(names: Sequence[str]) -> str | None:
    """What is wrong with the header line, or None.

    Says only our own column names and the positions of the others: in a file without a header
    line the first line is a person's data, and the header's values are never printed.
    """
    if not names:
        return "the file is empty; it must start with a header line"
    known = [name for name in names if name in CSV_COLUMNS]
    if not known:
        return (
            "line 1 is not a header line (it has none of the columns); the file must start "
            f"with one, using the columns {', '.join(CSV_COLUMNS)}"
        )
    problems = []
    missing = REQUIRED_COLUMNS.difference(names)
    if missing:
        problems.append(f"missing {', '.join(sorted(missing))}")
    unknown = [position for position, name in enumerate(names, 1) if name not in CSV_COLUMNS]
    if unknown:
        shown = ", ".join(map(str, unknown[:10])) + (" …" if len(unknown) > 10 else "")
        plural = "s" if len(unknown) > 1 else ""
        problems.append(f"{len(unknown)} unrecognised column{plural} (column{plural} {shown})")
    twice = sorted({name for name in known if known.count(name) > 1})
    if twice:
        problems.append(f"{', '.join(twice)} more than once")
    if not problems:
        return None
    return f"the header line must use the columns {', '.join(CSV_COLUMNS)}; " + "; ".join(problems)


def import_csv(
    *,
    database: Database,
    keyring: KeyProvider,
    event_types: frozenset[str],
    path: Path,
    source: str,
    actor: str,
    batch_size: int,
    keep_rejections: int = 1000,
    on_progress: Progress | None = None,
) -> BulkResult:
    """Stream a CSV (one line per event; see ``CSV_COLUMNS``) into the store, batch by batch.

    Lines of one subject (same BSN, however written) are grouped within a batch. A line whose
    identity or characteristics differ from the first line of its BSN, or whose source_event_id
    an earlier line had, is rejected on its own, whatever the batch size (see ``_SeenInFile``).
    Within a batch, a subject with any other rejected line is left out whole, also when the
    service refuses one of its lines (an event id stored before with other content) and the rest
    of the batch is stored without it; lines of it in an earlier batch are stored by then, so
    keep a subject's lines together for all or nothing.
    """
    result = BulkResult()
    seen = _SeenInFile()
    pending: dict[bytes, _Pending] = {}

    def reject(lines: Iterable[int], fields: Iterable[str], reason: str) -> None:
        for line in lines:
            result.rejected_total += 1
            if len(result.rejected) < keep_rejections:
                result.rejected.append(Rejection(line, tuple(fields), reason))

    def leave_out(item: _Pending, errors: Sequence[dict[str, Any]]) -> None:
        """Reject the lines of a refused subject: each line the errors name once, with its
        fields and reasons, and the subject's other lines as left out with it."""
        named: dict[int, tuple[dict[str, None], dict[str, None]]] = {}
        for lines, field_name, reason in _refused_lines(item, errors):
            for line in lines:
                fields, reasons = named.setdefault(line, ({}, {}))
                fields[field_name] = None
                reasons[reason] = None
        left_out_for = f"its subject is left out for line {min(named)}"
        for line in sorted(item.lines):
            if line in named:
                fields, reasons = named[line]
                reject([line], sorted(fields), "; ".join(reasons))
            else:
                reject([line], ("row",), left_out_for)

    def commit(batch: list[_Valid], first_line: int) -> list[_Valid] | None:
        """Store the batch, leaving out the subjects the service refuses; the subjects stored, or
        None when the import stops at the batch."""

        def stop(reason: str) -> None:
            result.stopped = Stop(first_line, reason)

        tries = 0
        while batch:
            tries += 1
            try:
                _commit_batch(
                    database=database,
                    keyring=keyring,
                    event_types=event_types,
                    source=source,
                    actor=actor,
                    subjects=[valid.record for valid in batch],
                    max_rows=batch_size,
                    result=result,
                )
            except BatchInvalid as exc:
                failing = _failing_rows(exc.errors, len(batch))
                if failing is None:
                    # Not about particular rows (its detail then names none): leaving rows
                    # out cannot mend it.
                    stop(f"the batch from this line on was refused ({exc.detail})")
                    return None
                for row, errors in failing.items():
                    leave_out(batch[row].pending, errors)
                batch = [valid for row, valid in enumerate(batch) if row not in failing]
                if batch and tries == _TRIES_PER_BATCH:
                    stop(
                        f"the batch from this line on was refused {tries} times, each time for "
                        "other lines (rejected as listed)"
                    )
                    return None
            except ServiceError as exc:
                stop(f"the batch from this line on was refused ({exc.detail})")
                return None
            except DBAPIError as exc:
                # The driver's message may quote a value of the batch; its class name says enough.
                name = type(exc.orig if exc.orig is not None else exc).__name__
                stop(f"the database refused the batch from this line on ({name})")
                return None
            else:
                return batch
        return batch

    def flush(read_bytes: int) -> None:
        batch: list[_Valid] = []
        for subject, item in pending.items():
            try:
                record = SUBJECT_RECORD.validate_python(item.record)
            except ValidationError as exc:
                leave_out(item, [_as_row_error(e["loc"], _invalid(e)) for e in exc.errors()])
                continue
            unknown = [
                _as_row_error(("events", number, "type"), "unknown event type")
                for number, event in enumerate(record["events"])
                if event["type"] not in event_types
            ]
            if unknown:
                leave_out(item, unknown)
                continue
            batch.append(_Valid(subject, item, record))
        first_line = min((item.lines[0] for item in pending.values()), default=0)
        pending.clear()
        stored = commit(batch, first_line)
        if stored is None:
            return
        result.subjects += sum(seen.stored_first_time(valid.subject) for valid in stored)
        if on_progress is not None:
            on_progress(len(stored), read_bytes)

    with path.open("rb") as handle:
        lines = _Lines(handle)
        # csv.reader rather than DictReader: DictReader skips blank lines unseen, so where a
        # record starts, and hence whether it spans several lines, would be unknown.
        reader = csv.reader(lines)
        try:
            names = next(reader, [])
        except csv.Error as exc:
            raise ImportRefused(f"{path}: line 1: {_csv_problem(exc)}") from None
        if lines.last_undecoded:
            raise ImportRefused(f"{path}: line 1 is not UTF-8; the file must be UTF-8")
        refusal = _header_refusal(names)
        if refusal is not None:
            raise ImportRefused(f"{path}: {refusal}")
        unreadable: Stop | None = None
        while True:
            first = reader.line_num + 1
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                # Where the next record starts is unknown now; the lines before this record's
                # first are whole, so the import stops there and no line goes unreported.
                unreadable = Stop(first, _csv_problem(exc))
                break
            line = reader.line_num
            if not values:
                continue  # a blank line
            if _holds_line_break(values):
                reject(range(first, line + 1), ("row",), _line_break_problem(first, line))
                continue
            if lines.last_undecoded >= first:
                reject([line], ("row",), "not UTF-8")
                continue
            if len(values) > len(names):
                reject([line], ("row",), "more values than header columns")
                continue
            if len(values) < len(names):
                reject([line], ("row",), "fewer values than header columns")
                continue
            row = dict(zip(names, values, strict=True))
            bsn, identity_values, record = _subject_of(row)
            subject = seen.subject(bsn)
            if not seen.same_identity(subject, identity_values):
                reject([line], ("identity",), "differs from an earlier line of the same BSN")
                continue
            event = _event_of(row)
            event_id = None if event is None else event["source_event_id"]
            if event_id is not None and not seen.first_use_of(event_id):
                reject(
                    [line], ("source_event_id",), "repeats the source_event_id of an earlier line"
                )
                continue
            item = pending.get(subject)
            if item is None:
                if len(pending) >= batch_size:
                    flush(lines.bytes_read)
                    if result.stopped is not None:
                        break
                item = _Pending(lines=[], record={**record, "events": []}, event_lines=[])
                pending[subject] = item
            item.lines.append(line)
            if event is not None:
                item.record["events"].append(event)
                item.event_lines.append(line)
        if pending and result.stopped is None:
            flush(lines.bytes_read)
    if result.stopped is None:
        result.stopped = unreadable
    return result


def write_csv_header(handle: io.TextIOBase) -> None:
    csv.writer(handle).writerow(CSV_COLUMNS)
