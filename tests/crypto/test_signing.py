"""Signed notes (C2SP signed-note): what ``open_note`` accepts and refuses."""

from __future__ import annotations

import base64
import os

import pytest

from service.crypto.signing import (
    MAX_SIGNATURES,
    NoteError,
    NoteSigner,
    NotSignedBy,
    VerifierKey,
    open_note,
)

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


def test_a_note_with_more_signatures_than_the_limit_is_refused(signer: NoteSigner) -> None:
    """C2SP asks verifiers to cap them (accepting at least 16): an auditor fed a huge note gets
    an answer, not a long wait."""
    note = signer.sign(TEXT)
    witnesses = [NoteSigner(name=f"witness/{n}", seed=os.urandom(32)) for n in range(16)]
    for witness in witnesses:
        note = witness.cosign(note)
    assert open_note(note, signer.verifier) == TEXT
    padding = note.rpartition("\n\n")[2].splitlines(keepends=True)[-1]
    with pytest.raises(NoteError, match=f"at most {MAX_SIGNATURES} signatures"):
        open_note(note + padding * (MAX_SIGNATURES - 16), signer.verifier)


@pytest.mark.parametrize("name", ["a+b", "a\u00a0b", "a\u2003b"])
def test_a_signature_line_by_a_name_the_format_forbids_is_refused(
    signer: NoteSigner, name: str
) -> None:
    """Key names hold no space (any Unicode one) and no '+', also on lines by other keys."""
    line = f"\u2014 {name} {base64.b64encode(os.urandom(68)).decode()}\n"
    with pytest.raises(NoteError, match="key name"):
        open_note(signer.sign(TEXT) + line, signer.verifier)


def test_a_signature_line_is_the_key_s_only_under_the_key_s_own_name(signer: NoteSigner) -> None:
    """C2SP signed-note: a line counts for a verifier when both its name and its key id match;
    the key's own signature relabelled with another name is no signature by that key."""
    note = signer.sign(TEXT)
    relabelled = note.replace(f"\u2014 {NAME} ", "\u2014 someone/else ", 1)
    with pytest.raises(NotSignedBy):
        open_note(relabelled, signer.verifier)


def test_a_verifier_key_whose_id_does_not_match_its_name_and_key_is_refused(
    signer: NoteSigner,
) -> None:
    text = str(signer.verifier)
    assert VerifierKey.parse(text) == signer.verifier
    name, key_id, key = text.split("+", 2)  # base64 may hold "+" too
    wrong_id = bytes(b ^ 0xFF for b in bytes.fromhex(key_id)).hex()
    for damaged in (f"{name}+{wrong_id}+{key}", f"someone/else+{key_id}+{key}"):
        with pytest.raises(NoteError, match="id does not match its name and key"):
            VerifierKey.parse(damaged)
