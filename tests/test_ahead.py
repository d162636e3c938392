"""Work moved before the plug (core): a queued user checked, their device made, before
their token is plugged in; the plug then waits only for what remains. Fake IAM, the
emulated YubiKey through the real token adapter."""

from __future__ import annotations

import pytest
from test_enrollment import ARN, CRED_ID, Desk

from emulated_yubikey import EmulatedYubiKey
from provisioner.core.enrollment import Enrollment, Leg
from provisioner.core.errors import (
    AlreadyEnrolled,
    CodesRejected,
    DeviceLimitReached,
    EnrollmentFailed,
    UserNotFound,
)

AHEAD_ARN = "arn:aws:iam::123456789012:mfa/provisioner/alice.yubikey.q7-0a1b2c"


def prepared(desk: Desk, *, device: bool = True, serial: int | None = None) -> Leg:
    leg = Leg("alice")
    enrollment = Enrollment(desk.iam, desk.clock, desk.settings, desk.progress)
    enrollment.prepare(leg)
    if device:
        enrollment.make_device(leg, serial, "q7-0a1b2c")
    desk.iam.calls.clear()
    return leg


def plug(desk: Desk, leg: Leg) -> object:
    with desk.token() as token:
        return Enrollment(desk.iam, desk.clock, desk.settings, desk.progress).run_leg(token, leg)


def test_a_device_made_ahead_leaves_only_the_enable_for_the_plug() -> None:
    desk = Desk()
    leg = prepared(desk)
    assert desk.iam.unassigned() == [AHEAD_ARN]  # made, named for the request
    assert "Seed" not in repr(leg)  # the seed is in memory, never in a repr
    result = plug(desk, leg)
    # the token waited for one call; the serial's tag, owed, came after it
    assert desk.iam.calls == ["enable_mfa_device", "tag_device"]
    assert result.device_arn == AHEAD_ARN  # type: ignore[attr-defined]
    assert desk.iam.users["alice"] == [AHEAD_ARN]
    assert dict(desk.iam.devices[AHEAD_ARN].tags)["provisioner:token-serial"] == "12345678"
    assert desk.credential_ids() == [CRED_ID]
    assert leg.seed is not None and leg.seed.wiped


def test_a_device_made_for_a_known_serial_has_its_usual_name_and_no_tag_owed() -> None:
    desk = Desk()
    leg = prepared(desk, serial=12345678)
    assert desk.iam.unassigned() == [ARN]
    plug(desk, leg)
    assert desk.iam.calls == ["enable_mfa_device"]
    assert desk.iam.users["alice"] == [ARN]


def test_checks_made_ahead_leave_create_and_enable() -> None:
    desk = Desk()
    leg = prepared(desk, device=False)
    assert desk.iam.devices == {}  # checks only: nothing made
    plug(desk, leg)
    assert desk.iam.calls == ["create_virtual_mfa_device", "enable_mfa_device"]
    assert desk.iam.users["alice"] == [ARN]


def test_a_failure_after_the_plug_undoes_the_device_made_ahead_too() -> None:
    desk = Desk()
    leg = prepared(desk)
    desk.iam.fail("enable_mfa_device", CodesRejected("codes refused"))
    with pytest.raises(EnrollmentFailed) as info:
        plug(desk, leg)
    assert info.value.leftovers == ()
    assert desk.iam.devices == {} and desk.iam.users["alice"] == []
    assert CRED_ID not in desk.credential_ids()


def test_a_token_already_enrolled_is_left_as_it_is_and_the_device_made_ahead_goes() -> None:
    desk = Desk()
    desk.enroll()  # alice has this token already
    leg = prepared(desk)
    with pytest.raises(AlreadyEnrolled):
        plug(desk, leg)
    assert desk.iam.users["alice"] == [ARN]
    assert AHEAD_ARN not in desk.iam.devices


def test_a_failed_tag_undoes_the_enrollment_rather_than_leave_a_device_without_its_token() -> None:
    from provisioner.core.errors import ServiceFailure

    desk = Desk()
    leg = prepared(desk)
    desk.iam.fail("tag_device", ServiceFailure("IAM failed"))
    with pytest.raises(EnrollmentFailed) as info:
        plug(desk, leg)
    assert info.value.step == "confirm"
    assert desk.iam.devices == {} and CRED_ID not in desk.credential_ids()


@pytest.mark.parametrize(
    ("build", "error"),
    [
        (lambda d: d.iam.users.pop("alice"), UserNotFound),
        (
            lambda d: d.iam.users.__setitem__("alice", [f"arn:x:{i}" for i in range(8)]),
            DeviceLimitReached,
        ),
    ],
)
def test_what_no_token_could_fix_is_refused_ahead_and_nothing_is_made(
    build: object, error: type[Exception]
) -> None:
    desk = Desk()
    build(desk)  # type: ignore[operator]
    with pytest.raises(error):
        prepared(desk)
    assert desk.iam.devices == {}


def test_a_refused_create_ahead_leaves_nothing_and_no_seed() -> None:
    from provisioner.core.errors import ServiceFailure

    desk = Desk()
    desk.iam.fail("create_virtual_mfa_device", ServiceFailure("IAM failed"))
    leg = Leg("alice")
    enrollment = Enrollment(desk.iam, desk.clock, desk.settings, desk.progress)
    enrollment.prepare(leg)
    with pytest.raises(ServiceFailure):
        enrollment.make_device(leg, None, "q7-0a1b2c")
    assert desk.iam.devices == {} and leg.seed is None


def test_the_token_of_another_serial_is_still_checked_at_the_plug() -> None:
    desk = Desk(EmulatedYubiKey(serial=55555555))
    leg = prepared(desk)
    plug(desk, leg)
    assert dict(desk.iam.devices[AHEAD_ARN].tags)["provisioner:token-serial"] == "55555555"
