"""Export of the access log for offline verification: entries, leaf hashes, checkpoint, key,
and the handovers of the signing key.

Invariants: the exported checkpoint is signed (and stored) before anything is read, and exactly
the entries it covers are written, so ``audit verify`` can check the files against it alone (the
export checks them itself too, and says when entries altered in the database fail it);
every handover checkpoint among those entries (see ``handover``) is written too, one JSON line
each in tree-size order, so an auditor holding an older key can follow it to the current one.

The entries name pseudonyms and who opened what, so the export folder is readable by its owner
only (0700, files 0600), like the database and the keyring. It is written in full to a private
folder beside the target and then moved into place by renames: a failure or an interrupt leaves
the target as it was (an earlier export, or nothing) or the complete new export, never a mix of
the two. Only an earlier export (a folder holding nothing but export files) is replaced; any
other folder or file at the target is refused before a checkpoint is signed for it.

One export at a time writes to a target (a lock file beside it; a second is refused at once), so
the private folder has one name, and what a killed export left there (``kill -9``, a power cut)
is found by the next: the earlier export it had moved aside goes back first when the target is
missing or an empty folder, and the rest, which names pseudonyms, is deleted.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlmodel import Session

from service.access_log import service
from service.access_log.checkpoint import parse_checkpoint
from service.access_log.handover import handover_line, handover_notes
from service.access_log.verify import root_of_lines
from service.crypto.signing import NoteSigner, open_note
from service.db import Database
from service.durable import sync_folder

ENTRIES_FILE = "entries.ndjson"
LEAF_HASHES_FILE = "leaf-hashes.bin"
CHECKPOINT_FILE = "checkpoint"
PUBLIC_KEY_FILE = "public-key"
HANDOVERS_FILE = "handovers.ndjson"
EXPORT_FILES = frozenset(
    {ENTRIES_FILE, LEAF_HASHES_FILE, CHECKPOINT_FILE, PUBLIC_KEY_FILE, HANDOVERS_FILE}
)


@dataclass(frozen=True)
class Exported:
    size: int
    folder: Path
    # Whether the entries written hash to the checkpoint's root. The checkpoint is signed over
    # the stored tree hashes; entries that do not match them were altered in the database
    # outside the service (its triggers refuse it). The export is kept: it is the evidence.
    entries_match: bool = True


def export_log(
    *,
    database: Database,
    signer: Callable[[Session], NoteSigner],
    origin: str,
    folder: Path,
    on_start: Callable[[int], None] = lambda _total: None,
    on_progress: Callable[[int], None] = lambda _done: None,
    chunk: int = 5000,
) -> Exported:
    """Sign a checkpoint and write the entries it covers, their leaf hashes, the handovers, the
    checkpoint and its verifier key to ``folder``, replacing an earlier export there in one step.
    ``signer`` gives the current signing key; it is asked once the log's lock is held, so a
    checkpoint after a handover is never signed by the key that handed over (as for
    ``GET /v1/audit/checkpoint``). Raises ``OSError`` before signing when ``folder`` is there and
    is not an earlier export."""
    # Resolved so that a symbolic link keeps pointing at the export and the renames stay on the
    # file system of the folder itself.
    target = folder.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial")
    staged, previous = staging / "export", staging / "previous"
    with _only_export_into(target, shown_as=folder):
        # Refused first: a folder put at the target since an export was killed keeps the earlier
        # export that one moved aside (in ``previous``) as it is.
        _refuse_unless_replaceable(target, shown_as=folder)
        _clear_leftovers(staging, target=target, previous=previous)
        with database.transaction() as session:
            service.hold_lock(session)
            current = signer(session)
            note = service.signed_checkpoint(session=session, signer=current, origin=origin)
        checkpoint = parse_checkpoint(open_note(note, current.verifier))
        size = checkpoint.size
        staging.mkdir(mode=0o700)
        try:
            _write_export(
                database=database,
                staged=staged,
                note=note,
                current=current,
                size=size,
                on_start=on_start,
                on_progress=on_progress,
                chunk=chunk,
            )
            with open(staged / ENTRIES_FILE, "rb") as written:
                entries_match = root_of_lines(written) == (size, checkpoint.root)
            _move_into_place(staged=staged, target=target, previous=previous, shown_as=folder)
            sync_folder(target.parent)
        finally:
            # Kept only if the earlier export could not be moved back: it is then in
            # ``previous``, and the next export puts it back.
            if os.path.lexists(target) or not os.path.lexists(previous):
                shutil.rmtree(staging, ignore_errors=True)
    return Exported(size=size, folder=folder, entries_match=entries_match)


@contextmanager
def _only_export_into(target: Path, *, shown_as: Path) -> Iterator[None]:
    """Held while this export writes ``target``: another export into it is refused (``OSError``,
    before a checkpoint is signed) rather than waited for. Released when the process dies."""
    lock = os.open(
        target.with_name(f".{target.name}.lock"),
        os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
        0o600,
    )
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(
                errno.EBUSY,
                "another export into it is running; try again when it ends",
                str(shown_as),
            ) from None
        yield
    finally:
        os.close(lock)


def _clear_leftovers(staging: Path, *, target: Path, previous: Path) -> None:
    """Undo what an export killed midway left in ``staging``: the earlier export it had moved
    aside goes back to ``target`` if nothing took its place (an empty folder, such as the one
    ``casepackets audit export`` makes before it signs, holds nothing), and the rest is
    deleted."""
    if not os.path.lexists(staging):
        return
    if os.path.isdir(previous) and _absent_or_empty(target):
        if os.path.lexists(target):
            os.rmdir(target)
        os.rename(previous, target)
    shutil.rmtree(staging)
    sync_folder(target.parent)


def _absent_or_empty(path: Path) -> bool:
    if not os.path.lexists(path):
        return True
    if not path.is_dir() or path.is_symlink():
        return False
    with os.scandir(path) as entries:
        return next(entries, None) is None


def _write_export(
    *,
    database: Database,
    staged: Path,
    note: str,
    current: NoteSigner,
    size: int,
    on_start: Callable[[int], None],
    on_progress: Callable[[int], None],
    chunk: int,
) -> None:
    """Write the export of the ``size`` entries that ``note`` (signed by ``current``) covers
    into the new folder ``staged``, every file and name on disk."""
    staged.mkdir(mode=0o700)
    on_start(size)
    with (
        _owner_only_file(staged / ENTRIES_FILE) as entries,
        _owner_only_file(staged / LEAF_HASHES_FILE) as hashes,
    ):
        for chunk_start in range(0, size, chunk):
            chunk_end = min(size, chunk_start + chunk)
            with database.reading() as session:
                for data in service.iter_entries(session=session, start=chunk_start, end=chunk_end):
                    entries.write(data + b"\n")
                for leaf in service.iter_leaf_hashes(
                    session=session, start=chunk_start, end=chunk_end
                ):
                    hashes.write(leaf)
            on_progress(chunk_end - chunk_start)
    with database.reading() as session:
        handovers = handover_notes(session=session, up_to=size)
    with _owner_only_file(staged / HANDOVERS_FILE) as handover_file:
        for handover_size in sorted(handovers):
            handover_file.write(
                handover_line(handover_size, handovers[handover_size]).encode("utf-8")
            )
    with _owner_only_file(staged / CHECKPOINT_FILE) as checkpoint_file:
        checkpoint_file.write(note.encode("utf-8"))
    with _owner_only_file(staged / PUBLIC_KEY_FILE) as key_file:
        key_file.write(f"{current.verifier}\n".encode())
    # The files' names, then (once renamed into place) the export's own, on disk before the
    # command says it is done: after a power cut the target holds the earlier export or the
    # whole new one.
    sync_folder(staged)


def _refuse_unless_replaceable(target: Path, *, shown_as: Path) -> None:
    """Raise ``OSError`` unless ``target`` is absent or a folder of export files only (an
    earlier export, or an empty folder): anything else is not ours to replace."""
    if not os.path.lexists(target):
        return
    if not target.is_dir():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(shown_as))
    if os.path.ismount(target):
        # Replaced by renames on its parent's file system, which a mount point cannot take part in.
        raise OSError(
            errno.EBUSY,
            "it is a mount point, so it cannot be replaced; export into a folder inside it",
            str(shown_as),
        )
    with os.scandir(target) as entries:
        for entry in entries:
            if entry.name not in EXPORT_FILES or not entry.is_file(follow_symlinks=False):
                raise OSError(
                    errno.ENOTEMPTY,
                    "it holds a file that is not part of an export, so it is not replaced",
                    str(shown_as / entry.name),
                )


def _move_into_place(*, staged: Path, target: Path, previous: Path, shown_as: Path) -> None:
    """Rename ``staged`` to ``target``, moving an earlier export there aside to ``previous``
    first (all three share a parent). Should a step fail or be interrupted, the earlier export
    is moved back, so ``target`` is the earlier export or the new one. Only a crash between
    the two renames leaves ``target`` absent, with the earlier export in ``previous``."""
    try:
        if os.path.lexists(target):
            os.rename(target, previous)
            # Checked again now that it cannot change: the export took a while.
            _refuse_unless_replaceable(previous, shown_as=shown_as)
        os.rename(staged, target)
    except BaseException:
        if os.path.lexists(previous) and not os.path.lexists(target):
            os.rename(previous, target)
        raise


def _owner_only(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_EXCL, 0o600)


@contextmanager
def _owner_only_file(path: Path) -> Iterator[BinaryIO]:
    """``path``, created for writing and readable by its owner only; on disk once the block
    ends, so the rename that publishes it never publishes a file the disk has not got."""
    with open(path, "wb", opener=_owner_only) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())
