"""The YKOATH applet of an emulated YubiKey, as a pure state machine.

Why a hand-written applet: yubikit's OATH code is only ever tested against real keys.
This one answers the same APDUs a YubiKey 5 answers (tags, status words, response
chaining, password lock, touch), so the unmodified yubikit and ykman code runs in our
tests. No I/O and no yubikit import here: the card (card.py) feeds it parsed commands.

Secrets (credential seeds, the access key) live only in fields with repr=False and
are never put in logs, exceptions or introspection results.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from base64 import b64encode
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum, unique

from .apdu import SW, ApduFormatError, Command, Response, ResponsePager, iter_tlvs, status, tlv

AID = bytes.fromhex("a0000005272101")

# Instructions
INS_PUT = 0x01
INS_DELETE = 0x02
INS_SET_CODE = 0x03
INS_RESET = 0x04
INS_RENAME = 0x05
INS_LIST = 0xA1
INS_CALCULATE = 0xA2
INS_VALIDATE = 0xA3
INS_CALCULATE_ALL = 0xA4  # P1=00; the card routes A4 with P1=04 (SELECT) elsewhere
INS_SEND_REMAINING = 0xA5

# Tags
TAG_NAME = 0x71
TAG_NAME_LIST = 0x72
TAG_KEY = 0x73
TAG_CHALLENGE = 0x74
TAG_RESPONSE = 0x75
TAG_TRUNCATED = 0x76
TAG_HOTP = 0x77
TAG_PROPERTY = 0x78  # one value byte, no length byte
TAG_VERSION = 0x79
TAG_IMF = 0x7A
TAG_ALGORITHM = 0x7B
TAG_TOUCH = 0x7C

PROP_REQUIRE_TOUCH = 0x02

MAX_NAME_LENGTH = 64
SALT_LENGTH = 8
CHALLENGE_LENGTH = 8
DEFAULT_PERIOD = 30
RENAME_MIN_FIRMWARE = (5, 3, 1)
LARGE_CAPACITY_FIRMWARE = (5, 7, 0)

_PERIOD_PREFIX = re.compile(rb"^(\d+)/")


@unique
class OathType(IntEnum):
    HOTP = 0x10
    TOTP = 0x20


@unique
class HashAlgorithm(IntEnum):
    SHA1 = 0x01
    SHA256 = 0x02
    SHA512 = 0x03

    @property
    def hashlib_name(self) -> str:
        return self.name.lower()

    @property
    def block_size(self) -> int:
        return 128 if self is HashAlgorithm.SHA512 else 64


@dataclass(frozen=True)
class CredentialInfo:
    """What tests may know about a stored credential: everything but the secret."""

    id: str
    oath_type: OathType
    algorithm: HashAlgorithm
    digits: int
    period: int  # TOTP period from the id, 0 for HOTP
    touch: bool
    counter: int  # HOTP moving factor, 0 for TOTP


@dataclass
class _Credential:
    name: bytes
    oath_type: OathType
    algorithm: HashAlgorithm
    digits: int
    secret: bytes = field(repr=False)
    touch: bool = False
    counter: int = 0

    def info(self) -> CredentialInfo:
        period = 0
        if self.oath_type is OathType.TOTP:
            m = _PERIOD_PREFIX.match(self.name)
            period = int(m.group(1)) if m else DEFAULT_PERIOD
        return CredentialInfo(
            id=self.name.decode("utf-8", errors="replace"),
            oath_type=self.oath_type,
            algorithm=self.algorithm,
            digits=self.digits,
            period=period,
            touch=self.touch,
            counter=self.counter,
        )

    def hmac(self, message: bytes) -> bytes:
        # HMAC itself hashes keys longer than a block and zero-pads shorter ones, which
        # is exactly the real key's secret handling (yubikit also pre-shortens/pads).
        return hmac.new(self.secret, message, self.algorithm.hashlib_name).digest()


@dataclass
class _AccessKey:
    algorithm: HashAlgorithm
    key: bytes = field(repr=False)

    def hmac(self, message: bytes) -> bytes:
        return hmac.new(self.key, message, self.algorithm.hashlib_name).digest()


class OathError(Exception):
    """A command the applet refuses; carries the status word to answer."""

    def __init__(self, sw: int, reason: str) -> None:
        super().__init__(f"{reason} (SW {sw:04x})")
        self.sw = sw


def derive_access_key(password: str, salt: bytes) -> bytes:
    """The access key yubikit and ykman derive from an OATH password."""
    return hashlib.pbkdf2_hmac("sha1", password.encode(), salt, 1000, 16)


def device_id_for_salt(salt: bytes) -> str:
    """The device id yubikit shows for a salt (changes on every reset)."""
    return b64encode(hashlib.sha256(salt).digest()[:16]).replace(b"=", b"").decode()


def _truncate(digest: bytes) -> bytes:
    """RFC 4226 dynamic truncation, 31 bits."""
    offset = digest[-1] & 0x0F
    value = int.from_bytes(digest[offset : offset + 4], "big") & 0x7FFFFFFF
    return value.to_bytes(4, "big")


class OathApplet:
    """The YKOATH applet: persistent credentials plus per-selection session state."""

    send_remaining_ins = INS_SEND_REMAINING

    def __init__(
        self,
        firmware: tuple[int, int, int],
        *,
        user_touches: Callable[[], bool],
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._firmware = firmware
        self._user_touches = user_touches
        self._random = random
        # Persistent (survives power cycles)
        self._salt = random(SALT_LENGTH)
        self._credentials: dict[bytes, _Credential] = {}
        #: Every secret ever stored (deleted ones too), for the tests' leak checks only.
        self.secrets_seen: list[bytes] = []
        self._access_key: _AccessKey | None = None
        # Volatile (per selection)
        self._unlocked = True
        self._challenge: bytes | None = None
        self._pager = ResponsePager(INS_SEND_REMAINING)
        self.touch_requests = 0

    # --- introspection for tests (never the secrets) ----------------------------------

    @property
    def capacity(self) -> int:
        return 64 if self._firmware >= LARGE_CAPACITY_FIRMWARE else 32

    @property
    def device_id(self) -> str:
        return device_id_for_salt(self._salt)

    @property
    def has_password(self) -> bool:
        return self._access_key is not None

    def credentials(self) -> list[CredentialInfo]:
        return [c.info() for c in self._credentials.values()]

    def __repr__(self) -> str:
        return (
            f"OathApplet(device_id={self.device_id!r}, credentials={len(self._credentials)}"
            f"/{self.capacity}, password={self.has_password})"
        )

    # --- set-up shortcuts for the card's knobs --------------------------------------

    def set_password(self, password: str | None) -> None:
        """Protect the applet as `ykman oath access change -n PASSWORD` would."""
        if password is None:
            self._access_key = None
        else:
            key = derive_access_key(password, self._salt)
            self._access_key = _AccessKey(HashAlgorithm.SHA1, key)

    def install_credential(
        self,
        credential_id: str,
        secret: bytes,
        *,
        oath_type: OathType = OathType.TOTP,
        algorithm: HashAlgorithm = HashAlgorithm.SHA1,
        digits: int = 6,
        touch: bool = False,
        counter: int = 0,
    ) -> None:
        """Store a credential as PUT would; ValueError when the real key would refuse."""
        try:
            self._store(
                _Credential(
                    credential_id.encode(), oath_type, algorithm, digits, secret, touch, counter
                )
            )
        except OathError as e:
            raise ValueError(str(e)) from None

    # --- card interface ---------------------------------------------------------------

    def select(self) -> Response:
        """SELECT: version, salt, and a challenge when a password is set."""
        self.deselect()
        data = tlv(TAG_VERSION, bytes(self._firmware)) + tlv(TAG_NAME, self._salt)
        if self._access_key is not None:
            self._unlocked = False
            self._challenge = self._random(CHALLENGE_LENGTH)
            data += tlv(TAG_CHALLENGE, self._challenge)
            data += tlv(TAG_ALGORITHM, bytes([self._access_key.algorithm]))
        return Response(data)

    def deselect(self) -> None:
        """Another applet was selected, or the card lost power: drop session state."""
        self._unlocked = True
        self._challenge = None
        self._pager.clear()

    def process(self, cmd: Command) -> Response:
        if cmd.ins == INS_SEND_REMAINING:
            return self._pager.send_remaining(cmd.ne)
        self._pager.clear()
        if not self._unlocked and cmd.ins not in (INS_VALIDATE, INS_RESET):
            return status(SW.SECURITY_CONDITION_NOT_SATISFIED)
        handler = self._handlers().get(cmd.ins)
        if handler is None:
            return status(SW.INS_NOT_SUPPORTED)
        try:
            data = handler(cmd)
        except OathError as e:
            return status(e.sw)
        except ApduFormatError:
            return status(SW.WRONG_DATA)
        return self._pager.page(data, cmd.ne)

    # --- instructions -----------------------------------------------------------------

    def _handlers(self) -> dict[int, Callable[[Command], bytes]]:
        handlers: dict[int, Callable[[Command], bytes]] = {
            INS_PUT: self._put,
            INS_DELETE: self._delete,
            INS_SET_CODE: self._set_code,
            INS_RESET: self._reset,
            INS_LIST: self._list,
            INS_CALCULATE: self._calculate,
            INS_VALIDATE: self._validate,
            INS_CALCULATE_ALL: self._calculate_all,
        }
        if self._firmware >= RENAME_MIN_FIRMWARE:
            handlers[INS_RENAME] = self._rename
        return handlers

    def _put(self, cmd: Command) -> bytes:
        _require_p1p2(cmd, 0, 0)
        name = key = None
        touch = False
        counter = 0
        for tag, value in iter_tlvs(cmd.data, single_byte_tags=frozenset({TAG_PROPERTY})):
            if tag == TAG_NAME:
                name = value
            elif tag == TAG_KEY:
                key = value
            elif tag == TAG_PROPERTY:
                touch = bool(value[0] & PROP_REQUIRE_TOUCH)
            elif tag == TAG_IMF:
                if len(value) != 4:
                    raise OathError(SW.WRONG_DATA, "IMF must be 4 bytes")
                counter = int.from_bytes(value, "big")
            else:
                raise OathError(SW.WRONG_DATA, f"unexpected tag {tag:02x}")
        if name is None or key is None or len(key) < 2:
            raise OathError(SW.WRONG_DATA, "PUT needs a name and a key")
        oath_type, algorithm = _split_type(key[0])
        self._store(_Credential(name, oath_type, algorithm, key[1], key[2:], touch, counter))
        return b""

    def _store(self, cred: _Credential) -> None:
        if not 0 < len(cred.name) <= MAX_NAME_LENGTH:
            raise OathError(SW.WRONG_DATA, "name length out of range")
        if not 6 <= cred.digits <= 8:
            raise OathError(SW.WRONG_DATA, "digits out of range")
        if len(cred.secret) > cred.algorithm.block_size:
            raise OathError(SW.WRONG_DATA, "secret longer than the hash block")
        if cred.name not in self._credentials and len(self._credentials) >= self.capacity:
            raise OathError(SW.NO_SPACE, "no space for another credential")
        self._credentials[cred.name] = cred
        self.secrets_seen.append(cred.secret)

    def _delete(self, cmd: Command) -> bytes:
        _require_p1p2(cmd, 0, 0)
        name = _single(cmd.data, TAG_NAME)
        if self._credentials.pop(name, None) is None:
            raise OathError(SW.DATA_INVALID, "no such credential")
        return b""

    def _rename(self, cmd: Command) -> bytes:
        _require_p1p2(cmd, 0, 0)
        names = [v for t, v in iter_tlvs(cmd.data) if t == TAG_NAME]
        if len(names) != 2:
            raise OathError(SW.WRONG_DATA, "RENAME needs two names")
        old, new = names
        if old not in self._credentials:
            raise OathError(SW.DATA_INVALID, "no such credential")
        if new in self._credentials or not 0 < len(new) <= MAX_NAME_LENGTH:
            raise OathError(SW.WRONG_DATA, "bad new name")
        # Rebuild to keep the credential's place in LIST order.
        self._credentials = {(new if k == old else k): c for k, c in self._credentials.items()}
        self._credentials[new].name = new
        return b""

    def _set_code(self, cmd: Command) -> bytes:
        _require_p1p2(cmd, 0, 0)
        fields = dict(iter_tlvs(cmd.data))
        key = fields.get(TAG_KEY)
        if key is None:
            raise OathError(SW.WRONG_DATA, "SET_CODE needs a key")
        if not key:
            self._access_key = None
            return b""
        _, algorithm = _split_type(key[0])
        new_key = _AccessKey(algorithm, key[1:])
        challenge = fields.get(TAG_CHALLENGE)
        response = fields.get(TAG_RESPONSE)
        if challenge is None or response is None:
            raise OathError(SW.WRONG_DATA, "SET_CODE needs a challenge and a response")
        if not hmac.compare_digest(new_key.hmac(challenge), response):
            raise OathError(SW.DATA_INVALID, "response does not match the new key")
        self._access_key = new_key
        return b""

    def _validate(self, cmd: Command) -> bytes:
        _require_p1p2(cmd, 0, 0)
        if self._access_key is None:
            raise OathError(SW.DATA_INVALID, "no password set")
        fields = dict(iter_tlvs(cmd.data))
        response = fields.get(TAG_RESPONSE)
        host_challenge = fields.get(TAG_CHALLENGE)
        if response is None or not host_challenge:
            raise OathError(SW.WRONG_DATA, "VALIDATE needs a response and a challenge")
        expected = self._access_key.hmac(self._challenge) if self._challenge else b""
        if not expected or not hmac.compare_digest(expected, response):
            raise OathError(SW.WRONG_DATA, "wrong access key")
        self._unlocked = True
        self._challenge = None
        return tlv(TAG_RESPONSE, self._access_key.hmac(host_challenge))

    def _reset(self, cmd: Command) -> bytes:
        _require_p1p2(cmd, 0xDE, 0xAD)
        self._salt = self._random(SALT_LENGTH)
        self._credentials.clear()
        self._access_key = None
        self.deselect()
        return b""

    def _list(self, cmd: Command) -> bytes:
        return b"".join(
            tlv(TAG_NAME_LIST, bytes([c.oath_type | c.algorithm]) + c.name)
            for c in self._credentials.values()
        )

    def _calculate(self, cmd: Command) -> bytes:
        truncate = _truncate_flag(cmd)
        fields = dict(iter_tlvs(cmd.data))
        name = fields.get(TAG_NAME)
        challenge = fields.get(TAG_CHALLENGE)
        if name is None or challenge is None:
            raise OathError(SW.WRONG_DATA, "CALCULATE needs a name and a challenge")
        cred = self._credentials.get(name)
        if cred is None:
            raise OathError(SW.DATA_INVALID, "no such credential")
        if cred.touch:
            self.touch_requests += 1
            if not self._user_touches():
                # What a real key answers when the touch times out (ykman: "Touch
                # account timed out!").
                raise OathError(SW.SECURITY_CONDITION_NOT_SATISFIED, "touch timed out")
        if cred.oath_type is OathType.HOTP:
            challenge = cred.counter.to_bytes(8, "big")
            cred.counter += 1
        return _code_tlv(cred, challenge, truncate)

    def _calculate_all(self, cmd: Command) -> bytes:
        truncate = _truncate_flag(cmd)
        challenge = _single(cmd.data, TAG_CHALLENGE)
        out = bytearray()
        for cred in self._credentials.values():
            out += tlv(TAG_NAME, cred.name)
            if cred.oath_type is OathType.HOTP:
                out += tlv(TAG_HOTP, bytes([cred.digits]))
            elif cred.touch:
                out += tlv(TAG_TOUCH, bytes([cred.digits]))
            else:
                # Computed with the host's challenge even for a non-30 s period, as the
                # real key does; yubikit recalculates those itself.
                out += _code_tlv(cred, challenge, truncate)
        return bytes(out)


def _code_tlv(cred: _Credential, challenge: bytes, truncate: bool) -> bytes:
    digest = cred.hmac(challenge)
    if truncate:
        return tlv(TAG_TRUNCATED, bytes([cred.digits]) + _truncate(digest))
    return tlv(TAG_RESPONSE, bytes([cred.digits]) + digest)


def _split_type(type_byte: int) -> tuple[OathType, HashAlgorithm]:
    try:
        return OathType(type_byte & 0xF0), HashAlgorithm(type_byte & 0x0F)
    except ValueError:
        raise OathError(SW.WRONG_DATA, "unknown type or algorithm") from None


def _single(data: bytes, tag: int) -> bytes:
    for t, value in iter_tlvs(data):
        if t == tag:
            return value
    raise OathError(SW.WRONG_DATA, f"missing tag {tag:02x}")


def _require_p1p2(cmd: Command, p1: int, p2: int) -> None:
    if (cmd.p1, cmd.p2) != (p1, p2):
        raise OathError(SW.WRONG_P1P2, "wrong P1/P2")


def _truncate_flag(cmd: Command) -> bool:
    if cmd.p1 != 0 or cmd.p2 not in (0, 1):
        raise OathError(SW.WRONG_P1P2, "wrong P1/P2")
    return cmd.p2 == 1
