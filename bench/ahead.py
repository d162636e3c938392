"""Plug to enabled through the real daemon, at a round trip per IAM request: a user queued
before the plug, with the daemon's work ahead on (device made ahead), with checks only,
and with nothing ahead (the plug does everything). And the one-shot command as an
operator runs it (`provisioner enroll --direct`, a new process: imports, clients, the
TLS handshake with the server's own CA), token already plugged in.

    .venv/bin/python bench/ahead.py            # as root (pcscd); about two minutes
    .venv/bin/python bench/ahead.py --quick

Writes bench/results/ahead.json; BENCHMARKS.md quotes it. Measured from the moment pcscd
reports the card present (a thread blocked in SCardGetStatusChange on the reader) to the
moment the strict local IAM server enabled the device (its record of the accepted
EnableMFADevice). The server delays every request by the latency before it handles it, so
an enable "happens" one full round trip after it was sent: the figure counts whole round
trips. One daemon per mode; the emulated YubiKey behind vpcd; IAM over loopback HTTP.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from itertools import count
from pathlib import Path
from typing import Any

from smartcard import scard

from desk_harness import Daemon, make_workdir, wait_for, write_config
from emulated_yubikey import EmulatedYubiKey, PcscStack
from local_iam_server import LocalIamServer

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODES = {
    "device made ahead": "checks_ahead = 4\ndevices_ahead = 2\n",
    "checks only ahead": "checks_ahead = 4\ndevices_ahead = 0\n",
    "nothing ahead": "checks_ahead = 0\ndevices_ahead = 0\n",
}
_serials = count(47_000_001)
_users = count(1)


def card_seen_at(reader: str, ready: threading.Event, out: list[float]) -> None:
    """The time pcscd reports a card in ``reader`` (blocks until it does)."""
    _, ctx = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    try:
        _, states = scard.SCardGetStatusChange(ctx, 0, [(reader, scard.SCARD_STATE_UNAWARE)])
        ready.set()
        while True:
            hresult, states = scard.SCardGetStatusChange(ctx, 10_000, states)
            if hresult == scard.SCARD_S_SUCCESS and states[0][1] & scard.SCARD_STATE_PRESENT:
                out.append(time.time())
                return
            states = [(reader, states[0][1] & ~scard.SCARD_STATE_CHANGED)]
    finally:
        scard.SCardReleaseContext(ctx)


def one(desk: Daemon, stack: PcscStack, iam: LocalIamServer, ahead: bool) -> float:
    user = f"bench{next(_users)}"
    iam.create_user(user)
    queued = desk.cli("queue", "--user", user)
    assert queued.returncode == 0, queued.stderr
    if ahead:
        wait_for(
            lambda: any(f"/{user}.yubikey.q" in d for d in iam.unassigned_devices()),
            what="the device made ahead",
        )
    else:
        time.sleep(0.5)  # the checks (if any) done
    seen: list[float] = []
    ready = threading.Event()
    watcher = threading.Thread(
        target=card_seen_at, args=(stack.reader_names[0], ready, seen), daemon=True
    )
    watcher.start()
    ready.wait(5)
    stack.insert(EmulatedYubiKey(serial=next(_serials)), 0, wait=False)
    enabled = wait_for(
        lambda: [
            a.server_time
            for a in iam.attempts()
            if a.action == "EnableMFADevice" and a.user == user and a.accepted
        ],
        timeout=30,
        what=f"{user} enabled",
    )
    watcher.join(5)
    wait_for(
        lambda: any(r["outcome"] == "enrolled" for r in desk.history() if r["user"] == user),
        what="recorded",
    )
    stack.remove(0, wait=True)
    return float(enabled[0] - seen[0])


def one_shot(stack: PcscStack, iam: LocalIamServer, workdir: Path) -> tuple[float, float]:
    """`provisioner enroll --direct` for a new user, the token in reader 0: the
    command's wall time, and the time inside it from its first line to its last."""
    user = f"bench{next(_users)}"
    iam.create_user(user)
    stack.insert(EmulatedYubiKey(serial=next(_serials)), 0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= iam.aws_env() | {"PROVISIONER_CONFIG": str(workdir / "provisioner.toml")}
    started = time.perf_counter()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "provisioner",
            "enroll",
            "--direct",
            "--user",
            user,
            "--reader",
            stack.reader_names[0],
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    wall = time.perf_counter() - started
    stack.remove(0, wait=True)
    assert done.returncode == 0, done.stderr
    took = re.search(r"\(([0-9.]+) ms\)\s*$", done.stdout.strip())
    return wall, float(took.group(1)) / 1000 if took else float("nan")


def run_one_shot(latencies: list[float], runs: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with PcscStack(busy_timeout=90) as stack, LocalIamServer(tls=True) as iam:
        workdir = make_workdir()
        write_config(workdir)
        try:
            for latency in latencies:
                iam.set_latency(latency)
                measured = [one_shot(stack, iam, workdir) for _ in range(runs)]
                wall = statistics.median(m[0] for m in measured)
                inside = statistics.median(m[1] for m in measured)
                rows.append(
                    {
                        "mode": "one-shot command (HTTPS, cold process)",
                        "latency_ms": latency * 1000,
                        "runs": runs,
                        "wall_median_ms": wall * 1000,
                        "enrollment_median_ms": inside * 1000,
                        "round_trips": inside / latency if latency else None,
                    }
                )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    return rows


def cold_start(runs: int) -> dict[str, Any]:
    """The service not running, a rostered token plugged in: the udev rule starts it.
    Process start to READY=1, READY to the device enabled, and the whole (0 ms per
    request)."""
    rows = []
    with PcscStack(busy_timeout=90) as stack, LocalIamServer() as iam:
        for _ in range(runs):
            user, serial = f"bench{next(_users)}", next(_serials)
            iam.create_user(user)
            workdir = make_workdir()
            config = write_config(workdir, roster=f"serial,user\n{serial},{user}\n")
            desk = Daemon(stack, iam, iam.admin_client("iam"), workdir, config)
            stack.insert(EmulatedYubiKey(serial=serial), 0)  # the plug that starts it
            started = time.time()
            desk.start()
            try:
                enabled = wait_for(
                    lambda user=user: [
                        a.server_time
                        for a in iam.attempts()
                        if a.action == "EnableMFADevice" and a.user == user and a.accepted
                    ],
                    what="the first enrollment",
                )[0]
                assert desk.notify is not None
                ready = desk.notify.first_at("READY", "1")
                assert ready is not None
                rows.append((ready - started, enabled - ready, enabled - started))
            finally:
                desk.stop()
                stack.remove(0, wait=True)
                shutil.rmtree(workdir, ignore_errors=True)
    return {
        "runs": runs,
        "start_to_ready_median_ms": statistics.median(r[0] for r in rows) * 1000,
        "ready_to_enabled_median_ms": statistics.median(r[1] for r in rows) * 1000,
        "start_to_enabled_median_ms": statistics.median(r[2] for r in rows) * 1000,
        "start_to_enabled_max_ms": max(r[2] for r in rows) * 1000,
    }


def run(latencies: list[float], runs: int) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    with PcscStack(busy_timeout=90) as stack, LocalIamServer() as iam:
        for mode, settings in MODES.items():
            workdir = make_workdir()
            config = write_config(workdir, settings, ahead=True)
            desk = Daemon(stack, iam, iam.admin_client("iam"), workdir, config)
            desk.start()
            try:
                for latency in latencies:
                    iam.set_latency(latency)
                    one(desk, stack, iam, "device" in mode)  # warm-up: connections open
                    times = [one(desk, stack, iam, "device" in mode) for _ in range(runs)]
                    median = statistics.median(times)
                    rows.append(
                        {
                            "mode": mode,
                            "latency_ms": latency * 1000,
                            "runs": runs,
                            "plug_to_enabled_median_ms": median * 1000,
                            "plug_to_enabled_max_ms": max(times) * 1000,
                            "round_trips": median / latency if latency else None,
                        }
                    )
                iam.set_latency(0.0)
            finally:
                desk.stop()
                shutil.rmtree(workdir, ignore_errors=True)
    return {"rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run per case, 0 and 100 ms")
    args = parser.parse_args()
    latencies = [0.0, 0.1] if args.quick else [0.0, 0.05, 0.1, 0.2]
    started = time.time()
    results = run(latencies, 1 if args.quick else 5)
    results["one_shot"] = run_one_shot(latencies, 1 if args.quick else 5)
    results["cold_start"] = cold_start(2 if args.quick else 5)
    results["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ahead.json").write_text(json.dumps(results, indent=2) + "\n")
    for r in results["rows"]:
        rt = f" = {r['round_trips']:.2f} RTT" if r["round_trips"] else ""
        print(
            f"{r['mode']:<18} at {r['latency_ms']:>3.0f} ms: plug to enabled "
            f"{r['plug_to_enabled_median_ms']:.1f} ms{rt} (max {r['plug_to_enabled_max_ms']:.1f})"
        )
    for r in results["one_shot"]:
        rt = f" = {r['round_trips']:.2f} RTT" if r["round_trips"] else ""
        print(
            f"one-shot enroll --direct at {r['latency_ms']:>3.0f} ms: wall "
            f"{r['wall_median_ms']:.0f} ms, enrollment {r['enrollment_median_ms']:.1f} ms{rt}"
        )
    c = results["cold_start"]
    print(
        f"cold start, first plug to enabled at 0 ms: {c['start_to_enabled_median_ms']:.0f} ms "
        f"(start to READY {c['start_to_ready_median_ms']:.0f} ms, READY to enabled "
        f"{c['ready_to_enabled_median_ms']:.0f} ms; worst {c['start_to_enabled_max_ms']:.0f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
