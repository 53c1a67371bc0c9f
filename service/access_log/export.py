"""Export of the access log for offline verification: entries, leaf hashes, checkpoint, key,
and the handovers of the signing key.

Invariants: the exported checkpoint is signed (and stored) before anything is read, and exactly
the entries it covers are written, so ``audit verify`` can check the files against it alone;
every handover checkpoint among those entries (see ``handover``) is written too, one JSON line
each in tree-size order, so an auditor holding an older key can follow it to the current one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.access_log import service
from service.access_log.checkpoint import parse_checkpoint
from service.access_log.handover import handover_line, handover_notes
from service.crypto.signing import NoteSigner, open_note
from service.db import Database

ENTRIES_FILE = "entries.ndjson"
LEAF_HASHES_FILE = "leaf-hashes.bin"
CHECKPOINT_FILE = "checkpoint"
PUBLIC_KEY_FILE = "public-key"
HANDOVERS_FILE = "handovers.ndjson"


@dataclass(frozen=True)
class Exported:
    size: int
    folder: Path


def export_log(
    *,
    database: Database,
    signer: Callable[[], NoteSigner],
    origin: str,
    folder: Path,
    on_start: Callable[[int], None] = lambda _total: None,
    on_progress: Callable[[int], None] = lambda _done: None,
    chunk: int = 5000,
) -> Exported:
    """Sign a checkpoint and write the entries it covers, their leaf hashes, the handovers, the
    checkpoint and its verifier key to ``folder``. ``signer`` gives the current signing key; it
    is asked once the log's lock is held, so a checkpoint after a handover is never signed by
    the key that handed over (as for ``GET /v1/audit/checkpoint``)."""
    with database.transaction() as session:
        service.hold_lock(session)
        current = signer()
        note = service.signed_checkpoint(session=session, signer=current, origin=origin)
    size = parse_checkpoint(open_note(note, current.verifier)).size
    folder.mkdir(parents=True, exist_ok=True)
    on_start(size)
    with (
        (folder / ENTRIES_FILE).open("wb") as entries,
        (folder / LEAF_HASHES_FILE).open("wb") as hashes,
    ):
        for chunk_start in range(0, size, chunk):
            chunk_end = min(size, chunk_start + chunk)
            with database.session() as session:
                for data in service.iter_entries(session=session, start=chunk_start, end=chunk_end):
                    entries.write(data + b"\n")
                for leaf in service.iter_leaf_hashes(
                    session=session, start=chunk_start, end=chunk_end
                ):
                    hashes.write(leaf)
            on_progress(chunk_end - chunk_start)
    with database.session() as session:
        handovers = handover_notes(session=session, up_to=size)
    with (folder / HANDOVERS_FILE).open("w", encoding="utf-8") as handover_file:
        for handover_size in sorted(handovers):
            handover_file.write(handover_line(handover_size, handovers[handover_size]))
    (folder / CHECKPOINT_FILE).write_text(note, encoding="utf-8")
    (folder / PUBLIC_KEY_FILE).write_text(f"{current.verifier}\n", encoding="utf-8")
    return Exported(size=size, folder=folder)
