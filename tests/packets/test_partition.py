"""Pure partitioning: examples and Hypothesis properties."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.config import PROJECT_ROOT
from service.packets.partition import (
    ALREADY_IN_OPEN_PACKET,
    DUPLICATE_CASE,
    MAX_PACKET_SIZE,
    Case,
    Partition,
    PlannedPacket,
    Professional,
    UnplacedCase,
    no_capacity,
    no_professional,
    partition,
)
from service.packets.policy import (
    PacketsPolicyError,
    load_partitioning_policy,
    load_retention_policy,
)


def cases(district: str, count: int, prefix: str = "p") -> list[Case]:
    return [Case(f"{prefix}{i:03d}", district) for i in range(count)]


def test_cases_are_cut_into_packets_of_at_most_packet_size_per_district() -> None:
    team = [Professional("anna", frozenset({"Feijenoord"}), capacity=100)]
    result = partition(cases("Feijenoord", 45), team, packet_size=20)
    assert [len(p.pseudonyms) for p in result.packets] == [20, 20, 5]
    assert {p.professional_id for p in result.packets} == {"anna"}
    assert result.unplaced == ()


def test_only_active_professionals_serving_the_district_get_cases() -> None:
    team = [
        Professional("anna", frozenset({"Charlois"}), capacity=100),
        Professional("bram", frozenset({"Feijenoord"}), capacity=100, active=False),
    ]
    result = partition(cases("Feijenoord", 3), team, packet_size=20)
    assert result.packets == ()
    assert {u.reason for u in result.unplaced} == {no_professional("Feijenoord")}
    assert len(result.unplaced) == 3


def test_capacity_counts_open_load_and_the_rest_is_returned_with_a_reason() -> None:
    team = [Professional("anna", frozenset({"Charlois"}), capacity=10, open_load=7)]
    result = partition(cases("Charlois", 5), team, packet_size=20)
    assert [len(p.pseudonyms) for p in result.packets] == [3]
    assert [u.pseudonym for u in result.unplaced] == ["p003", "p004"]
    assert {u.reason for u in result.unplaced} == {no_capacity("Charlois")}


def test_a_returning_client_goes_to_their_previous_professional_when_there_is_room() -> None:
    team = [
        Professional("anna", frozenset({"Charlois"}), capacity=50),
        Professional("bram", frozenset({"Charlois"}), capacity=2),
    ]
    returning = [
        Case("x1", "Charlois", previous_professional="bram"),
        Case("x2", "Charlois", previous_professional="bram"),
        Case("x3", "Charlois", previous_professional="bram"),
    ]
    result = partition(returning, team, packet_size=20)
    assert result.packets == (
        PlannedPacket("anna", "Charlois", ("x3",)),
        PlannedPacket("bram", "Charlois", ("x1", "x2")),
    )


def test_cases_already_in_an_open_packet_and_duplicates_are_not_placed_again() -> None:
    team = [Professional("anna", frozenset({"Charlois"}), capacity=50)]
    given_cases = [
        Case("a", "Charlois", in_open_packet=True),
        Case("b", "Charlois"),
        Case("b", "Charlois"),
    ]
    result = partition(given_cases, team, packet_size=20)
    assert result == Partition(
        packets=(PlannedPacket("anna", "Charlois", ("b",)),),
        unplaced=(
            UnplacedCase("a", "Charlois", ALREADY_IN_OPEN_PACKET),
            UnplacedCase("b", "Charlois", DUPLICATE_CASE),
        ),
    )


def test_work_is_spread_to_whoever_has_most_room() -> None:
    team = [
        Professional("anna", frozenset({"Charlois"}), capacity=25),
        Professional("bram", frozenset({"Charlois"}), capacity=40),
    ]
    result = partition(cases("Charlois", 40), team, packet_size=20)
    loads = Counter({p.professional_id: 0 for p in result.packets})
    for packet in result.packets:
        loads[packet.professional_id] += len(packet.pseudonyms)
    assert loads == {"bram": 20, "anna": 20}


def test_who_gets_which_case_and_which_stay_unplaced_does_not_follow_the_input_order() -> None:
    """Cases are dealt in pseudonym order, so the input order changes nothing: the first two go to
    the professional with most room, the next to the other, the last finds no room."""
    team = [
        Professional("anna", frozenset({"Charlois"}), capacity=2),
        Professional("bram", frozenset({"Charlois"}), capacity=1),
    ]
    expected = Partition(
        packets=(
            PlannedPacket("anna", "Charlois", ("p000", "p001")),
            PlannedPacket("bram", "Charlois", ("p002",)),
        ),
        unplaced=(UnplacedCase("p003", "Charlois", no_capacity("Charlois")),),
    )
    in_order = cases("Charlois", 4)
    assert partition(in_order, team, packet_size=20) == expected
    assert partition(in_order[::-1], team[::-1], packet_size=20) == expected


@pytest.mark.parametrize("size", [0, 21])
def test_packet_size_out_of_range_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match="packet_size"):
        partition([], [], packet_size=size)


def test_shipped_policies_load() -> None:
    assert (
        load_partitioning_policy(PROJECT_ROOT / "policies" / "partitioning.yaml").packet_size == 20
    )
    retention = load_retention_policy(PROJECT_ROOT / "policies" / "retention.yaml")
    assert retention.packet_ttl_days > 0
    assert retention.idempotency_days == 7


def test_a_retention_policy_may_leave_out_idempotency_days_but_not_give_a_bad_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "retention.yaml"
    path.write_text("version: 1\npacket_ttl_days: 90\nclosed_grace_days: 30\n")
    assert load_retention_policy(path).idempotency_days == 7
    for bad in ("0", "366", "seven"):
        path.write_text(
            f"version: 1\npacket_ttl_days: 90\nclosed_grace_days: 30\nidempotency_days: {bad}\n"
        )
        with pytest.raises(PacketsPolicyError, match="'idempotency_days' must be a whole number"):
            load_retention_policy(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "version: 1\npacket_ttl_days: 0\nclosed_grace_days: 30\n",
            "'packet_ttl_days' must be a whole number from 1 to 3650",
        ),
        (
            "version: 1\npacket_ttl_days: 90\nclosed_grace_days: -1\n",
            "'closed_grace_days' must be a whole number from 0 to 3650",
        ),
        (
            "version: 1\npacket_ttl_days: true\nclosed_grace_days: 30\n",
            "'packet_ttl_days' must be a whole number from 1 to 3650",
        ),
        (
            "version: 1\npacket_ttl_days: 90\nclosed_grace_days: 30\npacket_ttl: 7\n",
            "unknown keys ['packet_ttl']",
        ),
    ],
)
def test_a_bad_retention_policy_fails_to_load_naming_the_file_and_key(
    tmp_path: Path, text: str, message: str
) -> None:
    """A misspelled key would leave packets open for the default; a zero TTL or a negative grace
    would shred at once; YAML's true would pass for 1."""
    path = tmp_path / "retention.yaml"
    path.write_text(text)
    with pytest.raises(PacketsPolicyError) as caught:
        load_retention_policy(path)
    assert str(caught.value) == f"{path}: {message}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: 1\npacket_size: true\n", "'packet_size' must be a whole number"),
        ("version: 1\npacket_size: 0\n", "'packet_size' must be a whole number"),
        ("version: 1\npackets_size: 10\n", "unknown keys ['packets_size']"),
    ],
)
def test_a_bad_partitioning_policy_fails_to_load(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "partitioning.yaml"
    path.write_text(text)
    with pytest.raises(PacketsPolicyError) as caught:
        load_partitioning_policy(path)
    assert str(caught.value).startswith(f"{path}: {message}")


def test_a_professional_listed_twice_is_refused() -> None:
    """Two entries for one id would each get that professional's room: twice the capacity."""
    twice = [
        Professional("anna", frozenset({"Charlois"}), capacity=20),
        Professional("anna", frozenset({"Charlois"}), capacity=20),
    ]
    with pytest.raises(ValueError, match="professional ids must be unique"):
        partition(cases("Charlois", 30), twice, packet_size=20)


def test_a_packet_size_above_twenty_fails_to_load(tmp_path: Path) -> None:
    path = tmp_path / "partitioning.yaml"
    path.write_text("version: 1\npacket_size: 21\n")
    with pytest.raises(PacketsPolicyError, match="above the limit of 20"):
        load_partitioning_policy(path)
    path.write_text("version: 1\n")
    assert load_partitioning_policy(path).packet_size == 20


# ---- properties

DISTRICTS = ["Charlois", "Feijenoord", "IJsselmonde"]
PROFESSIONAL_IDS = ["p1", "p2", "p3", "p4"]

case_strategy = st.builds(
    Case,
    pseudonym=st.text("abcdef", min_size=1, max_size=3),
    district=st.sampled_from(DISTRICTS),
    previous_professional=st.none() | st.sampled_from([*PROFESSIONAL_IDS, "gone"]),
    in_open_packet=st.booleans(),
)
professional_strategy = st.builds(
    Professional,
    id=st.sampled_from(PROFESSIONAL_IDS),
    districts=st.frozensets(st.sampled_from(DISTRICTS), max_size=3),
    capacity=st.integers(min_value=0, max_value=60),
    open_load=st.integers(min_value=0, max_value=70),
    active=st.booleans(),
)
teams = st.lists(professional_strategy, max_size=4, unique_by=lambda p: p.id)


@settings(max_examples=300)
@given(
    st.lists(case_strategy, max_size=120),
    teams,
    st.integers(min_value=1, max_value=MAX_PACKET_SIZE),
)
def test_no_case_is_lost_or_duplicated_and_limits_hold(
    given_cases: list[Case], team: list[Professional], packet_size: int
) -> None:
    result = partition(given_cases, team, packet_size=packet_size)
    placed = [p for packet in result.packets for p in packet.pseudonyms]
    out = Counter(placed) + Counter(u.pseudonym for u in result.unplaced)
    assert out == Counter(c.pseudonym for c in given_cases)
    assert len(placed) == len(set(placed))

    by_id = {p.id: p for p in team}
    load: Counter[str] = Counter()
    district_of: dict[str, set[str]] = {}
    for c in given_cases:
        district_of.setdefault(c.pseudonym, set()).add(c.district)
    open_already = {c.pseudonym for c in given_cases if c.in_open_packet}
    for packet in result.packets:
        assert 1 <= len(packet.pseudonyms) <= packet_size
        professional = by_id[packet.professional_id]
        assert professional.active
        assert packet.district in professional.districts
        assert all(packet.district in district_of[p] for p in packet.pseudonyms)
        load[packet.professional_id] += len(packet.pseudonyms)
    for professional_id, count in load.items():
        assert count <= by_id[professional_id].room
    always_open = {
        p for p in open_already if all(c.in_open_packet for c in given_cases if c.pseudonym == p)
    }
    assert always_open.isdisjoint(placed)


@settings(max_examples=200)
@given(
    st.lists(case_strategy, max_size=80),
    teams,
    st.integers(min_value=1, max_value=MAX_PACKET_SIZE),
    st.randoms(),
)
def test_same_input_in_any_order_gives_the_same_packets(
    given_cases: list[Case], team: list[Professional], packet_size: int, rng: random.Random
) -> None:
    shuffled_cases, shuffled_team = list(given_cases), list(team)
    rng.shuffle(shuffled_cases)
    rng.shuffle(shuffled_team)
    assert partition(given_cases, team, packet_size=packet_size) == partition(
        shuffled_cases, shuffled_team, packet_size=packet_size
    )
    assert partition(given_cases, team, packet_size=packet_size) == partition(
        given_cases, team, packet_size=packet_size
    )


@given(st.lists(case_strategy, max_size=60), teams)
def test_returning_clients_stay_with_their_professional_when_room_allows(
    given_cases: list[Case], team: list[Professional]
) -> None:
    result = partition(given_cases, team, packet_size=20)
    owner = {p: packet.professional_id for packet in result.packets for p in packet.pseudonyms}
    by_id = {p.id: p for p in team}
    for case in given_cases:
        before = by_id.get(case.previous_professional or "")
        if case.pseudonym in owner and before is not None and owner[case.pseudonym] != before.id:
            # Only allowed when the previous professional could not take them.
            assert (
                not before.active
                or case.district not in before.districts
                or sum(1 for o in owner.values() if o == before.id) >= before.room
                or len([c for c in given_cases if c.pseudonym == case.pseudonym]) > 1
            )
