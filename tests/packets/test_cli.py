"""The ``flag`` and ``partition`` commands run the same services as the API, logged as system."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update
from sqlmodel import Session
from typer.testing import CliRunner

from service.cli import app as cli
from service.clock import today
from service.config import get_settings
from service.crypto.keyring import Keyring
from service.db import Database
from service.flagging.models import FlaggingRun
from service.flagging.service import system_caller
from service.packets.models import ProfessionalCreate
from service.packets.service import create_professional
from tests.flagging.seed import AS_OF, RELAPSING, add_subject
from tests.packets.scenario import SUBJECTS


@pytest.fixture
def cli_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("CASEPACKETS_HOME", str(tmp_path))
    monkeypatch.setenv("CASEPACKETS_DATABASE_URL", f"sqlite:///{tmp_path}/cli.db")
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


@contextmanager
def seeding(runner: CliRunner) -> Iterator[tuple[Session, Keyring]]:
    """A migrated database and a new keyring, with a transaction that puts rows in before the
    commands run (committed when the block ends)."""
    assert runner.invoke(cli, ["migrate"]).exit_code == 0
    assert runner.invoke(cli, ["keys", "init"]).exit_code == 0
    settings = get_settings()
    database = Database(settings)
    try:
        with database.transaction() as session:
            yield session, Keyring.load(settings.resolved_keyring_path)
    finally:
        database.dispose()


def register_caseworker(session: Session, professional_id: str, district: str) -> None:
    create_professional(
        session=session,
        given=ProfessionalCreate(
            id=professional_id,
            display_name="Caseworker",
            team="Zuid-1",
            districts=[district],
            capacity=40,
        ),
        caller=system_caller("test"),
    )


def flagged_and_partitioned(runner: CliRunner) -> str:
    """What `partition` says of the run `flag` made as of AS_OF, on one line."""
    flagged = runner.invoke(cli, ["flag", "--as-of", AS_OF.isoformat()])
    assert flagged.exit_code == 0, flagged.output
    found = re.search(r"run ([0-9a-f]{32})", flagged.stdout)
    assert found is not None, flagged.output
    parted = runner.invoke(cli, ["partition", "--run-id", found.group(1)])
    assert parted.exit_code == 0, parted.output
    return " ".join(parted.output.split())


def test_flag_then_partition_from_the_command_line(cli_home: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["migrate"]).exit_code == 0
    assert runner.invoke(cli, ["keys", "init"]).exit_code == 0
    flagged = runner.invoke(cli, ["flag", "--as-of", "2026-03-15"])
    assert flagged.exit_code == 0, flagged.output
    # On standard output alone, for a script to pass to partition --run-id.
    found = re.fullmatch(
        r"run ([0-9a-f]{32}): policy \S+, 0 evaluated, 0 flagged\n", flagged.stdout
    )
    assert found is not None, flagged.output
    parted = runner.invoke(cli, ["partition", "--run-id", found.group(1)])
    assert parted.exit_code == 0, parted.output
    assert "0 packets built" in " ".join(parted.output.split())
    missing = runner.invoke(cli, ["partition", "--run-id", "0" * 32])
    assert missing.exit_code == 1
    assert f"no flagging run {'0' * 32}" in " ".join(missing.output.split())
    # A BSN or a name typed as the run id is refused by its shape, and not printed back.
    for typed in (
        "Jan Jansen 123456782",
        f"{found.group(1)} Jan Jansen 123456782",
        f"Jan Jansen 123456782 {found.group(1)}",
    ):
        pasted = runner.invoke(cli, ["partition", "--run-id", typed])
        assert pasted.exit_code == 2, (typed, pasted.output)
        assert "--run-id" in pasted.output
        assert "Jansen" not in pasted.output
        assert "123456782" not in pasted.output
    for bad in ("yesterday", "20260315", "2026-W11-7", "2026-03-15T00:00:00"):
        bad_date = runner.invoke(cli, ["flag", "--as-of", bad])
        assert bad_date.exit_code == 2, (bad, bad_date.output)
        assert "a date is written as text, YYYY-MM-DD" in " ".join(bad_date.output.split())
    tomorrow = (today() + timedelta(days=1)).isoformat()
    future = runner.invoke(cli, ["flag", "--as-of", tomorrow])
    assert future.exit_code == 2
    assert "as_of may not be after today" in " ".join(future.output.split())


def test_partition_names_a_case_whose_key_fails_its_check_and_places_the_rest(
    cli_home: Path,
) -> None:
    runner = CliRunner()
    with seeding(runner) as (session, keyring):
        for pseudonym in ("ps-000", "ps-001", "ps-002"):
            add_subject(session, keyring, pseudonym=pseudonym, events=RELAPSING)
        register_caseworker(session, "prof-001", "Charlois")
        # ps-001's wrap copied onto ps-000's row: a restore gone wrong, or tampering.
        moved = session.execute(
            select(SUBJECTS.c.wrapped_dek).where(SUBJECTS.c.pseudonym == "ps-001")
        ).scalar_one()
        session.execute(
            update(SUBJECTS).where(SUBJECTS.c.pseudonym == "ps-000").values(wrapped_dek=moved)
        )
    output = flagged_and_partitioned(runner)
    assert "unplaced: 1 (the subject's key failed its integrity check)" in output
    assert "key failed its integrity check: ps-000" in output
    assert "1 packets built" in output


def test_partition_shows_professional_ids_and_districts_as_written_brackets_and_all(
    cli_home: Path,
) -> None:
    """An id or a district is text someone typed, never terminal markup: one in square brackets
    is shown whole, and one holding what reads as a closing tag does not crash the summary of
    packets already built."""
    runner = CliRunner()
    with seeding(runner) as (session, keyring):
        add_subject(session, keyring, pseudonym="ps-000", district="Zuid [oost]", events=RELAPSING)
        add_subject(session, keyring, pseudonym="ps-001", district="Hoek [/b]", events=RELAPSING)
        register_caseworker(session, "prof-[bold]", "Zuid [oost]")
    output = flagged_and_partitioned(runner)
    assert "prof-[bold]" in output
    assert "Zuid [oost]" in output
    assert "unplaced: 1 (no active professional serves district Hoek [/b])" in output
    assert "1 packets built" in output


def test_an_empty_as_of_is_refused_and_no_run_is_made_as_of_today(cli_home: Path) -> None:
    """`--as-of "$DAY"` with DAY unset is a mistake, not a request for today: a run is logged
    and kept for good, so one as of the wrong day must not be made."""
    runner = CliRunner()
    assert runner.invoke(cli, ["migrate"]).exit_code == 0
    assert runner.invoke(cli, ["keys", "init"]).exit_code == 0
    for empty in ("", " "):
        refused = runner.invoke(cli, ["flag", "--as-of", empty])
        assert refused.exit_code == 2, (empty, refused.output)
        assert "a date is written as text, YYYY-MM-DD" in " ".join(refused.output.split())
    database = Database(get_settings())
    try:
        with database.session() as session:
            runs = session.execute(select(func.count()).select_from(FlaggingRun)).scalar_one()
    finally:
        database.dispose()
    assert runs == 0
