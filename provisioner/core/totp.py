"""TOTP arithmetic and the choice of the two time steps to submit.

The YubiKey has no clock: the host gives it the time step, so both codes can be computed
at once. AWS wants two consecutive codes; the conservative pair is the previous step and
the current one, submitted while the current step lasts (what the console flow amounts
to). When too little of the current step is left we wait for the next one: at most the
margin, never a whole period.
"""

from __future__ import annotations

import hmac
import math
from dataclasses import dataclass

import pyotp

from provisioner.core.model import TOTP_DIGITS, TOTP_PERIOD
from provisioner.core.secret import Seed


def time_step(timestamp: float, period: int = TOTP_PERIOD) -> int:
    return math.floor(timestamp / period)


def code_at(seed: Seed, timestamp: float, *, digits: int = TOTP_DIGITS) -> str:
    """The RFC 6238 code (SHA1) of ``seed`` at ``timestamp``."""
    return pyotp.TOTP(seed.base32(), digits=digits, interval=TOTP_PERIOD).at(int(timestamp))


def codes_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


@dataclass(frozen=True)
class WindowPlan:
    """When to compute and which two steps: ``first_step`` and ``first_step + 1``."""

    wait: float
    first_step: int
    seconds_left: float

    @property
    def timestamps(self) -> tuple[int, int]:
        """Timestamps inside each step, for the token's CALCULATE.

        The middle of a step, not its start: a timestamp of 0 means "now" to yubikit, and
        the middle survives any rounding on the way.
        """
        half = TOTP_PERIOD // 2
        return (
            self.first_step * TOTP_PERIOD + half,
            (self.first_step + 1) * TOTP_PERIOD + half,
        )


def plan_window(now: float, *, margin: float, uncertainty: float = 0.0) -> WindowPlan:
    """Choose the steps for a submission made at ``now`` (AWS's time, best estimate).

    ``uncertainty`` is how far ``now`` may be off (the Date header has 1 s resolution).
    If less than ``margin`` is surely left of the current step, wait until the next step
    has surely begun and use that one. Early in a step, wait until it has surely begun:
    while AWS may still be in the previous step, its code is one of the future.
    """
    if margin < 0 or margin >= TOTP_PERIOD:
        raise ValueError("margin must be at least 0 and less than one period")
    step = time_step(now)
    left = (step + 1) * TOTP_PERIOD - now - uncertainty
    if left >= margin:
        early = max(0.0, step * TOTP_PERIOD + uncertainty - now)
        return WindowPlan(wait=early, first_step=step - 1, seconds_left=left - early)
    wait = (step + 1) * TOTP_PERIOD - now + uncertainty
    return WindowPlan(wait=wait, first_step=step, seconds_left=TOTP_PERIOD - 2 * uncertainty)
