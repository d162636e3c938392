"""Which TOTP codes the stand-in accepts, and why it refuses the others.

IAM's virtual MFA devices use RFC 6238 with SHA1, 6 digits and a 30 s step. AWS does not
publish its acceptance window; the stand-in accepts, at server step N:

* a code pair (EnableMFADevice, ResyncMFADevice): the codes of two consecutive steps
  (s-1, s) with s in N-1..N, i.e. the pairs (N-2, N-1) and (N-1, N). Never (N, N+1):
  a device cannot show the code of a step that has not begun, so a pair reaching into
  the future is codes computed for the wrong steps (the desk submits N-1 and N);
* a single code (GetSessionToken): the code of a step in N-1..N+1 (a login allows for a
  device's clock running a step ahead, as TOTP verifiers do).

Everything here is pure: the time is an argument and nothing is logged. Refusals carry a
short reason and, when the codes are recognisable within ``DIAGNOSTIC_STEPS`` of N, how
many steps away they are (``step_offset`` = s - N), so a test or the demo can tell a
clock skew from a wrong seed. Codes are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from enum import StrEnum

import pyotp

STEP_SECONDS = 30
DIGITS = 6
PAIR_OFFSETS = (0, -1)  # s - N for the later code of a pair, most likely first
CODE_OFFSETS = (0, -1, 1)  # s - N for a login code
DIAGNOSTIC_STEPS = 20  # how far to look for a refused code, for the log only

_CODE_RE = re.compile(r"[0-9]{6}")


class Refusal(StrEnum):
    """Why codes were refused (the values appear in the attempt log)."""

    MALFORMED = "malformed-code"
    WRONG_CODE = "wrong-code"
    NOT_CONSECUTIVE = "not-consecutive"
    OUTSIDE_WINDOW = "outside-window"
    REUSED = "code-reused"


@dataclass(frozen=True)
class Verdict:
    """The outcome of a check.

    ``step`` is the server step s that matched (the later of a pair), ``step_offset`` is
    s - N. Both are None when the codes could not be placed at all.
    """

    accepted: bool
    reason: Refusal | None = None
    step: int | None = None
    step_offset: int | None = None


def step_at(now: float) -> int:
    """The TOTP time step containing ``now`` (seconds since the epoch)."""
    return int(now // STEP_SECONDS)


def is_well_formed(code: str | None) -> bool:
    """True for exactly six ASCII digits, the only shape IAM's model allows."""
    return code is not None and _CODE_RE.fullmatch(code) is not None


class _Codes:
    """Codes of one seed by step, computed on demand (the seed never leaves)."""

    def __init__(self, seed: str) -> None:
        self._totp = pyotp.TOTP(seed, digits=DIGITS, digest=hashlib.sha1, interval=STEP_SECONDS)
        self._cache: dict[int, str] = {}

    def __repr__(self) -> str:
        return "<_Codes>"

    def matches(self, step: int, code: str) -> bool:
        if step not in self._cache:
            self._cache[step] = self._totp.generate_otp(step)
        return hmac.compare_digest(self._cache[step], code)

    def steps_matching(self, code: str, around: int) -> list[int]:
        """Steps within DIAGNOSTIC_STEPS of ``around`` whose code is ``code``, nearest first."""
        offsets = sorted(range(-DIAGNOSTIC_STEPS, DIAGNOSTIC_STEPS + 1), key=abs)
        return [around + d for d in offsets if self.matches(around + d, code)]


def check_code_pair(seed: str, code1: str, code2: str, *, now: float) -> Verdict:
    """Check two codes as EnableMFADevice/ResyncMFADevice do: consecutive, ending at N or
    N-1."""
    if not (is_well_formed(code1) and is_well_formed(code2)):
        return Verdict(False, Refusal.MALFORMED)
    codes = _Codes(seed)
    current = step_at(now)
    for offset in PAIR_OFFSETS:
        s = current + offset
        if codes.matches(s - 1, code1) and codes.matches(s, code2):
            return Verdict(True, None, s, offset)
    # Refused: find out why, for the log. Acceptance above is the only decision.
    later = codes.steps_matching(code2, current)
    for s in later:
        if codes.matches(s - 1, code1):
            return Verdict(False, Refusal.OUTSIDE_WINDOW, s, s - current)
    earlier = codes.steps_matching(code1, current)
    if earlier and later:
        return Verdict(False, Refusal.NOT_CONSECUTIVE, later[0], later[0] - current)
    return Verdict(False, Refusal.WRONG_CODE)


def check_code(seed: str, code: str, *, now: float, after_step: int | None = None) -> Verdict:
    """Check one code as GetSessionToken does: a step in N-1..N+1.

    ``after_step`` is the last step already used for a login with this device; a code
    of that step or an earlier one is refused as reused (RFC 6238 section 5.2).
    """
    if not is_well_formed(code):
        return Verdict(False, Refusal.MALFORMED)
    codes = _Codes(seed)
    current = step_at(now)
    for offset in CODE_OFFSETS:
        s = current + offset
        if codes.matches(s, code):
            if after_step is not None and s <= after_step:
                return Verdict(False, Refusal.REUSED, s, offset)
            return Verdict(True, None, s, offset)
    near = codes.steps_matching(code, current)
    if near:
        return Verdict(False, Refusal.OUTSIDE_WINDOW, near[0], near[0] - current)
    return Verdict(False, Refusal.WRONG_CODE)
