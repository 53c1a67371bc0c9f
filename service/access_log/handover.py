"""Handing checkpoint signing from one log signing key to the next, verifiably.

A rotation of the log signing key is itself an access-log entry that names the new verifier key
(action ``keys.rotate``, object ``log_signing/v<n>``, reason ``HANDOVER_REASON`` + the key). In
the same transaction, before the keyring changes, a checkpoint ending with that entry is signed by
the old key and cosigned by the new one: the handover. An auditor who trusts the old key opens the
handover with it, reads the new key from the entry its root commits to, and trusts the new key
from then on; no key has to travel out of band.

Auditors get the handovers with ``audit export`` (``handovers.ndjson``) or from
``GET /v1/audit/handovers``; both write them with ``handover_line``, one JSON object per line.

Invariants:
- a handover checkpoint ends with the rotation entry naming the key that cosigned it;
- ``hand_over`` writes in the caller's transaction: the entry and the checkpoint commit together
  or not at all, and the caller changes the keyring only after both are written (before the
  commit, under the log's lock, so a checkpoint signed after the commit is signed by the new key).
"""

from __future__ import annotations

import json

from sqlmodel import Session

from service.access_log import service
from service.access_log.service import HANDOVER_REASON, LogEntry, append, signed_checkpoint
from service.crypto.signing import NoteError, NoteSigner, VerifierKey

HANDOVER_ACTION = "keys.rotate"
HANDOVER_OBJECT_PREFIX = "log_signing/"
# Both appear, in this form, in the canonical JSON of every handover entry: a cheap first test.
_MARKERS = (b'"action":"keys.rotate"', b'"object_id":"log_signing/')
# How every entry the service writes to hand signing over begins (canonical JSON: sorted keys,
# "action" first): a test of a line's first bytes, cheap enough for the verifier's hot loop.
ROTATION_PREFIX = b"{" + _MARKERS[0] + b","


def hand_over(
    *, session: Session, old: NoteSigner, new: NoteSigner, origin: str, version: int, actor: str
) -> int:
    """Log that ``new`` signs checkpoints from now on and store the handover checkpoint
    (signed by ``old``, cosigned by ``new``); returns the rotation entry's leaf index."""
    leaf_index = append(
        session=session,
        entry=LogEntry(
            actor=actor,
            role="system",
            action=HANDOVER_ACTION,
            object_type="key",
            object_id=f"{HANDOVER_OBJECT_PREFIX}v{version}",
            reason=f"{HANDOVER_REASON}{new.verifier}",
        ),
    )
    signed_checkpoint(session=session, signer=old, origin=origin, cosigner=new)
    return leaf_index


def handover_notes(*, session: Session, up_to: int) -> dict[int, str]:
    """The handover checkpoints of the first ``up_to`` entries, by tree size: the stored
    checkpoints with a second signature whose last entry hands signing over."""
    candidates = service.cosigned_checkpoint_notes(session=session, up_to=up_to)
    return {
        size: note
        for size, note in candidates.items()
        if any(
            handed_to(data) is not None
            for data in service.iter_entries(session=session, start=size - 1, end=size)
        )
    }


def handover_line(size: int, note: str) -> str:
    """One line of ``handovers.ndjson`` (what ``audit verify --handovers`` reads)."""
    return json.dumps({"size": size, "note": note}, ensure_ascii=False) + "\n"


def _may_hand_over(data: bytes) -> bool:
    """False for nearly every entry without decoding it; True means ``handed_to`` may say more."""
    return all(marker in data for marker in _MARKERS)


def handed_to(data: bytes) -> VerifierKey | None:
    """The key an entry (its canonical JSON) hands checkpoint signing to; None for any other
    entry, including a rotation logged before handovers existed."""
    if not _may_hand_over(data):
        return None
    try:
        entry = json.loads(data)
    except (ValueError, RecursionError):  # RecursionError: a crafted line nested too deep
        return None
    if not isinstance(entry, dict):
        return None  # a line of an export that is not an entry at all
    reason = entry.get("reason")
    if (
        entry.get("action") != HANDOVER_ACTION
        or not str(entry.get("object_id", "")).startswith(HANDOVER_OBJECT_PREFIX)
        or not isinstance(reason, str)
        or not reason.startswith(HANDOVER_REASON)
    ):
        return None
    try:
        return VerifierKey.parse(reason.removeprefix(HANDOVER_REASON))
    except NoteError:
        return None
