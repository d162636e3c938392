"""`provisioner doctor` in each of the desk's [[accounts]], against the local IAM server
(several accounts, AssumeRole judged by each role's trust policy): the role assumed or
refused with the account named, that account's permissions asked of its simulator for
the role, and one account's failure leaving the others' findings as they are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from desk_harness import write_config
from local_iam_server import DEFAULT_ACCOUNT_ID, LocalIamServer
from provisioner import doctor
from provisioner.adapters.aws.permissions import MEMBER_PERMISSIONS, MEMBER_POLICY_FILE
from provisioner.config import AccountConfig, Config, load
from provisioner.core.errors import ProvisionerError
from provisioner.desk import Desk

pytestmark = [pytest.mark.iam_server]

ROOT = Path(__file__).resolve().parents[1]
MEMBERS = {"prod": "111111111111", "dev": "222222222222"}
EXTERNAL_ID = "doctor-ext-3"
Status = doctor.Status


def role_policy(account: str, without: str | None = None) -> dict[str, Any]:
    text = (ROOT / MEMBER_POLICY_FILE).read_text().replace("MEMBER_ACCOUNT_ID", account)
    document: dict[str, Any] = json.loads(text)
    statements = []
    for statement in document["Statement"]:
        actions = statement["Action"]
        kept = [a for a in ([actions] if isinstance(actions, str) else actions) if a != without]
        if kept:
            statements.append(statement | {"Action": kept})
    return document | {"Statement": statements}


def role_arn(name: str) -> str:
    return f"arn:aws:iam::{MEMBERS[name]}:role/provisioner-desk"


def configure(
    server: LocalIamServer,
    workdir: Path,
    *,
    without: dict[str, str] | None = None,
    external_ids: dict[str, str] | None = None,
    trusted: tuple[str, ...] = (DEFAULT_ACCOUNT_ID,),
) -> tuple[Config, Desk]:
    """Both member roles as docs/ says, trusting the dummy credentials' account; dev's
    role without ``without[dev]``; the desk configured with ``external_ids`` (default:
    the right one)."""
    for name, account in MEMBERS.items():
        server.create_account_role(
            account,
            "provisioner-desk",
            trusted=trusted,
            external_id=EXTERNAL_ID,
            policy=role_policy(account, (without or {}).get(name)),
        )
    accounts = "".join(
        f'\n[[accounts]]\nname = "{name}"\nrole_arn = "{role_arn(name)}"\n'
        f'external_id = "{(external_ids or {}).get(name, EXTERNAL_ID)}"\n'
        for name in MEMBERS
    )
    config = load(write_config(workdir, accounts))
    return config, Desk.from_config(config)


def findings_of(config: Config, desk: Desk, name: str) -> list[doctor.Finding]:
    [account] = [a for a in config.accounts if a.name == name]
    return list(doctor.check_account(config, account, desk.directory(account), "alice"))


def test_an_assumable_role_holding_the_policy_passes(
    local_iam: LocalIamServer, workdir: Path
) -> None:
    config, desk = configure(local_iam, workdir)
    assumed, permissions = findings_of(config, desk, "prod")
    assert (assumed.check, assumed.status) == ("account prod", Status.OK)
    assert "role assumed with its external id" in assumed.detail
    assert "assumed-role/provisioner-desk/" in assumed.detail
    assert f"(account {MEMBERS['prod']})" in assumed.detail
    assert (permissions.check, permissions.status) == ("account prod permissions", Status.OK)
    assert permissions.detail == (
        f"all {len(MEMBER_PERMISSIONS)} actions allowed for {role_arn('prod')}"
    )


def test_a_wrong_external_id_is_a_role_not_assumed_and_skips_the_permissions(
    local_iam: LocalIamServer, workdir: Path
) -> None:
    config, desk = configure(local_iam, workdir, external_ids={"dev": "not-the-one"})
    refused, permissions = findings_of(config, desk, "dev")
    assert (refused.check, refused.status) == ("account dev", Status.FAIL)
    assert "sts:AssumeRole" in refused.detail and role_arn("dev") in refused.detail
    assert "trust policy" in refused.fix and "docs/accounts.md" in refused.fix
    assert (permissions.check, permissions.status) == ("account dev permissions", Status.SKIP)
    # prod, configured right, is not touched by dev's refusal.
    assert [f.status for f in findings_of(config, desk, "prod")] == [Status.OK, Status.OK]


def test_a_role_that_does_not_exist_is_refused_naming_the_account(
    local_iam: LocalIamServer, workdir: Path
) -> None:
    config, desk = configure(local_iam, workdir)
    missing = AccountConfig(
        name="sandbox",
        role_arn="arn:aws:iam::333333333333:role/provisioner-desk",
        external_id=EXTERNAL_ID,
    )
    refused, _skipped = doctor.check_account(config, missing, desk.directory(missing), None)
    assert (refused.check, refused.status) == ("account sandbox", Status.FAIL)
    assert "sts:AssumeRole" in refused.detail


@pytest.mark.parametrize(
    "action",
    [p.action for p in MEMBER_PERMISSIONS if p.action != "iam:SimulatePrincipalPolicy"],
)
def test_an_action_missing_from_one_role_is_named_for_that_account(
    local_iam: LocalIamServer, workdir: Path, action: str
) -> None:
    config, desk = configure(local_iam, workdir, without={"dev": action})
    assumed, permissions = findings_of(config, desk, "dev")
    assert assumed.status is Status.OK
    assert (permissions.check, permissions.status) == ("account dev permissions", Status.FAIL)
    assert permissions.detail.endswith(f"may not: {action}"), permissions.detail
    assert MEMBER_POLICY_FILE in permissions.fix


def test_a_role_that_may_not_simulate_itself_is_told(
    local_iam: LocalIamServer, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Authorization enforced, so that the simulation itself is refused: the desk is then
    # a principal holding its sts:AssumeRole on the roles, and the roles trust it.
    assume = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "sts:AssumeRole",
                "Resource": [role_arn(name) for name in MEMBERS],
            }
        ],
    }
    principal = local_iam.create_principal("provisioner-desk", assume)
    for key, value in principal.credentials_env().items():
        monkeypatch.setenv(key, value)
    config, desk = configure(
        local_iam,
        workdir,
        without={"dev": "iam:SimulatePrincipalPolicy"},
        trusted=(principal.arn,),
    )
    local_iam.set_auth_enforced(True)
    try:
        _assumed, permissions = findings_of(config, desk, "dev")
    finally:
        local_iam.set_auth_enforced(False)
    assert permissions.status is Status.FAIL
    assert permissions.detail.startswith("cannot check them:")
    assert "iam:SimulatePrincipalPolicy" in permissions.fix


def test_the_doctor_checks_every_account_after_the_desks_own(
    local_iam: LocalIamServer, workdir: Path
) -> None:
    config, desk = configure(local_iam, workdir, external_ids={"prod": "wrong"})

    def no_pcscd() -> Any:
        raise ProvisionerError("cannot reach pcscd")

    def run(**directory: Any) -> list[doctor.Finding]:
        return doctor.run(
            config,
            iam=lambda: (desk.iam, desk.clock),
            open_pcsc=no_pcscd,
            list_usb=lambda: [],
            root=workdir,
            **directory,
        )

    findings = {f.check: f.status for f in run(directory=desk.directory)}
    names = list(findings)
    assert names.index("clock") < names.index("account prod")
    assert [(n, s) for n, s in findings.items() if n.startswith("account")] == [
        ("account prod", Status.FAIL),
        ("account prod permissions", Status.SKIP),
        ("account dev", Status.OK),
        ("account dev permissions", Status.OK),
    ]
    # Without a way to reach the accounts (a caller that passes none), each is skipped.
    skipped = [f for f in run() if f.check.startswith("account")]
    assert [(f.check, f.status) for f in skipped] == [
        ("account prod", Status.SKIP),
        ("account dev", Status.SKIP),
    ]
