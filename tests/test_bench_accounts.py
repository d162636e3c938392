"""bench/accounts.py, run small so that it cannot rot: two accounts, no latency, one
enrollment; its figures are the server's own counts."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest

from local_iam_server import LocalIamServer

BENCH = Path(__file__).resolve().parent.parent / "bench" / "accounts.py"
pytestmark = [pytest.mark.iam_server]


def load() -> Any:
    spec = importlib.util.spec_from_file_location("bench_accounts", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_accounts_benchmark_runs_and_counts_requests(
    local_iam: LocalIamServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = load()
    for name, value in local_iam.aws_env().items():
        monkeypatch.setenv(name, value)
    result = bench.case(local_iam, 2, 0.0, 1, 34_000_000)
    assert result["accounts"] == 2 and result["warm_runs"] == 1
    # GetUser, ListMFADevices, CreateVirtualMFADevice, EnableMFADevice in each account
    # (no confirming ListMFADevices after a clean enable); the cold one assumed the two
    # roles as well
    assert result["requests_per_enrollment"] == 8
    assert result["cold_requests"] == 10
    assert os.environ.get("AWS_ENDPOINT_URL_IAM") == local_iam.endpoint_url
