"""Many tokens at once at a WAN round trip: 16 enrollments side by side against one at a
time, every IAM request held 100 ms by the strict local IAM server.

    .venv/bin/python bench/many.py            # about 30 s; no root, no pcscd
    .venv/bin/python bench/many.py --quick

Writes bench/results/many.json; BENCHMARKS.md quotes it. Tokens are emulated in process
(the work measured is waiting on IAM, not computing); each worker does what a daemon's
token worker does, with one IAM client shared by all of them as the daemon shares it
(bench.py's in-process throughput). The time-step margin is 0 so that no enrollment waits
for the next 30 s step (a latency property, not a concurrency one).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import Bench, throughput_in_process
from local_iam_server import LocalIamServer

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def run(latency: float, workers: int, per_worker: int) -> dict[str, Any]:
    with LocalIamServer() as server, tempfile.TemporaryDirectory() as tmp:
        bench = Bench(server, Path(tmp))
        server.set_latency(latency)
        throughput_in_process(bench, 1, 1)  # warm: the client and its first connection
        one = throughput_in_process(bench, 1, per_worker)
        many = throughput_in_process(bench, workers, per_worker)
    return {
        "latency_ms": latency * 1000,
        "one_at_a_time": one,
        "at_once": many,
        "ratio": many["per_minute"] / one["per_minute"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 enrollments per worker")
    args = parser.parse_args()
    started = time.time()
    results = run(0.1, 16, 2 if args.quick else 4)
    results["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "many.json").write_text(json.dumps(results, indent=2) + "\n")
    one, many = results["one_at_a_time"], results["at_once"]
    print(
        f"at {results['latency_ms']:.0f} ms: one at a time {one['per_minute']}/min, "
        f"{many['workers']} at once {many['per_minute']}/min ({many['errors']} errors): "
        f"{results['ratio']:.1f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
