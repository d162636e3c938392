"""Least privilege with several accounts, proven against the local IAM server with
authorization enforced: the desk's principal holds docs/iam-policy.json and
docs/desk-assume-role-policy.json, and nothing else; each member account's role holds
docs/member-account-role-policy.json and trusts the desk's principal with an external id
(docs/member-account-trust-policy.json). With exactly these every operation works in
every account; with one action taken out of one account's role, the tool fails, and
the error names the action and the account."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from desk_harness import write_config
from emulated_yubikey import EmulatedConnection, EmulatedYubiKey
from local_iam_server import LocalIamServer
from provisioner import doctor
from provisioner.adapters.yubikey import YubiKeyToken
from provisioner.cli import direct
from provisioner.config import load
from provisioner.core.errors import ProvisionerError, RoleNotAssumable
from provisioner.desk import Desk

pytestmark = [pytest.mark.iam_server]

DOCS = Path(__file__).resolve().parents[1] / "docs"
DESK_ACCOUNT = "123456789012"  # the dummy credentials' account: the desk's own
MEMBERS = {"prod": "111111111111", "dev": "222222222222"}
EXTERNAL_ID = "lp-ext-7"
SERIAL = 32_000_001


def document(name: str, replace: dict[str, str], without: str | None = None) -> dict[str, Any]:
    text = (DOCS / name).read_text()
    for old, new in replace.items():
        text = text.replace(old, new)
    doc: dict[str, Any] = json.loads(text)
    statements = []
    for statement in doc["Statement"]:
        actions = statement["Action"]
        kept = [a for a in ([actions] if isinstance(actions, str) else actions) if a != without]
        if kept:
            statements.append(statement | {"Action": kept})
    doc["Statement"] = statements
    return doc


def member_actions() -> list[str]:
    doc = document("member-account-role-policy.json", {})
    return [a for s in doc["Statement"] for a in s["Action"]]


def test_the_member_role_may_do_exactly_what_the_desk_may_do_in_its_own_account() -> None:
    own = document("iam-policy.json", {})
    assert sorted(member_actions()) == sorted(a for s in own["Statement"] for a in s["Action"])
    assume = document("desk-assume-role-policy.json", {})
    assert [a for s in assume["Statement"] for a in s["Action"]] == ["sts:AssumeRole"]
    trust = document("member-account-trust-policy.json", {})
    [statement] = trust["Statement"]
    assert statement["Action"] == ["sts:AssumeRole"]
    assert statement["Condition"] == {"StringEquals": {"sts:ExternalId": "EXTERNAL_ID"}}


class Fleet:
    """The desk's principal and two member accounts, the roles as the docs say, with
    ``without`` taken out of dev's role (or sts:AssumeRole out of the desk's policy)."""

    def __init__(
        self,
        server: LocalIamServer,
        workdir: Path,
        monkeypatch: pytest.MonkeyPatch,
        without: str | None = None,
    ) -> None:
        self.server = server
        own = document("iam-policy.json", {"ACCOUNT_ID": DESK_ACCOUNT})
        roles = [f"arn:aws:iam::{a}:role/provisioner-desk" for a in MEMBERS.values()]
        assume = document("desk-assume-role-policy.json", {}, without)
        for statement in assume["Statement"]:
            statement["Resource"] = roles
        desk_policy = own | {"Statement": own["Statement"] + assume["Statement"]}
        principal = server.create_principal("provisioner-desk", desk_policy)
        for name, account in MEMBERS.items():
            policy = document(
                "member-account-role-policy.json",
                {"MEMBER_ACCOUNT_ID": account},
                without if name == "dev" else None,
            )
            server.create_account_role(
                account,
                "provisioner-desk",
                trusted=[principal.arn],
                external_id=EXTERNAL_ID,
                policy=policy,
            )
            server.create_user("alice", account=account)
        accounts = "".join(
            f'\n[[accounts]]\nname = "{n}"\nrole_arn = "arn:aws:iam::{a}:role/provisioner-desk"\n'
            f'external_id = "{EXTERNAL_ID}"\n'
            for n, a in MEMBERS.items()
        )
        self.config = load(write_config(workdir, accounts))
        self.key = EmulatedYubiKey(serial=SERIAL)
        server.set_auth_enforced(True)
        for key, value in principal.credentials_env().items():
            monkeypatch.setenv(key, value)
        self.desk = Desk.from_config(self.config)

    @contextlib.contextmanager
    def token(self) -> Iterator[YubiKeyToken]:
        with YubiKeyToken(lambda: EmulatedConnection(self.key), "reader") as token:
            yield token

    @contextlib.contextmanager
    def find_token(self, serial: int) -> Iterator[YubiKeyToken | None]:
        with self.token() as token:
            yield token

    def run(self) -> list[str]:
        """Every operation in every account, in the order a token lives them; stops at
        the first refusal. Returns what was done."""
        done = []
        accounts = self.config.accounts
        with direct.desk_state(self.config, service_user=None) as state:
            with self.token() as token:
                direct.enroll_accounts(state, self.desk, token, "alice", accounts)
            done.append("enroll")
            with self.token() as token:
                direct.resync_accounts(state, self.desk, token, "alice", accounts)
            done.append("resync")
            direct.revoke_accounts(state, self.desk, "alice", SERIAL, self.find_token, accounts)
            done.append("revoke")
        for account in accounts:
            for finding in doctor.check_account(
                self.config, account, self.desk.directory(account), "alice"
            ):
                if finding.status is doctor.Status.FAIL:
                    raise AssertionError(f"doctor: {finding.line()}")
        done.append("doctor")
        return done


@pytest.fixture
def fleet(
    local_iam: LocalIamServer, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    yield lambda without=None: Fleet(local_iam, workdir, monkeypatch, without)
    local_iam.set_auth_enforced(False)


def test_with_exactly_these_policies_everything_works_in_every_account(fleet: Any) -> None:
    f = fleet()
    assert f.run() == ["enroll", "resync", "revoke", "doctor"]
    assert f.key.credentials() == []


@pytest.mark.parametrize("action", member_actions())
def test_each_action_taken_out_of_one_accounts_role_fails_naming_it_and_the_account(
    fleet: Any, action: str
) -> None:
    f = fleet(action)
    with pytest.raises((ProvisionerError, AssertionError)) as caught:
        f.run()
    text = (
        caught.value.one_line() if isinstance(caught.value, ProvisionerError) else str(caught.value)
    )
    assert action in text, text
    assert "dev" in text, text


def test_without_sts_assume_role_the_desk_is_refused_naming_the_account(fleet: Any) -> None:
    f = fleet("sts:AssumeRole")
    with pytest.raises(ProvisionerError) as caught:
        f.run()
    cause = getattr(caught.value, "cause", caught.value)
    assert isinstance(cause, RoleNotAssumable), caught.value.one_line()
    assert "account prod: cannot assume role" in caught.value.one_line()
    assert f.key.credentials() == []
