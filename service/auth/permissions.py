"""Roles, permissions and the access policy that maps one to the other.

Invariants: deny by default (a role has only the permissions the policy lists); the vocabularies
are closed, so a typo in ``policies/access.yaml`` stops start-up with the file and line named
instead of silently granting or removing access; an empty policy is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import yaml

from service.policy_yaml import PolicyYAMLError, compose_policy_yaml


class Role(StrEnum):
    PROFESSIONAL = "professional"
    COORDINATOR = "coordinator"
    SOURCE = "source"
    AUDITOR = "auditor"
    ANALYST = "analyst"
    ADMIN = "admin"


def known_roles(names: Iterable[str]) -> frozenset[str]:
    """The names among ``names`` that are roles here. An identity provider adds its own
    (``offline_access``, or anything an administrator typed); they grant nothing, and the access
    log, which can never be corrected, records only these."""
    return frozenset(name for name in names if name in Role.__members__.values())


class Permission(StrEnum):
    PROFESSIONALS_MANAGE = "professionals.manage"
    RECORDS_INGEST = "records.ingest"
    FLAGGING_RUN = "flagging.run"
    FLAGGING_READ = "flagging.read"
    POLICIES_READ = "policies.read"
    FLAGS_PUSH = "flags.push"
    PACKETS_PARTITION = "packets.partition"
    PACKETS_READ = "packets.read"
    PACKETS_READ_ALL = "packets.read_all"
    PACKETS_OPEN = "packets.open"
    FOLLOWUPS_WRITE = "followups.write"
    PACKETS_REASSIGN = "packets.reassign"
    PACKETS_CLOSE = "packets.close"
    PACKETS_CLOSE_ANY = "packets.close_any"
    SUBJECTS_ERASE = "subjects.erase"
    AUDIT_READ = "audit.read"
    STATS_READ = "stats.read"


class PolicyError(ValueError):
    """A policy file is invalid; the message names the file and line."""


@dataclass(frozen=True)
class AccessPolicy:
    grants: Mapping[Role, frozenset[Permission]]
    version: int

    def permissions_for(self, roles: Iterable[str]) -> frozenset[Permission]:
        granted: set[Permission] = set()
        for name in roles:
            if name in Role.__members__.values():
                granted |= self.grants.get(Role(name), frozenset())
        return frozenset(granted)


def _where(path: Path, node: yaml.Node) -> str:
    return f"{path}:{node.start_mark.line + 1}"


def load_access_policy(path: Path) -> AccessPolicy:
    try:
        root = compose_policy_yaml(path.read_bytes(), source=str(path))
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read access policy: {exc}") from exc
    except PolicyYAMLError as exc:
        raise PolicyError(str(exc)) from exc
    if not isinstance(root, yaml.MappingNode):
        raise PolicyError(f"{path}: the access policy must be a mapping with 'version' and 'roles'")
    top = {key.value: value for key, value in root.value}
    unknown_top = set(top) - {"version", "roles"}
    if unknown_top:
        raise PolicyError(f"{path}: unknown keys {sorted(unknown_top)}")
    version_node = top.get("version")
    if not isinstance(version_node, yaml.ScalarNode) or not version_node.value.isdigit():
        raise PolicyError(f"{path}: 'version' must be a whole number")
    roles_node = top.get("roles")
    if not isinstance(roles_node, yaml.MappingNode) or not roles_node.value:
        raise PolicyError(f"{path}: 'roles' must map at least one role to permissions")
    known_roles = {r.value for r in Role}
    known_permissions = {p.value for p in Permission}
    grants: dict[Role, frozenset[Permission]] = {}
    for role_node, permissions_node in roles_node.value:
        if role_node.value not in known_roles:
            raise PolicyError(
                f"{_where(path, role_node)}: unknown role {role_node.value!r} "
                f"(known: {', '.join(sorted(known_roles))})"
            )
        if not isinstance(permissions_node, yaml.SequenceNode):
            raise PolicyError(f"{_where(path, permissions_node)}: permissions must be a list")
        permissions = set()
        for item in permissions_node.value:
            if not isinstance(item, yaml.ScalarNode) or item.value not in known_permissions:
                shown = item.value if isinstance(item, yaml.ScalarNode) else "a non-name"
                raise PolicyError(f"{_where(path, item)}: unknown permission {shown!r}")
            permissions.add(Permission(item.value))
        grants[Role(role_node.value)] = frozenset(permissions)
    return AccessPolicy(grants=grants, version=int(version_node.value))
