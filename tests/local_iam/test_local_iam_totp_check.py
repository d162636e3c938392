"""The acceptance window, checked without a server (time is an argument)."""

from __future__ import annotations

import pyotp
import pytest

from local_iam_server.totp_check import (
    Refusal,
    check_code,
    check_code_pair,
    is_well_formed,
    step_at,
)

SEED = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
NOW = 1_700_000_015.0  # 15 s into step N
N = step_at(NOW)


def code(step: int) -> str:
    return str(pyotp.TOTP(SEED).generate_otp(step))


def test_rfc6238_sha1_vector_through_the_same_generator() -> None:
    # RFC 6238 appendix B, SHA1, T=59 -> 94287082 (8 digits); 6 digits are its tail.
    rfc_seed = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"  # base32 of "12345678901234567890"
    assert pyotp.TOTP(rfc_seed).generate_otp(step_at(59)) == "287082"


@pytest.mark.parametrize("offset", [-1, 0])
def test_pair_of_consecutive_steps_ending_at_now_or_one_before_is_accepted(offset: int) -> None:
    s = N + offset
    verdict = check_code_pair(SEED, code(s - 1), code(s), now=NOW)
    assert verdict.accepted
    assert verdict.step_offset == offset
    assert verdict.step == s


def test_pair_ending_in_a_step_not_yet_begun_is_refused() -> None:
    # N and N+1 at step N: the later code is one the device could not show yet.
    verdict = check_code_pair(SEED, code(N), code(N + 1), now=NOW)
    assert (verdict.accepted, verdict.reason, verdict.step, verdict.step_offset) == (
        False,
        Refusal.OUTSIDE_WINDOW,
        N + 1,
        1,
    )


def test_pair_ending_at_now_is_accepted_from_the_first_instant_of_the_step() -> None:
    start = N * 30.0
    assert check_code_pair(SEED, code(N - 1), code(N), now=start).accepted
    early = check_code_pair(SEED, code(N - 1), code(N), now=start - 0.001)
    assert (early.accepted, early.step_offset) == (False, 1)


@pytest.mark.parametrize("offset", [-3, -2, 1, 2, 3])
def test_pair_further_away_is_refused_as_outside_the_window(offset: int) -> None:
    s = N + offset
    verdict = check_code_pair(SEED, code(s - 1), code(s), now=NOW)
    assert not verdict.accepted
    assert verdict.reason is Refusal.OUTSIDE_WINDOW
    assert verdict.step_offset == offset


def test_pair_in_reverse_order_is_refused() -> None:
    verdict = check_code_pair(SEED, code(N), code(N - 1), now=NOW)
    assert not verdict.accepted
    assert verdict.reason is Refusal.NOT_CONSECUTIVE


def test_same_code_twice_is_refused() -> None:
    verdict = check_code_pair(SEED, code(N), code(N), now=NOW)
    assert (verdict.accepted, verdict.reason) == (False, Refusal.NOT_CONSECUTIVE)


def test_gap_of_one_step_is_refused() -> None:
    verdict = check_code_pair(SEED, code(N - 2), code(N), now=NOW)
    assert (verdict.accepted, verdict.reason, verdict.step_offset) == (
        False,
        Refusal.NOT_CONSECUTIVE,
        0,
    )


def test_codes_of_another_seed_are_wrong() -> None:
    other = pyotp.random_base32(64)
    totp = pyotp.TOTP(other)
    verdict = check_code_pair(SEED, totp.generate_otp(N - 1), totp.generate_otp(N), now=NOW)
    assert (verdict.accepted, verdict.reason, verdict.step_offset) == (
        False,
        Refusal.WRONG_CODE,
        None,
    )


@pytest.mark.parametrize("bad", ["12345", "1234567", "abcdef", "12 345", "", "１２３４５６"])
def test_malformed_codes_are_refused_before_any_check(bad: str) -> None:
    assert not is_well_formed(bad)
    assert check_code_pair(SEED, bad, code(N), now=NOW).reason is Refusal.MALFORMED
    assert check_code(SEED, bad, now=NOW).reason is Refusal.MALFORMED


@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_single_code_within_one_step_is_accepted(offset: int) -> None:
    verdict = check_code(SEED, code(N + offset), now=NOW)
    assert (verdict.accepted, verdict.step_offset) == (True, offset)


@pytest.mark.parametrize("offset", [-2, 2])
def test_single_code_two_steps_away_is_refused(offset: int) -> None:
    verdict = check_code(SEED, code(N + offset), now=NOW)
    assert (verdict.accepted, verdict.reason, verdict.step_offset) == (
        False,
        Refusal.OUTSIDE_WINDOW,
        offset,
    )


def test_single_code_of_an_already_used_step_is_refused() -> None:
    assert check_code(SEED, code(N), now=NOW, after_step=N - 1).accepted
    reused = check_code(SEED, code(N), now=NOW, after_step=N)
    assert (reused.accepted, reused.reason) == (False, Refusal.REUSED)
    older = check_code(SEED, code(N - 1), now=NOW, after_step=N)
    assert (older.accepted, older.reason) == (False, Refusal.REUSED)


def test_step_boundaries() -> None:
    assert step_at(0.0) == 0
    assert step_at(29.999) == 0
    assert step_at(30.0) == 1
