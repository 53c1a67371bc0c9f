"""Signed notes (C2SP signed-note): what ``open_note`` accepts and refuses."""

from __future__ import annotations

import os

import pytest

from service.crypto.signing import NoteError, NoteSigner, NotSignedBy, open_note

NAME = "casepackets/test"
TEXT = "casepackets/test\n5\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n"


@pytest.fixture
def signer() -> NoteSigner:
    return NoteSigner(name=NAME, seed=os.urandom(32))


def test_a_signed_note_opens_and_another_key_s_signature_beside_it_is_ignored(
    signer: NoteSigner,
) -> None:
    note = signer.sign(TEXT)
    assert open_note(note, signer.verifier) == TEXT
    other = NoteSigner(name="someone/else", seed=os.urandom(32))
    assert open_note(other.cosign(note), signer.verifier) == TEXT
    with pytest.raises(NotSignedBy):
        open_note(note, other.verifier)


def test_anything_after_a_valid_signature_must_be_well_formed_and_valid(
    signer: NoteSigner,
) -> None:
    note = signer.sign(TEXT)
    with pytest.raises(NoteError, match="malformed signature line"):
        open_note(note + "trailing words\n", signer.verifier)
    # a second signature line by the same key that does not verify
    line = note.rpartition("\n\n")[2]
    forged = line[:-6] + ("A" if line[-6] != "A" else "B") + line[-5:]
    with pytest.raises(NoteError, match="does not verify"):
        open_note(note + forged, signer.verifier)


@pytest.mark.parametrize("control", ["\r", "\x00", "\t", "\x1b"])
def test_a_control_character_anywhere_is_refused(signer: NoteSigner, control: str) -> None:
    crlf_text = TEXT.replace("\n5\n", f"\n5{control}\n")
    with pytest.raises(NoteError, match="control character"):
        open_note(signer.sign(crlf_text), signer.verifier)
    note = signer.sign(TEXT)
    damaged = note.replace("\n", "\r\n") if control == "\r" else note + control
    with pytest.raises(NoteError, match="control character"):
        open_note(damaged, signer.verifier)
