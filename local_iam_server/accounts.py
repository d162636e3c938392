"""Several AWS accounts in one stand-in: roles to assume, and AssumeRole as AWS judges it.

moto already keeps one IAM backend per account id and keys an assumed role's temporary
credentials to the role's account (``STSBackend.assume_role`` creates the key in that
account's backend; ``get_account_id_from`` finds it there), so a boto3 client made from
them sees that account's users and devices only, and the strict rules and authorization,
which take the calling account's backend, hold per account. What moto lacks: it hands
out credentials for any role ARN, existing or not, whoever asks. Here AssumeRole is
refused with AWS's 403 AccessDenied unless the role exists and its trust policy allows
the caller (``Principal.AWS``: ``*``, an account id or its ``:root``, the caller's ARN)
with the ``sts:ExternalId`` its ``StringEquals`` condition asks for. Explicit denies
win; any other condition allows nothing.
"""

from __future__ import annotations

import json
import re
from typing import Any

from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.iam.exceptions import IAMException
from moto.iam.models import IAMBackend, iam_backends
from moto.sts.models import sts_backends
from moto.sts.responses import TokenResponse

from local_iam_server.aws_errors import query_error_body

PARTITION = "aws"
REGION = "us-east-1"
ROLE_POLICY_NAME = "provisioner-role"

_ACCOUNT_RE = re.compile(r"\d{12}")
_ROLE_ARN_RE = re.compile(r"arn:aws:iam::(\d{12}):role/[\x21-\x7e]+")


class AccountSpecError(ValueError):
    """A role request the control API cannot honour (a bad account id, policy or name)."""


def backend_of(account_id: str) -> IAMBackend:
    """The IAM backend of ``account_id`` (moto creates it on first use)."""
    if not _ACCOUNT_RE.fullmatch(account_id):
        raise AccountSpecError(f"'account' must be a 12-digit account id, not {account_id!r}")
    backend: IAMBackend = iam_backends[account_id][PARTITION]
    return backend


def create_role(
    account_id: str, name: str, trust: str, policy: str | None, path: str = "/"
) -> dict[str, str]:
    """A role in ``account_id`` with ``trust`` as its trust policy and ``policy`` inline."""
    backend = backend_of(account_id)
    try:
        json.loads(trust)["Statement"]  # noqa: B018 - refuse what AssumeRole could not read
    except (ValueError, KeyError, TypeError):
        raise AccountSpecError("'trust' must be a policy document with a Statement") from None
    try:
        role = backend.create_role(
            role_name=name,
            assume_role_policy_document=trust,
            path=path,
            permissions_boundary=None,
            description="",
            tags=[],
            max_session_duration="3600",
            linked_service=None,
        )
        if policy:
            backend.put_role_policy(name, ROLE_POLICY_NAME, policy)
    except IAMException as error:
        raise AccountSpecError(f"{error.code}: {error.message}") from None
    return {"arn": role.arn, "role_name": role.name, "account": account_id}


def caller_arn(account_id: str, access_key: str) -> str:
    """Who signed a call: an IAM user, an assumed role, else (moto's dummy credentials)
    the account's root."""
    key = iam_backends[account_id][PARTITION].access_keys.get(access_key)
    if key is not None and key.user_name:
        user = iam_backends[account_id][PARTITION].users.get(key.user_name)
        if user is not None:
            return str(user.arn)
    assumed = sts_backends[account_id][PARTITION].get_assumed_role_from_access_key(access_key)
    if assumed is not None:
        return str(assumed.arn)
    return f"arn:aws:iam::{account_id}:root"


def _listed(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else [str(v) for v in value or []]


def _principal_matches(principals: list[str], caller: str, caller_account: str) -> bool:
    names = {caller, caller_account, f"arn:aws:iam::{caller_account}:root", "*"}
    if ":assumed-role/" in caller:  # a session is trusted through its role's ARN
        role_name = caller.split("/")[1]
        names.add(f"arn:aws:iam::{caller_account}:role/{role_name}")
    return any(p in names for p in principals)


def _condition_holds(condition: dict[str, Any] | None, external_id: str | None) -> bool:
    if not condition:
        return True
    if set(condition) != {"StringEquals"} or set(condition["StringEquals"]) != {"sts:ExternalId"}:
        return False  # a condition this stand-in cannot judge allows nothing
    return external_id is not None and external_id in _listed(
        condition["StringEquals"]["sts:ExternalId"]
    )


def trusts(trust: str, caller: str, caller_account: str, external_id: str | None) -> bool:
    """Whether a trust policy lets ``caller`` assume the role (explicit deny wins)."""
    allowed = False
    statements = json.loads(trust)["Statement"]
    for statement in [statements] if isinstance(statements, dict) else statements:
        actions = _listed(statement.get("Action"))
        if not any(a in ("sts:AssumeRole", "sts:*", "*") for a in actions):
            continue
        principal = statement.get("Principal")
        principals = ["*"] if principal == "*" else _listed((principal or {}).get("AWS"))
        if not _principal_matches(principals, caller, caller_account):
            continue
        if not _condition_holds(statement.get("Condition"), external_id):
            continue
        if statement.get("Effect") == "Deny":
            return False
        if statement.get("Effect") == "Allow":
            allowed = True
    return allowed


def assume_role_refusal(
    caller_account: str, access_key: str, role_arn: str, external_id: str | None
) -> str | None:
    """AWS's AccessDenied message if the caller may not assume ``role_arn``, else None."""
    caller = caller_arn(caller_account, access_key)
    denied = f"User: {caller} is not authorized to perform: sts:AssumeRole on resource: {role_arn}"
    match = _ROLE_ARN_RE.fullmatch(role_arn or "")
    if match is None:
        return denied
    roles = iam_backends[match.group(1)][PARTITION].roles.values()
    role = next((r for r in roles if r.arn == role_arn), None)
    if role is None or not trusts(
        role.assume_role_policy_document, caller, caller_account, external_id
    ):
        return denied
    return None


def install() -> None:
    """Patch moto's STS AssumeRole to judge the role's trust policy first."""
    original_assume_role = TokenResponse.assume_role

    def assume_role(response: TokenResponse) -> Any:
        refusal = assume_role_refusal(
            response.current_account,
            response.get_access_key(),
            response._get_param("RoleArn"),
            response._get_param("ExternalId"),
        )
        if refusal is not None:
            body = query_error_body("AccessDenied", refusal, status=403, service="sts")
            return body.decode("utf-8"), {"status": 403, "Content-Type": "text/xml"}
        return original_assume_role(response)

    setattr(TokenResponse, "assume_role", assume_role)  # noqa: B010


__all__ = [
    "DEFAULT_ACCOUNT_ID",
    "AccountSpecError",
    "assume_role_refusal",
    "backend_of",
    "caller_arn",
    "create_role",
    "install",
    "trusts",
]
