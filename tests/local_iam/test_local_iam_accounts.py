"""Several accounts in one stand-in: roles, AssumeRole's trust policy, isolation.

Everything goes through the real boto3: a client made from AssumeRole's credentials must
see the role's account and nothing of the others, and the strict rules and the IAM
authorization must hold there as in the default account.
"""

from __future__ import annotations

import base64
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from local_iam_server import DEFAULT_ACCOUNT_ID, AccountRole, LocalIamError, LocalIamServer

from .helpers import NO_RETRY, Device, error_of, make_client, step_of

pytestmark = pytest.mark.iam_server

PROD = "111111111111"
DEV = "222222222222"
DESK_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": [
                "iam:CreateVirtualMFADevice",
                "iam:DeleteVirtualMFADevice",
                "iam:TagMFADevice",
            ],
            "Resource": "arn:aws:iam::*:mfa/provisioner/*",
        },
        {
            "Effect": "Allow",
            "Action": ["iam:EnableMFADevice", "iam:ListMFADevices", "iam:GetUser"],
            "Resource": "arn:aws:iam::*:user/*",
        },
    ],
}


def assumed_client(
    server: LocalIamServer,
    service: str,
    role: AccountRole,
    *,
    caller: tuple[str, str] = ("testing", "testing"),
    external_id: str | None = None,
) -> Any:
    """A boto3 client of ``service`` holding the credentials of ``role``, assumed."""
    sts = make_client(server, "sts", access_key=caller)
    extra = {"ExternalId": external_id} if external_id else {}
    credentials = sts.assume_role(RoleArn=role.arn, RoleSessionName="desk", **extra)["Credentials"]
    return boto3.client(
        service,
        endpoint_url=server.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=credentials["AccessKeyId"],
        aws_secret_access_key=credentials["SecretAccessKey"],
        aws_session_token=credentials["SessionToken"],
        config=NO_RETRY,
    )


def create_device(iam: Any, name: str, path: str = "/provisioner/") -> Device:
    device = iam.create_virtual_mfa_device(VirtualMFADeviceName=name, Path=path)
    created = device["VirtualMFADevice"]
    seed = created["Base32StringSeed"].decode("ascii")
    base64.b32decode(seed)
    return Device(created["SerialNumber"], seed)


def test_assumed_role_sees_its_own_account_only(iam_server: LocalIamServer, iam: Any) -> None:
    iam.create_user(UserName="home-only")
    iam_server.create_user("alice", account=PROD)
    iam_server.create_user("carol", account=DEV)
    prod = iam_server.create_account_role(PROD, "provisioner-desk")
    dev = iam_server.create_account_role(DEV, "provisioner-desk")
    assert prod.arn == f"arn:aws:iam::{PROD}:role/provisioner-desk"

    prod_iam = assumed_client(iam_server, "iam", prod)
    dev_iam = assumed_client(iam_server, "iam", dev)
    assert [u["UserName"] for u in prod_iam.list_users()["Users"]] == ["alice"]
    assert [u["UserName"] for u in dev_iam.list_users()["Users"]] == ["carol"]
    identity = assumed_client(iam_server, "sts", prod).get_caller_identity()
    assert identity["Account"] == PROD
    assert identity["Arn"] == f"arn:aws:sts::{PROD}:assumed-role/provisioner-desk/desk"

    device = create_device(prod_iam, "alice-token")
    assert device.serial == f"arn:aws:iam::{PROD}:mfa/provisioner/alice-token"
    assert iam_server.virtual_devices(account=PROD) == [{"serial": device.serial, "user": None}]
    assert iam_server.virtual_devices(account=DEV) == []
    assert iam_server.virtual_devices() == []
    assert dev_iam.list_virtual_mfa_devices()["VirtualMFADevices"] == []
    assert iam.list_virtual_mfa_devices()["VirtualMFADevices"] == []
    # A device of one account is unknown in another, even under the same name.
    with pytest.raises(ClientError) as excinfo:
        dev_iam.delete_virtual_mfa_device(SerialNumber=device.serial)
    assert error_of(excinfo)[:2] == ("NoSuchEntity", 404)
    assert create_device(dev_iam, "alice-token").serial.startswith(f"arn:aws:iam::{DEV}:")


def test_enable_in_another_account_with_the_strict_rules(
    iam_server: LocalIamServer, server_now: float
) -> None:
    iam_server.create_user("alice", account=PROD)
    iam_server.create_user("alice", account=DEV)
    prod_iam = assumed_client(iam_server, "iam", iam_server.create_account_role(PROD, "desk"))
    dev_iam = assumed_client(iam_server, "iam", iam_server.create_account_role(DEV, "desk"))
    device = create_device(prod_iam, "alice")
    step = step_of(server_now)

    # The strict rules hold there: a wrong pair is refused, not enabled.
    with pytest.raises(ClientError) as excinfo:
        prod_iam.enable_mfa_device(
            UserName="alice",
            SerialNumber=device.serial,
            AuthenticationCode1=device.code(step),
            AuthenticationCode2=device.code(step - 1),
        )
    assert error_of(excinfo)[:2] == ("InvalidAuthenticationCode", 403)
    # The device is not DEV's to enable.
    code1, code2 = device.pair(step)
    with pytest.raises(ClientError) as excinfo:
        dev_iam.enable_mfa_device(
            UserName="alice",
            SerialNumber=device.serial,
            AuthenticationCode1=code1,
            AuthenticationCode2=code2,
        )
    assert error_of(excinfo)[:2] == ("NoSuchEntity", 404)

    prod_iam.enable_mfa_device(
        UserName="alice", SerialNumber=device.serial, AuthenticationCode1=code1,
        AuthenticationCode2=code2,
    )  # fmt: skip
    listed = prod_iam.list_mfa_devices(UserName="alice")["MFADevices"]
    assert [d["SerialNumber"] for d in listed] == [device.serial]
    assert dev_iam.list_mfa_devices(UserName="alice")["MFADevices"] == []
    assert iam_server.virtual_devices(account=PROD) == [{"serial": device.serial, "user": "alice"}]
    # In use in PROD: deleting it is a conflict there, as in the default account.
    with pytest.raises(ClientError) as excinfo:
        prod_iam.delete_virtual_mfa_device(SerialNumber=device.serial)
    assert error_of(excinfo)[:2] == ("DeleteConflict", 409)
    (attempt,) = iam_server.attempts()[-1:]
    assert (attempt.action, attempt.user, attempt.accepted) == ("EnableMFADevice", "alice", True)


def test_assume_role_follows_the_trust_policy(iam_server: LocalIamServer) -> None:
    desk = iam_server.create_principal(
        "desk",
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
        },
    )
    keys = (desk.access_key_id, desk.secret_access_key)
    only_desk = iam_server.create_account_role(PROD, "only-desk", trusted=[desk.arn])
    only_dev = iam_server.create_account_role(PROD, "only-dev", trusted=[DEV])
    sts = make_client(iam_server, "sts", access_key=keys)

    assumed_client(iam_server, "sts", only_desk, caller=keys)  # the trusted user
    for role_arn, caller in (
        (only_desk.arn, make_client(iam_server, "sts")),  # the account's root is not the user
        (only_dev.arn, sts),  # another account is trusted
        (f"arn:aws:iam::{PROD}:role/no-such-role", sts),
        (f"arn:aws:iam::{DEV}:role/only-desk", sts),  # same name, other account
    ):
        with pytest.raises(ClientError) as excinfo:
            caller.assume_role(RoleArn=role_arn, RoleSessionName="desk")
        code, status, message = error_of(excinfo)
        assert (code, status) == ("AccessDenied", 403)
        assert message.endswith(
            f"is not authorized to perform: sts:AssumeRole on resource: {role_arn}"
        )
    with pytest.raises(ClientError) as excinfo:
        sts.assume_role(RoleArn=only_dev.arn, RoleSessionName="desk")
    assert error_of(excinfo)[2].startswith(f"User: {desk.arn} is not authorized")


def test_assume_role_needs_the_external_id(iam_server: LocalIamServer) -> None:
    role = iam_server.create_account_role(PROD, "desk", external_id="desk-7f3a")
    sts = make_client(iam_server, "sts")
    for external_id in (None, "desk-0000"):
        extra = {"ExternalId": external_id} if external_id else {}
        with pytest.raises(ClientError) as excinfo:
            sts.assume_role(RoleArn=role.arn, RoleSessionName="desk", **extra)
        assert error_of(excinfo)[:2] == ("AccessDenied", 403)
    iam = assumed_client(iam_server, "iam", role, external_id="desk-7f3a")
    assert iam.list_users()["Users"] == []


def test_authorization_holds_per_account_for_an_assumed_role(iam_server: LocalIamServer) -> None:
    desk = iam_server.create_principal(
        "desk",
        {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": "*"}],
        },
    )
    role = iam_server.create_account_role(PROD, "desk", trusted=[desk.arn], policy=DESK_POLICY)
    iam_server.create_user("alice", account=PROD)
    iam_server.set_auth_enforced(True)
    iam = assumed_client(
        iam_server, "iam", role, caller=(desk.access_key_id, desk.secret_access_key)
    )

    create_device(iam, "alice")  # mfa/provisioner/* is allowed
    with pytest.raises(ClientError) as excinfo:
        create_device(iam, "elsewhere", path="/")
    code, status, message = error_of(excinfo)
    assert (code, status) == ("AccessDenied", 403)
    assert message.startswith(
        f"User: arn:aws:sts::{PROD}:assumed-role/desk/desk is not authorized to perform: "
        f"iam:CreateVirtualMFADevice on resource: arn:aws:iam::{PROD}:mfa/elsewhere"
    )
    with pytest.raises(ClientError) as excinfo:
        iam.list_users()
    assert error_of(excinfo)[:2] == ("AccessDenied", 403)
    # The simulator judges the role by the same policy, in its own account.
    admin = make_client(iam_server, "iam")
    iam_server.set_auth_enforced(False)
    prod_admin = assumed_client(iam_server, "iam", iam_server.create_account_role(PROD, "admin"))
    results = prod_admin.simulate_principal_policy(
        PolicySourceArn=role.arn,
        ActionNames=["iam:CreateVirtualMFADevice", "iam:DeleteUser"],
        ResourceArns=[f"arn:aws:iam::{PROD}:mfa/provisioner/alice"],
    )["EvaluationResults"]
    assert [r["EvalDecision"] for r in results] == ["allowed", "implicitDeny"]
    with pytest.raises(ClientError) as excinfo:  # the role is not in the default account
        admin.simulate_principal_policy(PolicySourceArn=role.arn, ActionNames=["iam:GetUser"])
    assert error_of(excinfo)[0] == "NoSuchEntity"


def test_roles_and_accounts_are_checked_and_reset(iam_server: LocalIamServer) -> None:
    with pytest.raises(LocalIamError, match="12-digit account id"):
        iam_server.create_account_role("prod", "desk")
    with pytest.raises(LocalIamError, match="12-digit account id"):
        iam_server.create_user("alice", account="12345")
    iam_server.create_account_role(PROD, "desk")
    with pytest.raises(LocalIamError, match="EntityAlreadyExists"):
        iam_server.create_account_role(PROD, "desk")
    iam_server.create_user("alice", account=PROD)
    iam_server.reset()
    # Reset forgets every account: the role is gone, so AssumeRole is refused again.
    with pytest.raises(ClientError) as excinfo:
        make_client(iam_server, "sts").assume_role(
            RoleArn=f"arn:aws:iam::{PROD}:role/desk", RoleSessionName="desk"
        )
    assert error_of(excinfo)[0] == "AccessDenied"
    assert DEFAULT_ACCOUNT_ID == make_client(iam_server, "sts").get_caller_identity()["Account"]
