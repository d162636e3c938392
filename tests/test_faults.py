"""Fault injection against the real daemon on the emulated stack.

Every case ends with the same invariants checked (`assert_consistent`): no unassigned
virtual device of ours left; the user has either a working device whose credential is on
the token (proved by logging in with a code computed on the token) or no new device and
no credential; the journal, the audit trail and IAM agree; the operator saw an outcome.
"""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from yubikit.oath import OathSession

from desk_harness import (
    ACCOUNT,
    Daemon,
    arn,
    assert_no_seed,
    make_workdir,
    wait_for,
    write_config,
)
from emulated_yubikey import EmulatedConnection, EmulatedYubiKey, PcscStack
from local_iam_server import LocalIamServer

pytestmark = [pytest.mark.pcsc, pytest.mark.iam_server, pytest.mark.slow]

USER = "alice"
FIRST_SERIAL = 50_000_000
_serials = iter(range(FIRST_SERIAL, FIRST_SERIAL + 10_000))


def new_key() -> EmulatedYubiKey:
    return EmulatedYubiKey(serial=next(_serials))


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = make_workdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(pcsc_stack: PcscStack, iam_server: LocalIamServer, workdir: Path) -> Iterator[Daemon]:
    config = write_config(
        workdir,
        extra="[token]\nreinsert_timeout = 1\n[iam]\nread_timeout = 1.0\nmax_attempts = 3\n",
    )
    admin = iam_server.admin_client("iam")
    d = Daemon(pcsc_stack, iam_server, admin, workdir, config)
    d.start()
    yield d
    if d.proc is not None and d.proc.poll() is None:
        d.stop()


@pytest.fixture
def desk(daemon: Daemon, local_iam: LocalIamServer) -> Iterator[Daemon]:
    if daemon.proc is None or daemon.proc.poll() is not None:
        daemon.start()  # a kill case before this one
    yield daemon
    local_iam.clear_faults()
    for slot in (0, 1):
        daemon.stack.remove(slot, wait=True)


def enroll(d: Daemon, key: EmulatedYubiKey, user: str = USER) -> tuple[int, str, str]:
    proc = d.cli_background("enroll", "--user", user)
    assert proc.stdout is not None
    assert "is queued" in proc.stdout.readline()
    d.stack.insert(key, 0)
    out, err = proc.communicate(timeout=90)
    d.iam.clear_faults()  # what the enrollment did not use must not hit the checks
    return proc.returncode, out, err


def records(d: Daemon) -> list[dict[str, Any]]:
    with sqlite3.connect(f"file:{d.workdir / 'state' / 'provisioner.db'}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM enrollments ORDER BY id")]


def code_on_token(key: EmulatedYubiKey, credential_id: str, timestamp: float) -> str:
    session = OathSession(EmulatedConnection(key))
    credential = next(c for c in session.list_credentials() if c.id.decode() == credential_id)
    return str(session.calculate_code(credential, int(timestamp)).value)


def assert_consistent(
    d: Daemon, key: EmulatedYubiKey, user: str = USER, *, output: tuple[str, ...] = ()
) -> bool:
    """The invariants. Returns whether the user ended up enrolled."""
    unassigned = d.admin.list_virtual_mfa_devices(AssignmentStatus="Unassigned")
    assert [v["SerialNumber"] for v in unassigned["VirtualMFADevices"]] == []
    credential = f"AWS:{user}@{ACCOUNT}"
    devices = d.devices_of(user)
    on_token = [c.id for c in key.credentials()]
    enrolled = bool(devices)
    if enrolled:
        assert devices == [arn(user, key.serial)]  # type: ignore[arg-type]
        assert credential in on_token
        # the device works: a fresh code computed on the token logs in
        sts = d.iam.admin_client("sts")
        code = code_on_token(key, credential, d.iam.server_time())
        sts.get_session_token(SerialNumber=devices[0], TokenCode=code)
    else:
        assert credential not in on_token, "a stray credential is left on the token"
    mine = [r for r in records(d) if r["serial"] == key.serial]
    assert mine, "no enrollment record"
    assert all(r["outcome"] != "in progress" for r in mine), mine
    assert (mine[-1]["outcome"] == "enrolled") == enrolled, mine[-1]
    history = d.history()
    audited = [r for r in history if r["event"] == "enrollment" and r["serial"] == key.serial]
    assert audited and audited[-1]["outcome"] == mine[-1]["outcome"]
    # and no seed anywhere: the daemon's log, what the operator saw, the audit trail,
    # every file of the state directory (the database, its WAL)
    secrets = key.secrets_for_leak_checks()
    if secrets:  # (a key pulled before the PUT never held one)
        assert_no_seed(
            secrets,
            [*d.log, *output, json.dumps(history), json.dumps(mine)],
            sorted((d.workdir / "state").iterdir()),
        )
    return enrolled


# --- IAM faults ------------------------------------------------------------------------

TRANSIENT = [
    ("CreateVirtualMFADevice", {"code": "Throttling", "count": 2}),
    ("CreateVirtualMFADevice", {"code": "ServiceFailure", "count": 2}),
    ("CreateVirtualMFADevice", {"kind": "delay", "delay": 1.5}),
    ("CreateVirtualMFADevice", {"kind": "drop"}),
    ("GetUser", {"kind": "drop"}),
    ("ListMFADevices", {"code": "ServiceFailure", "count": 2}),
    ("EnableMFADevice", {"code": "EntityTemporarilyUnmodifiable", "count": 2}),
    ("EnableMFADevice", {"code": "ConcurrentModification"}),
    ("EnableMFADevice", {"code": "Throttling", "count": 2}),
    ("EnableMFADevice", {"kind": "delay", "delay": 1.5}),
    ("EnableMFADevice", {"kind": "drop"}),
    # a garbage answer is ambiguous: the desk looks, sees it not enabled, tries again
    ("EnableMFADevice", {"kind": "garbage"}),
]
PERMANENT = [
    ("GetUser", {"code": "Throttling", "count": 10}, 4),
    ("ListMFADevices", {"code": "ServiceFailure", "count": 10}, 4),
    ("CreateVirtualMFADevice", {"code": "AccessDenied"}, 1),
    ("CreateVirtualMFADevice", {"kind": "garbage"}, 1),
    ("EnableMFADevice", {"code": "InvalidAuthenticationCode"}, 1),
    ("EnableMFADevice", {"code": "LimitExceeded"}, 1),
    ("EnableMFADevice", {"code": "NoSuchEntity"}, 1),
    ("EnableMFADevice", {"code": "ServiceFailure", "count": 10}, 1),
]


def _id(case: tuple[Any, ...]) -> str:
    action, spec = case[0], case[1]
    return f"{action}-{spec.get('code') or spec.get('kind')}"


@pytest.mark.parametrize("case", TRANSIENT, ids=_id)
def test_transient_iam_faults_end_in_success(
    desk: Daemon, case: tuple[str, dict[str, Any]]
) -> None:
    action, spec = case
    desk.iam.inject_fault(action, **spec)
    key = new_key()
    code, out, err = enroll(desk, key)
    assert code == 0, out + err
    assert f"enrolled {USER}" in out
    time.sleep(spec.get("delay", 0))  # a delayed first try lands late: let it, then look
    assert assert_consistent(desk, key, output=(out, err))


@pytest.mark.parametrize("case", PERMANENT, ids=_id)
def test_permanent_iam_faults_fail_cleanly(
    desk: Daemon, case: tuple[str, dict[str, Any], int]
) -> None:
    action, spec, status = case
    desk.iam.inject_fault(action, **spec)
    key = new_key()
    code, out, err = enroll(desk, key)
    assert code == status, out + err
    assert "nothing left behind" in err
    assert not assert_consistent(desk, key, output=(out, err))


def test_a_failed_rollback_is_named_then_reconcile_settles_it(desk: Daemon) -> None:
    desk.iam.inject_fault("EnableMFADevice", code="InvalidAuthenticationCode")
    desk.iam.inject_fault("DeleteVirtualMFADevice", code="ServiceFailure", count=10)
    key = new_key()
    code, _out, err = enroll(desk, key)
    assert code == 5, err
    assert "NOT fully rolled back" in err
    desk.iam.clear_faults()
    run = desk.cli("reconcile")
    assert run.returncode == 0, run.stderr
    assert "deleted orphaned device" in run.stdout
    assert not assert_consistent(desk, key)


# --- the token pulled at each command ----------------------------------------------------

# mgmt SELECT, READ_CONFIG, OATH SELECT, LIST, PUT, CALCULATE, CALCULATE
FLOW_COMMANDS = 7


@pytest.mark.parametrize("k", range(1, FLOW_COMMANDS + 1))
def test_token_pulled_at_each_command(desk: Daemon, k: int) -> None:
    key = new_key()
    key.schedule_pull(k)
    proc = desk.cli_background("enroll", "--user", USER)
    assert proc.stdout is not None
    proc.stdout.readline()
    desk.stack.insert(key, 0)
    if k <= 2:
        # pulled while being identified: the request is still waiting; plug it in again
        wait_for(lambda: not desk.stack.card_present(0), what="the card gone")
        desk.stack.remove(0, wait=True)
        time.sleep(1.5)
        desk.stack.insert(key, 0)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, out + err
        assert assert_consistent(desk, key)
        return
    out, err = proc.communicate(timeout=60)
    assert proc.returncode in (1, 3, 5), out + err  # 3: pulled during the check
    assert "removed" in err
    # the operator plugs it in again later: a credential left behind is removed then
    desk.stack.remove(0, wait=True)
    desk.stack.insert(key, 0)
    wait_for(
        lambda: any(t["state"] == "idle" for t in desk.ask({"op": "status"})["tokens"]),
        what="the token seen again",
    )
    assert not assert_consistent(desk, key)


# --- the daemon killed between every two steps --------------------------------------------


def _stall_iam(action: str) -> Any:
    # Three stalls, not one: a call the daemon makes in the background (the cleanup of the
    # last test's token) may take the first, and the step under test must still stall.
    # What is left is cleared once the daemon is dead.
    return lambda d, key: d.iam.inject_fault(action, kind="delay", delay=4.0, count=3)


def _stall_token(k: int) -> Any:
    return lambda d, key: key.schedule_stall(k, 4.0)


KILL_POINTS = [
    ("at check", _stall_iam("ListMFADevices")),
    ("at create", _stall_iam("CreateVirtualMFADevice")),
    ("at put", _stall_token(5)),
    ("at first calculate", _stall_token(6)),
    ("at enable", _stall_iam("EnableMFADevice")),
]


@pytest.mark.parametrize("token_back", [True, False], ids=["token left in", "token taken out"])
@pytest.mark.parametrize("point", KILL_POINTS, ids=[p[0] for p in KILL_POINTS])
def test_sigkill_between_steps_then_restart(
    desk: Daemon, point: tuple[str, Any], token_back: bool
) -> None:
    _, arm = point
    key = new_key()
    arm(desk, key)
    proc = desk.cli_background("enroll", "--user", USER)
    assert proc.stdout is not None
    proc.stdout.readline()
    desk.stack.insert(key, 0)
    wait_for(
        lambda: any(r["serial"] == key.serial for r in records(desk)), what="enrollment started"
    )
    time.sleep(1.0)  # inside the stalled step
    assert desk.proc is not None
    desk.proc.send_signal(signal.SIGKILL)
    desk.proc.wait(10)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "lost the desk daemon" in err  # the operator is told, and where to look
    desk.iam.clear_faults()  # the stalls the dead daemon did not use must not slow recovery
    time.sleep(4.0)  # let the stalled call finish on the far side
    if not token_back:
        desk.stack.remove(0, wait=True)
    desk.start()  # recovery runs before tokens are served
    wait_for(lambda: all(r["outcome"] != "in progress" for r in records(desk)), what="recovered")
    if not token_back:
        desk.stack.insert(key, 0)
        wait_for(
            lambda: any(t["state"] == "idle" for t in desk.ask({"op": "status"})["tokens"]),
            what="the token seen again",
        )
    enrolled = assert_consistent(desk, key)
    if token_back and point[0] in ("at first calculate", "at enable"):
        assert enrolled  # the credential on the token finished the enrollment
