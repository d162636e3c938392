"""What the desk's AWS principal may do in IAM, and why: nothing more, nothing less.

One row per IAM action the tool calls, with what it is for and the resource AWS judges
it on. ``docs/iam-policy.json`` grants exactly these (a test holds the two equal), and
tests/test_least_privilege.py runs every operation against the local IAM server with
authorization enforced, with the policy and with each action taken out of it.

``provisioner doctor`` asks IAM's policy simulator about the rows (``checks``) and
reports the ones not allowed (``missing``, ``require_all``). No boto3 here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum, unique
from typing import NamedTuple

from provisioner.core.errors import AccessDenied

POLICY_FILE = "docs/iam-policy.json"
#: The role the desk assumes in each of its [[accounts]]: the same actions, in that account.
MEMBER_POLICY_FILE = "docs/member-account-role-policy.json"
#: What the desk's own principal needs on top of POLICY_FILE to serve [[accounts]].
ASSUME_POLICY_FILE = "docs/desk-assume-role-policy.json"


@unique
class Decision(StrEnum):
    """The policy simulator's verdict on one action and resource."""

    ALLOWED = "allowed"
    IMPLICIT_DENY = "implicitDeny"  # no statement allows it
    EXPLICIT_DENY = "explicitDeny"  # a statement denies it


@dataclass(frozen=True)
class Permission:
    """One IAM action the tool needs.

    ``resource`` is a template: ``{account}``, ``{device_path}`` (iam.device_path),
    ``{user_arn}`` (a user being enrolled) and ``{principal_arn}`` (the desk's own).
    """

    action: str
    purpose: str
    resource: str

    def resource_for(
        self, *, account: str, device_path: str, user_arn: str, principal_arn: str
    ) -> str:
        return self.resource.format(
            account=account,
            device_path=device_path,
            user_arn=user_arn,
            principal_arn=principal_arn,
        )


_DEVICES = "arn:aws:iam::{account}:mfa{device_path}*"

PERMISSIONS: tuple[Permission, ...] = (
    Permission(
        "iam:GetUser",
        "check the user exists and learn the account (enroll, revoke, resync)",
        "{user_arn}",
    ),
    Permission(
        "iam:ListMFADevices",
        "count the user's MFA devices before enrolling, look for the new one when the "
        "answer to enabling it was lost, and find the device to revoke or resync",
        "{user_arn}",
    ),
    Permission(
        "iam:CreateVirtualMFADevice",
        "create the virtual MFA device whose seed is written into the token",
        _DEVICES,
    ),
    Permission(
        "iam:TagMFADevice",
        "tag the new device with tool, desk, user and token serial (AWS requires it for "
        "tags given at creation; revoke, resync and reconcile find devices by them)",
        _DEVICES,
    ),
    Permission(
        "iam:EnableMFADevice",
        "enable the device for the user with two codes computed on the token "
        "(enroll, and reconcile finishing an interrupted enrollment)",
        "{user_arn}",
    ),
    Permission(
        "iam:ResyncMFADevice",
        "resync a user's token with two fresh codes from it",
        "{user_arn}",
    ),
    Permission(
        "iam:DeactivateMFADevice",
        "revoke a user's token, or undo a failed enrollment that may have been enabled",
        "{user_arn}",
    ),
    Permission(
        "iam:DeleteVirtualMFADevice",
        "delete a revoked device, undo a failed enrollment, and remove orphaned devices",
        _DEVICES,
    ),
    Permission(
        "iam:ListVirtualMFADevices",
        "find the devices this tool enrolled (by their tags) and unassigned orphans",
        "*",  # the action takes no resource
    ),
    Permission(
        "iam:SimulatePrincipalPolicy",
        "let provisioner doctor check these permissions of the desk's own principal",
        "{principal_arn}",
    ),
)


#: What the role the desk assumes in each member account needs there (MEMBER_POLICY_FILE):
#: the same actions on the same resources as the desk's own, in that account; the
#: doctor's ``{principal_arn}`` is then the role itself.
MEMBER_PERMISSIONS: tuple[Permission, ...] = PERMISSIONS

#: The only actions the desk's own principal needs on top of POLICY_FILE to serve
#: [[accounts]] (ASSUME_POLICY_FILE), each on the member accounts' roles only.
ASSUME_ROLE_ACTIONS: tuple[str, ...] = ("sts:AssumeRole",)


class Check(NamedTuple):
    """An action to simulate on a resource."""

    action: str
    resource: str


@dataclass(frozen=True)
class Evaluation:
    """The simulator's decision for one check."""

    action: str
    resource: str
    decision: Decision

    @property
    def allowed(self) -> bool:
        return self.decision is Decision.ALLOWED


@dataclass(frozen=True)
class CallerIdentity:
    """Who the desk's credentials are (STS GetCallerIdentity)."""

    account: str
    arn: str
    user_id: str

    @property
    def principal_arn(self) -> str:
        """The user or role whose policies apply (what the simulator takes)."""
        return policy_source_arn(self.arn)


def checks(
    *,
    account: str,
    device_path: str,
    user_arn: str,
    principal_arn: str,
    table: tuple[Permission, ...] = PERMISSIONS,
) -> tuple[Check, ...]:
    """Every permission of ``table`` on the resources of this desk (in ``account``)."""
    return tuple(
        Check(
            p.action,
            p.resource_for(
                account=account,
                device_path=device_path,
                user_arn=user_arn,
                principal_arn=principal_arn,
            ),
        )
        for p in table
    )


def policy_source_arn(caller_arn: str) -> str:
    """The ARN the simulator takes for a caller: an assumed role's session ARN
    (``arn:aws:sts::ACCOUNT:assumed-role/NAME/SESSION``, e.g. an instance role) becomes
    the role's (``arn:aws:iam::ACCOUNT:role/NAME``; a role path is not in the session
    ARN). A user's ARN is already one."""
    prefix, _, rest = caller_arn.partition(":assumed-role/")
    if not rest or not prefix.startswith("arn:") or ":sts::" not in prefix:
        return caller_arn
    partition_and_account = prefix.replace(":sts:", ":iam:", 1)
    return f"{partition_and_account}:role/{rest.split('/', 1)[0]}"


def missing(evaluations: Iterable[Evaluation]) -> tuple[Evaluation, ...]:
    """The checks the simulator did not allow, in table order."""
    return tuple(e for e in evaluations if not e.allowed)


def require_all(evaluations: Iterable[Evaluation]) -> None:
    """AccessDenied naming every permission the simulator did not allow."""
    lacking = missing(evaluations)
    if not lacking:
        return
    named = "; ".join(f"{e.action} on {e.resource} ({e.decision.value})" for e in lacking)
    raise AccessDenied(
        f"the desk's AWS principal lacks {len(lacking)} of the permissions it needs: {named}",
        permission=lacking[0].action,
        hint=f"grant what {POLICY_FILE} grants (replace ACCOUNT_ID)",
    )
