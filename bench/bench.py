"""Benchmarks on the emulated stack: latency, throughput, footprint, and the scripted baseline.

    .venv/bin/python bench/bench.py                 # everything (about 6 minutes, as root)
    .venv/bin/python bench/bench.py --quick         # fewer runs, for a smoke check

Writes bench/results/latest.json; BENCHMARKS.md quotes its figures. Measured:

1. enrollment latency, "token present" (pcscd reports the card) to "device enabled and
   confirmed", through pcscd + vpcd + the emulated YubiKey against the strict local IAM
   server, split by step; each APDU and each IAM call is timed as it goes, so our own
   overhead shows next to the round trips it cannot avoid;
2. the same with the emulated token in-process (no PC/SC);
3. throughput: vpcd's two readers at once, and 1 to 16 in-process tokens at once;
4. the daemon: start to READY=1, CPU while idle (with and without a token present),
   resident memory;
5. the baseline people script today (ykman CLI adds the credential, reads a code, waits
   for the next 30 s boundary, reads another, then enables), as a ratio to ours.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yubikit.core.smartcard import SmartCardConnection

from desk_harness import Daemon, make_workdir, wait_for, write_config
from emulated_yubikey import EmulatedConnection, EmulatedYubiKey, PcscStack
from local_iam_server import LocalIamServer
from provisioner.adapters.aws.iam import IamClient
from provisioner.adapters.sqlite_store import Store
from provisioner.adapters.yubikey import Pcsc, YubiKeyToken
from provisioner.core.clock import AwsClock
from provisioner.core.enrollment import Enrollment, EnrollmentSettings

HERE = Path(__file__).resolve().parent

RESULTS = HERE / "results"
COMMANDS = {0xA4: "SELECT", 0x1D: "READ_CONFIG", 0xA1: "LIST", 0x01: "PUT", 0xA2: "CALCULATE"}


# --- instruments ----------------------------------------------------------------------


@dataclass
class Trace:
    """What one enrollment spent where."""

    apdus: list[float] = field(default_factory=list)
    #: the same times, by command (SELECT, READ_CONFIG, LIST, PUT, CALCULATE)
    by_command: dict[str, list[float]] = field(default_factory=dict)
    iam: dict[str, list[float]] = field(default_factory=dict)
    journal: list[float] = field(default_factory=list)
    waited: float = 0.0


class TimedConnection(SmartCardConnection):  # type: ignore[misc]
    """A SmartCardConnection that times each exchange (the card's round trips)."""

    def __init__(self, inner: Any, trace: Callable[[], Trace]) -> None:
        self._inner = inner
        self._trace = trace

    @property
    def transport(self) -> Any:
        return self._inner.transport

    def close(self) -> None:
        self._inner.close()

    def reconnect(self) -> None:
        self._inner.reconnect()

    def send_and_receive(self, apdu: bytes) -> tuple[bytes, int]:
        start = time.perf_counter()
        try:
            return self._inner.send_and_receive(apdu)  # type: ignore[no-any-return]
        finally:
            took = time.perf_counter() - start
            trace = self._trace()
            trace.apdus.append(took)
            name = COMMANDS.get(apdu[1], f"INS {apdu[1]:02X}") if len(apdu) > 1 else "?"
            trace.by_command.setdefault(name, []).append(took)


class TimedIam:
    """The IamDirectory with each call timed (IAM's round trips, retries included)."""

    def __init__(self, inner: IamClient, trace: Callable[[], Trace]) -> None:
        self._inner = inner
        self._trace = trace

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)
        if not callable(method):
            return method  # device_limit and the like: values, not calls

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self._trace().iam.setdefault(name, []).append(time.perf_counter() - start)

        return timed


class TimedJournal:
    def __init__(self, inner: Any, trace: Trace) -> None:
        self._inner = inner
        self._trace = trace

    def record(self, fact: Any, **kw: Any) -> None:
        start = time.perf_counter()
        self._inner.record(fact, **kw)
        self._trace.journal.append(time.perf_counter() - start)


class WaitingClock(AwsClock):
    """AwsClock that notes the planned waits for the next time step."""

    current: Trace | None = None

    def sleep(self, seconds: float) -> None:
        if self.current is not None and seconds > 0:
            self.current.waited += seconds
        super().sleep(seconds)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def ms(x: float) -> float:
    return round(x * 1000, 2)


# --- a bench desk -----------------------------------------------------------------------


class Bench:
    def __init__(self, iam_server: LocalIamServer, state_dir: Path) -> None:
        self.server = iam_server
        os.environ.update(iam_server.aws_env())
        self.clock = WaitingClock()
        self.iam = IamClient(self.clock, max_attempts=3)
        self.store = Store(state_dir / "bench.db")
        self.settings = EnrollmentSettings(desk="bench")
        self._users = 0
        self._lock = threading.Lock()
        self.local = threading.local()

    def trace(self) -> Trace:
        return self.local.trace  # type: ignore[no-any-return]

    def new_user(self) -> str:
        with self._lock:
            self._users += 1
            name = f"bench{self._users:05d}"
        self.server.create_user(name)
        return name

    def enroll(
        self, token: YubiKeyToken, user: str, trace: Trace
    ) -> tuple[float, dict[str, float]]:
        eid = self.store.start_enrollment(user, token.info.serial, "bench", "bench")
        journal = TimedJournal(self.store.journal(eid), trace)
        # this enrollment's trace, whichever thread makes the call (its checks run side
        # by side on threads of their own)
        enrollment = Enrollment(
            TimedIam(self.iam, lambda: trace), self.clock, self.settings, journal=journal
        )
        result = enrollment.run(token, user)
        self.store.finish_enrollment(
            eid, outcome="enrolled", actor="bench", device_arn=result.device_arn
        )
        steps: dict[str, float] = {}
        for t in result.timings:
            steps[t.step.value] = steps.get(t.step.value, 0.0) + t.seconds
        return result.seconds, steps


def _summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    totals = [r["total"] for r in rows]
    active = [r["total"] - r["waited"] for r in rows]
    steps = sorted({s for r in rows for s in r["steps"]})
    iam_calls = sorted({c for r in rows for c in r["iam"]})
    round_trips = [r["apdu_sum"] + r["iam_sum"] for r in rows]
    return {
        "n": len(rows),
        "total_median_ms": ms(statistics.median(totals)),
        "total_p95_ms": ms(pct(totals, 0.95)),
        "without_step_wait_median_ms": ms(statistics.median(active)),
        "without_step_wait_p95_ms": ms(pct(active, 0.95)),
        "waited_for_next_step": sum(1 for r in rows if r["waited"] > 0),
        "steps_median_ms": {
            s: ms(statistics.median([r["steps"].get(s, 0.0) for r in rows])) for s in steps
        },
        "card_connect_median_ms": ms(statistics.median([r["connect"] for r in rows])),
        "apdus_per_enrollment": round(statistics.median([r["apdus"] for r in rows])),
        "apdu_median_ms": ms(statistics.median([a for r in rows for a in r["apdu_list"]])),
        "apdu_sum_median_ms": ms(statistics.median([r["apdu_sum"] for r in rows])),
        "apdu_by_command": {
            c: {
                "per_enrollment": round(
                    statistics.median([len(r["by_command"].get(c, [])) for r in rows])
                ),
                "median_ms": ms(
                    statistics.median([x for r in rows for x in r["by_command"].get(c, [])])
                ),
            }
            for c in sorted({c for r in rows for c in r["by_command"]})
        },
        "iam_calls_median_ms": {
            c: ms(statistics.median([x for r in rows for x in r["iam"].get(c, [])]))
            for c in iam_calls
        },
        "iam_calls_per_enrollment": round(statistics.median([r["iam_n"] for r in rows])),
        "iam_sum_median_ms": ms(statistics.median([r["iam_sum"] for r in rows])),
        "journal_writes_per_enrollment": round(statistics.median([r["journal_n"] for r in rows])),
        "journal_sum_median_ms": ms(statistics.median([r["journal_sum"] for r in rows])),
        "round_trips_median_ms": ms(statistics.median(round_trips)),
        "ratio_to_round_trips_median": round(
            statistics.median(
                [(r["total"] - r["waited"]) / (r["apdu_sum"] + r["iam_sum"]) for r in rows]
            ),
            2,
        ),
    }


def _row(total: float, steps: dict[str, float], trace: Trace, connect: float) -> dict[str, Any]:
    return {
        "total": total + connect,
        "steps": {**steps, "card connect": connect},
        "waited": trace.waited,
        "connect": connect,
        "apdus": len(trace.apdus),
        "apdu_list": trace.apdus,
        "apdu_sum": sum(trace.apdus),
        "by_command": trace.by_command,
        "iam": trace.iam,
        "iam_n": sum(len(v) for v in trace.iam.values()),
        "iam_sum": sum(sum(v) for v in trace.iam.values()),
        "journal_n": len(trace.journal),
        "journal_sum": sum(trace.journal),
    }


# --- 1 and 2: latency -------------------------------------------------------------------


def latency_pcsc(bench: Bench, stack: PcscStack, n: int) -> dict[str, Any]:
    rows = []
    pcsc = Pcsc()
    reader = stack.reader_names[0]
    for i in range(n):
        key = EmulatedYubiKey(serial=80_000_000 + i)
        stack.insert(key, 0)  # returns once pcscd reports the card: "token present"
        user = bench.new_user()
        trace = bench.local.trace = Trace()
        bench.clock.current = trace
        start = time.perf_counter()
        token = YubiKeyToken(lambda: TimedConnection(pcsc.connect(reader), bench.trace), reader)
        connect = time.perf_counter() - start
        with token:
            total, steps = bench.enroll(token, user, trace)
        rows.append(_row(total, steps, trace, connect))
        stack.remove(0)
    pcsc.close()
    return _summarize(rows)


def latency_in_process(bench: Bench, n: int) -> dict[str, Any]:
    rows = []
    for i in range(n):
        key = EmulatedYubiKey(serial=81_000_000 + i)
        user = bench.new_user()
        trace = bench.local.trace = Trace()
        bench.clock.current = trace
        start = time.perf_counter()
        token = YubiKeyToken(
            lambda key=key: TimedConnection(EmulatedConnection(key), bench.trace), "in-process"
        )
        connect = time.perf_counter() - start
        with token:
            total, steps = bench.enroll(token, user, trace)
        rows.append(_row(total, steps, trace, connect))
    return _summarize(rows)


# --- 3: throughput ----------------------------------------------------------------------

#: Margin 0: a run that crosses the last seconds of a time step would otherwise wait for
#: the next one, which is a latency property (measured in 1.), not a concurrency one.
THROUGHPUT_SETTINGS = EnrollmentSettings(desk="bench", margin=0.0)


def throughput_in_process(bench: Bench, workers: int, per_worker: int) -> dict[str, Any]:
    bench.clock.current = None
    bench.settings = THROUGHPUT_SETTINGS
    errors: list[str] = []

    def work(w: int) -> None:
        for i in range(per_worker):
            key = EmulatedYubiKey(serial=82_000_000 + w * 1000 + i)
            user = bench.new_user()
            bench.local.trace = Trace()
            try:
                with YubiKeyToken(
                    lambda key=key: EmulatedConnection(key), f"in-process {w}"
                ) as token:
                    bench.enroll(token, user, bench.local.trace)
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

    start = time.perf_counter()
    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    done = workers * per_worker - len(errors)
    return {
        "workers": workers,
        "enrollments": done,
        "errors": len(errors),
        "seconds": round(wall, 2),
        "per_minute": round(done / wall * 60),
    }


def throughput_pcsc(bench: Bench, stack: PcscStack, per_reader: int) -> dict[str, Any]:
    bench.clock.current = None
    bench.settings = THROUGHPUT_SETTINGS
    enroll_time = [0.0, 0.0]

    def work(slot: int) -> None:
        pcsc = Pcsc()
        reader = stack.reader_names[slot]
        for i in range(per_reader):
            key = EmulatedYubiKey(serial=83_000_000 + slot * 1000 + i)
            stack.insert(key, slot)
            user = bench.new_user()
            bench.local.trace = Trace()
            start = time.perf_counter()
            with YubiKeyToken(pcsc.opener(reader), reader) as token:
                bench.enroll(token, user, bench.local.trace)
            enroll_time[slot] += time.perf_counter() - start
            stack.remove(slot)
        pcsc.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=work, args=(s,)) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    done = 2 * per_reader
    return {
        "readers": 2,
        "enrollments": done,
        "seconds_wall": round(wall, 2),
        "per_minute_including_plugging": round(done / wall * 60),
        "per_minute_token_present": round(done / (max(enroll_time)) * 60),
    }


# --- 4: the daemon ----------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def daemon_figures(
    stack: PcscStack, server: LocalIamServer, idle_seconds: float, starts: int
) -> dict[str, Any]:
    admin = server.admin_client("iam")
    ready: list[float] = []
    for _ in range(starts):
        workdir = make_workdir()
        d = Daemon(stack, server, admin, workdir, write_config(workdir))
        start = time.perf_counter()
        d.start()
        ready.append(time.perf_counter() - start)
        d.stop()
    workdir = make_workdir()
    d = Daemon(stack, server, admin, workdir, write_config(workdir))
    d.start()
    assert d.proc is not None
    time.sleep(2)
    rss_idle = rss_mib(d.proc.pid)
    before = cpu_seconds(d.proc.pid)
    time.sleep(idle_seconds)
    idle_none = (cpu_seconds(d.proc.pid) - before) / idle_seconds * 100
    stack.insert(EmulatedYubiKey(serial=84_000_000), 0)  # nobody queued: left untouched
    wait_for(lambda: any(t["state"] == "idle" for t in d.ask({"op": "status"})["tokens"]))
    time.sleep(1)
    before = cpu_seconds(d.proc.pid)
    time.sleep(idle_seconds)
    idle_token = (cpu_seconds(d.proc.pid) - before) / idle_seconds * 100
    stack.remove(0, wait=True)
    d.stop()
    metrics = metrics_figures(stack, server, admin)
    return {
        **metrics,
        "start_to_ready_median_ms": ms(statistics.median(ready)),
        "start_to_ready_max_ms": ms(max(ready)),
        "note": "start to READY=1 includes the Python interpreter and imports",
        "idle_cpu_percent_no_token": round(idle_none, 3),
        "idle_cpu_percent_token_present": round(idle_token, 3),
        "idle_seconds": idle_seconds,
        "rss_idle_mib": rss_idle,
    }


def metrics_figures(stack: PcscStack, server: LocalIamServer, admin: Any) -> dict[str, Any]:
    """The Prometheus endpoint's cost: memory with it on, and how long a scrape takes."""
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    workdir = make_workdir()
    config = write_config(workdir, extra=f'metrics_listen = "127.0.0.1:{port}"\n')
    d = Daemon(stack, server, admin, workdir, config)
    d.start()
    assert d.proc is not None
    scrapes = []
    for _ in range(50):
        start = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            answer.read()
        scrapes.append(time.perf_counter() - start)
    time.sleep(1)
    rss = rss_mib(d.proc.pid)
    d.stop()
    return {
        "rss_idle_mib_with_metrics": rss,
        "metrics_scrape_median_ms": ms(statistics.median(scrapes)),
        "metrics_scrape_max_ms": ms(max(scrapes)),
    }


# --- 5: the baseline ----------------------------------------------------------------------


def baseline(stack: PcscStack, server: LocalIamServer, runs: int) -> dict[str, Any]:
    """What people script today: ykman adds the credential and reads codes; boto3 enables."""
    ykman = str(Path(sys.executable).with_name("ykman"))
    reader = stack.reader_names[0]
    iam = server.admin_client("iam")
    times = []
    for i in range(runs):
        stack.insert(EmulatedYubiKey(serial=85_000_000 + i), 0)
        user = f"baseline{i}"
        server.create_user(user)
        start = time.perf_counter()
        device = iam.create_virtual_mfa_device(VirtualMFADeviceName=f"{user}-script")[
            "VirtualMFADevice"
        ]
        seed = device["Base32StringSeed"].decode()
        subprocess.run(
            [ykman, "--reader", reader, "oath", "accounts", "add", "-f", f"AWS:{user}", seed],
            check=True,
            capture_output=True,
        )

        def code(user: str = user) -> str:
            out = subprocess.run(
                [ykman, "--reader", reader, "oath", "accounts", "code", "-s", f"AWS:{user}"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            return out.strip()

        first = code()
        time.sleep(30 - time.time() % 30 + 0.2)  # the script waits for the next period
        second = code()
        iam.enable_mfa_device(
            UserName=user,
            SerialNumber=device["SerialNumber"],
            AuthenticationCode1=first,
            AuthenticationCode2=second,
        )
        times.append(time.perf_counter() - start)
        del seed
        stack.remove(0, wait=True)
    return {
        "runs": runs,
        "median_s": round(statistics.median(times), 2),
        "min_s": round(min(times), 2),
        "max_s": round(max(times), 2),
    }


# --- main -----------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer runs (a smoke check)")
    args = parser.parse_args()
    n = 10 if args.quick else 60
    RESULTS.mkdir(exist_ok=True)
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "host": socket.gethostname(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        },
    }
    with (
        PcscStack(busy_timeout=90) as stack,
        LocalIamServer() as server,
        tempfile.TemporaryDirectory() as state,
    ):
        bench = Bench(server, Path(state))
        print("latency through pcscd ...", flush=True)
        results["latency_pcsc"] = latency_pcsc(bench, stack, n)
        print("latency in-process ...", flush=True)
        results["latency_in_process"] = latency_in_process(bench, n)
        print("throughput ...", flush=True)
        results["throughput_pcsc_two_readers"] = throughput_pcsc(
            bench, stack, 5 if args.quick else 20
        )
        results["throughput_in_process"] = [
            throughput_in_process(bench, w, 5 if args.quick else 20) for w in (1, 2, 4, 8, 16)
        ]
        print("daemon ...", flush=True)
        results["daemon"] = daemon_figures(
            stack, server, 10 if args.quick else 60, 3 if args.quick else 10
        )
        print("baseline ...", flush=True)
        results["baseline_script"] = baseline(stack, server, 1 if args.quick else 2)
    ours = results["latency_pcsc"]["total_median_ms"] / 1000
    results["baseline_script"]["ratio_to_ours_median"] = round(
        results["baseline_script"]["median_s"] / ours
    )
    text = json.dumps(results, indent=2)
    (RESULTS / "latest.json").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
