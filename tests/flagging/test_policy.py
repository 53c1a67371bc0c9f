"""The flagging policy file: what loads, what is refused, and how its version is stamped."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from service.config import PROJECT_ROOT
from service.flagging import policy as policy_module
from service.flagging.policy import (
    FlaggingPolicyError,
    load_flagging_policy,
    parse_flagging_policy,
)
from service.flagging.rules import EVALUATOR_VERSION, DeskHoppingRule, RelapseRule

GOOD = """
name: test-policy
version: "2026.1"
characteristics:
  [welfare_start, welfare_end, employment_start, employment_end, helpdesk_visit, office]
rules:
  - id: relapse
    type: relapse
    description: Came back on welfare three times after a job ended.
    uses: [welfare_start, welfare_end, employment_start, employment_end, office]
    params: {min_returns: 3, within_months: 24}
  - id: hopping
    type: desk_hopping
    description: Visited four different helpdesks in a year.
    uses: [helpdesk_visit, office]
    params: {min_helpdesks: 4, within_months: 12}
"""


def test_the_shipped_policy_loads_with_its_hash_and_the_evaluator_in_the_version() -> None:
    path = PROJECT_ROOT / "policies" / "flagging.yaml"
    policy = load_flagging_policy(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert policy.declared_version == "2026.2"
    assert policy.version == f"2026.2+{digest}/e{EVALUATOR_VERSION}"
    assert {rule.type for rule in policy.rules} == {
        "relapse",
        "desk_hopping",
        "long_welfare_without_contact",
    }


def test_a_valid_policy_gives_typed_rules() -> None:
    policy = parse_flagging_policy(GOOD.encode())
    assert policy.name == "test-policy"
    assert policy.rules == (
        RelapseRule(
            id="relapse",
            description="Came back on welfare three times after a job ended.",
            min_returns=3,
            within_months=24,
            uses=("welfare_start", "welfare_end", "employment_start", "employment_end", "office"),
        ),
        DeskHoppingRule(
            id="hopping",
            description="Visited four different helpdesks in a year.",
            min_helpdesks=4,
            within_months=12,
            uses=("helpdesk_visit", "office"),
        ),
    )


def test_a_policy_without_rules_is_refused() -> None:
    empty = GOOD[: GOOD.index("rules:")] + "rules: []\n"
    with pytest.raises(FlaggingPolicyError) as caught:
        parse_flagging_policy(empty.encode(), source="flagging.yaml")
    assert str(caught.value) == "flagging.yaml: 'rules' must list at least one rule"


def test_a_description_is_stored_with_its_whitespace_collapsed() -> None:
    """A folded or wrapped description reads as one line in flags and the policy listing."""
    wrapped = GOOD.replace(
        "description: Visited four different helpdesks in a year.",
        'description: "Visited four   different\\n  helpdesks in a year."',
    )
    rules = parse_flagging_policy(wrapped.encode()).rules
    assert rules[1].description == "Visited four different helpdesks in a year."


def test_any_edit_changes_the_stored_version() -> None:
    first = parse_flagging_policy(GOOD.encode())
    second = parse_flagging_policy((GOOD + "# a comment\n").encode())
    assert first.declared_version == second.declared_version == "2026.1"
    assert first.version != second.version
    assert first.version.startswith("2026.1+")


def test_another_evaluator_gives_the_same_file_another_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    current = parse_flagging_policy(GOOD.encode())
    assert current.version.endswith(f"/e{EVALUATOR_VERSION}")
    monkeypatch.setattr(policy_module, "EVALUATOR_VERSION", EVALUATOR_VERSION + 1)
    later = parse_flagging_policy(GOOD.encode())
    assert later.version == current.version.replace(
        f"/e{EVALUATOR_VERSION}", f"/e{EVALUATOR_VERSION + 1}"
    )


SHAPE = "'version' may hold only letters, digits, '.', '_' and '-'"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "uses: [welfare_start, welfare_end, employment_start, employment_end, office]",
            "uses: [welfare_start, welfare_end, employment_start, employment_end, office, gender]",
            "'relapse'",
        ),
        (
            "params: {min_helpdesks: 4, within_months: 12}",
            "params: {min_helpdesks: 4, within_months: 12, nationality: NL}",
            "'hopping'",
        ),
        (
            "params: {min_returns: 3, within_months: 24}",
            "params: {min_returns: 3, within_months: 24, skip_if_language: nl}",
            "'relapse'",
        ),
        (
            "uses: [helpdesk_visit, office]",
            "uses: [helpdesk_visit, office, Gender]",
            "'hopping'",
        ),
    ],
)
def test_a_rule_referring_to_a_protected_attribute_fails_naming_the_rule(
    old: str, new: str, message: str
) -> None:
    with pytest.raises(FlaggingPolicyError, match="protected attribute") as caught:
        parse_flagging_policy(GOOD.replace(old, new).encode())
    assert f"rule {message}" in str(caught.value)


def test_protected_attribute_among_characteristics_fails() -> None:
    bad = GOOD.replace("office]", "office, religion]")
    with pytest.raises(FlaggingPolicyError, match="protected attribute religion"):
        parse_flagging_policy(bad.encode())


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("type: relapse", "type: zodiac", "rule 'relapse': unknown rule type 'zodiac'"),
        (
            "params: {min_returns: 3, within_months: 24}",
            "params: {min_returns: 3}",
            "rule 'relapse' is missing parameters ['within_months']",
        ),
        (
            "params: {min_returns: 3, within_months: 24}",
            "params: {min_returns: 3, within_months: 24, weight: 2}",
            "unknown parameters ['weight']",
        ),
        (
            "params: {min_returns: 3, within_months: 24}",
            "params: {min_returns: zero, within_months: 24}",
            "'min_returns' must be a whole number",
        ),
        (
            "uses: [helpdesk_visit, office]",
            "uses: [helpdesk_visit]",
            "a desk_hopping rule reads ['office']",
        ),
        (
            "uses: [helpdesk_visit, office]",
            "uses: [helpdesk_visit, office, jobseeker_registered]",
            "which the policy's 'characteristics' do not list",
        ),
        (
            "uses: [welfare_start, welfare_end, employment_start, employment_end, office]",
            "uses: [welfare_start, employment_end, office]",
            "a relapse rule reads ['employment_start', 'welfare_end']",
        ),
        (
            "params: {min_returns: 3, within_months: 24}",
            "params: {min_returns: 0, within_months: 24}",
            "rule 'relapse': parameter 'min_returns' must be a whole number from 1 to 600",
        ),
        (
            "params: {min_returns: 3, within_months: 24}",
            "params: {min_returns: 3, within_months: 601}",
            "rule 'relapse': parameter 'within_months' must be a whole number from 1 to 600",
        ),
        (
            "params: {min_returns: 3, within_months: 24}",
            "params: {min_returns: true, within_months: 24}",
            "rule 'relapse': parameter 'min_returns' must be a whole number from 1 to 600",
        ),
        (
            "params: {min_helpdesks: 4, within_months: 12}",
            "params: {min_helpdesks: 1, within_months: 12}",
            "rule 'hopping': 'min_helpdesks' must be at least 2",
        ),
        ("    description: Visited four different helpdesks in a year.\n", "", "description"),
        (
            "    params: {min_returns: 3, within_months: 24}\n",
            "    params: {min_returns: 3, within_months: 24}\n    enabled: false\n",
            "rule 'relapse': unknown keys ['enabled']",
        ),
        ("name: test-policy", "name: test-policy\nowner: team", "unknown keys ['owner']"),
        (
            "helpdesk_visit, office]\nrules:",
            "helpdesk_visit, office, income]\nrules:",
            "unknown characteristics ['income']",
        ),
        ("  - id: hopping", f"  - id: {'h' * 65}", "rule 2 needs an 'id' of lowercase letters"),
        (
            "description: Visited four different helpdesks in a year.",
            "description: Hopping.",
            "rule 'hopping' needs a plain-language 'description'",
        ),
        ("  - id: hopping", "  - id: relapse", "used twice"),
        ('version: "2026.1"', "", "'version' must be given"),
        ('version: "2026.1"', 'version: "   "', "'version' must be given"),
        ('version: "2026.1"', "version: 2026.1", "'version' must be text in quotes"),
        ("name: test-policy", f"name: {'n' * 129}", "'name' may have at most 128 characters"),
        *(
            ("name: test-policy", f"name: {shown}", "'name' must not contain control or format")
            for shown in (
                '"test\\0policy"',  # a NUL: PostgreSQL cannot store it, so every run fails
                '"test\\npolicy"',
                '"test\\e[31mpolicy"',
                '"test\\u202epolicy"',
            )
        ),
        ('version: "2026.1"', f'version: "{"9" * 41}"', "'version' may have at most 40 characters"),
        *(
            ('version: "2026.1"', f"version: {shown}", SHAPE)
            for shown in (
                '"2026.1/e9"',  # passes for another evaluator
                '"2026.1+3f9a0c1b2d4e"',  # passes for another file
                '"2026.1\\nforged: x"',  # a second line in the access log and the terminal
                '" 2026.1 "',
                '"2026.1\\u202e"',
                '"v 2"',
                '"2026.1é"',
            )
        ),
        (
            "params: {min_returns: 3, within_months: 24}",
            "params: {min_returns: 3, within_months: 024}",
            "flagging.yaml:11: within_months: 024 is not a plain decimal whole number",
        ),
        (
            "params: {min_returns: 3, within_months: 24}",
            "params: {min_returns: 3, within_months: 24, min_returns: 1}",
            "flagging.yaml:11: key 'min_returns' is given twice in one mapping (first on line 11)",
        ),
    ],
)
def test_bad_policy_files_fail_with_a_clear_message(old: str, new: str, message: str) -> None:
    bad = GOOD.replace(old, new)
    assert bad != GOOD
    with pytest.raises(FlaggingPolicyError) as caught:
        parse_flagging_policy(bad.encode(), source="flagging.yaml")
    assert message in str(caught.value)
    assert str(caught.value).startswith("flagging.yaml")


@pytest.mark.parametrize(
    ("rule_type", "reads", "params"),
    [
        (
            "relapse",
            "welfare_start, welfare_end, employment_start, employment_end",
            "{min_returns: 1, within_months: 24}",
        ),
        (
            "long_welfare_without_contact",
            "welfare_start, welfare_end, helpdesk_visit",
            "{min_welfare_months: 24, no_contact_months: 12}",
        ),
    ],
)
def test_a_rule_that_tells_a_desk_move_by_its_office_must_declare_office(
    rule_type: str, reads: str, params: str
) -> None:
    """Where the records begin, a welfare end and a start at another office on one day are a desk
    move, at the same office a one-day spell: these rules read ``office``, so they must say so."""
    without_office = f"""
name: no-office
version: "1"
characteristics: [{reads}, office]
rules:
  - id: rule
    type: {rule_type}
    description: A rule that leaves out what it reads.
    uses: [{reads}]
    params: {params}
"""
    with pytest.raises(FlaggingPolicyError) as caught:
        parse_flagging_policy(without_office.encode(), source="flagging.yaml")
    assert str(caught.value) == (
        f"flagging.yaml: rule 'rule': a {rule_type} rule reads ['office'], which its 'uses' does "
        "not list"
    )
    declared = without_office.replace(f"uses: [{reads}]", f"uses: [{reads}, office]")
    [rule] = parse_flagging_policy(declared.encode()).rules
    assert "office" in rule.uses


def test_a_second_rules_key_is_refused_instead_of_replacing_the_rules() -> None:
    second = GOOD + (
        "rules:\n"
        "  - id: only-rule\n"
        "    type: desk_hopping\n"
        "    description: Visited two helpdesks in a month.\n"
        "    uses: [helpdesk_visit, office]\n"
        "    params: {min_helpdesks: 2, within_months: 1}\n"
    )
    with pytest.raises(FlaggingPolicyError) as caught:
        parse_flagging_policy(second.encode(), source="flagging.yaml")
    assert str(caught.value).startswith(
        "flagging.yaml:17: key 'rules' is given twice in one mapping (first on line 6)"
    )


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "flagging.yaml"
    with pytest.raises(FlaggingPolicyError, match="cannot read"):
        load_flagging_policy(missing)


def test_an_alias_bomb_is_refused_at_its_first_anchor_before_anything_walks_it() -> None:
    """Nested aliases under a rule's params: each level holds ten of the level below."""
    levels = ["      l0: &l0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"      l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 10) + "]"
        for level in range(1, 5)
    ]
    params = "    params: {min_helpdesks: 4, within_months: 12}\n"
    assert params in GOOD
    bombed = GOOD.replace(
        params, "    params:\n" + "\n".join(levels) + "\n      min_helpdesks: 4\n"
    )
    line = bombed[: bombed.index("&l0")].count("\n") + 1
    with pytest.raises(FlaggingPolicyError) as caught:
        parse_flagging_policy(bombed.encode(), source="flagging.yaml")
    assert str(caught.value).startswith(
        f"flagging.yaml:{line}: anchors (&) and aliases (*) are not allowed in a policy file"
    )


@pytest.mark.parametrize("declared", ['"2026.2"', '"v2026_02-rc.1"', "2026", f'"{"9" * 40}"'])
def test_a_declared_version_of_the_safe_shape_is_stored_as_written(declared: str) -> None:
    policy = parse_flagging_policy(
        GOOD.replace('version: "2026.1"', f"version: {declared}").encode()
    )
    assert policy.declared_version == declared.strip('"')
    assert policy.version.startswith(f"{policy.declared_version}+")
