"""The test helpers that other tests lean on: a leak scan that misses a leak hides one."""

from tests.packets.scenario import leaked

SECRETS = {"3107 QX", "+31 77 007 9007", "Quaedvlieg007z", "1941-04-08"}


def test_the_leak_scan_finds_a_secret_as_it_was_sent_and_in_any_letter_case() -> None:
    assert leaked('{"family_name": "QUAEDVLIEG007Z"}', SECRETS) == ["Quaedvlieg007z"]
    assert leaked('{"postcode": "3107 QX"}', SECRETS) == ["3107 QX"]


def test_the_leak_scan_finds_a_secret_reformatted() -> None:
    assert leaked('{"pc": "3107qx", "tel": "+31-77-007-9007"}', SECRETS) == [
        "+31 77 007 9007",
        "3107 QX",
    ]
    assert leaked("born 1941/04/08", SECRETS) == ["1941-04-08"]


def test_the_leak_scan_passes_text_without_secrets() -> None:
    assert leaked('{"postcode": "3108 QX", "born": "1941-04-09", "n": 3107}', SECRETS) == []
