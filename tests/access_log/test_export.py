"""``export_log`` writes a folder only its owner can read, and replaces an earlier export in one
step: a failure midway leaves the earlier export exactly as it was, and nothing beside it."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from sqlmodel import Session

from service.access_log import export as export_module
from service.access_log.export import (
    CHECKPOINT_FILE,
    ENTRIES_FILE,
    HANDOVERS_FILE,
    LEAF_HASHES_FILE,
    PUBLIC_KEY_FILE,
    export_log,
)
from service.access_log.handover import hand_over
from service.access_log.verify import verify_files
from service.crypto.signing import NoteSigner
from service.db import Database
from tests.access_log.conftest import ORIGIN, append_each

EXPORT_FILES = (ENTRIES_FILE, LEAF_HASHES_FILE, HANDOVERS_FILE, CHECKPOINT_FILE, PUBLIC_KEY_FILE)


def export(database: Database, signer: NoteSigner, folder: Path) -> Path:
    export_log(database=database, signer=lambda _session: signer, origin=ORIGIN, folder=folder)
    return folder


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def beside(folder: Path) -> list[str]:
    """What the export's parent folder holds, apart from the lock file of exports into it."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name != f".{folder.name}.lock")


def test_a_new_export_is_readable_by_its_owner_only(
    database: Database, signer: NoteSigner, tmp_path: Path
) -> None:
    append_each(database, 3)
    folder = export(database, signer, tmp_path / "exports" / "export")
    assert mode(folder) == 0o700
    assert {path.name: mode(path) for path in folder.iterdir()} == dict.fromkeys(
        EXPORT_FILES, 0o600
    )


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
    ids=["disk-full", "ctrl-c"],
)
def test_an_export_that_fails_midway_leaves_the_earlier_export_as_it_was(
    database: Database,
    signer: NoteSigner,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    failure: BaseException,
) -> None:
    append_each(database, 4)
    folder = export(database, signer, tmp_path / "exports" / "export")
    earlier = contents(folder)
    append_each(database, 2)

    def fail(**_: object) -> None:
        raise failure

    # After the entries and leaf hashes are written, before the handovers and the checkpoint.
    monkeypatch.setattr(export_module, "handover_notes", fail)
    with pytest.raises(type(failure)):
        export(database, signer, folder)
    assert contents(folder) == earlier
    assert beside(folder) == ["export"], "no partial export left"


def test_an_export_that_cannot_be_moved_into_place_puts_the_earlier_one_back(
    database: Database, signer: NoteSigner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    append_each(database, 4)
    folder = export(database, signer, tmp_path / "exports" / "export")
    earlier = contents(folder)
    append_each(database, 2)
    rename = os.rename
    published: list[str] = []

    def rename_failing_to_publish(source: str, destination: str) -> None:
        if Path(destination) == folder.resolve() and not published:
            published.append(str(source))
            raise OSError(errno.EIO, "Input/output error", str(destination))
        rename(source, destination)

    monkeypatch.setattr(os, "rename", rename_failing_to_publish)
    with pytest.raises(OSError, match="Input/output error"):
        export(database, signer, folder)
    assert published, "the new export was to be renamed into place"
    assert contents(folder) == earlier
    assert beside(folder) == ["export"], "no partial export left"


def test_an_export_over_an_earlier_one_replaces_it_and_verifies(
    database: Database, signer: NoteSigner, tmp_path: Path
) -> None:
    append_each(database, 5)
    folder = export(database, signer, tmp_path / "exports" / "export")
    trusted = tmp_path / "trusted-checkpoint"
    trusted.write_bytes((folder / CHECKPOINT_FILE).read_bytes())
    # As an earlier version left it: readable by anyone.
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)
    append_each(database, 7)
    export(database, signer, folder)
    assert mode(folder) == 0o700
    assert {path.name: mode(path) for path in folder.iterdir()} == dict.fromkeys(
        EXPORT_FILES, 0o600
    )
    assert len((folder / ENTRIES_FILE).read_bytes().splitlines()) == 12
    verified = verify_files(
        entries=folder / ENTRIES_FILE,
        checkpoint=folder / CHECKPOINT_FILE,
        public_key=folder / PUBLIC_KEY_FILE,
        trusted_checkpoint=trusted,
        leaf_hashes=folder / LEAF_HASHES_FILE,
    )
    assert verified.checkpoint.size == 12
    assert verified.trusted is not None
    assert verified.trusted.size == 5
    assert beside(folder) == ["export"], "the earlier one is gone"


def test_an_export_reaches_the_disk_with_its_folders(
    database: Database, signer: NoteSigner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each file is synced, then the folder holding their names, and once the export is renamed
    into place, the folder holding its name: a power cut after the command ends cannot take the
    new export (or part of it) back."""
    append_each(database, 4)
    folder = export(database, signer, tmp_path / "exports" / "export")
    append_each(database, 3)
    folder_syncs: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            published = (folder / ENTRIES_FILE).read_bytes().count(b"\n") == 7
            folder_syncs.append((os.readlink(f"/proc/self/fd/{fd}"), published))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    export(database, signer, folder)
    (staged, staged_published), (parent, parent_published) = folder_syncs
    assert staged.endswith(".partial/export")
    assert not staged_published, "the staged folder is synced before it is renamed into place"
    assert Path(parent) == folder.parent.resolve()
    assert parent_published, "the parent is synced after the rename"


def test_an_export_killed_between_its_renames_is_undone_by_the_next(
    database: Database, signer: NoteSigner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed (``kill -9``, a power cut) after moving the earlier export aside and before
    renaming the new one into place: the next export puts the earlier one back before it
    begins, so that one failing too still leaves the earlier export where it was."""
    append_each(database, 4)
    folder = export(database, signer, tmp_path / "exports" / "export")
    earlier = contents(folder)
    staging = folder.with_name(".export.partial")
    staging.mkdir(mode=0o700)
    (staging / "export").mkdir(mode=0o700)
    (staging / "export" / ENTRIES_FILE).write_bytes(b"a new export, complete or not\n")
    folder.rename(staging / "previous")  # as the killed export left it
    append_each(database, 2)

    def fail(**_: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_module, "handover_notes", fail)
    with pytest.raises(OSError, match="No space"):
        export(database, signer, folder)
    assert contents(folder) == earlier
    assert beside(folder) == ["export"], "nothing of the killed export left"


def test_an_export_killed_after_its_renames_is_kept_and_replaced_by_the_next(
    database: Database, signer: NoteSigner, tmp_path: Path
) -> None:
    """Killed once the new export is in place, before the earlier one it moved aside was
    deleted: the next export deletes that earlier one (the target holds an export, not nothing)
    and replaces the target as usual, rather than failing on every run after."""
    append_each(database, 4)
    folder = export(database, signer, tmp_path / "exports" / "export")
    staging = folder.with_name(".export.partial")
    staging.mkdir(mode=0o700)
    shutil.copytree(folder, staging / "previous")  # the earlier export, left aside
    append_each(database, 2)
    export(database, signer, folder)
    assert contents(folder)[ENTRIES_FILE].count(b"\n") == 6
    assert beside(folder) == ["export"], "nothing of the killed export left"


def test_a_folder_put_in_place_of_an_export_a_killed_one_moved_aside_keeps_that_export(
    database: Database, signer: NoteSigner, tmp_path: Path
) -> None:
    """The refusal comes first: the earlier export, aside in the private folder, is not
    deleted for an export that is then refused."""
    append_each(database, 4)
    folder = export(database, signer, tmp_path / "exports" / "export")
    earlier = contents(folder)
    staging = folder.with_name(".export.partial")
    staging.mkdir(mode=0o700)
    folder.rename(staging / "previous")  # as an export killed between its renames left it
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(OSError, match="not part of an export"):
        export(database, signer, folder)
    assert contents(staging / "previous") == earlier


def test_a_link_planted_as_the_lock_file_is_not_followed(
    database: Database, signer: NoteSigner, tmp_path: Path
) -> None:
    append_each(database, 2)
    folder = tmp_path / "exports" / "export"
    folder.parent.mkdir()
    elsewhere = tmp_path / "elsewhere"
    (folder.parent / ".export.lock").symlink_to(elsewhere)
    with pytest.raises(OSError, match="symbolic link"):
        export(database, signer, folder)
    assert not elsewhere.exists()
    assert not folder.exists()


def test_what_an_export_killed_while_writing_left_is_deleted_by_the_next(
    database: Database, signer: NoteSigner, tmp_path: Path
) -> None:
    """The half-written export of a killed run names pseudonyms: the next export deletes it."""
    append_each(database, 3)
    folder = tmp_path / "exports" / "export"
    staging = folder.parent / ".export.partial"
    (staging / "export").mkdir(parents=True, mode=0o700)
    (staging / "export" / ENTRIES_FILE).write_bytes(b'{"pseudonyms": ["..."]}\n')
    export(database, signer, folder)
    assert beside(folder) == ["export"]
    assert len((folder / ENTRIES_FILE).read_bytes().splitlines()) == 3


def test_a_second_export_into_the_same_folder_is_refused_while_one_runs(
    database: Database, signer: NoteSigner, tmp_path: Path
) -> None:
    """Refused at once, before it signs a checkpoint, and nothing of the running one touched."""
    append_each(database, 3)
    folder = export(database, signer, tmp_path / "exports" / "export")
    earlier = contents(folder)
    lock = os.open(folder.parent / ".export.lock", os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the running export holds it

        def refused_signer(_session: Session) -> NoteSigner:
            raise AssertionError("a checkpoint was to be signed for an export that is refused")

        with pytest.raises(OSError, match="another export into it is running") as refused:
            export_log(database=database, signer=refused_signer, origin=ORIGIN, folder=folder)
        assert refused.value.filename == str(folder)
    finally:
        os.close(lock)
    assert contents(folder) == earlier
    export(database, signer, folder)  # once it has ended


def test_a_folder_holding_other_files_is_refused_before_signing(
    database: Database, tmp_path: Path
) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / CHECKPOINT_FILE).write_text("not an export's")

    def signer(_session: Session) -> NoteSigner:
        raise AssertionError("a checkpoint was to be signed for a folder that is refused")

    with pytest.raises(OSError, match="not part of an export") as refused:
        export_log(database=database, signer=signer, origin=ORIGIN, folder=folder)
    assert refused.value.filename == str(folder / "notes.txt")
    assert contents(folder) == {"notes.txt": b"mine", CHECKPOINT_FILE: b"not an export's"}


def test_a_mount_point_is_refused_before_signing(
    database: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export replaces its folder by renames on the parent's file system; a mounted volume
    (a USB stick at --out) cannot be renamed (EBUSY), so it is refused before a checkpoint is
    signed, saying to export into a folder inside it."""
    folder = tmp_path / "stick"
    folder.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(
        os.path, "ismount", lambda path: Path(path) == folder.resolve() or real_ismount(path)
    )

    def signer(_session: Session) -> NoteSigner:
        raise AssertionError("a checkpoint was to be signed for a folder that is refused")

    with pytest.raises(OSError, match="mount point") as refused:
        export_log(database=database, signer=signer, origin=ORIGIN, folder=folder)
    assert refused.value.filename == str(folder)


def test_every_export_file_is_synced_before_the_folder_that_names_it(
    database: Database, signer: NoteSigner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    append_each(database, 4)
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    export(database, signer, tmp_path / "export")
    staged_folder = next(n for n, path in enumerate(synced) if path.endswith(".partial/export"))
    files = [Path(path).name for path in synced[:staged_folder]]
    assert sorted(files) == sorted(EXPORT_FILES)


def test_a_file_put_into_the_folder_during_an_export_is_not_replaced(
    database: Database, signer: NoteSigner, tmp_path: Path
) -> None:
    """The folder is checked again once moved aside: a file that appeared there while the
    export was being written is not deleted with the earlier export."""
    append_each(database, 4)
    folder = export(database, signer, tmp_path / "exports" / "export")
    earlier = contents(folder)

    def meanwhile(_done: int) -> None:
        (folder / "notes.txt").write_text("mine")

    with pytest.raises(OSError, match="not part of an export"):
        export_log(
            database=database,
            signer=lambda _session: signer,
            origin=ORIGIN,
            folder=folder,
            on_progress=meanwhile,
        )
    assert contents(folder) == {**earlier, "notes.txt": b"mine"}
    assert beside(folder) == ["export"]


def test_a_link_named_like_an_export_file_is_not_replaced(
    database: Database, tmp_path: Path
) -> None:
    folder = tmp_path / "export"
    folder.mkdir()
    kept = tmp_path / "kept"
    kept.write_text("not an export's")
    (folder / CHECKPOINT_FILE).symlink_to(kept)

    def signer(_session: Session) -> NoteSigner:
        raise AssertionError("a checkpoint was to be signed for a folder that is refused")

    with pytest.raises(OSError, match="not part of an export"):
        export_log(database=database, signer=signer, origin=ORIGIN, folder=folder)
    assert (folder / CHECKPOINT_FILE).is_symlink()
    assert kept.read_text() == "not an export's"


def test_handovers_are_written_in_tree_size_order(
    database: Database, signer: NoteSigner, tmp_path: Path
) -> None:
    current = signer
    for version in (2, 3):
        append_each(database, 2)
        successor = NoteSigner(name=ORIGIN, seed=os.urandom(32))
        with database.transaction() as session:
            hand_over(
                session=session,
                old=current,
                new=successor,
                origin=ORIGIN,
                version=version,
                actor="system:t",
            )
        current = successor
    folder = export(database, current, tmp_path / "export")
    lines = (folder / HANDOVERS_FILE).read_text().splitlines()
    assert [json.loads(line)["size"] for line in lines] == [3, 6]
