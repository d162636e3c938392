"""One plug, three AWS accounts, against the strict local IAM server: the desk assumes a
role in each account (sts:AssumeRole with its external id), creates and enables a device
in each, all or nothing. The real boto3 and STS sessions, the real SQLite store; the token
is the emulated YubiKey in this process (the daemon's path over pcscd is in
test_accounts_daemon.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from desk_harness import write_config
from emulated_yubikey import EmulatedConnection, EmulatedYubiKey
from local_iam_server import LocalIamServer
from provisioner.adapters.yubikey import YubiKeyToken
from provisioner.cli import direct
from provisioner.config import load
from provisioner.core.errors import (
    AccountsIncomplete,
    EnrollmentFailed,
    RoleNotAssumable,
    UserNotFound,
)
from provisioner.core.messages import Outcome
from provisioner.desk import Desk

pytestmark = [pytest.mark.iam_server]

SERIAL = 27_000_001
ACCOUNTS = {"prod": "111111111111", "dev": "222222222222", "sandbox": "333333333333"}
EXTERNAL_ID = "desk-ext-42"


def accounts_toml(roles: dict[str, str], external_ids: dict[str, str] | None = None) -> str:
    ids = external_ids or {}
    return "".join(
        f'\n[[accounts]]\nname = "{name}"\nrole_arn = "{role}"\n'
        f'external_id = "{ids.get(name, EXTERNAL_ID)}"\n'
        for name, role in roles.items()
    )


class Accounts:
    def __init__(
        self, iam: LocalIamServer, workdir: Path, *, users: tuple[str, ...] = ("alice",)
    ) -> None:
        self.iam = iam
        self.roles: dict[str, str] = {}
        for name, account in ACCOUNTS.items():
            role = iam.create_account_role(account, "provisioner-desk", external_id=EXTERNAL_ID)
            self.roles[name] = role.arn
            for user in users:
                iam.create_user(user, account=account)
        self.workdir = workdir
        self.key = EmulatedYubiKey(serial=SERIAL)
        self.configure()

    def configure(self, external_ids: dict[str, str] | None = None) -> None:
        path = write_config(self.workdir, accounts_toml(self.roles, external_ids))
        self.config = load(path)

    @contextlib.contextmanager
    def token(self) -> Iterator[YubiKeyToken]:
        with YubiKeyToken(lambda: EmulatedConnection(self.key), "reader 0") as token:
            yield token

    def enroll(self, user: str = "alice", names: str | None = None) -> Any:
        desk = Desk.from_config(self.config)
        with direct.desk_state(self.config, service_user=None) as state, self.token() as token:
            return direct.enroll_accounts(
                state, desk, token, user, self.config.select_accounts(names)
            )

    def client(self, name: str, service: str) -> Any:
        """A client of ``service`` in account ``name``, through its role."""
        return self.iam.role_client(self.roles[name], service, external_id=EXTERNAL_ID)

    def devices(self, name: str, user: str = "alice") -> list[str]:
        return [
            d["SerialNumber"]
            for d in self.client(name, "iam").list_mfa_devices(UserName=user)["MFADevices"]
        ]

    def unassigned(self, name: str) -> list[str]:
        return self.iam.unassigned_devices(account=ACCOUNTS[name])

    def log_in(self, name: str, device: str, credential_id: str) -> None:
        """A fresh code from the token's credential logs in to that account."""
        now = int(self.iam.server_time())
        with self.token() as token:
            code = token.calculate(credential_id, now)
        self.client(name, "sts").get_session_token(SerialNumber=device, TokenCode=code)


@pytest.fixture
def accounts(local_iam: LocalIamServer, workdir: Path) -> Accounts:
    return Accounts(local_iam, workdir)


def test_one_plug_enrolls_alice_in_three_accounts_and_each_code_logs_in(
    accounts: Accounts,
) -> None:
    result = accounts.enroll()
    assert [name for name, _ in result.enrolled] == list(ACCOUNTS)
    for name, enrolled in result.enrolled:
        assert enrolled.device_arn.startswith(f"arn:aws:iam::{ACCOUNTS[name]}:mfa/provisioner/")
        assert accounts.devices(name) == [enrolled.device_arn]
        assert enrolled.credential_id == f"AWS {name}:alice@{ACCOUNTS[name]}"
        accounts.log_in(name, enrolled.device_arn, enrolled.credential_id)
    # and the desk's own account was not touched
    assert accounts.iam.admin_client().list_mfa_devices(UserName="alice")["MFADevices"] == []


def test_a_user_missing_in_one_account_is_refused_before_anything_is_created(
    local_iam: LocalIamServer, workdir: Path
) -> None:
    accounts = Accounts(local_iam, workdir, users=())
    for name in ("prod", "dev"):
        local_iam.create_user("alice", account=ACCOUNTS[name])
    with pytest.raises(EnrollmentFailed) as caught:
        accounts.enroll()
    assert isinstance(caught.value.cause, UserNotFound)
    assert caught.value.account == "sandbox" and caught.value.step == "check"
    assert "in account sandbox" in caught.value.one_line()
    assert local_iam.call_counts().get("CreateVirtualMFADevice", 0) == 0
    assert accounts.key.credentials() == []


def test_a_role_that_cannot_be_assumed_is_refused_naming_the_account(
    accounts: Accounts,
) -> None:
    accounts.configure(external_ids={"dev": "the-wrong-one"})
    with pytest.raises(EnrollmentFailed) as caught:
        accounts.enroll()
    assert isinstance(caught.value.cause, RoleNotAssumable)
    assert caught.value.account == "dev"
    assert "cannot assume role arn:aws:iam::222222222222:role/provisioner-desk" in (
        caught.value.one_line()
    )
    assert local_iam_calls(accounts, "CreateVirtualMFADevice") == 0
    assert accounts.key.credentials() == []


def local_iam_calls(accounts: Accounts, action: str) -> int:
    return accounts.iam.call_counts().get(action, 0)


@pytest.mark.parametrize("failing", list(ACCOUNTS))
def test_codes_refused_in_one_account_roll_back_all_three(accounts: Accounts, failing: str) -> None:
    # the stand-in refuses the EnableMFADevice sent to that account's role session
    accounts.iam.inject_fault(
        "EnableMFADevice", code="InvalidAuthenticationCode", account=ACCOUNTS[failing]
    )
    with pytest.raises(EnrollmentFailed) as caught:
        accounts.enroll()
    assert caught.value.account == failing
    assert "nothing left behind" in caught.value.one_line()
    for name in ACCOUNTS:
        assert accounts.devices(name) == [], name
        assert accounts.unassigned(name) == [], name
    assert accounts.key.credentials() == []
    with direct.desk_state(accounts.config, service_user=None) as state:
        trail = state.store.history(user="alice")
    outcomes = {r.account: r.outcome for r in trail if r.event == "enrollment"}
    assert outcomes == {name: Outcome.FAILED for name in ACCOUNTS}


def test_only_the_accounts_asked_for_and_then_one_more(accounts: Accounts) -> None:
    first = accounts.enroll(names="prod,dev")
    assert [n for n, _ in first.enrolled] == ["prod", "dev"]
    assert accounts.devices("sandbox") == []
    # adding the third later leaves the first two as they are
    more = accounts.enroll()
    assert more.already == ("prod", "dev")
    assert [n for n, _ in more.enrolled] == ["sandbox"]
    assert len(accounts.key.credentials()) == 3


# --- revoke, resync, replace in every account -------------------------------------------


def find_token(accounts: Accounts) -> Any:
    @contextlib.contextmanager
    def find(serial: int) -> Iterator[YubiKeyToken | None]:
        if serial != accounts.key.serial:
            yield None
            return
        with accounts.token() as token:
            yield token

    return find


def test_revoke_acts_in_every_account_and_clears_the_token(accounts: Accounts) -> None:
    accounts.enroll()
    desk = Desk.from_config(accounts.config)
    with direct.desk_state(accounts.config, service_user=None) as state:
        done = direct.revoke_accounts(
            state, desk, "alice", SERIAL, find_token(accounts), accounts.config.accounts
        )
        trail = state.store.history(user="alice")
        dev_only = state.store.history(account="dev")
    assert [name for name, _ in done] == list(ACCOUNTS)
    assert [(r.event, r.account) for r in dev_only] == [("enrollment", "dev"), ("revoked", "dev")]
    for name in ACCOUNTS:
        assert accounts.devices(name) == []
        assert accounts.unassigned(name) == []
    assert accounts.key.credentials() == []
    assert sorted(r.account for r in trail if r.event == "revoked") == sorted(ACCOUNTS), [
        (r.event, r.user, r.account) for r in trail
    ]


def test_a_revoke_refused_in_one_account_still_revokes_the_others(accounts: Accounts) -> None:
    accounts.enroll()
    accounts.iam.inject_fault("DeactivateMFADevice", code="AccessDenied", account=ACCOUNTS["dev"])
    desk = Desk.from_config(accounts.config)
    with direct.desk_state(accounts.config, service_user=None) as state:
        with pytest.raises(AccountsIncomplete) as caught:
            direct.revoke_accounts(
                state, desk, "alice", SERIAL, find_token(accounts), accounts.config.accounts
            )
    assert caught.value.account == "dev" and caught.value.done == ("prod", "sandbox")
    assert "revoke failed in account dev" in caught.value.one_line()
    assert accounts.devices("prod") == [] and accounts.devices("sandbox") == []
    assert len(accounts.devices("dev")) == 1


def test_resync_in_every_account(accounts: Accounts) -> None:
    accounts.enroll()
    desk = Desk.from_config(accounts.config)
    with direct.desk_state(accounts.config, service_user=None) as state, accounts.token() as token:
        done = direct.resync_accounts(state, desk, token, "alice", accounts.config.accounts)
    assert [name for name, _, _ in done] == list(ACCOUNTS)
    assert accounts.iam.call_counts()["ResyncMFADevice"] == 3


def test_replace_enrolls_the_new_token_everywhere_then_revokes_the_old(
    accounts: Accounts,
) -> None:
    accounts.enroll()
    old = accounts.key
    accounts.key = EmulatedYubiKey(serial=SERIAL + 1)
    desk = Desk.from_config(accounts.config)
    with direct.desk_state(accounts.config, service_user=None) as state, accounts.token() as token:
        enrolled, revoked = direct.replace_accounts(
            state,
            desk,
            token,
            "alice",
            None,
            lambda serial: contextlib.nullcontext(None),
            accounts.config.accounts,
        )
    assert [n for n, _ in enrolled.enrolled] == list(ACCOUNTS)
    assert {one.token_serial for _, one in revoked} == {SERIAL}
    for name, one in enrolled.enrolled:
        assert accounts.devices(name) == [one.device_arn]
        assert one.device_arn.endswith(f".{SERIAL + 1}")
    assert len(old.credentials()) == 3  # the old token was not plugged in: said, not touched


def test_a_lost_token_is_revoked_everywhere_and_marked_lost(
    accounts: Accounts, capsys: pytest.CaptureFixture[str]
) -> None:
    from provisioner.core.store import InventoryState

    accounts.enroll()
    desk = Desk.from_config(accounts.config)
    with direct.desk_state(accounts.config, service_user=None) as state:
        done = direct.lost(state, desk, SERIAL)
        [record] = state.store.inventory(serial=SERIAL)
        cleanups = state.store.token_cleanups(SERIAL)
    assert sorted(name for name, _ in done) == sorted(ACCOUNTS)
    for name in ACCOUNTS:
        assert accounts.devices(name) == []
    assert record.state is InventoryState.LOST
    assert record.users == "alice" and record.accounts == "prod;dev;sandbox"
    assert len(cleanups) == 3  # wiped if it is ever seen again
