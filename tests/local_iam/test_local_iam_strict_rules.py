"""What the stand-in enforces that plain moto does not, seen through the real boto3.

Every rule is checked both ways: accepted, and refused with AWS's error Code and HTTP
status. Codes come from pyotp and the seed CreateVirtualMFADevice returned, at the
server's (pinned) time.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from local_iam_server import LocalIamServer

from .helpers import Device, error_of, make_client, step_of

pytestmark = pytest.mark.iam_server

NewDevice = Callable[..., Device]
NewUser = Callable[[str], str]


def submit_pair(
    operation: Callable[..., Any], user: str, device: Device, codes: tuple[str, str]
) -> None:
    """EnableMFADevice or ResyncMFADevice: the same two-code form."""
    operation(
        UserName=user,
        SerialNumber=device.serial,
        AuthenticationCode1=codes[0],
        AuthenticationCode2=codes[1],
    )


def enable(iam: Any, user: str, device: Device, codes: tuple[str, str]) -> None:
    submit_pair(iam.enable_mfa_device, user, device, codes)


def resync(iam: Any, user: str, device: Device, codes: tuple[str, str]) -> None:
    submit_pair(iam.resync_mfa_device, user, device, codes)


def serials(listing: dict[str, Any]) -> list[str]:
    return [d["SerialNumber"] for d in listing["VirtualMFADevices"]]


# -- CreateVirtualMFADevice --------------------------------------------------------------


def test_create_returns_a_fresh_base32_seed_as_aws_does(iam: Any) -> None:
    first = iam.create_virtual_mfa_device(VirtualMFADeviceName="one")["VirtualMFADevice"]
    second = iam.create_virtual_mfa_device(VirtualMFADeviceName="two")["VirtualMFADevice"]
    seed = first["Base32StringSeed"]
    assert isinstance(seed, bytes)  # boto3 decodes the base64 blob to the base32 text
    assert len(seed) == 64
    assert len(base64.b32decode(seed)) == 40
    assert seed != second["Base32StringSeed"]
    assert first["SerialNumber"] == "arn:aws:iam::123456789012:mfa/one"


def test_create_with_path_puts_it_in_the_serial(iam: Any) -> None:
    device = iam.create_virtual_mfa_device(VirtualMFADeviceName="t1", Path="/desk/a/")
    assert device["VirtualMFADevice"]["SerialNumber"].endswith(":mfa/desk/a/t1")


def assert_created(iam: Any, created: dict[str, Any], path: str, name: str) -> None:
    """The device IAM returned, and then lists, is the one asked for: its serial is the
    ARN of ``path`` + ``name``, unassigned, with a seed."""
    serial = f"arn:aws:iam::123456789012:mfa{path}{name}"
    device = created["VirtualMFADevice"]
    assert device["SerialNumber"] == serial
    assert len(base64.b32decode(device["Base32StringSeed"])) == 40
    assert serials(iam.list_virtual_mfa_devices(AssignmentStatus="Unassigned")) == [serial]


@pytest.mark.parametrize("name", ["desk-1", "a" * 226, "Desk_1+x=y,z.w@q-r"])
def test_create_accepts_aws_names(iam: Any, name: str) -> None:
    created = iam.create_virtual_mfa_device(VirtualMFADeviceName=name)
    assert_created(iam, created, "/", name)


@pytest.mark.parametrize("name", ["desk 1", "a" * 227, "désk", "desk/1", "desk#1"])
def test_create_refuses_names_outside_aws_pattern(iam: Any, name: str) -> None:
    with pytest.raises(ClientError) as excinfo:
        iam.create_virtual_mfa_device(VirtualMFADeviceName=name)
    assert error_of(excinfo)[:2] == ("ValidationError", 400)


@pytest.mark.parametrize("path", ["/", "/desk/", "/a/b-c/"])
def test_create_accepts_aws_paths(iam: Any, path: str) -> None:
    created = iam.create_virtual_mfa_device(VirtualMFADeviceName="t", Path=path)
    assert_created(iam, created, path, "t")


@pytest.mark.parametrize("path", ["desk/", "/desk", "desk", "/de sk/", "/" + "a" * 511 + "/"])
def test_create_refuses_bad_paths(iam: Any, path: str) -> None:
    with pytest.raises(ClientError) as excinfo:
        iam.create_virtual_mfa_device(VirtualMFADeviceName="t", Path=path)
    assert error_of(excinfo)[:2] == ("ValidationError", 400)


def test_create_same_path_and_name_twice_is_entity_already_exists(iam: Any) -> None:
    iam.create_virtual_mfa_device(VirtualMFADeviceName="t", Path="/desk/")
    iam.create_virtual_mfa_device(VirtualMFADeviceName="t", Path="/other/")  # fine
    with pytest.raises(ClientError) as excinfo:
        iam.create_virtual_mfa_device(VirtualMFADeviceName="t", Path="/desk/")
    assert error_of(excinfo)[:2] == ("EntityAlreadyExists", 409)


def test_create_keeps_tags(iam: Any, new_device: NewDevice) -> None:
    tags = [{"Key": "desk", "Value": "berlin-2"}, {"Key": "token", "Value": "12345678"}]
    device = new_device("tagged", Tags=tags)
    listed = iam.list_mfa_device_tags(SerialNumber=device.serial)
    assert sorted(listed["Tags"], key=lambda t: t["Key"]) == tags
    (entry,) = iam.list_virtual_mfa_devices()["VirtualMFADevices"]
    assert entry["Tags"] == tags


def test_create_with_more_than_50_tags_is_refused(iam: Any) -> None:
    tags = [{"Key": f"k{i}", "Value": "v"} for i in range(51)]
    with pytest.raises(ClientError) as excinfo:
        iam.create_virtual_mfa_device(VirtualMFADeviceName="t", Tags=tags)
    assert error_of(excinfo)[:2] == ("ValidationError", 400)
    assert iam.list_virtual_mfa_devices()["VirtualMFADevices"] == []
    iam.create_virtual_mfa_device(VirtualMFADeviceName="t", Tags=tags[:50])


# -- EnableMFADevice -----------------------------------------------------------------------


def test_enable_with_the_right_codes_assigns_the_device(
    iam: Any,
    iam_server: LocalIamServer,
    new_user: NewUser,
    new_device: NewDevice,
    server_now: float,
) -> None:
    user, device = new_user("alice"), new_device()
    enable(iam, user, device, device.pair(step_of(server_now)))
    (listed,) = iam.list_mfa_devices(UserName=user)["MFADevices"]
    assert (listed["UserName"], listed["SerialNumber"]) == (user, device.serial)
    attempt = iam_server.attempts()[-1]
    assert (attempt.action, attempt.user, attempt.serial) == (
        "EnableMFADevice",
        user,
        device.serial,
    )
    assert (attempt.accepted, attempt.reason, attempt.step_offset) == (True, None, 0)


@pytest.mark.parametrize("offset", [-1, 0])
def test_enable_accepts_each_pair_of_the_window(
    iam: Any,
    iam_server: LocalIamServer,
    new_user: NewUser,
    new_device: NewDevice,
    server_now: float,
    offset: int,
) -> None:
    user, device = new_user("alice"), new_device()
    enable(iam, user, device, device.pair(step_of(server_now) + offset))
    assert iam_server.attempts()[-1].step_offset == offset


@pytest.mark.parametrize(
    ("describe", "codes", "reason", "step_offset"),
    [
        ("zeros", lambda d, n: ("000000", "000000"), "wrong-code", None),
        ("not consecutive", lambda d, n: (d.code(n - 2), d.code(n)), "not-consecutive", 0),
        ("same code twice", lambda d, n: (d.code(n), d.code(n)), "not-consecutive", 0),
        ("reversed", lambda d, n: (d.code(n), d.code(n - 1)), "not-consecutive", -1),
        ("3 steps ago", lambda d, n: d.pair(n - 3), "outside-window", -3),
        ("2 steps ago", lambda d, n: d.pair(n - 2), "outside-window", -2),
        ("N and N+1: a step not yet begun", lambda d, n: d.pair(n + 1), "outside-window", 1),
        ("2 steps ahead", lambda d, n: d.pair(n + 2), "outside-window", 2),
    ],
)
def test_enable_refuses_codes_that_are_not_a_pair_of_the_window(
    iam: Any,
    iam_server: LocalIamServer,
    new_user: NewUser,
    new_device: NewDevice,
    server_now: float,
    describe: str,
    codes: Callable[[Device, int], tuple[str, str]],
    reason: str,
    step_offset: int | None,
) -> None:
    user, device = new_user("alice"), new_device()
    with pytest.raises(ClientError) as excinfo:
        enable(iam, user, device, codes(device, step_of(server_now)))
    assert error_of(excinfo) == (
        "InvalidAuthenticationCode",
        403,
        "Authentication code for device is not valid.",
    )
    assert iam.list_mfa_devices(UserName=user)["MFADevices"] == []
    assert serials(iam.list_virtual_mfa_devices(AssignmentStatus="Unassigned")) == [device.serial]
    attempt = iam_server.attempts()[-1]
    assert (attempt.accepted, attempt.reason, attempt.step_offset) == (False, reason, step_offset)


def test_enable_with_codes_of_another_seed_is_refused(
    iam: Any, new_user: NewUser, new_device: NewDevice, server_now: float
) -> None:
    user, mine, other = new_user("alice"), new_device("mine"), new_device("other")
    with pytest.raises(ClientError) as excinfo:
        enable(iam, user, mine, other.pair(step_of(server_now)))
    assert error_of(excinfo)[:2] == ("InvalidAuthenticationCode", 403)


@pytest.mark.parametrize("bad", ["1234567", "abcdef", "12e456"])
def test_enable_with_malformed_codes_is_a_validation_error(
    iam: Any,
    iam_server: LocalIamServer,
    new_user: NewUser,
    new_device: NewDevice,
    server_now: float,
    bad: str,
) -> None:
    # AWS's model: 6 characters of [\d]+. botocore checks only the minimum length.
    user, device = new_user("alice"), new_device()
    with pytest.raises(ClientError) as excinfo:
        enable(iam, user, device, (bad, device.code(step_of(server_now))))
    code, status, message = error_of(excinfo)
    assert (code, status) == ("ValidationError", 400)
    assert bad not in message  # the server does not echo codes
    assert iam_server.attempts()[-1].reason == "malformed-code"


def test_enable_for_an_unknown_user_is_no_such_entity(
    iam: Any, new_device: NewDevice, server_now: float
) -> None:
    device = new_device()
    with pytest.raises(ClientError) as excinfo:
        enable(iam, "nobody", device, device.pair(step_of(server_now)))
    assert error_of(excinfo) == (
        "NoSuchEntity",
        404,
        "The user with name nobody cannot be found.",
    )


def test_enable_with_a_serial_never_created_is_no_such_entity(
    iam: Any, iam_server: LocalIamServer, new_user: NewUser, server_now: float
) -> None:
    user = new_user("alice")
    ghost = Device("arn:aws:iam::123456789012:mfa/ghost", "JBSWY3DPEHPK3PXP" * 4)
    with pytest.raises(ClientError) as excinfo:
        enable(iam, user, ghost, ghost.pair(step_of(server_now)))
    assert error_of(excinfo)[:2] == ("NoSuchEntity", 404)
    assert iam_server.attempts()[-1].reason == "no-such-device"


def test_enable_a_device_in_use_by_another_user_is_entity_already_exists(
    iam: Any,
    iam_server: LocalIamServer,
    new_user: NewUser,
    new_device: NewDevice,
    server_now: float,
) -> None:
    alice, bob, device = new_user("alice"), new_user("bob"), new_device()
    n = step_of(server_now)
    enable(iam, alice, device, device.pair(n))
    for user in (bob, alice):  # someone else's, or already one's own
        with pytest.raises(ClientError) as excinfo:
            enable(iam, user, device, device.pair(n + 1))
        assert error_of(excinfo) == ("EntityAlreadyExists", 409, "MFA Device is already in use.")
        assert iam_server.attempts()[-1].reason == "device-in-use"
    assert iam.list_mfa_devices(UserName=bob)["MFADevices"] == []


def test_ninth_device_for_a_user_is_limit_exceeded(
    iam: Any,
    iam_server: LocalIamServer,
    new_user: NewUser,
    new_device: NewDevice,
    server_now: float,
) -> None:
    user, n = new_user("alice"), step_of(server_now)
    for i in range(8):
        device = new_device(f"token-{i}")
        enable(iam, user, device, device.pair(n))
    ninth = new_device("token-8")
    with pytest.raises(ClientError) as excinfo:
        enable(iam, user, ninth, ninth.pair(n))
    assert error_of(excinfo)[:2] == ("LimitExceeded", 409)
    assert len(iam.list_mfa_devices(UserName=user)["MFADevices"]) == 8
    assert iam_server.attempts()[-1].reason == "limit-exceeded"


# -- DeactivateMFADevice, DeleteVirtualMFADevice, DeleteUser ---------------------------------


def test_deactivate_unassigns_the_device_and_it_can_be_enabled_again(
    iam: Any, new_user: NewUser, new_device: NewDevice, server_now: float
) -> None:
    user, device, n = new_user("alice"), new_device(), step_of(server_now)
    enable(iam, user, device, device.pair(n))
    iam.deactivate_mfa_device(UserName=user, SerialNumber=device.serial)
    assert iam.list_mfa_devices(UserName=user)["MFADevices"] == []
    assert serials(iam.list_virtual_mfa_devices(AssignmentStatus="Unassigned")) == [device.serial]
    enable(iam, user, device, device.pair(n))


def test_deactivate_refuses_a_device_the_user_does_not_have(
    iam: Any, new_user: NewUser, new_device: NewDevice, server_now: float
) -> None:
    alice, bob, device = new_user("alice"), new_user("bob"), new_device()
    enable(iam, alice, device, device.pair(step_of(server_now)))
    with pytest.raises(ClientError) as excinfo:
        iam.deactivate_mfa_device(UserName=bob, SerialNumber=device.serial)
    assert error_of(excinfo)[:2] == ("NoSuchEntity", 404)
    with pytest.raises(ClientError) as excinfo:
        iam.deactivate_mfa_device(UserName="nobody", SerialNumber=device.serial)
    assert error_of(excinfo)[:2] == ("NoSuchEntity", 404)
    assert serials(iam.list_virtual_mfa_devices(AssignmentStatus="Assigned")) == [device.serial]


def test_delete_an_assigned_device_is_a_delete_conflict(
    iam: Any, new_user: NewUser, new_device: NewDevice, server_now: float
) -> None:
    user, device = new_user("alice"), new_device(Tags=[{"Key": "k", "Value": "v"}])
    enable(iam, user, device, device.pair(step_of(server_now)))
    with pytest.raises(ClientError) as excinfo:
        iam.delete_virtual_mfa_device(SerialNumber=device.serial)
    assert error_of(excinfo)[:2] == ("DeleteConflict", 409)
    assert len(iam.list_mfa_devices(UserName=user)["MFADevices"]) == 1
    iam.deactivate_mfa_device(UserName=user, SerialNumber=device.serial)
    iam.delete_virtual_mfa_device(SerialNumber=device.serial)
    assert iam.list_virtual_mfa_devices()["VirtualMFADevices"] == []
    with pytest.raises(ClientError) as excinfo:  # its tags went with it
        iam.list_mfa_device_tags(SerialNumber=device.serial)
    assert error_of(excinfo)[:2] == ("NoSuchEntity", 404)


def test_delete_an_unknown_device_is_no_such_entity(iam: Any) -> None:
    with pytest.raises(ClientError) as excinfo:
        iam.delete_virtual_mfa_device(SerialNumber="arn:aws:iam::123456789012:mfa/ghost")
    assert error_of(excinfo)[:2] == ("NoSuchEntity", 404)


def test_delete_a_user_who_still_has_a_device_is_a_delete_conflict(
    iam: Any, new_user: NewUser, new_device: NewDevice, server_now: float
) -> None:
    user, device = new_user("alice"), new_device()
    enable(iam, user, device, device.pair(step_of(server_now)))
    with pytest.raises(ClientError) as excinfo:
        iam.delete_user(UserName=user)
    assert error_of(excinfo)[:2] == ("DeleteConflict", 409)
    iam.deactivate_mfa_device(UserName=user, SerialNumber=device.serial)
    iam.delete_user(UserName=user)


# -- ListVirtualMFADevices -----------------------------------------------------------------


def test_list_virtual_devices_filters_by_assignment(
    iam: Any, new_user: NewUser, new_device: NewDevice, server_now: float
) -> None:
    user, assigned, spare = new_user("alice"), new_device("a-assigned"), new_device("b-spare")
    enable(iam, user, assigned, assigned.pair(step_of(server_now)))
    assert serials(iam.list_virtual_mfa_devices(AssignmentStatus="Assigned")) == [assigned.serial]
    assert serials(iam.list_virtual_mfa_devices(AssignmentStatus="Unassigned")) == [spare.serial]
    listing = iam.list_virtual_mfa_devices(AssignmentStatus="Any")
    assert serials(listing) == [assigned.serial, spare.serial]
    assert serials(iam.list_virtual_mfa_devices()) == serials(listing)
    by_serial = {d["SerialNumber"]: d for d in listing["VirtualMFADevices"]}
    assert by_serial[assigned.serial]["User"]["UserName"] == user
    assert "EnableDate" in by_serial[assigned.serial]
    assert "User" not in by_serial[spare.serial]
    for entry in listing["VirtualMFADevices"]:  # AWS returns the seed once, at creation
        assert "Base32StringSeed" not in entry
        assert "QRCodePNG" not in entry


def test_list_virtual_devices_paginates(iam: Any, new_device: NewDevice) -> None:
    made = sorted(new_device(f"t{i}").serial for i in range(3))
    first = iam.list_virtual_mfa_devices(MaxItems=2)
    assert (serials(first), first["IsTruncated"]) == (made[:2], True)
    rest = iam.list_virtual_mfa_devices(MaxItems=2, Marker=first["Marker"])
    assert (serials(rest), rest["IsTruncated"], "Marker" in rest) == (made[2:], False, False)
    exact = iam.list_virtual_mfa_devices(MaxItems=3)
    assert (exact["IsTruncated"], "Marker" in exact) == (False, False)


# -- tags -----------------------------------------------------------------------------------


def test_tag_untag_and_list_tags(iam: Any, new_device: NewDevice) -> None:
    device = new_device(Tags=[{"Key": "desk", "Value": "1"}])
    iam.tag_mfa_device(
        SerialNumber=device.serial,
        Tags=[{"Key": "Desk", "Value": "2"}, {"Key": "user", "Value": "alice"}],
    )
    tags = iam.list_mfa_device_tags(SerialNumber=device.serial)["Tags"]
    # IAM tag keys are case-insensitive: "Desk" replaced "desk".
    assert tags == [{"Key": "Desk", "Value": "2"}, {"Key": "user", "Value": "alice"}]
    iam.tag_mfa_device(SerialNumber=device.serial, Tags=[{"Key": "desk", "Value": "3"}])
    tags = iam.list_mfa_device_tags(SerialNumber=device.serial)["Tags"]
    assert tags == [{"Key": "desk", "Value": "3"}, {"Key": "user", "Value": "alice"}]
    iam.untag_mfa_device(SerialNumber=device.serial, TagKeys=["DESK"])
    assert iam.list_mfa_device_tags(SerialNumber=device.serial)["Tags"] == [
        {"Key": "user", "Value": "alice"}
    ]


def test_tags_beyond_50_per_device_are_limit_exceeded(iam: Any, new_device: NewDevice) -> None:
    device = new_device(Tags=[{"Key": f"k{i}", "Value": "v"} for i in range(49)])
    iam.tag_mfa_device(SerialNumber=device.serial, Tags=[{"Key": "k49", "Value": "v"}])
    with pytest.raises(ClientError) as excinfo:
        iam.tag_mfa_device(SerialNumber=device.serial, Tags=[{"Key": "k50", "Value": "v"}])
    assert error_of(excinfo)[:2] == ("LimitExceeded", 409)
    assert len(iam.list_mfa_device_tags(SerialNumber=device.serial)["Tags"]) == 50


@pytest.mark.parametrize(
    ("operation", "arguments"),
    [
        ("tag_mfa_device", {"Tags": [{"Key": "k", "Value": "v"}]}),
        ("untag_mfa_device", {"TagKeys": ["k"]}),
        ("list_mfa_device_tags", {}),
    ],
)
def test_tag_operations_on_an_unknown_device_are_no_such_entity(
    iam: Any, operation: str, arguments: dict[str, Any]
) -> None:
    with pytest.raises(ClientError) as excinfo:
        getattr(iam, operation)(SerialNumber="arn:aws:iam::123456789012:mfa/ghost", **arguments)
    assert error_of(excinfo)[:2] == ("NoSuchEntity", 404)


# -- ResyncMFADevice, GetMFADevice -----------------------------------------------------------


def test_resync_accepts_a_pair_of_the_window_and_refuses_others(
    iam: Any,
    iam_server: LocalIamServer,
    new_user: NewUser,
    new_device: NewDevice,
    server_now: float,
) -> None:
    user, device, n = new_user("alice"), new_device(), step_of(server_now)
    enable(iam, user, device, device.pair(n))
    resync(iam, user, device, device.pair(n - 1))
    for s in (n - 3, n + 1):  # too old; the later code for a step not yet begun
        with pytest.raises(ClientError) as excinfo:
            resync(iam, user, device, device.pair(s))
        assert error_of(excinfo)[:2] == ("InvalidAuthenticationCode", 403)
    resyncs = [a for a in iam_server.attempts() if a.action == "ResyncMFADevice"]
    assert [(a.accepted, a.step_offset) for a in resyncs] == [(True, -1), (False, -3), (False, 1)]


def test_resync_a_device_not_assigned_to_that_user_is_no_such_entity(
    iam: Any, new_user: NewUser, new_device: NewDevice, server_now: float
) -> None:
    alice, bob, device, n = new_user("alice"), new_user("bob"), new_device(), step_of(server_now)
    enable(iam, alice, device, device.pair(n))
    with pytest.raises(ClientError) as excinfo:
        resync(iam, bob, device, device.pair(n))
    assert error_of(excinfo)[:2] == ("NoSuchEntity", 404)


def test_get_mfa_device_answers_no_such_entity_for_virtual_devices(
    iam: Any, new_device: NewDevice
) -> None:
    # AWS documents GetMFADevice for FIDO security keys only.
    device = new_device()
    with pytest.raises(ClientError) as excinfo:
        iam.get_mfa_device(SerialNumber=device.serial)
    assert error_of(excinfo)[:2] == ("NoSuchEntity", 404)


# -- STS GetSessionToken with MFA (the demo's "login") ---------------------------------------


def test_login_with_the_current_code_succeeds(
    iam: Any,
    sts: Any,
    iam_server: LocalIamServer,
    new_user: NewUser,
    new_device: NewDevice,
    server_now: float,
) -> None:
    user, device, n = new_user("alice"), new_device(), step_of(server_now)
    enable(iam, user, device, device.pair(n))
    token = sts.get_session_token(SerialNumber=device.serial, TokenCode=device.code(n))
    assert token["Credentials"]["SessionToken"]
    attempt = iam_server.attempts()[-1]
    assert (attempt.action, attempt.user, attempt.accepted) == ("GetSessionToken", user, True)


def test_login_without_mfa_is_moto_as_usual(sts: Any) -> None:
    assert sts.get_session_token()["Credentials"]["AccessKeyId"]


@pytest.mark.parametrize(
    ("describe", "code_at", "reason"),
    [
        ("wrong code", lambda d, n: "000000", "wrong-code"),
        ("two steps old", lambda d, n: d.code(n - 2), "outside-window"),
        ("two steps ahead", lambda d, n: d.code(n + 2), "outside-window"),
    ],
)
def test_login_with_a_bad_code_is_access_denied(
    iam: Any,
    sts: Any,
    iam_server: LocalIamServer,
    new_user: NewUser,
    new_device: NewDevice,
    server_now: float,
    describe: str,
    code_at: Callable[[Device, int], str],
    reason: str,
) -> None:
    user, device, n = new_user("alice"), new_device(), step_of(server_now)
    enable(iam, user, device, device.pair(n))
    with pytest.raises(ClientError) as excinfo:
        sts.get_session_token(SerialNumber=device.serial, TokenCode=code_at(device, n))
    assert error_of(excinfo) == (
        "AccessDenied",
        403,
        "MultiFactorAuthentication failed with invalid MFA one time pass code.",
    )
    assert iam_server.attempts()[-1].reason == reason


def test_login_with_a_code_already_used_for_a_login_is_access_denied(
    iam: Any,
    sts: Any,
    iam_server: LocalIamServer,
    new_user: NewUser,
    new_device: NewDevice,
    server_now: float,
) -> None:
    user, device, n = new_user("alice"), new_device(), step_of(server_now)
    enable(iam, user, device, device.pair(n))
    sts.get_session_token(SerialNumber=device.serial, TokenCode=device.code(n))
    with pytest.raises(ClientError) as excinfo:
        sts.get_session_token(SerialNumber=device.serial, TokenCode=device.code(n))
    assert error_of(excinfo)[:2] == ("AccessDenied", 403)
    assert iam_server.attempts()[-1].reason == "code-reused"
    sts.get_session_token(SerialNumber=device.serial, TokenCode=device.code(n + 1))


def test_login_with_an_unassigned_or_unknown_device_is_access_denied(
    sts: Any, new_device: NewDevice, server_now: float
) -> None:
    spare, n = new_device(), step_of(server_now)
    for serial in (spare.serial, "arn:aws:iam::123456789012:mfa/ghost"):
        with pytest.raises(ClientError) as excinfo:
            sts.get_session_token(SerialNumber=serial, TokenCode=spare.code(n))
        code, status, message = error_of(excinfo)
        assert (code, status) == ("AccessDenied", 403)
        assert "associated with this user" in message


def test_login_as_an_iam_user_needs_that_users_own_device(
    iam: Any,
    iam_server: LocalIamServer,
    new_user: NewUser,
    new_device: NewDevice,
    server_now: float,
) -> None:
    alice, bob, n = new_user("alice"), new_user("bob"), step_of(server_now)
    alices, bobs = new_device("alices"), new_device("bobs")
    enable(iam, alice, alices, alices.pair(n))
    enable(iam, bob, bobs, bobs.pair(n))
    key = iam.create_access_key(UserName=alice)["AccessKey"]
    as_alice = make_client(
        iam_server, "sts", access_key=(key["AccessKeyId"], key["SecretAccessKey"])
    )
    with pytest.raises(ClientError) as excinfo:
        as_alice.get_session_token(SerialNumber=bobs.serial, TokenCode=bobs.code(n))
    assert error_of(excinfo)[:2] == ("AccessDenied", 403)
    as_alice.get_session_token(SerialNumber=alices.serial, TokenCode=alices.code(n))


# -- secrets ---------------------------------------------------------------------------------


def test_no_seed_or_code_in_the_server_log_or_the_attempt_log(
    iam: Any,
    sts: Any,
    iam_server: LocalIamServer,
    new_user: NewUser,
    new_device: NewDevice,
    server_now: float,
) -> None:
    user, device, n = new_user("alice"), new_device(), step_of(server_now)
    with pytest.raises(ClientError):
        enable(iam, user, device, device.pair(n - 5))
    enable(iam, user, device, device.pair(n))
    sts.get_session_token(SerialNumber=device.serial, TokenCode=device.code(n + 1))
    log = iam_server.log_tail(max_chars=10_000_000)
    assert "EnableMFADevice accepted" in log  # the log is there, and verbose
    attempts = repr(iam_server.attempts())
    for secret in (device.seed, *device.pair(n), *device.pair(n - 5), device.code(n + 1)):
        assert secret not in log
        assert secret not in attempts


def test_the_stand_in_works_for_a_client_configured_only_by_environment(
    iam_server: LocalIamServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in iam_server.aws_env().items():
        monkeypatch.setenv(name, value)
    client = boto3.client("iam")  # no endpoint_url: AWS_ENDPOINT_URL_IAM does it
    client.create_user(UserName="from-env")
    assert iam_server.call_counts().get("CreateUser") == 1
    assert make_client(iam_server, "iam").get_user(UserName="from-env")["User"]["UserName"]
