"""Injected faults, as the real boto3 experiences them."""

from __future__ import annotations

import time
from typing import Any

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError
from botocore.parsers import ResponseParserError

from local_iam_server import LocalIamError, LocalIamServer

from .helpers import error_of, make_client

pytestmark = pytest.mark.iam_server


@pytest.mark.parametrize(
    ("action", "code", "status"),
    [
        ("EnableMFADevice", "Throttling", 400),
        ("EnableMFADevice", "ServiceFailure", 500),
        ("EnableMFADevice", "EntityTemporarilyUnmodifiable", 409),
        ("EnableMFADevice", "ConcurrentModification", 409),
        ("EnableMFADevice", "InvalidAuthenticationCode", 403),
        ("EnableMFADevice", "LimitExceeded", 409),
        ("CreateVirtualMFADevice", "Throttling", 400),
        ("ListMFADevices", "ServiceFailure", 500),
        ("DeleteVirtualMFADevice", "NoSuchEntity", 404),
    ],
)
def test_error_fault_reaches_boto3_as_the_aws_error(
    iam: Any, iam_server: LocalIamServer, action: str, code: str, status: int
) -> None:
    iam_server.inject_fault(action, code=code)  # AWS's status is the default
    calls = {
        "EnableMFADevice": lambda: iam.enable_mfa_device(
            UserName="u",
            SerialNumber="arn:aws:iam::123456789012:mfa/t",
            AuthenticationCode1="123456",
            AuthenticationCode2="654321",
        ),
        "CreateVirtualMFADevice": lambda: iam.create_virtual_mfa_device(VirtualMFADeviceName="t"),
        "ListMFADevices": lambda: iam.list_mfa_devices(UserName="u"),
        "DeleteVirtualMFADevice": lambda: iam.delete_virtual_mfa_device(
            SerialNumber="arn:aws:iam::123456789012:mfa/t"
        ),
    }
    with pytest.raises(ClientError) as excinfo:
        calls[action]()
    assert error_of(excinfo)[:2] == (code, status)
    assert iam_server.pending_faults() == []
    assert iam_server.call_counts() == {action: 1}
    assert iam_server.attempts() == []  # a faulted call never reaches moto


def test_error_fault_with_custom_status_and_message(iam: Any, iam_server: LocalIamServer) -> None:
    iam_server.inject_fault("ListUsers", code="SlowDown", status=503, message="please & <wait>")
    with pytest.raises(ClientError) as excinfo:
        iam.list_users()
    assert error_of(excinfo) == ("SlowDown", 503, "please & <wait>")


def test_fault_hits_only_the_next_count_calls_of_its_action(
    iam: Any, iam_server: LocalIamServer
) -> None:
    iam_server.inject_fault("CreateVirtualMFADevice", code="Throttling", count=2)
    iam.list_users()  # another action is not affected
    for _ in range(2):
        with pytest.raises(ClientError):
            iam.create_virtual_mfa_device(VirtualMFADeviceName="t")
    iam.create_virtual_mfa_device(VirtualMFADeviceName="t")
    assert iam_server.call_counts() == {"ListUsers": 1, "CreateVirtualMFADevice": 3}


def test_throttling_is_retried_by_botocore_standard_mode(iam_server: LocalIamServer) -> None:
    # The product uses standard/adaptive retries; a throttled call then succeeds.
    retrying = make_client(
        iam_server, "iam", Config(retries={"total_max_attempts": 2, "mode": "standard"})
    )
    iam_server.inject_fault("CreateVirtualMFADevice", code="Throttling")
    retrying.create_virtual_mfa_device(VirtualMFADeviceName="t")
    assert iam_server.call_counts() == {"CreateVirtualMFADevice": 2}


def test_garbage_fault_is_a_response_parser_error(iam: Any, iam_server: LocalIamServer) -> None:
    iam_server.inject_fault("ListMFADevices", kind="garbage")
    with pytest.raises(ResponseParserError):
        iam.list_mfa_devices(UserName="u")


def test_drop_fault_closes_the_connection_without_a_response(
    iam: Any, iam_server: LocalIamServer
) -> None:
    iam_server.inject_fault("CreateVirtualMFADevice", kind="drop")
    with pytest.raises(ConnectionClosedError):
        iam.create_virtual_mfa_device(VirtualMFADeviceName="t")
    assert iam.list_virtual_mfa_devices()["VirtualMFADevices"] == []  # never reached moto


def test_delay_fault_longer_than_the_read_timeout_is_a_timeout_but_still_happens(
    iam_server: LocalIamServer,
) -> None:
    impatient = make_client(
        iam_server, "iam", Config(read_timeout=0.3, retries={"total_max_attempts": 1})
    )
    iam_server.inject_fault("CreateVirtualMFADevice", kind="delay", delay=0.8)
    with pytest.raises(ReadTimeoutError):
        impatient.create_virtual_mfa_device(VirtualMFADeviceName="t")
    # The client gave up, the server did not: the outcome is unknown to the client,
    # and the device exists (as it would on AWS).
    time.sleep(0.8)
    listed = impatient.list_virtual_mfa_devices()["VirtualMFADevices"]
    assert [d["SerialNumber"] for d in listed] == ["arn:aws:iam::123456789012:mfa/t"]


def test_delay_fault_shorter_than_the_read_timeout_answers_late(
    iam: Any, iam_server: LocalIamServer
) -> None:
    iam_server.inject_fault("ListUsers", kind="delay", delay=0.3)
    started = time.monotonic()
    iam.list_users()
    assert time.monotonic() - started >= 0.3


def test_faults_apply_to_sts_too(sts: Any, iam_server: LocalIamServer) -> None:
    iam_server.inject_fault("GetSessionToken", code="Throttling")
    with pytest.raises(ClientError) as excinfo:
        sts.get_session_token()
    assert error_of(excinfo)[:2] == ("Throttling", 400)


def test_clear_faults(iam: Any, iam_server: LocalIamServer) -> None:
    iam_server.inject_fault("ListUsers", code="Throttling", count=5)
    iam_server.inject_fault("ListMFADevices", kind="drop")
    assert len(iam_server.pending_faults()) == 2
    assert iam_server.clear_faults() == 2
    iam.list_users()
    assert iam_server.pending_faults() == []


@pytest.mark.parametrize(
    "spec",
    [
        {"code": "MadeUpError"},  # unknown code needs an explicit status
        {"code": "Throttling", "status": 200},
        {},  # an error fault needs a code
        {"kind": "explode"},
        {"kind": "delay", "delay": -1},
        {"kind": "drop", "count": 0},
    ],
)
def test_bad_fault_requests_are_refused(iam_server: LocalIamServer, spec: dict[str, Any]) -> None:
    with pytest.raises(LocalIamError, match="HTTP 400"):
        iam_server.inject_fault("ListUsers", **spec)
    assert iam_server.pending_faults() == []
