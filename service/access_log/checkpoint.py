"""The C2SP ``tlog-checkpoint`` body: origin, tree size, base64 root hash (pure).

Invariant: ``parse_checkpoint`` accepts exactly what ``checkpoint_text`` produces (plus optional
extension lines) and raises ``CheckpointError`` on anything else, so a verifier never acts on a
half-understood checkpoint.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from service.access_log.merkle import HASH_SIZE


class CheckpointError(ValueError):
    """A checkpoint text is malformed."""


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes


def checkpoint_text(checkpoint: Checkpoint) -> str:
    root = base64.b64encode(checkpoint.root).decode("ascii")
    return f"{checkpoint.origin}\n{checkpoint.size}\n{root}\n"


# A tree size is a 64-bit count: at most 19 decimal digits.
MAX_SIZE_DIGITS = 19


def parse_checkpoint(text: str) -> Checkpoint:
    if not text.endswith("\n"):
        raise CheckpointError("a checkpoint ends with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3 or not lines[0]:
        raise CheckpointError("a checkpoint has an origin, a tree size and a root hash line")
    origin, size_line, root_line = lines[:3]
    if (
        not size_line.isascii()
        or not size_line.isdigit()
        or (len(size_line) > 1 and size_line[0] == "0")
        or len(size_line) > MAX_SIZE_DIGITS
    ):
        raise CheckpointError("the tree size is not a decimal number of at most 19 digits")
    try:
        root = base64.b64decode(root_line, validate=True)
    except ValueError:  # binascii.Error, or a character outside ASCII
        raise CheckpointError("the root hash is not base64") from None
    if len(root) != HASH_SIZE:
        raise CheckpointError("the root hash is not 32 bytes")
    if any(not line for line in lines[3:]):
        raise CheckpointError("empty extension line")
    return Checkpoint(origin=origin, size=int(size_line), root=root)


def unverified_checkpoint(note: str) -> Checkpoint:
    """What a signed note's checkpoint says, no signature checked: for a note this service
    stored itself, or to learn which checks a note needs. Raises ``CheckpointError``."""
    return parse_checkpoint(note.rpartition("\n\n")[0] + "\n")
