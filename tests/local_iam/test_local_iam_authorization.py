"""Authorization in the stand-in: AWS's resources per action, its AccessDenied, the switch,
principals, and SimulatePrincipalPolicy."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from local_iam_server import LocalIamError, LocalIamServer, Principal

from .helpers import NO_RETRY, error_of, make_client

pytestmark = pytest.mark.iam_server

ACCOUNT = "123456789012"
DESK_DEVICES = f"arn:aws:iam::{ACCOUNT}:mfa/desk/*"
STAFF = f"arn:aws:iam::{ACCOUNT}:user/staff/*"


def allow(actions: list[str], resource: str | list[str]) -> dict[str, Any]:
    return {"Effect": "Allow", "Action": actions, "Resource": resource}


def document(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def client_of(server: LocalIamServer, principal: Principal, service: str = "iam") -> Any:
    return make_client(
        server, service, access_key=(principal.access_key_id, principal.secret_access_key)
    )


@pytest.fixture
def desk(iam_server: LocalIamServer, iam: Any) -> Principal:
    """A principal allowed to manage devices under /desk/ for users under /staff/;
    users ann (/staff/) and bob (/), enforcement on."""
    iam.create_user(UserName="ann", Path="/staff/")
    iam.create_user(UserName="bob")
    principal = iam_server.create_principal(
        "desk",
        document(
            allow(
                [
                    "iam:CreateVirtualMFADevice",
                    "iam:DeleteVirtualMFADevice",
                    "iam:TagMFADevice",
                    "iam:ListMFADeviceTags",
                ],
                DESK_DEVICES,
            ),
            allow(["iam:EnableMFADevice", "iam:ListMFADevices", "iam:GetUser"], STAFF),
            allow(["iam:ListVirtualMFADevices"], "*"),
        ),
    )
    iam_server.set_auth_enforced(True)
    return principal


def denial(action: str, resource: str, caller: str = "desk") -> str:
    return (
        f"User: arn:aws:iam::{ACCOUNT}:user/{caller} is not authorized to perform: {action} "
        f"on resource: {resource} because no identity-based policy allows the {action} action"
    )


# -- the switch ------------------------------------------------------------------------------


def test_off_by_default_dummy_credentials_do_anything(iam_server: LocalIamServer, iam: Any) -> None:
    assert not iam_server.auth_enforced()
    iam.create_user(UserName="anyone")
    assert make_client(iam_server, "iam", access_key=("made-up", "x")).list_users()["Users"]


def test_reset_turns_enforcement_off(iam_server: LocalIamServer, desk: Principal) -> None:
    assert iam_server.auth_enforced()
    iam_server.reset()
    assert not iam_server.auth_enforced()
    make_client(iam_server, "iam").list_users()  # dummy credentials work again


def test_moto_reset_endpoint_turns_enforcement_off(
    iam_server: LocalIamServer, desk: Principal
) -> None:
    request = urllib.request.Request(iam_server.endpoint_url + "/moto-api/reset", method="POST")  # noqa: S310
    urllib.request.urlopen(request, timeout=5).close()  # noqa: S310 - loopback http
    assert not iam_server.auth_enforced()


# -- who calls -------------------------------------------------------------------------------


def test_an_unknown_key_is_refused(iam_server: LocalIamServer, desk: Principal) -> None:
    for service, call in (("iam", "list_virtual_mfa_devices"), ("sts", "get_caller_identity")):
        with pytest.raises(ClientError) as excinfo:
            getattr(make_client(iam_server, service), call)()  # the dummy "testing" key
        assert error_of(excinfo)[:2] == ("InvalidClientTokenId", 403)


def test_a_wrong_secret_is_refused(iam_server: LocalIamServer, desk: Principal) -> None:
    forged = make_client(iam_server, "iam", access_key=(desk.access_key_id, "not-the-secret"))
    with pytest.raises(ClientError) as excinfo:
        forged.list_virtual_mfa_devices()
    assert error_of(excinfo)[:2] == ("SignatureDoesNotMatch", 403)


def test_an_unsigned_call_is_refused(iam_server: LocalIamServer, desk: Principal) -> None:
    unsigned = boto3.client(
        "iam",
        endpoint_url=iam_server.endpoint_url,
        region_name="us-east-1",
        config=NO_RETRY.merge(Config(signature_version=UNSIGNED)),
    )
    with pytest.raises(ClientError) as excinfo:
        unsigned.list_virtual_mfa_devices()
    assert error_of(excinfo)[:2] == ("MissingAuthenticationToken", 403)


def test_get_caller_identity_needs_no_permission(
    iam_server: LocalIamServer, desk: Principal
) -> None:
    nobody = iam_server.create_principal("nobody", document(allow(["iam:GetGroup"], "*")))
    me = client_of(iam_server, nobody, "sts").get_caller_identity()
    assert (me["Account"], me["Arn"]) == (ACCOUNT, nobody.arn)
    assert client_of(iam_server, desk, "sts").get_caller_identity()["Arn"] == desk.arn


# -- what each call is judged on ------------------------------------------------------------


def test_create_is_judged_on_the_device_arn(iam_server: LocalIamServer, desk: Principal) -> None:
    as_desk = client_of(iam_server, desk)
    created = as_desk.create_virtual_mfa_device(VirtualMFADeviceName="t1", Path="/desk/")
    assert created["VirtualMFADevice"]["SerialNumber"] == f"arn:aws:iam::{ACCOUNT}:mfa/desk/t1"
    with pytest.raises(ClientError) as excinfo:
        as_desk.create_virtual_mfa_device(VirtualMFADeviceName="t2", Path="/other/")
    code, status, message = error_of(excinfo)
    assert (code, status) == ("AccessDenied", 403)
    assert message == denial("iam:CreateVirtualMFADevice", f"arn:aws:iam::{ACCOUNT}:mfa/other/t2")
    with pytest.raises(ClientError):  # no Path: the device is mfa/t3, outside /desk/
        as_desk.create_virtual_mfa_device(VirtualMFADeviceName="t3")


def test_delete_and_tag_calls_are_judged_on_the_serial(
    iam_server: LocalIamServer, iam: Any, desk: Principal
) -> None:
    iam_server.set_auth_enforced(False)
    outside = iam.create_virtual_mfa_device(VirtualMFADeviceName="o", Path="/other/")
    outside_arn = outside["VirtualMFADevice"]["SerialNumber"]
    iam_server.set_auth_enforced(True)
    as_desk = client_of(iam_server, desk)
    inside_arn = as_desk.create_virtual_mfa_device(VirtualMFADeviceName="i", Path="/desk/")[
        "VirtualMFADevice"
    ]["SerialNumber"]
    as_desk.tag_mfa_device(SerialNumber=inside_arn, Tags=[{"Key": "k", "Value": "v"}])
    assert as_desk.list_mfa_device_tags(SerialNumber=inside_arn)["Tags"] == [
        {"Key": "k", "Value": "v"}
    ]
    for call, action in (
        (
            lambda: as_desk.delete_virtual_mfa_device(SerialNumber=outside_arn),
            "DeleteVirtualMFADevice",
        ),
        (
            lambda: as_desk.tag_mfa_device(
                SerialNumber=outside_arn, Tags=[{"Key": "k", "Value": "v"}]
            ),
            "TagMFADevice",
        ),
        (
            lambda: as_desk.untag_mfa_device(SerialNumber=inside_arn, TagKeys=["k"]),
            "UntagMFADevice",
        ),
    ):
        with pytest.raises(ClientError) as excinfo:
            call()
        resource = inside_arn if action == "UntagMFADevice" else outside_arn
        assert error_of(excinfo)[2] == denial(f"iam:{action}", resource)
    as_desk.delete_virtual_mfa_device(SerialNumber=inside_arn)


def test_user_calls_are_judged_on_the_users_arn_with_its_path(
    iam_server: LocalIamServer, desk: Principal
) -> None:
    as_desk = client_of(iam_server, desk)
    assert (
        as_desk.get_user(UserName="ann")["User"]["Arn"] == f"arn:aws:iam::{ACCOUNT}:user/staff/ann"
    )
    as_desk.list_mfa_devices(UserName="ann")
    for call, action in (
        (lambda: as_desk.get_user(UserName="bob"), "GetUser"),
        (lambda: as_desk.list_mfa_devices(UserName="bob"), "ListMFADevices"),
        (
            lambda: as_desk.enable_mfa_device(
                UserName="bob",
                SerialNumber=f"arn:aws:iam::{ACCOUNT}:mfa/desk/x",
                AuthenticationCode1="123456",
                AuthenticationCode2="234567",
            ),
            "EnableMFADevice",
        ),
        (
            lambda: as_desk.deactivate_mfa_device(
                UserName="ann", SerialNumber=f"arn:aws:iam::{ACCOUNT}:mfa/desk/x"
            ),
            "DeactivateMFADevice",
        ),
    ):
        with pytest.raises(ClientError) as excinfo:
            call()
        user = "staff/ann" if action == "DeactivateMFADevice" else "bob"
        assert error_of(excinfo) == (
            "AccessDenied",
            403,
            denial(f"iam:{action}", f"arn:aws:iam::{ACCOUNT}:user/{user}"),
        )


def test_an_unknown_user_is_judged_on_the_arn_it_would_have(
    iam_server: LocalIamServer, desk: Principal
) -> None:
    with pytest.raises(ClientError) as excinfo:
        client_of(iam_server, desk).get_user(UserName="nobody")
    assert error_of(excinfo)[2] == denial("iam:GetUser", f"arn:aws:iam::{ACCOUNT}:user/nobody")


def test_without_a_user_name_the_callers_own_user_is_judged(iam_server: LocalIamServer) -> None:
    me = f"arn:aws:iam::{ACCOUNT}:user/self-service"
    principal = iam_server.create_principal(
        "self-service", document(allow(["iam:GetUser", "iam:ListMFADevices"], me))
    )
    iam_server.set_auth_enforced(True)
    as_me = client_of(iam_server, principal)
    assert as_me.get_user()["User"]["Arn"] == me
    with pytest.raises(ClientError) as excinfo:
        as_me.list_mfa_devices(UserName="someone-else")
    assert error_of(excinfo)[0] == "AccessDenied"


def test_tags_on_create_also_need_tag_mfa_device(iam_server: LocalIamServer, iam: Any) -> None:
    principal = iam_server.create_principal(
        "untagger", document(allow(["iam:CreateVirtualMFADevice"], DESK_DEVICES))
    )
    iam_server.set_auth_enforced(True)
    as_it = client_of(iam_server, principal)
    with pytest.raises(ClientError) as excinfo:
        as_it.create_virtual_mfa_device(
            VirtualMFADeviceName="tagged", Path="/desk/", Tags=[{"Key": "k", "Value": "v"}]
        )
    assert error_of(excinfo) == (
        "AccessDenied",
        403,
        denial("iam:TagMFADevice", f"arn:aws:iam::{ACCOUNT}:mfa/desk/tagged", "untagger"),
    )
    as_it.create_virtual_mfa_device(VirtualMFADeviceName="plain", Path="/desk/")
    iam_server.set_auth_enforced(False)
    assert [d["serial"] for d in iam_server.virtual_devices()] == [
        f"arn:aws:iam::{ACCOUNT}:mfa/desk/plain"  # the refused one was not created
    ]


def test_an_explicit_deny_wins_and_says_so(iam_server: LocalIamServer) -> None:
    principal = iam_server.create_principal(
        "denied",
        document(
            allow(["iam:*"], "*"),
            {"Effect": "Deny", "Action": "iam:DeleteVirtualMFADevice", "Resource": DESK_DEVICES},
        ),
    )
    iam_server.set_auth_enforced(True)
    as_it = client_of(iam_server, principal)
    serial = as_it.create_virtual_mfa_device(VirtualMFADeviceName="d", Path="/desk/")[
        "VirtualMFADevice"
    ]["SerialNumber"]
    with pytest.raises(ClientError) as excinfo:
        as_it.delete_virtual_mfa_device(SerialNumber=serial)
    assert error_of(excinfo)[2] == (
        f"User: arn:aws:iam::{ACCOUNT}:user/denied is not authorized to perform: "
        f"iam:DeleteVirtualMFADevice on resource: {serial} with an explicit deny in an "
        "identity-based policy"
    )


def test_a_refused_call_changes_nothing(
    iam_server: LocalIamServer, iam: Any, desk: Principal
) -> None:
    with pytest.raises(ClientError):
        client_of(iam_server, desk).create_user(UserName="sneaky")
    iam_server.set_auth_enforced(False)
    assert "sneaky" not in [u["UserName"] for u in iam.list_users()["Users"]]


# -- principals through the control API ------------------------------------------------------


def test_create_principal_returns_a_working_key_and_hides_its_secret(
    iam_server: LocalIamServer, iam: Any
) -> None:
    principal = iam_server.create_principal(
        "ops", document(allow(["iam:ListUsers"], "*")), path="/desks/"
    )
    assert principal.arn == f"arn:aws:iam::{ACCOUNT}:user/desks/ops"
    assert principal.secret_access_key not in repr(principal)
    assert principal.credentials_env()["AWS_ACCESS_KEY_ID"] == principal.access_key_id
    iam_server.set_auth_enforced(True)
    assert client_of(iam_server, principal).list_users()["Users"]


@pytest.mark.parametrize(
    "spec",
    [
        {"policy": {"Version": "2012-10-17", "Statement": []}},
        {"name": "x"},
        {"name": "x", "policy": "not json"},
        {"name": "x", "policy": {"Statement": []}, "path": "nope"},
    ],
)
def test_bad_principal_requests_are_refused(
    iam_server: LocalIamServer, spec: dict[str, Any]
) -> None:
    request = urllib.request.Request(  # noqa: S310 - loopback http
        iam_server.endpoint_url + "/_local_iam/principals",
        data=json.dumps(spec).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(request, timeout=5)  # noqa: S310
    assert excinfo.value.code == 400


def test_a_principal_name_taken_is_refused(iam_server: LocalIamServer) -> None:
    iam_server.create_principal("twice", document(allow(["iam:ListUsers"], "*")))
    with pytest.raises(LocalIamError, match="EntityAlreadyExists"):
        iam_server.create_principal("twice", document(allow(["iam:ListUsers"], "*")))


def test_enforcement_must_be_set_with_a_boolean(iam_server: LocalIamServer) -> None:
    with pytest.raises(LocalIamError, match="HTTP 400"):
        iam_server._control("PUT", "auth", {"enforced": "yes"})
    assert not iam_server.auth_enforced()


# -- SimulatePrincipalPolicy -----------------------------------------------------------------


def results(answer: dict[str, Any]) -> dict[str, str]:
    return {r["EvalActionName"]: r["EvalDecision"] for r in answer["EvaluationResults"]}


def test_simulate_gives_allowed_implicit_and_explicit_deny(
    iam_server: LocalIamServer, iam: Any
) -> None:
    principal = iam_server.create_principal(
        "sim",
        document(
            allow(["iam:EnableMFADevice", "iam:DeactivateMFADevice"], STAFF),
            {"Effect": "Deny", "Action": "iam:DeactivateMFADevice", "Resource": "*"},
        ),
    )
    answer = iam.simulate_principal_policy(
        PolicySourceArn=principal.arn,
        ActionNames=["iam:EnableMFADevice", "iam:DeactivateMFADevice", "iam:ResyncMFADevice"],
        ResourceArns=[f"arn:aws:iam::{ACCOUNT}:user/staff/ann"],
    )
    assert results(answer) == {
        "iam:EnableMFADevice": "allowed",
        "iam:DeactivateMFADevice": "explicitDeny",
        "iam:ResyncMFADevice": "implicitDeny",
    }
    assert answer["IsTruncated"] is False
    outside = iam.simulate_principal_policy(
        PolicySourceArn=principal.arn,
        ActionNames=["iam:EnableMFADevice"],
        ResourceArns=[f"arn:aws:iam::{ACCOUNT}:user/bob"],
    )
    assert results(outside) == {"iam:EnableMFADevice": "implicitDeny"}


def test_simulate_over_several_resources_answers_per_resource(
    iam_server: LocalIamServer, iam: Any
) -> None:
    principal = iam_server.create_principal("sim", document(allow(["iam:GetUser"], STAFF)))
    ann, bob = f"arn:aws:iam::{ACCOUNT}:user/staff/ann", f"arn:aws:iam::{ACCOUNT}:user/bob"
    [result] = iam.simulate_principal_policy(
        PolicySourceArn=principal.arn, ActionNames=["iam:GetUser"], ResourceArns=[ann, bob]
    )["EvaluationResults"]
    assert result["EvalDecision"] == "implicitDeny"  # the strictest of the two
    assert {
        r["EvalResourceName"]: r["EvalResourceDecision"] for r in result["ResourceSpecificResults"]
    } == {ann: "allowed", bob: "implicitDeny"}
    [anywhere] = iam.simulate_principal_policy(
        PolicySourceArn=principal.arn, ActionNames=["iam:GetUser"]
    )["EvaluationResults"]
    assert (anywhere["EvalResourceName"], anywhere["EvalDecision"]) == ("*", "implicitDeny")


def test_simulate_counts_group_and_managed_policies(iam_server: LocalIamServer, iam: Any) -> None:
    principal = iam_server.create_principal("member", document(allow(["iam:GetUser"], "*")))
    iam.create_group(GroupName="desks")
    iam.add_user_to_group(GroupName="desks", UserName="member")
    iam.put_group_policy(
        GroupName="desks",
        PolicyName="inline",
        PolicyDocument=json.dumps(document(allow(["iam:ListUsers"], "*"))),
    )
    managed = iam.create_policy(
        PolicyName="managed", PolicyDocument=json.dumps(document(allow(["iam:ListGroups"], "*")))
    )["Policy"]["Arn"]
    iam.attach_group_policy(GroupName="desks", PolicyArn=managed)
    answer = iam.simulate_principal_policy(
        PolicySourceArn=principal.arn,
        ActionNames=["iam:GetUser", "iam:ListUsers", "iam:ListGroups", "iam:ListRoles"],
    )
    assert results(answer) == {
        "iam:GetUser": "allowed",
        "iam:ListUsers": "allowed",
        "iam:ListGroups": "allowed",
        "iam:ListRoles": "implicitDeny",
    }
    group_arn = iam.get_group(GroupName="desks")["Group"]["Arn"]
    assert results(
        iam.simulate_principal_policy(PolicySourceArn=group_arn, ActionNames=["iam:GetUser"])
    ) == {"iam:GetUser": "implicitDeny"}  # the user's own policy is not the group's


def test_simulate_pages(iam_server: LocalIamServer, iam: Any) -> None:
    principal = iam_server.create_principal("pager", document(allow(["iam:*"], "*")))
    actions = [f"iam:Action{i}" for i in range(5)]
    first = iam.simulate_principal_policy(
        PolicySourceArn=principal.arn, ActionNames=actions, MaxItems=3
    )
    assert first["IsTruncated"] is True and len(first["EvaluationResults"]) == 3
    rest = iam.simulate_principal_policy(
        PolicySourceArn=principal.arn, ActionNames=actions, Marker=first["Marker"]
    )
    assert rest["IsTruncated"] is False
    assert [
        r["EvalActionName"] for r in first["EvaluationResults"] + rest["EvaluationResults"]
    ] == actions
    pages = iam.get_paginator("simulate_principal_policy").paginate(
        PolicySourceArn=principal.arn, ActionNames=actions, PaginationConfig={"PageSize": 2}
    )
    assert [r["EvalActionName"] for p in pages for r in p["EvaluationResults"]] == actions


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (f"arn:aws:iam::{ACCOUNT}:user/ghost", ("NoSuchEntity", 404)),
        (f"arn:aws:iam::{ACCOUNT}:role/ghost", ("NoSuchEntity", 404)),
        (f"arn:aws:iam::{ACCOUNT}:mfa/desk/device", ("InvalidInput", 400)),
        ("arn:aws:s3:::a-bucket-name-here", ("InvalidInput", 400)),
    ],
)
def test_simulate_refuses_what_is_not_a_known_principal(
    iam: Any, source: str, expected: tuple[str, int]
) -> None:
    with pytest.raises(ClientError) as excinfo:
        iam.simulate_principal_policy(PolicySourceArn=source, ActionNames=["iam:GetUser"])
    assert error_of(excinfo)[:2] == expected


def test_simulate_is_itself_authorized_on_the_principal(
    iam_server: LocalIamServer, iam: Any
) -> None:
    other = iam_server.create_principal("other", document(allow(["iam:GetUser"], "*")))
    me = f"arn:aws:iam::{ACCOUNT}:user/self-check"
    principal = iam_server.create_principal(
        "self-check", document(allow(["iam:SimulatePrincipalPolicy"], me))
    )
    iam_server.set_auth_enforced(True)
    as_me = client_of(iam_server, principal)
    assert results(
        as_me.simulate_principal_policy(PolicySourceArn=me, ActionNames=["iam:GetUser"])
    ) == {"iam:GetUser": "implicitDeny"}
    with pytest.raises(ClientError) as excinfo:
        as_me.simulate_principal_policy(PolicySourceArn=other.arn, ActionNames=["iam:GetUser"])
    assert error_of(excinfo)[2] == denial(
        "iam:SimulatePrincipalPolicy", other.arn, caller="self-check"
    )
