"""Soak: many enrollments in a row through the real daemon, with random faults mixed in.

    .venv/bin/python bench/soak.py --enrollments 500 --seed 7

A batch desk: a roster of N tokens to N users; tokens are plugged in one after another,
alternating between vpcd's two readers. About a third of them meet a fault: IAM
throttling, a 500, a dropped connection or an answer later than the read timeout (all of
which must end in success), codes refused (which must end rolled back), or the token
pulled at its first CALCULATE and plugged in again later (rolled back; its credential
removed when it is plugged in again, after which the roster enrolls it). At the end every token is accounted for against IAM, the
tokens and the audit trail, and the daemon's resident memory is compared with what it
was after the first enrollments.

Needs root (pcscd). Prints a report; exits non-zero if anything is unaccounted for.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from desk_harness import ACCOUNT, Daemon, make_workdir, wait_for, write_config
from emulated_yubikey import EmulatedYubiKey, PcscStack
from local_iam_server import LocalIamServer

HERE = Path(__file__).resolve().parent

FIRST_SERIAL = 70_000_000

#: fault name -> (how to arm it, whether the enrollment must still succeed)
FAULTS: dict[str, tuple[Any, bool]] = {
    "none": (lambda iam, key: None, True),
    "throttled create": (
        lambda iam, key: iam.inject_fault("CreateVirtualMFADevice", code="Throttling"),
        True,
    ),
    "500 on enable": (
        lambda iam, key: iam.inject_fault("EnableMFADevice", code="ServiceFailure"),
        True,
    ),
    "dropped enable": (lambda iam, key: iam.inject_fault("EnableMFADevice", kind="drop"), True),
    "late create": (
        lambda iam, key: iam.inject_fault("CreateVirtualMFADevice", kind="delay", delay=1.3),
        True,
    ),
    "codes refused": (
        lambda iam, key: iam.inject_fault("EnableMFADevice", code="InvalidAuthenticationCode"),
        False,
    ),
    "token pulled": (lambda iam, key: key.schedule_pull(6), False),
}
WEIGHTS = {
    "none": 66,
    "throttled create": 6,
    "500 on enable": 6,
    "dropped enable": 5,
    "late create": 4,
    "codes refused": 7,
    "token pulled": 6,
}


@dataclass
class Report:
    enrollments: int
    seconds: float = 0.0
    faults: dict[str, int] = field(default_factory=dict)
    enrolled: int = 0
    rolled_back: int = 0
    retried: int = 0
    unaccounted: list[str] = field(default_factory=list)
    rss_kib: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run(enrollments: int, seed: int, stack: PcscStack, iam: LocalIamServer) -> Report:
    rng = random.Random(seed)
    report = Report(enrollments)
    users = [f"soak{i:04d}" for i in range(enrollments)]
    for user in users:
        iam.create_user(user)
    roster = "serial,user\n" + "".join(
        f"{FIRST_SERIAL + i},{user}\n" for i, user in enumerate(users)
    )
    workdir = make_workdir()
    config = write_config(
        workdir,
        roster=roster,
        extra="[token]\nreinsert_timeout = 0.5\n[iam]\nread_timeout = 1.0\nmax_attempts = 3\n",
    )
    admin = iam.admin_client("iam")
    daemon = Daemon(stack, iam, admin, workdir, config)
    daemon.start()
    try:
        _drive(daemon, stack, iam, rng, report, users, workdir / "state" / "provisioner.db")
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()
    return report


def _drive(
    daemon: Daemon,
    stack: PcscStack,
    iam: LocalIamServer,
    rng: random.Random,
    report: Report,
    users: list[str],
    db: Path,
) -> None:
    assert daemon.proc is not None
    enrollments = len(users)
    expected: dict[int, tuple[str, bool, EmulatedYubiKey]] = {}
    pulled: list[int] = []
    started = time.monotonic()
    for i, user in enumerate(users):
        serial = FIRST_SERIAL + i
        key = EmulatedYubiKey(serial=serial)
        fault = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
        report.faults[fault] = report.faults.get(fault, 0) + 1
        arm, succeeds = FAULTS[fault]
        arm(iam, key)
        slot = i % 2
        stack.insert(key, slot)
        wait_for(
            lambda s=serial: _outcome(db, s) is not None,
            timeout=30,
            what=f"the outcome for token {serial}",
        )
        iam.clear_faults()
        stack.remove(slot)
        expected[serial] = (user, succeeds, key)
        if fault == "token pulled":
            pulled.append(serial)
        if i == min(49, enrollments - 1):
            report.rss_kib["after 50"] = rss_kib(daemon.proc.pid)
        if fault == "late create":
            time.sleep(1.3)  # the late first try lands: it must not leave anything behind
    report.seconds = time.monotonic() - started
    report.rss_kib[f"after {enrollments}"] = rss_kib(daemon.proc.pid)
    # A pulled token is plugged in again, as an operator would: the stale credential
    # its rollback could not remove goes first, then the roster enrolls it for real.
    for serial in pulled:
        user, _ok, key = expected[serial]
        attempts = _attempts(db, serial)
        stack.insert(key, 0)
        wait_for(
            lambda s=serial, a=attempts: _attempts(db, s) > a and _outcome(db, s),
            timeout=30,
            what=f"token {serial} retried",
        )
        stack.remove(0)
        expected[serial] = (user, True, key)
        report.retried += 1
    _account(report, daemon.admin, db, expected)


def _outcome(db: Path, serial: int) -> str | None:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        row = conn.execute(
            "SELECT outcome FROM enrollments WHERE serial = ? ORDER BY id DESC LIMIT 1", (serial,)
        ).fetchone()
    if row is None or row[0] == "in progress":
        return None
    return str(row[0])


def _attempts(db: Path, serial: int) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        row = conn.execute(
            "SELECT COUNT(*) FROM enrollments WHERE serial = ?", (serial,)
        ).fetchone()
    return int(row[0])


def _account(
    report: Report, admin: Any, db: Path, expected: dict[int, tuple[str, bool, EmulatedYubiKey]]
) -> None:
    assigned: dict[str, str] = {}
    paginator = admin.get_paginator("list_virtual_mfa_devices")
    for page in paginator.paginate(AssignmentStatus="Any"):
        for device in page["VirtualMFADevices"]:
            user = (device.get("User") or {}).get("UserName")
            if user is None:
                report.unaccounted.append(f"unassigned device {device['SerialNumber']}")
            else:
                assigned[user] = device["SerialNumber"]
    for serial, (user, succeeds, key) in expected.items():
        outcome = _outcome(db, serial)
        credential = f"AWS:{user}@{ACCOUNT}"
        on_token = credential in {c.id for c in key.credentials()}
        if outcome == "enrolled":
            report.enrolled += 1
            good = user in assigned and on_token
        else:
            report.rolled_back += 1
            good = user not in assigned and not on_token
        if not good or (outcome == "enrolled") != succeeds:
            report.unaccounted.append(
                f"token {serial} ({user}): outcome {outcome}, device "
                f"{'yes' if user in assigned else 'no'}, credential {'yes' if on_token else 'no'}"
            )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--enrollments", type=int, default=500)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    with PcscStack(busy_timeout=90) as stack, LocalIamServer() as iam:
        report = run(args.enrollments, args.seed, stack, iam)
    text = json.dumps(report.as_dict(), indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 1 if report.unaccounted else 0


if __name__ == "__main__":
    sys.exit(main())
