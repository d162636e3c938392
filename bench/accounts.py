"""One plug, several accounts: enrollment latency with 1, 3 and 8 accounts, on loopback and
with a round trip injected into every IAM and STS request.

    .venv/bin/python bench/accounts.py            # about a minute; no root, no pcscd
    .venv/bin/python bench/accounts.py --quick    # one enrollment per case

Writes bench/results/accounts.json; BENCHMARKS.md quotes it. Each case: N member accounts
on the strict local IAM server (a role with an external id and one user per enrollment in each),
the desk's own configuration with N [[accounts]], and enrollments of alice with a fresh
emulated YubiKey each (in process: the token is not what is measured here), each through
the same path as `provisioner enroll --direct` (the desk's store records a batch of N
records). The first enrollment of a case is "cold": it assumes the N roles. The rest are
"warm" (sessions cached), as a daemon's are. Requests per enrollment come from the
server's own call counts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from desk_harness import write_config
from emulated_yubikey import EmulatedConnection, EmulatedYubiKey
from local_iam_server import LocalIamServer
from provisioner.adapters.yubikey import YubiKeyToken
from provisioner.cli import direct
from provisioner.config import load
from provisioner.desk import Desk

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
EXTERNAL_ID = "bench-ext"


def account_id(i: int) -> str:
    return f"{111111111111 * (i + 1) % 10**12:012d}" if i < 8 else f"{900000000000 + i:012d}"


def setup(server: LocalIamServer, workdir: Path, n: int, users: int) -> Any:
    """N accounts with a role and ``users`` users (IAM allows 8 devices a user: one user
    per enrollment); the desk's configuration naming them."""
    server.reset()
    lines = []
    for i in range(n):
        account = account_id(i)
        role = server.create_account_role(account, "provisioner-desk", external_id=EXTERNAL_ID)
        for u in range(users):
            server.create_user(f"user{u}", account=account)
        lines.append(
            f'\n[[accounts]]\nname = "a{i}"\nrole_arn = "{role.arn}"\nexternal_id = "{EXTERNAL_ID}"\n'
        )
    return load(write_config(workdir, "".join(lines)))


def enroll_once(config: Any, desk: Desk, serial: int, user: str) -> tuple[float, dict[str, float]]:
    """One enrollment of ``user`` in every account; (seconds, per-step seconds summed
    over the accounts' legs)."""
    key = EmulatedYubiKey(serial=serial)
    ticks = time.perf_counter()
    with (
        direct.desk_state(config, service_user=None) as state,
        YubiKeyToken(lambda: EmulatedConnection(key), "bench") as token,
    ):
        result = direct.enroll_accounts(state, desk, token, user, config.accounts)
    seconds = time.perf_counter() - ticks
    steps: dict[str, float] = {}
    for _, one in result.enrolled:
        for timing in one.timings:
            steps[timing.step.value] = steps.get(timing.step.value, 0.0) + timing.seconds
    return seconds, steps


def case(server: LocalIamServer, n: int, latency: float, runs: int, serial: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-accounts-") as tmp:
        config = setup(server, Path(tmp), n, runs + 1)
        server.set_latency(latency)
        desk = Desk.from_config(config)
        before = server.call_counts()
        cold, _ = enroll_once(config, desk, serial, "user0")
        after_cold = server.call_counts()
        warm: list[float] = []
        steps: list[dict[str, float]] = []
        for i in range(runs):
            seconds, per_step = enroll_once(config, desk, serial + 1 + i, f"user{i + 1}")
            warm.append(seconds)
            steps.append(per_step)
        after = server.call_counts()
        server.set_latency(0.0)
    requests = sum(after.values()) - sum(after_cold.values())
    return {
        "accounts": n,
        "latency_ms": latency * 1000,
        "cold_ms": cold * 1000,
        "cold_requests": sum(after_cold.values()) - sum(before.values()),
        "warm_median_ms": statistics.median(warm) * 1000,
        "warm_max_ms": max(warm) * 1000,
        "warm_runs": runs,
        "requests_per_enrollment": requests / runs,
        "round_trips": (statistics.median(warm) / latency) if latency else None,
        "steps_median_ms": {
            step: statistics.median(s.get(step, 0.0) for s in steps) * 1000 / n for step in steps[0]
        },
    }


def run(counts: list[int], latencies: list[float], runs: dict[float, int]) -> dict[str, Any]:
    results: dict[str, Any] = {"cases": []}
    serial = 33_000_000
    with LocalIamServer() as server:
        os.environ.update(server.aws_env())
        for latency in latencies:
            for n in counts:
                print(f"{n} accounts at {latency * 1000:.0f} ms ...", flush=True)
                results["cases"].append(case(server, n, latency, runs[latency], serial))
                serial += 100
    by = {(c["accounts"], c["latency_ms"]): c for c in results["cases"]}
    if (1, 100.0) in by and (3, 100.0) in by:
        ratio = by[(3, 100.0)]["warm_median_ms"] / by[(1, 100.0)]["warm_median_ms"]
        results["three_over_one_at_100ms"] = ratio
        results["target_met"] = ratio < 1.5
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one warm enrollment per case")
    args = parser.parse_args()
    runs = {0.0: 1, 0.1: 1} if args.quick else {0.0: 10, 0.1: 5}
    started = time.time()
    results = run([1, 3, 8], [0.0, 0.1], runs)
    results["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    results["seconds"] = time.time() - started
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "accounts.json").write_text(json.dumps(results, indent=2) + "\n")
    for c in results["cases"]:
        rt = f", {c['round_trips']:.2f} RTT" if c["round_trips"] else ""
        print(
            f"{c['accounts']} accounts at {c['latency_ms']:.0f} ms: warm median "
            f"{c['warm_median_ms']:.1f} ms{rt} (max {c['warm_max_ms']:.1f}), cold "
            f"{c['cold_ms']:.1f} ms, {c['requests_per_enrollment']:.0f} requests"
        )
    if "three_over_one_at_100ms" in results:
        print(f"3 accounts / 1 account at 100 ms: {results['three_over_one_at_100ms']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
