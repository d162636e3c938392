"""The seed: a secret value with a short life.

AWS generates the seed and hands it over once; the desk writes it into the token and
forgets it. This wrapper keeps it out of every repr, str, log line, pickle and exception
message, and lets the enrollment wipe its bytes when it is done (best effort in Python:
the copies botocore and yubikit make are beyond our reach, which is why the process
itself is kept non-dumpable by the daemon).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import NoReturn


class Seed:
    """A TOTP key. ``reveal()`` is the only way to the bytes."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes | bytearray) -> None:
        if not key:
            raise ValueError("empty seed")
        self._key = bytearray(key)

    @classmethod
    def from_base32(cls, text: bytes | str) -> Seed:
        """Decode AWS's Base32StringSeed (64 characters, 40 bytes)."""
        raw = text.encode("ascii") if isinstance(text, str) else bytes(text)
        raw = raw.strip().upper()
        padded = raw + b"=" * (-len(raw) % 8)
        try:
            key = base64.b32decode(padded)
        except (binascii.Error, ValueError):
            # Deliberately no detail: the text is the secret.
            raise ValueError("the seed is not valid base32") from None
        return cls(key)

    def reveal(self) -> bytes:
        if not self._key:
            raise ValueError("the seed was wiped")
        return bytes(self._key)

    def base32(self) -> str:
        return base64.b32encode(self.reveal()).decode("ascii").rstrip("=")

    def wipe(self) -> None:
        """Overwrite the bytes we own; after this the seed is gone."""
        for i in range(len(self._key)):
            self._key[i] = 0
        self._key = bytearray()

    @property
    def wiped(self) -> bool:
        return not self._key

    def __len__(self) -> int:
        return len(self._key)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Seed):
            return NotImplemented
        return hmac.compare_digest(bytes(self._key), bytes(other._key))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "Seed(<redacted>)" if self._key else "Seed(<wiped>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __reduce__(self) -> NoReturn:
        raise TypeError("a seed is never pickled")

    def __getstate__(self) -> NoReturn:
        raise TypeError("a seed is never pickled")
