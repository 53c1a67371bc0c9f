"""Loading and validating ``policies/flagging.yaml``.

Invariants, each checked before a policy can be used:
- the file has a name (no control or format character), a declared version, the
  characteristics rules may use, and at least one rule; every rule has an id (unique), a
  plain-language description, a known type, exactly the parameters of that type (positive whole
  numbers) and a ``uses`` list;
- a rule's ``uses`` lists only declared characteristics and covers everything its type reads, so
  the file tells the whole truth about what each rule looks at;
- a protected attribute (gender, nationality, ethnicity, language, religion) anywhere in the
  characteristics, a rule's ``uses`` or its parameters makes the policy fail to load, naming the
  rule — there is no override;
- the stored version is ``<declared>+<hash>/e<evaluator>``, e.g. ``2026.2+3f9a0c1b2d4e/e8``: the
  declared version (1 to 40 letters, digits, ".", "_" or "-": no "+" or "/" to pass for
  another part, no space or line break to reach a log line or a terminal), the first 12 hex
  digits of the SHA-256 of the file's bytes, and ``rules.EVALUATOR_VERSION``. So any edit to
  the file, however small, and any change to how rules are evaluated shows up in every flag it
  produces.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from service.flagging.rules import (
    EVALUATOR_VERSION,
    EVENT_TYPES,
    READS,
    DeskHoppingRule,
    FlaggingPolicy,
    LongWelfareWithoutContactRule,
    RelapseRule,
    Rule,
)
from service.policy_yaml import PolicyYAMLError, load_policy_yaml
from service.records.models import REFUSED_CATEGORIES

PROTECTED_ATTRIBUTES: Final = frozenset(
    {"gender", "nationality", "ethnicity", "language", "religion"}
)
KNOWN_CHARACTERISTICS: Final = frozenset({*EVENT_TYPES, "office"})
PARAMETERS: Final[Mapping[str, tuple[str, ...]]] = {
    "relapse": ("min_returns", "within_months"),
    "desk_hopping": ("min_helpdesks", "within_months"),
    "long_welfare_without_contact": ("min_welfare_months", "no_contact_months"),
}
MAX_MONTHS: Final = 600
HASH_DIGITS: Final = 12
# The stored version (declared + 16 characters) must fit the 64-character policy_version columns.
MAX_DECLARED_VERSION: Final = 40
DECLARED_VERSION: Final = re.compile(r"[A-Za-z0-9._-]+")
# The name is stored with every run (the 128-character policy_name column).
MAX_NAME: Final = 128


class FlaggingPolicyError(ValueError):
    """The flagging policy is invalid; the message names the file and, where it can, the rule."""


def _protected_in(value: Any) -> set[str]:
    """Protected attribute names found in any key or string value, word by word."""
    found: set[str] = set()
    if isinstance(value, Mapping):
        for key, item in value.items():
            found |= _protected_in(key) | _protected_in(item)
    elif isinstance(value, list | tuple):
        for item in value:
            found |= _protected_in(item)
    elif isinstance(value, str):
        words = set(re.split(r"[^a-z]+", value.lower()))
        found |= words & PROTECTED_ATTRIBUTES
    return found


def policy_version(declared: str, content: bytes) -> str:
    """``<declared>+<hash of the file>/e<evaluator version>``: the version runs and flags store."""
    digest = hashlib.sha256(content).hexdigest()[:HASH_DIGITS]
    return f"{declared}+{digest}/e{EVALUATOR_VERSION}"


def parse_flagging_policy(content: bytes, *, source: str = "flagging.yaml") -> FlaggingPolicy:
    """Validate the bytes of a policy file (see the module invariants)."""
    try:
        document = load_policy_yaml(content, source=source)
    except PolicyYAMLError as exc:
        raise FlaggingPolicyError(str(exc)) from exc
    if not isinstance(document, dict):
        raise FlaggingPolicyError(
            f"{source}: a flagging policy is a mapping with name, version, characteristics, rules"
        )
    unknown = set(document) - {"name", "version", "characteristics", "rules"}
    if unknown:
        raise FlaggingPolicyError(f"{source}: unknown keys {sorted(map(str, unknown))}")
    name = document.get("name")
    if not isinstance(name, str) or not name.strip():
        raise FlaggingPolicyError(f"{source}: 'name' must be a non-empty text")
    if len(name.strip()) > MAX_NAME:
        raise FlaggingPolicyError(f"{source}: 'name' may have at most {MAX_NAME} characters")
    # The categories no text of a subject may hold (a NUL among them, which PostgreSQL cannot
    # store, so every run would fail); unlike a name, no script needs a joiner here.
    if any(unicodedata.category(character) in REFUSED_CATEGORIES for character in name.strip()):
        raise FlaggingPolicyError(
            f"{source}: 'name' must not contain control or format characters (line breaks, "
            "escapes, direction or invisible marks)"
        )
    declared = document.get("version")
    if declared is None or (isinstance(declared, str) and not declared.strip()):
        raise FlaggingPolicyError(f"{source}: 'version' must be given, e.g. version: \"2026.1\"")
    if not isinstance(declared, str | int) or isinstance(declared, bool):
        raise FlaggingPolicyError(
            f"{source}: 'version' must be text in quotes, e.g. version: \"2026.1\" (unquoted, "
            f"YAML reads 2026.1 as a number)"
        )
    declared = str(declared)
    if len(declared) > MAX_DECLARED_VERSION:
        raise FlaggingPolicyError(
            f"{source}: 'version' may have at most {MAX_DECLARED_VERSION} characters"
        )
    if not DECLARED_VERSION.fullmatch(declared):
        raise FlaggingPolicyError(
            f"{source}: 'version' may hold only letters, digits, '.', '_' and '-', e.g. "
            "version: \"2026.1\" (the stored version adds '+<hash>/e<evaluator>')"
        )

    characteristics = document.get("characteristics")
    if not isinstance(characteristics, list) or not all(
        isinstance(c, str) for c in characteristics
    ):
        raise FlaggingPolicyError(f"{source}: 'characteristics' must be a list of names")
    protected = _protected_in(characteristics)
    if protected:
        raise FlaggingPolicyError(
            f"{source}: 'characteristics' lists the protected attribute "
            f"{', '.join(sorted(protected))}; protected attributes can never be used"
        )
    unknown_characteristics = sorted(set(characteristics) - KNOWN_CHARACTERISTICS)
    if unknown_characteristics:
        raise FlaggingPolicyError(
            f"{source}: unknown characteristics {unknown_characteristics} "
            f"(known: {', '.join(sorted(KNOWN_CHARACTERISTICS))})"
        )

    rules_node = document.get("rules")
    if not isinstance(rules_node, list) or not rules_node:
        raise FlaggingPolicyError(f"{source}: 'rules' must list at least one rule")
    rules: list[Rule] = []
    seen: set[str] = set()
    for position, node in enumerate(rules_node, start=1):
        rule = _parse_rule(node, position=position, source=source, allowed=set(characteristics))
        if rule.id in seen:
            raise FlaggingPolicyError(f"{source}: rule id {rule.id!r} is used twice")
        seen.add(rule.id)
        rules.append(rule)
    return FlaggingPolicy(
        name=name.strip(),
        declared_version=declared,
        version=policy_version(declared, content),
        characteristics=tuple(characteristics),
        rules=tuple(rules),
        content=content,
    )


def _parse_rule(node: Any, *, position: int, source: str, allowed: set[str]) -> Rule:
    if not isinstance(node, dict):
        raise FlaggingPolicyError(f"{source}: rule {position} must be a mapping")
    rule_id = node.get("id")
    if not isinstance(rule_id, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,63}", rule_id):
        raise FlaggingPolicyError(
            f"{source}: rule {position} needs an 'id' of lowercase letters, digits, '-', '_', '.'"
        )
    where = f"{source}: rule {rule_id!r}"
    unknown = set(node) - {"id", "description", "type", "uses", "params"}
    if unknown:
        raise FlaggingPolicyError(f"{where}: unknown keys {sorted(map(str, unknown))}")
    protected = _protected_in(node.get("params")) | _protected_in(node.get("uses"))
    if protected:
        raise FlaggingPolicyError(
            f"{where} refers to the protected attribute {', '.join(sorted(protected))}; "
            "protected attributes can never be used by a flagging rule"
        )
    description = node.get("description")
    if not isinstance(description, str) or len(description.strip()) < 10:
        raise FlaggingPolicyError(f"{where} needs a plain-language 'description'")
    rule_type = node.get("type")
    if not isinstance(rule_type, str) or rule_type not in PARAMETERS:
        raise FlaggingPolicyError(
            f"{where}: unknown rule type {rule_type!r} (known: {', '.join(sorted(PARAMETERS))})"
        )
    uses = node.get("uses")
    if not isinstance(uses, list) or not uses or not all(isinstance(u, str) for u in uses):
        raise FlaggingPolicyError(f"{where} needs 'uses': the characteristics it reads")
    undeclared = sorted(set(uses) - allowed)
    if undeclared:
        raise FlaggingPolicyError(
            f"{where} uses {undeclared}, which the policy's 'characteristics' do not list"
        )
    missing_reads = sorted(READS[rule_type] - set(uses))
    if missing_reads:
        raise FlaggingPolicyError(
            f"{where}: a {rule_type} rule reads {missing_reads}, which its 'uses' does not list"
        )
    params = node.get("params")
    if not isinstance(params, dict):
        raise FlaggingPolicyError(
            f"{where} needs 'params': {', '.join(PARAMETERS[rule_type])} (whole numbers)"
        )
    expected = PARAMETERS[rule_type]
    missing = [p for p in expected if p not in params]
    if missing:
        raise FlaggingPolicyError(f"{where} is missing parameters {missing}")
    extra = sorted(set(map(str, params)) - set(expected))
    if extra:
        raise FlaggingPolicyError(f"{where}: unknown parameters {extra} for a {rule_type} rule")
    values: dict[str, int] = {}
    for key in expected:
        value = params[key]
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_MONTHS:
            raise FlaggingPolicyError(
                f"{where}: parameter {key!r} must be a whole number from 1 to {MAX_MONTHS}"
            )
        values[key] = value
    text = " ".join(description.split())
    used = tuple(uses)
    if rule_type == "relapse":
        return RelapseRule(
            id=rule_id,
            description=text,
            uses=used,
            min_returns=values["min_returns"],
            within_months=values["within_months"],
        )
    if rule_type == "desk_hopping":
        if values["min_helpdesks"] < 2:
            raise FlaggingPolicyError(f"{where}: 'min_helpdesks' must be at least 2")
        return DeskHoppingRule(
            id=rule_id,
            description=text,
            uses=used,
            min_helpdesks=values["min_helpdesks"],
            within_months=values["within_months"],
        )
    return LongWelfareWithoutContactRule(
        id=rule_id,
        description=text,
        uses=used,
        min_welfare_months=values["min_welfare_months"],
        no_contact_months=values["no_contact_months"],
    )


def load_flagging_policy(path: Path) -> FlaggingPolicy:
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise FlaggingPolicyError(f"{path}: cannot read the flagging policy: {exc}") from exc
    return parse_flagging_policy(content, source=str(path))
