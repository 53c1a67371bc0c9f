"""A synthetic, Rotterdam-South-like population for demos, tests and benchmarks.

Invariants: every person is invented (faker ``nl_NL`` names, synthetic BSNs that pass the
11-check, phone numbers and e-mail addresses on reserved patterns); the output depends only on
``seed`` and the subject count (fixed reference date, no clock), and BSNs are unique within one
population. Memory does not grow with the population: records are yielded one at a time.

Every history ends by ``REFERENCE_DATE``: flag a demo population as of that date. Then, in a
population of a few hundred or more, each rule of ``policies/flagging.yaml`` surfaces a minority
of it (relapse after short jobs, desk hopping across South, long welfare without contact).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any

from faker import Faker

from service.crypto.pseudonym import bsn_from_prefix

REFERENCE_DATE = date(2025, 10, 1)
MIN_SUBJECTS, MAX_SUBJECTS = 100, 1_000_000
NEIGHBOURHOODS: dict[str, tuple[str, ...]] = {
    "Feijenoord": ("Afrikaanderwijk", "Bloemhof", "Hillesluis", "Feijenoord", "Katendrecht"),
    "Charlois": ("Tarwewijk", "Carnisse", "Pendrecht", "Zuidwijk", "Oud-Charlois", "Wielewaal"),
    "IJsselmonde": ("Lombardijen", "Groot-IJsselmonde", "Beverwaard"),
}
POSTCODES = {"Feijenoord": (3071, 3076), "Charlois": (3081, 3086), "IJsselmonde": (3077, 3079)}
HELPDESKS = {
    "Feijenoord": ("Wijkteam Afrikaanderwijk", "Vraagwijzer Feijenoord", "Jongerenloket Zuid"),
    "Charlois": ("Wijkteam Tarwewijk", "Vraagwijzer Charlois", "Wijkteam Pendrecht"),
    "IJsselmonde": ("Vraagwijzer IJsselmonde", "Wijkteam Lombardijen", "Jongerenloket Zuid"),
}
SOUTH_HELPDESKS = tuple(sorted({desk for desks in HELPDESKS.values() for desk in desks}))
WELFARE_OFFICE = "Werk en Inkomen Rotterdam Zuid"
JOBSEEKER_OFFICE = "UWV Werkplein Rotterdam Zuid"
EMPLOYERS = ("Haven Logistiek BV", "Zorggroep Zuid", "Schoonmaak Rijnmond", "Bouwbedrijf Maas")
HOUSEHOLDS = ("single", "single_parent", "couple", "couple_with_children", "other")
_BSN_STRIDE = 7_654_321  # coprime with 10**7: index → distinct 7-digit BSN stem


def synthetic_bsn(index: int, seed: int) -> str:
    """A valid, unique-per-population BSN for person ``index`` (index < 10,000,000)."""
    stem = (index * _BSN_STRIDE + seed * 104_729 + 1) % 10**7
    for last in range(10):
        candidate = bsn_from_prefix(f"{stem:07d}{(last + index) % 10}")
        if candidate is not None:
            return candidate
    raise AssertionError("unreachable: one of ten digits always completes a BSN")


def _day(rng: random.Random, start: date, end: date) -> date:
    span = max((end - start).days, 0)
    return start + timedelta(days=rng.randint(0, span))


class _History:
    def __init__(self, rng: random.Random, prefix: str) -> None:
        self.rng = rng
        self.prefix = prefix
        self.events: list[dict[str, Any]] = []

    def add(self, kind: str, when: date, office: str) -> None:
        when = min(when, REFERENCE_DATE)
        self.events.append(
            {
                "type": kind,
                "date": when.isoformat(),
                "office": office,
                "source_event_id": f"{self.prefix}-{len(self.events)}",
            }
        )


def _history(
    rng: random.Random, prefix: str, district: str, birth: date, young: bool
) -> list[dict[str, Any]]:
    history = _History(rng, prefix)
    adult = (
        birth.replace(year=birth.year + 18)
        if birth.month != 2 or birth.day != 29
        else (date(birth.year + 18, 3, 1))
    )
    start = max(adult, date(2015, 1, 1))
    helpdesks = HELPDESKS[district]
    roll = rng.random()
    if young and roll < 0.7:
        # Welfare → work → welfare again, often at another helpdesk: the relapse pattern. One in
        # four keeps relapsing after short jobs, up to the reference date.
        keeps_relapsing = rng.random() < 0.25
        if keeps_relapsing:
            start = max(start, REFERENCE_DATE - timedelta(days=3 * 365))
        cycles, job_days, welfare_days = (
            ((3, 5), (30, 180), (30, 150)) if keeps_relapsing else ((1, 3), (60, 300), (120, 360))
        )
        when = _day(rng, start, start + timedelta(days=400))
        desk = rng.choice(helpdesks)
        history.add("helpdesk_visit", when, desk)
        history.add("welfare_start", when + timedelta(days=rng.randint(5, 40)), WELFARE_OFFICE)
        when += timedelta(days=rng.randint(90, 400))
        for _cycle in range(rng.randint(*cycles)):
            employer = rng.choice(EMPLOYERS)
            history.add("welfare_end", when, WELFARE_OFFICE)
            history.add("employment_start", when, employer)
            when += timedelta(days=rng.randint(*job_days))
            history.add("employment_end", when, employer)
            desk = rng.choice([d for d in helpdesks if d != desk])
            history.add("helpdesk_visit", when + timedelta(days=rng.randint(1, 30)), desk)
            history.add("welfare_start", when + timedelta(days=rng.randint(20, 60)), WELFARE_OFFICE)
            when += timedelta(days=rng.randint(*welfare_days))
            if when >= REFERENCE_DATE:
                break
    elif roll < 0.45:
        employer = rng.choice(EMPLOYERS)
        history.add("employment_start", _day(rng, start, date(2022, 1, 1)), employer)
        if rng.random() < 0.3:
            history.add("employment_end", _day(rng, date(2022, 1, 2), REFERENCE_DATE), employer)
    elif roll < 0.75:
        when = _day(rng, start, date(2021, 1, 1))
        history.add("welfare_start", when, WELFARE_OFFICE)
        for _visit in range(rng.randint(0, 3)):
            history.add("helpdesk_visit", _day(rng, when, REFERENCE_DATE), rng.choice(helpdesks))
    elif roll < 0.9:
        when = _day(rng, start, date(2024, 1, 1))
        history.add("jobseeker_registered", when, JOBSEEKER_OFFICE)
        when += timedelta(days=rng.randint(30, 500))
        history.add("jobseeker_deregistered", when, JOBSEEKER_OFFICE)
        history.add("employment_start", when, rng.choice(EMPLOYERS))
    else:
        # Debts: help sought at a helpdesk, then counselling there. Some first go from desk to desk
        # across South, in the year or so before the reference date.
        hops = rng.random() < 0.4
        if hops:
            desks = rng.sample(SOUTH_HELPDESKS, rng.randint(3, 5))
            when = max(start, REFERENCE_DATE - timedelta(days=rng.randint(180, 480)))
        else:
            desks = [rng.choice(helpdesks)]
            when = _day(rng, start, date(2024, 6, 1))
        for desk in desks[:-1]:
            history.add("helpdesk_visit", when, desk)
            when += timedelta(days=rng.randint(14, 90))
        history.add("helpdesk_visit", when, desks[-1])
        history.add("debt_counselling_start", when + timedelta(days=rng.randint(7, 60)), desks[-1])
    history.events.sort(key=lambda event: event["date"])
    return history.events


def demo_records(*, subjects: int, seed: int) -> Iterator[dict[str, Any]]:
    """Yield ``subjects`` ingest records (``SubjectRecordIn``-shaped dicts), deterministic."""
    if not MIN_SUBJECTS <= subjects <= MAX_SUBJECTS:
        raise ValueError(f"a demo population has {MIN_SUBJECTS} to {MAX_SUBJECTS} subjects")
    rng = random.Random(seed)  # noqa: S311 - synthetic data, not security
    fake = Faker("nl_NL")
    fake.seed_instance(seed)
    districts = tuple(NEIGHBOURHOODS)
    for index in range(subjects):
        district = rng.choices(districts, weights=(40, 40, 20))[0]
        young = rng.random() < 0.3
        age = rng.randint(18, 27) if young else rng.randint(28, 67)
        birth = _day(
            rng,
            date(REFERENCE_DATE.year - age - 1, REFERENCE_DATE.month, 2),
            date(REFERENCE_DATE.year - age, REFERENCE_DATE.month, 1),
        )
        given, family = fake.first_name(), fake.last_name()
        low, high = POSTCODES[district]
        letters = "".join(rng.choice("ABCDEGHJKLMNPRSTVWXZ") for _ in range(2))
        yield {
            "identity": {
                "bsn": synthetic_bsn(index, seed),
                "given_name": given,
                "family_name": family,
                "birth_date": birth.isoformat(),
                "street": f"{fake.street_name()} {rng.randint(1, 250)}",
                "postcode": f"{rng.randint(low, high)} {letters}",
                "city": "Rotterdam",
                "phone": f"06-{rng.randint(10_000_000, 99_999_999)}",
                "email": f"persoon{index}.{seed}@example.nl" if rng.random() < 0.6 else None,
            },
            "characteristics": {
                "district": district,
                "neighbourhood": rng.choice(NEIGHBOURHOODS[district]),
                "household_type": rng.choice(HOUSEHOLDS),
            },
            "events": _history(rng, f"demo-{seed}-{index}", district, birth, young),
        }
