"""The C2SP checkpoint body: exactly what ``checkpoint_text`` writes parses, nothing else does."""

from __future__ import annotations

import base64

import pytest

from service.access_log.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_text,
    parse_checkpoint,
)

ROOT = bytes(range(32))
ROOT_B64 = base64.b64encode(ROOT).decode()


def test_what_checkpoint_text_writes_parses_back() -> None:
    checkpoint = Checkpoint(origin="casepackets/test", size=1234, root=ROOT)
    assert parse_checkpoint(checkpoint_text(checkpoint)) == checkpoint
    assert parse_checkpoint(f"o\n0\n{ROOT_B64}\n") == Checkpoint("o", 0, ROOT)
    # Extension lines are allowed (and ignored) as long as none is empty.
    assert parse_checkpoint(f"o\n7\n{ROOT_B64}\nwitness note\n") == Checkpoint("o", 7, ROOT)
    assert parse_checkpoint(f"o\n{'9' * 19}\n{ROOT_B64}\n").size == 10**19 - 1


@pytest.mark.parametrize(
    ("text", "why"),
    [
        pytest.param(f"o\n7\n{ROOT_B64}", "ends with a newline", id="no final newline"),
        pytest.param(f"\n7\n{ROOT_B64}\n", "origin", id="empty origin"),
        pytest.param("o\n7\n", "origin", id="no root line"),
        pytest.param(
            f"o\n07\n{ROOT_B64}\n", "decimal number", id="leading zero (one spelling per size)"
        ),
        pytest.param(f"o\n+7\n{ROOT_B64}\n", "decimal number", id="plus sign"),
        pytest.param(f"o\n\u0667\n{ROOT_B64}\n", "decimal number", id="Arabic-Indic digit seven"),
        pytest.param(f"o\n{'1' * 20}\n{ROOT_B64}\n", "decimal number", id="20 digits"),
        pytest.param("o\n7\nnot base64!\n", "not base64", id="root not base64"),
        pytest.param(
            f"o\n7\n{base64.b64encode(ROOT[:31]).decode()}\n", "not 32 bytes", id="31-byte root"
        ),
        pytest.param(
            f"o\n7\n{base64.b64encode(ROOT + b'!').decode()}\n", "not 32 bytes", id="33-byte root"
        ),
        pytest.param(f"o\n7\n{ROOT_B64}\n\n", "empty extension line", id="empty extension"),
        pytest.param(
            f"o\n7\n{ROOT_B64}\next\n\nmore\n", "empty extension line", id="empty extension between"
        ),
    ],
)
def test_anything_else_is_refused(text: str, why: str) -> None:
    with pytest.raises(CheckpointError, match=why):
        parse_checkpoint(text)
