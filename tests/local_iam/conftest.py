"""Fixtures for the strict local IAM stand-in: one server for the session, reset per test.

The server runs as its own process (``LocalIamServer``) and the tests talk to it with
the real boto3, so every assertion is about what a client of AWS would see.
"""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from local_iam_server import LocalIamServer

from .helpers import STEP, Device, make_client


@pytest.fixture(scope="session")
def iam_server_session() -> Iterator[LocalIamServer]:
    # verbose: the server logs requests and attempts, so the tests can check that
    # no seed ever reaches its log.
    with LocalIamServer(verbose=True) as server:
        yield server


@pytest.fixture
def iam_server(iam_server_session: LocalIamServer) -> Iterator[LocalIamServer]:
    """The session's server, reset to empty before each test."""
    iam_server_session.reset()
    yield iam_server_session


@pytest.fixture
def iam(iam_server: LocalIamServer) -> Any:
    return make_client(iam_server, "iam")


@pytest.fixture
def sts(iam_server: LocalIamServer) -> Any:
    return make_client(iam_server, "sts")


@pytest.fixture
def server_now(iam_server: LocalIamServer) -> float:
    """Pin the server's clock to 0.5 s into a step, and return the server's time.

    Code pairs are then computed for a known step N with ~29 s before the server moves
    on, so window tests cannot flake on a step boundary.
    """
    wall = time.time()
    target = (math.floor(wall / STEP) + 1) * STEP + 0.5
    iam_server.set_clock_offset(target - wall)
    return iam_server.server_time()


@pytest.fixture
def new_device(iam: Any) -> Callable[..., Device]:
    def create(name: str = "desk-token", **kwargs: Any) -> Device:
        created = iam.create_virtual_mfa_device(VirtualMFADeviceName=name, **kwargs)
        device = created["VirtualMFADevice"]
        seed = device["Base32StringSeed"].decode("ascii")
        base64.b32decode(seed)  # fails loudly if it is not base32 text
        return Device(device["SerialNumber"], seed)

    return create


@pytest.fixture
def new_user(iam: Any) -> Callable[[str], str]:
    def create(name: str) -> str:
        iam.create_user(UserName=name)
        return name

    return create
