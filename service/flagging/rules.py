"""Pure rule evaluation: a flagging policy and one subject's event history → rule hits.

Guarantees:
- no database, clock, settings or file access: the caller passes the policy, the events and the
  ``as_of`` date, so the same input always gives the same hits;
- a rule reads only the event types its policy declares under ``uses`` (checked when the policy
  is loaded, see ``service.flagging.policy``); protected attributes never reach this module;
- every hit carries its evidence (the dates and counts that made it fire) and one sentence a
  professional can read aloud to the person concerned;
- events dated after ``as_of`` are ignored, so a run can be replayed for any past date.

Windows: "within M months" means on or after ``as_of`` moved back M calendar months (a day past the
end of a shorter month is clamped to its last day), up to and including ``as_of``.

The hot path works on plain tuples ``(type, ordinal day, office)`` so a million histories evaluate
in seconds; :func:`event` builds one from a ``date``.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Final, Literal, NamedTuple

EventType = Literal[
    "welfare_start",
    "welfare_end",
    "employment_start",
    "employment_end",
    "jobseeker_registered",
    "jobseeker_deregistered",
    "helpdesk_visit",
]
EVENT_TYPES: Final = (
    "welfare_start",
    "welfare_end",
    "employment_start",
    "employment_end",
    "jobseeker_registered",
    "jobseeker_deregistered",
    "helpdesk_visit",
)
# Order of events on the same day: endings first. A job that ends on the day welfare starts ended
# before it, so that start can be a return after work; a job that starts on the day another ended
# leaves the person in work; a welfare spell that ends on the day another starts (the person moved
# desks) is read as one unbroken spell. Off welfare, a start and an end on one day are a one-day
# spell: its end, sorted first, is paired with the start after it (unless the records begin with
# that end and the start is at another office: a desk move of a spell older than the records).
SAME_DAY_ORDER: Final[Mapping[str, int]] = {
    "welfare_end": 0,
    "employment_end": 1,
    "jobseeker_deregistered": 2,
    "employment_start": 3,
    "jobseeker_registered": 4,
    "helpdesk_visit": 5,
    "welfare_start": 6,
}

# The version of this module's evaluation, stored in every flag after the policy file's hash
# (see ``service.flagging.policy.policy_version``). Bump it with any change to what a policy and a
# history produce here (which events count, the evidence, the sentences), so flags made by
# different code never share a version. 1 was the evaluator before its version was recorded; 2
# reads relapse as a return after leaving welfare for work, keeps a same-day welfare move one
# spell, names the window's first day and counts office spellings as one. 3 reads a start and an
# end on one day while off welfare as a one-day spell (2 read it as a spell still going on),
# except a desk move where the records begin. 4 lets each job end back one return at most (3
# counted a one-day spell's job again for the next start, and that day's start reported by a
# second desk as a second return). 5 reads a welfare end at one office reported twice on a day
# as one end (4 read the second as a one-day spell's end, so a desk move that day ended the
# spell, or made a return), and says "1 month" where 4 said "1 months". 6 tells offices apart
# after NFC normalization (5 counted "Café" written with a combining accent and with "é" as two).
# 7 counts no return for a spell that moved desks and ended on one day, both desks reporting
# the end (6 read the second end and the start as a one-day spell, and a return if a job ended
# that day, though welfare never stopped). 8 dates the long welfare sentence ("As of 15 March
# 2026: ..."): 7 said "no helpdesk visit in the last 12 months" without the day those months end
# on, untrue when read to the person after a visit the run did not see; so do the relapse and
# desk hopping sentences, whose counts a later return or visit made untrue.
EVALUATOR_VERSION: Final = 8

SubjectEvent = tuple[str, int, str]
"""``(event type, date.toordinal(), office)``: one event in the evaluation hot path."""

RuleType = Literal["relapse", "desk_hopping", "long_welfare_without_contact"]

MONTHS: Final = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)


def event(type_: str, day: date, office: str = "") -> SubjectEvent:
    """One event as the evaluator takes it."""
    return (type_, day.toordinal(), office)


def months_before(day: date, months: int) -> date:
    """``day`` moved back ``months`` calendar months, clamped to the end of a shorter month (and
    to ``date.min`` when that lies before year 1)."""
    index = day.year * 12 + (day.month - 1) - months
    year, month = divmod(index, 12)
    month += 1
    if year < date.min.year:
        return date.min
    for candidate in (day.day, 30, 29, 28):
        try:
            return date(year, month, min(day.day, candidate))
        except ValueError:
            continue
    raise AssertionError("unreachable: every month has 28 days")  # pragma: no cover


def whole_months_between(start: date, end: date) -> int:
    """Completed calendar months from ``start`` to ``end`` (0 when ``end`` is earlier)."""
    months = (end.year - start.year) * 12 + end.month - start.month
    if months > 0 and months_before(end, months) < start:
        months -= 1
    return max(months, 0)


def office_key(office: str) -> str:
    """What tells one office from another: its name in Unicode's composed form (NFC), casefolded,
    with whitespace collapsed. Sources differ in how they encode an accent ("é" or "e" and a
    combining acute), never in which office they mean."""
    return " ".join(unicodedata.normalize("NFC", office).split()).casefold()


def _months(count: int) -> str:
    return "1 month" if count == 1 else f"{count} months"


def _month(day: int) -> str:
    return date.fromordinal(day).strftime("%Y-%m")


def _iso(day: int) -> str:
    return date.fromordinal(day).isoformat()


def _spoken_date(day: int) -> str:
    """The exact day, as said aloud: "15 March 2024" (the window's first day, never rounded)."""
    spoken = date.fromordinal(day)
    return f"{spoken.day} {MONTHS[spoken.month - 1]} {spoken.year}"


def _join(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


@dataclass(frozen=True)
class RelapseRule:
    """Came back to welfare after leaving it for work, at least ``min_returns`` times in the window.

    A return is a ``welfare_start`` on a day when, by the events up to it (same-day events in
    ``SAME_DAY_ORDER``), all of these hold:

    - the person is off welfare: a spell ended (``welfare_end``) on an earlier day and none has
      started since. So a first-ever ``welfare_start`` is no return, a start while on welfare is
      the same spell reported again, and a start on the day the spell ended continues it (moved
      desks), also when the desk it moved to reports an end that day too;
    - a job ended (``employment_end``) on or after the day that spell ended;
    - no job started (``employment_start``) after that job ended: someone who is in work when
      welfare starts did not come back after work. Employment events name no job, so the latest
      one decides whether the person is in work;
    - that job end backs no earlier return: each job end backs one return at most. So the start
      of a return reported again that day (by another desk) is no second return, and neither is
      a later start with no job ended since the return, even when the return was a one-day
      spell on the day the job ended.

    A ``welfare_end`` with no start on record still means the person left welfare (the spell
    began before the records did); another ``welfare_end`` while off welfare changes nothing. The
    return must fall in the window; the spell and the job may have ended before it.
    """

    id: str
    description: str
    min_returns: int
    within_months: int
    uses: tuple[str, ...] = (
        "welfare_start",
        "welfare_end",
        "employment_start",
        "employment_end",
        "office",
    )
    type: Literal["relapse"] = "relapse"


@dataclass(frozen=True)
class DeskHoppingRule:
    """Helpdesk visits at ``min_helpdesks`` or more different offices within ``within_months``.

    Offices are told apart by ``office_key``: case, runs of whitespace and how an accent is
    encoded do not matter, so "Wijkteam Charlois" and "wijkteam  charlois" are one office. The
    evidence and the sentence name each office once, as spelled at its first visit in the window
    (whitespace collapsed; of several spellings on that day, the one that sorts first).
    """

    id: str
    description: str
    min_helpdesks: int
    within_months: int
    uses: tuple[str, ...] = ("helpdesk_visit", "office")
    type: Literal["desk_hopping"] = "desk_hopping"


@dataclass(frozen=True)
class LongWelfareWithoutContactRule:
    """On welfare for ``min_welfare_months`` or more, no helpdesk visit in ``no_contact_months``.

    "On welfare" means the latest welfare spell started and has not ended by ``as_of``; the spell
    is measured from its first ``welfare_start`` (a repeated start by another source does not reset
    it, and neither does a ``welfare_end`` followed by a ``welfare_start`` on the same day: the
    person moved desks without a day off welfare). A visit on the first day of the no-contact
    window counts as contact.
    """

    id: str
    description: str
    min_welfare_months: int
    no_contact_months: int
    uses: tuple[str, ...] = ("welfare_start", "welfare_end", "helpdesk_visit", "office")
    type: Literal["long_welfare_without_contact"] = "long_welfare_without_contact"


Rule = RelapseRule | DeskHoppingRule | LongWelfareWithoutContactRule

# What each rule type actually reads; a policy must declare at least these under ``uses``. Relapse
# and long welfare read ``office`` to tell a desk move where the records begin (a welfare end and
# a start at another office on one day) from a one-day spell (see ``SAME_DAY_ORDER``).
READS: Final[Mapping[str, frozenset[str]]] = {
    "relapse": frozenset(
        {"welfare_start", "welfare_end", "employment_start", "employment_end", "office"}
    ),
    "desk_hopping": frozenset({"helpdesk_visit", "office"}),
    "long_welfare_without_contact": frozenset(
        {"welfare_start", "welfare_end", "helpdesk_visit", "office"}
    ),
}


@dataclass(frozen=True)
class FlaggingPolicy:
    """A validated policy. ``version`` is what runs and flags store:
    ``<declared version>+<short hash of the file>/e<EVALUATOR_VERSION>``."""

    name: str
    declared_version: str
    version: str
    characteristics: tuple[str, ...]
    rules: tuple[Rule, ...]
    # The policy file's bytes as read: archived with the first run under ``version``.
    content: bytes = field(repr=False)


class WelfareReturn(NamedTuple):
    """One return to welfare (see ``RelapseRule``), as day numbers."""

    welfare_ended: int
    job_ended: int
    welfare_started: int


@dataclass(frozen=True)
class RuleHit:
    rule_id: str
    rule_type: str
    evidence: Mapping[str, Any] = field(hash=False)
    explanation: str

    def as_json(self) -> dict[str, Any]:
        return {
            "rule_id": self.rule_id,
            "rule_type": self.rule_type,
            "evidence": dict(self.evidence),
            "explanation": self.explanation,
        }


def explain(hits: Sequence[RuleHit]) -> str:
    """All hits' sentences, in policy order: the explanation stored with a flag."""
    return " ".join(hit.explanation for hit in hits)


class Evaluator:
    """A policy bound to an ``as_of`` date, with every window precomputed as a day number.

    ``evaluate`` is the hot path: one pass over the sorted history collects what any rule needs,
    then each rule decides with a few comparisons; evidence and sentences are built only for hits.
    """

    def __init__(self, policy: FlaggingPolicy, as_of: date) -> None:
        self.policy = policy
        self.as_of = as_of
        self._as_of = as_of.toordinal()
        self._checks: list[tuple[Rule, int, int]] = []
        for rule in policy.rules:
            if isinstance(rule, RelapseRule | DeskHoppingRule):
                start = months_before(as_of, rule.within_months).toordinal()
                self._checks.append((rule, start, 0))
            else:
                welfare_by = months_before(as_of, rule.min_welfare_months).toordinal()
                contact_from = months_before(as_of, rule.no_contact_months).toordinal()
                self._checks.append((rule, welfare_by, contact_from))

    def evaluate(self, events: Iterable[SubjectEvent]) -> list[RuleHit]:
        """Rule hits for one subject's events (any order), in policy order; [] if none fires."""
        ordered = sorted(events, key=_sort_key)
        return self.evaluate_sorted(ordered)

    def evaluate_sorted(self, events: Sequence[SubjectEvent]) -> list[RuleHit]:
        """As ``evaluate`` for events already sorted by day and ``SAME_DAY_ORDER``."""
        as_of = self._as_of
        returns: list[WelfareReturn] = []
        visits: list[tuple[int, str]] = []
        on_welfare_since = -1  # first day of the ongoing spell; -1 while off welfare
        left_welfare = -1  # last day of the latest spell that ended; -1 if none has
        spell_began = -1  # first day of that spell, which a start on its last day continues
        job_ended = -1  # the latest employment_end; -1 if a job started since or it backs a return
        # An end read while off welfare, and the latest spell's end before it: a start on that
        # same day makes the two a one-day spell (its end sorts first), not a spell going on.
        # Only where the records begin with that end is it also read as a desk move (a spell
        # from before the records, moving to another office that day): when the start's office
        # is another one.
        ended_off_welfare, left_before, ended_at = -1, -1, ""
        ended_day, ended_offices = -1, set[str]()  # the offices of the latest day's welfare ends
        for kind, day, office in events:
            if day > as_of:
                break
            if kind == "helpdesk_visit":
                visits.append((day, office))
            elif kind == "welfare_start" and on_welfare_since < 0:
                moved_desks = left_before < 0 and office_key(office) != ended_at
                if day == ended_off_welfare and not moved_desks:
                    # A spell that ended this same day moved to this desk and ended there too:
                    # welfare never stopped for a day, so there is no return (as for a start on
                    # the day the spell ended, below).
                    if 0 <= left_before <= job_ended and left_before < day:
                        returns.append(WelfareReturn(left_before, job_ended, day))
                        # Spent: the job ended before this one-day spell began, so without this
                        # the same start reported again, or the next spell, would count it again.
                        job_ended = -1
                    spell_began = left_welfare = day
                elif day == left_welfare:
                    on_welfare_since = spell_began
                else:
                    if 0 <= left_welfare <= job_ended:
                        returns.append(WelfareReturn(left_welfare, job_ended, day))
                        job_ended = -1  # spent: each job end backs one return at most
                    on_welfare_since = day
            elif kind == "welfare_end":
                # The same end at the same office read again that day (a second source reporting
                # it) is that end: as a one-day spell's end it would have a desk move that day
                # end the spell. Any other second end of a day is read as one, whatever the order.
                at = office_key(office)
                if day == ended_day and at in ended_offices:
                    continue
                if day != ended_day:
                    ended_day, ended_offices = day, set()
                ended_offices.add(at)
                if on_welfare_since >= 0:
                    spell_began, left_welfare = on_welfare_since, day
                    on_welfare_since = -1
                else:
                    ended_off_welfare, left_before, ended_at = day, left_welfare, at
                    if left_welfare < 0:  # the spell began before the records did
                        spell_began = left_welfare = day
            elif kind == "employment_end":
                job_ended = day
            elif kind == "employment_start":
                job_ended = -1

        hits: list[RuleHit] = []
        for rule, first, second in self._checks:
            if isinstance(rule, RelapseRule):
                if len(returns) >= rule.min_returns:
                    in_window = [r for r in returns if r.welfare_started >= first]
                    if len(in_window) >= rule.min_returns:
                        hits.append(_relapse_hit(rule, as_of, first, in_window))
            elif isinstance(rule, DeskHoppingRule):
                if len(visits) >= rule.min_helpdesks:
                    offices = {office_key(office) for day, office in visits if day >= first}
                    if len(offices) >= rule.min_helpdesks:
                        hits.append(_desk_hopping_hit(rule, as_of, first, visits))
            elif 0 <= on_welfare_since <= first:
                last_visit = visits[-1][0] if visits else -1
                if last_visit < second:
                    hits.append(
                        _long_welfare_hit(rule, as_of, on_welfare_since, last_visit, second)
                    )
        return hits


def _sort_key(item: SubjectEvent) -> tuple[int, int]:
    return (item[1], SAME_DAY_ORDER.get(item[0], 7))


def order_events(events: Iterable[SubjectEvent]) -> list[SubjectEvent]:
    """Events in the order ``Evaluator.evaluate_sorted`` expects."""
    return sorted(events, key=_sort_key)


def evaluate(
    policy: FlaggingPolicy, events: Iterable[SubjectEvent], *, as_of: date
) -> list[RuleHit]:
    """Rule hits for one subject (convenience form of ``Evaluator(policy, as_of).evaluate``)."""
    return Evaluator(policy, as_of).evaluate(events)


def _relapse_hit(
    rule: RelapseRule, as_of: int, since: int, returns: list[WelfareReturn]
) -> RuleHit:
    count = len(returns)
    jobs = _join([_month(r.job_ended) for r in returns])
    spoken_since = _spoken_date(since)
    if count == 1:
        sentence = (
            f"As of {_spoken_date(as_of)}: came back to welfare once since {spoken_since}, after "
            f"leaving it for work that then ended (a job ending {jobs})."
        )
    else:
        sentence = (
            f"As of {_spoken_date(as_of)}: came back to welfare {count} times since "
            f"{spoken_since}, each time after leaving it for work that then ended (jobs ending "
            f"{jobs})."
        )
    return RuleHit(
        rule_id=rule.id,
        rule_type=rule.type,
        evidence={
            "returns": count,
            "since": _iso(since),
            "welfare_ended": [_iso(r.welfare_ended) for r in returns],
            "jobs_ended": [_iso(r.job_ended) for r in returns],
            "welfare_started": [_iso(r.welfare_started) for r in returns],
            "threshold": rule.min_returns,
        },
        explanation=sentence,
    )


def _desk_hopping_hit(
    rule: DeskHoppingRule, as_of: int, since: int, visits: list[tuple[int, str]]
) -> RuleHit:
    first_visit: dict[str, tuple[int, str]] = {}  # office key -> (day, spelling) of its first visit
    for day, office in visits:
        if day >= since:
            key, seen = office_key(office), (day, " ".join(office.split()))
            if key not in first_visit or seen < first_visit[key]:
                first_visit[key] = seen
    keys = sorted(first_visit)
    offices = [first_visit[key][1] for key in keys]
    visit_count = sum(1 for day, _ in visits if day >= since)
    return RuleHit(
        rule_id=rule.id,
        rule_type=rule.type,
        evidence={
            "helpdesks": len(offices),
            "visits": visit_count,
            "since": _iso(since),
            "offices": offices,
            "first_visits": [_iso(first_visit[key][0]) for key in keys],
            "threshold": rule.min_helpdesks,
        },
        explanation=(
            f"As of {_spoken_date(as_of)}: visited {len(offices)} different helpdesks since "
            f"{_spoken_date(since)} ({_join(offices)})."
        ),
    )


def _long_welfare_hit(
    rule: LongWelfareWithoutContactRule,
    as_of: int,
    since: int,
    last_visit: int,
    contact_from: int,
) -> RuleHit:
    months = whole_months_between(date.fromordinal(since), date.fromordinal(as_of))
    contact = f"last visit {_iso(last_visit)}" if last_visit >= 0 else "no visit on record"
    return RuleHit(
        rule_id=rule.id,
        rule_type=rule.type,
        evidence={
            "on_welfare_since": _iso(since),
            "months_on_welfare": months,
            "last_helpdesk_visit": _iso(last_visit) if last_visit >= 0 else None,
            "no_contact_since": _iso(contact_from),
            "threshold_months": rule.min_welfare_months,
            "no_contact_months": rule.no_contact_months,
        },
        explanation=(
            f"As of {_spoken_date(as_of)}: on welfare since {_month(since)} ({_months(months)}) "
            f"and no helpdesk visit in the last {_months(rule.no_contact_months)} ({contact})."
        ),
    )
