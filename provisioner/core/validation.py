"""Checks made before anything is sent to IAM (botocore checks no patterns or maximums),
and the one way numbers are read from text (rosters, the command line, tags, settings)."""

from __future__ import annotations

import re

from provisioner.core.errors import InvalidInput

_USER = re.compile(r"[\w+=,.@-]{1,64}", re.ASCII)
_DEVICE_NAME = re.compile(r"[\w+=,.@-]{1,226}", re.ASCII)
_PATH = re.compile(r"/|/[\x21-\x7e]{1,510}/", re.ASCII)
_SERIAL = re.compile(r"[\w+=/:,.@-]{9,256}", re.ASCII)
_ACCOUNT = re.compile(r"[A-Za-z0-9_-]{1,32}", re.ASCII)
_CODE = re.compile(r"[0-9]{6}", re.ASCII)
_TAG_KEY = re.compile(r"[\w\s.:/=+\-@]{1,128}")
_TAG_VALUE = re.compile(r"[\w\s.:/=+\-@]{0,256}")
MAX_TAGS = 50
# Digits 0-9 only: int() also reads " 7", "+7", "1_000" and other scripts' digits ("١٢"),
# and str.isdigit() passes "²", which int() then refuses with a ValueError.
_DIGITS = re.compile(r"[0-9]{1,20}", re.ASCII)
#: A YubiKey's serial is an unsigned 32-bit number; 0 is none.
SERIAL_MAX = 2**32 - 1


def user_name(value: str) -> str:
    if not _USER.fullmatch(value):
        raise InvalidInput(
            f"{value!r} is not a valid IAM user name (1 to 64 of letters, digits and + = , . @ _ -)"
        )
    return value


def account_name(value: str) -> str:
    """An account's short name in the configuration (prod, dev, ...)."""
    if not _ACCOUNT.fullmatch(value):
        raise InvalidInput(
            f"{value!r} is not a valid account name (1 to 32 of letters, digits, - and _)"
        )
    return value


def account_names(text: str) -> str:
    """``prod,dev`` (or ``prod;dev``, as a roster writes them) as ``prod,dev``: each a
    valid name, none twice."""
    names = [account_name(n.strip()) for n in re.split(r"[,;]", text) if n.strip()]
    if not names:
        raise InvalidInput(f"{text!r} names no account")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InvalidInput(f"account {twice[0]} is named twice")
    return ",".join(names)


def device_name(value: str) -> str:
    if not _DEVICE_NAME.fullmatch(value):
        raise InvalidInput(
            f"{value!r} is not a valid virtual MFA device name "
            "(1 to 226 of letters, digits and + = , . @ _ -)"
        )
    return value


def device_path(value: str) -> str:
    if not _PATH.fullmatch(value) or "//" in value:
        raise InvalidInput(f"{value!r} is not a valid IAM path (like / or /desk/)")
    return value


def serial_number(value: str) -> str:
    if not _SERIAL.fullmatch(value):
        raise InvalidInput(f"{value!r} is not a valid MFA device serial number")
    return value


def auth_code(value: str) -> str:
    if not _CODE.fullmatch(value):
        # No value in the message: a code is short-lived, but it is still a credential.
        raise InvalidInput("an authentication code must be exactly six digits")
    return value


def tags(pairs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    if len(pairs) > MAX_TAGS:
        raise InvalidInput(f"{len(pairs)} tags given; IAM takes at most {MAX_TAGS}")
    seen: set[str] = set()
    for key, value in pairs:
        if not _TAG_KEY.fullmatch(key) or key.lower().startswith("aws:"):
            raise InvalidInput(f"{key!r} is not a valid IAM tag key")
        if not _TAG_VALUE.fullmatch(value):
            raise InvalidInput(f"the value of tag {key!r} is not valid for IAM: {value!r}")
        if key.lower() in seen:
            raise InvalidInput(f"tag {key!r} is given twice")
        seen.add(key.lower())
    return pairs


def whole_number(text: str, what: str, *, minimum: int = 0, maximum: int) -> int:
    """``text`` as an integer from ``minimum`` to ``maximum``, written in ASCII digits only.

    The one parser for numbers typed or read from files: serials, request numbers, ports.
    """
    if _DIGITS.fullmatch(text):
        value = int(text)
        if minimum <= value <= maximum:
            return value
    shown = text if len(text) <= 24 else text[:20] + "..."
    raise InvalidInput(f"{shown!r} is not {what} ({minimum} to {maximum}, digits 0-9 only)")


def token_serial(text: str) -> int:
    """A token's serial number as printed on the key (and in rosters, tags, --serial)."""
    return whole_number(text, "a token serial number", minimum=1, maximum=SERIAL_MAX)
