"""ISO 7816-4 command/response plumbing shared by the emulated applets.

Pure: no I/O, no yubikit. The emulated card parses every APDU into a `Command` once,
so the applets see the same thing whether the host used short APDUs with command
chaining (NFC, older keys) or extended-length APDUs (USB on firmware >= 4).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum, unique


@unique
class SW(IntEnum):
    """Status words the emulated YubiKey answers (values as on a real key)."""

    OK = 0x9000
    MORE_DATA = 0x6100  # low byte: bytes left, 00 when 256 or more
    MEMORY_FAILURE = 0x6581
    WRONG_LENGTH = 0x6700
    SECURITY_CONDITION_NOT_SATISFIED = 0x6982
    DATA_INVALID = 0x6984
    CONDITIONS_NOT_SATISFIED = 0x6985
    WRONG_DATA = 0x6A80
    FILE_NOT_FOUND = 0x6A82
    NO_SPACE = 0x6A84
    WRONG_P1P2 = 0x6B00
    INS_NOT_SUPPORTED = 0x6D00
    CLA_NOT_SUPPORTED = 0x6E00
    UNKNOWN = 0x6F00


class ApduFormatError(ValueError):
    """The bytes are not a well-formed command APDU (the card answers 6700)."""


#: Ne when the host sent no Le in a short (or header-only) APDU: a real YubiKey then
#: cuts its answer at 256 bytes and offers the rest through response chaining.
SHORT_NE = 256
#: Ne when an extended APDU carries no Le: a real YubiKey answers in one piece.
EXTENDED_NE = 65536

CLA_CHAINING = 0x10


@dataclass(frozen=True)
class Command:
    """One parsed command APDU. `ne` is the most response data the host takes."""

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    ne: int = SHORT_NE
    extended: bool = False

    @property
    def chained(self) -> bool:
        """True for a non-final part of a command chain (CLA bit 0x10)."""
        return bool(self.cla & CLA_CHAINING)

    def __repr__(self) -> str:
        # Command data can hold OATH secrets and access keys: never show it.
        return (
            f"Command(cla={self.cla:02x}, ins={self.ins:02x}, p1={self.p1:02x}, "
            f"p2={self.p2:02x}, lc={len(self.data)}, ne={self.ne})"
        )


@dataclass(frozen=True)
class Response:
    """A response APDU: data then the status word."""

    data: bytes = b""
    sw: int = SW.OK

    def to_bytes(self) -> bytes:
        return self.data + self.sw.to_bytes(2, "big")

    def __repr__(self) -> str:
        return f"Response(len={len(self.data)}, sw={self.sw:04x})"


def status(sw: int) -> Response:
    """A response with no data."""
    return Response(b"", sw)


def parse_command(apdu: bytes) -> Command:
    """Parse the four ISO 7816-4 cases, short and extended.

    Raises ApduFormatError when the length fields do not match the bytes.
    """
    if len(apdu) < 4:
        raise ApduFormatError("APDU shorter than its header")
    cla, ins, p1, p2 = apdu[0], apdu[1], apdu[2], apdu[3]
    body = apdu[4:]
    if not body:  # case 1
        return Command(cla, ins, p1, p2)
    if len(body) == 1:  # case 2 short
        return Command(cla, ins, p1, p2, ne=body[0] or SHORT_NE)
    if body[0] != 0:  # case 3/4 short
        lc = body[0]
        if len(body) == 1 + lc:
            return Command(cla, ins, p1, p2, body[1:])
        if len(body) == 2 + lc:
            return Command(cla, ins, p1, p2, body[1 : 1 + lc], ne=body[-1] or SHORT_NE)
        raise ApduFormatError("short APDU length mismatch")
    # body[0] == 0 and more bytes follow: extended length
    if len(body) == 3:  # case 2 extended
        le = int.from_bytes(body[1:3], "big")
        return Command(cla, ins, p1, p2, ne=le or EXTENDED_NE, extended=True)
    if len(body) < 3:
        raise ApduFormatError("truncated extended length")
    lc = int.from_bytes(body[1:3], "big")
    if lc == 0:
        raise ApduFormatError("extended Lc of zero")
    data = body[3 : 3 + lc]
    rest = body[3 + lc :]
    if len(data) != lc or len(rest) not in (0, 2):
        raise ApduFormatError("extended APDU length mismatch")
    ne = (int.from_bytes(rest, "big") or EXTENDED_NE) if rest else EXTENDED_NE
    return Command(cla, ins, p1, p2, data, ne=ne, extended=True)


# --- BER-TLV as the YubiKey applets use it (one-byte tags) -------------------------


def tlv(tag: int, value: bytes = b"") -> bytes:
    """Encode one TLV with a one-byte tag and a BER length (81/82 for long values)."""
    n = len(value)
    if n < 0x80:
        length = bytes([n])
    elif n <= 0xFF:
        length = bytes([0x81, n])
    else:
        length = bytes([0x82]) + n.to_bytes(2, "big")
    return bytes([tag]) + length + value


def iter_tlvs(
    data: bytes, *, single_byte_tags: frozenset[int] = frozenset()
) -> Iterator[tuple[int, bytes]]:
    """Yield (tag, value) pairs.

    Tags in `single_byte_tags` carry exactly one value byte and no length byte: YKOATH's
    PROPERTY tag (0x78) is written that way by yubikit and by the real applet.
    Raises ApduFormatError on truncated data.
    """
    i = 0
    while i < len(data):
        tag = data[i]
        i += 1
        if tag in single_byte_tags:
            if i >= len(data):
                raise ApduFormatError("truncated property")
            yield tag, data[i : i + 1]
            i += 1
            continue
        if i >= len(data):
            raise ApduFormatError("missing TLV length")
        n = data[i]
        i += 1
        if n == 0x81:
            if i >= len(data):
                raise ApduFormatError("truncated TLV length")
            n = data[i]
            i += 1
        elif n == 0x82:
            if i + 2 > len(data):
                raise ApduFormatError("truncated TLV length")
            n = int.from_bytes(data[i : i + 2], "big")
            i += 2
        elif n > 0x80:
            raise ApduFormatError("unsupported TLV length")
        if i + n > len(data):
            raise ApduFormatError("truncated TLV value")
        yield tag, data[i : i + n]
        i += n


class ResponsePager:
    """Response chaining as the YubiKey applets do it (SW 61xx + a "send remaining" INS).

    An answer longer than the host's Ne is cut at Ne bytes; the rest waits for the
    applet's send-remaining instruction (A5 for OATH, C0 GET RESPONSE elsewhere). SW2
    tells how many bytes are left, 00 when 256 or more. Any other command drops it.
    """

    def __init__(self, send_remaining_ins: int) -> None:
        self.send_remaining_ins = send_remaining_ins
        self._pending = b""

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def clear(self) -> None:
        self._pending = b""

    def page(self, data: bytes, ne: int) -> Response:
        """Answer `data`, keeping what exceeds `ne` for the next send-remaining."""
        head, self._pending = data[:ne], data[ne:]
        if not self._pending:
            return Response(head, SW.OK)
        left = len(self._pending)
        return Response(head, SW.MORE_DATA | (left if left < 256 else 0))

    def send_remaining(self, ne: int) -> Response:
        """Next page; 6D00 when nothing is owed (as a YubiKey 5 answers)."""
        if not self._pending:
            return status(SW.INS_NOT_SUPPORTED)
        return self.page(self._pending, ne)
