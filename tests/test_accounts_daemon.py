"""The daemon with three accounts, through the real PC/SC stack: a queued user enrolled in
all three with one plug; the daemon SIGKILLed during one account's step, then restarted:
settled in every account, the audit trail agreeing with IAM and the token."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import time
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any

import pytest
from yubikit.oath import OathSession

from desk_harness import Daemon, make_workdir, wait_for, write_config
from emulated_yubikey import EmulatedConnection, EmulatedYubiKey, PcscStack
from local_iam_server import LocalIamServer

pytestmark = [pytest.mark.pcsc, pytest.mark.iam_server, pytest.mark.slow]

ACCOUNTS = {"prod": "111111111111", "dev": "222222222222", "sandbox": "333333333333"}
EXTERNAL_ID = "desk-ext-42"
USER = "alice"
_serials = count(28_000_001)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = make_workdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Desk:
    def __init__(self, stack: PcscStack, iam: LocalIamServer, workdir: Path) -> None:
        self.iam = iam
        self.roles = {
            name: iam.create_account_role(account, "provisioner-desk", external_id=EXTERNAL_ID).arn
            for name, account in ACCOUNTS.items()
        }
        for account in ACCOUNTS.values():
            iam.create_user(USER, account=account)
        accounts = "".join(
            f'\n[[accounts]]\nname = "{n}"\nrole_arn = "{r}"\nexternal_id = "{EXTERNAL_ID}"\n'
            for n, r in self.roles.items()
        )
        config = write_config(
            workdir,
            extra="[token]\nreinsert_timeout = 1\n[iam]\nread_timeout = 1.0\nmax_attempts = 3\n"
            + accounts,
        )
        self.daemon = Daemon(stack, iam, iam.admin_client("iam"), workdir, config)
        self.stack = stack
        self.workdir = workdir

    def client(self, name: str, service: str) -> Any:
        return self.iam.role_client(self.roles[name], service, external_id=EXTERNAL_ID)

    def devices(self, name: str) -> list[str]:
        found = self.client(name, "iam").list_mfa_devices(UserName=USER)["MFADevices"]
        return [d["SerialNumber"] for d in found]

    def records(self) -> list[dict[str, Any]]:
        path = self.workdir / "state" / "provisioner.db"
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM enrollments ORDER BY id")]

    def assert_consistent(self, key: EmulatedYubiKey) -> bool:
        """All or nothing in every account, the token and the trail agreeing; whether the
        user ended up enrolled."""
        enrolled = {name: self.devices(name) for name in ACCOUNTS}
        assert all(enrolled.values()) or not any(enrolled.values()), enrolled
        for account in ACCOUNTS.values():
            assert self.iam.unassigned_devices(account=account) == [], account
        on_token = {c.id for c in key.credentials()}
        expected = {f"AWS {n}:{USER}@{a}" for n, a in ACCOUNTS.items()}
        mine = [r for r in self.records() if r["serial"] == key.serial]
        assert {r["account"] for r in mine} == set(ACCOUNTS)
        assert all(r["outcome"] != "in progress" for r in mine), mine
        trail = self.daemon.history()
        finals = {
            r["account"]: r["outcome"]
            for r in trail
            if r["event"] == "enrollment" and r["serial"] == key.serial
        }
        if all(enrolled.values()):
            assert on_token == expected
            assert set(finals.values()) == {"enrolled"}, finals
            now = self.iam.server_time()
            for name, account in ACCOUNTS.items():
                code = code_on_token(key, f"AWS {name}:{USER}@{account}", now)
                self.client(name, "sts").get_session_token(
                    SerialNumber=enrolled[name][0], TokenCode=code
                )
            return True
        assert not on_token & expected, "a stray credential is left on the token"
        assert "enrolled" not in finals.values(), finals
        return False


def code_on_token(key: EmulatedYubiKey, credential_id: str, timestamp: float) -> str:
    session = OathSession(EmulatedConnection(key))
    credential = next(c for c in session.list_credentials() if c.id.decode() == credential_id)
    return str(session.calculate_code(credential, int(timestamp)).value)


@pytest.fixture
def desk(pcsc_stack: PcscStack, local_iam: LocalIamServer, workdir: Path) -> Iterator[Desk]:
    d = Desk(pcsc_stack, local_iam, workdir)
    d.daemon.start()
    yield d
    local_iam.clear_faults()
    if d.daemon.proc is not None and d.daemon.proc.poll() is None:
        d.daemon.stop()
    pcsc_stack.remove(0, wait=True)


def test_a_queued_user_is_enrolled_in_three_accounts_with_one_plug(desk: Desk) -> None:
    key = EmulatedYubiKey(serial=next(_serials))
    queued = desk.daemon.cli("queue", "--user", USER)
    assert queued.returncode == 0, queued.stderr
    desk.stack.insert(key, 0)
    wait_for(
        lambda: len([r for r in desk.records() if r["outcome"] == "enrolled"]) == 3,
        what="enrolled in three accounts",
    )
    assert desk.assert_consistent(key)
    status = desk.daemon.ask({"op": "status"})
    assert status["recent"][0]["accounts"] == [
        {"account": n, "device_arn": desk.devices(n)[0]} for n in ACCOUNTS
    ]


def test_the_cli_follows_an_enrollment_in_every_account(desk: Desk) -> None:
    key = EmulatedYubiKey(serial=next(_serials))
    proc = desk.daemon.cli_background("enroll", "--user", USER, "--accounts", "prod,sandbox")
    assert proc.stdout is not None
    assert "is queued in prod, sandbox" in proc.stdout.readline()
    desk.stack.insert(key, 0)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"enrolled {USER} in prod, sandbox: token {key.serial}" in out
    assert desk.devices("dev") == []
    assert len(desk.devices("prod")) == len(desk.devices("sandbox")) == 1


KILL_POINTS = ["CreateVirtualMFADevice", "EnableMFADevice"]


@pytest.mark.parametrize("token_back", [True, False], ids=["token left in", "token taken out"])
@pytest.mark.parametrize("action", KILL_POINTS)
def test_sigkill_during_the_second_accounts_step_then_restart(
    desk: Desk, action: str, token_back: bool
) -> None:
    key = EmulatedYubiKey(serial=next(_serials))
    # dev's call stalls (the others go through); the daemon dies inside it
    desk.iam.inject_fault(action, kind="delay", delay=4.0, count=3, account=ACCOUNTS["dev"])
    assert desk.daemon.cli("queue", "--user", USER).returncode == 0
    desk.stack.insert(key, 0)
    wait_for(
        lambda: any(r["serial"] == key.serial for r in desk.records()), what="enrollment started"
    )
    time.sleep(1.5)  # inside dev's stalled call
    assert desk.daemon.proc is not None
    desk.daemon.proc.send_signal(signal.SIGKILL)
    desk.daemon.proc.wait(10)
    desk.iam.clear_faults()
    time.sleep(4.0)  # the stalled call finishes on the far side
    if not token_back:
        desk.stack.remove(0, wait=True)
    desk.daemon.start()  # recovery runs before tokens are served
    wait_for(lambda: all(r["outcome"] != "in progress" for r in desk.records()), what="recovered")
    if not token_back:
        desk.stack.insert(key, 0)  # its credentials are removed when it is seen
        wait_for(
            lambda: (
                not any(c.id.startswith("AWS ") for c in key.credentials())
                or all(desk.devices(n) for n in ACCOUNTS)
            ),
            what="the token cleaned",
        )
    enrolled = desk.assert_consistent(key)
    if action == "EnableMFADevice":
        assert enrolled  # the stalled enable took effect; the others were done
