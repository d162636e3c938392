"""APDU parsing, TLV coding and response paging of the emulated card."""

from __future__ import annotations

import pytest

from emulated_yubikey.apdu import (
    ApduFormatError,
    Command,
    ResponsePager,
    iter_tlvs,
    parse_command,
    tlv,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("00a10000", Command(0, 0xA1, 0, 0, b"", 256)),
        ("00a1000000", Command(0, 0xA1, 0, 0, b"", 256)),
        ("00a1000010", Command(0, 0xA1, 0, 0, b"", 16)),
        ("00a4040003a1a2a3", Command(0, 0xA4, 4, 0, bytes.fromhex("a1a2a3"), 256)),
        ("10a4040003a1a2a320", Command(0x10, 0xA4, 4, 0, bytes.fromhex("a1a2a3"), 32)),
        ("00a1000000000a", Command(0, 0xA1, 0, 0, b"", 10, extended=True)),
        ("00a10000000000", Command(0, 0xA1, 0, 0, b"", 65536, extended=True)),
        ("00a4000100000374aabb", Command(0, 0xA4, 0, 1, bytes.fromhex("74aabb"), 65536, True)),
        ("00a4000100000374aabb0100", Command(0, 0xA4, 0, 1, bytes.fromhex("74aabb"), 256, True)),
    ],
)
def test_parse_command_cases(raw: str, expected: Command) -> None:
    assert parse_command(bytes.fromhex(raw)) == expected


@pytest.mark.parametrize(
    "raw",
    ["00a100", "00a4040003a1a2", "00a4040002a1a2a3a4", "00a10000000003a1", "00a4040000000000"],
)
def test_parse_command_rejects_bad_lengths(raw: str) -> None:
    with pytest.raises(ApduFormatError):
        parse_command(bytes.fromhex(raw))


def test_command_repr_hides_data() -> None:
    cmd = Command(0, 0x01, 0, 0, b"very-secret-seed")
    assert "secret" not in repr(cmd)
    assert repr(cmd) == "Command(cla=00, ins=01, p1=00, p2=00, lc=16, ne=256)"


def test_tlv_lengths() -> None:
    assert tlv(0x71, b"ab") == bytes.fromhex("71026162")
    assert tlv(0x72, b"x" * 200)[:3] == bytes.fromhex("7281c8")
    assert tlv(0x72, b"x" * 300)[:4] == bytes.fromhex("7282012c")
    assert list(iter_tlvs(tlv(0x72, b"x" * 300) + tlv(0x73))) == [(0x72, b"x" * 300), (0x73, b"")]


def test_property_tag_has_no_length_byte() -> None:
    data = bytes.fromhex("7101617302aabb78027a0400000005")
    assert list(iter_tlvs(data, single_byte_tags=frozenset({0x78}))) == [
        (0x71, b"a"),
        (0x73, bytes.fromhex("aabb")),
        (0x78, b"\x02"),
        (0x7A, bytes.fromhex("00000005")),
    ]


def test_truncated_tlv_is_an_error() -> None:
    with pytest.raises(ApduFormatError):
        list(iter_tlvs(bytes.fromhex("7105616263")))


def test_pager_cuts_at_ne_and_counts_what_is_left() -> None:
    pager = ResponsePager(0xA5)
    data = bytes(range(256)) * 2 + b"xyz"  # 515 bytes
    first = pager.page(data, 256)
    assert (first.data, first.sw) == (data[:256], 0x6100)
    second = pager.send_remaining(256)
    assert (second.data, second.sw) == (data[256:512], 0x6103)
    third = pager.send_remaining(256)
    assert (third.data, third.sw) == (b"xyz", 0x9000)
    assert pager.send_remaining(256).sw == 0x6D00


def test_pager_255_left_is_61ff() -> None:
    pager = ResponsePager(0xA5)
    assert pager.page(b"a" * 511, 256).sw == 0x61FF
