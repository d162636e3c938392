"""The member accounts' policies in docs/ held to the table in permissions.py, without a
server: the role's permission policy grants exactly MEMBER_PERMISSIONS, each on the
resource the table names in that account; the desk's own addition grants only
sts:AssumeRole, on roles only; the trust policy names one principal and the external id.
(tests/test_least_privilege_accounts.py proves them against IAM.)"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

from provisioner.adapters.aws.permissions import (
    ASSUME_POLICY_FILE,
    ASSUME_ROLE_ACTIONS,
    MEMBER_PERMISSIONS,
    MEMBER_POLICY_FILE,
    checks,
)

ROOT = Path(__file__).resolve().parents[1]
ROLE = "arn:aws:iam::MEMBER_ACCOUNT_ID:role/provisioner-desk"


def statements(path: str) -> list[dict[str, Any]]:
    document: dict[str, Any] = json.loads((ROOT / path).read_text())
    assert document["Version"] == "2012-10-17"
    return list(document["Statement"])


def listed(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def test_the_member_role_policy_grants_exactly_the_member_table() -> None:
    granted = [a for s in statements(MEMBER_POLICY_FILE) for a in listed(s["Action"])]
    assert len(set(granted)) == len(granted)
    assert sorted(granted) == sorted(p.action for p in MEMBER_PERMISSIONS)
    assert all(s["Effect"] == "Allow" for s in statements(MEMBER_POLICY_FILE))


def test_the_member_role_policy_grants_each_action_on_the_resource_the_table_names() -> None:
    wanted = checks(
        account="MEMBER_ACCOUNT_ID",
        device_path="/provisioner/",
        user_arn="arn:aws:iam::MEMBER_ACCOUNT_ID:user/alice",
        principal_arn=ROLE,  # the doctor simulates the assumed role itself
        table=MEMBER_PERMISSIONS,
    )
    for action, resource in wanted:
        [grant] = [
            listed(s["Resource"])
            for s in statements(MEMBER_POLICY_FILE)
            if action in listed(s["Action"])
        ]
        assert any(fnmatch.fnmatchcase(resource, r) for r in grant), (action, resource, grant)
        # Scoped: only ListVirtualMFADevices (which takes no resource) gets "*", and
        # every resource is in the member account.
        assert ("*" in grant) == (action == "iam:ListVirtualMFADevices"), action
        assert all(r == "*" or r.startswith("arn:aws:iam::MEMBER_ACCOUNT_ID:") for r in grant)


def test_the_role_may_simulate_only_itself() -> None:
    [statement] = [
        s
        for s in statements(MEMBER_POLICY_FILE)
        if "iam:SimulatePrincipalPolicy" in listed(s["Action"])
    ]
    assert listed(statement["Action"]) == ["iam:SimulatePrincipalPolicy"]
    assert listed(statement["Resource"]) == [ROLE]


def test_the_desks_own_addition_is_only_sts_assume_role_on_the_member_roles() -> None:
    [statement] = statements(ASSUME_POLICY_FILE)
    assert statement["Effect"] == "Allow"
    assert listed(statement["Action"]) == list(ASSUME_ROLE_ACTIONS) == ["sts:AssumeRole"]
    resources = listed(statement["Resource"])
    assert resources
    assert all(fnmatch.fnmatchcase(r, "arn:aws:iam::*:role/*") for r in resources), resources
    assert not any("*" in r for r in resources), "name each member role, no wildcard"
    assert "Condition" not in statement and "NotResource" not in statement


def test_the_trust_policy_trusts_the_desk_with_its_external_id_only() -> None:
    [statement] = statements("docs/member-account-trust-policy.json")
    assert statement["Effect"] == "Allow"
    assert listed(statement["Action"]) == ["sts:AssumeRole"]
    principals = listed(statement["Principal"]["AWS"])
    assert principals and all(p.startswith("arn:aws:iam::DESK_ACCOUNT_ID:") for p in principals)
    assert statement["Condition"] == {"StringEquals": {"sts:ExternalId": "EXTERNAL_ID"}}


def test_docs_accounts_md_names_every_file_and_placeholder() -> None:
    text = (ROOT / "docs" / "accounts.md").read_text()
    for name in (
        MEMBER_POLICY_FILE,
        ASSUME_POLICY_FILE,
        "docs/member-account-trust-policy.json",
        "MEMBER_ACCOUNT_ID",
        "DESK_ACCOUNT_ID",
        "EXTERNAL_ID",
    ):
        assert Path(name).name in text, name
