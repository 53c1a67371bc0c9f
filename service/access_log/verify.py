"""Offline verification of an exported access log (no database, no service).

Invariant: ``verify_export`` returns only when the checkpoint's signature verifies under a key
the auditor trusts, the entries hash to exactly the signed root at exactly the signed size, and
(when a trusted checkpoint is given) the trusted checkpoint's signature verifies under the key
given for it (by default the same key), both checkpoints have the same origin, and the first
entries also hash to the trusted root — which proves the new tree extends the trusted one.

The keys trusted are the one given, and every key it handed signing over to: a handover
checkpoint (see ``handover``) opens under the trusted key, its root is the root of the exported
entries up to it, its last entry names the new key, and the new key cosigned it. A handover not
signed by the key trusted at that point is ignored; a key that handed signing over signs no later
checkpoint. With a trusted checkpoint, the key given for it is where trust starts: the new
checkpoint's key must be reached from it by handovers, unless the auditor vouches for the other
key given (``key_without_handover``, for rotations made before handovers existed). A trusted
checkpoint that key did not sign is opened by the key the handovers up to its size lead to (an
export taken after a rotation, checked against the key pinned before it). Anything
else raises ``VerificationFailed``; when the exported leaf hashes are themselves authenticated by
the signed root, the error names the first bad entry index.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import BinaryIO, Literal

from service.access_log.checkpoint import (
    Checkpoint,
    CheckpointError,
    parse_checkpoint,
    unverified_checkpoint,
)
from service.access_log.handover import ROTATION_PREFIX, handed_to
from service.access_log.merkle import HASH_SIZE, CompactRange, fold
from service.crypto.signing import NoteError, NotSignedBy, VerifierKey, open_note

Which = Literal["new", "trusted"]


class VerificationFailed(Exception):
    """The export does not verify. ``first_bad_index`` is set when it could be located."""

    def __init__(self, message: str, *, first_bad_index: int | None = None) -> None:
        super().__init__(message)
        self.first_bad_index = first_bad_index


class CheckpointRejected(VerificationFailed):
    """The new or the trusted checkpoint does not open under the key given for it.
    ``by_another_key`` is set when the note is well-formed but carries no signature by that key."""

    def __init__(self, which: Which, reason: str, *, by_another_key: bool = False) -> None:
        super().__init__(f"{which} checkpoint rejected: {reason}")
        self.which = which
        self.by_another_key = by_another_key


class KeyNotHandedOver(VerificationFailed):
    """The new checkpoint is signed by the key given for it, which no handover from the trusted
    checkpoint's key reaches: accepted only when the auditor says so (that older key signs
    nothing after the trusted checkpoint then)."""

    def __init__(self, trusted: VerifierKey, given: VerifierKey) -> None:
        super().__init__(
            f"new checkpoint rejected: no handover leads from the trusted checkpoint's key "
            f"{trusted} to {given}, the key that signed it"
        )


@dataclass(frozen=True)
class Verified:
    checkpoint: Checkpoint
    trusted: Checkpoint | None
    signed_by: VerifierKey | None = None
    handovers: tuple[int, ...] = ()  # the sizes of the handovers followed to ``signed_by``


def open_checkpoint(note: str, verifier: VerifierKey, *, which: Which) -> Checkpoint:
    try:
        checkpoint = parse_checkpoint(open_note(note, verifier))
    except (NoteError, CheckpointError) as exc:
        raise CheckpointRejected(
            which, str(exc), by_another_key=isinstance(exc, NotSignedBy)
        ) from None
    if checkpoint.origin != verifier.name:
        raise CheckpointRejected(
            which, f"its origin {checkpoint.origin!r} is not the key's name {verifier.name!r}"
        )
    return checkpoint


def _without_newline(line: bytes) -> bytes:
    if not line.endswith(b"\n"):
        raise VerificationFailed("every entry line must end with a newline")
    return line[:-1]


def read_hashes(handle: BinaryIO) -> Iterator[bytes]:
    while chunk := handle.read(HASH_SIZE * 4096):
        if len(chunk) % HASH_SIZE:
            raise VerificationFailed("the leaf-hashes file is not a whole number of hashes")
        for offset in range(0, len(chunk), HASH_SIZE):
            yield chunk[offset : offset + HASH_SIZE]


class _Roots:
    """The compact range of a stream of leaves, with the roots remembered at earlier sizes."""

    __slots__ = ("at", "compact", "roots")

    def __init__(self, at: Collection[int]) -> None:
        self.compact = CompactRange()
        self.at = at
        self.roots: dict[int, bytes] = {0: fold([])}

    def append(self, leaf: bytes) -> None:
        self.compact.append(leaf)
        if self.compact.size in self.at:
            self.roots[self.compact.size] = self.compact.root()


@dataclass(frozen=True)
class _Handover:
    note: str
    checkpoint: Checkpoint  # as the note says, before any signature is checked


def _handovers(notes: Sequence[str], *, origin: str, up_to: int) -> list[_Handover]:
    """The handovers of this log within the checkpoint, in tree-size order. All are kept, even
    two at one size: which one a trusted key signed is decided only when they are followed."""
    steps = []
    for note in notes:
        try:
            checkpoint = unverified_checkpoint(note)
        except CheckpointError as exc:
            raise VerificationFailed(f"a handover checkpoint is malformed: {exc}") from None
        if checkpoint.origin == origin and 0 < checkpoint.size <= up_to:
            steps.append(_Handover(note, checkpoint))
    return sorted(steps, key=lambda step: step.checkpoint.size)


def _follow(
    steps: Sequence[_Handover],
    key: VerifierKey,
    *,
    roots: dict[int, bytes],
    last_entries: dict[int, bytes],
) -> tuple[VerifierKey, tuple[int, ...], tuple[VerifierKey, ...]]:
    """The key ``key`` hands over to through ``steps`` (in size order), where, and every key
    on the way (``key`` first)."""
    followed = []
    through = [key]
    for step in steps:
        size = step.checkpoint.size
        try:
            open_note(step.note, key)
        except NotSignedBy:
            continue  # not signed by the key trusted at this point: nothing to follow
        except NoteError as exc:
            raise VerificationFailed(f"the handover checkpoint at size {size}: {exc}") from None
        if roots.get(size) != step.checkpoint.root:
            raise VerificationFailed(
                f"the log was rewritten: its first {size} entries no longer have the root of "
                f"the handover checkpoint at size {size}, signed by a trusted key"
            )
        new = handed_to(last_entries[size - 1])
        if new is None or new.name != key.name:
            raise VerificationFailed(
                f"the checkpoint at size {size} is not a handover: its last entry does not "
                "hand signing to a key of this log"
            )
        try:
            open_note(step.note, new)
        except NoteError:
            raise VerificationFailed(
                f"the handover at size {size} is not cosigned by the key it hands signing to"
            ) from None
        key = new
        followed.append(size)
        through.append(new)
    return key, tuple(followed), tuple(through)


def _handed_over_at(
    key: VerifierKey, named: dict[int, VerifierKey], *, signed_at: int | None
) -> int | None:
    """The tree size at which the entries show ``key`` handing signing over: the first rotation
    naming another key after one naming ``key``, or at or after ``signed_at`` (a size ``key`` is
    known to have signed, such as the trusted checkpoint's); None when they show none."""
    in_office = False
    for at in sorted(named):
        if named[at] == key:
            in_office = True
        elif in_office or (signed_at is not None and at >= signed_at):
            return at
    return None


def _signed_in_turn(
    checkpoint: Checkpoint,
    key: VerifierKey,
    named: dict[int, VerifierKey],
    *,
    which: Which,
    signed_at: int | None = None,
) -> None:
    """Refuse a checkpoint signed by a key other than the one the entries before it name last
    (or, at the size of a handover, the key it names): one left behind by a handover, however
    the handovers given were chosen. Refuse it too when ``key`` handed signing over before the
    checkpoint's size and a later entry names it again: only a key's own signature vouches for
    such an entry (a leaked old key handing signing back to itself)."""
    before = [at for at in named if at < checkpoint.size]
    if not before:
        return
    last = max(before)
    if key in (named[last], named.get(checkpoint.size)):
        handed_over = _handed_over_at(key, named, signed_at=signed_at)
        if handed_over is None or handed_over >= checkpoint.size:
            return
        raise CheckpointRejected(
            which,
            f"it is signed by {key}, which handed checkpoint signing over at size "
            f"{handed_over}: a key that handed signing over signs no later checkpoint, "
            "whatever later entries say",
        )
    raise CheckpointRejected(
        which,
        f"it is signed by {key}, but the entries hand checkpoint signing to {named[last]} at "
        f"size {last}: a key that handed signing over signs no later checkpoint (give every "
        "handover, from handovers.ndjson)",
    )


def root_of_lines(
    lines: Iterable[bytes], *, marked: list[tuple[int, bytes]] | None = None
) -> tuple[int, bytes]:
    """Size and RFC 6962 root of NDJSON lines (the verifier's hot loop, kept tight). With
    ``marked``, the lines that may hand signing over are added to it, each with the tree size
    it ends."""
    sha256 = hashlib.sha256
    peaks: list[bytes] = []
    size = 0
    line = b"\n"
    for line in lines:
        if marked is not None and line.startswith(ROTATION_PREFIX):
            marked.append((size + 1, line[:-1]))
        current = sha256(b"\x00" + line[:-1]).digest()
        position = size
        while position & 1:
            current = sha256(b"\x01" + peaks.pop() + current).digest()
            position >>= 1
        peaks.append(current)
        size += 1
    _without_newline(line)  # only the last line can lack it
    return size, fold(peaks)


def verify_export(
    *,
    entries: Iterable[bytes],  # NDJSON lines, each ending in a newline
    checkpoint_note: str,
    verifier: VerifierKey,
    trusted_note: str | None = None,
    trusted_verifier: VerifierKey | None = None,  # signed trusted_note; default: verifier
    leaf_hashes: Iterable[bytes] | None = None,
    handovers: Sequence[str] = (),  # handover checkpoints' notes (handovers.ndjson)
    key_without_handover: bool = False,  # accept ``verifier`` though no handover leads to it
) -> Verified:
    start = trusted_verifier or verifier
    try:
        claimed = unverified_checkpoint(checkpoint_note)
    except CheckpointError as exc:
        raise CheckpointRejected("new", str(exc)) from None
    trusted = None
    # A trusted checkpoint signed by a key that ``start`` handed signing over to (one exported
    # after a rotation) is opened once the handovers before it have been followed.
    trusted_by_another_key: CheckpointRejected | None = None
    if trusted_note is not None:
        try:
            trusted = open_checkpoint(trusted_note, start, which="trusted")
        except CheckpointRejected as rejected:
            if not (rejected.by_another_key and handovers):
                raise
            trusted_by_another_key = rejected
            try:
                trusted = unverified_checkpoint(trusted_note)
            except CheckpointError:
                raise rejected from None
            if trusted.origin != claimed.origin or trusted.size > claimed.size:
                # Claims of a note no key has vouched for yet: it is refused as unsigned.
                raise rejected
        if trusted.origin != claimed.origin:
            raise CheckpointRejected(
                "trusted",
                f"its origin {trusted.origin!r} is not the new checkpoint's "
                f"{claimed.origin!r}, and a log never changes origin",
            )
    if trusted is not None and trusted.size > claimed.size:
        raise VerificationFailed(
            f"the checkpoint (size {claimed.size}) is older than the trusted one "
            f"(size {trusted.size}): the log was rolled back"
        )
    steps = _handovers(handovers, origin=claimed.origin, up_to=claimed.size)

    marked: list[tuple[int, bytes]] = []
    if trusted is None and leaf_hashes is None and not steps:
        size, root = root_of_lines(entries, marked=marked)
        roots: dict[int, bytes] = {}
        last_entries: dict[int, bytes] = {}
        first_difference = None
        hashes_root = None
        hashes_size = 0
    else:
        wanted = {step.checkpoint.size for step in steps}
        if trusted is not None:
            wanted.add(trusted.size)
        entry_roots = _Roots(wanted)
        hash_roots = _Roots(())
        last_entries = {}
        first_difference = None
        for index, (data, given) in enumerate(zip_longest(entries, leaf_hashes or ())):
            leaf = None
            if data is not None:
                line = _without_newline(data)
                leaf = hashlib.sha256(b"\x00" + line).digest()
                entry_roots.append(leaf)
                if line.startswith(ROTATION_PREFIX):
                    marked.append((index + 1, line))
                if index + 1 in wanted:
                    last_entries[index] = line
            if given is not None:
                hash_roots.append(given)
            if leaf_hashes is not None and first_difference is None and leaf != given:
                first_difference = index
        size, root = entry_roots.compact.size, entry_roots.compact.root()
        roots = entry_roots.roots
        hashes_size, hashes_root = hash_roots.compact.size, hash_roots.compact.root()

    trusted_key = start if trusted is not None else None
    if trusted is not None and trusted_by_another_key is not None:
        before_trusted = [step for step in steps if step.checkpoint.size <= trusted.size]
        trusted_key, _, _ = _follow(before_trusted, start, roots=roots, last_entries=last_entries)
        if trusted_key == start:
            raise trusted_by_another_key
        try:
            trusted = open_checkpoint(trusted_note or "", trusted_key, which="trusted")
        except CheckpointRejected:
            raise trusted_by_another_key from None
    signer, followed, through = _follow(steps, start, roots=roots, last_entries=last_entries)
    if verifier in through:
        # A key that handed signing over signs no later checkpoint: only its successor does.
        checkpoint = open_checkpoint(checkpoint_note, signer, which="new")
    else:
        # ``verifier`` was given apart from the trusted checkpoint's key, and no handover from
        # that key reaches it: the older key (perhaps the leaked one a rotation retired) vouches
        # for nothing after the trusted checkpoint. Only ``verifier`` may have signed, on the
        # auditor's word.
        checkpoint = open_checkpoint(checkpoint_note, verifier, which="new")
        if not key_without_handover:
            raise KeyNotHandedOver(start, verifier)
        signer = verifier

    if size == checkpoint.size and root == checkpoint.root:
        if trusted is not None and roots.get(trusted.size) != trusted.root:
            raise VerificationFailed(
                f"the log was rewritten: its first {trusted.size} entries no longer have the "
                "trusted checkpoint's root, yet the service signed the new tree"
            )
        # The entries the signed root authenticates say which key signs when: whatever
        # handovers were given (or left out), a key that handed signing over signs no later
        # checkpoint.
        named = {at: key for at, line in marked if (key := handed_to(line)) is not None}
        # The trusted checkpoint's key signed at its size: a rotation from there on retires it.
        signed_at = trusted.size if trusted is not None and trusted_key == signer else None
        _signed_in_turn(checkpoint, signer, named, which="new", signed_at=signed_at)
        if trusted is not None and trusted_key is not None:
            _signed_in_turn(trusted, trusted_key, named, which="trusted")
        return Verified(
            checkpoint=checkpoint, trusted=trusted, signed_by=signer, handovers=followed
        )

    located = hashes_root == checkpoint.root and hashes_size == checkpoint.size
    if located and first_difference is not None:
        raise VerificationFailed(
            f"entry {first_difference} is not the entry the signed checkpoint commits to "
            f"(first bad index {first_difference})",
            first_bad_index=first_difference,
        )
    # A count that differs says entries were removed or added, not where: only authenticated
    # leaf hashes that match every entry given can tell it is the tail.
    unlocated = "" if located else " (which ones, only authenticated --leaf-hashes can tell)"
    if size < checkpoint.size:
        raise VerificationFailed(
            f"only {size} entries for a checkpoint of size {checkpoint.size}: "
            + (
                f"entries from index {size} are missing (first bad index {size})"
                if located
                else "entries are missing" + unlocated
            ),
            first_bad_index=size if located else None,
        )
    if size > checkpoint.size:
        raise VerificationFailed(
            f"{size} entries for a checkpoint of size {checkpoint.size}"
            + (
                f" (first bad index {checkpoint.size})"
                if located
                else ": entries were added" + unlocated
            ),
            first_bad_index=checkpoint.size if located else None,
        )
    raise VerificationFailed(
        "the entries do not hash to the signed root"
        + ("" if leaf_hashes is None else " (and the leaf hashes cannot locate the change)")
    )


def verify_files(
    *,
    entries: Path,
    checkpoint: Path,
    public_key: Path,
    trusted_checkpoint: Path | None = None,
    trusted_public_key: Path | None = None,  # default: public_key
    leaf_hashes: Path | None = None,
    handovers: Path | None = None,
    key_without_handover: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> Verified:
    """``verify_export`` over the files; ``on_progress`` hears how many bytes of the entries
    file were read, now and then and at the end."""
    verifier = _read_key(public_key, which="public key")
    trusted_verifier = (
        _read_key(trusted_public_key, which="trusted public key") if trusted_public_key else None
    )
    note = read_text(checkpoint)
    trusted = read_text(trusted_checkpoint) if trusted_checkpoint else None
    handover_notes = read_handovers(handovers) if handovers else []
    with (
        entries.open("rb") as entries_file,
        leaf_hashes.open("rb") if leaf_hashes else contextlib.nullcontext() as hashes_file,
    ):
        lines = bounded_lines(entries_file)
        return verify_export(
            entries=lines
            if on_progress is None
            else reporting_lines(lines, entries_file, on_progress),
            checkpoint_note=note,
            verifier=verifier,
            trusted_note=trusted,
            trusted_verifier=trusted_verifier,
            leaf_hashes=read_hashes(hashes_file) if hashes_file is not None else None,
            handovers=handover_notes,
            key_without_handover=key_without_handover,
        )


# Far above any entry the service writes (an ingest batch's pseudonyms are ~35 bytes a row): a
# longer line is refused before it is held in memory.
MAX_LINE_BYTES = 64 * 1024 * 1024


def reporting_lines(
    lines: Iterator[bytes], handle: BinaryIO, on_progress: Callable[[int], None]
) -> Iterator[bytes]:
    """``lines``, telling ``on_progress`` the position in ``handle`` every 10,000 lines."""
    for count, line in enumerate(lines, 1):
        if count % 10_000 == 0:
            on_progress(handle.tell())
        yield line
    on_progress(handle.tell())


def bounded_lines(handle: BinaryIO, *, limit: int = MAX_LINE_BYTES) -> Iterator[bytes]:
    """The lines of ``handle``, refusing one longer than ``limit`` bytes."""
    while line := handle.readline(limit + 1):
        if len(line) > limit:
            raise VerificationFailed(f"a line is longer than {limit} bytes")
        yield line


def read_text(path: Path) -> str:
    """A file's exact text: UTF-8, line endings as they are (a CR is not a newline here)."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise VerificationFailed(f"{path.name} is not UTF-8 text (byte {exc.start})") from None


def read_handovers(path: Path) -> list[str]:
    """The notes of a handovers.ndjson file: one ``{"size": n, "note": "..."}`` per line."""
    notes = []
    with path.open("rb") as handle:
        for number, line in enumerate(bounded_lines(handle), start=1):
            try:
                note = json.loads(line)["note"]
            except (ValueError, TypeError, KeyError, RecursionError):
                note = None
            if not isinstance(note, str):
                raise VerificationFailed(f"{path.name} line {number} is not a handover")
            notes.append(note)
    return notes


def _read_key(path: Path, *, which: str) -> VerifierKey:
    try:
        return VerifierKey.parse(read_text(path))
    except NoteError as exc:
        raise VerificationFailed(f"{which} rejected: {exc}") from None
