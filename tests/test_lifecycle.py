"""Revoke and resync over the in-memory IAM and the emulated YubiKey (real yubikit)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
from fakes import FakeClock, FakeIam

from emulated_yubikey import EmulatedConnection, EmulatedYubiKey
from provisioner.adapters.yubikey import YubiKeyToken
from provisioner.core.enrollment import Enrollment, EnrollmentSettings
from provisioner.core.errors import (
    CodesRejected,
    InvalidInput,
    NotFound,
    UserNotFound,
)
from provisioner.core.lifecycle import Lifecycle

CRED = "AWS:alice@123456789012"


class World:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.iam = FakeIam(self.clock, users=("alice", "bob"))
        self.settings = EnrollmentSettings(desk="d")
        self.keys = {s: EmulatedYubiKey(serial=s) for s in (1001, 1002)}

    def token(self, serial: int) -> YubiKeyToken:
        return YubiKeyToken(lambda: EmulatedConnection(self.keys[serial]), f"reader {serial}")

    def enroll(self, user: str, serial: int) -> str:
        with self.token(serial) as token:
            return Enrollment(self.iam, self.clock, self.settings).run(token, user).device_arn

    @contextlib.contextmanager
    def plugged(self, *present: int) -> Iterator[object]:
        """A token finder that sees only the ``present`` serials."""

        @contextlib.contextmanager
        def find(serial: int) -> Iterator[YubiKeyToken | None]:
            if serial not in present:
                yield None
                return
            with self.token(serial) as token:
                yield token

        yield find

    def lifecycle(self) -> Lifecycle:
        return Lifecycle(self.iam, self.clock, self.settings)

    def creds(self, serial: int) -> list[str]:
        return [c.id for c in self.keys[serial].credentials()]


def test_revoke_with_the_token_plugged_in_removes_everything() -> None:
    w = World()
    arn = w.enroll("alice", 1001)
    with w.plugged(1001) as find:
        done = w.lifecycle().revoke("alice", None, find)
    assert done.device_arn == arn and done.credential_removed
    assert w.iam.users["alice"] == [] and w.iam.devices == {}
    assert w.creds(1001) == []
    assert done.actions[-1] == f"removed {CRED} from token 1001"


def test_revoke_without_the_token_says_what_stays_on_it() -> None:
    w = World()
    w.enroll("alice", 1001)
    with w.plugged() as find:
        done = w.lifecycle().revoke("alice", 1001, find)
    assert w.iam.devices == {} and not done.credential_removed
    assert w.creds(1001) == [CRED]
    assert "stays on token 1001 (not plugged in)" in done.actions[-1]


def test_revoke_picks_the_token_by_serial_and_refuses_to_guess() -> None:
    w = World()
    w.settings = EnrollmentSettings(desk="d", account_name="{user}-{serial}")
    first = w.enroll("alice", 1001)
    second = w.enroll("alice", 1002)
    with w.plugged(1001, 1002) as find, pytest.raises(InvalidInput) as info:
        w.lifecycle().revoke("alice", None, find)
    assert "tokens 1001, 1002" in info.value.message
    with w.plugged(1001, 1002) as find:
        w.lifecycle().revoke("alice", 1002, find)
    assert w.creds(1001) == ["AWS:alice-1001"]  # the other token was not touched
    assert w.iam.users["alice"] == [first] and second not in w.iam.devices


def test_revoke_refuses_clearly_when_there_is_nothing() -> None:
    w = World()
    with w.plugged() as find, pytest.raises(NotFound) as info:
        w.lifecycle().revoke("alice", None, find)
    assert "alice has no MFA device enrolled by provisioner" in info.value.message
    with w.plugged() as find, pytest.raises(UserNotFound):
        w.lifecycle().revoke("mallory", None, find)
    assert "deactivate_mfa_device" not in w.iam.calls


def test_revoke_ignores_devices_the_tool_did_not_enroll() -> None:
    w = World()
    from provisioner.core.model import DeviceSpec

    arn, _ = w.iam.create_virtual_mfa_device(DeviceSpec("by-hand", "/"))
    w.iam.devices[arn].user = "alice"
    w.iam.users["alice"].append(arn)
    with w.plugged() as find, pytest.raises(NotFound):
        w.lifecycle().revoke("alice", None, find)
    assert arn in w.iam.devices


def test_resync_uses_two_codes_from_the_token() -> None:
    w = World()
    arn = w.enroll("alice", 1001)
    w.clock.time += 3 * 3600  # drifted? the token has no clock: only AWS's time matters
    with w.token(1001) as token:
        device, _ = w.lifecycle().resync("alice", token)
    assert device == arn and w.iam.resynced == [arn]


def test_resync_with_another_token_is_refused() -> None:
    w = World()
    w.enroll("alice", 1001)
    with w.token(1002) as token, pytest.raises(NotFound) as info:
        w.lifecycle().resync("alice", token)
    assert "for token 1002" in info.value.message


def test_resync_refused_codes_say_so() -> None:
    w = World()
    w.enroll("alice", 1001)
    w.iam.fail("resync_mfa_device", CodesRejected("codes refused"))
    with w.token(1001) as token, pytest.raises(CodesRejected):
        w.lifecycle().resync("alice", token)


def _replace(w: World, old_serial: int | None = None):  # type: ignore[no-untyped-def]
    from provisioner.core.lifecycle import replace

    with w.token(1002) as token, w.plugged(1001) as find:
        return replace(
            w.lifecycle(), Enrollment(w.iam, w.clock, w.settings), "alice", token, old_serial, find
        )


def test_replace_enrolls_the_new_token_then_revokes_the_old() -> None:
    w = World()
    old = w.enroll("alice", 1001)
    before = len(w.iam.calls)
    done = _replace(w)
    assert w.iam.users["alice"] == [done.enrolled.device_arn]
    assert old not in w.iam.devices
    assert w.creds(1001) == [] and w.creds(1002) == [CRED]
    order = [c for c in w.iam.calls[before:] if c in ("enable_mfa_device", "deactivate_mfa_device")]
    assert order == ["enable_mfa_device", "deactivate_mfa_device"]  # never without MFA


def test_replace_whose_second_half_fails_leaves_both_and_says_so() -> None:
    from provisioner.core.errors import ReplaceIncomplete, ServiceFailure

    w = World()
    old = w.enroll("alice", 1001)
    w.iam.fail("deactivate_mfa_device", ServiceFailure("IAM failed"))
    with pytest.raises(ReplaceIncomplete) as info:
        _replace(w)
    assert "now has the new token 1002" in info.value.message
    assert f"still the old device {old}" in info.value.message
    assert "provisioner revoke --user alice --serial 1001" in info.value.one_line()
    assert len(w.iam.users["alice"]) == 2  # both work: never without MFA


def test_replace_whose_enrollment_fails_keeps_the_old_token() -> None:
    from provisioner.core.errors import EnrollmentFailed

    w = World()
    old = w.enroll("alice", 1001)
    w.iam.fail("enable_mfa_device", CodesRejected("codes refused"))
    with pytest.raises(EnrollmentFailed):
        _replace(w)
    assert w.iam.users["alice"] == [old] and w.creds(1001) == [CRED] and w.creds(1002) == []


def test_replace_refuses_to_guess_among_old_tokens_and_takes_the_one_named() -> None:
    w = World()
    w.keys[1003] = EmulatedYubiKey(serial=1003)
    first, second = w.enroll("alice", 1001), w.enroll("alice", 1003)
    before = len(w.iam.calls)
    with pytest.raises(InvalidInput) as info:
        _replace(w)
    assert info.value.one_line() == (
        "alice has several tokens (1001, 1003) (say which with --old-serial)"
    )
    assert "create_virtual_mfa_device" not in w.iam.calls[before:]  # nothing was done
    done = _replace(w, old_serial=1003)
    assert sorted(w.iam.users["alice"]) == sorted([first, done.enrolled.device_arn])
    assert second not in w.iam.devices and first in w.iam.devices
    assert w.creds(1001) == [CRED] and w.creds(1002) == [CRED]


def test_replace_needs_an_old_token() -> None:
    w = World()
    with pytest.raises(NotFound) as info:
        _replace(w)
    assert "no other token enrolled by provisioner to replace" in info.value.message
    assert "create_virtual_mfa_device" not in w.iam.calls


@pytest.mark.parametrize("tag", ["²", "١٠٠١", "+1001", "0", "not a serial"])
def test_a_serial_tag_that_is_no_serial_is_told_not_parsed_into_one(tag: str) -> None:
    """Tags are anyone's to edit in IAM: "²" passed isdigit() and crashed int(); "١٠٠١"
    (Arabic-Indic digits) was read as 1001 and would clear that token."""
    w = World()
    arn = w.enroll("alice", 1001)
    device = w.iam.devices[arn]
    device.tags = tuple((k, tag if k == "provisioner:token-serial" else v) for k, v in device.tags)
    with w.plugged(1001) as find:
        done = w.lifecycle().revoke("alice", None, find)
    assert done.token_serial is None and not done.credential_removed
    assert w.iam.devices == {}
    assert w.creds(1001) == [CRED]  # no token was looked for, so none was touched
