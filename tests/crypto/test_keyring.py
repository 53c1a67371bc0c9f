"""The keyring file: private, versioned per purpose, rotated atomically."""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import signal
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pytest

from service.crypto import keyring as keyring_module
from service.crypto.keyring import (
    PURPOSES,
    Keyring,
    KeyringBusy,
    KeyringError,
    KeyringMissing,
    KeyringTooOpen,
    Staged,
    UnknownKey,
    new_key_material,
)


def test_init_creates_a_private_file_with_every_purpose(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    keyring = Keyring.init(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    for purpose in PURPOSES:
        assert keyring.current(purpose).version == 1
        assert len(keyring.current(purpose).material) == 32
    assert len({keyring.current(p).material for p in PURPOSES}) == len(PURPOSES)


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    Keyring.init(tmp_path / "k.json")
    with pytest.raises(KeyringError, match="already exists"):
        Keyring.init(tmp_path / "k.json")


def init_in_a_process(path: str, start: Barrier, results: Queue[tuple[str, str]]) -> None:
    """``Keyring.init`` in a process of its own, as soon as the other one is ready too."""
    start.wait(60)
    try:
        created = Keyring.init(Path(path))
    except KeyringError as exc:
        results.put(("refused", str(exc)))
    else:
        results.put(("created", created.current("vault").material.hex()))


def test_of_two_inits_at_once_exactly_one_succeeds(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    results: Queue[tuple[str, str]] = context.Queue()
    processes = [
        context.Process(target=init_in_a_process, args=(str(path), start, results))
        for _ in range(2)
    ]
    for process in processes:
        process.start()
    outcomes = sorted(results.get(timeout=60) for _ in processes)
    for process in processes:
        process.join(60)
    [(created, material), (refused, message)] = outcomes
    assert (created, refused) == ("created", "refused")
    assert "already exists" in message
    assert Keyring.load(path).current("vault").material.hex() == material


def test_a_keyring_changes_only_while_its_edit_lock_is_held(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    keyring = Keyring.init(path)
    assert not hasattr(keyring, "rotate")  # a loaded keyring, like a worker's, only reads
    with Keyring.edit(path) as editing:
        assert editing.next_version("vault") == 2
        editing.rotate("vault")
    for change in (
        lambda: editing.next_version("vault"),
        lambda: editing.rotate("vault"),
        lambda: editing.retire("vault", 1),
    ):
        with pytest.raises(KeyringError, match=r"only inside `Keyring\.edit`"):
            change()
    assert [info.version for info in Keyring.load(path).versions("vault")] == [1, 2]
    assert os.stat(tmp_path / "k.json.lock").st_mode & 0o777 == 0o600


def test_an_edit_waits_for_another_only_so_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "k.json"
    Keyring.init(path)
    monkeypatch.setattr(keyring_module, "EDIT_LOCK_TIMEOUT_SECONDS", 0.2)
    with Keyring.edit(path) as first:
        with (
            pytest.raises(KeyringBusy, match="another key command is running; try again"),
            Keyring.edit(path),
        ):
            pass
        first.rotate("packet")
    with Keyring.edit(path) as second:
        assert second.next_version("packet") == 3


def test_missing_keyring_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(KeyringMissing, match="casepackets keys init"):
        Keyring.load(tmp_path / "absent.json")


def test_group_readable_keyring_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    Keyring.init(path)
    path.chmod(0o640)
    with pytest.raises(KeyringTooOpen, match="chmod 600"):
        Keyring.load(path)


def damage_current(entry: dict[str, Any]) -> None:
    del entry["current"]


def damage_version_key(entry: dict[str, Any]) -> None:
    entry["versions"]["x"] = entry["versions"]["1"]


def damage_version_entry(entry: dict[str, Any]) -> None:
    entry["versions"]["1"] = "AAAA"


def damage_current_number(entry: dict[str, Any]) -> None:
    entry["current"] = "one"


def damage_version_key_to(name: str) -> Callable[[dict[str, Any]], None]:
    """A second version named ``name``: a digit ``int`` cannot read (superscript two), another
    spelling of 1 (a leading zero, full-width), or more digits than ``int`` reads."""

    def damage(entry: dict[str, Any]) -> None:
        entry["versions"][name] = entry["versions"]["1"]

    return damage


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (damage_current, "vault has no current version"),
        (damage_version_key, "vault has a version whose name is not a number"),
        (damage_version_entry, "vault v1 is not an object"),
        (damage_current_number, "vault has no current version"),
        (damage_version_key_to("\u00b2"), "vault has a version whose name is not a number"),
        (damage_version_key_to("01"), "vault has a version whose name is not a number"),
        (damage_version_key_to("\uff11"), "vault has a version whose name is not a number"),
        (damage_version_key_to("9" * 5000), "vault has a version whose name is not a number"),
    ],
)
def test_a_hand_damaged_keyring_is_refused_by_what_is_wrong(
    tmp_path: Path, damage: Callable[[dict[str, Any]], None], said: str
) -> None:
    path = tmp_path / "k.json"
    Keyring.init(path)
    document = json.loads(path.read_text())
    damage(document["purposes"]["vault"])
    path.write_text(json.dumps(document))
    with pytest.raises(KeyringError, match=said) as refused:
        Keyring.load(path)
    assert "AAAA" not in str(refused.value)


def test_a_keyring_path_that_cannot_be_used_is_a_keyring_error(tmp_path: Path) -> None:
    """A keyring path through a file, or in a folder that cannot be made: refused by
    KeyringError naming the path, never an OSError."""
    (tmp_path / "a-file").write_text("")
    through_a_file = tmp_path / "a-file" / "keyring.json"
    with pytest.raises(KeyringError, match="a-file"):
        Keyring.load(through_a_file)
    with pytest.raises(KeyringError, match="a-file"):
        Keyring.init(through_a_file)
    with pytest.raises(KeyringError, match="a-file"), Keyring.edit(through_a_file):
        pass


def test_rotate_adds_a_current_version_and_keeps_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    old = Keyring.init(path).current("vault")
    with Keyring.edit(path) as keyring:
        new = keyring.rotate("vault")
    reloaded = Keyring.load(path)
    assert reloaded.current("vault").version == new.version == 2
    assert reloaded.get("vault", 1).material == old.material
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_rotate_stores_given_material_of_the_right_length_only(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    Keyring.init(path)
    with Keyring.edit(path) as keyring:
        with pytest.raises(KeyringError, match="32 bytes"):
            keyring.rotate("log_signing", material=b"short")
        assert Keyring.load(path).current("log_signing").version == 1
        material = new_key_material()
        keyring.rotate("log_signing", material=material)
    assert Keyring.load(path).current("log_signing").material == material


def test_a_staged_version_decrypts_but_becomes_current_only_when_promoted(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    Keyring.init(path)
    material = new_key_material()
    with Keyring.edit(path) as keyring:
        assert keyring.stage("pseudonym", material=material, leaf_index=41).version == 2
        loaded = Keyring.load(path)
        assert loaded.current("pseudonym").version == 1
        assert loaded.get("pseudonym", 2).material == material
        assert loaded.staged("pseudonym") == Staged("pseudonym", 2, leaf_index=41)
        assert [v.staged for v in loaded.versions("pseudonym")] == [False, True]
        with pytest.raises(KeyringError, match="staged by a rotation not yet settled"):
            keyring.rotate("pseudonym")
        with pytest.raises(KeyringError, match="staged by a rotation not yet settled"):
            keyring.check_old_version("pseudonym", 2)
        assert keyring.promote("pseudonym").version == 2
    promoted = Keyring.load(path)
    assert promoted.current("pseudonym").material == material
    assert promoted.staged("pseudonym") is None


def rotate_and_die_before_the_rename(path: str) -> None:
    """Rotate the vault key and be killed (SIGKILL) once the new file is written, before it
    replaces the keyring."""
    real_fsync = os.fsync

    def fsync_then_die(fd: Any) -> None:
        real_fsync(fd)
        os.kill(os.getpid(), signal.SIGKILL)

    os.fsync = fsync_then_die
    with Keyring.edit(Path(path)) as keyring:
        keyring.rotate("vault")


def test_what_a_killed_write_left_beside_the_keyring_goes_with_the_next_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write killed before its rename leaves a temporary file holding every key: the next
    change deletes it, so a retired version's material does not outlive its retirement."""
    monkeypatch.setattr(keyring_module, "ROTATION_SETTLE_SECONDS", 0)
    path = tmp_path / "keyring.json"
    Keyring.init(path)
    old_vault = base64.b64encode(Keyring.load(path).current("vault").material)
    killed = multiprocessing.get_context("spawn").Process(
        target=rotate_and_die_before_the_rename, args=(str(path),)
    )
    killed.start()
    killed.join(60)
    assert killed.exitcode == -signal.SIGKILL
    left = [p for p in tmp_path.iterdir() if p.name not in ("keyring.json", "keyring.json.lock")]
    assert len(left) == 1, "the killed write's file"
    assert old_vault in left[0].read_bytes()
    assert Keyring.load(path).current("vault").version == 1
    with Keyring.edit(path) as keyring:
        keyring.rotate("vault")
        keyring.retire("vault", 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keyring.json", "keyring.json.lock"]
    assert old_vault not in path.read_bytes()


def test_a_keyring_reached_by_a_link_is_changed_where_the_link_points(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file read is the file written: replacing the link instead would leave the retired
    material in the file the link pointed to."""
    monkeypatch.setattr(keyring_module, "ROTATION_SETTLE_SECONDS", 0)
    secrets_folder = tmp_path / "secrets"
    real = secrets_folder / "keyring.json"
    Keyring.init(real)
    link = tmp_path / "keyring.json"
    link.symlink_to(real)
    old_vault = base64.b64encode(Keyring.load(link).current("vault").material)
    with Keyring.edit(link) as keyring:
        keyring.rotate("vault")
        keyring.retire("vault", 1)
    assert link.is_symlink()
    assert link.resolve() == real
    assert Keyring.load(link).current("vault").version == 2
    assert old_vault not in real.read_bytes()
    assert sorted(p.name for p in secrets_folder.iterdir()) == ["keyring.json", "keyring.json.lock"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keyring.json", "secrets"], "one lock"


def test_a_temporary_file_an_earlier_version_left_goes_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Earlier versions named their temporary files ``.keyring-…`` (whatever the keyring's
    name): such a file, left by a killed write, holds keys too."""
    monkeypatch.setattr(keyring_module, "ROTATION_SETTLE_SECONDS", 0)
    path = tmp_path / "keyring.json"
    Keyring.init(path)
    left = tmp_path / ".keyring-x1y2z3"
    left.write_bytes(path.read_bytes())
    with Keyring.edit(path) as keyring:
        keyring.rotate("vault")
    assert not left.exists()


def test_links_that_lead_nowhere_are_refused_in_one_line(tmp_path: Path) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.symlink_to(second)
    second.symlink_to(first)
    with pytest.raises(KeyringError, match="its symbolic links lead nowhere"):
        Keyring.init(first)
    with pytest.raises(KeyringError, match="its symbolic links lead nowhere"), Keyring.edit(first):
        pass


def test_init_through_a_link_to_a_file_not_yet_there_creates_that_file(tmp_path: Path) -> None:
    real = tmp_path / "secrets" / "keyring.json"
    link = tmp_path / "keyring.json"
    link.symlink_to(real)
    Keyring.init(link)
    assert link.is_symlink()
    assert Keyring.load(link).current("vault").version == 1
    assert real.stat().st_mode & 0o777 == 0o600


def test_a_keyring_is_unreadable_only_while_its_file_cannot_be_read(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    keyring = Keyring.init(path)
    aside = tmp_path / "aside.json"
    path.rename(aside)
    keyring.refresh()
    assert keyring.unreadable
    aside.rename(path)  # the very file whose keys are held, unchanged
    keyring.refresh()
    assert not keyring.unreadable


def test_a_keyring_write_reaches_the_disk_with_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename is durable only once the folder is: a staged key lost in a power cut while the
    rotation's commit survived would leave the log naming a lost key."""
    synced: list[bool] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    path = tmp_path / "k.json"
    Keyring.init(path)
    monkeypatch.setattr(os, "fsync", fsync)
    with Keyring.edit(path) as keyring:
        keyring.rotate("vault")
    assert synced == [False, True]  # the file, then its folder after the rename


def test_a_discarded_staged_version_is_destroyed_and_its_number_stays_taken(
    tmp_path: Path,
) -> None:
    path = tmp_path / "k.json"
    Keyring.init(path)
    with Keyring.edit(path) as keyring:
        keyring.stage("log_signing", material=new_key_material(), leaf_index=0)
        assert keyring.discard("log_signing") == 2
        assert keyring.rotate("log_signing").version == 3
    loaded = Keyring.load(path)
    with pytest.raises(UnknownKey):
        loaded.get("log_signing", 2)
    assert (
        "material" not in json.loads(path.read_text())["purposes"]["log_signing"]["versions"]["2"]
    )
    assert loaded.staged("log_signing") is None


@pytest.mark.parametrize(
    ("staged", "said"),
    [
        ({"version": 2}, "staged version that is not well formed"),
        ({"version": 2, "leaf_index": -1}, "staged version that is not well formed"),
        ({"version": True, "leaf_index": 0}, "staged version that is not well formed"),
        ({"version": 1, "leaf_index": 0}, "staged version of 'vault' is unusable"),
        ({"version": 7, "leaf_index": 0}, "staged version of 'vault' is unusable"),
    ],
)
def test_a_hand_damaged_staged_version_is_refused(
    tmp_path: Path, staged: dict[str, Any], said: str
) -> None:
    path = tmp_path / "k.json"
    Keyring.init(path)
    document = json.loads(path.read_text())
    document["purposes"]["vault"]["staged"] = staged
    path.write_text(json.dumps(document))
    with pytest.raises(KeyringError, match=said):
        Keyring.load(path)


def test_retire_destroys_material_but_not_the_current_version(
    tmp_path: Path, rotations_settled: None
) -> None:
    path = tmp_path / "k.json"
    old_material = Keyring.init(path).current("packet").material.hex()
    with Keyring.edit(path) as keyring:
        with pytest.raises(KeyringError, match="current"):
            keyring.retire("packet", 1)
        keyring.rotate("packet")
        keyring.retire("packet", 1)
    with pytest.raises(UnknownKey):
        Keyring.load(path).get("packet", 1)
    assert old_material not in path.read_text()
    assert json.loads(path.read_text())["purposes"]["packet"]["versions"]["1"]["retired_at"]


def test_a_version_retired_already_or_never_made_cannot_be_retired(
    tmp_path: Path, rotations_settled: None
) -> None:
    """``keys retire`` logs a retirement only when it will happen: a second one is refused."""
    path = tmp_path / "k.json"
    Keyring.init(path)
    with Keyring.edit(path) as keyring:
        keyring.rotate("packet")
        keyring.retire("packet", 1)
        retired = json.loads(path.read_text())["purposes"]["packet"]["versions"]["1"]
        for version in (1, 7):
            with pytest.raises(UnknownKey, match=f"no active packet key version {version}"):
                keyring.check_retirable("packet", version)
            with pytest.raises(UnknownKey):
                keyring.retire("packet", version)
    assert json.loads(path.read_text())["purposes"]["packet"]["versions"]["1"] == retired


def test_retiring_soon_after_a_rotation_is_refused_and_destroys_nothing(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    old_material = Keyring.init(path).current("vault").material
    with Keyring.edit(path) as keyring:
        keyring.rotate("vault")
        with pytest.raises(KeyringError, match=r"vault v2 became current \d+ s ago"):
            keyring.retire("vault", 1)
    assert Keyring.load(path).get("vault", 1).material == old_material
    # a rotation long past (its file says so) no longer holds retirement back
    document = json.loads(path.read_text())
    document["purposes"]["vault"]["versions"]["2"]["created_at"] = "2026-01-01T00:00:00+00:00"
    path.write_text(json.dumps(document))
    with Keyring.edit(path) as keyring:
        keyring.retire("vault", 1)
    with pytest.raises(UnknownKey):
        Keyring.load(path).get("vault", 1)


def test_a_current_version_without_a_creation_time_counts_as_settled(tmp_path: Path) -> None:
    """A keyring written before versions carried ``created_at``: its rotation is long past."""
    path = tmp_path / "k.json"
    Keyring.init(path)
    with Keyring.edit(path) as keyring:
        keyring.rotate("vault")
    document = json.loads(path.read_text())
    del document["purposes"]["vault"]["versions"]["2"]["created_at"]
    path.write_text(json.dumps(document))
    with Keyring.edit(path) as keyring:
        keyring.retire("vault", 1)
    with pytest.raises(UnknownKey):
        Keyring.load(path).get("vault", 1)


def test_a_creation_time_written_without_a_zone_is_read_as_utc(tmp_path: Path) -> None:
    """A hand-edited ``created_at`` without its ``+00:00`` (as the file's own times are in UTC):
    judged by its age like any other, never a traceback."""
    path = tmp_path / "k.json"
    Keyring.init(path)
    with Keyring.edit(path) as keyring:
        keyring.rotate("vault")

    def created(moment: datetime) -> None:
        document = json.loads(path.read_text())
        written = moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="seconds")
        document["purposes"]["vault"]["versions"]["2"]["created_at"] = written
        path.write_text(json.dumps(document))

    created(datetime.now(UTC))
    with pytest.raises(KeyringError, match="became current"), Keyring.edit(path) as keyring:
        keyring.retire("vault", 1)
    created(datetime.now(UTC) - timedelta(seconds=keyring_module.ROTATION_SETTLE_SECONDS + 60))
    with Keyring.edit(path) as keyring:
        keyring.retire("vault", 1)
    with pytest.raises(UnknownKey):
        Keyring.load(path).get("vault", 1)


def test_retiring_too_soon_asks_for_a_rewrap_only_of_keys_that_wrap(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    Keyring.init(path)
    with Keyring.edit(path) as keyring:
        for purpose in ("vault", "packet", "pseudonym", "log_signing"):
            keyring.rotate(purpose)
            with pytest.raises(KeyringError) as refused:
                keyring.retire(purpose, 1)
            asks_for_rewrap = "keys rewrap" in str(refused.value)
            assert asks_for_rewrap == (purpose in ("vault", "packet")), str(refused.value)


def test_a_loaded_keyring_follows_changes_made_by_another_process(
    tmp_path: Path, rotations_settled: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "k.json"
    monkeypatch.setattr(keyring_module, "RELOAD_CHECK_SECONDS", 3600.0)
    worker = Keyring.init(path)  # what a running service holds
    with Keyring.edit(path) as command:  # what `casepackets keys ...` changes
        command.rotate("vault")
    # Within the check interval the worker does not even look at the file.
    assert worker.current("vault").version == 1
    monkeypatch.setattr(keyring_module, "RELOAD_CHECK_SECONDS", 0.0)
    assert worker.current("vault").version == 2
    assert worker.current("vault").material == command.current("vault").material
    with Keyring.edit(path) as command:
        command.retire("vault", 1)
    with pytest.raises(UnknownKey):
        worker.get("vault", 1)
    assert [k.version for k in worker.active("vault")] == [2]


def test_a_version_another_worker_just_sealed_under_is_read_from_the_file_at_once(
    tmp_path: Path, rotations_settled: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A packet built by one worker under a packet KEK rotated a moment ago is opened by
    another within the check interval: asking for that version reads the file at once."""
    path = tmp_path / "k.json"
    monkeypatch.setattr(keyring_module, "RELOAD_CHECK_SECONDS", 3600.0)
    worker = Keyring.init(path)
    with Keyring.edit(path) as command:
        command.rotate("packet")
    assert worker.current("packet").version == 1  # not looked at within the interval
    assert worker.get("packet", 2).material == command.current("packet").material
    with pytest.raises(UnknownKey):
        worker.get("packet", 3)


def test_a_changed_keyring_that_cannot_be_read_keeps_the_keys_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "k.json"
    worker = Keyring.init(path)
    held = worker.current("packet").material
    monkeypatch.setattr(keyring_module, "RELOAD_CHECK_SECONDS", 0.0)
    path.write_text('{"format": "casepackets-keyring/1", "purposes": "half-written"}')
    with caplog.at_level("WARNING"):
        assert worker.current("packet").material == held
    assert "cannot be read (KeyringError); keeping the keys held" in caplog.text
    assert "half-written" not in caplog.text
    assert held.hex() not in caplog.text


def test_unknown_purpose_is_refused(tmp_path: Path) -> None:
    keyring = Keyring.init(tmp_path / "k.json")
    with pytest.raises(UnknownKey):
        keyring.current("nope")  # type: ignore[arg-type]
