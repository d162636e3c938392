"""IAM authorization as AWS does it for virtual MFA devices, and SimulatePrincipalPolicy.

moto can check a caller's signature and policies, but for IAM it evaluates every action
against resource ``*``, so a policy scoped to ``mfa/provisioner/*`` and ``user/*`` never
matches, and it lacks SimulatePrincipalPolicy. Here each call is judged on the ARN AWS
judges it on (the device for create/delete/tag, the user for enable/deactivate/resync/
list/get), CreateVirtualMFADevice with Tags also needs ``iam:TagMFADevice``, and a refusal
is AWS's 403 AccessDenied naming the action and the resource.

Enforcement follows the control API's switch (off by default: moto's dummy credentials
do anything). Policies are evaluated with moto's statement matcher: Action/Resource
wildcards, Allow and Deny; no NotResource, no policy variables, no permissions
boundaries, conditions only as far as moto knows them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from enum import StrEnum
from typing import Any
from urllib.parse import urlparse

from moto.core.responses import ActionResult
from moto.iam.access_control import IAMPolicyStatement, IAMRequest, PermissionResult
from moto.iam.exceptions import InvalidInput, NoSuchEntity
from moto.iam.models import IAMBackend, User
from moto.iam.responses import IamResponse
from moto.sts.responses import TokenResponse
from werkzeug.exceptions import HTTPException

from local_iam_server.accounts import caller_arn
from local_iam_server.aws_errors import query_error_body
from local_iam_server.control import AuthSwitch
from local_iam_server.strict import paginate

# Judged on the device's ARN (its SerialNumber).
_ON_DEVICE = frozenset(
    {"DeleteVirtualMFADevice", "TagMFADevice", "UntagMFADevice", "ListMFADeviceTags"}
)
# Judged on the user's ARN (the caller's own user when UserName is absent).
_ON_USER = frozenset(
    {"EnableMFADevice", "DeactivateMFADevice", "ResyncMFADevice", "ListMFADevices", "GetUser"}
)
# STS calls that need no permission (AWS allows them to any valid credentials).
_STS_ALWAYS_ALLOWED = frozenset({"GetCallerIdentity", "GetSessionToken"})


class Decision(StrEnum):
    """SimulatePrincipalPolicy's EvalDecision."""

    ALLOWED = "allowed"
    IMPLICIT_DENY = "implicitDeny"
    EXPLICIT_DENY = "explicitDeny"


class AwsRefusal(HTTPException):
    """An AWS error moto's call_action renders as it is: status and query-protocol body."""

    def __init__(self, code: str, message: str, *, status: int, service: str = "iam") -> None:
        super().__init__(
            description=query_error_body(code, message, status=status, service=service).decode()
        )
        self.code = status


# -- policies --------------------------------------------------------------------------


def _statements(document: str) -> list[dict[str, Any]]:
    statements = json.loads(document)["Statement"]
    return [statements] if isinstance(statements, dict) else list(statements)


def evaluate(documents: Iterable[str], action: str, resource: str) -> Decision:
    """AWS's evaluation of identity policies: an explicit deny wins, then any allow."""
    allowed = False
    for document in documents:
        for statement in _statements(document):
            result = IAMPolicyStatement(statement).is_action_permitted(action, resource)
            effect = statement.get("Effect")
            if result is PermissionResult.DENIED and effect == "Deny":
                return Decision.EXPLICIT_DENY
            # moto answers DENIED for an Allow whose condition fails: that allows nothing.
            if result is PermissionResult.PERMITTED and effect == "Allow":
                allowed = True
    return Decision.ALLOWED if allowed else Decision.IMPLICIT_DENY


def _managed_document(policy: Any) -> str:
    return str(next(v for v in policy.versions if v.is_default).document)


def _documents_of(entity: Any) -> list[str]:
    """Inline and attached managed policies of a user, group or role."""
    return [*entity.policies.values()] + [
        _managed_document(p) for p in entity.managed_policies.values()
    ]


def identity_policies(backend: IAMBackend, principal_arn: str) -> list[str]:
    """Every identity policy of a user (its groups' too), group or role, by ARN."""
    parts = principal_arn.split(":", 5)
    kind = parts[5].split("/", 1)[0] if len(parts) == 6 and parts[2] == "iam" else ""
    entities: dict[str, Any] = {
        "user": backend.users,
        "group": backend.groups,
        "role": backend.roles,
    }
    if kind not in entities:
        raise InvalidInput(f"Invalid ARN: {principal_arn} is not the ARN of a user, group or role.")
    entity = next((e for e in entities[kind].values() if e.arn == principal_arn), None)
    if entity is None:
        name = principal_arn.rsplit("/", 1)[-1]
        raise NoSuchEntity(f"The {kind} with name {name} cannot be found.")
    documents = _documents_of(entity)
    if kind == "user":
        for group in backend.get_groups_for_user(entity.name):
            documents += _documents_of(group)
    return documents


# -- what each call is judged on -------------------------------------------------------


def _user_arn(backend: IAMBackend, name: str | None, caller: User | None) -> str:
    if not name:
        return caller.arn if caller is not None else "*"
    user = backend.users.get(name)
    if user is not None:
        return str(user.arn)  # with its path, as policies see it
    return f"arn:{backend.partition}:iam::{backend.account_id}:user/{name}"


def required_checks(
    backend: IAMBackend, action: str, params: dict[str, Any], caller: User | None
) -> list[tuple[str, str]]:
    """(iam:Action, resource ARN) pairs the caller must be allowed for this call."""
    if action == "CreateVirtualMFADevice":
        path = params.get("Path") or "/"
        device = (
            f"arn:{backend.partition}:iam::{backend.account_id}:mfa{path}"
            f"{params.get('VirtualMFADeviceName', '')}"
        )
        checks = [("iam:CreateVirtualMFADevice", device)]
        if params.get("Tags"):
            checks.append(("iam:TagMFADevice", device))  # AWS: tagging on create is tagging
        return checks
    if action in _ON_DEVICE:
        return [(f"iam:{action}", str(params.get("SerialNumber") or "*"))]
    if action in _ON_USER:
        return [(f"iam:{action}", _user_arn(backend, params.get("UserName"), caller))]
    if action == "SimulatePrincipalPolicy":
        return [(f"iam:{action}", str(params.get("PolicySourceArn") or "*"))]
    return [(f"iam:{action}", "*")]  # ListVirtualMFADevices and anything account-wide


def _denial(caller_arn: str, action: str, resource: str, decision: Decision) -> AwsRefusal:
    why = (
        "with an explicit deny in an identity-based policy"
        if decision is Decision.EXPLICIT_DENY
        else f"because no identity-based policy allows the {action} action"
    )
    return AwsRefusal(
        "AccessDenied",
        f"User: {caller_arn} is not authorized to perform: {action} on resource: {resource} {why}",
        status=403,
    )


def _signed_request(response: Any) -> Any:
    """moto's request check: a known access key and a matching signature (else its 403)."""
    path = response.raw_path
    query = urlparse(response.uri).query
    if query:
        path += "?" + query
    return IAMRequest(
        account_id=response.current_account,
        method=response.method,
        path=path,
        data=response.data,
        body=response.raw_body,
        headers=response.headers,
        action=response._get_action(),
    )


def authorize_iam(response: IamResponse, switch: AuthSwitch) -> None:
    if not switch.enforced:
        return
    request = _signed_request(response)
    request.check_signature()
    backend = response.backend
    caller = backend.get_user_from_access_key_id(response.get_access_key())
    params = dict(response.params) if response.params else {}
    checks = required_checks(backend, response._get_action(), params, caller)
    key = backend.access_keys.get(response.get_access_key())
    role_arn = getattr(key, "role_arn", None) if caller is None else None
    if caller is None and not role_arn:  # a key moto issued otherwise: its own check
        for _action, resource in checks:
            request.check_action_permitted(resource)
        return
    # An assumed role is judged, like a user, on the ARN AWS judges each call on.
    documents = identity_policies(backend, str(caller.arn if caller else role_arn))
    who = str(caller.arn) if caller else caller_arn(backend.account_id, response.get_access_key())
    for action, resource in checks:
        decision = evaluate(documents, action, resource)
        if decision is not Decision.ALLOWED:
            raise _denial(who, action, resource, decision)


def authorize_sts(response: TokenResponse, switch: AuthSwitch) -> None:
    if not switch.enforced:
        return
    request = _signed_request(response)
    request.check_signature()
    if response._get_action() not in _STS_ALWAYS_ALLOWED:
        request.check_action_permitted(response._determine_resource())


# -- SimulatePrincipalPolicy -----------------------------------------------------------

_STRICTNESS = [Decision.ALLOWED, Decision.IMPLICIT_DENY, Decision.EXPLICIT_DENY]


def simulate(
    backend: IAMBackend, source_arn: str, actions: list[str], resources: list[str] | None
) -> list[dict[str, Any]]:
    """One EvaluationResult per action, as AWS now answers: the top-level decision is the
    strictest over the resources, each resource's own in ResourceSpecificResults.
    MatchedStatements are left empty."""
    if not actions:
        raise InvalidInput("ActionNames must name at least one action.")
    documents = identity_policies(backend, source_arn)
    results = []
    for action in actions:
        decisions = [(r, evaluate(documents, action, r)) for r in resources or ["*"]]
        result: dict[str, Any] = {
            "EvalActionName": action,
            "EvalResourceName": decisions[0][0] if len(decisions) == 1 else "*",
            "EvalDecision": max((d for _, d in decisions), key=_STRICTNESS.index).value,
            "MatchedStatements": [],
            "MissingContextValues": [],
        }
        if resources:
            result["ResourceSpecificResults"] = [
                {
                    "EvalResourceName": r,
                    "EvalResourceDecision": d.value,
                    "MatchedStatements": [],
                    "MissingContextValues": [],
                }
                for r, d in decisions
            ]
        results.append(result)
    return results


# -- installing into moto --------------------------------------------------------------


def install(switch: AuthSwitch) -> None:
    """Patch moto's IAM and STS response classes: authorization, SimulatePrincipalPolicy.

    Process-wide, like ``strict.install``; the server calls it once at start-up.
    """

    def iam_authorize(self: IamResponse, resource: str = "*") -> None:
        authorize_iam(self, switch)

    def sts_authorize(self: TokenResponse, resource: str = "*") -> None:
        authorize_sts(self, switch)

    def simulate_principal_policy(self: IamResponse) -> ActionResult:
        results = simulate(
            self.backend,
            self._get_param("PolicySourceArn"),
            list(self._get_param("ActionNames", [])),
            list(self._get_param("ResourceArns", [])) or None,
        )
        page, marker = paginate(results, self._get_param("Marker"), self._get_param("MaxItems"))
        return ActionResult(
            {"EvaluationResults": page, "IsTruncated": marker is not None, "Marker": marker}
        )

    # moto calls this before every action, with the resource it made up: "*".
    setattr(IamResponse, "_authenticate_and_authorize_normal_action", iam_authorize)  # noqa: B010
    setattr(TokenResponse, "_authenticate_and_authorize_normal_action", sts_authorize)  # noqa: B010
    setattr(IamResponse, "simulate_principal_policy", simulate_principal_policy)  # noqa: B010


__all__ = [
    "AwsRefusal",
    "Decision",
    "evaluate",
    "identity_policies",
    "install",
    "required_checks",
    "simulate",
]
