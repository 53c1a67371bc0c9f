"""Every sentence a professional reads is true of the history it was computed from.

Random histories under random policies: each hit's sentence states the counts, dates, months and
offices its evidence holds, and the evidence is what the events show; a rule that did not fire
is never named; the same policy on the same history always says the same.
"""

from __future__ import annotations

from datetime import date

from hypothesis import given, settings
from hypothesis import strategies as st

from service.flagging.rules import (
    EVENT_TYPES,
    MONTHS,
    DeskHoppingRule,
    Evaluator,
    LongWelfareWithoutContactRule,
    RelapseRule,
    RuleHit,
    SubjectEvent,
    evaluate,
    event,
    months_before,
    office_key,
    whole_months_between,
)
from tests.flagging.seed import policy

RawEvent = tuple[str, date, str]

# Dense histories around the dates a run is made on, many on a handful of shared days, so every
# rule fires often and same-day events meet in every order.
shared_days = [date(2023, 5, 31), date(2024, 2, 29), date(2024, 6, 1), date(2025, 3, 31)]
raw_events = st.lists(
    st.tuples(
        st.sampled_from(
            [
                *EVENT_TYPES,
                "welfare_start",
                "welfare_end",
                "employment_end",
                "helpdesk_visit",
                "helpdesk_visit",
            ]
        ),
        st.one_of(
            st.sampled_from(shared_days),
            st.dates(min_value=date(2021, 1, 1), max_value=date(2026, 6, 30)),
        ),
        st.sampled_from(["Zuid", "Noord", "zuid ", "Café", "Cafe\u0301", "West", "Oost"]),
    ),
    min_size=6,
    max_size=40,
)
rule_sets = st.tuples(
    st.builds(
        RelapseRule,
        id=st.just("relapse"),
        description=st.just("relapse under test"),
        min_returns=st.integers(1, 2),
        within_months=st.integers(1, 60),
    ),
    st.builds(
        DeskHoppingRule,
        id=st.just("hop"),
        description=st.just("desk hopping under test"),
        min_helpdesks=st.integers(2, 3),
        within_months=st.integers(6, 48),
    ),
    st.builds(
        LongWelfareWithoutContactRule,
        id=st.just("long"),
        description=st.just("long welfare under test"),
        min_welfare_months=st.integers(1, 36),
        no_contact_months=st.integers(1, 36),
    ),
)
as_of_dates = st.dates(min_value=date(2024, 1, 1), max_value=date(2026, 6, 30))


def spoken(day: date) -> str:
    return f"{day.day} {MONTHS[day.month - 1]} {day.year}"


def months(count: int) -> str:
    return "1 month" if count == 1 else f"{count} months"


def listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def days_of(history: list[RawEvent], kind: str, as_of: date) -> set[str]:
    return {day.isoformat() for type_, day, _ in history if type_ == kind and day <= as_of}


def check_relapse(hit: RuleHit, rule: RelapseRule, history: list[RawEvent], as_of: date) -> None:
    evidence = hit.evidence
    since = months_before(as_of, rule.within_months)
    assert evidence["since"] == since.isoformat()
    count = evidence["returns"]
    assert count >= rule.min_returns
    assert count == len(evidence["welfare_started"]) == len(evidence["jobs_ended"])
    assert count == len(evidence["welfare_ended"])
    assert set(evidence["welfare_started"]) <= days_of(history, "welfare_start", as_of)
    assert set(evidence["jobs_ended"]) <= days_of(history, "employment_end", as_of)
    assert set(evidence["welfare_ended"]) <= days_of(history, "welfare_end", as_of)
    assert all(since.isoformat() <= day for day in evidence["welfare_started"])
    jobs = listed([day[:7] for day in evidence["jobs_ended"]])
    if count == 1:
        expected = (
            f"As of {spoken(as_of)}: came back to welfare once since {spoken(since)}, after "
            f"leaving it for work that then ended (a job ending {jobs})."
        )
    else:
        expected = (
            f"As of {spoken(as_of)}: came back to welfare {count} times since {spoken(since)}, "
            f"each time after leaving it for work that then ended (jobs ending {jobs})."
        )
    assert hit.explanation == expected


def check_desk_hopping(
    hit: RuleHit, rule: DeskHoppingRule, history: list[RawEvent], as_of: date
) -> None:
    evidence = hit.evidence
    since = months_before(as_of, rule.within_months)
    visits = [
        (day, office)
        for kind, day, office in history
        if kind == "helpdesk_visit" and since <= day <= as_of
    ]
    helpdesks = {office_key(office) for _, office in visits}
    assert evidence["since"] == since.isoformat()
    assert evidence["visits"] == len(visits)
    assert evidence["helpdesks"] == len(helpdesks) == len(evidence["offices"])
    assert len(helpdesks) >= rule.min_helpdesks
    assert {office_key(office) for office in evidence["offices"]} == helpdesks
    for office, first in zip(evidence["offices"], evidence["first_visits"], strict=True):
        assert first == min(d for d, o in visits if office_key(o) == office_key(office)).isoformat()
    assert hit.explanation == (
        f"As of {spoken(as_of)}: visited {len(helpdesks)} different helpdesks since "
        f"{spoken(since)} "
        f"({listed(evidence['offices'])})."
    )


def check_long_welfare(
    hit: RuleHit, rule: LongWelfareWithoutContactRule, history: list[RawEvent], as_of: date
) -> None:
    evidence = hit.evidence
    on_welfare_since = date.fromisoformat(evidence["on_welfare_since"])
    on_welfare = whole_months_between(on_welfare_since, as_of)
    assert evidence["months_on_welfare"] == on_welfare >= rule.min_welfare_months
    # The spell began with a welfare event that day (a start, or the end of a desk move where
    # the records begin), and no welfare end after it stopped welfare for a day.
    welfare_days = days_of(history, "welfare_start", as_of) | days_of(history, "welfare_end", as_of)
    assert on_welfare_since.isoformat() in welfare_days
    visits = [d for kind, d, _ in history if kind == "helpdesk_visit" and d <= as_of]
    last_visit = max(visits).isoformat() if visits else None
    assert evidence["last_helpdesk_visit"] == last_visit
    no_contact_since = months_before(as_of, rule.no_contact_months)
    assert evidence["no_contact_since"] == no_contact_since.isoformat()
    assert all(day < no_contact_since for day in visits)
    contact = f"last visit {last_visit}" if last_visit else "no visit on record"
    assert hit.explanation == (
        f"As of {spoken(as_of)}: on welfare since {on_welfare_since.strftime('%Y-%m')} "
        f"({months(on_welfare)}) and no helpdesk visit in the last "
        f"{months(rule.no_contact_months)} ({contact})."
    )


@settings(max_examples=400)
@given(raw_events, rule_sets, as_of_dates)
def test_every_explanation_states_what_the_evidence_and_the_events_show(
    history: list[RawEvent],
    rules: tuple[RelapseRule, DeskHoppingRule, LongWelfareWithoutContactRule],
    as_of: date,
) -> None:
    relapse, hopping, long_welfare = rules
    evaluated = policy(*rules)
    events: list[SubjectEvent] = [event(kind, day, office) for kind, day, office in history]
    hits = evaluate(evaluated, events, as_of=as_of)
    assert [hit.rule_id for hit in hits] == [
        r.id for r in rules if r.id in {h.rule_id for h in hits}
    ]
    for hit in hits:
        if hit.rule_id == relapse.id:
            assert hit.rule_type == "relapse"
            check_relapse(hit, relapse, history, as_of)
        elif hit.rule_id == hopping.id:
            assert hit.rule_type == "desk_hopping"
            check_desk_hopping(hit, hopping, history, as_of)
        else:
            assert (hit.rule_id, hit.rule_type) == (long_welfare.id, long_welfare.type)
            check_long_welfare(hit, long_welfare, history, as_of)
    # Each rule alone fires exactly when it fires among the others, saying the same.
    for rule in rules:
        alone = policy(rule)
        assert evaluate(alone, events, as_of=as_of) == [h for h in hits if h.rule_id == rule.id]
    # The same policy on the same history says the same, run again, reused, or without events
    # after as_of.
    evaluator = Evaluator(evaluated, as_of)
    evaluator.evaluate(list(reversed(events)))
    assert evaluator.evaluate(events) == hits
    assert [h.as_json() for h in evaluate(evaluated, events, as_of=as_of)] == [
        h.as_json() for h in hits
    ]
    before = [e for e in events if e[1] <= as_of.toordinal()]
    assert evaluate(evaluated, before, as_of=as_of) == hits
