"""Loading ``policies/partitioning.yaml`` and ``policies/retention.yaml``.

Invariants: a packet never holds more than 50 clients (a larger ``packet_size`` is refused at
start-up, not clamped); unknown keys and non-positive durations are refused with the file named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

MAX_PACKET_SIZE: Final = 50
DEFAULT_PACKET_SIZE: Final = 20


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


def _read(path: Path, keys: set[str]) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PacketsPolicyError(f"{path}: cannot read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise PacketsPolicyError(f"{path}: not valid YAML: {exc}") from exc
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
    document = _read(path, {"version", "packet_ttl_days", "closed_grace_days"})
    return RetentionPolicy(
        version=_whole(path, document, "version", low=1, high=10**6),
        packet_ttl_days=_whole(path, document, "packet_ttl_days", low=1, high=3650),
        closed_grace_days=_whole(path, document, "closed_grace_days", low=0, high=3650),
    )
