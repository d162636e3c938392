"""Latency: a real network's round trip in front of every call, waited side by side.

No tight wall-clock thresholds: a serial server would take 16 round trips for 16
parallel calls, a concurrent one about one, and the bound sits far from both.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from local_iam_server import LocalIamServer

from .helpers import make_client

pytestmark = pytest.mark.iam_server

ROUND_TRIP = 0.2
PARALLEL = 16
LONG = 0.6  # where a call must not have waited: far above a loaded loopback call


def timed(call: Any) -> float:
    started = time.monotonic()
    call()
    return time.monotonic() - started


def test_parallel_calls_wait_side_by_side(iam_server: LocalIamServer) -> None:
    clients = [make_client(iam_server, "iam") for _ in range(PARALLEL)]
    for client in clients:
        client.list_users()  # connections open before the clock starts
    iam_server.set_latency(ROUND_TRIP)
    started = time.monotonic()
    with ThreadPoolExecutor(PARALLEL) as pool:
        each = list(pool.map(lambda c: timed(c.list_users), clients))
    total = time.monotonic() - started
    assert min(each) >= ROUND_TRIP  # every call waited its round trip
    assert total < PARALLEL * ROUND_TRIP / 3  # but not one after another
    assert iam_server.call_counts()["ListUsers"] == 2 * PARALLEL


def test_latency_covers_sts_and_only_the_named_actions(iam_server: LocalIamServer) -> None:
    iam, sts = make_client(iam_server, "iam"), make_client(iam_server, "sts")
    role = iam_server.create_account_role("111111111111", "desk")
    iam.list_users()  # connection open
    iam_server.set_latency(LONG, ["AssumeRole"])
    assert timed(lambda: sts.assume_role(RoleArn=role.arn, RoleSessionName="desk")) >= LONG
    assert timed(iam.list_users) < LONG
    iam_server.set_latency(ROUND_TRIP)
    assert timed(sts.get_caller_identity) >= ROUND_TRIP


def test_reset_clears_the_latency(iam_server: LocalIamServer) -> None:
    iam = make_client(iam_server, "iam")
    iam.list_users()  # connection open
    iam_server.set_latency(LONG, ["ListUsers"])
    iam_server.reset()
    assert iam_server.latency() == {"seconds": 0.0, "actions": None}
    assert timed(iam.list_users) < LONG
