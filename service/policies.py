"""Every policy file in ``policies/``, read and validated together.

Guarantee: ``load_policies`` returns only when every file loads; otherwise the loader's error
(``ValueError``, naming the file) or the ``OSError`` of a missing file propagates. The service's
start-up and the early check of ``casepackets serve`` and ``flag`` go through it, so none can forget
a file or the check between two. Every loader reads its file with ``service.policy_yaml``, which
refuses a key given twice, a merge key, an anchor or alias, and a whole number not written in
plain decimal, naming the file and line.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from service.auth.permissions import AccessPolicy, load_access_policy
from service.flagging.policy import load_flagging_policy
from service.flagging.rules import EVENT_TYPES, FlaggingPolicy
from service.packets.policy import (
    FollowupPolicy,
    PartitioningPolicy,
    RetentionPolicy,
    load_followup_policy,
    load_partitioning_policy,
    load_retention_policy,
)
from service.records.vocabulary import load_event_types


class Policies(NamedTuple):
    access: AccessPolicy
    flagging: FlaggingPolicy
    partitioning: PartitioningPolicy
    retention: RetentionPolicy
    followups: FollowupPolicy
    event_types: frozenset[str]


def load_policies(folder: Path) -> Policies:
    policies = Policies(
        access=load_access_policy(folder / "access.yaml"),
        flagging=load_flagging_policy(folder / "flagging.yaml"),
        partitioning=load_partitioning_policy(folder / "partitioning.yaml"),
        retention=load_retention_policy(folder / "retention.yaml"),
        followups=load_followup_policy(folder / "followups.yaml"),
        event_types=load_event_types(folder / "events.yaml"),
    )
    # An event type a rule reads but sources may not send would silently never occur: the rule
    # would never fire, or (a visit that can never be recorded) fire for everyone.
    unsendable = sorted(
        set(policies.flagging.characteristics) & set(EVENT_TYPES) - policies.event_types
    )
    if unsendable:
        raise ValueError(
            f"{folder / 'flagging.yaml'}: the characteristics {unsendable} are event types that "
            f"{folder / 'events.yaml'} does not accept, so no record could carry them"
        )
    return policies
