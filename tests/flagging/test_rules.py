"""Rule evaluation on hand-built histories, at the boundaries of every rule type."""

from __future__ import annotations

import random
import unicodedata
from datetime import date

from hypothesis import given
from hypothesis import strategies as st

from service.flagging.rules import (
    EVENT_TYPES,
    DeskHoppingRule,
    LongWelfareWithoutContactRule,
    RelapseRule,
    SubjectEvent,
    evaluate,
    event,
    months_before,
    whole_months_between,
)
from tests.flagging.seed import policy

AS_OF = date(2026, 3, 15)


RELAPSE = RelapseRule(id="relapse", description="relapse test", min_returns=3, within_months=24)
EVERY_RETURN = RelapseRule(id="any", description="any return", min_returns=1, within_months=600)
HOPPING = DeskHoppingRule(id="hop", description="hop test", min_helpdesks=3, within_months=12)
LONG = LongWelfareWithoutContactRule(
    id="long", description="long test", min_welfare_months=24, no_contact_months=12
)


def relapses(*pairs: tuple[date, date]) -> list[SubjectEvent]:
    """Per pair: welfare ends for a job three months before the job ends, then welfare starts."""
    events: list[SubjectEvent] = []
    for job_end, welfare_start in pairs:
        events.append(event("employment_start", months_before(job_end, 3)))
        events.append(event("welfare_end", months_before(job_end, 3)))
        events.append(event("employment_end", job_end))
        events.append(event("welfare_start", welfare_start))
    return events


# ---- relapse


def test_relapse_fires_at_exactly_n_returns_with_a_sentence_to_read_aloud() -> None:
    history = relapses(
        (date(2024, 6, 30), date(2024, 7, 1)),
        (date(2025, 1, 31), date(2025, 2, 3)),
        (date(2025, 9, 30), date(2025, 10, 1)),
    )
    [hit] = evaluate(policy(RELAPSE), history, as_of=AS_OF)
    assert hit.rule_id == "relapse"
    # The whole evidence, so that none of it (the threshold included) can go missing unnoticed.
    assert dict(hit.evidence) == {
        "returns": 3,
        "since": "2024-03-15",
        "welfare_ended": ["2024-03-30", "2024-10-31", "2025-06-30"],
        "jobs_ended": ["2024-06-30", "2025-01-31", "2025-09-30"],
        "welfare_started": ["2024-07-01", "2025-02-03", "2025-10-01"],
        "threshold": 3,
    }
    assert hit.explanation == (
        "As of 15 March 2026: came back to welfare 3 times since 15 March 2024, each time after "
        "leaving it for work that then ended (jobs ending 2024-06, 2025-01 and 2025-09)."
    )


def returns(history: list[SubjectEvent]) -> list[str]:
    """The days welfare started again that count as returns (any number, any time)."""
    hits = evaluate(policy(EVERY_RETURN), history, as_of=AS_OF)
    return hits[0].evidence["welfare_started"] if hits else []


def test_one_return_is_told_in_the_singular() -> None:
    once = RelapseRule(id="once", description="once test", min_returns=1, within_months=24)
    [hit] = evaluate(policy(once), relapses((date(2025, 9, 30), date(2025, 10, 1))), as_of=AS_OF)
    assert hit.explanation == (
        "As of 15 March 2026: came back to welfare once since 15 March 2024, after leaving it "
        "for work that then ended (a job ending 2025-09)."
    )


def test_welfare_reported_again_by_other_desks_while_on_it_is_no_return() -> None:
    never_left = [
        event("welfare_start", date(2023, 1, 2), "Werkplein Zuid"),
        event("employment_end", date(2024, 6, 30)),
        event("welfare_start", date(2024, 7, 1), "Wijkteam Charlois"),
        event("employment_end", date(2025, 1, 31)),
        event("welfare_start", date(2025, 2, 3), "Wijkteam Feijenoord"),
        event("employment_end", date(2025, 9, 30)),
        event("welfare_start", date(2025, 10, 1), "Wijkteam Bloemhof"),
    ]
    assert returns(never_left) == []


def test_a_first_welfare_spell_after_a_job_is_no_return() -> None:
    history = [
        event("employment_end", date(2010, 1, 1)),
        event("welfare_start", date(2024, 7, 1)),
        event("welfare_end", date(2024, 8, 1)),
        event("employment_end", date(2025, 1, 1)),
        event("welfare_start", date(2025, 2, 1)),
    ]
    assert returns(history) == ["2025-02-01"]


def test_welfare_starting_while_in_a_newer_job_is_no_return() -> None:
    history = [
        event("welfare_start", date(2023, 1, 2)),
        event("welfare_end", date(2024, 1, 31)),
        event("employment_start", date(2024, 2, 1)),
        event("employment_end", date(2024, 5, 31)),
        event("employment_start", date(2024, 5, 31)),
        event("welfare_start", date(2024, 9, 1)),
    ]
    assert returns(history) == []
    newer_job_ended = [*history[:5], event("employment_end", date(2024, 8, 31)), history[5]]
    assert returns(newer_job_ended) == ["2024-09-01"]


def test_a_job_that_ended_before_welfare_did_is_no_reason_to_return() -> None:
    history = [
        event("welfare_start", date(2023, 1, 2)),
        event("employment_start", date(2023, 3, 1)),
        event("employment_end", date(2023, 6, 30)),
        event("welfare_end", date(2024, 1, 31)),
        event("welfare_start", date(2024, 9, 1)),
    ]
    assert returns(history) == []


def test_leaving_welfare_with_no_start_on_record_still_counts_as_leaving() -> None:
    history = [
        event("welfare_end", date(2024, 1, 31)),
        event("employment_end", date(2024, 6, 30)),
        event("welfare_start", date(2024, 7, 1)),
    ]
    assert returns(history) == ["2024-07-01"]


def test_moving_desks_on_the_day_a_job_ended_is_no_return() -> None:
    history = [
        event("welfare_start", date(2023, 1, 2), "Werkplein Zuid"),
        event("employment_end", date(2024, 6, 30)),
        event("welfare_end", date(2024, 6, 30), "Werkplein Zuid"),
        event("welfare_start", date(2024, 6, 30), "Werkplein Noord"),
    ]
    assert returns(history) == []


def test_a_desk_move_on_the_day_a_job_ended_is_no_return_when_both_desks_report_the_end() -> None:
    """The spell ends at one desk, the desk it moves to reports an end that day too, and the
    job ends: welfare never stopped for a day, so there was no leaving it for work and no
    return, only a spell that ended that day (a start later, with that job ended, is one)."""
    history = [
        event("welfare_start", date(2023, 1, 2), "Werkplein Zuid"),
        event("employment_start", date(2024, 2, 1)),
        event("welfare_end", date(2024, 6, 30), "Werkplein Zuid"),
        event("welfare_end", date(2024, 6, 30), "Werkplein Noord"),
        event("employment_end", date(2024, 6, 30)),
        event("welfare_start", date(2024, 6, 30), "Werkplein Noord"),
    ]
    assert returns(history) == []
    assert returns(history[2:]) == [], "where the records begin with those ends, too"
    later = [*history, event("welfare_start", date(2024, 9, 2), "Werkplein Zuid")]
    assert returns(later) == ["2024-09-02"]


def test_a_return_reported_again_by_another_desk_is_one_return() -> None:
    """Off welfare, desk B closes a stale record the day desk A reports the person back: a
    one-day spell, and a return. Desk B reporting that same start is no second one."""
    history = [
        event("welfare_start", date(2023, 1, 2), "Werkplein Zuid"),
        event("welfare_end", date(2024, 1, 31), "Werkplein Zuid"),
        event("employment_end", date(2024, 6, 30)),
        event("welfare_start", date(2024, 7, 1), "Werkplein Zuid"),
        event("welfare_end", date(2024, 9, 1), "Werkplein Zuid"),
        event("employment_end", date(2025, 8, 29)),
        event("welfare_end", date(2025, 9, 1), "Wijkteam Charlois"),
        event("welfare_start", date(2025, 9, 1), "Werkplein Zuid"),
    ]
    reported_twice = [*history, event("welfare_start", date(2025, 9, 1), "Wijkteam Charlois")]
    assert returns(history) == returns(reported_twice) == ["2024-07-01", "2025-09-01"]
    assert evaluate(policy(RELAPSE), reported_twice, as_of=AS_OF) == []


def test_a_job_end_backs_one_return_even_after_a_one_day_spell() -> None:
    """Welfare for one day on the day a job ended is a return; welfare again later, with no job
    ended since, is not a second return on the same job."""
    history = [
        event("welfare_start", date(2023, 1, 2)),
        event("welfare_end", date(2024, 1, 31)),
        event("employment_start", date(2024, 2, 1)),
        event("employment_end", date(2024, 6, 30)),
        event("welfare_start", date(2024, 6, 30)),
        event("welfare_end", date(2024, 6, 30)),
        event("welfare_start", date(2024, 9, 2)),
        event("welfare_end", date(2025, 1, 31)),
        event("employment_start", date(2025, 2, 1)),
        event("employment_end", date(2025, 8, 31)),
        event("welfare_start", date(2025, 9, 1)),
    ]
    assert evaluate(policy(RELAPSE), history, as_of=AS_OF) == []
    [hit] = evaluate(policy(EVERY_RETURN), history, as_of=AS_OF)
    assert hit.evidence["welfare_started"] == ["2024-06-30", "2025-09-01"]
    assert hit.evidence["jobs_ended"] == ["2024-06-30", "2025-08-31"]
    assert hit.explanation.endswith("(jobs ending 2024-06 and 2025-08).")


def test_relapse_does_not_fire_at_one_return_less() -> None:
    history = relapses((date(2024, 6, 30), date(2024, 7, 1)), (date(2025, 1, 31), date(2025, 2, 3)))
    assert evaluate(policy(RELAPSE), history, as_of=AS_OF) == []


def test_relapse_window_starts_exactly_m_months_before_as_of() -> None:
    on_edge = relapses(
        (date(2024, 3, 1), date(2024, 3, 15)),
        (date(2025, 1, 31), date(2025, 2, 3)),
        (date(2025, 9, 30), date(2025, 10, 1)),
    )
    assert [h.rule_id for h in evaluate(policy(RELAPSE), on_edge, as_of=AS_OF)] == ["relapse"]
    a_day_early = relapses(
        (date(2024, 3, 1), date(2024, 3, 14)),
        (date(2025, 1, 31), date(2025, 2, 3)),
        (date(2025, 9, 30), date(2025, 10, 1)),
    )
    assert evaluate(policy(RELAPSE), a_day_early, as_of=AS_OF) == []


def test_welfare_starts_without_a_job_in_between_are_not_returns() -> None:
    history = [
        event("employment_end", date(2024, 6, 1)),
        event("welfare_start", date(2024, 6, 2)),
        event("welfare_end", date(2024, 8, 1)),
        event("welfare_start", date(2024, 9, 1)),
        event("welfare_end", date(2024, 10, 1)),
        event("welfare_start", date(2024, 11, 1)),
    ]
    assert evaluate(policy(RELAPSE), history, as_of=AS_OF) == []


def test_a_job_ending_on_the_day_welfare_starts_counts_and_order_of_input_does_not_matter() -> None:
    history = relapses(
        (date(2024, 6, 1), date(2024, 6, 1)),
        (date(2025, 1, 1), date(2025, 1, 1)),
        (date(2025, 9, 1), date(2025, 9, 1)),
    )
    assert len(evaluate(policy(RELAPSE), list(reversed(history)), as_of=AS_OF)) == 1


def test_events_after_as_of_are_ignored() -> None:
    history = relapses(
        (date(2024, 6, 30), date(2024, 7, 1)),
        (date(2025, 1, 31), date(2025, 2, 3)),
        (date(2026, 3, 15), date(2026, 3, 16)),
    )
    assert evaluate(policy(RELAPSE), history, as_of=AS_OF) == []
    assert len(evaluate(policy(RELAPSE), history, as_of=date(2026, 3, 16))) == 1


# ---- desk hopping


def visits(*places: tuple[date, str]) -> list[SubjectEvent]:
    return [event("helpdesk_visit", day, office) for day, office in places]


def test_desk_hopping_fires_at_exactly_n_different_helpdesks() -> None:
    history = visits(
        (date(2025, 4, 1), "Bloemhof"),
        (date(2025, 5, 1), "Afrikaanderwijk"),
        (date(2025, 6, 1), "Bloemhof"),
        (date(2026, 1, 5), "Carnisse"),
    )
    [hit] = evaluate(policy(HOPPING), history, as_of=AS_OF)
    assert hit.evidence["helpdesks"] == 3
    assert hit.evidence["visits"] == 4
    assert hit.evidence["offices"] == ["Afrikaanderwijk", "Bloemhof", "Carnisse"]
    assert hit.explanation == (
        "As of 15 March 2026: visited 3 different helpdesks since 15 March 2025 "
        "(Afrikaanderwijk, Bloemhof and Carnisse)."
    )


def test_the_sentence_names_the_first_day_of_the_window_not_its_month() -> None:
    history = visits(
        (date(2026, 2, 27), "Bloemhof"),
        (date(2026, 3, 1), "Afrikaanderwijk"),
        (date(2026, 3, 2), "Carnisse"),
        (date(2026, 3, 31), "Bloemhof"),
    )
    one_month = DeskHoppingRule(id="m", description="month", min_helpdesks=3, within_months=1)
    [hit] = evaluate(policy(one_month), history, as_of=date(2026, 3, 31))
    assert hit.evidence["since"] == "2026-02-28"
    assert hit.explanation == (
        "As of 31 March 2026: visited 3 different helpdesks since 28 February 2026 "
        "(Afrikaanderwijk, Bloemhof and Carnisse)."
    )


def test_counts_name_the_day_they_are_counted_to() -> None:
    """A flag is read to the person after its run (made as of a past day, perhaps): "3 times
    since 15 March 2024" or "4 different helpdesks" must say up to which day, or a return or a
    visit since (which the run rightly did not see) makes the count read aloud untrue."""
    once = RelapseRule(id="once", description="once test", min_returns=1, within_months=24)
    history = [
        *relapses((date(2025, 9, 30), date(2025, 10, 1)), (date(2026, 4, 30), date(2026, 5, 4))),
        *visits(
            (date(2025, 4, 1), "Bloemhof"),
            (date(2025, 5, 1), "Afrikaanderwijk"),
            (date(2026, 1, 5), "Carnisse"),
            (date(2026, 3, 16), "Tarwewijk"),
        ),
    ]
    relapse, hopping = evaluate(policy(once, HOPPING), history, as_of=AS_OF)
    assert relapse.explanation == (
        "As of 15 March 2026: came back to welfare once since 15 March 2024, after leaving it "
        "for work that then ended (a job ending 2025-09)."
    )
    assert hopping.explanation == (
        "As of 15 March 2026: visited 3 different helpdesks since 15 March 2025 "
        "(Afrikaanderwijk, Bloemhof and Carnisse)."
    )


def test_desk_hopping_does_not_fire_at_one_helpdesk_less() -> None:
    history = visits(
        (date(2025, 4, 1), "Bloemhof"),
        (date(2025, 5, 1), "Afrikaanderwijk"),
        (date(2025, 6, 1), "Bloemhof"),
    )
    assert evaluate(policy(HOPPING), history, as_of=AS_OF) == []


def test_desk_hopping_window_edges() -> None:
    inside = visits((date(2025, 3, 15), "A"), (date(2025, 5, 1), "B"), (date(2026, 3, 15), "C"))
    assert len(evaluate(policy(HOPPING), inside, as_of=AS_OF)) == 1
    one_day_early = visits(
        (date(2025, 3, 14), "A"), (date(2025, 5, 1), "B"), (date(2026, 3, 15), "C")
    )
    assert evaluate(policy(HOPPING), one_day_early, as_of=AS_OF) == []


def test_spellings_of_one_office_are_one_helpdesk_named_once() -> None:
    history = visits(
        (date(2025, 6, 1), "wijkteam  charlois"),
        (date(2025, 6, 1), "Wijkteam Charlois"),
        (date(2025, 7, 1), "WIJKTEAM CHARLOIS"),
        (date(2025, 8, 1), " Wijkteam\tCharlois "),
        (date(2025, 9, 1), "Vraagwijzer Feijenoord"),
    )
    assert evaluate(policy(HOPPING), history, as_of=AS_OF) == []
    [hit] = evaluate(
        policy(HOPPING), [*history, *visits((date(2025, 10, 1), "Bloemhof"))], as_of=AS_OF
    )
    assert dict(hit.evidence) == {
        "helpdesks": 3,
        "visits": 6,
        "since": "2025-03-15",
        "offices": ["Bloemhof", "Vraagwijzer Feijenoord", "Wijkteam Charlois"],
        "first_visits": ["2025-10-01", "2025-09-01", "2025-06-01"],
        "threshold": 3,
    }
    assert hit.explanation == (
        "As of 15 March 2026: visited 3 different helpdesks since 15 March 2025 "
        "(Bloemhof, Vraagwijzer Feijenoord and Wijkteam Charlois)."
    )


def test_visits_before_the_window_are_not_in_the_evidence() -> None:
    """The evidence counts and names only what happened since the window's first day, as its
    sentence says: an older visit, even at another office, is neither counted nor named."""
    in_window = visits(
        (date(2025, 4, 1), "Bloemhof"), (date(2025, 5, 1), "Carnisse"), (date(2025, 6, 1), "Zuid")
    )
    older = visits((date(2025, 3, 14), "Bloemhof"), (date(2024, 1, 2), "Hillesluis"))
    [hit] = evaluate(policy(HOPPING), [*older, *in_window], as_of=AS_OF)
    assert hit.evidence["visits"] == 3
    assert hit.evidence["offices"] == ["Bloemhof", "Carnisse", "Zuid"]
    assert hit.evidence["first_visits"] == ["2025-04-01", "2025-05-01", "2025-06-01"]


def test_offices_are_told_apart_casefolded_not_merely_lowercased() -> None:
    """``office_key`` casefolds: "Straße" and "STRASSE" are one office (lowercasing keeps "ß")."""
    history = visits(
        (date(2025, 6, 1), "Wijkteam Straße"),
        (date(2025, 7, 1), "WIJKTEAM STRASSE"),
        (date(2025, 8, 1), "Vraagwijzer Feijenoord"),
    )
    assert evaluate(policy(HOPPING), history, as_of=AS_OF) == []


def test_an_office_sent_composed_and_decomposed_is_one_helpdesk() -> None:
    composed = unicodedata.normalize("NFC", "Wijkteam Café Zuid")
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    history = visits(
        (date(2025, 6, 1), decomposed),
        (date(2025, 7, 1), composed),
        (date(2025, 8, 1), "Vraagwijzer Feijenoord"),
    )
    assert evaluate(policy(HOPPING), history, as_of=AS_OF) == []
    [hit] = evaluate(
        policy(HOPPING), [*history, *visits((date(2025, 9, 1), "Bloemhof"))], as_of=AS_OF
    )
    assert hit.evidence["helpdesks"] == 3
    assert hit.evidence["offices"] == ["Bloemhof", "Vraagwijzer Feijenoord", decomposed]


def test_desk_hopping_counts_only_helpdesk_visits() -> None:
    history = [
        event("welfare_start", date(2025, 6, 1), "A"),
        event("employment_end", date(2025, 7, 1), "B"),
        *visits((date(2025, 8, 1), "C"), (date(2025, 9, 1), "D")),
    ]
    assert evaluate(policy(HOPPING), history, as_of=AS_OF) == []


# ---- long welfare without contact


def test_long_welfare_fires_at_exactly_m_months_without_contact_for_k_months() -> None:
    history = [
        event("welfare_start", date(2024, 3, 15)),
        *visits((date(2025, 3, 14), "Bloemhof")),
    ]
    [hit] = evaluate(policy(LONG), history, as_of=AS_OF)
    assert dict(hit.evidence) == {
        "on_welfare_since": "2024-03-15",
        "months_on_welfare": 24,
        "last_helpdesk_visit": "2025-03-14",
        "no_contact_since": "2025-03-15",
        "threshold_months": 24,
        "no_contact_months": 12,
    }
    assert hit.explanation == (
        "As of 15 March 2026: on welfare since 2024-03 (24 months) and no helpdesk visit in the "
        "last 12 months (last visit 2025-03-14)."
    )


def test_long_welfare_does_not_fire_one_day_short_of_m_months() -> None:
    history = [event("welfare_start", date(2024, 3, 16))]
    assert evaluate(policy(LONG), history, as_of=AS_OF) == []


def test_a_visit_on_the_first_day_of_the_no_contact_window_is_contact() -> None:
    history = [
        event("welfare_start", date(2020, 1, 1)),
        *visits((date(2025, 3, 15), "Bloemhof")),
    ]
    assert evaluate(policy(LONG), history, as_of=AS_OF) == []


def test_the_latest_visit_decides_contact_however_many_came_before() -> None:
    old_visits = visits((date(2021, 1, 4), "Bloemhof"), (date(2024, 12, 2), "Carnisse"))
    history = [event("welfare_start", date(2020, 1, 1)), *old_visits]
    [hit] = evaluate(policy(LONG), history, as_of=AS_OF)
    assert hit.evidence["last_helpdesk_visit"] == "2024-12-02"
    assert hit.explanation.endswith("(last visit 2024-12-02).")
    recent = [*history, *visits((date(2025, 6, 2), "Bloemhof"))]
    assert evaluate(policy(LONG), recent, as_of=AS_OF) == []


def test_long_welfare_needs_the_spell_to_be_ongoing() -> None:
    ended = [event("welfare_start", date(2020, 1, 1)), event("welfare_end", date(2026, 3, 1))]
    assert evaluate(policy(LONG), ended, as_of=AS_OF) == []
    restarted = [*ended, event("welfare_start", date(2026, 3, 10))]
    assert evaluate(policy(LONG), restarted, as_of=AS_OF) == []


def test_welfare_ending_and_starting_on_one_day_is_one_unbroken_spell() -> None:
    moved_desks = [
        event("welfare_start", date(2020, 1, 1), "Werkplein Zuid"),
        event("welfare_end", date(2025, 1, 1), "Werkplein Zuid"),
        event("welfare_start", date(2025, 1, 1), "Werkplein Noord"),
    ]
    [hit] = evaluate(policy(LONG), list(reversed(moved_desks)), as_of=AS_OF)
    assert hit.evidence["on_welfare_since"] == "2020-01-01"
    assert hit.evidence["months_on_welfare"] == 74
    a_day_off = [*moved_desks[:2], event("welfare_start", date(2025, 1, 2), "Werkplein Noord")]
    assert evaluate(policy(LONG), a_day_off, as_of=AS_OF) == []


def test_a_start_and_an_end_on_one_day_off_welfare_are_a_one_day_spell() -> None:
    """Endings sort first on a day, so the end of a one-day spell is read before its start: it
    must still close that spell, never leave one going on that the explanation would claim."""
    one_day = [event("welfare_start", date(2021, 6, 1)), event("welfare_end", date(2021, 6, 1))]
    assert evaluate(policy(LONG), one_day, as_of=AS_OF) == []
    after_a_spell = [
        event("welfare_start", date(2019, 1, 1)),
        event("welfare_end", date(2020, 1, 1)),
        *one_day,
    ]
    assert evaluate(policy(LONG), after_a_spell, as_of=AS_OF) == []
    # After a job it is still a return to welfare, and what follows is read as before.
    after_a_job = [
        event("welfare_start", date(2019, 1, 1)),
        event("welfare_end", date(2020, 1, 1)),
        event("employment_end", date(2021, 3, 31)),
        *one_day,
    ]
    assert returns(after_a_job) == ["2021-06-01"]
    again = [*after_a_job, event("welfare_start", date(2022, 1, 3))]
    [hit] = evaluate(policy(LONG), again, as_of=AS_OF)
    assert hit.evidence["on_welfare_since"] == "2022-01-03"


def test_a_spell_end_reported_twice_is_one_end() -> None:
    """A second source reporting the end of the spell at that office: on a desk move that day
    the spell still carries on (never a one-day spell, an end of welfare or a return)."""
    moved_desks = [
        event("welfare_start", date(2020, 1, 1), "Werkplein Zuid"),
        event("employment_start", date(2023, 1, 1)),
        event("employment_end", date(2024, 2, 29)),
        event("welfare_end", date(2024, 3, 1), "Werkplein Zuid"),
        event("welfare_start", date(2024, 3, 1), "Werkplein Noord"),
    ]
    reported_twice = [*moved_desks, event("welfare_end", date(2024, 3, 1), "werkplein  zuid")]
    for history in (moved_desks, reported_twice):
        [hit] = evaluate(policy(LONG), history, as_of=AS_OF)
        assert hit.evidence["on_welfare_since"] == "2020-01-01"
        assert "on welfare since 2020-01 (74 months)" in hit.explanation
        assert returns(history) == []
    # The end alone, reported twice, still ends the spell.
    ended = [*reported_twice[:4], reported_twice[5]]
    assert evaluate(policy(LONG), ended, as_of=AS_OF) == []
    # Where the records begin with that end, a start at another office is still a desk move.
    at_the_start = [reported_twice[3], reported_twice[5], reported_twice[4]]
    [hit] = evaluate(policy(LONG), at_the_start, as_of=AS_OF)
    assert hit.evidence["on_welfare_since"] == "2024-03-01"
    # An end at the office the person moved to that day is that new spell's end: over.
    then_ended = [*moved_desks, event("welfare_end", date(2024, 3, 1), "Werkplein Noord")]
    assert evaluate(policy(LONG), then_ended, as_of=AS_OF) == []


welfare_day = st.tuples(
    st.sampled_from(["welfare_start", "welfare_end", "employment_end", "employment_start"]),
    st.sampled_from([date(2020, 1, 6), date(2023, 6, 1), date(2024, 3, 1)]),
    st.sampled_from(["Zuid", "Noord", "zuid "]),
)


@given(st.lists(welfare_day, max_size=12), st.randoms(use_true_random=False))
def test_the_order_of_one_day_s_welfare_events_never_changes_the_outcome(
    raw: list[tuple[str, date, str]], shuffler: random.Random
) -> None:
    """Three days, so most histories hold several ends and starts on one day, in any order (the
    database hands rows of one subject and day back in no set order)."""
    history = [event(kind, day, office) for kind, day, office in raw]
    shuffled = list(history)
    shuffler.shuffle(shuffled)
    everything = policy(EVERY_RETURN, LONG)
    assert evaluate(everything, history, as_of=AS_OF) == evaluate(everything, shuffled, as_of=AS_OF)


def test_a_desk_move_where_the_records_begin_is_still_welfare() -> None:
    """The records begin inside a spell that ends at one office and goes on at another on the
    same day: a desk move, not a one-day spell (at the same office it would be one)."""
    moved = [
        event("welfare_end", date(2021, 6, 1), "Werkplein Zuid"),
        event("welfare_start", date(2021, 6, 1), "Werkplein Noord"),
    ]
    [hit] = evaluate(policy(LONG), moved, as_of=AS_OF)
    assert hit.evidence["on_welfare_since"] == "2021-06-01"
    same_office = [
        event("welfare_end", date(2021, 6, 1), "Werkplein Zuid"),
        event("welfare_start", date(2021, 6, 1), "werkplein  zuid"),
    ]
    assert evaluate(policy(LONG), same_office, as_of=AS_OF) == []


def test_long_welfare_says_one_month_in_the_singular() -> None:
    short = LongWelfareWithoutContactRule(
        id="short", description="short test", min_welfare_months=1, no_contact_months=1
    )
    [hit] = evaluate(policy(short), [event("welfare_start", date(2026, 2, 10))], as_of=AS_OF)
    assert hit.explanation == (
        "As of 15 March 2026: on welfare since 2026-02 (1 month) and no helpdesk visit in the "
        "last 1 month (no visit on record)."
    )


def test_long_welfare_names_the_day_its_months_are_counted_to() -> None:
    """A run may be made as of a past day, and a professional reads the flag to the person long
    after it: "no helpdesk visit in the last 12 months" must say which day those months end on,
    or a visit since (which the run rightly did not see) makes the sentence read aloud untrue."""
    history = [
        event("welfare_start", date(2024, 3, 15)),
        *visits((date(2026, 3, 16), "Bloemhof")),
    ]
    [hit] = evaluate(policy(LONG), history, as_of=AS_OF)
    assert hit.evidence["last_helpdesk_visit"] is None
    assert hit.explanation == (
        "As of 15 March 2026: on welfare since 2024-03 (24 months) and no helpdesk visit in the "
        "last 12 months (no visit on record)."
    )


def test_long_welfare_without_any_visit_says_so() -> None:
    [hit] = evaluate(policy(LONG), [event("welfare_start", date(2020, 1, 1))], as_of=AS_OF)
    assert hit.evidence["last_helpdesk_visit"] is None
    assert hit.explanation.endswith("(no visit on record).")


def test_hits_come_in_policy_order() -> None:
    history = [
        *relapses(
            (date(2024, 6, 30), date(2024, 7, 1)),
            (date(2025, 1, 31), date(2025, 2, 3)),
            (date(2025, 9, 30), date(2025, 10, 1)),
        ),
        *visits((date(2025, 4, 1), "A"), (date(2025, 5, 1), "B"), (date(2025, 6, 1), "C")),
    ]
    hits = evaluate(policy(HOPPING, RELAPSE, LONG), history, as_of=AS_OF)
    assert [h.rule_id for h in hits] == ["hop", "relapse"]


# ---- calendar arithmetic and general properties


def test_months_before_clamps_to_the_end_of_a_shorter_month() -> None:
    assert months_before(date(2026, 3, 31), 1) == date(2026, 2, 28)
    assert months_before(date(2024, 3, 31), 1) == date(2024, 2, 29)
    assert months_before(date(2026, 1, 15), 13) == date(2024, 12, 15)


def test_months_before_stops_at_the_first_day_there_is() -> None:
    assert months_before(date(2, 1, 1), 24) == date.min
    assert months_before(date(2, 1, 1), 12) == date(1, 1, 1)


@given(st.dates(min_value=date(1950, 1, 1)), st.integers(min_value=0, max_value=600))
def test_whole_months_between_inverts_months_before(day: date, months: int) -> None:
    assert whole_months_between(months_before(day, months), day) == months


event_strategy = st.tuples(
    st.sampled_from(EVENT_TYPES),
    st.dates(min_value=date(2015, 1, 1), max_value=date(2027, 1, 1)),
    st.sampled_from(["A", "B", "C", "D", "E", "a", " b  "]),
)


@given(st.lists(event_strategy, max_size=30), st.randoms(use_true_random=False))
def test_evaluation_is_independent_of_input_order_and_evidence_meets_thresholds(
    raw: list[tuple[str, date, str]], shuffler: random.Random
) -> None:
    history = [event(kind, day, office) for kind, day, office in raw]
    shuffled = list(history)
    shuffler.shuffle(shuffled)
    everything = policy(RELAPSE, HOPPING, LONG)
    hits = evaluate(everything, history, as_of=AS_OF)
    assert hits == evaluate(everything, shuffled, as_of=AS_OF)
    for hit in hits:
        if hit.rule_type == "relapse":
            assert hit.evidence["returns"] >= RELAPSE.min_returns
            for left, job, back in zip(
                hit.evidence["welfare_ended"],
                hit.evidence["jobs_ended"],
                hit.evidence["welfare_started"],
                strict=True,
            ):
                assert left <= job <= back
                assert left < back
            jobs = hit.evidence["jobs_ended"]
            assert len(set(jobs)) == len(jobs), "each job end backs one return at most"
        elif hit.rule_type == "desk_hopping":
            assert hit.evidence["helpdesks"] >= HOPPING.min_helpdesks
        else:
            assert hit.evidence["months_on_welfare"] >= LONG.min_welfare_months
        assert hit.explanation.endswith(".")
