"""A fleet on PostgreSQL against one desk on SQLite: claim latency, database round trips
per enrollment, and enrollments per minute of three desks with two readers each.

    .venv/bin/python bench/fleet.py           # about a minute (root: the cluster runs as postgres)
    .venv/bin/python bench/fleet.py --quick

Writes bench/results/fleet.json; BENCHMARKS.md quotes it. Each "reader" is a thread doing
what a daemon's token worker does for a queued user: take the request (take_next), start
the record, enroll (the journal's facts written as they happen), close the request and
the record (with its audit record in the desk's hash chain). Tokens are emulated in
process and IAM is the strict local server on loopback, so what differs between the
rows is the store. The PostgreSQL cluster is a private one on a Unix socket (as the
tests start it); a real fleet's database is across a network, where each round trip
costs more: the round-trip count is the figure that carries over.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from desk_harness.postgres import PostgresCluster
from emulated_yubikey import EmulatedConnection, EmulatedYubiKey
from local_iam_server import LocalIamServer
from provisioner.adapters.aws.iam import IamClient
from provisioner.adapters.postgres_store import PostgresStore, migrate
from provisioner.adapters.sqlite_store import SqliteStore
from provisioner.adapters.yubikey import YubiKeyToken
from provisioner.core.clock import AwsClock
from provisioner.core.enrollment import Enrollment, EnrollmentSettings
from provisioner.core.messages import Outcome
from provisioner.core.store import DeskStore, RequestState

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def reader(
    store: DeskStore, desk: str, iam: IamClient, serials: list[int], claims: list[float]
) -> None:
    """One reader's work: for each token, claim a request and enroll its user."""
    clock = AwsClock()
    settings = EnrollmentSettings(desk=desk, margin=1.0)
    for serial in serials:
        started = time.perf_counter()
        entry = store.take_next(None)
        claims.append(time.perf_counter() - started)
        assert entry is not None, "the queue ran dry"
        key = EmulatedYubiKey(serial=serial)
        with YubiKeyToken(lambda key=key: EmulatedConnection(key), f"{desk} reader") as token:
            eid = store.start_enrollment(entry.user, serial, "reader", f"queue:{entry.id}")
            store.link_entry(entry.id, eid)
            journal = store.journal(eid, defer_after=True)  # as the daemon's
            result = Enrollment(iam, clock, settings, journal=journal).run(token, entry.user)
            journal.flush()
        store.finish_entry(entry.id, RequestState.DONE, eid)
        store.finish_enrollment(
            eid, outcome=Outcome.ENROLLED, actor="bench", device_arn=result.device_arn
        )


def run_desks(
    stores: dict[str, DeskStore], readers_per_desk: int, per_reader: int, serial: int
) -> dict[str, Any]:
    """Every desk's readers at once; the queue filled first with one request per token."""
    total = len(stores) * readers_per_desk * per_reader
    first = next(iter(stores.values()))
    for i in range(total):
        first.enqueue(f"u{serial + i}", "bench")
    iam = IamClient(AwsClock())
    claims: list[float] = []
    threads = []
    n = 0
    for name, store in stores.items():
        for _ in range(readers_per_desk):
            serials = list(range(serial + n * per_reader, serial + (n + 1) * per_reader))
            threads.append(
                threading.Thread(target=reader, args=(store, name, iam, serials, claims))
            )
            n += 1
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    return {
        "desks": len(stores),
        "readers": len(threads),
        "enrollments": total,
        "seconds": seconds,
        "per_minute": total / seconds * 60,
        "claim_median_ms": statistics.median(claims) * 1000,
        "claim_p95_ms": sorted(claims)[int(len(claims) * 0.95) - 1] * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    per_reader = 3 if args.quick else 15
    results: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with LocalIamServer() as server, PostgresCluster() as cluster:
        os.environ.update(server.aws_env())
        users = 6 * per_reader + 2 * per_reader
        admin = server.admin_client("iam")
        for i in range(users):
            admin.create_user(UserName=f"u{50_000_000 + i}")
        with tempfile.TemporaryDirectory() as tmp:
            sqlite = SqliteStore(Path(tmp) / "desk.db", desk="solo")
            results["sqlite_one_desk"] = run_desks({"solo": sqlite}, 2, per_reader, 50_000_000)
            sqlite.close()
        migrate(cluster.url())
        stores = {
            f"desk{i}": PostgresStore(cluster.url("provisioner_desk"), desk=f"desk{i}")
            for i in range(3)
        }
        before = sum(s.round_trips for s in stores.values())
        fleet = run_desks(stores, 2, per_reader, 50_000_000 + 2 * per_reader)
        fleet["round_trips_per_enrollment"] = (
            sum(s.round_trips for s in stores.values()) - before
        ) / fleet["enrollments"]
        results["postgres_three_desks"] = fleet
        for store in stores.values():
            store.close()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fleet.json").write_text(json.dumps(results, indent=2) + "\n")
    for name in ("sqlite_one_desk", "postgres_three_desks"):
        r = results[name]
        extra = (
            f", {r['round_trips_per_enrollment']:.1f} database round trips per enrollment"
            if "round_trips_per_enrollment" in r
            else ""
        )
        print(
            f"{name}: {r['desks']} desks x {r['readers'] // r['desks']} readers, "
            f"{r['enrollments']} enrollments in {r['seconds']:.1f} s = {r['per_minute']:.0f}/min; "
            f"claim median {r['claim_median_ms']:.2f} ms (p95 {r['claim_p95_ms']:.2f}){extra}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
