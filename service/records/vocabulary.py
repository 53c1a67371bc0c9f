"""The controlled vocabulary of event types (``policies/events.yaml``).

Invariant: the vocabulary is closed and never empty; a malformed file is refused with the file
and reason named, so a typo cannot silently accept or reject a whole class of events.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from service.policy_yaml import PolicyYAMLError, load_policy_yaml


class VocabularyError(ValueError):
    """``events.yaml`` is missing or malformed."""


@lru_cache(maxsize=8)
def load_event_types(path: Path) -> frozenset[str]:
    try:
        document = load_policy_yaml(path.read_bytes(), source=str(path))
    except OSError as exc:
        raise VocabularyError(f"{path}: cannot read the event vocabulary: {exc}") from exc
    except PolicyYAMLError as exc:
        raise VocabularyError(str(exc)) from exc
    if not isinstance(document, dict) or set(document) != {"version", "types"}:
        raise VocabularyError(f"{path}: expected exactly the keys 'version' and 'types'")
    types = document["types"]
    if not isinstance(types, dict) or not types:
        raise VocabularyError(f"{path}: 'types' must map at least one event type to a description")
    for name in types:
        if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
            raise VocabularyError(f"{path}: event type {name!r} must be a lowercase identifier")
    return frozenset(types)
