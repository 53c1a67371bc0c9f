"""Flagging runs over the database, their flags, and external flags (SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from service import paging
from service.clock import today
from service.db import Database, lock_was_busy
from service.flagging import service as flagging_service
from service.flagging.models import ArchivedPolicy, Flag, FlaggingRun, FlagPush
from service.flagging.rules import EVALUATOR_VERSION
from service.flagging.service import (
    ERASED_EXPLANATION,
    RunProgress,
    list_run_flags,
    run_flagging,
    system_caller,
)
from service.main import create_app
from service.records import service as records_service
from service.records.models import Subject
from service.records.service import ERASED_DIGEST
from tests.conftest import Interleaving, TokenFactory, bearer
from tests.flagging.seed import AS_OF, EVENTS, QUIET, RELAPSING, add_subject, log_entries
from tests.packets.scenario import HeldLogLock

# Pushed flags name pseudonyms of the shape ingest hands out.
QUIET_PSEUDONYM = "5e" * 16
MISSING = "0" * 32


def seed(app: FastAPI, session: Session) -> None:
    keyring = app.state.keyring
    add_subject(session, keyring, pseudonym="ps-relapse", events=RELAPSING)
    add_subject(session, keyring, pseudonym=QUIET_PSEUDONYM, events=QUIET)
    add_subject(session, keyring, pseudonym="ps-none")
    session.commit()


def test_a_run_flags_matching_subjects_and_explains_why(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    seed(app, session)
    coordinator = bearer(token("coord-001", "coordinator"))
    response = client.post(
        "/v1/flagging/runs", json={"as_of": AS_OF.isoformat()}, headers=coordinator
    )
    assert response.status_code == 201, response.text
    run = response.json()
    assert run["evaluated"] == 3
    assert run["flagged"] == 1
    assert run["policy_version"] == app.state.flagging_policy.version
    assert run["policy_version"].startswith("2026.2+")
    assert run["policy_version"].endswith(f"/e{EVALUATOR_VERSION}")

    fetched = client.get(f"/v1/flagging/runs/{run['id']}", headers=coordinator)
    assert fetched.json() == run

    page = client.get(f"/v1/flagging/runs/{run['id']}/flags", headers=coordinator).json()
    assert page["next_after"] is None
    [flag] = page["items"]
    assert flag["pseudonym"] == "ps-relapse"
    assert flag["kind"] == "algorithm"
    assert flag["policy_version"] == run["policy_version"]
    assert [hit["rule_id"] for hit in flag["hits"]] == ["relapse"]
    assert flag["hits"][0]["evidence"]["returns"] == 3
    assert flag["explanation"] == (
        "As of 15 March 2026: came back to welfare 3 times since 15 March 2024, each time after "
        "leaving it for work that then ended (jobs ending 2024-06, 2025-01 and 2025-09)."
    )
    assert "Person" not in str(page)
    assert "111222333" not in str(page)

    [logged] = log_entries(session, "flagging.run")
    assert logged["object_id"] == run["id"]
    assert logged["actor"] == "coord-001"
    # the signed log commits to the policy file's whole hash, not only the version's 48 bits
    policy = app.state.flagging_policy
    assert logged["reason"] == (
        f"policy {policy.version} (sha256 {hashlib.sha256(policy.content).hexdigest()}) "
        f"as of {AS_OF.isoformat()}: 3 evaluated, 1 flagged"
    )


def test_flags_are_paged(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    for i in range(5):
        add_subject(session, app.state.keyring, pseudonym=f"ps-{i}", events=RELAPSING)
    session.commit()
    coordinator = bearer(token("coord-001", "coordinator"))
    run = client.post("/v1/flagging/runs", json={"as_of": "2026-03-15"}, headers=coordinator)
    run_id = run.json()["id"]
    seen: list[str] = []
    after = 0
    while True:
        page = client.get(
            f"/v1/flagging/runs/{run_id}/flags",
            params={"after": after, "limit": 2},
            headers=coordinator,
        ).json()
        seen += [item["pseudonym"] for item in page["items"]]
        if page["next_after"] is None:
            break
        after = page["next_after"]
    assert sorted(seen) == [f"ps-{i}" for i in range(5)]
    # A page that holds the last flag says so, even when it is exactly full.
    whole = client.get(
        f"/v1/flagging/runs/{run_id}/flags", params={"limit": 5}, headers=coordinator
    ).json()
    assert (len(whole["items"]), whole["next_after"]) == (5, None)
    # A cursor past every flag id reads nothing, on PostgreSQL too (its flag ids are 32-bit).
    for beyond in (2**31 - 1, 2**31, 2**63 - 1):
        page = client.get(
            f"/v1/flagging/runs/{run_id}/flags", params={"after": beyond}, headers=coordinator
        )
        assert page.status_code == 200, (beyond, page.text)
        assert page.json() == {"items": [], "next_after": None}


def test_every_page_of_flags_read_is_logged_with_its_pseudonyms(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory, db_url: str
) -> None:
    """Who saw whose flags and explanations is in the access log; a page the log cannot record
    is not given out (503)."""
    for i in range(3):
        add_subject(session, app.state.keyring, pseudonym=f"ps-{i}", events=RELAPSING)
    session.commit()
    coordinator = bearer(token("coord-001", "coordinator"))
    run_id = client.post(
        "/v1/flagging/runs", json={"as_of": "2026-03-15"}, headers=coordinator
    ).json()["id"]
    url = f"/v1/flagging/runs/{run_id}/flags"
    first = client.get(url, params={"limit": 2}, headers=coordinator).json()
    rest = client.get(url, params={"after": first["next_after"]}, headers=coordinator).json()
    pages = [[item["pseudonym"] for item in page["items"]] for page in (first, rest)]
    assert sorted(pages[0] + pages[1]) == ["ps-0", "ps-1", "ps-2"]
    logged = [
        (e["actor"], e["object_type"], e["object_id"], e["outcome"], e["pseudonyms"])
        for e in log_entries(session, "flagging.read")
    ]
    assert logged == [
        ("coord-001", "flagging_run", run_id, "allowed", pages[0]),
        ("coord-001", "flagging_run", run_id, "allowed", pages[1]),
    ]
    bounded = app.state.settings.model_copy(update={"log_lock_timeout_seconds": 0.3})
    database = Database(bounded)
    try:
        with TestClient(create_app(bounded, database=database)) as busy:
            with HeldLogLock(db_url):
                refused = busy.get(url, headers=coordinator)
            assert refused.status_code == 503, refused.text
            assert "ps-" not in refused.text
    finally:
        database.dispose()
    assert len(log_entries(session, "flagging.read")) == 2


def test_runs_evaluate_in_batches_and_skip_erased_subjects(app: FastAPI, session: Session) -> None:
    for i in range(7):
        add_subject(session, app.state.keyring, pseudonym=f"ps-{i}", events=RELAPSING)
    session.connection().execute(
        update(Subject.__table__)  # type: ignore[attr-defined]
        .where(Subject.__table__.c.pseudonym == "ps-3")  # type: ignore[attr-defined]
        .values(erased_at=datetime.now(UTC), wrapped_dek=None, identity_ciphertext=None)
    )
    batches: list[int] = []
    run = run_flagging(
        session=session,
        policy=app.state.flagging_policy,
        as_of=AS_OF,
        caller=system_caller("flag"),
        batch_size=2,
        progress=lambda p: batches.append(p.evaluated),
    )
    assert (run.evaluated, run.flagged) == (6, 6)
    assert batches == [2, 4, 6]
    [logged] = log_entries(session, "flagging.run")
    assert logged["actor"] == "system:flag"
    assert logged["request_id"] is None, "a job outside any request has no request id"


def test_a_flag_of_several_hits_explains_every_one_in_policy_order(
    app: FastAPI, session: Session
) -> None:
    hopping = [
        ("helpdesk_visit", date(2025, month, 3), office)
        for month, office in enumerate(("Bloemhof", "Carnisse", "Tarwewijk", "Zuidwijk"), start=4)
    ]
    subject_id, _ = add_subject(
        session, app.state.keyring, pseudonym="ps-both", events=[*RELAPSING, *hopping]
    )
    run = run_flagging(
        session=session, policy=app.state.flagging_policy, as_of=AS_OF, caller=system_caller("t")
    )
    [flag] = session.execute(select(Flag).where(Flag.run_id == run.id)).scalars()  # type: ignore[arg-type]
    assert flag.subject_id == subject_id
    assert [hit["rule_id"] for hit in flag.hits] == ["relapse", "desk-hopping"]
    assert flag.explanation == " ".join(hit["explanation"] for hit in flag.hits)
    assert flag.explanation.endswith(
        "As of 15 March 2026: visited 4 different helpdesks since 15 March 2025 "
        "(Bloemhof, Carnisse, Tarwewijk and Zuidwijk)."
    )


# Two of the three returns the relapse rule needs, and the third, which one ingest adds later.
TWO_RETURNS = RELAPSING[:7]
THIRD_RETURN = RELAPSING[7:]


def test_a_run_evaluates_the_data_as_it_stood_when_it_began(
    app: FastAPI,
    client: TestClient,
    session: Session,
    database: Database,
    backend: str,
    token: TokenFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Rows fetched one at a time: the run is still reading its statement when the others commit.
    monkeypatch.setattr(flagging_service, "FETCH_ROWS", 1)
    keyring = app.state.keyring
    ids = [
        add_subject(session, keyring, pseudonym=pseudonym, events=events)[0]
        for pseudonym, events in (
            ("ps-a", TWO_RETURNS),
            ("ps-b", TWO_RETURNS),
            ("ps-erased", RELAPSING),
        )
    ]
    session.commit()
    committed: list[bool] = []

    def ingest_and_erase_meanwhile(_done: RunProgress) -> None:
        """After the run's first batch: one ingest gives ps-a and ps-b their third return and
        adds a relapsing subject, and ps-erased is erased."""
        if committed:
            return
        try:
            with database.transaction() as other:
                other.connection().execute(
                    insert(EVENTS),
                    [
                        {
                            "subject_id": subject_id,
                            "source": "late",
                            "source_event_id": f"{subject_id}-{i}",
                            "type": kind,
                            "date": day,
                            "office": office,
                        }
                        for subject_id in ids[:2]
                        for i, (kind, day, office) in enumerate(THIRD_RETURN)
                    ],
                )
                add_subject(other, keyring, pseudonym="ps-new", events=RELAPSING)
                records_service.erase_subject(
                    session=other, pseudonym="ps-erased", actor="admin-001", role="admin"
                )
            committed.append(True)
        except OperationalError as exc:
            if not lock_was_busy(exc):
                raise
            committed.append(False)

    run = run_flagging(
        session=session,
        policy=app.state.flagging_policy,
        as_of=AS_OF,
        caller=system_caller("flag"),
        batch_size=1,
        progress=ingest_and_erase_meanwhile,
    )
    session.commit()
    # PostgreSQL: both commit during the run. SQLite: the run holds the one write lock, so they
    # wait for it and give up at their bound.
    assert committed == [backend == "postgres"]

    def flagged(run_id: str) -> list[str]:
        flags, _next = list_run_flags(session=session, run_id=run_id, caller=system_caller("test"))
        session.rollback()
        return sorted(flag.pseudonym for flag in flags)

    # As the data stood when the run began: neither half of the ingest, nor the new subject, and
    # the subject erased meanwhile still evaluated (and flagged).
    assert (run.evaluated, run.flagged) == (3, 1)
    assert flagged(run.id) == ["ps-erased"]
    if backend == "postgres":
        again = run_flagging(
            session=session,
            policy=app.state.flagging_policy,
            as_of=AS_OF,
            caller=system_caller("flag"),
        )
        session.commit()
        assert flagged(again.id) == ["ps-a", "ps-b", "ps-new"]
        # Partitioning leaves the subject erased after the run's snapshot out, saying why.
        coordinator = bearer(token("coord-001", "coordinator"))
        team = {
            "id": "prof-001",
            "display_name": "Caseworker",
            "team": "Zuid-1",
            "districts": ["Charlois"],
            "capacity": 40,
        }
        assert client.post("/v1/professionals", json=team, headers=coordinator).status_code == 201
        result = client.post(
            "/v1/packets/partition", json={"run_id": run.id}, headers=coordinator
        ).json()
        assert result["packets"] == []
        assert [(u["pseudonym"], u["reason"]) for u in result["unplaced"]] == [
            ("ps-erased", "the subject was erased")
        ]


POLICIES = ArchivedPolicy.__table__  # type: ignore[attr-defined]
RUNS = FlaggingRun.__table__  # type: ignore[attr-defined]


def archive(session: Session, version: str, content: bytes) -> None:
    """Keep ``content`` under ``version``, as a run of it would have."""
    session.execute(
        insert(POLICIES).values(
            version=version,
            name="archived by the test",
            sha256=hashlib.sha256(content).hexdigest(),
            content=content,
            archived_at=datetime.now(UTC),
        )
    )
    session.commit()


def test_a_runs_policy_file_is_served_exactly_as_it_was_read_whatever_policies_holds_now(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    seed(app, session)
    coordinator = bearer(token("coord-001", "coordinator"))
    runs = [
        client.post("/v1/flagging/runs", json={"as_of": AS_OF.isoformat()}, headers=coordinator)
        for _ in range(2)
    ]
    assert [run.status_code for run in runs] == [201, 201]
    policy = app.state.flagging_policy
    file_bytes = (app.state.settings.policies_dir / "flagging.yaml").read_bytes()
    for run in runs:
        served = client.get(f"/v1/flagging/runs/{run.json()['id']}/policy", headers=coordinator)
        assert served.status_code == 200, served.text
        body = served.json()
        assert body["content"].encode("utf-8") == file_bytes
        assert body["sha256"] == hashlib.sha256(file_bytes).hexdigest()
        assert (body["version"], body["name"]) == (run.json()["policy_version"], policy.name)
        # the version's hash is the head of the file's: an auditor checks one against the other
        assert f"+{body['sha256'][:12]}/" in body["version"]
    # kept once, under its version
    assert session.execute(select(POLICIES.c.version)).scalars().all() == [policy.version]
    session.rollback()
    professional = bearer(token("prof-001", "professional"))
    refused = client.get(f"/v1/flagging/runs/{runs[0].json()['id']}/policy", headers=professional)
    assert refused.status_code == 403


def test_an_auditor_checks_a_runs_rules_against_the_hash_its_log_entry_names(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    seed(app, session)
    coordinator = bearer(token("coord-001", "coordinator"))
    made = client.post("/v1/flagging/runs", json={"as_of": AS_OF.isoformat()}, headers=coordinator)
    assert made.status_code == 201, made.text
    auditor = bearer(token("audit-001", "auditor"))
    pulled = client.get("/v1/audit/entries?start=0&end=1", headers=auditor)
    assert pulled.status_code == 200, pulled.text
    (entry,) = [json.loads(line) for line in pulled.text.splitlines()]
    assert (entry["action"], entry["object_id"]) == ("flagging.run", made.json()["id"])
    committed = re.search(r"\(sha256 ([0-9a-f]{64})\)", entry["reason"])
    assert committed is not None, entry["reason"]
    served = client.get(f"/v1/flagging/runs/{entry['object_id']}/policy", headers=auditor)
    assert served.status_code == 200, served.text
    assert hashlib.sha256(served.json()["content"].encode("utf-8")).hexdigest() == (
        committed.group(1)
    )
    # the policy is rules, not personal data: reading it is not an audit read of the log
    assert log_entries(session, "audit.read") == [log_entries(session)[-1]]


def test_a_policy_whose_version_is_archived_with_other_bytes_starts_no_run(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    """The version holds 48 bits of the file's hash, few enough to make two files collide: the
    archive keeps the whole hash, and a second file under a kept version is refused."""
    seed(app, session)
    policy = app.state.flagging_policy
    other = b"name: another policy made to collide\n"
    archive(session, policy.version, other)
    before = len(log_entries(session))
    coordinator = bearer(token("coord-001", "coordinator"))
    refused = client.post("/v1/flagging/runs", json={}, headers=coordinator)
    assert refused.status_code == 409, refused.text
    assert refused.json()["detail"].startswith(
        f"policy version {policy.version} is archived with other content"
    )
    assert session.execute(select(func.count()).select_from(RUNS)).scalar_one() == 0
    assert session.execute(select(POLICIES.c.content)).scalars().all() == [other]
    session.rollback()
    assert len(log_entries(session)) == before


@pytest.mark.parametrize("same_bytes", [True, False], ids=["same-file", "other-file"])
def test_a_version_another_run_archived_after_this_one_looked_is_judged_as_kept(
    app: FastAPI,
    database: Database,
    session: Session,
    monkeypatch: pytest.MonkeyPatch,
    same_bytes: bool,
) -> None:
    """Two runs of a new version at once: the second one's insert fails on the first one's row,
    which then decides, as if it had been there when the second looked."""
    policy = app.state.flagging_policy
    content = policy.content if same_bytes else b"name: made to collide\n"
    with database.session() as first:
        archive(first, policy.version, content)
    looks: list[object] = []
    real_get = session.get

    def looked_before_it_committed(entity: Any, ident: Any, **options: Any) -> Any:
        looks.append(ident)
        return None if len(looks) == 1 else real_get(entity, ident, **options)

    monkeypatch.setattr(session, "get", looked_before_it_committed)
    if same_bytes:
        flagging_service._archive(session, policy)
    else:
        with pytest.raises(flagging_service.PolicyVersionClash):
            flagging_service._archive(session, policy)
    assert looks == [policy.version, policy.version]
    session.commit()  # the transaction is still usable: only the savepoint was rolled back
    assert session.execute(select(POLICIES.c.content)).scalars().all() == [content]
    session.rollback()


def test_runs_are_listed_newest_first_a_page_at_a_time(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    seed(app, session)
    coordinator = bearer(token("coord-001", "coordinator"))
    made = [
        client.post("/v1/flagging/runs", json={"as_of": day}, headers=coordinator).json()
        for day in ("2025-01-01", "2025-06-01", AS_OF.isoformat())
    ]
    first = client.get("/v1/flagging/runs?limit=2", headers=coordinator)
    assert first.status_code == 200, first.text
    assert [run["id"] for run in first.json()["items"]] == [made[2]["id"], made[1]["id"]]
    assert first.json()["items"][0] == made[2]
    cursor = first.json()["next_after"]
    # a run made while the caller pages belongs to a new walk, not to the next page
    client.post("/v1/flagging/runs", json={}, headers=coordinator)
    rest = client.get(f"/v1/flagging/runs?limit=2&after={cursor}", headers=coordinator).json()
    assert ([run["id"] for run in rest["items"]], rest["next_after"]) == ([made[0]["id"]], None)
    for bad in ("nope", "MjAyNXxub3BlCg", "A" * 200):
        refused = client.get(f"/v1/flagging/runs?after={bad}", headers=coordinator)
        assert refused.status_code == 422, refused.text
        assert bad not in refused.text
    # a page that holds the last run says so, even when it is exactly full
    whole = client.get("/v1/flagging/runs?limit=4", headers=coordinator).json()
    assert (len(whole["items"]), whole["next_after"]) == (4, None)


def test_a_run_from_before_the_archive_says_its_policy_is_not_kept(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    seed(app, session)
    coordinator = bearer(token("coord-001", "coordinator"))
    run = client.post("/v1/flagging/runs", json={}, headers=coordinator).json()
    session.execute(POLICIES.delete())  # as a run made before revision 0012 finds it
    session.commit()
    served = client.get(f"/v1/flagging/runs/{run['id']}/policy", headers=coordinator)
    assert served.status_code == 404, served.text
    assert served.json()["detail"].startswith(
        f"the policy of run {run['id']} ({run['policy_version']}) is not archived"
    )


def test_a_run_needs_no_body_and_then_evaluates_as_on_today(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    seed(app, session)
    coordinator = bearer(token("coord-001", "coordinator"))
    response = client.post("/v1/flagging/runs", headers=coordinator)
    assert response.status_code == 201, response.text
    assert response.json()["as_of"] == today().isoformat()
    assert response.json()["evaluated"] == 3


def test_an_as_of_after_today_is_refused_naming_the_field(
    client: TestClient, session: Session, token: TokenFactory
) -> None:
    # A run as of 2030 would say "on welfare for 60 months" of someone on welfare since 2025.
    coordinator = bearer(token("coord-001", "coordinator"))
    tomorrow = (today() + timedelta(days=1)).isoformat()
    response = client.post("/v1/flagging/runs", json={"as_of": tomorrow}, headers=coordinator)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert "as_of" in response.json()["detail"]
    assert response.json()["errors"][0]["msg"].endswith(f"after today ({today().isoformat()})")
    assert log_entries(session, "flagging.run") == []


def test_an_as_of_before_1900_is_refused_naming_the_field(
    client: TestClient, token: TokenFactory
) -> None:
    # Found by fuzzing: year 2 moved a 24-month window before year 1 and the run failed (500).
    coordinator = bearer(token("coord-001", "coordinator"))
    response = client.post("/v1/flagging/runs", json={"as_of": "0002-01-01"}, headers=coordinator)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert "as_of" in response.json()["detail"]


@pytest.mark.parametrize("as_of", ["1704067200", 1704067200, "2024-01-01T00:00:00Z", "20240101"])
def test_an_as_of_that_is_not_written_yyyy_mm_dd_is_refused(
    client: TestClient, session: Session, token: TokenFactory, as_of: object
) -> None:
    """Digits would be read as seconds since 1970, a midnight datetime as its day: a caller
    sending either means something else, and the run would be logged under a day not asked for."""
    coordinator = bearer(token("coord-001", "coordinator"))
    response = client.post("/v1/flagging/runs", json={"as_of": as_of}, headers=coordinator)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["loc"] == ["as_of"]
    assert response.json()["errors"][0]["msg"].endswith("a date is written as text, YYYY-MM-DD")
    assert log_entries(session, "flagging.run") == []


def test_a_professional_may_not_run_or_read_flagging(
    client: TestClient, token: TokenFactory
) -> None:
    professional = bearer(token("prof-001", "professional"))
    assert client.post("/v1/flagging/runs", json={}, headers=professional).status_code == 403
    assert client.get("/v1/flagging/runs/x/flags", headers=professional).status_code == 403


def test_unknown_run_is_404_and_a_run_id_of_another_shape_422(
    client: TestClient, token: TokenFactory
) -> None:
    coordinator = bearer(token("c", "coordinator"))
    for path in (
        "/v1/flagging/runs/{}",
        "/v1/flagging/runs/{}/flags",
        "/v1/flagging/runs/{}/policy",
    ):
        unknown = client.get(path.format("0" * 32), headers=coordinator)
        assert unknown.status_code == 404, unknown.text
        # a NUL gave 422 "a value cannot be stored" on PostgreSQL, 404 on SQLite
        for shape in ("nope", "%00", "A" * 32):
            refused = client.get(path.format(shape), headers=coordinator)
            assert refused.status_code == 422, refused.text
            assert "run_id" in refused.json()["detail"]


def test_a_source_pushes_external_flags_and_it_is_logged(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    seed(app, session)
    response = client.post(
        "/v1/flags",
        json={
            "flags": [
                {
                    "pseudonym": QUIET_PSEUDONYM,
                    "reason_code": "debt-signal",
                    "explanation": "Rent arrears reported by the housing corporation.",
                }
            ]
        },
        headers=bearer(token("source-welfare", "source")),
    )
    assert response.status_code == 201, response.text
    [flag] = response.json()["flags"]
    assert flag["kind"] == "external"
    assert flag["run_id"] is None
    assert flag["reason_code"] == "debt-signal"
    [logged] = log_entries(session, "flags.push")
    assert logged["pseudonyms"] == [QUIET_PSEUDONYM]
    assert logged["object_id"] == str(flag["id"])


OTHER_PSEUDONYM = "7a" * 16
RENT = {
    "pseudonym": QUIET_PSEUDONYM,
    "reason_code": "debt-signal",
    "explanation": "Rent arrears reported by the housing corporation.",
}
SCHOOL = {
    "pseudonym": OTHER_PSEUDONYM,
    "reason_code": "school-absence",
    "explanation": "Long school absence of a child in the household.",
}


def seed_two_pushable(app: FastAPI, session: Session) -> None:
    seed(app, session)
    add_subject(session, app.state.keyring, pseudonym=OTHER_PSEUDONYM, events=QUIET)
    session.commit()


def stored_flags(session: Session) -> int:
    count = session.execute(select(func.count()).select_from(Flag)).scalar_one()
    session.rollback()
    return int(count)


def test_a_push_sent_again_with_its_idempotency_key_stores_its_flags_once(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    """A case-management system retrying a push it got no answer to must not make the
    professional read the same concern twice."""
    seed_two_pushable(app, session)
    source = {**bearer(token("source-welfare", "source")), "Idempotency-Key": "push-0001"}
    first = client.post("/v1/flags", json={"flags": [RENT, SCHOOL]}, headers=source)
    assert first.status_code == 201, first.text
    again = client.post("/v1/flags", json={"flags": [RENT, SCHOOL]}, headers=source)
    assert again.status_code == 201, again.text
    assert again.json() == first.json()
    assert stored_flags(session) == 2
    pushes = log_entries(session, "flags.push")
    assert [(e["object_id"], e["reason"]) for e in pushes] == [
        (pushes[0]["object_id"], None),
        (pushes[0]["object_id"], "sent again, not stored twice"),
    ]

    other = client.post("/v1/flags", json={"flags": [RENT]}, headers=source)
    assert other.status_code == 409, other.text
    assert other.json()["detail"] == "this Idempotency-Key was used for other flags; use a new key"
    # The explanation is part of what was pushed: reworded, it is other flags.
    reworded = {**SCHOOL, "explanation": "Reported again, in other words."}
    reworded_again = client.post("/v1/flags", json={"flags": [RENT, reworded]}, headers=source)
    assert reworded_again.status_code == 409, reworded_again.text
    # Keys are per source: another source's push under the same key is its own.
    elsewhere = {**bearer(token("source-school", "source")), "Idempotency-Key": "push-0001"}
    assert client.post("/v1/flags", json={"flags": [RENT]}, headers=elsewhere).status_code == 201
    assert stored_flags(session) == 3
    # Without a key, a push sent again is stored again (as before).
    plain = bearer(token("source-welfare", "source"))
    for _ in range(2):
        assert client.post("/v1/flags", json={"flags": [SCHOOL]}, headers=plain).status_code == 201
    assert stored_flags(session) == 5


def pushed_a_minute_past_retention(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> dict[str, str]:
    """A source's push under an Idempotency-Key, stored idempotency_days and a minute ago; the
    headers to send it again with."""
    seed_two_pushable(app, session)
    source = {**bearer(token("source-welfare", "source")), "Idempotency-Key": "push-aged"}
    assert client.post("/v1/flags", json={"flags": [RENT]}, headers=source).status_code == 201
    days = app.state.retention_policy.idempotency_days
    session.execute(
        update(FlagPush.__table__).values(  # type: ignore[attr-defined]
            created_at=datetime.now(UTC) - timedelta(days=days, minutes=1)
        )
    )
    session.commit()
    return source


def test_a_push_s_digest_is_forgotten_after_the_retention_period(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    source = pushed_a_minute_past_retention(app, client, session, token)
    pushes = FlagPush.__table__  # type: ignore[attr-defined]
    with app.state.database.transaction() as job:
        before = datetime.now(UTC) - timedelta(days=app.state.retention_policy.idempotency_days)
        assert flagging_service.forget_push_digests(session=job, before=before) == 1
    [digest] = session.execute(select(pushes.c.request_digest)).scalars()
    session.rollback()
    assert digest == "expired"
    replay = client.post("/v1/flags", json={"flags": [RENT]}, headers=source)
    assert replay.status_code == 409, replay.text
    assert "older than the service keeps digests for" in replay.json()["detail"]
    assert stored_flags(session) == 1


def test_a_push_key_past_the_retention_period_is_refused_before_it_is_forgotten(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    """idempotency_days bounds the replay itself, not only the shredder's round that forgets
    the digest: a retry past it gets 409 at once, and nothing is stored again."""
    source = pushed_a_minute_past_retention(app, client, session, token)
    replay = client.post("/v1/flags", json={"flags": [RENT]}, headers=source)
    assert replay.status_code == 409, replay.text
    assert "older than the service keeps digests for" in replay.json()["detail"]
    assert stored_flags(session) == 1


def test_a_push_under_a_key_that_held_an_erased_subject_cannot_be_replayed(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    """The digest is an HMAC of the explanations under the pseudonym key, which outlives the
    erasure: kept, it would confirm a guess of what a source wrote about the erased person."""
    seed_two_pushable(app, session)
    source = {**bearer(token("source-welfare", "source")), "Idempotency-Key": "push-0002"}
    kept = {**bearer(token("source-welfare", "source")), "Idempotency-Key": "push-0003"}
    assert client.post("/v1/flags", json={"flags": [RENT]}, headers=source).status_code == 201
    assert client.post("/v1/flags", json={"flags": [SCHOOL]}, headers=kept).status_code == 201
    admin = bearer(token("admin-001", "admin"))
    assert client.post(f"/v1/subjects/{QUIET_PSEUDONYM}/erase", headers=admin).status_code == 200

    pushes = FlagPush.__table__  # type: ignore[attr-defined]
    rows = session.execute(select(pushes.c.idempotency_key, pushes.c.request_digest)).all()
    digests: dict[str, str] = {str(key): str(digest) for key, digest in rows}
    session.rollback()
    assert digests["push-0002"] == ERASED_DIGEST
    assert digests["push-0003"] != ERASED_DIGEST
    replay = client.post("/v1/flags", json={"flags": [RENT]}, headers=source)
    assert replay.status_code == 409, replay.text
    assert "since been erased" in replay.json()["detail"]
    assert client.post("/v1/flags", json={"flags": [SCHOOL]}, headers=kept).status_code == 201
    assert stored_flags(session) == 2


def test_a_push_arriving_during_an_erasure_waits_for_it_and_is_refused(
    app: FastAPI,
    client: TestClient,
    session: Session,
    token: TokenFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Otherwise (PostgreSQL) the push reads the subject as not erased, stores its text after the
    erasure removed the texts it could see, and the text outlives the erasure."""
    seed_two_pushable(app, session)
    interleaving = Interleaving()

    def pause_before_commit(_session: Session, _subject_id: int) -> int:
        interleaving.pause()
        return 0

    monkeypatch.setattr(
        records_service, "ERASURE_HOOKS", [*records_service.ERASURE_HOOKS, pause_before_commit]
    )
    admin = bearer(token("admin-001", "admin"))
    source = bearer(token("source-welfare", "source"))
    statuses = interleaving.run(
        lambda: client.post(f"/v1/subjects/{QUIET_PSEUDONYM}/erase", headers=admin),
        lambda: client.post("/v1/flags", json={"flags": [RENT]}, headers=source),
    )
    assert statuses == (200, 422)
    assert stored_flags(session) == 0


def test_erasing_again_removes_what_an_older_version_left(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    """Subjects erased before pushed texts and request digests went with the erasure keep them
    until they are erased again."""
    seed_two_pushable(app, session)
    source = {**bearer(token("source-welfare", "source")), "Idempotency-Key": "push-0005"}
    assert client.post("/v1/flags", json={"flags": [RENT]}, headers=source).status_code == 201
    admin = bearer(token("admin-001", "admin"))
    assert client.post(f"/v1/subjects/{QUIET_PSEUDONYM}/erase", headers=admin).status_code == 200
    # What an erasure by an older version left behind.
    pushes = FlagPush.__table__  # type: ignore[attr-defined]
    session.execute(update(Flag).values(explanation=RENT["explanation"]))
    session.execute(update(pushes).values(request_digest="1:" + "ab" * 32))
    session.commit()

    again = client.post(f"/v1/subjects/{QUIET_PSEUDONYM}/erase", headers=admin)
    assert again.status_code == 200, again.text
    assert again.json()["already_erased"] is True
    explanations = session.execute(select(Flag.explanation)).scalars().all()  # type: ignore[call-overload]
    digests = session.execute(select(pushes.c.request_digest)).scalars().all()
    session.rollback()
    assert explanations == [ERASED_EXPLANATION]
    assert digests == [ERASED_DIGEST]


def test_two_pushes_under_one_key_at_once_store_the_flags_once(
    app: FastAPI,
    client: TestClient,
    session: Session,
    token: TokenFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The second push, arriving while the first has looked its key up but not yet stored it,
    gets the first one's flags (on PostgreSQL it passes the look-up too, and meets the unique
    key)."""
    seed_two_pushable(app, session)
    source = {**bearer(token("source-welfare", "source")), "Idempotency-Key": "push-0004"}
    interleaving = Interleaving()
    interleaving.stop_after(monkeypatch, flagging_service, "_pushable")
    answers: list[Any] = []

    def push() -> Any:
        response = client.post("/v1/flags", json={"flags": [RENT, SCHOOL]}, headers=source)
        answers.append(response.json())
        return response

    assert interleaving.run(push, push) == (201, 201)
    assert answers[0] == answers[1]
    assert stored_flags(session) == 2


def test_an_unknown_pseudonym_is_422_naming_it_and_nothing_is_stored(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    seed(app, session)
    good = {
        "pseudonym": QUIET_PSEUDONYM,
        "reason_code": "x",
        "explanation": "Reported by a school.",
    }
    bad = {**good, "pseudonym": MISSING}
    response = client.post(
        "/v1/flags", json={"flags": [good, bad]}, headers=bearer(token("src", "source"))
    )
    assert response.status_code == 422
    problem = response.json()
    assert MISSING in problem["detail"]
    assert [e["row"] for e in problem["errors"]] == [1]
    assert log_entries(session, "flags.push") == []


def test_a_pseudonym_pushed_twice_in_one_request_is_refused(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    seed(app, session)
    flag = {
        "pseudonym": QUIET_PSEUDONYM,
        "reason_code": "x",
        "explanation": "Reported by a school.",
    }
    response = client.post(
        "/v1/flags", json={"flags": [flag, flag]}, headers=bearer(token("src", "source"))
    )
    assert response.status_code == 422
    problem = response.json()
    assert [(e["row"], e["msg"]) for e in problem["errors"]] == [
        (1, "flagged already in row 0; give one flag per pseudonym")
    ]
    assert log_entries(session, "flags.push") == []
    assert session.execute(select(func.count()).select_from(Flag)).scalar_one() == 0


def test_a_pushed_pseudonym_of_another_shape_is_refused_without_echoing_it(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    seed(app, session)
    pasted = {"pseudonym": "123456782 Jan", "reason_code": "x", "explanation": "Reported today."}
    good = {**pasted, "pseudonym": QUIET_PSEUDONYM}
    response = client.post(
        "/v1/flags", json={"flags": [good, pasted]}, headers=bearer(token("src", "source"))
    )
    assert response.status_code == 422
    [error] = response.json()["errors"]
    assert (error["loc"], error["row"]) == (["flags", 1, "pseudonym"], 1)
    assert "123456782" not in response.text
    assert log_entries(session, "flags.push") == []


@pytest.mark.parametrize(
    "explanation",
    [
        "Rent \u202eslaer\u202c arrears reported.",  # a bidi override reorders what is read
        "Rent arrears reported.\nforged: second line",
        "Rent arrears \x1b[31mreported\x1b[0m.",
        "Rent\u200barrears reported today.",
        "Rent arrears reported\x7f today.",
        "..........",
    ],
)
def test_a_pushed_explanation_is_plain_text_like_ingest_and_never_echoed(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory, explanation: str
) -> None:
    seed(app, session)
    flag = {**RENT, "explanation": explanation}
    response = client.post(
        "/v1/flags", json={"flags": [flag]}, headers=bearer(token("src", "source"))
    )
    assert response.status_code == 422, response.text
    assert [e["loc"] for e in response.json()["errors"]] == [["flags", 0, "explanation"]]
    assert "reported" not in response.text
    assert "....." not in response.text
    assert stored_flags(session) == 0
    assert log_entries(session, "flags.push") == []


def test_a_pushed_explanation_may_join_letters_as_ingest_allows(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory
) -> None:
    seed(app, session)
    # a zero-width non-joiner between two letters of a Persian word, as in an ingested name
    flag = {**RENT, "explanation": "Rent arrears reported by \u0645\u06cc\u200c\u0631\u0648\u062f."}
    response = client.post(
        "/v1/flags", json={"flags": [flag]}, headers=bearer(token("src", "source"))
    )
    assert response.status_code == 201, response.text
    assert response.json()["flags"][0]["explanation"] == flag["explanation"]


@pytest.mark.parametrize("altered", ["sha256", "content"])
def test_a_kept_policy_whose_hash_or_bytes_were_altered_starts_no_run(
    app: FastAPI, client: TestClient, session: Session, token: TokenFactory, altered: str
) -> None:
    """The archive row is checked whole: a hash that no longer fits the kept bytes, or bytes
    changed under the kept hash, is a clash as much as another file under the version."""
    seed(app, session)
    policy = app.state.flagging_policy
    archive(session, policy.version, policy.content)
    changed = {"sha256": "0" * 64, "content": policy.content + b"# altered\n"}[altered]
    session.execute(update(POLICIES).values({altered: changed}))
    session.commit()
    coordinator = bearer(token("coord-001", "coordinator"))
    refused = client.post("/v1/flagging/runs", json={}, headers=coordinator)
    assert refused.status_code == 409, refused.text
    assert session.execute(select(func.count()).select_from(RUNS)).scalar_one() == 0
    session.rollback()


def test_runs_begun_at_one_instant_are_each_listed_once_a_page_at_a_time(
    client: TestClient, session: Session, token: TokenFactory
) -> None:
    instant = datetime(2025, 3, 1, 12, tzinfo=UTC)
    ids = sorted(f"{n:032x}" for n in (7, 3, 5))
    for run_id in ids:
        session.add(
            FlaggingRun(
                id=run_id,
                policy_name="p",
                policy_version="v",
                as_of=AS_OF,
                started_by="test",
                created_at=instant,
            )
        )
    session.commit()
    coordinator = bearer(token("coord-001", "coordinator"))
    seen: list[str] = []
    after = ""
    for _ in range(len(ids) + 1):  # bounded: a cursor that goes nowhere would loop forever
        page = client.get(f"/v1/flagging/runs?limit=1{after}", headers=coordinator).json()
        seen += [run["id"] for run in page["items"]]
        if page["next_after"] is None:
            break
        after = f"&after={page['next_after']}"
    assert seen == ids


def test_a_cursor_whose_run_id_is_not_of_a_runs_shape_is_refused(
    client: TestClient, token: TokenFactory
) -> None:
    coordinator = bearer(token("coord-001", "coordinator"))
    for run_id in ("nope", "A" * 32, "0" * 31):
        bad = paging.cursor(datetime(2025, 3, 1, tzinfo=UTC), run_id)
        refused = client.get(f"/v1/flagging/runs?after={bad}", headers=coordinator)
        assert refused.status_code == 422, refused.text
        assert bad not in refused.text


def test_a_page_size_outside_1_to_the_maximum_is_brought_within_it(
    app: FastAPI, session: Session
) -> None:
    seed(app, session)
    for _ in range(2):
        run_flagging(
            session=session,
            policy=app.state.flagging_policy,
            as_of=AS_OF,
            caller=system_caller("t"),
        )
    session.commit()
    items, next_after = flagging_service.list_runs(session=session, limit=0)
    assert (len(items), next_after is not None) == (1, True)
    items, next_after = flagging_service.list_runs(session=session, limit=10**9)
    assert (len(items), next_after) == (2, None)
