"""Loading the packet policies: partitioning, retention and follow-ups (``policies/*.yaml``).

Invariants: a packet never holds more than 20 clients (a larger ``packet_size`` is refused at
start-up, not clamped); unknown keys and non-positive durations are refused with the file named
(YAML quirks, with the line: see ``service.policy_yaml``); an outcome code is usable only with the
follow-up kinds it names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from service.packets.partition import MAX_PACKET_SIZE
from service.policy_yaml import PolicyYAMLError, load_policy_yaml

DEFAULT_PACKET_SIZE: Final = MAX_PACKET_SIZE


class PacketsPolicyError(ValueError):
    """A partitioning or retention policy is invalid; the message names the file and key."""


@dataclass(frozen=True)
class PartitioningPolicy:
    version: int
    packet_size: int = DEFAULT_PACKET_SIZE


@dataclass(frozen=True)
class RetentionPolicy:
    version: int
    packet_ttl_days: int
    closed_grace_days: int
    idempotency_days: int = 7


def _read(path: Path, keys: set[str]) -> dict[str, Any]:
    try:
        document = load_policy_yaml(path.read_bytes(), source=str(path))
    except OSError as exc:
        raise PacketsPolicyError(f"{path}: cannot read: {exc}") from exc
    except PolicyYAMLError as exc:
        raise PacketsPolicyError(str(exc)) from exc
    if not isinstance(document, dict):
        raise PacketsPolicyError(f"{path}: must be a mapping with {', '.join(sorted(keys))}")
    unknown = set(map(str, document)) - keys
    if unknown:
        raise PacketsPolicyError(f"{path}: unknown keys {sorted(unknown)}")
    return document


def _whole(path: Path, document: dict[str, Any], key: str, *, low: int, high: int) -> int:
    value = document.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise PacketsPolicyError(f"{path}: {key!r} must be a whole number from {low} to {high}")
    return value


def load_partitioning_policy(path: Path) -> PartitioningPolicy:
    document = _read(path, {"version", "packet_size"})
    version = _whole(path, document, "version", low=1, high=10**6)
    if "packet_size" not in document:
        return PartitioningPolicy(version=version)
    size = _whole(path, document, "packet_size", low=1, high=10**6)
    if size > MAX_PACKET_SIZE:
        raise PacketsPolicyError(
            f"{path}: packet_size {size} is above the limit of {MAX_PACKET_SIZE} clients a packet"
        )
    return PartitioningPolicy(version=version, packet_size=size)


def load_retention_policy(path: Path) -> RetentionPolicy:
    document = _read(path, {"version", "packet_ttl_days", "closed_grace_days", "idempotency_days"})
    return RetentionPolicy(
        version=_whole(path, document, "version", low=1, high=10**6),
        packet_ttl_days=_whole(path, document, "packet_ttl_days", low=1, high=3650),
        closed_grace_days=_whole(path, document, "closed_grace_days", low=0, high=3650),
        # Optional: a policy written before it existed keeps answers for the default week.
        idempotency_days=(
            _whole(path, document, "idempotency_days", low=1, high=365)
            if "idempotency_days" in document
            else RetentionPolicy.idempotency_days
        ),
    )


FOLLOWUP_KINDS: Final = ("appointment", "contact", "intervention", "outcome")


@dataclass(frozen=True)
class FollowupPolicy:
    """The follow-up kinds and the outcome-code vocabulary (``policies/followups.yaml``)."""

    version: int
    outcome_required: frozenset[str]
    # outcome code -> the kinds it may be used with
    outcome_codes: dict[str, frozenset[str]]

    def check(self, *, kind: str, outcome_code: str | None) -> str | None:
        """Why ``outcome_code`` does not fit ``kind``, or None when it does."""
        if outcome_code is None:
            if kind in self.outcome_required:
                return f"a follow-up of kind {kind!r} needs an outcome_code"
            return None
        kinds = self.outcome_codes.get(outcome_code)
        if kinds is None:
            # Not echoed: what was sent in its place may be free text, such as a name.
            fitting = sorted(code for code, kinds in self.outcome_codes.items() if kind in kinds)
            return (
                f"outcome_code is not in the vocabulary (policies/followups.yaml); "
                f"for kind {kind!r} use one of: {', '.join(fitting) or 'none'}"
            )
        if kind not in kinds:
            return f"outcome_code {outcome_code!r} is for {', '.join(sorted(kinds))}, not {kind!r}"
        return None


def load_followup_policy(path: Path) -> FollowupPolicy:
    document = _read(path, {"version", "kinds", "outcome_codes"})
    version = _whole(path, document, "version", low=1, high=10**6)
    kinds = document.get("kinds")
    if not isinstance(kinds, dict) or set(map(str, kinds)) != set(FOLLOWUP_KINDS):
        raise PacketsPolicyError(
            f"{path}: 'kinds' must describe exactly {', '.join(FOLLOWUP_KINDS)}"
        )
    required: set[str] = set()
    for kind, spec in kinds.items():
        if not isinstance(spec, dict) or set(spec) - {"description", "outcome_required"}:
            raise PacketsPolicyError(
                f"{path}: kind {kind!r} takes 'description' and 'outcome_required' only"
            )
        if not isinstance(spec.get("description"), str) or not spec["description"].strip():
            raise PacketsPolicyError(f"{path}: kind {kind!r} needs a description")
        if not isinstance(spec.get("outcome_required", False), bool):
            raise PacketsPolicyError(f"{path}: kind {kind!r}: outcome_required is true or false")
        if spec.get("outcome_required", False):
            required.add(str(kind))
    codes = document.get("outcome_codes")
    if not isinstance(codes, dict) or not codes:
        raise PacketsPolicyError(f"{path}: 'outcome_codes' must list at least one code")
    vocabulary: dict[str, frozenset[str]] = {}
    for code, spec in codes.items():
        if not isinstance(code, str) or not code or len(code) > 64:
            raise PacketsPolicyError(f"{path}: outcome code {code!r} must be 1 to 64 characters")
        if not isinstance(spec, dict) or set(spec) - {"description", "kinds"}:
            raise PacketsPolicyError(
                f"{path}: outcome code {code!r} takes 'description' and 'kinds'"
            )
        if not isinstance(spec.get("description"), str) or not spec["description"].strip():
            raise PacketsPolicyError(f"{path}: outcome code {code!r} needs a description")
        code_kinds = spec.get("kinds")
        if (
            not isinstance(code_kinds, list)
            or not code_kinds
            or any(k not in FOLLOWUP_KINDS for k in code_kinds)
        ):
            raise PacketsPolicyError(
                f"{path}: outcome code {code!r}: 'kinds' must list some of "
                f"{', '.join(FOLLOWUP_KINDS)}"
            )
        vocabulary[code] = frozenset(code_kinds)
    for kind in required:
        if not any(kind in kinds_ for kinds_ in vocabulary.values()):
            raise PacketsPolicyError(f"{path}: kind {kind!r} needs an outcome code but none fits")
    return FollowupPolicy(
        version=version, outcome_required=frozenset(required), outcome_codes=vocabulary
    )
