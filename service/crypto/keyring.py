"""The keyring: versioned secret keys per purpose, kept outside the database.

Invariants:
- the keyring file is created with mode 0600 and is refused (never read) when group or others may
  read it; it is written atomically (temporary 0600 file, then rename), so a crash never leaves a
  half-written keyring and a reader never sees one;
- the file changes only under an exclusive ``flock`` on ``<keyring>.lock`` (mode 0600), held from
  reading the file to writing it back: ``init`` under it, ``rotate`` and ``retire`` only on the
  ``LockedKeyring`` that ``Keyring.edit`` reads afresh under it (a plain ``Keyring`` cannot
  change the file). Two key commands at once therefore never lose each other's change, a
  version number given out under the lock (``next_version``) is the one written, and of two
  inits at once exactly one succeeds. Waiting for the lock is bounded
  (``EDIT_LOCK_TIMEOUT_SECONDS``, then ``KeyringBusy``); readers (running workers) never take it;
- every purpose has at least one version; ``current`` is the newest active version and is the only
  one that encrypts, wraps or pseudonymizes new data; older versions only decrypt until retired;
- a retired version's key material is destroyed; retiring the current version is refused, and so
  is retiring while the current version is younger than ``ROTATION_SETTLE_SECONDS`` (the caller,
  ``casepackets keys retire``, additionally refuses while any row still depends on it);
- a version of the pseudonym or log signing key is first **staged**: stored, with the index its
  rotation entry takes in the access log, but not current. It becomes current (``promote``) once
  that entry has committed; until then readers under the log's lock learn from the log whether
  it did (``service.access_log.service.logged_current_key``), so a key command killed between
  writing the keyring and committing leaves no current version the log never recorded. A staged
  version that never committed is discarded (retired) by the next key command;
- a loaded keyring follows its file: at most ``RELOAD_CHECK_SECONDS`` after a rotation or
  retirement by another process (``casepackets keys``), every running worker encrypts under the
  new version and no longer holds the retired one;
- key material never appears in a repr, a log line or an exception message.

``KeyProvider`` is the boundary the rest of the service depends on, so an HSM (PKCS#11) can replace
the file later without touching callers.
"""

from __future__ import annotations

import base64
import copy
import fcntl
import glob
import json
import logging
import os
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from service.durable import sync_folder

Purpose = Literal["pseudonym", "vault", "packet", "log_signing"]
PURPOSES: tuple[Purpose, ...] = get_args(Purpose)
# The key-encryption keys: `keys rewrap` moves what they wrap to their newest version.
REWRAPPED_PURPOSES: frozenset[Purpose] = frozenset({"vault", "packet"})
KEY_BYTES = 32
FILE_FORMAT = "casepackets-keyring/1"
# How often a loaded keyring looks at its file (one stat) for a change made by another process.
RELOAD_CHECK_SECONDS = 1.0
# How long a new current version must have existed before an older one may be retired: workers
# see a rotation within RELOAD_CHECK_SECONDS, but a transaction they began before it may still
# write under the old version. Rows that did are found by the dependents check before retiring.
ROTATION_SETTLE_SECONDS = 300
# How long a change to the keyring waits for another one in progress before giving up. A key
# command holds the lock for one transaction (its checks and its log entry), so a longer wait
# means a command that is stuck, and the operator had better hear of it than wait with it.
EDIT_LOCK_TIMEOUT_SECONDS = 5.0
_EDIT_LOCK_POLL_SECONDS = 0.05

log = logging.getLogger(__name__)


class KeyringError(Exception):
    """The keyring is missing, unreadable, malformed, or the operation is not allowed."""


class KeyringMissing(KeyringError):
    """No keyring file at the configured path."""


class KeyringTooOpen(KeyringError):
    """The keyring file is readable by group or others."""


class KeyringInaccessible(KeyringError):
    """The keyring file, its lock or its folder cannot be read or written (permissions, a path
    through a file)."""


class KeyringBusy(KeyringError):
    """Another process held the keyring's edit lock for longer than the wait allows."""


class UnknownKey(KeyringError):
    """No such purpose or version (or the version was retired and its material destroyed)."""


@dataclass(frozen=True, repr=False, eq=False)
class Key:
    """One version of one purpose's secret key. ``material`` is 32 random bytes."""

    purpose: Purpose
    version: int
    material: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"Key(purpose={self.purpose!r}, version={self.version}, material=***)"

    @cached_property
    def aead(self) -> AESGCM:
        """The AES-256-GCM cipher for this key (built once; used by ``envelope``)."""
        return AESGCM(self.material)


@dataclass(frozen=True)
class KeyVersionInfo:
    """What may be shown about a key version: never its material."""

    purpose: Purpose
    version: int
    created_at: str
    retired_at: str | None
    current: bool
    staged: bool = False


@dataclass(frozen=True)
class Staged:
    """A version a rotation stored before committing its log entry, which takes ``leaf_index``:
    current once the log holds that entry, never if it does not."""

    purpose: Purpose
    version: int
    leaf_index: int

    @property
    def object_id(self) -> str:
        """The ``object_id`` of the rotation entry that names this version."""
        return f"{self.purpose}/v{self.version}"


class KeyProvider(Protocol):
    """Where keys come from (the keyring file today, an HSM later)."""

    def current(self, purpose: Purpose) -> Key: ...

    def get(self, purpose: Purpose, version: int) -> Key: ...

    def active(self, purpose: Purpose) -> list[Key]: ...

    def versions(self, purpose: Purpose) -> list[KeyVersionInfo]: ...

    def staged(self, purpose: Purpose) -> Staged | None: ...

    @property
    def unreadable(self) -> bool:
        """True while the key source has changed but cannot be read (the keys held may be out
        of date)."""
        ...

    def refresh(self) -> None:
        """Look at the key source now rather than when it is next due (see ``Keyring``)."""
        ...


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def check_purpose(purpose: str) -> Purpose:
    if purpose not in PURPOSES:
        raise UnknownKey(f"unknown key purpose {purpose!r} (known: {', '.join(PURPOSES)})")
    return purpose


def _inaccessible(path: Path, exc: OSError) -> KeyringInaccessible:
    """``exc`` (never a key's material: it comes from the file system) said about ``path``."""
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
    return KeyringInaccessible(
        f"cannot use the keyring at {path}: {exc.strerror or type(exc).__name__}{where}"
    )


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.new-"


# What earlier versions named their temporary files, whatever the keyring's name.
_OLD_TEMPORARY_PREFIX = ".keyring-"


def _real_path(path: Path) -> Path:
    """The file a keyring path names: where a symbolic link points (through every link), else
    the path itself. Resolved once per change, so its lock, its read and its write are all of
    one file, and the link stays."""
    if not path.is_symlink():
        return path
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: a loop of links (Python 3.11)
        raise KeyringInaccessible(
            f"cannot use the keyring at {path}: its symbolic links lead nowhere (a loop)"
        ) from None


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all, through a temporary file beside it. Called under the
    edit lock, so a temporary file found there is what a write killed before its rename left
    (``kill -9``, a power cut): it holds every key of its day, retired ones included later, so
    it is deleted first, and so is one an earlier version left (named ``.keyring-…``).
    ``path`` is the file itself (``_real_path``)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for pattern in (f"{glob.escape(_temporary_prefix(path))}*", f"{_OLD_TEMPORARY_PREFIX}*"):
            for leftover in path.parent.glob(pattern):
                leftover.unlink(missing_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=_temporary_prefix(path), dir=path.parent)
    except OSError as exc:
        raise _inaccessible(path, exc) from exc
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
        # The rename itself survives a power cut only once its folder is on disk: a staged key
        # lost while the rotation's commit survived would leave the log naming a lost key.
        sync_folder(path.parent)
    except BaseException as exc:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _inaccessible(path, exc) from exc
        raise


def _read_document(path: Path) -> dict[str, Any]:
    """The keyring file's JSON document, refused when it is not readable as a keyring."""
    raw = _read_private(path)
    try:
        document = json.loads(raw)
    except ValueError:
        raise KeyringError(f"{path} is not a valid keyring (not JSON)") from None
    if not isinstance(document, dict) or document.get("format") != FILE_FORMAT:
        raise KeyringError(f"{path} is not a keyring of format {FILE_FORMAT}")
    return document


def _read_private(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise KeyringMissing(
            f"no keyring at {path}; run `casepackets keys init` (or set CASEPACKETS_KEYRING_PATH)"
        ) from None
    except OSError as exc:
        raise _inaccessible(path, exc) from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyringTooOpen(
            f"{path} is readable by group or others (mode {oct(mode & 0o777)}); "
            f"run chmod 600 {path}"
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _inaccessible(path, exc) from exc


class Keyring:
    """A ``KeyProvider`` backed by a JSON file (mode 0600) holding every version of every key.

    It follows the file: once ``RELOAD_CHECK_SECONDS`` have passed since it last looked, the next
    use compares the file's identity (inode, size, modification time) and reads it again when it
    changed. A file that cannot be read then is reported (never its content) and the keys held
    stay in use until it can be.
    """

    def __init__(self, path: Path, document: dict[str, Any]) -> None:
        self.path = path
        # The document and its keys, replaced together (one assignment) when the file changes.
        self._loaded = _parse(path, document)
        self._file_id = _file_id(path)
        self._checked_at = time.monotonic()
        self._reload_lock = threading.Lock()
        self._unreadable = False

    def __repr__(self) -> str:
        return f"Keyring(path={str(self.path)!r}, keys=***)"

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def init(cls, path: Path) -> Keyring:
        """Create a new keyring with version 1 of every purpose; refuses to overwrite one (the
        check and the write are made under the edit lock, so of two inits one is refused)."""
        created = _now()
        document: dict[str, Any] = {
            "format": FILE_FORMAT,
            "purposes": {
                purpose: {
                    "current": 1,
                    "versions": {"1": {"material": _new_material(), "created_at": created}},
                }
                for purpose in PURPOSES
            },
        }
        path = _real_path(path)
        with _edit_lock(path, timeout=EDIT_LOCK_TIMEOUT_SECONDS):
            if os.path.lexists(path):
                raise KeyringError(f"a keyring already exists at {path}; refusing to overwrite it")
            _write_atomically(path, _dump(document))
        return cls(path, document)

    @classmethod
    def load(cls, path: Path) -> Keyring:
        """Read the keyring at ``path``; refuses a missing, group/world-readable or bad file."""
        return cls(path, _read_document(path))

    @staticmethod
    @contextmanager
    def edit(path: Path) -> Iterator[LockedKeyring]:
        """The keyring at ``path`` read afresh under its edit lock, which is held until the block
        ends; the changes (``rotate``, ``retire``) are made on it. Waits at most
        ``EDIT_LOCK_TIMEOUT_SECONDS`` for a change in progress, then raises ``KeyringBusy``."""
        # Edits through a symbolic link and through the file's own path take turns on one lock,
        # beside the file itself.
        path = _real_path(path)
        with _edit_lock(path, timeout=EDIT_LOCK_TIMEOUT_SECONDS) as lock:
            yield LockedKeyring(path, _read_document(path), lock=lock)

    @classmethod
    def load_or_init(cls, path: Path) -> Keyring:
        """The keyring at ``path``, created on first use (development and test only)."""
        if not path.exists():
            try:
                return cls.init(path)
            except KeyringError:
                pass  # another process created it first
        return cls.load(path)

    @property
    def _document(self) -> dict[str, Any]:
        return self._loaded[0]

    @property
    def _keys(self) -> dict[tuple[Purpose, int], Key]:
        return self._loaded[1]

    def refresh(self) -> None:
        """Read the file again now if another process changed it, without waiting for the
        interval: for a check that must see a rotation committed a moment ago."""
        self._follow_file(now=True)

    @property
    def unreadable(self) -> bool:
        """True while the file has changed but could not be read again (see ``_follow_file``)."""
        return self._unreadable

    def _follow_file(self, *, now: bool = False) -> None:
        """Read the file again if another process changed it (looked at once per interval, or
        at once when ``now``)."""
        moment = time.monotonic()
        if not now and moment - self._checked_at < RELOAD_CHECK_SECONDS:
            return
        if not self._reload_lock.acquire(blocking=now):
            return
        try:
            self._checked_at = moment
            file_id = _file_id(self.path)
            if file_id == self._file_id:
                self._unreadable = False  # back to the very file whose keys are held
                return
            try:
                document = json.loads(_read_private(self.path))
                parsed = _parse(self.path, document)
            except (KeyringError, OSError, ValueError) as exc:
                log.warning(
                    "keyring %s changed but cannot be read (%s); keeping the keys held",
                    self.path,
                    type(exc).__name__,
                )
                self._unreadable = True
                return
            self._loaded = parsed
            self._file_id = file_id
            self._unreadable = False
            log.info("keyring %s changed; reloaded", self.path)
        finally:
            self._reload_lock.release()

    # -- KeyProvider ----------------------------------------------------------------------------

    def current(self, purpose: Purpose) -> Key:
        purpose = check_purpose(purpose)
        self._follow_file()
        document, keys = self._loaded
        return keys[(purpose, int(document["purposes"][purpose]["current"]))]

    def get(self, purpose: Purpose, version: int) -> Key:
        """The key of ``version``. A version this process has not seen yet is looked for in the
        file at once: another worker may have rotated a moment ago and already sealed under it
        (a packet built there, opened here), so waiting for the interval would fail a request."""
        purpose = check_purpose(purpose)
        self._follow_file()
        key = self._keys.get((purpose, version))
        if key is None:
            self._follow_file(now=True)
            key = self._keys.get((purpose, version))
        if key is None:
            raise UnknownKey(f"no usable {purpose} key version {version}")
        return key

    def active(self, purpose: Purpose) -> list[Key]:
        """Every version that can still decrypt, newest first."""
        purpose = check_purpose(purpose)
        self._follow_file()
        return sorted(
            (key for (p, _v), key in self._keys.items() if p == purpose),
            key=lambda key: key.version,
            reverse=True,
        )

    def versions(self, purpose: Purpose) -> list[KeyVersionInfo]:
        purpose = check_purpose(purpose)
        self._follow_file()
        entry = self._document["purposes"][purpose]
        staged = self.staged(purpose)
        return [
            KeyVersionInfo(
                purpose=purpose,
                version=int(version_text),
                created_at=str(version.get("created_at", "")),
                retired_at=version.get("retired_at"),
                current=int(version_text) == int(entry["current"]),
                staged=staged is not None and staged.version == int(version_text),
            )
            for version_text, version in sorted(
                entry["versions"].items(), key=lambda item: int(item[0])
            )
        ]

    def staged(self, purpose: Purpose) -> Staged | None:
        """The version a rotation staged and has not yet promoted or discarded, if any."""
        purpose = check_purpose(purpose)
        self._follow_file()
        found = self._document["purposes"][purpose].get("staged")
        if found is None:
            return None
        return Staged(purpose, int(found["version"]), int(found["leaf_index"]))


class LockedKeyring(Keyring):
    """A keyring read under its edit lock (made by ``Keyring.edit`` only). While the lock is
    held it may change the file; afterwards it is an ordinary, read-only ``Keyring``."""

    def __init__(self, path: Path, document: dict[str, Any], *, lock: _EditLock) -> None:
        super().__init__(path, document)
        self._lock = lock

    def next_version(self, purpose: Purpose) -> int:
        """The version number ``rotate`` gives ``purpose`` next (retired ones count): the one
        it will write, as long as the lock is held."""
        self._require_lock()
        return (
            max(int(v) for v in self._document["purposes"][check_purpose(purpose)]["versions"]) + 1
        )

    # -- changes (each rewrites the file atomically) --------------------------------------------

    def rotate(self, purpose: Purpose, *, material: bytes | None = None) -> Key:
        """Add a new version of ``purpose`` that encrypts from now on; returns it.

        ``material`` is fresh from ``new_key_material`` when the caller must know the new key
        before it is stored (the log signing key, whose public half is logged first)."""
        document, version = self._with_new_version(purpose, material)
        document["purposes"][purpose]["current"] = version
        self._save(document)
        return self.current(purpose)

    def _with_new_version(
        self, purpose: Purpose, material: bytes | None
    ) -> tuple[dict[str, Any], int]:
        """A copy of the document with a new version of ``purpose`` (not yet current)."""
        purpose = check_purpose(purpose)
        if material is not None and len(material) != KEY_BYTES:
            raise KeyringError(f"a key is {KEY_BYTES} bytes")
        if (staged := self.staged(purpose)) is not None:
            raise KeyringError(
                f"{purpose} v{staged.version} is staged by a rotation not yet settled; settle it "
                f"first (every key command does)"
            )
        version = self.next_version(purpose)
        document = copy.deepcopy(self._document)
        encoded = _new_material() if material is None else base64.b64encode(material).decode()
        entry = document["purposes"][purpose]
        entry["versions"][str(version)] = {"material": encoded, "created_at": _now()}
        return document, version

    def stage(self, purpose: Purpose, *, material: bytes, leaf_index: int) -> Key:
        """Store a new version of ``purpose`` as staged, its rotation entry being the log's
        ``leaf_index``, before the caller commits that entry. It stays staged whatever happens
        next, a failed commit included (a commit can fail after the database has made it
        durable): the log tells whether it became current (see ``Staged``), and the next key
        command settles it."""
        document, version = self._with_new_version(purpose, material)
        document["purposes"][purpose]["staged"] = {"version": version, "leaf_index": leaf_index}
        self._save(document)
        return self.get(purpose, version)

    def promote(self, purpose: Purpose) -> Key:
        """Make the staged version current: call only once its rotation entry has committed."""
        staged = self._require_staged(purpose)
        document = copy.deepcopy(self._document)
        entry = document["purposes"][staged.purpose]
        entry["current"] = staged.version
        del entry["staged"]
        self._save(document)
        return self.current(staged.purpose)

    def discard(self, purpose: Purpose) -> int:
        """Destroy the staged version whose rotation entry never committed (nothing used it:
        readers take a staged version only once the log names it); returns its number, which
        stays taken."""
        staged = self._require_staged(purpose)
        document = copy.deepcopy(self._document)
        entry = document["purposes"][staged.purpose]
        _retire_in(entry, staged.version)
        del entry["staged"]
        self._save(document)
        return staged.version

    def _require_staged(self, purpose: Purpose) -> Staged:
        self._require_lock()
        staged = self.staged(purpose)
        if staged is None:
            raise KeyringError(f"no {purpose} version is staged")
        return staged

    def check_old_version(self, purpose: Purpose, version: int) -> None:
        """Raise unless ``version`` is an old, active version: the current one, or one that
        does not exist or is retired already, can never be retired."""
        entry = self._document["purposes"][check_purpose(purpose)]
        if int(entry["current"]) == version:
            raise KeyringError(f"{purpose} v{version} is current; rotate before retiring it")
        if (staged := self.staged(purpose)) is not None and staged.version == version:
            raise KeyringError(
                f"{purpose} v{version} is staged by a rotation not yet settled; any key command "
                f"settles it first"
            )
        found = entry["versions"].get(str(version))
        if found is None or found.get("retired_at"):
            raise UnknownKey(f"no active {purpose} key version {version}")

    def check_retirable(self, purpose: Purpose, version: int) -> None:
        """Raise what ``retire`` would refuse with (a caller logs the retirement only when it
        will happen). The caller checks that nothing depends on the version."""
        purpose = check_purpose(purpose)
        self._require_lock()
        self.check_old_version(purpose, version)
        entry = self._document["purposes"][purpose]
        age = _age_seconds(entry["versions"][str(entry["current"])].get("created_at"))
        if age < ROTATION_SETTLE_SECONDS:
            raise KeyringError(
                f"{purpose} v{entry['current']} became current {int(age)} s ago; running workers "
                f"may still be finishing work under older versions. Retire no sooner than "
                f"{ROTATION_SETTLE_SECONDS} s after the rotation"
                + (", after `casepackets keys rewrap`" if purpose in REWRAPPED_PURPOSES else "")
            )

    def retire(self, purpose: Purpose, version: int) -> None:
        """Destroy an old version's material (``check_retirable`` says when it is refused)."""
        self.check_retirable(purpose, version)
        purpose = check_purpose(purpose)
        document = copy.deepcopy(self._document)
        _retire_in(document["purposes"][purpose], version)
        self._save(document)

    def _require_lock(self) -> None:
        if not self._lock.held:
            raise KeyringError("the keyring changes only inside `Keyring.edit`, under its lock")

    def _save(self, document: dict[str, Any]) -> None:
        self._require_lock()
        parsed = _parse(self.path, document)  # a document that would not load is never written
        _write_atomically(self.path, _dump(document))
        self._loaded = parsed
        self._file_id = _file_id(self.path)


@dataclass
class _EditLock:
    """This process's hold on a keyring's edit lock: ``held`` until the lock is released."""

    held: bool


@contextmanager
def _edit_lock(path: Path, *, timeout: float) -> Iterator[_EditLock]:
    """Hold the exclusive ``flock`` on ``<path>.lock`` (created 0600), taken within ``timeout``
    seconds or not at all (``KeyringBusy``). Closing the descriptor releases it, also when the
    process dies."""
    lock_path = path.with_name(f"{path.name}.lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise _inaccessible(path, exc) from exc
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise KeyringBusy(
                        f"another key command is running; try again (waited {timeout:g} s "
                        f"for {lock_path})"
                    ) from None
                time.sleep(_EDIT_LOCK_POLL_SECONDS)
        lock = _EditLock(held=True)
        try:
            yield lock
        finally:
            lock.held = False
    finally:
        os.close(fd)


def _retire_in(entry: dict[str, Any], version: int) -> None:
    """Replace ``version`` in a purpose's ``entry`` by its retired form: no material, ever."""
    found = entry["versions"][str(version)]
    entry["versions"][str(version)] = {
        "created_at": found.get("created_at", ""),
        "retired_at": _now(),
    }


def _age_seconds(created_at: Any) -> float:
    """Seconds since a version's ``created_at``; a version without one counts as old, and a
    time without a zone (written by hand) is in UTC, as the file's own times are."""
    try:
        created = datetime.fromisoformat(str(created_at))
    except ValueError:
        return float("inf")
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return (datetime.now(UTC) - created).total_seconds()


def _file_id(path: Path) -> tuple[int, int, int] | None:
    """What tells a rewritten keyring file from the one read (None: there is none now)."""
    try:
        found = path.stat()
    except OSError:
        return None
    return found.st_ino, found.st_size, found.st_mtime_ns


def _parse(
    path: Path, document: dict[str, Any]
) -> tuple[dict[str, Any], dict[tuple[Purpose, int], Key]]:
    """The document with its usable keys, checked; ``KeyringError`` names what is wrong."""
    purposes = document.get("purposes")
    if not isinstance(purposes, dict):
        raise KeyringError(f"{path}: 'purposes' is missing")
    keys: dict[tuple[Purpose, int], Key] = {}
    for purpose in PURPOSES:
        entry = purposes.get(purpose)
        if not isinstance(entry, dict) or not isinstance(entry.get("versions"), dict):
            raise KeyringError(f"{path}: purpose {purpose!r} is missing")
        for version_text, version in entry["versions"].items():
            # The name is not echoed: in a hand-edited file it could be anything, material too.
            if version_number(version_text) is None:
                raise KeyringError(f"{path}: {purpose} has a version whose name is not a number")
            if not isinstance(version, dict):
                raise KeyringError(f"{path}: {purpose} v{version_text} is not an object")
            if version.get("retired_at"):
                continue
            try:
                material = base64.b64decode(version["material"], validate=True)
            except (KeyError, TypeError, ValueError):
                raise KeyringError(
                    f"{path}: {purpose} v{version_text} has no valid key material"
                ) from None
            if len(material) != KEY_BYTES:
                raise KeyringError(f"{path}: {purpose} v{version_text} is not 32 bytes")
            keys[(purpose, int(version_text))] = Key(purpose, int(version_text), material)
        current = entry.get("current")
        if not isinstance(current, int) or isinstance(current, bool):
            raise KeyringError(f"{path}: {purpose} has no current version")
        if (purpose, current) not in keys:
            raise KeyringError(f"{path}: current version of {purpose!r} is unusable")
        _check_staged(path, purpose, entry.get("staged"), current=current, keys=keys)
    return document, keys


def version_number(text: str) -> int | None:
    """The key version ``text`` names, written as the keyring, its envelopes and its digests
    write one: ASCII digits without a leading zero; None for anything else. ``str.isdigit``
    alone lets through digits ``int`` cannot read (a superscript two, more digits than ``int``
    reads) and second spellings of a number (``01``, full-width digits), two names whose keys
    would silently take each other's place as one version."""
    if not (text.isascii() and text.isdigit()):
        return None
    try:
        number = int(text)
    except ValueError:  # past the digits ``int`` reads
        return None
    return number if str(number) == text else None


def _check_staged(
    path: Path, purpose: Purpose, staged: Any, *, current: int, keys: dict[tuple[Purpose, int], Key]
) -> None:
    if staged is None:
        return
    if not (
        isinstance(staged, dict)
        and set(staged) == {"version", "leaf_index"}
        and all(_is_count(value) for value in staged.values())
    ):
        raise KeyringError(f"{path}: {purpose} has a staged version that is not well formed")
    version = int(staged["version"])
    if version <= current or (purpose, version) not in keys:
        raise KeyringError(f"{path}: the staged version of {purpose!r} is unusable")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def new_key_material() -> bytes:
    """Fresh key material from the operating system's CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


def _new_material() -> str:
    return base64.b64encode(new_key_material()).decode("ascii")


def _dump(document: dict[str, Any]) -> bytes:
    return json.dumps(document, indent=2, sort_keys=True).encode("utf-8") + b"\n"
