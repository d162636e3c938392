"""The IAM adapter: real boto3 against the strict local IAM server in its own process."""

from __future__ import annotations

import pytest

from local_iam_server import LocalIamServer
from provisioner.adapters.aws.iam import IamClient
from provisioner.adapters.aws.permissions import Decision
from provisioner.core.clock import AwsClock
from provisioner.core.errors import (
    AccessDenied,
    AwsCredentialsMissing,
    ChangeInProgress,
    CodesRejected,
    ConcurrentChange,
    DeviceLimitReached,
    DirectoryError,
    DirectoryUnavailable,
    InUse,
    InvalidInput,
    NotFound,
    ServiceFailure,
    Throttled,
    UserNotFound,
)
from provisioner.core.model import DeviceSpec
from provisioner.core.totp import code_at, time_step

pytestmark = pytest.mark.iam_server


def client(**kw: object) -> tuple[IamClient, AwsClock]:
    clock = AwsClock()
    params = {"max_attempts": 1, "read_timeout": 2.0, "connect_timeout": 2.0} | kw
    return IamClient(clock, **params), clock  # type: ignore[arg-type]


def test_create_enable_list_delete_round_trip(local_iam: LocalIamServer, admin_iam) -> None:  # type: ignore[no-untyped-def]
    iam, clock = client()
    assert iam.user_arn("alice") == "arn:aws:iam::123456789012:user/alice"
    assert iam.user_account("alice") == "123456789012"
    arn, seed = iam.create_virtual_mfa_device(
        DeviceSpec("alice.test", "/provisioner/", (("provisioner:desk", "t"),))
    )
    # what the core asks the directory instead of building and parsing ARNs itself
    assert iam.device_id("123456789012", "/provisioner/", "alice.test") == arn
    assert iam.device_account(arn) == "123456789012"
    assert iam.under_path(arn, "/provisioner/") and not iam.under_path(arn, "/other/")
    assert arn == "arn:aws:iam::123456789012:mfa/provisioner/alice.test"
    assert "redacted" in repr(seed)
    now = clock.now()
    n = time_step(now)
    iam.enable_mfa_device("alice", arn, code_at(seed, (n - 1) * 30), code_at(seed, n * 30))
    assert iam.list_mfa_devices("alice") == [arn]
    with pytest.raises(InUse):
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
    with pytest.raises(CodesRejected) as info:
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
        ("EntityTemporarilyUnmodifiable", ChangeInProgress),
        ("ConcurrentModification", ConcurrentChange),
        ("LimitExceeded", DeviceLimitReached),
        ("NoSuchEntity", NotFound),
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
    with pytest.raises(DirectoryUnavailable) as info:
        iam.list_mfa_devices("alice")
    assert info.value.ambiguous


def test_transient_faults_are_retried_by_botocore(local_iam: LocalIamServer) -> None:
    iam, _ = client(max_attempts=4)
    local_iam.inject_fault("ListMFADevices", code="Throttling", count=2)
    assert iam.list_mfa_devices("alice") == []
    assert local_iam.call_counts()["ListMFADevices"] == 3


def test_throttling_is_absorbed_and_counted(local_iam: LocalIamServer) -> None:
    """Many desks on one account share its rate: AWS's Throttling is retried by
    botocore's adaptive mode, and every throttled answer reaches the metrics."""
    iam, _ = client(max_attempts=5)
    throttled: list[str] = []
    calls: list[tuple[str, int, str | None]] = []
    iam.observe_throttling(throttled.append)
    iam.observe_calls(lambda action, retries, code: calls.append((action, retries, code)))
    local_iam.inject_fault("GetUser", code="Throttling", count=2)
    assert iam.user_account("alice") == "123456789012"
    assert throttled == ["GetUser", "GetUser"]
    assert calls == [("GetUser", 2, None)]


def test_unreachable_iam_is_not_ambiguous(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    iam, _ = client(endpoint_url="http://127.0.0.1:9")
    with pytest.raises(DirectoryError) as info:
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


# --- who the desk is, what it may do ------------------------------------------------------


def _as_principal(
    local_iam: LocalIamServer, monkeypatch: pytest.MonkeyPatch, name: str, statements: list
) -> str:
    """A principal holding ``statements``, enforcement on, this process signing as it."""
    principal = local_iam.create_principal(name, {"Version": "2012-10-17", "Statement": statements})
    local_iam.set_auth_enforced(True)
    for key, value in principal.credentials_env().items():
        monkeypatch.setenv(key, value)
    return principal.arn


@pytest.fixture
def enforced(local_iam: LocalIamServer):  # type: ignore[no-untyped-def]
    yield local_iam
    local_iam.set_auth_enforced(False)


def test_caller_identity_names_the_desks_principal(
    enforced: LocalIamServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GetCallerIdentity needs no permission: this principal may only list groups.
    arn = _as_principal(
        enforced,
        monkeypatch,
        "desk",
        [{"Effect": "Allow", "Action": "iam:ListGroups", "Resource": "*"}],
    )
    iam, _ = client()
    me = iam.caller_identity()
    assert (me.account, me.arn, me.principal_arn) == ("123456789012", arn, arn)
    assert me.user_id


def test_caller_identity_without_valid_credentials_says_so(
    enforced: LocalIamServer,
) -> None:
    enforced.set_auth_enforced(True)  # the dummy key is no principal's
    iam, _ = client()
    with pytest.raises(AwsCredentialsMissing) as info:
        iam.caller_identity()
    assert "GetCallerIdentity" in info.value.message


def test_simulate_answers_each_check_in_order(
    enforced: LocalIamServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = "arn:aws:iam::123456789012:user/alice"
    devices = "arn:aws:iam::123456789012:mfa/provisioner/*"
    arn = _as_principal(
        enforced,
        monkeypatch,
        "desk",
        [
            {"Effect": "Allow", "Action": "iam:SimulatePrincipalPolicy", "Resource": "*"},
            {"Effect": "Allow", "Action": ["iam:GetUser", "iam:EnableMFADevice"], "Resource": user},
            {"Effect": "Allow", "Action": "iam:CreateVirtualMFADevice", "Resource": devices},
            {"Effect": "Deny", "Action": "iam:EnableMFADevice", "Resource": "*"},
        ],
    )
    iam, _ = client()
    wanted = [
        ("iam:GetUser", user),
        ("iam:CreateVirtualMFADevice", devices),
        ("iam:EnableMFADevice", user),
        ("iam:ListVirtualMFADevices", "*"),
        ("iam:GetUser", devices),
    ]
    evaluations = iam.simulate(arn, wanted)
    assert [(e.action, e.resource) for e in evaluations] == wanted
    assert [e.decision for e in evaluations] == [
        Decision.ALLOWED,
        Decision.ALLOWED,
        Decision.EXPLICIT_DENY,
        Decision.IMPLICIT_DENY,
        Decision.IMPLICIT_DENY,
    ]
    assert [e.allowed for e in evaluations] == [True, True, False, False, False]
    assert enforced.call_counts()["SimulatePrincipalPolicy"] == 3  # one per resource


def test_simulate_follows_pages(local_iam: LocalIamServer) -> None:
    arn = local_iam.create_principal(
        "desk",
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "iam:*", "Resource": "*"}],
        },
    ).arn
    iam, _ = client()
    wanted = [(f"iam:Made{i}Up", "*") for i in range(130)]  # IAM pages at 100
    evaluations = iam.simulate(arn, wanted)
    assert len(evaluations) == 130 and all(e.allowed for e in evaluations)
    assert local_iam.call_counts()["SimulatePrincipalPolicy"] == 2


def test_access_denied_names_the_missing_permission(
    enforced: LocalIamServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    _as_principal(
        enforced,
        monkeypatch,
        "desk",
        [{"Effect": "Allow", "Action": "iam:GetUser", "Resource": "*"}],
    )
    iam, _ = client()
    assert iam.user_arn("alice").endswith(":user/alice")
    with pytest.raises(AccessDenied) as info:
        iam.list_mfa_devices("alice")
    error = info.value
    assert error.permission == "iam:ListMFADevices" and error.code == "AccessDenied"
    assert "lacks iam:ListMFADevices" in error.message
    assert "on resource: arn:aws:iam::123456789012:user/alice" in error.message
    assert error.hint is not None and "iam:ListMFADevices" in error.hint
    assert "docs/iam-policy.json" in error.hint
    with pytest.raises(AccessDenied) as tagged:
        iam.create_virtual_mfa_device(DeviceSpec("t", "/provisioner/", (("k", "v"),)))
    assert tagged.value.permission == "iam:CreateVirtualMFADevice"


def test_access_denied_without_aws_words_names_the_action_called(
    local_iam: LocalIamServer,
) -> None:
    iam, _ = client()
    local_iam.inject_fault("DeactivateMFADevice", code="AccessDenied", message="Access denied")
    with pytest.raises(AccessDenied) as info:
        iam.deactivate_mfa_device("alice", "arn:aws:iam::123456789012:mfa/provisioner/x")
    assert info.value.permission == "iam:DeactivateMFADevice"
    assert "lacks iam:DeactivateMFADevice (AccessDenied: Access denied)" in info.value.message


def test_a_refused_login_is_no_missing_permission(local_iam: LocalIamServer) -> None:
    from provisioner.adapters.aws.iam import login_with_mfa

    with pytest.raises(AccessDenied) as info:
        login_with_mfa("arn:aws:iam::123456789012:mfa/provisioner/nothing", "123456")
    assert info.value.permission is None
    assert info.value.message.startswith("STS refused GetSessionToken")


def test_the_client_keeps_connections_for_a_hub_of_tokens_and_keeps_them_alive(
    local_iam: LocalIamServer,
) -> None:
    """16 tokens enrolling at once, each asking two things at its check: 32 calls at once
    on kept connections (not 10, botocore's default), with TCP keepalive for the idle
    desk; and one cheap call keeps the connection warm."""
    iam, _ = client()
    config = iam._iam.meta.config
    assert config.max_pool_connections >= 32 and config.tcp_keepalive is True
    before = local_iam.call_counts().get("ListVirtualMFADevices", 0)
    iam.keep_warm()
    assert local_iam.call_counts()["ListVirtualMFADevices"] == before + 1
