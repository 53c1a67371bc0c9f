"""Policy files are read strictly: YAML quirks that would silently misread a file stop start-up."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from service.config import PROJECT_ROOT
from service.policies import load_policies
from service.policy_yaml import PolicyYAMLError, compose_policy_yaml, load_policy_yaml

SHIPPED = PROJECT_ROOT / "policies"


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("a: 24\nb: -3\nc: +5\nd: 0\n", {"a": 24, "b": -3, "c": 5, "d": 0}),
        ("a: '024'\nb: \"1:00\"\n", {"a": "024", "b": "1:00"}),
        ("a: '&x'\nb: \"*x\"\n", {"a": "&x", "b": "*x"}),
        ("", None),
    ],
    ids=["decimal", "quoted-text", "quoted-marks", "empty"],
)
def test_plain_yaml_loads_as_usual(text: str, value: object) -> None:
    assert load_policy_yaml(text, source="p.yaml") == value


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: 1\nb:\n  c: 024\n", "p.yaml:3: c: 024 is not a plain decimal whole number"),
        ("a: 1:00\n", "p.yaml:1: a: 1:00 is not a plain decimal whole number"),
        ("a: [1, 0x10]\n", "p.yaml:1: a: 0x10 is not a plain decimal"),
        ("a: 1_000\n", "p.yaml:1: a: 1_000 is not a plain decimal"),
        ("a: 0b11\n", "p.yaml:1: a: 0b11 is not a plain decimal"),
        ("a: !!int '07'\n", "p.yaml:1: a: 07 is not a plain decimal"),
        ("010: a\n", "p.yaml:1: 010 is not a plain decimal"),
    ],
    ids=["octal", "base-60", "hex", "underscore", "binary", "tagged", "key"],
)
def test_a_whole_number_that_is_not_plain_decimal_is_refused_naming_the_line(
    text: str, message: str
) -> None:
    for read in (load_policy_yaml, compose_policy_yaml):
        with pytest.raises(PolicyYAMLError) as caught:
            read(text, source="p.yaml")
        assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "rules: [a]\nname: x\nrules: [b]\n",
            "p.yaml:3: key 'rules' is given twice in one mapping (first on line 1)",
        ),
        (
            "a:\n  b: 1\n  'b': 2\n",
            "p.yaml:3: key 'b' is given twice in one mapping (first on line 2)",
        ),
        (
            "a:\n  - {b: 1, b: 1}\n",
            "p.yaml:2: key 'b' is given twice in one mapping (first on line 2)",
        ),
        ("c:\n  <<: {x: 1}\n  x: 2\n", "p.yaml:2: merge keys (<<) are not allowed"),
    ],
    ids=["top-level", "quoted", "flow", "merge"],
)
def test_a_key_given_twice_is_refused_naming_the_lines(text: str, message: str) -> None:
    for read in (load_policy_yaml, compose_policy_yaml):
        with pytest.raises(PolicyYAMLError) as caught:
            read(text, source="p.yaml")
        assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("a: &shared [1, 2]\nb: *shared\n", 1),
        ("a: 1\nb: &unused 2\n", 2),
        ("a: [1, *nowhere]\n", 1),
        ("a:\n  ? &k b\n  : 1\n", 2),
        ("l0: &l0 [x, x]\nl1: &l1 [*l0, *l0]\nl2: [*l1, *l1]\n", 1),
    ],
    ids=["alias", "anchor", "undefined-alias", "anchored-key", "nested"],
)
def test_an_anchor_or_alias_is_refused_naming_the_line(text: str, line: int) -> None:
    """Nested aliases let a few lines stand for billions of values (an "alias bomb")."""
    for read in (load_policy_yaml, compose_policy_yaml):
        with pytest.raises(PolicyYAMLError) as caught:
            read(text, source="p.yaml")
        assert str(caught.value) == (
            f"p.yaml:{line}: anchors (&) and aliases (*) are not allowed in a policy file; "
            "write each value out"
        )


def test_not_yaml_is_refused_in_one_line_naming_the_file_and_line() -> None:
    with pytest.raises(PolicyYAMLError) as caught:
        load_policy_yaml("rules:\n  - a\n  bogus: [\n", source="p.yaml")
    assert str(caught.value).startswith("p.yaml:3: not valid YAML: ")
    assert "\n" not in str(caught.value)
    with pytest.raises(PolicyYAMLError, match=r"^p\.yaml:1: not valid YAML: mapping values"):
        load_policy_yaml("a: b: c\n", source="p.yaml")


@pytest.mark.parametrize(
    ("content", "byte"),
    [(b"a: \xff\n", 3), ("a: 1\n".encode("utf-16"), 0), ("a: é\n".encode("latin-1"), 3)],
    ids=["stray-byte", "utf-16", "latin-1"],
)
def test_a_file_that_is_not_utf8_is_refused_naming_the_byte(content: bytes, byte: int) -> None:
    """PyYAML would read UTF-16 after a byte order mark: a flagging policy read so would be
    archived as bytes no reader of the archive takes for the text it was."""
    with pytest.raises(PolicyYAMLError) as caught:
        load_policy_yaml(content, source="p.yaml")
    assert str(caught.value) == f"p.yaml: not UTF-8 text (byte {byte}); save the file as UTF-8"


def test_a_utf8_file_with_a_byte_order_mark_loads() -> None:
    assert load_policy_yaml("\ufeffa: 1\n".encode(), source="p.yaml") == {"a": 1}


# One whole number per shipped file, rewritten the way YAML 1.1 would misread it.
MISREAD_NUMBERS = {
    "access.yaml": ("version: 1\n", "version: 01\n"),
    "events.yaml": ("version: 1\n", "version: 0x1\n"),
    "flagging.yaml": ("within_months: 24\n", "within_months: 1:00\n"),
    "followups.yaml": ("version: 1\n", "version: 0b1\n"),
    "partitioning.yaml": ("packet_size: 20\n", "packet_size: 010\n"),
    "retention.yaml": ("packet_ttl_days: 90\n", "packet_ttl_days: 9_0\n"),
}


def policies_with(tmp_path: Path, name: str, text: str) -> Path:
    folder = tmp_path / "policies"
    shutil.copytree(SHIPPED, folder)
    (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.mark.parametrize("name", sorted(MISREAD_NUMBERS))
def test_every_policy_file_refuses_a_misread_number(tmp_path: Path, name: str) -> None:
    old, new = MISREAD_NUMBERS[name]
    shipped = (SHIPPED / name).read_text(encoding="utf-8")
    assert old in shipped
    folder = policies_with(tmp_path, name, shipped.replace(old, new, 1))
    with pytest.raises(ValueError, match="is not a plain decimal whole number") as caught:
        load_policies(folder)
    line = shipped[: shipped.index(old)].count("\n") + 1
    assert str(caught.value).startswith(f"{folder / name}:{line}: ")


@pytest.mark.parametrize("name", sorted(MISREAD_NUMBERS))
def test_every_policy_file_refuses_a_repeated_key(tmp_path: Path, name: str) -> None:
    shipped = (SHIPPED / name).read_text(encoding="utf-8")
    folder = policies_with(tmp_path, name, shipped + "version: 2\n")
    with pytest.raises(ValueError, match="key 'version' is given twice in one mapping") as caught:
        load_policies(folder)
    line = shipped.count("\n") + 1
    assert str(caught.value).startswith(f"{folder / name}:{line}: ")


def test_a_flagging_policy_reading_an_event_type_that_sources_may_not_send_is_refused(
    tmp_path: Path,
) -> None:
    """Without helpdesk visits, desk hopping could never fire, and every long spell on welfare
    would be flagged as having no visit on record."""
    shipped = (SHIPPED / "events.yaml").read_text(encoding="utf-8")
    line = next(x for x in shipped.splitlines(keepends=True) if "helpdesk_visit:" in x)
    folder = policies_with(tmp_path, "events.yaml", shipped.replace(line, ""))
    with pytest.raises(ValueError, match=r"\['helpdesk_visit'\] are event types that") as caught:
        load_policies(folder)
    assert str(caught.value).startswith(f"{folder / 'flagging.yaml'}: ")
    assert str(folder / "events.yaml") in str(caught.value)
