"""The IAM adapter: real boto3 against the strict local IAM server in its own process."""

from __future__ import annotations

import pytest

from provisioner.aws_iam import IamClient
from provisioner.clock import AwsClock
from provisioner.errors import (
    AccessDenied,
    ConcurrentModification,
    DeleteConflict,
    IamError,
    IamUnavailable,
    InvalidAuthenticationCode,
    InvalidInput,
    MfaLimitExceeded,
    NoSuchEntity,
    ServiceFailure,
    TemporarilyUnmodifiable,
    Throttled,
    UserNotFound,
)
from provisioner.local_iam import LocalIamServer
from provisioner.model import DeviceSpec
from provisioner.totp import code_at, time_step

pytestmark = pytest.mark.iam_server


def client(**kw: object) -> tuple[IamClient, AwsClock]:
    clock = AwsClock()
    params = {"max_attempts": 1, "read_timeout": 2.0, "connect_timeout": 2.0} | kw
    return IamClient(clock, **params), clock  # type: ignore[arg-type]


def test_create_enable_list_delete_round_trip(local_iam: LocalIamServer, admin_iam) -> None:  # type: ignore[no-untyped-def]
    iam, clock = client()
    assert iam.user_arn("alice") == "arn:aws:iam::123456789012:user/alice"
    arn, seed = iam.create_virtual_mfa_device(
        DeviceSpec("alice.test", "/provisioner/", (("provisioner:desk", "t"),))
    )
    assert arn == "arn:aws:iam::123456789012:mfa/provisioner/alice.test"
    assert "redacted" in repr(seed)
    now = clock.now()
    n = time_step(now)
    iam.enable_mfa_device("alice", arn, code_at(seed, (n - 1) * 30), code_at(seed, n * 30))
    assert iam.list_mfa_devices("alice") == [arn]
    with pytest.raises(DeleteConflict):
        iam.delete_virtual_mfa_device(arn)
    iam.deactivate_mfa_device("alice", arn)
    iam.delete_virtual_mfa_device(arn)
    assert admin_iam.list_virtual_mfa_devices()["VirtualMFADevices"] == []


def test_tags_reach_iam(local_iam: LocalIamServer, admin_iam) -> None:  # type: ignore[no-untyped-def]
    iam, _ = client()
    arn, _seed = iam.create_virtual_mfa_device(
        DeviceSpec("t1", "/provisioner/", (("provisioner:token-serial", "42"),))
    )
    tags = admin_iam.list_mfa_device_tags(SerialNumber=arn)["Tags"]
    assert tags == [{"Key": "provisioner:token-serial", "Value": "42"}]


def test_wrong_codes_are_invalid_authentication_code(local_iam: LocalIamServer) -> None:
    iam, _ = client()
    arn, _seed = iam.create_virtual_mfa_device(DeviceSpec("t2", "/provisioner/"))
    with pytest.raises(InvalidAuthenticationCode) as info:
        iam.enable_mfa_device("alice", arn, "000000", "000000")
    assert info.value.code == "InvalidAuthenticationCode"
    assert "alice" in info.value.message


def test_unknown_user(local_iam: LocalIamServer) -> None:
    iam, _ = client()
    with pytest.raises(UserNotFound):
        iam.user_arn("mallory")
    with pytest.raises(UserNotFound):
        iam.list_mfa_devices("mallory")


def test_inputs_are_checked_before_sending(local_iam: LocalIamServer) -> None:
    iam, _ = client()
    before = local_iam.call_counts()
    with pytest.raises(InvalidInput):
        iam.enable_mfa_device("alice", "arn:aws:iam::123456789012:mfa/x", "1234567", "123456")
    with pytest.raises(InvalidInput):
        iam.create_virtual_mfa_device(DeviceSpec("bad name", "/provisioner/"))
    with pytest.raises(InvalidInput):
        iam.list_mfa_devices("not a user")
    assert local_iam.call_counts() == before


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("Throttling", Throttled),
        ("ServiceFailure", ServiceFailure),
        ("EntityTemporarilyUnmodifiable", TemporarilyUnmodifiable),
        ("ConcurrentModification", ConcurrentModification),
        ("LimitExceeded", MfaLimitExceeded),
        ("NoSuchEntity", NoSuchEntity),
        ("AccessDenied", AccessDenied),
    ],
)
def test_aws_errors_are_translated(local_iam: LocalIamServer, code: str, error: type) -> None:
    iam, _ = client()
    local_iam.inject_fault("ListMFADevices", code=code)
    with pytest.raises(error) as info:
        iam.list_mfa_devices("alice")
    assert info.value.code == code
    assert not info.value.ambiguous


@pytest.mark.parametrize("kind", ["garbage", "drop", "delay"])
def test_lost_answers_are_ambiguous(local_iam: LocalIamServer, kind: str) -> None:
    iam, _ = client(read_timeout=0.5)
    local_iam.inject_fault("ListMFADevices", kind=kind, delay=2.0)  # type: ignore[arg-type]
    with pytest.raises(IamUnavailable) as info:
        iam.list_mfa_devices("alice")
    assert info.value.ambiguous


def test_transient_faults_are_retried_by_botocore(local_iam: LocalIamServer) -> None:
    iam, _ = client(max_attempts=4)
    local_iam.inject_fault("ListMFADevices", code="Throttling", count=2)
    assert iam.list_mfa_devices("alice") == []
    assert local_iam.call_counts()["ListMFADevices"] == 3


def test_unreachable_iam_is_not_ambiguous(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    iam, _ = client(endpoint_url="http://127.0.0.1:9")
    with pytest.raises(IamError) as info:
        iam.list_mfa_devices("alice")
    assert not info.value.ambiguous
    assert "cannot reach IAM" in info.value.message


def test_the_clock_follows_iam_date_headers(local_iam: LocalIamServer) -> None:
    local_iam.set_clock_offset(125.0)
    skews: list[float] = []
    clock = AwsClock(on_skew=skews.append)
    iam = IamClient(clock, max_attempts=1)
    iam.list_mfa_devices("alice")
    iam.list_mfa_devices("alice")
    offset = clock.offset
    assert offset is not None
    assert offset.low <= 125.0 <= offset.high
    assert offset.uncertainty <= 0.6
    assert skews and skews[0] == pytest.approx(125.0, abs=1.0)
