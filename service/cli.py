"""The ``casepackets`` command line: one console script, one sub-command per job.

Secrets never reach the terminal except the tokens ``token``/``serve`` are asked to print.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from sqlalchemy import func, select
from sqlmodel import Session

import service.packets.service  # noqa: F401  (registers packets.wrapped_key for `keys`)
from service.access_log.service import (
    LogEntry,
    LogUnavailable,
    append,
    hold_lock,
    latest_checkpoint_opens,
    logged_current_key,
    rotation_committed,
)
from service.auth.permissions import Role
from service.auth.tokens import DevIssuer, KeySet
from service.config import Settings, UnsafeSettings, get_settings
from service.crypto.issuer_keys import load_or_create_private_pem
from service.crypto.keyring import (
    PURPOSES,
    REWRAPPED_PURPOSES,
    Keyring,
    KeyringBusy,
    KeyringError,
    KeyringInaccessible,
    LockedKeyring,
    Purpose,
    check_purpose,
    new_key_material,
)
from service.db import (
    Database,
    DatabaseBusy,
    DatabaseProblem,
    database_problems,
    migration_scripts,
    missing_sqlite_file,
    schema_is_current,
)
from service.db import migrate as run_migrations
from service.errors import ServiceError
from service.policies import Policies, load_policies
from service.records.bulk import (
    CSV_COLUMNS,
    BulkResult,
    ImportRefused,
    import_csv,
    ingest_records,
)
from service.records.demo import REFERENCE_DATE, demo_records
from service.records.models import (
    DEMO_SOURCE_PREFIX,
    DEMO_SOURCE_REFUSAL,
    MAX_BATCH_ROWS,
    MAX_SUBJECT_EVENTS,
    SOURCE_MAX,
    usable_source,
)
from service.records.service import (
    BATCHES,
    SUBJECTS,
    WRAPPED_KEY_COLUMNS,
    RowKey,
    count_key_dependents,
    lock_out_vault_readers,
    opens_under,
    pending_rewraps,
    rewrap_chunk,
)
from service.records.vocabulary import VocabularyError, load_event_types

app = typer.Typer(
    name="casepackets",
    help="Per-professional case packets over pseudonymized records.",
    no_args_is_help=True,
    add_completion=False,
    # A traceback's local variables may hold a BSN, a name or a key, and older Typer versions
    # (pyproject allows them) showed them by default; a plain traceback never shows them.
    pretty_exceptions_show_locals=False,
    pretty_exceptions_enable=False,
)
# soft_wrap: a message written to a log file or pipe is not broken into 80-column lines.
console = Console(stderr=True, soft_wrap=True)


def shown(value: object) -> str:
    """``value`` as text in a console line, as written: a path or a message holding ``[`` is
    not markup (``[daily]`` would vanish as a style; ``a[/b]`` would end the command in a
    MarkupError, after its work was done)."""
    return escape(str(value))


def settings_or_exit() -> Settings:
    try:
        return get_settings()
    except (UnsafeSettings, ValueError) as exc:
        console.print(
            f"[red]configuration refused:[/red] {shown(refusal(exc))}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2) from None


def refusal(exc: ValueError) -> str:
    """What is wrong with the settings, by environment variable rather than pydantic field."""
    if not isinstance(exc, ValidationError):
        return str(exc)
    problems = []
    for error in exc.errors(include_url=False):
        message = str(error["msg"]).removeprefix("Value error, ")
        field = "_".join(str(part) for part in error["loc"])
        problems.append(f"CASEPACKETS_{field.upper()}: {message}" if field else message)
    return "; ".join(problems)


def policies_or_exit(settings: Settings) -> Policies:
    """Every policy file, read and checked together as the service's start-up does, so a
    mistake in one (or between two) is a line naming it, before any worker starts (and fails)
    with a traceback, or a command runs with a policy the service would refuse."""
    try:
        return load_policies(settings.policies_dir)
    except (OSError, ValueError) as exc:
        console.print(f"[red]policy refused:[/red] {shown(exc)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def token_keys_or_exit(settings: Settings) -> None:
    """Read the pinned JWKS file once, as every worker will, so a missing or broken one is a
    line naming it before any worker starts (and fails, and is restarted) with a traceback."""
    if settings.jwks_file is None:
        return
    try:
        KeySet.from_file(settings.jwks_file, algorithm=settings.jwt_algorithm)
    except ValueError as exc:
        console.print(
            f"[red]configuration refused:[/red] CASEPACKETS_JWKS_FILE: {shown(exc)}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2) from None


@contextmanager
def database_problems_exit() -> Iterator[None]:
    """A database that cannot be used ends the command with one line: exit status 1 when it was
    busy (try again), 2 when the operator must fix something (reach it, or run other code)."""
    try:
        yield
    except DatabaseProblem as exc:
        console.print(f"[red]failed:[/red] {shown(exc)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1 if isinstance(exc, DatabaseBusy) else 2) from None


def data_folder_or_exit(settings: Settings) -> None:
    """Create the data folder (CASEPACKETS_HOME) if needed; one that cannot be, refuses."""
    try:
        settings.home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        console.print(
            f"[red]refused:[/red] CASEPACKETS_HOME {shown(settings.home)} cannot be the data "
            "folder: "
            f"{exc.strerror or type(exc).__name__}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2) from None


def dev_issuer(settings: Settings) -> DevIssuer:
    if not settings.dev_issuer:
        why = (
            "tokens come from the identity provider (CASEPACKETS_JWKS_FILE or CASEPACKETS_JWKS_URL)"
            if settings.jwks_file or settings.jwks_url
            else "CASEPACKETS_DEV_ISSUER=false"
        )
        console.print(f"[red]the built-in issuer is off[/red]: {shown(why)}", highlight=False)
        raise typer.Exit(2)
    try:
        private_pem = load_or_create_private_pem(
            settings.dev_issuer_key_path, settings.jwt_algorithm
        )
    except OSError as exc:  # KeyFileTooOpen among them: its message says what to run
        reason = f"cannot use {exc.filename}: {exc.strerror}" if exc.strerror else str(exc)
        console.print(
            f"[red]built-in issuer's key refused:[/red] {shown(reason)}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2) from None
    return DevIssuer(
        private_pem=private_pem,
        algorithm=settings.jwt_algorithm,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
    )


@app.command()
def migrate() -> None:
    """Bring the database schema to the newest revision (Alembic).

    There are no downgrades: back the database up before migrating, and to go back to an older
    casepackets, restore that backup. Waits up to 60 s for locks held by running work.
    """
    settings = settings_or_exit()
    data_folder_or_exit(settings)
    with database_problems_exit():
        migrated = run_migrations(settings.resolved_database_url, settings.migrations_dir)
    if migrated.before == migrated.after:
        console.print(f"schema is up to date (revision {migrated.after})", highlight=False)
    else:
        console.print(
            f"schema migrated from {migrated.before or 'an empty database'} to revision "
            f"{migrated.after}",
            highlight=False,
        )


@app.command()
def backup(
    out: Annotated[Path, typer.Option(help="the new file to write the copy to")],
) -> None:
    """Copy the SQLite database to a new file --out (mode 0600) while the service runs.

    One consistent snapshot, including what the -wal file holds (a plain copy of the database
    file misses the latest writes, access-log entries among them). Never replaces a file. The
    copy holds pseudonyms and ciphertexts: keep it apart from the keyring. On PostgreSQL use
    pg_dump.
    """
    from service.db import backup_sqlite, is_sqlite

    settings = settings_or_exit()
    url = settings.resolved_database_url
    if not is_sqlite(url):
        console.print(
            "[red]refused:[/red] the database is PostgreSQL: back it up with pg_dump (for "
            "example `pg_dump --format=custom --file=casepackets.dump <database>`)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2)
    try:
        with console.status("copying the database"):
            size = backup_sqlite(url, out)
    except (OSError, ValueError, sqlite3.Error) as exc:
        reason = (
            f"{exc.strerror}: {exc.filename}"
            if isinstance(exc, OSError) and exc.strerror
            else f"{type(exc).__name__}: {exc}"
        )
        console.print(f"[red]failed:[/red] {shown(reason)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2 if isinstance(exc, OSError | ValueError) else 1) from None
    # Escaped: a path is text, and a folder named `[daily]` is not a style (nor `a[/b]` an error).
    console.print(
        f"backed up the database to {shown(out)} ({size:,} bytes); keep it apart from the keyring",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def token(
    sub: Annotated[str, typer.Option(help="subject: the professional's or system's id")],
    role: Annotated[list[Role], typer.Option(help="role to grant; repeat for several")],
    ttl: Annotated[
        int,
        typer.Option(
            min=60, help="lifetime in seconds, at most CASEPACKETS_TOKEN_MAX_LIFETIME_SECONDS"
        ),
    ] = 3600,
) -> None:
    """Print a token from the built-in development issuer."""
    from service.auth.tokens import SUBJECT_REASON, usable_subject

    settings = settings_or_exit()
    if not usable_subject(sub):
        # Not echoed: a name or a national id typed here by mistake stays out of the terminal.
        console.print(
            f"[red]--sub refused:[/red] {SUBJECT_REASON.removeprefix('token ')}: the service "
            "would refuse the token",
            highlight=False,
        )
        raise typer.Exit(2)
    if ttl > settings.token_max_lifetime_seconds:
        console.print(
            f"[red]--ttl {ttl} is longer than CASEPACKETS_TOKEN_MAX_LIFETIME_SECONDS "
            f"({settings.token_max_lifetime_seconds})[/red]: the service would refuse the token",
            highlight=False,
        )
        raise typer.Exit(2)
    key_path = settings.dev_issuer_key_path
    first_key = not key_path.exists()
    issuer = dev_issuer(settings)
    if first_key:
        # Most often a command run from another folder than the service's (CASEPACKETS_HOME
        # defaults to ./var): its tokens would be refused as signed by an unknown key.
        console.print(
            f"[yellow]created a new built-in issuer key at {shown(key_path.resolve())}[/yellow]: a "
            "service already running with another CASEPACKETS_HOME refuses this token; run "
            "the command where the service runs, or set CASEPACKETS_HOME to its data folder",
            highlight=False,
        )
    print(
        issuer.mint(
            subject=sub,
            roles=[r.value for r in role],
            roles_claim=settings.roles_claim,
            ttl_seconds=ttl,
        )
    )


# Lifetime of the tokens `serve` prints (shorter if CASEPACKETS_TOKEN_MAX_LIFETIME_SECONDS is).
DEMO_TOKEN_SECONDS = 12 * 3600
DEMO_SUBJECTS = {
    Role.PROFESSIONAL: "prof-001",
    Role.COORDINATOR: "coord-001",
    Role.SOURCE: "source-welfare",
    Role.AUDITOR: "auditor-001",
    Role.ANALYST: "analyst-001",
    Role.ADMIN: "admin-001",
}


def serves_demo_data(settings: Settings) -> bool:
    """Whether ``serve`` fills the database with demo data: only the embedded default (SQLite in
    the data folder) outside production. A database named by a URL may be a real one."""
    return settings.env != "production" and not settings.database_url


def prepare(settings: Settings) -> None:
    """Everything the service needs before it serves: data folder, keys, schema, demo data.

    Idempotent: the keyring is created only when absent, and the demo population (into the
    embedded database only, see ``serves_demo_data``) is loaded only into an empty record store.
    """
    data_folder_or_exit(settings)
    if settings.dev_issuer:
        dev_issuer(settings)
    if not settings.resolved_keyring_path.exists():
        if settings.env == "production":
            console.print(
                f"[red]no keyring at {shown(settings.resolved_keyring_path)}[/red]: in "
                "production it is created deliberately, once, with `casepackets keys init` "
                "(and backed up apart from the database)",
                highlight=False,
            )
            raise typer.Exit(2)
        try:
            Keyring.init(settings.resolved_keyring_path)
        except KeyringError as exc:
            # Another process (a second `serve` on a fresh data folder) created it meanwhile:
            # that one is used, as the workers do (keyring_or_exit below checks it).
            if not settings.resolved_keyring_path.exists():
                console.print(
                    f"[red]keyring refused:[/red] {shown(exc)}", highlight=False, soft_wrap=True
                )
                raise typer.Exit(2) from None
        else:
            console.print(f"created the keyring at {shown(settings.resolved_keyring_path)}")
    # Read as every worker will read it, so a keyring it would refuse (too open, unreadable) is
    # one line naming what to fix, not a traceback from each worker; and before the schema is
    # touched, so a start that is refused has changed nothing.
    keyring_or_exit(settings)
    with database_problems_exit():
        run_migrations(settings.resolved_database_url, settings.migrations_dir)
    if serves_demo_data(settings):
        prepare_demo(settings)
    elif settings.env != "production":
        console.print(
            "no demo data: a database URL is set, and `serve` loads demo data only into the "
            "embedded SQLite database (`casepackets demo` loads a synthetic population on purpose)",
            highlight=False,
        )


def prepare_demo(settings: Settings) -> None:
    """The demo population, and a run and packets over it, each made only when absent."""
    load_demo_if_empty(settings, subjects=PREPARE_DEMO_SUBJECTS, seed=1)
    build_demo_packets_if_none(settings)


def build_demo_packets_if_none(settings: Settings) -> None:
    """First run only: a demo team, a flagging run and packets for them to open.

    The run is as of the demo's reference date, the day its histories end, so it flags what the
    demo population shows whatever today's date.
    """
    from service.packets.demo import build_demo_packets, has_packets

    policies = policies_or_exit(settings)
    keyring = keyring_or_exit(settings)
    with database_for(settings) as database, database.transaction() as session:
        if has_packets(session=session):
            return
        if not holds_demo_records_only(session):
            # Records someone imported: a demo team must never be given packets of real people.
            console.print(
                "no demo packets: the database holds records that are not the demo's",
                highlight=False,
            )
            return
        built = build_demo_packets(
            session=session,
            keyring=keyring,
            flagging_policy=policies.flagging,
            packet_size=policies.partitioning.packet_size,
            retention=policies.retention,
            as_of=REFERENCE_DATE,
        )
    console.print(
        f"demo: flagging run {built.run_id} as of {REFERENCE_DATE} flagged {built.flagged}; "
        f"{built.packets} packets assigned to the demo team ({built.unplaced} unplaced)",
        highlight=False,
    )


def demo_first_packet(settings: Settings, professional_id: str) -> str | None:
    """The demo professional's first packet, while the database holds the demo's records alone
    (a curl that re-identifies real people is never printed)."""
    from service.packets.demo import first_packet_of

    with database_for(settings) as database, database.transaction() as session:
        if not holds_demo_records_only(session):
            return None
        return first_packet_of(session=session, professional_id=professional_id)


def holds_demo_records_only(session: Session) -> bool:
    """Whether every batch of records stored came from ``casepackets demo`` or ``serve``'s demo
    (their source is ``demo-seed-<seed>``)."""
    others = (
        select(func.count())
        .select_from(BATCHES)
        .where(~BATCHES.c.source.startswith(DEMO_SOURCE_PREFIX))
    )
    return not session.connection().execute(others).scalar()


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    # Bounded here: uvicorn binds a larger number modulo 65536 while reporting it unchanged.
    port: Annotated[int, typer.Option(envvar="PORT", min=1, max=65535, help="port to bind")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="worker processes")] = 1,
    print_tokens: Annotated[
        bool, typer.Option(help="print a demo token per role (built-in issuer only)")
    ] = True,
) -> None:
    """Prepare (keys, migrations) and serve the API."""
    import uvicorn

    settings = settings_or_exit()
    policies_or_exit(settings)
    token_keys_or_exit(settings)
    prepare(settings)
    if settings.dev_issuer and print_tokens:
        issuer = dev_issuer(settings)
        ttl = min(DEMO_TOKEN_SECONDS, settings.token_max_lifetime_seconds)
        out = Console(soft_wrap=True)
        count, unit = (ttl // 3600, "hour") if ttl % 3600 == 0 else (ttl // 60, "minute")
        lifetime = f"{count} {unit}{'' if count == 1 else 's'}"
        out.print(f"\n[bold]casepackets[/bold] demo tokens (valid {lifetime}):")
        for role, subject in DEMO_SUBJECTS.items():
            minted = issuer.mint(
                subject=subject,
                roles=[role.value],
                roles_claim=settings.roles_claim,
                ttl_seconds=ttl,
            )
            out.print(f"\n[cyan]{role.value}[/cyan] ({subject}):", highlight=False)
            print(minted)
        # A wildcard address is where the service listens, not an address to call it at.
        reachable = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104
        if ":" in reachable:
            reachable = f"[{reachable}]"  # an IPv6 address in a URL
        base = f"http://{reachable}:{port}"
        out.print(
            "\nPut a token in TOKEN, then try:"
            f'\n  curl -s -H "Authorization: Bearer $TOKEN" {base}/v1/me',
            highlight=False,
            markup=False,  # an IPv6 address's brackets are not a style
        )
        professional = DEMO_SUBJECTS[Role.PROFESSIONAL]
        packet_id = (
            demo_first_packet(settings, professional) if serves_demo_data(settings) else None
        )
        if packet_id:
            opener = issuer.mint(
                subject=professional,
                roles=[Role.PROFESSIONAL.value],
                roles_claim=settings.roles_claim,
                ttl_seconds=ttl,
            )
            out.print(
                f"\n[bold]Open {professional}'s first packet[/bold] (re-identifies its clients; "
                "the access is logged):",
                highlight=False,
            )
            opener_header = f"'Authorization: Bearer {opener}'"
            print(f"  curl -s -H {opener_header} {base}/v1/packets/{packet_id}/clients")
        out.print("")
    sys.stdout.flush()
    os.environ.setdefault("CASEPACKETS_HOME", str(Path(settings.home).resolve()))
    uvicorn.run(
        "service.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        access_log=True,
    )


audit = typer.Typer(
    help="Export the access log and verify an export offline.", no_args_is_help=True
)
app.add_typer(audit, name="audit")


@audit.command("export")
def audit_export(
    out: Annotated[Path, typer.Option(help="folder for the export files")],
) -> None:
    """Sign a checkpoint and write the entries it covers, their leaf hashes, the checkpoint, its
    public key and the signing key's handovers to the folder --out; then log the export (an
    audit read, in the next export)."""
    from rich.progress import Progress

    from service.access_log.export import export_log
    from service.crypto.signing import NoteSigner

    settings = settings_or_exit()
    try:
        Keyring.load(settings.resolved_keyring_path)
    except KeyringError as exc:
        console.print(f"[red]cannot sign a checkpoint:[/red] {shown(exc)}")
        raise typer.Exit(2) from None

    def signer(session: Session) -> NoteSigner:
        # Read again under the log's lock: the keyring as a rotation committed a moment ago
        # left it, and its staged version if the log holds that rotation.
        keyring = Keyring.load(settings.resolved_keyring_path)
        key = logged_current_key(session=session, keyring=keyring, purpose="log_signing")
        return NoteSigner(name=settings.checkpoint_origin, seed=key.material)

    try:
        with database_for(settings) as database:
            # Once the database is found usable (a refused export leaves no empty folder), and
            # before a checkpoint is signed for it.
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                console.print(
                    f"[red]refused:[/red] cannot write the export to {shown(out)}: {exc.strerror}",
                    highlight=False,
                    soft_wrap=True,
                )
                raise typer.Exit(2) from None
            with Progress(console=console) as progress:
                task = progress.add_task("exporting entries", total=None)
                exported = export_log(
                    database=database,
                    signer=signer,
                    origin=settings.checkpoint_origin,
                    folder=out,
                    on_start=lambda total: progress.update(task, total=total),
                    on_progress=lambda done: progress.advance(task, done),
                )
            logged = log_export(database, size=exported.size)
    except OSError as exc:
        console.print(
            f"[red]failed:[/red] cannot write the export to "
            f"{shown(f'{out}: {exc.strerror} ({exc.filename})')}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2) from None
    entries = "entry" if exported.size == 1 else "entries"
    console.print(
        f"exported {exported.size} {entries} and a signed checkpoint to {shown(out)}",
        highlight=False,
    )
    if not exported.entries_match:
        console.print(
            "[red]but the entries do not hash to the checkpoint the service signed:[/red] the "
            "stored log was altered outside the service. The export is kept as evidence; "
            "`casepackets audit verify --leaf-hashes` names the first altered entry",
            highlight=False,
            soft_wrap=True,
        )
    if logged is not None:
        console.print(
            f"[red]but the export is not in the access log:[/red] {shown(logged)}. The files are "
            "complete; tell the auditor it is not logged",
            highlight=False,
        )
    if logged is not None or not exported.entries_match:
        raise typer.Exit(1)


def log_export(database: Database, *, size: int) -> str | None:
    """Log an export as the audit read it is, after its files are in place: its checkpoint is
    signed before anything is read, so the entry is in the next export. Returns why the entry
    could not be written, or None."""
    try:
        with database.transaction() as session:
            log_system_action(
                session,
                command="audit-export",
                action="audit.read",
                object_type="audit",
                object_id=f"export:0-{size}",
                reason=None,
            )
    except LogUnavailable:
        return "the log stayed busy longer than its bound"
    except ServiceError as exc:
        return exc.detail
    return None


def trusted_key_hint(*, trusted_checkpoint: Path, trusted_public_key: Path | None) -> str:
    """What to do when the trusted checkpoint carries no signature by the key given for it."""
    from service.access_log.export import PUBLIC_KEY_FILE

    if trusted_public_key is not None:
        return (
            f"The trusted checkpoint is not signed by the key in {trusted_public_key}; give the "
            "public key exported with that checkpoint."
        )
    return (
        "The trusted checkpoint is signed by a key other than --public-key. If the log's signing "
        "key was rotated since, give the public key exported with that checkpoint: "
        f"--trusted-public-key {trusted_checkpoint.parent / PUBLIC_KEY_FILE}"
    )


@audit.command("verify")
def audit_verify(
    entries: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="entries.ndjson")],
    checkpoint: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="signed note")],
    public_key: Annotated[
        Path, typer.Option(exists=True, dir_okay=False, help="verifier key file")
    ],
    trusted_checkpoint: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="an earlier checkpoint you trust"),
    ] = None,
    trusted_public_key: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="the key that signed the trusted checkpoint (default: --public-key)",
        ),
    ] = None,
    leaf_hashes: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, help="leaf-hashes.bin, to name the first bad index"
        ),
    ] = None,
    handovers: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="handovers.ndjson, to follow the signing key from a key you trust to its "
            "successors",
        ),
    ] = None,
    key_without_handover: Annotated[
        bool,
        typer.Option(
            "--key-without-handover",
            help="accept a new checkpoint signed by --public-key though no handover leads to it "
            "from --trusted-public-key (a rotation made before handovers existed); only for a "
            "key you got over a channel you trust, never the one in the export being checked",
        ),
    ] = False,
) -> None:
    """Verify an export offline: signature, root, consistency with a trusted checkpoint.

    The checkpoint must be signed by a key you trust (--public-key; with a trusted checkpoint,
    --trusted-public-key) or by one such a key handed signing over to (--handovers). Pin the
    public key you trust; the one inside an export vouches only for that export.
    """
    from service.access_log.export import HANDOVERS_FILE
    from service.access_log.verify import (
        CheckpointRejected,
        KeyNotHandedOver,
        VerificationFailed,
        verify_files,
    )

    if trusted_public_key is not None and trusted_checkpoint is None:
        console.print("[red]--trusted-public-key is the key of a --trusted-checkpoint[/red]")
        raise typer.Exit(2)
    try:
        with byte_progress(f"verify {entries.name}", entries.stat().st_size) as report:
            verified = verify_files(
                entries=entries,
                checkpoint=checkpoint,
                public_key=public_key,
                trusted_checkpoint=trusted_checkpoint,
                trusted_public_key=trusted_public_key,
                leaf_hashes=leaf_hashes,
                handovers=handovers,
                key_without_handover=key_without_handover,
                on_progress=report,
            )
    except VerificationFailed as exc:
        # What the files say (an origin, a key name) is quoted in the message: never markup.
        console.print("[red]FAILED:[/red] ", end="")
        console.print(str(exc), highlight=False, markup=False)
        beside = checkpoint.parent / HANDOVERS_FILE
        rejected_new = isinstance(exc, KeyNotHandedOver) or (
            isinstance(exc, CheckpointRejected) and exc.which == "new" and exc.by_another_key
        )
        if rejected_new and handovers is None and beside.exists():
            console.print(
                "If the log's signing key was rotated since the key you gave, follow its "
                f"handover: --handovers {beside}",
                highlight=False,
                markup=False,
                soft_wrap=True,  # a path to copy stays on one line
            )
        elif isinstance(exc, KeyNotHandedOver):
            console.print(
                "If the log's signing key was rotated before handovers existed, and you got "
                f"the key in {public_key} over a channel you trust (not from this export), "
                "pass --key-without-handover.",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
        if (
            isinstance(exc, CheckpointRejected)
            and exc.which == "trusted"
            and exc.by_another_key
            and trusted_checkpoint is not None
        ):
            hint = trusted_key_hint(
                trusted_checkpoint=trusted_checkpoint, trusted_public_key=trusted_public_key
            )
            console.print(hint, highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(1) from None
    message = f"OK: {verified.checkpoint.size} entries match the signed checkpoint"
    if verified.trusted is not None:
        message += f" and extend the trusted checkpoint of size {verified.trusted.size}"
    if verified.handovers and verified.signed_by is not None:
        message += (
            f"; the signing key was handed over at size "
            f"{', '.join(map(str, verified.handovers))} to {verified.signed_by}"
        )
    elif verified.signed_by is not None:
        message += f"; signed by {verified.signed_by}"
    console.print(message, highlight=False, markup=False)


# -- record store: keys, import, demo -------------------------------------------------------

PREPARE_DEMO_SUBJECTS = 500
keys = typer.Typer(
    help="Create, rotate, rewrap and retire the service's keys.", no_args_is_help=True
)
app.add_typer(keys, name="keys")


@contextmanager
def database_for(settings: Settings) -> Iterator[Database]:
    """The command's database, disposed when the command is done. A database that cannot be
    reached, a SQLite file that is not there (it is not created), or a schema not this version's
    is refused (exit 2, before anything is done);
    a lock held too long (exit 1: try again) or a service refusal (its detail, exit 1) ends the
    command in one line, not a traceback."""
    with database_problems_exit():
        script = migration_scripts(settings.migrations_dir)  # a wrong folder first
        missing = missing_sqlite_file(settings.resolved_database_url)
        if missing is not None:
            # Opening it would leave an empty file behind, and a schema "not this version's".
            console.print(
                f"[red]refused:[/red] there is no database at {shown(missing)}; run "
                "`casepackets migrate` first",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(2)
        database = Database(settings)
        try:
            if not schema_is_current(database.engine, script):
                console.print(
                    "[red]refused:[/red] the database's schema is not this version's; run "
                    "`casepackets migrate` first",
                    highlight=False,
                )
                raise typer.Exit(2)
            with database_problems(database.engine.url):
                yield database
        except ServiceError as exc:
            console.print(f"[red]failed:[/red] {shown(exc.detail)}", highlight=False)
            raise typer.Exit(1) from None
        finally:
            database.dispose()


def keyring_or_exit(settings: Settings) -> Keyring:
    try:
        return Keyring.load(settings.resolved_keyring_path)
    except KeyringError as exc:
        console.print(f"[red]keyring refused:[/red] {shown(exc)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@contextmanager
def keyring_edit_or_exit(settings: Settings) -> Iterator[LockedKeyring]:
    """The keyring read afresh and locked against every other key command until the block ends
    (``Keyring.edit``): what the command logs and what it writes are computed from the same
    file. Another command holding it past the bound ends this one with exit status 1."""
    with ExitStack() as stack:
        try:
            keyring = stack.enter_context(Keyring.edit(settings.resolved_keyring_path))
        except KeyringBusy as exc:
            console.print(f"[red]refused:[/red] {shown(exc)}", highlight=False)
            raise typer.Exit(1) from None
        except KeyringError as exc:
            console.print(f"[red]keyring refused:[/red] {shown(exc)}", highlight=False)
            raise typer.Exit(2) from None
        yield keyring


def log_system_action(
    session: Session,
    *,
    command: str,
    action: str,
    object_id: str,
    reason: str | None,
    object_type: str = "key",
) -> int:
    """Append a command's entry (a key command's unless ``object_type`` says otherwise);
    returns its leaf index."""
    return append(
        session=session,
        entry=LogEntry(
            actor=f"system:{command}",
            role="system",
            action=action,
            object_type=object_type,
            object_id=object_id,
            reason=reason,
        ),
    )


@keys.command("init")
def keys_init() -> None:
    """Create the keyring (mode 0600) with version 1 of every key; refuses to overwrite one."""
    settings = settings_or_exit()
    try:
        keyring = Keyring.init(settings.resolved_keyring_path)
    except KeyringInaccessible as exc:
        console.print(f"[red]keyring refused:[/red] {shown(exc)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyringError as exc:  # one exists already, or another key command is running
        console.print(f"[red]refused:[/red] {shown(exc)}", highlight=False)
        raise typer.Exit(1) from None
    console.print(
        f"created {shown(keyring.path)} with keys: {', '.join(PURPOSES)} (version 1 each)"
    )


# What an older, not yet retired version of each key still does.
OLD: dict[str, str] = {
    "vault": "decrypts",
    "packet": "decrypts",
    "pseudonym": "matches",  # incoming records of subjects pseudonymized under it
    "log_signing": "unused",
}


@keys.command("list")
def keys_list() -> None:
    """Show every key version (never its material)."""
    keyring = keyring_or_exit(settings_or_exit())
    table = Table("purpose", "version", "created", "state")
    for purpose in PURPOSES:
        for info in keyring.versions(purpose):
            state = (
                "retired"
                if info.retired_at
                else "current"
                if info.current
                else "staged (the next key command settles it)"
                if info.staged
                else OLD[purpose]
            )
            table.add_row(purpose, str(info.version), info.created_at, state)
    Console().print(table)


@keys.command("rotate")
def keys_rotate(
    purpose: Annotated[str, typer.Option(help=f"one of: {', '.join(PURPOSES)}")],
) -> None:
    """Add a new version of a key; it encrypts (or pseudonymizes, or signs) from now on."""
    settings = settings_or_exit()
    checked = check_purpose_or_exit(purpose)
    with database_for(settings) as database, keyring_edit_or_exit(settings) as keyring:
        settle_staged(database, keyring, settings=settings)
        with database.reading() as session:
            # Another installation's database: its log is no place for this keyring's rotation
            # (a handover there leads none of this keyring's auditors anywhere).
            if opens_under(session=session, keyring=keyring) is False:
                not_the_keyrings_database_exit(
                    f"{checked} would be rotated in this database", sealed=False
                )
        version = keyring.next_version(checked)
        material = new_key_material()
        # The pseudonym and log signing keys are staged while the rotation holds the log's
        # lock, before it commits (and left staged if the commit fails: the log decides): whoever
        # uses them under that lock (an ingest checks the pseudonym key there, a checkpoint is
        # signed there) rereads the keyring then and asks the log whether the staged version's
        # rotation has committed, so none can still use the old version once it has, and none
        # uses the new one unless it has, even if this command is killed before it promotes
        # the version or before it commits. The vault and packet keys are written only after
        # the commit: a worker could wrap a DEK under a new version the moment the file has it,
        # and no such wrap must exist under a key that the log does not name.
        written_under_the_lock = checked in ("pseudonym", "log_signing")
        with database.transaction() as session:
            if checked == "log_signing":
                leaf_index = hand_over_signing(
                    session, settings=settings, keyring=keyring, material=material
                )
            else:
                leaf_index = log_system_action(
                    session,
                    command="keys",
                    action="keys.rotate",
                    object_id=f"{checked}/v{version}",
                    reason="new current version",
                )
            if written_under_the_lock:
                keyring.stage(checked, material=material, leaf_index=leaf_index)
                try:
                    session.commit()
                except Exception:
                    console.print(
                        f"[yellow]{checked} v{version} stays staged: the commit of its rotation "
                        "failed, perhaps after the database made it durable. The log tells which; "
                        "the next key command settles it[/yellow]",
                        highlight=False,
                    )
                    raise
        try:
            new = (
                keyring.promote(checked)
                if written_under_the_lock
                else keyring.rotate(checked, material=material)
            )
        except KeyringError as exc:
            if not written_under_the_lock:
                unwritten_keyring_exit(exc, logged=f"the rotation to {checked} v{version}")
            # Staged, and the log holds its rotation: workers use it already.
            console.print(
                f"[yellow]{checked} v{version} is in use but still marked staged:[/yellow] "
                f"{shown(exc)}. The next key command marks it current",
                highlight=False,
                soft_wrap=True,
            )
            new = keyring.get(checked, version)
    console.print(f"{checked} key is now at version {new.version}")
    if checked in REWRAPPED_PURPOSES:
        console.print("older versions still decrypt; run `casepackets keys rewrap` to move")
        console.print("existing wraps to the new version, then `keys retire` the old one")
    elif checked == "pseudonym":
        console.print("new subjects get pseudonyms under it; existing ones keep theirs, so the")
        console.print("older version stays to match their incoming records")
    else:
        console.print("it signs checkpoints from now on; the old key signed the handover to it,")
        console.print("so auditors who trust the old key can follow (`audit verify --handovers`)")


def signed_by_keyring(session: Session, keyring: Keyring, *, settings: Settings) -> bool | None:
    """Whether one of the keyring's log signing keys signed the database's latest checkpoint
    (None: it has none)."""
    from service.crypto.signing import NoteSigner

    verifiers = [
        NoteSigner(name=settings.checkpoint_origin, seed=key.material).verifier
        for key in keyring.active("log_signing")
    ]
    return latest_checkpoint_opens(session=session, verifiers=verifiers)


def not_the_keyrings_database_exit(what: str, *, sealed: bool | None) -> NoReturn:
    why = (
        "this database holds nothing sealed under this keyring"
        if sealed is None
        else "what this database holds does not open under this keyring's keys"
    )
    console.print(
        f"[red]refused:[/red] {shown(what)}, but {shown(why)}: is CASEPACKETS_DATABASE_URL the "
        "database this keyring belongs to? Nothing was changed",
        highlight=False,
        soft_wrap=True,
    )
    raise typer.Exit(2)


def settle_staged(database: Database, keyring: LockedKeyring, *, settings: Settings) -> None:
    """Finish what a rotation killed between staging its version and promoting it left behind:
    the version becomes current when the log holds its rotation entry, and is discarded (its
    material destroyed; nothing used it) when that never committed. Asked under the log's lock,
    which the killed rotation's transaction held until it ended, so the answer is final.

    Nothing is discarded on the word of a database that is not shown to be the keyring's: what
    it holds must open under the keyring, or, when it holds nothing sealed yet, its latest
    checkpoint must be signed by one of the keyring's keys. A new database, or another
    installation's, holds no rotation entry either."""
    for purpose in PURPOSES:
        if (staged := keyring.staged(purpose)) is None:
            continue
        with database.transaction() as session:
            hold_lock(session)
            committed = rotation_committed(session=session, staged=staged)
            sealed = opens_under(session=session, keyring=keyring)
            ours = (
                committed
                or sealed is True
                or (sealed is None and signed_by_keyring(session, keyring, settings=settings))
            )
        name = f"{purpose} v{staged.version}"
        if not ours:
            not_the_keyrings_database_exit(
                f"{name} is staged and its rotation is not in the log", sealed=sealed
            )
        try:
            if committed:
                keyring.promote(purpose)
                console.print(f"{name}: its rotation was logged, so it is now current")
            else:
                keyring.discard(purpose)
                console.print(
                    f"{name}: its rotation never reached the log, so it was discarded unused"
                )
        except KeyringError as exc:
            console.print(
                f"[red]keyring not written:[/red] {shown(exc)}. {name} stays staged; fix the "
                "keyring file and run the command again",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(2) from None


def hand_over_signing(
    session: Session, *, settings: Settings, keyring: LockedKeyring, material: bytes
) -> int:
    """Log the log signing key's handover to ``material``'s key: the rotation entry names the
    new key, and a checkpoint ending with it is signed by the old key and cosigned by the new
    one. Returns the entry's leaf index; the caller stages ``material`` in the keyring, then
    commits."""
    from service.access_log.handover import hand_over
    from service.crypto.signing import NoteSigner

    origin = settings.checkpoint_origin
    return hand_over(
        session=session,
        old=NoteSigner.from_keyring(keyring, name=origin),
        new=NoteSigner(name=origin, seed=material),
        origin=origin,
        version=keyring.next_version("log_signing"),
        actor="system:keys",
    )


def check_purpose_or_exit(purpose: str) -> Purpose:
    try:
        return check_purpose(purpose)
    except KeyringError as exc:
        console.print(f"[red]{shown(exc)}[/red]", highlight=False)
        raise typer.Exit(2) from None


# Rows named when a rewrap cannot open their wraps; the rest are counted.
REWRAP_FAILURES_SHOWN = 20


def noted_in(found: list[str], column: str) -> Callable[[RowKey, str], None]:
    """Note a row whose wrap a rewrap could not open, and why, in ``found``."""

    def note(row: RowKey, why: str) -> None:
        found.append(f"{column} of row {row}: {why}")

    return note


@keys.command("rewrap")
def keys_rewrap(
    chunk: Annotated[int, typer.Option(min=1, max=100_000, help="rows per transaction")] = 2000,
) -> None:
    """Move every wrapped key to the newest KEK version, without decrypting any identity.

    Works in primary-key order and commits per chunk, each with its own `keys.rewrap` entry
    in the access log (so an interrupted run leaves an entry for every wrap it moved), and can
    be run again to finish.
    """
    settings = settings_or_exit()
    keyring = keyring_or_exit(settings)
    total_moved = 0
    unopened: list[str] = []
    kept = (
        "the chunks committed before are rewrapped, each with its keys.rewrap entry in the access "
        "log, nothing of the one in progress is. Run `casepackets keys rewrap` again to finish"
    )
    with interruption_says(kept), database_for(settings) as database:
        for wrapped in WRAPPED_KEY_COLUMNS:
            with database.transaction() as session:
                pending = pending_rewraps(session=session, keyring=keyring, wrapped=wrapped)
            target = f"{wrapped.purpose} v{keyring.current(wrapped.purpose).version}"
            column = f"{wrapped.table}.{wrapped.column}"
            with progress_bar() as progress:
                task = progress.add_task(f"{column} → {target}", total=pending)
                after: RowKey | None = None
                while True:
                    skipped: list[str] = []
                    with database.transaction() as session:
                        last, moved = rewrap_chunk(
                            session=session,
                            keyring=keyring,
                            wrapped=wrapped,
                            after_id=after,
                            limit=chunk,
                            on_unopened=noted_in(skipped, column),
                        )
                        if moved:
                            log_system_action(
                                session,
                                command="keys",
                                action="keys.rewrap",
                                object_id=column,
                                reason=f"rewrapped={moved} to {target}",
                            )
                    if last == after:
                        break
                    after = last
                    total_moved += moved
                    unopened += skipped
                    progress.advance(task, moved + len(skipped))
        # Counted again: a wrap made under an older version while this ran (a worker that had
        # not yet read the rotation) is still to be moved.
        with database.transaction() as session:
            left = sum(
                pending_rewraps(session=session, keyring=keyring, wrapped=wrapped)
                for wrapped in WRAPPED_KEY_COLUMNS
            )
    for line in unopened[:REWRAP_FAILURES_SHOWN]:
        console.print(
            f"[yellow]not rewrapped:[/yellow] {shown(line)}", highlight=False, soft_wrap=True
        )
    if len(unopened) > REWRAP_FAILURES_SHOWN:
        console.print(f"[yellow]… and {len(unopened) - REWRAP_FAILURES_SHOWN} more[/yellow]")
    done = f"rewrapped {total_moved} {'key' if total_moved == 1 else 'keys'}"
    if not left:
        console.print(f"{done}; nothing depends on older KEK versions now")
        return
    said = [f"{done}; {left} {'wrap is' if left == 1 else 'wraps are'} not under the current KEK"]
    if unopened:
        said.append(
            f"{len(unopened)} because {'it cannot' if len(unopened) == 1 else 'they cannot'} be "
            "opened (listed above): look into those rows before retiring anything"
        )
    if (others := left - len(unopened)) > 0:
        said.append(
            f"{others} {'was' if others == 1 else 'were'} written while this ran: run "
            "`casepackets keys rewrap` again"
        )
    console.print("; ".join(said), highlight=False, soft_wrap=True)
    if unopened:
        raise typer.Exit(1)


@keys.command("retire")
def keys_retire(
    purpose: Annotated[str, typer.Option(help=f"one of: {', '.join(PURPOSES)}")],
    version: Annotated[int, typer.Option(min=1, help="the old version to destroy")],
) -> None:
    """Destroy an old key version; refused while anything still depends on it."""
    settings = settings_or_exit()
    checked = check_purpose_or_exit(purpose)
    with database_for(settings) as database, keyring_edit_or_exit(settings) as keyring:
        settle_staged(database, keyring, settings=settings)
        with database.transaction() as session:
            retire_logged(
                session, keyring=keyring, purpose=checked, version=version, settings=settings
            )
        # Committed first: the material is destroyed only once the log says so.
        try:
            keyring.retire(checked, version)
        except KeyringError as exc:
            unwritten_keyring_exit(exc, logged=f"the retirement of {checked} v{version}")
    console.print(f"{checked} v{version} is retired; its material is destroyed")


def unwritten_keyring_exit(exc: KeyringError, *, logged: str) -> NoReturn:
    """A key change the access log already holds, whose keyring write then failed: say so in
    one line (exit 2), so the operator fixes the file and runs the command again."""
    console.print(
        f"[red]keyring not written:[/red] {shown(exc)}. The access log already records "
        f"{shown(logged)}; fix the keyring file and run the same command again (the log will "
        "then record it again)",
        highlight=False,
        soft_wrap=True,
    )
    raise typer.Exit(2)


def retire_logged(
    session: Session, *, keyring: LockedKeyring, purpose: Purpose, version: int, settings: Settings
) -> None:
    """Log the retirement of ``purpose`` v``version`` in ``session``, or refuse it (exit 1): the
    current version or one that does not exist (said first: a rewrap cannot change that), while
    rows depend on it, or when the keyring would refuse it (a rotation too recent). Refused with
    exit 2 in a database the keyring was not kept with, where nothing depends on any version."""
    try:
        keyring.check_old_version(purpose, version)
    except KeyringError as exc:
        console.print(f"[red]refused:[/red] {shown(exc)}", highlight=False)
        raise typer.Exit(1) from None
    # Nothing depends on any version in a database the keyring's keys open nothing in.
    if (sealed := opens_under(session=session, keyring=keyring)) is not True:
        not_the_keyrings_database_exit(
            f"{purpose} v{version} would be retired as nothing here depends on it", sealed=sealed
        )
    if purpose == "vault":
        # Counted once the work that read vault wraps before a rewrap moved them has committed.
        lock_out_vault_readers(session)
    try:
        dependents = count_key_dependents(session=session, purpose=purpose, version=version)
    except ServiceError as exc:
        console.print(f"[red]refused:[/red] {shown(exc.detail)}", highlight=False)
        raise typer.Exit(1) from None
    if dependents:
        remedy = (
            "their pseudonyms are never recomputed (the access log names them), so this "
            "version stays while they remain"
            if purpose == "pseudonym"
            else "run `casepackets keys rewrap` first"
        )
        console.print(
            f"[red]refused:[/red] {dependents} rows still depend on {purpose} v{version}; "
            f"{shown(remedy)}",
            highlight=False,
        )
        raise typer.Exit(1)
    try:
        keyring.check_retirable(purpose, version)
    except KeyringError as exc:
        console.print(f"[red]refused:[/red] {shown(exc)}", highlight=False)
        raise typer.Exit(1) from None
    log_system_action(
        session,
        command="keys",
        action="keys.retire",
        object_id=f"{purpose}/v{version}",
        reason="material destroyed",
    )


@contextmanager
def byte_progress(label: str, total: int) -> Iterator[Callable[[int], None] | None]:
    """A bar over ``total`` bytes on a terminal; None elsewhere, where a log or a script wants
    the outcome as the first line (a bar's last state would come before it)."""
    if not console.is_terminal:
        yield None
        return
    with progress_bar() as progress:
        task = progress.add_task(label, total=total)
        yield lambda done: progress.update(task, completed=done)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def batches_kept(command: str) -> str:
    return (
        "the batches committed before are stored, nothing of the one in progress is. Run the "
        f"same {command} again to finish: what is stored already is recognised and not stored "
        "twice"
    )


@contextmanager
def interruption_says(what_was_kept: str) -> Iterator[None]:
    """Ctrl-C (or SIGTERM, ``Terminated``) during long work ends the command with one line
    saying what it kept and how to finish (exit status 130, or 143), not a bare stop that leaves
    the operator guessing."""
    try:
        yield
    except (KeyboardInterrupt, Terminated) as stop:
        console.print(f"[red]interrupted:[/red] {what_was_kept}", highlight=False)
        raise typer.Exit(143 if isinstance(stop, Terminated) else 130) from None


def load_demo_if_empty(settings: Settings, *, subjects: int, seed: int) -> None:
    """Load the demo population into an empty record store (first run of ``serve``)."""
    with database_for(settings) as database:
        with database.transaction() as session:
            if session.connection().execute(select(func.count()).select_from(SUBJECTS)).scalar():
                return
        run_demo(settings, database, subjects=subjects, seed=seed, batch_size=500)


def event_types_or_exit(settings: Settings) -> frozenset[str]:
    try:
        return load_event_types(settings.policies_dir / "events.yaml")
    except VocabularyError as exc:
        console.print(f"[red]policy refused:[/red] {shown(exc)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def run_demo(
    settings: Settings, database: Database, *, subjects: int, seed: int, batch_size: int
) -> BulkResult:
    keyring = keyring_or_exit(settings)
    event_types = event_types_or_exit(settings)
    with progress_bar() as progress:
        task = progress.add_task(f"demo population (seed {seed})", total=subjects)
        result = ingest_records(
            database=database,
            keyring=keyring,
            event_types=event_types,
            source=f"{DEMO_SOURCE_PREFIX}{seed}",
            actor="system:demo",
            records=demo_records(subjects=subjects, seed=seed),
            batch_size=batch_size,
            on_batch=lambda done: progress.advance(task, done),
        )
    console.print(
        f"demo: {result.subjects} subjects, {result.events_stored} new events "
        f"({result.events_already_known} already known) in {result.batches} batches"
    )
    return result


DEMO_SEED_MIN, DEMO_SEED_MAX = -(2**63), 2**63 - 1


@app.command()
def demo(
    subjects: Annotated[int, typer.Option(min=100, max=1_000_000, help="population size")] = 1000,
    # Bounded: the seed is spelled into the batches' source and the e-mail addresses, whose
    # lengths are limited, and a longer one would fail in the first batch with a traceback.
    seed: Annotated[
        int, typer.Option(min=DEMO_SEED_MIN, max=DEMO_SEED_MAX, help="same seed, same population")
    ] = 1,
    batch_size: Annotated[
        int, typer.Option(min=1, max=MAX_BATCH_ROWS, help="subjects per batch")
    ] = 5000,
) -> None:
    """Generate and ingest a synthetic Rotterdam-South-like population (deterministic per seed).

    Everything goes through the same ingest path as POST /v1/records/batch; running it again
    with the same seed changes nothing. The histories end on a fixed reference date: flag them as
    of that date (the command prints it).
    """
    settings = settings_or_exit()
    with interruption_says(batches_kept("demo")), database_for(settings) as database:
        run_demo(settings, database, subjects=subjects, seed=seed, batch_size=batch_size)
    console.print(
        f"the demo's histories end on {REFERENCE_DATE}; flag them as of that date: "
        f"casepackets flag --as-of {REFERENCE_DATE}",
        highlight=False,
    )


IMPORT_HELP = (
    "Import a CSV file of subjects and events, streamed in batches; FILE may be a pipe, such as "
    "/dev/stdin.\n\n"
    "One line per event (a line that is not UTF-8 is rejected), with a header line. Columns: "
    + ", ".join(CSV_COLUMNS)
    + ". Required per line: bsn, given_name, family_name, birth_date (YYYY-MM-DD), district, "
    "neighbourhood. Lines with the same bsn are one subject: a line whose identity or "
    "characteristics differ from the first line of its bsn is rejected. Leave the four event "
    "columns empty for a subject without events. event_type comes from policies/events.yaml; "
    "source_event_id must be unique per source: a line repeating an earlier line's is "
    "rejected. A subject has at most "
    f"{MAX_SUBJECT_EVENTS} events per batch.\n\n"
    "Each batch commits whole or not at all. A subject with any other invalid line in a batch "
    "is left out of it and its lines are reported by line number; all other subjects are "
    "stored. Keep a subject's lines together: then they fall in one batch. Re-running an import "
    "is harmless: what is stored already is recognised and not stored twice.\n\n"
    "Exit status: 0 every line stored; 1 some lines rejected (listed by line number), all "
    "others stored; 2 refused (--source, the header line), nothing stored; 3 stopped at a line "
    "that cannot be read as CSV, or at a batch the database refused: the lines before it are "
    "stored or rejected, nothing from it on; correct the file and run the import again."
)


@app.command("import", help=IMPORT_HELP)
def import_(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    source: Annotated[
        str,
        typer.Option(
            help=f"the sending source's name: printable, 1 to {SOURCE_MAX} characters, "
            "no spaces around it"
        ),
    ],
    batch_size: Annotated[
        int, typer.Option(min=1, max=MAX_BATCH_ROWS, help="subjects per batch")
    ] = 5000,
) -> None:
    if not usable_source(source):
        # The rule of the API's source (its token subject, stored in events.source); the value
        # itself is not repeated.
        console.print(
            f"[red]import refused:[/red] --source must be printable text of 1 to {SOURCE_MAX} "
            "characters, without spaces around it",
            highlight=False,
        )
        raise typer.Exit(2)
    if source.startswith(DEMO_SOURCE_PREFIX):
        # Else `serve` would take the records for the demo's, build packets of them for the demo
        # team and print a curl line that re-identifies them.
        console.print(f"[red]import refused:[/red] --source {DEMO_SOURCE_REFUSAL}", highlight=False)
        raise typer.Exit(2)
    settings = settings_or_exit()
    keyring = keyring_or_exit(settings)
    try:
        event_types = load_event_types(settings.policies_dir / "events.yaml")
    except ValueError as exc:
        console.print(f"[red]import refused:[/red] {shown(exc)}", highlight=False)
        raise typer.Exit(2) from None
    try:
        with (
            interruption_says(batches_kept("import")),
            database_for(settings) as database,
            progress_bar() as progress,
        ):
            # A pipe has no size: the bar then counts the bytes read without a total.
            size = file.stat().st_size if file.is_file() else None
            task = progress.add_task(f"import {file.name}", total=size)
            result = import_csv(
                database=database,
                keyring=keyring,
                event_types=event_types,
                path=file,
                source=source,
                actor=f"system:import:{source}",
                batch_size=batch_size,
                on_progress=lambda _done, read: progress.update(task, completed=read),
            )
    except ImportRefused as exc:
        console.print(
            f"[red]import refused:[/red] {shown(exc)}; nothing was stored", highlight=False
        )
        raise typer.Exit(2) from None
    console.print(
        f"imported {result.subjects} subjects, {result.events_stored} new events "
        f"({result.events_already_known} already known) in {result.batches} batches"
    )
    if result.rejected_total:
        for rejection in result.rejected[:50]:
            console.print(
                f"  line {rejection.line}: {', '.join(rejection.fields)}: "
                f"{shown(rejection.reason)}",
                highlight=False,
            )
        more = result.rejected_total - min(len(result.rejected), 50)
        if more > 0:
            console.print(f"  … and {more} more rejected lines")
        console.print(f"[yellow]{result.rejected_total} lines rejected[/yellow]")
    if result.stopped is not None:
        stop = result.stopped
        console.print(
            f"[red]import stopped at line {stop.line}:[/red] {shown(stop.reason)}. The lines "
            "before it "
            f"are stored ({result.subjects} subjects and {result.events_stored} new events) or "
            f"rejected as listed; nothing from line {stop.line} on was stored. Correct the file "
            "and run the same import again: what is stored already is recognised and not "
            "stored twice.",
            highlight=False,
        )
        raise typer.Exit(3)
    if result.rejected_total:
        raise typer.Exit(1)


@app.command()
def flag(
    as_of: Annotated[
        str | None, typer.Option(help="evaluate as on this date, YYYY-MM-DD (default: today)")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=100_000, help="subjects per batch")] = 2000,
) -> None:
    """Run the flagging policy over every subject and store the flags (logged)."""

    from service.clock import today
    from service.flagging.models import not_in_the_future
    from service.flagging.service import (
        RunProgress,
        refuse_policy_clash,
        run_flagging,
        system_caller,
    )
    from service.records.models import EARLIEST
    from service.schemas import parse_calendar_date

    settings = settings_or_exit()
    policy = policies_or_exit(settings).flagging
    try:
        # An empty value (`--as-of "$DAY"` with DAY unset) is a bad date, not today: a run is
        # kept and logged for good.
        day = not_in_the_future(parse_calendar_date(as_of)) if as_of is not None else today()
        if day < EARLIEST:  # the bounds the API holds ``as_of`` to (``FlaggingRunCreate``)
            raise ValueError(f"as_of may not be before {EARLIEST.isoformat()}")
    except ValueError as exc:
        console.print(f"[red]refused:[/red] {shown(exc)}", highlight=False)
        raise typer.Exit(2) from None
    with (
        interruption_says("nothing was stored: a run is stored whole or not at all"),
        database_for(settings) as database,
        database.transaction() as session,
    ):
        refuse_policy_clash(session=session, policy=policy)  # said before a bar is drawn
        total = session.connection().execute(
            select(func.count()).select_from(SUBJECTS).where(SUBJECTS.c.erased_at.is_(None))
        )
        with progress_bar() as progress:
            task = progress.add_task(f"flagging ({policy.version})", total=total.scalar())

            def advance(done: RunProgress) -> None:
                progress.update(task, completed=done.evaluated)

            run = run_flagging(
                session=session,
                policy=policy,
                as_of=day,
                caller=system_caller("flag"),
                batch_size=batch_size,
                progress=advance,
            )
    # The result, on standard output (progress and refusals go to standard error): a script
    # takes the run id from it for `partition --run-id`.
    Console(soft_wrap=True).print(
        f"run {run.id}: policy {shown(run.policy_version)}, {run.evaluated} evaluated, "
        f"{run.flagged} flagged",
        highlight=False,
    )


@app.command()
def partition(
    run_id: Annotated[str, typer.Option(help="the flagging run to split into packets")],
) -> None:
    """Split a run's flagged cases (and pending external flags) into packets and assign them."""
    from service.flagging.models import RUN_ID
    from service.flagging.service import system_caller
    from service.packets.policy import (
        PacketsPolicyError,
        load_partitioning_policy,
        load_retention_policy,
    )
    from service.packets.service import KEY_DAMAGED, partition_run

    if not RUN_ID.fullmatch(run_id):
        # Not echoed: a BSN or a name typed here by mistake stays out of the terminal.
        console.print(
            "[red]--run-id refused:[/red] a run id is 32 lowercase hex characters, as `flag` "
            "printed it",
            highlight=False,
        )
        raise typer.Exit(2)
    settings = settings_or_exit()
    try:
        partitioning = load_partitioning_policy(settings.policies_dir / "partitioning.yaml")
        retention = load_retention_policy(settings.policies_dir / "retention.yaml")
    except PacketsPolicyError as exc:
        console.print(f"[red]refused:[/red] {shown(exc)}", highlight=False)
        raise typer.Exit(2) from None
    keyring = keyring_or_exit(settings)
    with (
        database_for(settings) as database,
        database.transaction() as session,
        console.status("partitioning the run's flagged cases (one transaction) …"),
    ):
        result = partition_run(
            session=session,
            keyring=keyring,
            run_id=run_id,
            packet_size=partitioning.packet_size,
            retention=retention,
            caller=system_caller("partition"),
        )
    table = Table("professional", "district", "packets", "clients")
    summary: dict[tuple[str, str], list[int]] = {}
    for packet in result.packets:
        counts = summary.setdefault((packet.professional_id, packet.district), [0, 0])
        counts[0] += 1
        counts[1] += packet.member_count
    for (professional_id, district), (packets, clients) in sorted(summary.items()):
        # Typed by a coordinator or a source: "[zuid]" in an id or a district is no style.
        table.add_row(shown(professional_id), shown(district), str(packets), str(clients))
    Console().print(table)
    reasons: dict[str, int] = {}
    for case in result.unplaced:
        reasons[case.reason] = reasons.get(case.reason, 0) + 1
    for reason, count in sorted(reasons.items()):
        console.print(f"unplaced: {count} ({shown(reason)})", highlight=False)
    if damaged := [case.pseudonym for case in result.unplaced if case.reason == KEY_DAMAGED]:
        # Each needs its key restored (from a backup) before it can be placed: name them.
        console.print(
            f"key failed its integrity check: {shown(', '.join(damaged))}", highlight=False
        )
    console.print(f"{len(result.packets)} packets built for run {run_id}", highlight=False)


@app.command()
def expire(
    batch_size: Annotated[
        int, typer.Option(min=1, max=10_000, help="packets per transaction")
    ] = 100,
) -> None:
    """Crypto-shred packets past their expiry and closed packets past the grace period.

    First, a packet whose expiry lies more than ``packet_ttl_days`` after it was built (the TTL
    was lowered since) gets the expiry the policy gives now; each such move is logged.

    Deletes each due packet's wrapped key, its members' wraps and its follow-up notes; metadata,
    outcome codes and the access log stay. Every shred is logged. Safe to run while the service
    (which also does this periodically) is running, and safe to interrupt and run again. Exit
    status 1 when a due packet, or one whose expiry was to be brought forward, stayed in use (by
    a request or another shredder) past a few tries, or overwritten rows could not be purged
    yet: run it again later.
    """
    from service.packets.models import utcnow
    from service.packets.policy import PacketsPolicyError, load_retention_policy
    from service.packets.service import (
        bring_expiries_forward,
        count_due_for_shredding,
        forget_old_replays,
        shred_expired,
    )

    settings = settings_or_exit()
    try:
        retention = load_retention_policy(settings.policies_dir / "retention.yaml")
    except PacketsPolicyError as exc:
        console.print(f"[red]refused:[/red] {shown(exc)}", highlight=False)
        raise typer.Exit(2) from None
    moment = utcnow()
    shredded = still_due = moved = 0
    left = None
    kept = (
        "the packets shredded before are shredded and logged, nothing of the batch in progress "
        "is. Run `casepackets expire` again to finish"
    )
    with interruption_says(kept), database_for(settings) as database, progress_bar() as progress:
        task = progress.add_task("crypto-shredding due packets", total=None)
        for attempt in range(EXPIRE_ATTEMPTS):
            if attempt:
                time.sleep(EXPIRE_RETRY_SECONDS)  # a request holds a packet for milliseconds
            if left is None or left:
                # A lowered packet_ttl_days first: the packets it makes due are shredded now.
                brought = bring_expiries_forward(
                    database=database, retention=retention, actor="system:expire"
                )
                moved, left = moved + brought.moved, brought.left
            shredded += shred_expired(
                database=database,
                retention=retention,
                actor="system:expire",
                batch_size=batch_size,
                now=moment,
                on_start=(lambda due: progress.update(task, total=due)) if not attempt else None,
                on_progress=lambda done: progress.advance(task, done),
            )
            with database.transaction() as session:
                still_due = count_due_for_shredding(
                    session=session, retention=retention, now=moment
                )
            if not still_due and not left:
                break
        forgotten = forget_old_replays(database=database, retention=retention, now=moment)
        # Every purge asked for and not done: this run's, and one that an earlier run or a
        # worker left pending (a reader held it up); this run is the "run it again" they ask for.
        purge_pending = not database.purge_replaced_rows()
    if moved:
        console.print(
            f"brought the expiry of {moved} packets forward to "
            f"{retention.packet_ttl_days} days after they were built (packet_ttl_days)",
            highlight=False,
        )
    if left:
        console.print(
            f"[yellow]{left} packets past packet_ttl_days stayed in use and keep their "
            "expiry for now[/yellow]; run `casepackets expire` again",
            highlight=False,
        )
    console.print(f"crypto-shredded {shredded} packets", highlight=False)
    if forgotten:
        console.print(
            f"forgot what Idempotency-Keys kept of {forgotten} batches and pushes of flags "
            f"older than {retention.idempotency_days} days",
            highlight=False,
        )
    if still_due:
        console.print(
            f"[yellow]{still_due} due packets stayed in use by a request or another shredder and "
            "were not shredded by this run; run `casepackets expire` again[/yellow]",
            highlight=False,
        )
    if purge_pending:
        console.print(
            "[yellow]overwritten rows could not be purged from the database files yet (a reader "
            "that started earlier still needs them, or another VACUUM holds a table); run "
            "`casepackets expire` again later[/yellow]",
            highlight=False,
        )
    if still_due or purge_pending or left:
        raise typer.Exit(1)


EXPIRE_ATTEMPTS = 5
EXPIRE_RETRY_SECONDS = 1.0


class Terminated(SystemExit):
    """SIGTERM (``docker stop``, a process manager, ``kill``) ends a command as an exit, not as
    a kill: its transactions roll back, its ``finally`` blocks run (a backup leaves no hidden
    partial copy behind, an export puts back what it moved aside), and a long command says what
    it kept (``interruption_says``). Exit status 143, as for a process killed by SIGTERM."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def _terminate(_signal: int, _frame: object) -> NoReturn:
    raise Terminated


def main() -> None:
    """The console script. An exception no command handles is reported by its type and stack
    frames only, as the server logs one: its message and chained causes may quote a national id,
    a name or a key (a CSV line, a row the database refused). SIGTERM is ``Terminated`` (uvicorn
    puts its own handler in place once ``serve`` starts it)."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except Exception as exc:
        console.print(
            f"[red]failed:[/red] unexpected {type(exc).__name__} (its message is withheld: it "
            "may quote personal data)",
            highlight=False,
        )
        print("".join(traceback.format_tb(exc.__traceback__)), file=sys.stderr, end="")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
